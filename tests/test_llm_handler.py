"""The default LLM handler driven with Input objects (and once through ModelService) on a tiny
random-weight Llama: warm-up, LMI request schema, validation errors, batches, formatter hooks."""

import json

from handlers.service import _split_output

import pytest
from tiny_models import make_tiny_llama

from container.protocol import RequestItem
from engines.types import ACCEPTED_PARAMETERS, SamplingParams
from handlers import Input, ModelService
from handlers.inputs import input_from_items
from handlers.llm import LLMHandler
from handlers.pair_list import PairList


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def warm(model_dir, **handler_kwargs) -> LLMHandler:
    handler = LLMHandler(**handler_kwargs)
    assert handler.handle(Input({"model_dir": str(model_dir), "dtype": "fp32"})) is None
    return handler


@pytest.fixture(scope="module")
def handler(model_dir):
    return warm(model_dir)


def request(body, content_type: str = "application/json") -> Input:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Input({"Content-Type": content_type}, PairList([("data", data)]))


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
    handler.handle(Input({"model_dir": str(tmp_path), "model_id": str(model_dir)}))
    assert handler.engine is not None


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model_id=org/model is not a local directory"):
        LLMHandler().handle(Input({"model_dir": str(tmp_path), "model_id": "org/model"}))


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (b"{not json", "body", "not valid JSON"),
        ({"parameters": {}}, "inputs", 'no "inputs"'),
        ({"inputs": ""}, "inputs", "non-empty string"),
        ({"inputs": []}, "inputs", "non-empty list"),
        ({"inputs": ["ok", 3]}, "inputs[1]", "inputs[1] must be a non-empty string"),
        ({"inputs": 5}, "inputs", "string or a list of strings"),
        ([1, 2], "inputs", "JSON object"),
        ({"inputs": "hi", "prompt": "x"}, "prompt", "unknown request field(s) 'prompt'"),
        ({"inputs": "hi", "parameters": {"max_tokens": 5, "temp": 1}}, "max_tokens",
         "unknown parameter(s) 'max_tokens', 'temp'; accepted parameters: do_sample, "
         "max_new_tokens"),
        ({"inputs": "hi", "parameters": [1]}, "parameters", "JSON object"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens", ">= 1"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, "max_new_tokens", "integer"),
        ({"inputs": "hi", "parameters": {"temperature": -0.5}}, "temperature", ">= 0"),
        ({"inputs": "hi", "parameters": {"top_p": 0}}, "top_p", "(0, 1]"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "top_p", "(0, 1]"),
        ({"inputs": "hi", "parameters": {"top_k": -1}}, "top_k", ">= 0"),
        ({"inputs": "hi", "parameters": {"do_sample": "yes"}}, "do_sample", "true or false"),
        ({"inputs": "hi", "parameters": {"seed": -1}}, "seed", ">= 0"),
        ({"inputs": "hi", "stream": True}, "stream", "not supported"),
        ({"inputs": "Hello " * 200}, "inputs", "context holds 256"),
    ],
)
def test_validation_errors_are_400_naming_the_field(handler, body, field, message):
    out = handler.handle(request(body))
    assert out.code == 400
    error = body_of(out)
    assert error["code"] == 400 and error["type"] == "ValidationError"
    assert error["field"] == field
    assert message in error["message"]
    assert field.split("[")[0] in error["message"]


def test_unknown_parameter_message_lists_every_accepted_one(handler):
    error = body_of(handler.handle(request({"inputs": "hi", "parameters": {"foo": 1}})))
    for name in ACCEPTED_PARAMETERS:
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
    service = ModelService.load(str(model_dir), {"model_dir": str(model_dir), "dtype": "fp32"})
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
