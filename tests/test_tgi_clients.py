"""TGI's and LoRAX's own Python clients (`text-generation`, `lorax-client`, unmodified) against
LMC's TGI routes. Both send every parameter they know on every request, unset ones as null, and
raise their own typed errors from TGI's error shape, so each of those is exercised here."""

from __future__ import annotations

import pytest
from lorax import Client as LoraxClient
from lorax import errors as lorax_errors
from text_generation import Client as TgiClient
from text_generation import errors as tgi_errors

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def clients(tiny_llm_server):
    return {"tgi": TgiClient(tiny_llm_server.url, timeout=60),
            "lorax": LoraxClient(tiny_llm_server.url, timeout=60)}


@pytest.fixture(params=["tgi", "lorax"])
def client(request, clients):
    return clients[request.param]


def streamed_text(client, **kw) -> tuple[str, list]:
    events = list(client.generate_stream(PROMPT, **kw))
    # Every event's text, the EOS one included: a random tiny model can end on half a UTF-8
    # character, which the final event flushes.
    text = "".join(e.token.text for e in events)
    return text, events


def test_generate_and_stream_agree(client):
    r = client.generate(PROMPT, max_new_tokens=8)
    assert 1 <= r.details.generated_tokens <= 8
    assert r.details.finish_reason in ("length", "eos_token")
    assert len(r.details.tokens) == r.details.generated_tokens
    assert r.details.prefill == []  # only with decoder_input_details
    text, events = streamed_text(client, max_new_tokens=8)
    assert text == r.generated_text == events[-1].generated_text
    assert events[-1].details.generated_tokens == r.details.generated_tokens


def test_decoder_input_details_and_top_n_tokens(clients):
    tgi = clients["tgi"].generate(PROMPT, max_new_tokens=4, decoder_input_details=True,
                                  top_n_tokens=2)
    prompt_len = len(tgi.details.prefill)
    assert prompt_len >= 2 and tgi.details.prefill[0].logprob is None
    assert all(t.logprob is not None for t in tgi.details.prefill[1:])
    assert [len(step) for step in tgi.details.top_tokens] == [2] * tgi.details.generated_tokens
    # The chosen (greedy) token is the most likely alternative.
    assert [s[0].id for s in tgi.details.top_tokens] == [t.id for t in tgi.details.tokens]
    # LoRAX's name for the same thing: alternative_tokens on each token.
    lx = clients["lorax"].generate(PROMPT, max_new_tokens=4, decoder_input_details=True,
                                   return_k_alternatives=2)
    assert lx.details.prompt_tokens == prompt_len
    assert [[a.id for a in t.alternative_tokens] for t in lx.details.tokens] == \
        [[a.id for a in s] for s in tgi.details.top_tokens]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.95, seed=1234)
    first = client.generate(PROMPT, **kw).generated_text
    assert client.generate(PROMPT, **kw).generated_text == first
    assert streamed_text(client, **kw)[0] == first


def test_validation_errors_are_the_clients_validation_error(clients):
    with pytest.raises(tgi_errors.ValidationError, match="max_new_tokens"):
        clients["tgi"].generate(PROMPT, max_new_tokens=100_000)
    with pytest.raises(lorax_errors.ValidationError, match="max_new_tokens"):
        clients["lorax"].generate(PROMPT, max_new_tokens=100_000)
    # What LMC cannot honour yet is refused by name, never silently ignored.
    with pytest.raises(tgi_errors.ValidationError, match="watermark"):
        clients["tgi"].generate(PROMPT, max_new_tokens=2, watermark=True)
    # This model has no LoRA: an adapter is refused naming the option, never the base model.
    with pytest.raises(lorax_errors.ValidationError, match="option.enable_lora=true"):
        clients["lorax"].generate(PROMPT, max_new_tokens=2, adapter_id="my-adapter")
    with pytest.raises(lorax_errors.ValidationError, match="response_format"):
        clients["lorax"].generate(PROMPT, max_new_tokens=2,
                                  response_format={"type": "json_object", "schema": {}})
    # Streams refuse before the first byte, in the same shape.
    with pytest.raises(tgi_errors.ValidationError, match="max_new_tokens"):
        list(clients["tgi"].generate_stream(PROMPT, max_new_tokens=100_000))


def test_a_full_queue_is_the_clients_overloaded_error(tmp_path_factory):
    """One request running, one queued (job_queue_size=1): the rest of a burst is refused with
    TGI's overloaded error (429), which each client raises as its OverloadedError."""
    from concurrent.futures import ThreadPoolExecutor

    from server_utils import LmcServer
    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    (d / "serving.properties").write_text("job_queue_size=1\noption.max_rolling_batch_size=1\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=180) as srv:
        pool = [TgiClient(srv.url, timeout=60), LoraxClient(srv.url, timeout=60)] * 6

        def call(client):
            try:
                client.generate(PROMPT, max_new_tokens=200)
                return "ok"
            except (tgi_errors.OverloadedError, lorax_errors.OverloadedError) as e:
                assert "job queue is full (job_queue_size=1)" in str(e)
                return type(e).__module__.split(".")[0]

        with ThreadPoolExecutor(len(pool)) as ex:
            outcomes = list(ex.map(call, pool))
    assert outcomes.count("ok") >= 2, outcomes  # the running one and the queued one
    assert "text_generation" in outcomes and "lorax" in outcomes, outcomes
