"""The OpenAPI document (GET /openapi.json, container/openapi.py) against the real routes, and
schemathesis fuzzing every operation of a live server with it.

One real server (a tiny random-weight Llama with LoRA on and one adapter from its adapters/
folder) on a free loopback port. Schemathesis loads the schema from the server's own
/openapi.json and sends FUZZ_EXAMPLES cases per operation in each of three modes: valid cases,
invalid ones, and valid ones whose model and adapter parameters name the served ones (so they
reach the handler rather than a 404). Generation is deterministic (derandomized, no example
database) and every request is bounded by REQUEST_TIMEOUT_S: a hang fails its case. Every
answer is checked: no 5xx, a status code and a content type the document declares, a body that
matches its schema (JSON bodies, the JSON data of each SSE event, each JSON line), the declared
headers. Afterwards the server must still be healthy and give the same greedy text as before.

Nothing reaches the network: the server is bound to 127.0.0.1, HF_HUB_OFFLINE=1 keeps hub ids
(adapter sources, LoRAX's adapter_id) to the local cache, and S3 points at a closed loopback
port, so a fuzzed s3:// source fails at once.
"""

from __future__ import annotations

import functools
import json
import os
import resource

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from server_utils import LmcServer, free_port
from tiny_models import make_tiny_llama, make_tiny_lora

from container.openapi import JSONLINES, document

NAME = "tiny-fuzz-base"
ADAPTER = "fuzz-qv8"
PROMPT = "The capital of France is"
# Cases per operation and mode (3 modes, 32 operations); LMC_FUZZ_EXAMPLES=100 digs deeper.
FUZZ_EXAMPLES = int(os.environ.get("LMC_FUZZ_EXAMPLES", "10"))
REQUEST_TIMEOUT_S = 20.0
MEMORY_LIMIT = 10 << 30  # bytes of address space for the server's process tree


# ---- the document against the code (no server) ----------------------------------------------


def test_document_is_valid_openapi_31():
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    doc = document()
    OPENAPI_31_VALIDATOR.validate(doc)
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)  # each a valid JSON Schema 2020-12
    json.dumps(doc)  # plain JSON data


def test_every_route_has_an_operation_and_every_operation_a_route():
    """The aiohttp router as container/server.py builds it, against the document's paths.
    aiohttp adds a HEAD to every GET route by itself; those are GET's."""
    from container.server import build_app
    from engines.options import ServerOptions

    app = build_app(ServerOptions())
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(method.upper(), path) for path, item in document()["paths"].items()
                  for method in item}
    assert routes - documented == set(), "routes without an operation in container/openapi.py"
    assert documented - routes == set(), "operations in container/openapi.py without a route"


def test_request_fields_match_the_parsers():
    """The request schemas list exactly the fields handlers/llm_schema.py accepts."""
    from handlers import llm_schema as S

    schemas = document()["components"]["schemas"]
    lmi = schemas["LmiRequest"]["properties"]
    assert set(lmi) == set(S.LMI_REQUEST_KEYS)
    assert set(lmi["parameters"]["properties"]) == S.LMI_PARAMETERS
    tgi_params = schemas["TgiRequest"]["properties"]["parameters"]["properties"]
    tgi_only = {"stop", "return_k_alternatives", "adapter_id", "adapter_source",
                "merged_adapters", *S._TGI_OFF_VALUES}
    assert set(tgi_params) == S.LMI_PARAMETERS | tgi_only
    harmless = set(S._OPENAI_HARMLESS)
    assert set(schemas["CompletionRequest"]["properties"]) == S.OPENAI_COMPLETION_FIELDS | harmless
    assert set(schemas["ChatCompletionRequest"]["properties"]) == S.OPENAI_CHAT_FIELDS | harmless


# ---- the live server ---------------------------------------------------------------------------


def _generate(srv) -> str:
    r = srv.post("/invocations", {"inputs": PROMPT,
                                  "parameters": {"max_new_tokens": 8, "do_sample": False}})
    assert r.status == 200, r.body
    return r.json()["generated_text"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = make_tiny_llama(root / NAME, max_position_embeddings=128)
    make_tiny_lora(base, base / "adapters" / ADAPTER, r=8, targets=("q_proj", "v_proj"), seed=1)
    (base / "serving.properties").write_text(
        "option.enable_lora=true\noption.max_loras=2\noption.max_rolling_batch_size=8\n")
    # POST /models registers only directories under LMC_ALLOWED_URLS (and adapters come from
    # there or the model's own directory): an empty directory, so whatever url the fuzzer
    # sends, no model is registered and no model.py runs.
    allowed = root / "allowed"
    allowed.mkdir()
    env = {"LMC_ALLOWED_URLS": str(allowed), "LMC_CACHE": str(root / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "AWS_ENDPOINT_URL": (s3 := f"http://127.0.0.1:{free_port()}"),
           "AWS_ENDPOINT_URL_S3": s3, "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1", "OMP_NUM_THREADS": "1"}
    # A safety net for the next allocation that runs away: the server and its worker get at
    # most MEMORY_LIMIT of address space (a MemoryError in the worker is a 507), the machine's
    # other processes the rest. (The worker of this tiny model maps about 3.5 GiB.)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:  # the limit is inherited when the server process starts; this process keeps its own
        srv = LmcServer(["--model-dir", str(base)], env=env, wait_status=None).__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    try:
        srv.wait_for_ping(200, timeout_s=180)
        srv.reference = _generate(srv)
        yield srv
    finally:
        srv.__exit__(None, None, None)


@pytest.fixture(scope="module")
def api_schema(server):
    """The document as the server serves it, loaded by schemathesis."""
    config = schemathesis.Config.from_dict({"request-timeout": REQUEST_TIMEOUT_S})
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=config)


CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance,
          st_checks.content_type_conformance, st_checks.response_schema_conformance,
          st_checks.response_headers_conformance]


@functools.cache
def _line_validator(method: str, path: str, status: str) -> Draft202012Validator | None:
    """The validator of one line of a jsonlines answer: the document's x-line-schema."""
    doc = document()
    response = doc["paths"][path][method.lower()]["responses"].get(status, {})
    schema = response.get("content", {}).get(JSONLINES, {}).get("schema", {})
    line = schema.get("x-line-schema")
    if line is None:
        return None
    registry = Registry().with_resource("urn:lmc", Resource.from_contents(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", **doc}))
    return Draft202012Validator({"$ref": "urn:lmc" + line["$ref"]}, registry=registry)


def jsonlines_conformance(ctx, response, case):
    """Each line of an application/jsonlines answer matches the line schema the document
    declares for it (schemathesis has no jsonlines reader)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith(JSONLINES):
        return None
    validator = _line_validator(case.operation.method.upper(), case.operation.path,
                                str(response.status_code))
    assert validator is not None, f"{case.operation.label}: no line schema for {content_type}"
    for i, line in enumerate(response.content.splitlines()):
        if line.strip():
            errors = sorted(validator.iter_errors(json.loads(line)), key=str)
            assert not errors, f"{case.operation.label} line {i}: {errors[0].message}"
    return None


def _call(case):
    return case.call_and_validate(checks=CHECKS, additional_checks=[jsonlines_conformance],
                                  timeout=REQUEST_TIMEOUT_S)


# Every operation of the document, known without a server (it is static data).
OPERATIONS = [(method.upper(), path) for path, item in document()["paths"].items()
              for method in item]


def _parameters(method: str, path: str) -> list[dict]:
    return document()["paths"][path][method.lower()].get("parameters", [])


def _has_inputs(method: str, path: str) -> bool:
    """Whether the document forbids anything here: a body or a query or header parameter (any
    string is a valid path segment)."""
    op = document()["paths"][path][method.lower()]
    return bool(op.get("requestBody")) or any(p["in"] != "path" for p in _parameters(method, path))


# "served": valid cases whose parameters that name a model or an adapter name the served
# ones, so they reach the handler instead of stopping at a 404 for a random name. (Not the
# {adapter} path parameter: DELETE would unregister the adapter the other cases use.)
_SERVED = {("path", "model"): NAME, ("path", "name"): NAME,
           ("query", "model_name"): NAME, ("query", "adapter"): ADAPTER,
           ("header", "X-Amzn-SageMaker-Target-Model"): NAME, ("header", "X-Model-Name"): NAME,
           ("header", "X-Amzn-SageMaker-Adapter-Identifier"): ADAPTER,
           ("header", "X-Amzn-SageMaker-Inference-Component"): ADAPTER}
# The fuzzer must not take the model under test away or rescale its workers: these two calls
# only ever name other models (a 404); see also the guard in test_fuzz.
_NOT_SERVED = {("DELETE", "/models/{model}"), ("PUT", "/models/{model}")}


def _served(method: str, path: str) -> dict[str, dict[str, str]]:
    fixed: dict[str, dict[str, str]] = {"path": {}, "query": {}, "header": {}}
    for p in _parameters(method, path):
        value = _SERVED.get((p["in"], p["name"]))
        if value is not None:
            fixed[p["in"]][p["name"]] = value
    return fixed


# n and best_of are capped at engines.types.MAX_SAMPLES (128; fuzzing found best_of=112818449
# growing the worker to 18 GB before the cap). Up to 128 samples of a tiny model still take
# seconds, so the fuzzer's larger values are lowered to keep each case fast; the cap itself is
# tested in tests/test_llm_schemas.py.
MAX_SAMPLES = 4


def _bounded_samples(body):
    if isinstance(body, dict):
        return {k: (MAX_SAMPLES if k in ("n", "best_of") and type(v) is int and v > MAX_SAMPLES
                    else _bounded_samples(v) if k == "parameters" else v)
                for k, v in body.items()}
    return body


@pytest.mark.parametrize("mode", ["positive", "negative", "served"])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz(api_schema, server, method, path, mode):
    """FUZZ_EXAMPLES cases of one operation, each answered within REQUEST_TIMEOUT_S and
    checked: valid ones (positive), ones the document says are invalid (negative), valid ones
    for the served model and adapter (served)."""
    kwargs: dict = {}
    if mode == "negative" and not _has_inputs(method, path):
        pytest.skip("nothing to make invalid: no parameters, no body")
    if mode == "served":
        fixed = _served(method, path)
        if not any(fixed.values()):
            pytest.skip("names no model or adapter: the positive cases cover it")
        if (method, path) in _NOT_SERVED:
            pytest.skip("would unregister or rescale the model under test")
        kwargs = {"path_parameters": fixed["path"], "query": fixed["query"],
                  "headers": fixed["header"]}
    generation = GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE
    operation = api_schema[path][method]

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=generation, **kwargs))
    def run(case):
        if (method, path) in _NOT_SERVED and case.path_parameters.get("model") == NAME:
            return
        case.body = _bounded_samples(case.body)
        _call(case)

    run()


# Answers a few random cases rarely produce in full (details, log-probs, best_of, every stream
# format), sent as is and checked the same way: the document must describe them exactly.
_DETAILED = {"max_new_tokens": 4, "details": True, "decoder_input_details": True,
             "top_n_tokens": 2}
_SAMPLED = {"do_sample": True, "seed": 7, "max_new_tokens": 3}
_CHAT = [{"role": "user", "content": "Hi"}]
DOCUMENTED_ANSWERS = [
    ("/invocations", {"inputs": PROMPT, "parameters": _DETAILED}),
    ("/invocations", {"inputs": [PROMPT, "Hi"], "adapters": [ADAPTER, ""],
                      "parameters": {**_SAMPLED, "n": 2, "best_of": 3, "details": True}}),
    ("/invocations", {"inputs": PROMPT, "stream": True, "parameters": _DETAILED}),
    ("/invocations", {"messages": _CHAT, "max_tokens": 3}),
    ("/invocations", {"messages": _CHAT, "max_tokens": 3, "stream": True, "logprobs": True,
                      "top_logprobs": 2, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": [PROMPT, "Hi"], "max_tokens": 3, "logprobs": 2,
                         "echo": True, "n": 2, "best_of": 2, "temperature": 0.7, "seed": 1}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True, "logprobs": 1,
                         "echo": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"model": ADAPTER, "messages": _CHAT, "max_tokens": 3,
                              "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": _CHAT, "max_tokens": 3, "stream": True, "n": 2,
                              "temperature": 0.5, "stream_options": {"include_usage": True}}),
    ("/generate", {"inputs": PROMPT, "parameters": {
        **_SAMPLED, "best_of": 2, "details": True, "decoder_input_details": True,
        "top_n_tokens": 2, "return_k_alternatives": 2, "adapter_id": ADAPTER}}),
    ("/generate_stream", {"inputs": PROMPT, "parameters": {**_DETAILED, "stop": ["zz"]}}),
    ("/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}}),
    ("/", {"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 3}}),
    (f"/endpoints/{NAME}/invocations", {"inputs": PROMPT, "stream": True,
                                        "parameters": _DETAILED}),
    (f"/endpoints/{NAME}/invocations-response-stream", {"inputs": PROMPT,
                                                        "parameters": _DETAILED}),
]


@pytest.mark.parametrize("path,body", DOCUMENTED_ANSWERS,
                         ids=[f"{i}-{p}" for i, (p, _) in enumerate(DOCUMENTED_ANSWERS)])
def test_documented_answers(api_schema, path, body):
    if path.startswith("/endpoints/"):
        template, params = path.replace(NAME, "{name}"), {"name": NAME}
    else:
        template, params = path, {}
    case = api_schema[template]["POST"].Case(body=body, path_parameters=params,
                                             media_type="application/json")
    r = _call(case)
    assert r.status_code == 200, r.content


def test_unusable_adapter_paths_are_a_400(server):
    """Found by fuzzing: an adapter src with a NUL byte, or a ~user that does not exist, was a
    500 (Path.resolve / expanduser raised); it is an InvalidAdapter 400 naming src."""
    for src in ("/tmp/a\x00b", "~no-such-user-lmc/adapter"):
        r = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": src})
        assert r.status == 400, r.body
        assert (r.json()["type"], r.json()["field"]) == ("InvalidAdapter", "src")
        r = server.post("/generate", {"inputs": PROMPT, "parameters": {  # LoRAX: load on use
            "adapter_id": src, "adapter_source": "local", "max_new_tokens": 1}})
        assert r.status == 422, r.body
        assert (r.json()["type"], r.json()["field"]) == ("InvalidAdapter", "src")


def test_still_healthy_after_fuzzing(server):
    r = server.request("GET", "/ping")
    assert r.status == 200, r.body
    assert r.json() == {NAME: {"status": "Healthy"}}
    assert _generate(server) == server.reference
    adapters = server.request("GET", f"/models/{NAME}/adapters").json()["adapters"]
    assert ADAPTER in [a["name"] for a in adapters]
    desc = server.request("GET", f"/models/{NAME}").json()[0]
    assert desc["queueLength"] == 0 and len(desc["workers"]) == 1, desc
    assert server.proc.poll() is None
