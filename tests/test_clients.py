"""Real, unmodified clients (boto3's sagemaker-runtime, openai, huggingface_hub) against a real
server running the default LLM handler over a tiny random Llama."""

from __future__ import annotations

import json
import time

import pytest

from test_runtime_api import LineIterator, runtime_client

NAME = "tiny-llama"


@pytest.fixture(scope="module")
def llm(tiny_llm_server):
    return tiny_llm_server


# -- boto3 ----------------------------------------------------------------------------------------


def test_boto3_invoke_endpoint(llm):
    r = runtime_client(llm.url).invoke_endpoint(
        EndpointName=NAME, ContentType="application/json",
        Body=json.dumps({"inputs": "Hello world", "parameters": {"max_new_tokens": 8,
                                                                 "details": True}}))
    assert r["ContentType"].startswith("application/json")
    out = json.loads(r["Body"].read())
    assert isinstance(out["generated_text"], str)
    assert 1 <= out["details"]["generated_tokens"] <= 8
    assert out["details"]["finish_reason"] in ("length", "eos_token")


def test_boto3_response_stream(llm):
    t0 = time.monotonic()
    r = runtime_client(llm.url).invoke_endpoint_with_response_stream(
        EndpointName=NAME, ContentType="application/json",
        Body=json.dumps({"inputs": "Once upon a time", "stream": True,
                         "parameters": {"max_new_tokens": 120, "ignore_eos_token": True}}))
    arrivals = [(time.monotonic() - t0, json.loads(line)) for line in LineIterator(r["Body"])]
    lines = [x for _, x in arrivals]
    assert 1 <= len(lines) <= 120
    assert all("token" in x for x in lines)
    last = lines[-1]
    text = "".join(x["token"]["text"] for x in lines if not x["token"].get("special_token"))
    assert text == last["generated_text"]
    assert last["details"]["generated_tokens"] == len(lines)
    # Tokens were sent as generated: the first arrived well before the last was produced.
    assert arrivals[0][0] < 0.5 * arrivals[-1][0], (arrivals[0][0], arrivals[-1][0])


def test_boto3_bad_parameter_is_model_error_400(llm):
    c = runtime_client(llm.url)
    with pytest.raises(c.exceptions.ModelError) as ei:
        c.invoke_endpoint(EndpointName=NAME, ContentType="application/json",
                          Body=json.dumps({"inputs": "x", "parameters": {"max_new_tokenz": 3}}))
    assert ei.value.response["OriginalStatusCode"] == 400
    assert "max_new_tokenz" in ei.value.response["OriginalMessage"]


# -- openai ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oai(llm):
    import openai

    return openai.OpenAI(base_url=llm.url + "/v1", api_key="x", max_retries=0)


def test_openai_models(oai):
    assert [m.id for m in oai.models.list()] == [NAME]


def test_openai_completion(oai):
    r = oai.completions.create(model=NAME, prompt="The capital of France is", max_tokens=6,
                               n=2, seed=7, temperature=1.0, logprobs=2)
    assert r.object == "text_completion" and len(r.choices) == 2
    for c in r.choices:
        assert isinstance(c.text, str) and c.finish_reason in ("length", "stop")
        assert 1 <= len(c.logprobs.tokens) <= 6
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.tokens)
        assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    assert r.usage.prompt_tokens > 0 and 2 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = oai.completions.create(model=NAME, prompt="The capital of France is",
                                   max_tokens=6, n=2, seed=7, temperature=1.0, logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded


def test_openai_completion_stream(oai):
    # temperature=0: greedy, so streamed and plain must agree (OpenAI's default samples).
    plain = oai.completions.create(model=NAME, prompt="Hello", max_tokens=10, temperature=0)
    chunks = list(oai.completions.create(model=NAME, prompt="Hello", max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_openai_chat(oai):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = oai.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=8, n=2,
                                    seed=3, temperature=0.8, logprobs=True, top_logprobs=2,
                                    stop=["."])
    assert r.object == "chat.completion" and len(r.choices) == 2
    for c in r.choices:
        assert c.message.role == "assistant" and "." not in c.message.content
        assert c.finish_reason in ("length", "stop")
        assert all(len(t.top_logprobs) <= 2 for t in c.logprobs.content)
    assert 2 <= r.usage.completion_tokens <= 16


def test_openai_chat_stream(oai):
    messages = [{"role": "user", "content": "Say hello"}]
    plain = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=12, seed=5)
    chunks = list(oai.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                              seed=5, stream=True))  # seeded: same samples
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_openai_bad_parameter(oai):
    import openai

    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                    max_tokens=-1)


# -- huggingface_hub ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(llm):
    from huggingface_hub import InferenceClient

    return InferenceClient(model=llm.url)


def test_hf_text_generation(hf):
    text = hf.text_generation("Hello world", max_new_tokens=8)
    out = hf.text_generation("Hello world", max_new_tokens=8, details=True)
    assert out.generated_text == text
    assert 1 <= out.details.generated_tokens <= 8
    assert len(out.details.tokens) == out.details.generated_tokens


def test_hf_text_generation_stream(hf):
    text = hf.text_generation("Hello world", max_new_tokens=10)
    assert "".join(hf.text_generation("Hello world", max_new_tokens=10, stream=True)) == text
    events = list(hf.text_generation("Hello world", max_new_tokens=10, stream=True,
                                     details=True))
    assert events[-1].generated_text == text
    assert events[-1].details.generated_tokens == len(events)
    assert all(e.token.text is not None for e in events)


# -- the same mistake, the same error on every route -----------------------------------------------


@pytest.mark.parametrize("path", ["/invocations", "/v1/completions", "/v1/chat/completions",
                                  "/generate", "/endpoints/tiny-llama/invocations"])
def test_invalid_json_is_the_same_validation_error_on_every_route(llm, path):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(llm.url + path, data=b'{"inputs": "x",', method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    body = json.loads(ei.value.read())
    if path.startswith("/endpoints/"):  # SageMaker's runtime API wraps the container's answer
        assert ei.value.code == 424 and body["OriginalStatusCode"] == 400
        body = json.loads(body["OriginalMessage"])
    elif path == "/generate":  # TGI's shape and status, for TGI's and LoRAX's clients
        assert ei.value.code == 422 and body["error_type"] == "validation"
        body = {"code": 400, **body, "message": body["error"]}
    else:
        assert ei.value.code == 400
    assert (body["code"], body["type"], body["field"]) == (400, "ValidationError", "body")
    assert body["message"].startswith("the body is not valid JSON")


def _post_json(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_null_means_unset_over_http(llm):
    """What TGI's and LoRAX's clients do (every unset field as null), on the other routes too."""
    plain = _post_json(llm.url + "/invocations", {"inputs": "Hello", "parameters":
                                                  {"max_new_tokens": 6}})
    nulls = _post_json(llm.url + "/invocations", {"inputs": "Hello", "stream": None, "parameters":
                                                  {"max_new_tokens": 6, "temperature": None,
                                                   "top_p": None, "seed": None, "details": None,
                                                   "stop_sequences": None, "truncate": None}})
    assert nulls == plain  # greedy: the same text
    chat = _post_json(llm.url + "/v1/chat/completions", {
        "model": None, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
        "temperature": 0, "top_p": None, "n": None, "stop": None, "logprobs": None,
        "stream": None, "seed": None, "tools": None, "response_format": None})
    assert chat["object"] == "chat.completion" and len(chat["choices"]) == 1
    assert chat["usage"]["completion_tokens"] <= 6
