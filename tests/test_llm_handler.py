"""The default LLM handler driven with Input objects (and once through ModelService) on a tiny
random-weight Llama: warm-up, LMI request schema, validation errors, batches, formatter hooks."""

import json

from handlers.service import _split_output

import pytest
from tiny_models import make_tiny_llama

from engines.contracts.protocol import RequestItem
from engines.types import ACCEPTED_PARAMETERS, SamplingParams
from handlers import Input, ModelService
from handlers.inputs import input_from_items
from handlers.llm import LLMHandler
from handlers.llm_schema import HANDLER_PARAMETERS
from handlers.pair_list import PairList


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


# A tiny model needs a few MB of KV cache, not the default 2 GB: this module's engines live as
# long as the test process, each with its pool allocated and zeroed.
KV_GB = "0.02"


def warm(model_dir, **handler_kwargs) -> LLMHandler:
    handler = LLMHandler(**handler_kwargs)
    props = {"model_dir": str(model_dir), "dtype": "fp32", "cpu_kv_cache_gb": KV_GB}
    assert handler.handle(Input(props)) is None
    return handler


@pytest.fixture(scope="module", params=["native", "disable"], ids=["native", "hf"])
def handler(model_dir, request):
    """Every handler test runs on both engines: the schema must behave the same on each."""
    h = LLMHandler()
    props = {"model_dir": str(model_dir), "dtype": "fp32", "rolling_batch": request.param,
             "cpu_kv_cache_gb": KV_GB}
    assert h.handle(Input(props)) is None
    expected = "EngineLoop" if request.param == "native" else "HFEngine"
    assert type(h.engine).__name__ == expected
    return h


def request(body, content_type: str = "application/json", headers=None) -> Input:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Input({"Content-Type": content_type, **(headers or {})}, PairList([("data", data)]))


def raw_body(output, index: int | None = None) -> bytes:
    content = output.get_content()
    if index is None:
        assert len(content) == 1
        return content.value_at(0)
    return content.get(f"batch_{index:03d}_data")


def body_of(output, index: int | None = None):
    return json.loads(raw_body(output, index))


def greedy_text(handler, prompt: str, max_new_tokens: int = 30) -> str:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return handler.engine.generate([prompt], [params])[0].text


# ---- happy path ------------------------------------------------------------------------------


def test_warm_up_loads_the_engine_and_returns_none(handler):
    assert handler.engine is not None
    assert handler.engine.max_context == 256
    assert handler.handle(Input()) is None  # an empty call after loading is not an error


def test_single_request_matches_engine_greedy(handler):
    out = handler.handle(request({"inputs": "Hello world"}))
    assert out.code == 200
    assert out.get_properties()["content-type"] == "application/json"
    assert body_of(out) == {"generated_text": greedy_text(handler, "Hello world")}


def test_parameters_are_used(handler):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    expected = {"generated_text": greedy_text(handler, "Hello", 3)}
    assert body_of(handler.handle(request(body))) == expected
    sampled = {"inputs": "Hello", "parameters": {"do_sample": True, "seed": 5, "top_k": 20,
                                                 "top_p": 0.9, "temperature": 0.8}}
    first = body_of(handler.handle(request(sampled)))
    assert body_of(handler.handle(request(sampled))) == first


def test_list_input_gives_a_list(handler):
    prompts = ["Hello", "Once upon a time"]
    out = handler.handle(request({"inputs": prompts, "parameters": {"max_new_tokens": 6}}))
    assert body_of(out) == [{"generated_text": greedy_text(handler, p, 6)} for p in prompts]


def test_text_plain_body_is_the_prompt(handler):
    out = handler.handle(request(b"Hello world", content_type="text/plain"))
    assert body_of(out) == {"generated_text": greedy_text(handler, "Hello world")}


def test_model_id_local_dir_wins_over_model_dir(model_dir, tmp_path):
    handler = LLMHandler()
    handler.handle(Input({"model_dir": str(tmp_path), "model_id": str(model_dir),
                          "cpu_kv_cache_gb": KV_GB}))
    # tmp_path holds no model at all: the engine can only have come from model_id.
    assert handler.engine.tokenizer.name_or_path == str(model_dir)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model_id=org/model is not a local directory"):
        LLMHandler().handle(Input({"model_dir": str(tmp_path), "model_id": "org/model"}))


# ---- validation (the full table is in test_llm_schemas.py) ---------------------------------


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (b"{not json", "body", "not valid JSON"),
        ({"inputs": ""}, "inputs", "non-empty string"),
        ({"inputs": "hi", "parameters": {"max_tokens": 5}}, "max_tokens", "unknown parameter"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 255}}, "max_new_tokens",
         "exceeds the model's context of 256"),
        ({"inputs": "Hello " * 200}, "inputs", "context holds 256"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "top_p", "(0, 1]"),
    ],
)
def test_validation_errors_are_400_naming_the_field(handler, body, field, message):
    out = handler.handle(request(body))
    assert out.code == 400
    error = body_of(out)
    assert error["code"] == 400 and error["type"] == "ValidationError"
    assert error["field"] == field
    assert message in error["message"]


def test_unknown_parameter_message_lists_every_accepted_one(handler):
    error = body_of(handler.handle(request({"inputs": "hi", "parameters": {"foo": 1}})))
    for name in ACCEPTED_PARAMETERS | HANDLER_PARAMETERS:
        assert name in error["message"]


# ---- batches ---------------------------------------------------------------------------------


def batch(*bodies) -> Input:
    items = [
        RequestItem(i, {"Content-Type": "application/json"},
                    [("data", b if isinstance(b, bytes) else json.dumps(b).encode())])
        for i, b in enumerate(bodies)
    ]
    return input_from_items(items)


def test_batch_answers_each_item_and_isolates_bad_ones(handler):
    inputs = batch(
        {"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
        {"inputs": "hi", "parameters": {"top_p": 2}},
        {"inputs": ["Once", "upon"], "parameters": {"max_new_tokens": 5}},
    )
    assert inputs.is_batch()
    out = handler.handle(inputs)
    # A mixed batch keeps 200 overall; the bad item alone is marked 400.
    assert out.code == 200
    assert body_of(out, 0) == {"generated_text": greedy_text(handler, "Hello", 4)}
    assert body_of(out, 1)["code"] == 400 and body_of(out, 1)["field"] == "top_p"
    expected = [{"generated_text": greedy_text(handler, p, 5)} for p in ("Once", "upon")]
    assert body_of(out, 2) == expected
    # Split per request as the worker does: only item 1 is a 400.
    results = _split_output(out, 3)
    assert [r.code for r in results] == [200, 400, 200]
    assert all("code" not in r.headers for r in results)


def test_batch_of_only_bad_items_is_400(handler):
    out = handler.handle(batch(b"nope", {"inputs": ""}))
    assert out.code == 400
    assert body_of(out, 0)["field"] == "body" and body_of(out, 1)["field"] == "inputs"


def test_through_model_service(model_dir):
    """The loader path: config.json in the model dir selects this handler; results split per
    item."""
    service = ModelService.load(str(model_dir), {"model_dir": str(model_dir), "dtype": "fp32",
                                                 "cpu_kv_cache_gb": KV_GB})
    results = service.invoke([
        RequestItem(0, {"Content-Type": "application/json"},
                    [("data", b'{"inputs": "Hello", "parameters": {"max_new_tokens": 4}}')]),
        RequestItem(1, {"Content-Type": "application/json"},
                    [("data", b'{"inputs": "Hello", "parameters": {"max_new_tokens": 0}}')]),
    ])
    assert [r.code for r in results] == [200, 400]  # the bad request alone is a 400
    assert "generated_text" in json.loads(results[0].body)
    assert json.loads(results[1].body)["field"] == "max_new_tokens"
    assert results[0].headers["content-type"] == "application/json"
    (single,) = service.invoke([RequestItem(2, {}, [("data", b'{"inputs": ""}')])])
    assert single.code == 400 and json.loads(single.body)["type"] == "ValidationError"


# ---- formatter hooks -------------------------------------------------------------------------


def test_input_and_output_formatters(model_dir):
    def input_formatter(payload, tokenizer=None):
        assert tokenizer is not None
        return {"inputs": payload["question"], "parameters": {"max_new_tokens": 3}}

    def output_formatter(result):
        return result["generated_text"].upper()

    handler = warm(model_dir, input_formatter=input_formatter, output_formatter=output_formatter)
    out = handler.handle(request({"question": "Hello"}))
    assert out.code == 200
    assert out.get_properties()["content-type"] == "text/plain"
    assert raw_body(out).decode() == greedy_text(handler, "Hello", 3).upper()

    def simple_formatter(payload):
        return {"inputs": payload["q"]}

    handler.input_formatter = simple_formatter
    assert handler.handle(request({"q": "Hello"})).code == 200


# ---- details, n, truncate --------------------------------------------------------------------


def test_details_are_consistent(handler):
    params = {"max_new_tokens": 6, "details": True, "top_n_tokens": 2,
              "decoder_input_details": True}
    body = body_of(handler.handle(request({"inputs": "Hello", "parameters": params})))
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token", "stop_sequence")
    assert details["generated_tokens"] == len(details["tokens"]) <= 6
    assert details["inputs"] == "Hello"
    assert all(t["log_prob"] <= 0 and set(t) == {"id", "text", "log_prob", "special_token"}
               for t in details["tokens"])
    assert len(details["top_tokens"]) == len(details["tokens"])
    assert all(len(step) == 2 for step in details["top_tokens"])
    assert len(details["prefill"]) == handler.engine.count_tokens("Hello")
    assert body["generated_text"] == greedy_text(handler, "Hello", 6)


def test_return_full_text(handler):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    assert body_of(handler.handle(request(body)))["generated_text"] == \
        "Hello" + greedy_text(handler, "Hello", 3)


def test_n_best_of_returns_the_best_by_log_prob(handler):
    params = {"max_new_tokens": 5, "do_sample": True, "seed": 1, "n": 2, "best_of": 3}
    body = body_of(handler.handle(request({"inputs": "Hello", "parameters": params})))
    sequences = [body["details"], *body["details"]["best_of_sequences"]]
    assert len(sequences) == 2 and body["generated_text"]
    scores = [sum(t["log_prob"] for t in s["tokens"]) for s in sequences]
    assert scores == sorted(scores, reverse=True)


def test_truncate_keeps_the_last_tokens(handler):
    prompt = "Once upon a time there was a small model"
    ids = handler.engine.encode(prompt)[-4:]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 4, "truncate": 4}}
    expected = handler.engine.generate([ids], [SamplingParams(max_new_tokens=4)])[0].text
    assert body_of(handler.handle(request(body)))["generated_text"] == expected


# ---- streaming -------------------------------------------------------------------------------


def stream_lines(output) -> list[bytes]:
    assert output.code == 200
    return list(output.iter_stream())


def test_jsonlines_stream_concat_equals_generated_text(handler):
    body = {"inputs": "Hello", "stream": True, "parameters": {"max_new_tokens": 8}}
    out = handler.handle(request(body))
    assert out.get_properties()["content-type"] == "application/jsonlines"
    lines = [json.loads(line) for line in stream_lines(out)]
    assert 1 <= len(lines) <= 8
    text = "".join(line["token"]["text"] for line in lines)
    assert text == lines[-1]["generated_text"] == greedy_text(handler, "Hello", 8)
    assert lines[-1]["details"]["generated_tokens"] == len(lines)
    assert all("generated_text" not in line for line in lines[:-1])


def test_sse_and_tgi_compat(model_dir):
    sse = warm_with(model_dir, output_formatter="sse")
    out = sse.handle(request({"inputs": "Hello", "stream": True,
                              "parameters": {"max_new_tokens": 4}}))
    assert out.get_properties()["content-type"] == "text/event-stream"
    events = [json.loads(c[len(b"data: "):]) for c in stream_lines(out)]
    assert events[0]["token"].keys() == {"id", "text", "logprob", "special"}
    assert events[-1]["details"]["input_length"] == sse.engine.count_tokens("Hello")
    compat = warm_with(model_dir, tgi_compat="true")
    body = body_of(compat.handle(request({"inputs": "Hello", "parameters": {"max_new_tokens": 2}})))
    assert isinstance(body, list) and body[0]["generated_text"] == greedy_text(compat, "Hello", 2)


def test_stream_in_a_batch_is_400(handler):
    out = handler.handle(batch({"inputs": "Hello", "stream": True},
                               {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}))
    assert body_of(out, 0)["field"] == "stream" and "batch_size=1" in body_of(out, 0)["message"]
    assert "generated_text" in body_of(out, 1)


class FailingEngine:
    """Wraps the real engine; its stream raises after its first step. (Not "after two steps":
    a busy machine may deliver all of a request's tokens in two steps, which then never fail.)"""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_stream(self, prompts, params):
        steps = self.engine.generate_stream(prompts, params)

        def run():
            try:
                yield next(steps)
                raise RuntimeError("device lost")
            finally:
                steps.close()  # the engine aborts the request, as when a device fails
        return run()


@pytest.mark.parametrize(
    ("api", "body", "check"),
    [
        (None, {"inputs": "Hello"},
         lambda last: json.loads(last)["details"]["finish_reason"] == "error"),
        ("tgi.generate_stream", {"inputs": "Hello"},
         lambda last: json.loads(last[6:])["error"] == "RuntimeError: device lost"),
        ("openai.chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True},
         lambda last: last == b"data: [DONE]\n\n"),
    ],
)
def test_error_mid_stream_ends_with_an_error_line(handler, api, body, check):
    broken = LLMHandler()
    broken.engine = FailingEngine(handler.engine)
    params = {"max_new_tokens": 10, "min_new_tokens": 10}
    if "messages" in body:
        body = {**body, "max_tokens": 10, "min_tokens": 10, "temperature": 0}
    else:
        body = {**body, "stream": True, "parameters": params}
    headers = {"X-LMC-API": api} if api else {}
    chunks = stream_lines(broken.handle(request(body, headers=headers)))
    assert check(chunks[-1])
    assert b"device lost" in b"".join(chunks)


# ---- OpenAI, TGI, chat -----------------------------------------------------------------------


def test_openai_completions(handler):
    from openai.types import Completion

    body = {"model": "tiny", "prompt": ["Hello", "Once"], "max_tokens": 4, "temperature": 0,
            "logprobs": 2, "n": 2}
    out = handler.handle(request(body, headers={"X-LMC-API": "openai.completions"}))
    completion = Completion.model_validate(body_of(out))
    assert completion.object == "text_completion" and completion.model == "tiny"
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.choices[0].text == greedy_text(handler, "Hello", 4)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert len(completion.choices[0].logprobs.tokens) <= 4
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_chat_and_stream(handler):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    headers = {"X-LMC-API": "openai.chat"}
    chat = ChatCompletion.model_validate(body_of(handler.handle(request(body, headers=headers))))
    prompt = handler.engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == greedy_text(handler, prompt, 5)
    assert all(len(c.top_logprobs) == 2 for c in chat.choices[0].logprobs.content)

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    out = handler.handle(request(stream_body, headers=headers))
    assert out.get_properties()["content-type"] == "text/event-stream"
    chunks = stream_lines(out)
    assert chunks[-1] == b"data: [DONE]\n\n"
    parsed = [ChatCompletionChunk.model_validate(json.loads(c[6:])) for c in chunks[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parsed if p.choices)
    assert text == chat.choices[0].message.content
    assert parsed[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_chat_via_invocations(handler):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    chat = body_of(handler.handle(request(body)))
    assert chat["object"] == "chat.completion"
    prompt = handler.engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat["choices"][0]["message"]["content"] == greedy_text(handler, prompt, 3)
    lines = stream_lines(handler.handle(request({**body, "stream": True})))
    assert json.loads(lines[0])["object"] == "chat.completion.chunk"  # jsonlines_chat


def test_tgi_generate_and_stream(handler):
    from huggingface_hub import TextGenerationOutput, TextGenerationStreamOutput

    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}}
    out = handler.handle(request(body, headers={"X-LMC-API": "tgi.generate"}))
    parsed = TextGenerationOutput.parse_obj_as_instance(body_of(out))
    assert parsed.generated_text == greedy_text(handler, "Hello", 4)
    assert parsed.details.generated_tokens == len(parsed.details.tokens)
    out = handler.handle(request(body, headers={"X-LMC-API": "tgi.generate_stream"}))
    events = [TextGenerationStreamOutput.parse_obj_as_instance(json.loads(c[6:]))
              for c in stream_lines(out)]
    assert "".join(e.token.text for e in events) == parsed.generated_text
    assert events[-1].details.finish_reason == parsed.details.finish_reason


# ---- custom output formatter from serving.properties ----------------------------------------


def test_output_formatter_option_names_a_function(model_dir, tmp_path):
    (tmp_path / "my_formats.py").write_text(
        "def shout(response):\n"
        "    # streamed: one dict per token line; whole: the response dict\n"
        "    text = response['token']['text'] if 'token' in response else "
        "response['generated_text']\n"
        "    return text.upper()\n")
    handler = warm_with(model_dir, output_formatter="my_formats:shout",
                        model_dir_override=str(tmp_path))
    out = handler.handle(request({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}))
    assert raw_body(out).decode() == greedy_text(handler, "Hello", 3).upper()
    lines = stream_lines(handler.handle(request(
        {"inputs": "Hello", "stream": True, "parameters": {"max_new_tokens": 3}})))
    assert b"".join(lines).decode() == greedy_text(handler, "Hello", 3).upper()


def warm_with(model_dir, model_dir_override=None, **options) -> LLMHandler:
    handler = LLMHandler()
    props = {"model_dir": model_dir_override or str(model_dir), "model_id": str(model_dir),
             "dtype": "fp32", **options}
    assert handler.handle(Input(props)) is None
    return handler


class _CountingTokenizer:
    """Forwards to a tokenizer, counting encode calls (`tokenizer(text)`)."""

    def __init__(self, inner):
        self.inner = inner
        self.encodes = 0

    def __call__(self, *args, **kwargs):
        self.encodes += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_prompt_is_tokenized_once_per_request(handler, stream):
    """The parsed request carries token ids to the engine; nobody encodes the prompt again
    (before: the length check, the engine loop and the token count each did)."""
    engine = getattr(handler.engine, "engine", handler.engine)  # the native loop wraps it
    counting = _CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    try:
        out = handler.handle(request({"inputs": "count my tokens", "stream": stream,
                                      "parameters": {"max_new_tokens": 4, "details": True}}))
        if stream:
            lines = [json.loads(x) for x in b"".join(out.iter_stream()).splitlines()]
            assert lines[-1]["details"]["generated_tokens"] == len(lines)
        else:
            assert body_of(out)["details"]["generated_tokens"] >= 1
    finally:
        engine.tokenizer = counting.inner
    assert counting.encodes == 1
