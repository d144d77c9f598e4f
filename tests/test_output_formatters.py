"""Custom output formatters under LMI's RequestOutput contract (first parameter annotated
TextGenerationOutput: called once per generated token, the answer is the concatenation of what
it returned, a stream sends each piece), and adapter-level model.py formatters (an adapter
directory's own @input_formatter / @output_formatter, loaded by register_adapter, dropped by
unregister_adapter). One default LLM handler (native engine, LoRA on) over a tiny random-weight
Llama for the module; references come from the same handler without a formatter, or from its
engine directly."""

import json
import shutil
import sys
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from tiny_models import make_tiny_llama, make_tiny_lora

from djl_python.output_formatter import RequestOutput, TextGenerationOutput
from engines.contracts.errors import AdapterNotFound, ModelFailure
from engines.types import SamplingParams
from handlers import Input
from handlers.llm import LLMHandler
from handlers.llm_formats import takes_request_output
from handlers.pair_list import PairList

PROMPT = "The capital of France is"
N = 8  # every request here generates exactly N tokens (min_new_tokens = max_new_tokens)
PARAMS = {"max_new_tokens": N, "min_new_tokens": N}

# An adapter's model.py: its input formatter takes {"question"} bodies (and rebuilds the body
# without "adapters", which the handler keeps in force); its output formatter wraps the text in
# tags naming the adapter.
INPUT_ONLY_MODEL_PY = '''
from djl_python.input_parser import input_formatter


@input_formatter
def question_to_inputs(payload, **kwargs):
    body = {k: v for k, v in payload.items() if k not in ("question", "adapters")}
    body["inputs"] = payload["question"] if "question" in payload else payload["inputs"]
    return body
'''

ADAPTER_MODEL_PY = INPUT_ONLY_MODEL_PY + '''
from djl_python.output_formatter import output_formatter
from djl_python.request_io import TextGenerationOutput


@output_formatter
def tagged(out: TextGenerationOutput) -> str:
    seq = out.sequences[out.best_sequence_index]
    token, _, first, last = seq.get_next_token()
    name = out.input.adapters
    return ("<" + name + ">" if first else "") + token.text + ("</" + name + ">" if last else "")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("output-formatters")
    base = make_tiny_llama(root / "base")
    fmt = make_tiny_lora(base, root / "fmt", r=8, seed=1)
    (fmt / "model.py").write_text(ADAPTER_MODEL_PY)
    plain = make_tiny_lora(base, root / "plain", r=8, seed=2)  # no model.py
    input_only = shutil.copytree(plain, root / "input_only")
    (input_only / "model.py").write_text(INPUT_ONLY_MODEL_PY)
    handler = LLMHandler()
    props = {"model_dir": str(base), "dtype": "fp32", "cpu_kv_cache_gb": "0.02",
             "enable_lora": "true", "max_loras": "4"}
    assert handler.handle(Input(props)) is None
    for name, src in (("fmt", fmt), ("plain", plain), ("input_only", input_only)):
        handler.register_adapter(Input({"name": name, "src": str(src)}))
    return SimpleNamespace(handler=handler, root=root, fmt=fmt, plain=plain)


@pytest.fixture
def handler(setup):
    """The module's handler; each test sets the base formatters it needs, reset afterwards."""
    yield setup.handler
    setup.handler.output_formatter = None
    setup.handler.input_formatter = None


def request(body, headers=None) -> Input:
    return Input({"Content-Type": "application/json", **(headers or {})},
                 PairList([("data", json.dumps(body).encode())]))


def body_bytes(output) -> bytes:
    assert output.code == 200, output.get_content().value_at(0)
    content = output.get_content()
    assert len(content) == 1
    return content.value_at(0)


def chunks(output) -> list[bytes]:
    assert output.code == 200
    return list(output.iter_stream())


def content_type(output) -> str:
    return output.get_properties()["content-type"]


def engine_texts(handler, adapter=None) -> list[str]:
    """What each of PROMPT's N greedy steps adds to the text, straight from the engine (no
    handler, no formatter)."""
    ids = handler.engine.encode(PROMPT)
    params = SamplingParams(max_new_tokens=N, min_new_tokens=N)
    return [e.text for step in handler.engine.generate_stream([ids], [params], [adapter])
            for e in step]


def engine_text(handler, adapter=None) -> str:
    return "".join(engine_texts(handler, adapter))


# ---- a formatter that writes JSON a token at a time ------------------------------------------


@dataclass
class Call:
    """What the formatter saw on one call."""

    n_tokens: int
    index: int
    first: bool
    last: bool
    finished: bool
    finish_reason: str | None
    token_id: int
    log_prob: float
    error_msg: str | None
    piece: str


def json_tokens():
    """A RequestOutput formatter building {"tokens": [...], "finish_reason", "generated_text"}
    incrementally (one token per call, the closing fields on the last), and its call log."""
    calls: list[Call] = []

    def formatter(out: TextGenerationOutput) -> str:
        seq = out.sequences[out.best_sequence_index]
        token, index, first, last = seq.get_next_token()
        piece = ('{"tokens": [' if first else ", ") + json.dumps(
            {"id": token.id, "text": token.text, "log_prob": token.log_prob})
        if last:
            text = "".join(t.text for t in seq.tokens)
            piece += (f'], "finish_reason": {json.dumps(seq.finish_reason)}, '
                      f'"generated_text": {json.dumps(text)}}}')
        calls.append(Call(len(seq.tokens), index, first, last, out.finished, seq.finish_reason,
                          token.id, token.log_prob, token.error_msg, piece))
        return piece

    return formatter, calls


@pytest.fixture
def reference(handler):
    """PROMPT's N greedy tokens without any formatter: ids and log probs from the details of a
    non-streamed answer, each step's text from a jsonlines stream, the generated text."""
    assert handler.output_formatter is None
    body = json.loads(body_bytes(handler.handle(
        request({"inputs": PROMPT, "parameters": {**PARAMS, "details": True}}))))
    lines = [json.loads(c) for c in chunks(handler.handle(
        request({"inputs": PROMPT, "stream": True, "parameters": PARAMS})))]
    tokens = body["details"]["tokens"]
    assert [t["id"] for t in tokens] == [line["token"]["id"] for line in lines]
    texts = [line["token"]["text"] for line in lines]
    assert "".join(texts) == body["generated_text"]
    return SimpleNamespace(
        ids=[t["id"] for t in tokens], log_probs=[t["log_prob"] for t in tokens], texts=texts,
        text=body["generated_text"], finish_reason=body["details"]["finish_reason"])


def expected_json(ref) -> str:
    return json.dumps({
        "tokens": [{"id": i, "text": t, "log_prob": lp}
                   for i, t, lp in zip(ref.ids, ref.texts, ref.log_probs)],
        "finish_reason": ref.finish_reason, "generated_text": ref.text})


# ---- the annotation decides the contract ------------------------------------------------------


def test_the_first_parameters_annotation_decides_the_contract():
    def request_output(out: RequestOutput) -> str: ...
    def text_generation_output(out: TextGenerationOutput) -> str: ...
    def as_string(out: "TextGenerationOutput") -> str: ...  # from __future__ import annotations
    def dotted(out) -> str: ...

    dotted.__annotations__["out"] = "djl_python.request_io.RequestOutput"  # does not resolve
    def as_dict(response: dict) -> dict: ...
    def bare(response): ...
    def other(response: str): ...

    class Sub(TextGenerationOutput):
        pass

    def subclass(out: Sub) -> str: ...

    assert all(map(takes_request_output, [request_output, text_generation_output, as_string,
                                          dotted, subclass]))
    assert not any(map(takes_request_output, [as_dict, bare, other, None, len]))


# ---- RequestOutput formatter: per token, concatenated, streamed ------------------------------


def test_called_once_per_token_and_the_body_is_the_concatenation(handler, reference):
    formatter, calls = json_tokens()
    handler.output_formatter = formatter
    out = handler.handle(request({"inputs": PROMPT, "parameters": PARAMS}))
    body = body_bytes(out).decode()
    assert content_type(out) == "text/plain"
    assert len(calls) == N == len(reference.ids)
    assert body == "".join(c.piece for c in calls)
    assert body == expected_json(reference)  # exactly what the greedy tokens give
    assert json.loads(body)["generated_text"] == reference.text == engine_text(handler)
    # One new token per call, in order; only the last call is finished, with its reason.
    assert [c.n_tokens for c in calls] == [c.index + 1 for c in calls] == list(range(1, N + 1))
    assert [c.first for c in calls] == [True] + [False] * (N - 1)
    assert [c.last for c in calls] == [c.finished for c in calls] == [False] * (N - 1) + [True]
    assert [c.finish_reason for c in calls] == [None] * (N - 1) + ["length"]
    assert [c.token_id for c in calls] == reference.ids
    assert [c.log_prob for c in calls] == reference.log_probs


def test_a_stream_sends_the_same_pieces_one_chunk_each(handler, reference):
    formatter, calls = json_tokens()
    handler.output_formatter = formatter
    out = handler.handle(request({"inputs": PROMPT, "stream": True, "parameters": PARAMS}))
    assert content_type(out) == "text/plain"
    got = chunks(out)
    assert got == [c.piece.encode() for c in calls] and len(got) == N
    assert b"".join(got).decode() == expected_json(reference)
    assert calls[-1].finished and calls[-1].finish_reason == "length"
    assert calls[-1].log_prob == reference.log_probs[-1]


def test_empty_pieces_send_nothing_and_content_type_can_be_declared(handler, reference):
    calls = []

    def at_the_end(out: TextGenerationOutput) -> str:
        calls.append(out.finished)
        if not out.finished:
            return ""
        seq = out.sequences[out.best_sequence_index]
        return json.dumps({"text": "".join(t.text for t in seq.tokens),
                           "ids": [t.id for t in seq.tokens]})

    at_the_end.content_type = "application/json"
    handler.output_formatter = at_the_end
    want = json.dumps({"text": reference.text, "ids": reference.ids})
    out = handler.handle(request({"inputs": PROMPT, "parameters": PARAMS}))
    assert body_bytes(out).decode() == want and content_type(out) == "application/json"
    out = handler.handle(request({"inputs": PROMPT, "stream": True, "parameters": PARAMS}))
    assert chunks(out) == [want.encode()]  # N calls, one non-empty piece: one chunk
    assert content_type(out) == "application/json"
    assert calls == ([False] * (N - 1) + [True]) * 2


def test_the_output_carries_the_input_prompt_tokens_and_top_tokens(handler):
    params = {**PARAMS, "decoder_input_details": True, "top_n_tokens": 2}
    ref = json.loads(body_bytes(handler.handle(
        request({"inputs": PROMPT, "parameters": {**params, "details": True}}))))["details"]
    seen = []

    def keep(out: TextGenerationOutput) -> str:
        seen.append(out)
        return ""

    handler.output_formatter = keep
    body = {"inputs": PROMPT, "parameters": params}
    out = handler.handle(request(body, headers={"X-Request-Id": "req-7"}))
    assert body_bytes(out) == b""
    assert len(seen) == N and all(o is seen[0] for o in seen)  # one output, grown per call
    final = seen[-1]
    assert final.finished and isinstance(final.request_id, int)
    assert final.input.input_text == PROMPT and final.input.parameters == params
    assert final.input.client_request_id == "req-7" and final.input.adapters is None
    assert final.input.input_ids == handler.engine.encode(PROMPT)
    assert [t.id for t in final.prompt_tokens_details] == [t["id"] for t in ref["prefill"]]
    assert [t.id for t in final.prompt_tokens_details] == final.input.input_ids
    seq = final.sequences[final.best_sequence_index]
    assert [t.as_dict()["log_prob"] for t in seq.tokens] == [t["log_prob"] for t in ref["tokens"]]
    assert [[t.id for t in step] for step in seq.top_tokens] == \
        [[t["id"] for t in step] for step in ref["top_tokens"]]
    assert seq.cumulative_log_prob == pytest.approx(sum(t["log_prob"] for t in ref["tokens"]))
    # Not asked for: no prompt tokens.
    handler.handle(request({"inputs": PROMPT, "parameters": PARAMS}))
    assert seen[-1] is not final and seen[-1].prompt_tokens_details == []


def test_best_of_gives_every_sequence_and_the_best_index_at_the_end(handler):
    params = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": True, "seed": 3,
              "best_of": 2}
    want = json.loads(body_bytes(handler.handle(
        request({"inputs": PROMPT, "parameters": params}))))["generated_text"]
    seen = []

    def best(out: TextGenerationOutput) -> str:
        seen.append((out.finished, len(out.sequences)))
        if not out.finished:
            return ""
        scores = {k: s.cumulative_log_prob for k, s in out.sequences.items()}
        assert out.best_sequence_index == max(scores, key=scores.get)
        assert out.other_sequences_indices == []  # n = 1: no other sequence to return
        return "".join(t.text for t in out.sequences[out.best_sequence_index].tokens)

    handler.output_formatter = best
    assert body_bytes(handler.handle(request({"inputs": PROMPT, "parameters": params}))) \
        == want.encode()
    assert seen == [(False, 2)] * 7 + [(True, 2)]  # once per token of either sequence


def test_a_dict_annotated_formatter_keeps_the_dict_contract(handler, reference):
    def wrap(response: dict) -> dict:
        # Whole: the response dict; streamed: each jsonlines line's dict.
        return {"wrapped": response["token"]["text"] if "token" in response
                else response["generated_text"]}

    handler.output_formatter = wrap
    out = handler.handle(request({"inputs": PROMPT, "parameters": PARAMS}))
    assert json.loads(body_bytes(out)) == {"wrapped": reference.text}
    assert content_type(out) == "application/json"
    lines = [json.loads(c) for c in chunks(handler.handle(
        request({"inputs": PROMPT, "stream": True, "parameters": PARAMS})))]
    assert lines == [{"wrapped": t} for t in reference.texts]


def test_a_list_input_answers_one_string_per_input(handler, reference):
    handler.output_formatter = json_tokens()[0]
    out = handler.handle(request({"inputs": [PROMPT, PROMPT], "parameters": PARAMS}))
    assert content_type(out) == "application/json"
    bodies = [json.loads(b) for b in json.loads(body_bytes(out))]
    want = json.loads(expected_json(reference))
    for body in bodies:  # a batch of two computes log probs in another order: approx there
        assert [t["log_prob"] for t in body["tokens"]] == \
            pytest.approx([t["log_prob"] for t in want["tokens"]], abs=1e-4)
        assert [{**t, "log_prob": 0} for t in body["tokens"]] == \
            [{**t, "log_prob": 0} for t in want["tokens"]]
        assert {**body, "tokens": None} == {**want, "tokens": None}


def test_a_failure_mid_stream_reaches_the_formatter_as_lmi_reports_it(handler, monkeypatch):
    real = handler.engine.generate_stream

    def fails_after_three_tokens(*args, **kwargs):
        steps = real(*args, **kwargs)
        try:
            sent = 0
            for step in steps:
                for event in step:
                    if sent == 3:
                        raise RuntimeError("device lost")
                    sent += 1
                    yield [event]
        finally:
            steps.close()

    monkeypatch.setattr(handler.engine, "generate_stream", fails_after_three_tokens)
    formatter, calls = json_tokens()
    handler.output_formatter = formatter
    got = chunks(handler.handle(request({"inputs": PROMPT, "stream": True,
                                         "parameters": PARAMS})))
    assert len(calls) == 3 + 1 and got == [c.piece.encode() for c in calls]
    last = json.loads(b"".join(got))
    assert last["finish_reason"] == "error" and calls[-1].finished
    assert last["tokens"][-1] == {"id": -1, "text": "", "log_prob": -1.0}
    assert calls[-1].error_msg == "RuntimeError: device lost"
    assert [c.error_msg for c in calls[:-1]] == [None] * 3


def test_a_formatter_returning_no_string_is_an_error(handler):
    def wrong(out: TextGenerationOutput) -> str:
        return {"not": "a string"}

    handler.output_formatter = wrong
    with pytest.raises(TypeError, match="must return a str"):
        handler.handle(request({"inputs": PROMPT, "parameters": PARAMS}))


# ---- adapter-level model.py formatters ---------------------------------------------------------


def base_dict(response):
    """The base model's formatter in these tests: the dict contract."""
    return {"base": response["generated_text"]}


def tagged(handler, name: str, adapter_weights: str) -> str:
    return f"<{name}>{engine_text(handler, adapter_weights)}</{name}>"


def test_an_adapters_formatters_apply_only_to_requests_on_it(handler):
    handler.output_formatter = base_dict
    on_fmt = tagged(handler, "fmt", "fmt")
    # Its input formatter reads "question"; the body's "adapters" survive its rebuilt body.
    for out in (handler.handle(request({"question": PROMPT, "adapters": "fmt",
                                        "parameters": PARAMS})),
                handler.handle(request({"question": PROMPT, "parameters": PARAMS},
                                       headers={"X-Amzn-SageMaker-Adapter-Identifier": "fmt"}))):
        assert body_bytes(out).decode() == on_fmt and content_type(out) == "text/plain"
    stream = chunks(handler.handle(request({"question": PROMPT, "adapters": "fmt",
                                            "stream": True, "parameters": PARAMS})))
    texts = engine_texts(handler, "fmt")
    pieces = ["<fmt>" + texts[0], *texts[1:-1], texts[-1] + "</fmt>"]
    assert stream == [p.encode() for p in pieces if p]  # an empty piece is no chunk
    # No model.py: the base model's formatters (no input formatter, so "question" is a 400).
    out = handler.handle(request({"inputs": PROMPT, "adapters": "plain", "parameters": PARAMS}))
    assert json.loads(body_bytes(out)) == {"base": engine_text(handler, "plain")}
    assert handler.handle(request({"question": PROMPT, "adapters": "plain"})).code == 400
    # A model.py with an input formatter only: the base model's output formatter.
    out = handler.handle(request({"question": PROMPT, "adapters": "input_only",
                                  "parameters": PARAMS}))
    assert json.loads(body_bytes(out)) == {"base": engine_text(handler, "input_only")}
    # The base model, and a list input over an adapter and the base model: each its own.
    out = handler.handle(request({"inputs": PROMPT, "parameters": PARAMS}))
    assert json.loads(body_bytes(out)) == {"base": engine_text(handler)}
    out = handler.handle(request({"inputs": [PROMPT, PROMPT], "adapters": ["fmt", ""],
                                  "parameters": PARAMS}))
    assert json.loads(body_bytes(out)) == [on_fmt, {"base": engine_text(handler)}]


def test_update_replaces_and_unregister_drops_an_adapters_formatters(setup, handler):
    handler.output_formatter = base_dict
    body = {"inputs": PROMPT, "adapters": "swap", "parameters": PARAMS}
    handler.register_adapter(Input({"name": "swap", "src": str(setup.plain)}))
    assert json.loads(body_bytes(handler.handle(request(body)))) == \
        {"base": engine_text(handler, "plain")}
    handler.update_adapter(Input({"name": "swap", "src": str(setup.fmt)}))
    assert body_bytes(handler.handle(request(body))).decode() == tagged(handler, "swap", "fmt")
    module = handler.adapter_formatters["swap"].module
    assert module in sys.modules

    handler.unregister_adapter(Input({"name": "swap"}))
    assert "swap" not in handler.adapter_formatters and module not in sys.modules
    assert handler.handle(request(body)).code == 404
    # The same name again, from a directory without model.py: nothing of the old code is left.
    handler.register_adapter(Input({"name": "swap", "src": str(setup.plain)}))
    try:
        assert json.loads(body_bytes(handler.handle(request(body)))) == \
            {"base": engine_text(handler, "plain")}
    finally:
        handler.unregister_adapter(Input({"name": "swap"}))


def test_an_adapter_whose_model_py_fails_is_not_registered(setup, handler):
    bad = shutil.copytree(setup.plain, setup.root / "bad")
    (bad / "model.py").write_text(textwrap.dedent("""
        raise RuntimeError("this adapter's code is broken")
    """))
    with pytest.raises(ModelFailure, match="broken") as info:
        handler.register_adapter(Input({"name": "bad", "src": str(bad)}))
    assert info.value.status == 424
    assert "bad" not in handler.adapter_formatters
    with pytest.raises(AdapterNotFound):
        handler.engine.check_adapter("bad")  # the weights were not loaded either


# ---- through a real server: adapters/<name>/model.py at startup, the adapter API ---------------


def test_adapter_model_py_through_the_server(setup, tmp_path):
    from server_utils import LmcServer

    base = shutil.copytree(setup.root / "base", tmp_path / "tiny-base")
    shutil.copytree(setup.fmt, base / "adapters" / "fmt")  # registered when the model loads
    (base / "serving.properties").write_text("option.enable_lora=true\noption.max_loras=2\n")
    fmt2 = shutil.copytree(setup.fmt, tmp_path / "fmt2")
    bad = shutil.copytree(setup.plain, tmp_path / "bad")
    (bad / "model.py").write_text("raise RuntimeError('this adapter code is broken')\n")
    params = PARAMS
    with LmcServer(["--model-dir", str(base)], env={"LMC_ALLOWED_URLS": str(tmp_path)},
                   timeout_s=120) as srv:
        def raw_text(model):  # the OpenAI route: no custom formatter applies there
            r = srv.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": N,
                                             "min_tokens": N, "temperature": 0})
            assert r.status == 200, r.body
            return r.json()["choices"][0]["text"]

        r = srv.post("/invocations", {"question": PROMPT, "adapters": "fmt", "parameters": params})
        assert r.status == 200, r.body
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.body.decode() == f"<fmt>{raw_text('fmt')}</fmt>"
        r = srv.post("/invocations", {"inputs": PROMPT, "parameters": params})
        assert r.json() == {"generated_text": raw_text("tiny-base")}  # the base: no formatter

        assert srv.post(f"/models/tiny-base/adapters?name=fmt2&src={fmt2}").status == 200
        r = srv.post("/invocations", {"question": PROMPT, "adapters": "fmt2", "parameters": params})
        assert r.body.decode() == f"<fmt2>{raw_text('fmt2')}</fmt2>"
        assert srv.request("DELETE", "/models/tiny-base/adapters/fmt2").status == 200
        gone = srv.post("/invocations", {"inputs": PROMPT, "adapters": "fmt2"})
        assert gone.status == 404 and "fmt2" in gone.json()["message"]

        r = srv.post(f"/models/tiny-base/adapters?name=bad&src={bad}")
        assert r.status == 424 and "broken" in r.json()["message"], r.body
        names = [a["name"] for a in srv.request("GET", "/models/tiny-base/adapters")
                 .json()["adapters"]]
        assert names == ["fmt"]
