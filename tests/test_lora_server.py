"""Multi-LoRA through a real server and real clients: adapters from the model dir's adapters/,
the DJL adapter routes and vLLM's load/unload routes (plain HTTP), s3:// adapters from a moto
server, and every way a client selects an adapter: LMI's "adapters" field, the
X-Amzn-SageMaker-Adapter-Identifier header and ?adapter=, lorax-client's adapter_id (also
loading an adapter on first use with adapter_source), openai's model=<adapter>, boto3's
InferenceComponentName. Outputs are checked against PEFT (the adapter merged into the base
model, HF transformers fp32).
"""

import functools
import json
import threading
from pathlib import Path

import boto3
import botocore.config
import openai
import pytest
import torch
from lorax import Client as LoraxClient
from lorax import errors as lorax_errors
from server_utils import LmcServer, MotoServer
from tiny_models import ALL_LINEAR_MODULES, make_tiny_llama, make_tiny_lora, merged_lora_model

NAME = "tiny-base"
NEW_TOKENS = 6
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    base = make_tiny_llama(root / NAME)
    make_tiny_lora(base, base / "adapters" / "qv8", r=8, targets=("q_proj", "v_proj"), seed=1)
    make_tiny_lora(base, base / "adapters" / "all16", r=16, alpha=32, targets=ALL_LINEAR_MODULES,
                   seed=2)
    extra = {"down8": make_tiny_lora(base, root / "extra" / "down8", r=8, seed=3,
                                     targets=("down_proj", "gate_proj")),
             "dora": make_tiny_lora(base, root / "extra" / "dora", r=8, seed=4, use_dora=True),
             "big": make_tiny_lora(base, root / "extra" / "big", r=32, seed=5)}
    (base / "serving.properties").write_text(
        "option.enable_lora=true\noption.max_loras=2\noption.max_rolling_batch_size=16\n")
    env = {"LMC_ALLOWED_URLS": str(root)}
    with LmcServer(["--model-dir", str(base)], env=env, timeout_s=180) as srv:
        srv.base, srv.extra, srv.root = base, extra, root
        yield srv


@functools.cache
def reference_ids(base: str, adapter: str | None, prompt: str) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = (merged_lora_model(base, adapter) if adapter else
             AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval())
    ids = AutoTokenizer.from_pretrained(base)(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def adapter_path(srv, name):
    return str(srv.base / "adapters" / name) if name in ("qv8", "all16") else str(srv.extra[name])


def lmi(srv, body, **kw):
    body.setdefault("parameters", {}).update(max_new_tokens=NEW_TOKENS,
                                             min_new_tokens=NEW_TOKENS, details=True)
    return srv.post("/invocations", body, **kw)


def token_ids(result) -> list[int]:
    body = result.json()
    body = body[0] if isinstance(body, list) else body
    return [t["id"] for t in body["details"]["tokens"]]


def test_adapters_dir_is_registered_and_listed(lora):
    listed = lora.request("GET", f"/models/{NAME}/adapters").json()["adapters"]
    assert [a["name"] for a in listed] == ["all16", "qv8"]
    models = openai.OpenAI(base_url=lora.url + "/v1", api_key="x").models.list().data
    parents = {m.id: getattr(m, "parent", None) for m in models}
    assert parents == {NAME: None, "all16": NAME, "qv8": NAME}


@pytest.mark.parametrize("adapter", [None, "qv8", "all16"])
def test_lmi_selection_equals_peft(lora, adapter):
    """The "adapters" field, the SageMaker adapter header and ?adapter= pick the same
    adapter, and its tokens are PEFT's."""
    want = reference_ids(str(lora.base), adapter_path(lora, adapter) if adapter else None, PROMPT)
    by_field = lmi(lora, {"inputs": PROMPT, "adapters": adapter or ""})
    assert by_field.status == 200, by_field.body
    assert token_ids(by_field) == want
    if adapter:
        by_header = lmi(lora, {"inputs": PROMPT},
                        headers={"X-Amzn-SageMaker-Adapter-Identifier": adapter})
        assert token_ids(by_header) == want
        by_query = lora.post(f"/invocations?adapter={adapter}", {
            "inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS,
                                             "min_new_tokens": NEW_TOKENS, "details": True}})
        assert token_ids(by_query) == want


def test_a_list_input_takes_one_adapter_per_input(lora):
    r = lmi(lora, {"inputs": [PROMPT, PROMPT, PROMPT], "adapters": ["qv8", "", "all16"]})
    bodies = r.json()
    got = [[t["id"] for t in b["details"]["tokens"]] for b in bodies]
    base = str(lora.base)
    assert got == [reference_ids(base, adapter_path(lora, "qv8"), PROMPT),
                   reference_ids(base, None, PROMPT),
                   reference_ids(base, adapter_path(lora, "all16"), PROMPT)]


def test_concurrent_requests_over_adapters_and_base(lora):
    """16 requests at once over the base model and two adapters (one batch on the engine)."""
    prompts = [f"{PROMPT} {i}" for i in range(4)]
    names = [None, "qv8", "all16", "qv8"]
    results: dict[int, list[int]] = {}

    def one(i):
        r = lmi(lora, {"inputs": prompts[i % 4], "adapters": names[i % 4] or ""})
        results[i] = token_ids(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    base = str(lora.base)
    for i in range(16):
        name = names[i % 4]
        assert results[i] == reference_ids(base, adapter_path(lora, name) if name else None,
                                           prompts[i % 4]), i


def test_openai_model_names_the_adapter(lora):
    client = openai.OpenAI(base_url=lora.url + "/v1", api_key="x", max_retries=0)
    texts = {}
    for model in (NAME, "qv8", "all16"):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                      temperature=0, extra_body={"min_tokens": NEW_TOKENS})
        texts[model] = r.choices[0].text
        assert r.model == model
    lmi_text = lmi(lora, {"inputs": PROMPT, "adapters": "all16"}).json()["generated_text"]
    assert texts["all16"] == lmi_text and texts["all16"] != texts[NAME]
    with pytest.raises(openai.NotFoundError, match="available: tiny-base, all16, qv8"):
        client.completions.create(model="qv9", prompt=PROMPT, max_tokens=2)


def test_lorax_client_adapter_id(lora):
    client = LoraxClient(lora.url, timeout=60)
    r = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter_id="qv8", details=True)
    plain = lmi(lora, {"inputs": PROMPT, "adapters": "qv8"}).json()
    # lorax-client sends no min_new_tokens: compare the prefix up to where EOS may cut it.
    want = [t["id"] for t in plain["details"]["tokens"]]
    assert [t.id for t in r.details.tokens] == want[:len(r.details.tokens)]
    with pytest.raises(lorax_errors.NotFoundError, match="registered adapters"):
        client.generate(PROMPT, max_new_tokens=2, adapter_id="nope")
    stream = list(client.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS, adapter_id="all16"))
    assert "".join(s.token.text for s in stream if not s.token.special) == \
        client.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter_id="all16").generated_text


def test_lorax_merged_adapters(lora):
    """merged_adapters, linear: ΔW = Σ w_i ΔW_i exactly, so qv8 merged with itself at
    0.5 / 0.5 is qv8; the merge's rank (the sum) must fit option.max_lora_rank."""
    from lorax.types import MergedAdapters

    client = LoraxClient(lora.url, timeout=60)

    def run(**kw):
        return client.generate(PROMPT, max_new_tokens=NEW_TOKENS, details=True, **kw)

    def merge(ids, weights, strategy="linear"):
        return MergedAdapters(ids=ids, weights=weights, merge_strategy=strategy, density=1.0)

    single = [t.id for t in run(adapter_id="qv8").details.tokens]
    assert [t.id for t in run(merged_adapters=merge(["qv8", "qv8"], [0.5, 0.5])).details.tokens
            ] == single
    doubled = run(merged_adapters=merge(["qv8", "qv8"], [1.0, 1.0]))
    assert [t.id for t in doubled.details.tokens] != single
    with pytest.raises(lorax_errors.ValidationError, match="rank 24.*max_lora_rank=16"):
        run(merged_adapters=merge(["qv8", "all16"], [0.5, 0.5]))
    with pytest.raises(lorax_errors.ValidationError, match="merge_strategy"):
        run(merged_adapters=merge(["qv8", "all16"], [0.5, 0.5], "ties"))


def test_boto3_inference_component_names_the_adapter(lora):
    c = boto3.client("sagemaker-runtime", endpoint_url=lora.url, region_name="us-east-1",
                     aws_access_key_id="x", aws_secret_access_key="x",
                     config=botocore.config.Config(retries={"max_attempts": 1}))
    body = json.dumps({"inputs": PROMPT, "parameters": {
        "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "details": True}})
    r = c.invoke_endpoint(EndpointName="ep", Body=body, ContentType="application/json",
                          InferenceComponentName="all16")
    got = [t["id"] for t in json.loads(r["Body"].read())["details"]["tokens"]]
    assert got == reference_ids(str(lora.base), adapter_path(lora, "all16"), PROMPT)
    with pytest.raises(c.exceptions.ValidationError, match="Inference component nope"):
        c.invoke_endpoint(EndpointName="ep", Body=body, ContentType="application/json",
                          InferenceComponentName="nope")


def test_djl_adapter_routes(lora):
    """Register, describe, use, update (pin), unregister: DJL's adapter management API."""
    src = adapter_path(lora, "down8")
    r = lora.post(f"/models/{NAME}/adapters?name=down8&src={src}")
    assert r.status == 200 and r.json() == {"status": "Adapter down8 registered"}
    assert lora.request("GET", f"/models/{NAME}/adapters/down8").json()[0]["src"] == src
    page = lora.request("GET", f"/models/{NAME}/adapters?limit=2").json()
    assert [a["name"] for a in page["adapters"]] == ["all16", "qv8"]
    assert page["nextPageToken"] == "2"
    rest = lora.request("GET", f"/models/{NAME}/adapters?limit=2&next_page_token=2").json()
    assert [a["name"] for a in rest["adapters"]] == ["down8"] and "nextPageToken" not in rest
    assert token_ids(lmi(lora, {"inputs": PROMPT, "adapters": "down8"})) == \
        reference_ids(str(lora.base), src, PROMPT)
    assert lora.post(f"/models/{NAME}/adapters?name=down8&src={src}").status == 409
    assert lora.post(f"/models/{NAME}/adapters/down8/update?pin=true").status == 200
    assert lora.request("GET", f"/models/{NAME}/adapters/down8").json()[0]["pin"] is True
    # max_loras=2 and down8 holds one slot: pinning a second leaves requests one slot, a
    # third pin has none.
    assert lora.post(f"/models/{NAME}/adapters/qv8/update?pin=true").status == 200
    full = lora.post(f"/models/{NAME}/adapters/all16/update?pin=true")
    assert full.status == 507 and "max_loras" in full.json()["message"]
    assert lora.post(f"/models/{NAME}/adapters/qv8/update?pin=false").status == 200
    assert lora.request("DELETE", f"/models/{NAME}/adapters/down8").status == 200
    gone = lmi(lora, {"inputs": PROMPT, "adapters": "down8"})
    assert gone.status == 404 and "registered adapters: all16, qv8" in gone.json()["message"]
    assert lora.request("GET", f"/models/{NAME}/adapters/down8").status == 404


def test_vllm_load_and_unload_routes(lora):
    src = adapter_path(lora, "down8")
    r = lora.post("/v1/load_lora_adapter", {"lora_name": "v-down8", "lora_path": src})
    assert r.status == 200 and b"added successfully" in r.body
    client = openai.OpenAI(base_url=lora.url + "/v1", api_key="x", max_retries=0)
    out = client.completions.create(model="v-down8", prompt=PROMPT, max_tokens=NEW_TOKENS,
                                    temperature=0, extra_body={"min_tokens": NEW_TOKENS})
    assert out.choices[0].text
    assert lora.post("/v1/unload_lora_adapter", {"lora_name": "v-down8"}).status == 200
    assert lora.post("/v1/unload_lora_adapter", {"lora_name": "v-down8"}).status == 404


def test_registration_errors(lora, tmp_path):
    bad = lora.post(f"/models/{NAME}/adapters?name=d&src={adapter_path(lora, 'dora')}")
    assert bad.status == 400 and bad.json()["field"] == "use_dora"
    big = lora.post(f"/models/{NAME}/adapters?name=b&src={adapter_path(lora, 'big')}")
    assert big.status == 400 and "option.max_lora_rank=16" in big.json()["message"]
    outside = make_tiny_lora(lora.base, tmp_path / "outside", r=8)
    denied = lora.post(f"/models/{NAME}/adapters?name=o&src={outside}")
    assert denied.status == 403 and "LMC_ALLOWED_URLS" in denied.json()["message"]
    missing = lora.post(f"/models/{NAME}/adapters?name=m&src={lora.root}/nope")
    assert missing.status == 400
    assert lora.post(f"/models/{NAME}/adapters?name=x").status == 400  # no src
    names = [a["name"] for a in lora.request("GET", f"/models/{NAME}/adapters").json()["adapters"]]
    assert names == ["all16", "qv8"]


def test_s3_adapters(lora):
    """An adapter under an s3:// prefix, registered through the API and by LoRAX's
    adapter_source=s3 on first use."""
    with MotoServer() as env:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")
        s3.create_bucket(Bucket="adapters")
        for f in Path(adapter_path(lora, "down8")).iterdir():
            s3.upload_file(str(f), "adapters", f"down8/{f.name}")
        # The server reads AWS_* from its own environment: this one has no endpoint for moto,
        # so register through a server that has it.
        root = lora.root
        with LmcServer(["--model-dir", str(lora.base)], env={**env, "LMC_ALLOWED_URLS": str(root),
                                                            "LMC_CACHE": str(root / "cache")},
                       timeout_s=180) as srv:
            r = srv.post(f"/models/{NAME}/adapters?name=s3a&src=s3://adapters/down8/")
            assert r.status == 200, r.body
            want = reference_ids(str(lora.base), adapter_path(lora, "down8"), PROMPT)
            assert token_ids(lmi(srv, {"inputs": PROMPT, "adapters": "s3a"})) == want
            client = LoraxClient(srv.url, timeout=60)
            out = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, details=True,
                                  adapter_id="s3://adapters/down8/", adapter_source="s3")
            assert [t.id for t in out.details.tokens] == want[:len(out.details.tokens)]
            listed = srv.request("GET", f"/models/{NAME}/adapters").json()["adapters"]
            assert "s3://adapters/down8/" in [a["name"] for a in listed]


def test_lora_not_enabled_says_which_option(tiny_llm_server, lora):
    srv = tiny_llm_server
    r = srv.post(f"/models/tiny-llama/adapters?name=a&src={adapter_path(lora, 'qv8')}")
    assert r.status == 400 and "option.enable_lora=true" in r.json()["message"]
    r = srv.post("/invocations", {"inputs": "hi", "adapters": "qv8"})
    assert r.status == 400 and "option.enable_lora=true" in r.json()["message"]


CUSTOM_MODEL = '''
from djl_python import Input, Output

adapters = {}


def register_adapter(inputs: Input):
    adapters[inputs.get_property("name")] = (inputs.get_property("src"),
                                             inputs.get_as_string("pin"),
                                             inputs.get_property("echooption"))
    return Output().add("registered")


def unregister_adapter(inputs: Input):
    del adapters[inputs.get_property("name")]
    return Output().add("unregistered")


def handle(inputs: Input):
    if inputs.is_empty():
        return None
    name = inputs.get_property("X-Amzn-SageMaker-Adapter-Identifier")
    return Output().add_as_json({"adapter": name, "known": adapters.get(name)})
'''


def test_custom_model_py_gets_the_adapter_calls(tmp_path):
    """DJL's contract: a model.py with register_adapter / unregister_adapter is called for
    adapters/<name>/ at load and for the management API, with name, src and pin."""
    d = tmp_path / "custom"
    (d / "adapters" / "one").mkdir(parents=True)
    (d / "model.py").write_text(CUSTOM_MODEL)
    with LmcServer(["--model-dir", str(d)], env={"LMC_ALLOWED_URLS": str(tmp_path)}) as srv:
        r = srv.post("/invocations", b"x", headers={"X-Amzn-SageMaker-Adapter-Identifier": "one"})
        assert r.json() == {"adapter": "one",
                            "known": [str(d / "adapters" / "one"), "false", None]}
        (tmp_path / "two").mkdir()
        # Other arguments are model-specific options, passed on (DJL).
        assert srv.post(f"/models/custom/adapters?name=two&src={tmp_path / 'two'}"
                        f"&pin=true&echooption=hello").status == 200
        r = srv.post("/invocations", b"x", headers={"X-Amzn-SageMaker-Adapter-Identifier": "two"})
        assert r.json()["known"] == [str(tmp_path / "two"), "true", "hello"]
        assert srv.request("DELETE", "/models/custom/adapters/two").status == 200
        r = srv.post("/invocations", b"x", headers={"X-Amzn-SageMaker-Adapter-Identifier": "two"})
        assert r.json()["known"] is None
        # update_adapter is not defined: the management call says so.
        u = srv.post("/models/custom/adapters/one/update?pin=true")
        assert u.status == 400 and "update_adapter" in u.json()["message"]


def test_engines_without_lora_options_never_serve_adapters():
    """DeepSpeed has no LoRA options: the registry says LoRA is off (the OpenAI and TGI routes
    ask it on every request) instead of failing on the missing attribute."""
    import types

    from container.adapters import AdapterRegistry
    from engines.options import DeepSpeedOptions

    engine = types.SimpleNamespace(options=DeepSpeedOptions(tensor_parallel_degree=1),
                                   name="deepspeed")
    model = types.SimpleNamespace(config=types.SimpleNamespace(llm=types.SimpleNamespace(
        engine=engine)), name="m")
    registry = AdapterRegistry(model, cache_dir=None, allowed_roots=[])
    assert registry.lora_enabled is False
    with pytest.raises(Exception, match="option.enable_lora=true"):
        registry.check_enabled()
