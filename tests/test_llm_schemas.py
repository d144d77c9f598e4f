"""Request parsing and validation (handlers/llm_schema.py) with a fake tokenizer: one token per
character, a 64-token context. No model, no torch."""

import pytest

from engines.types import ACCEPTED_PARAMETERS, ValidationError
from handlers.llm_schema import (
    HANDLER_PARAMETERS,
    OPENAI_CHAT_FIELDS,
    Api,
    parse_request,
)


class FakeEngine:
    max_context = 64

    def encode(self, prompt: str) -> list[int]:
        return [ord(c) for c in prompt]

    def apply_chat_template(self, messages, *, add_generation_prompt=True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


ENGINE = FakeEngine()


def parse(body, api=Api.LMI):
    return parse_request(body, api, ENGINE)


def error_of(body, api=Api.LMI) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse(body, api)
    return info.value


# ---- LMI -------------------------------------------------------------------------------------


def test_lmi_defaults_and_handler_parameters():
    r = parse({"inputs": "hello", "parameters": {"max_new_tokens": 5, "details": True,
                                                 "return_full_text": True}})
    assert r.prompts == ["hello"] and r.engine_prompts == [[ord(c) for c in "hello"]] and r.prompt_tokens == [5]
    assert r.params.max_new_tokens == 5 and r.details and r.return_full_text
    assert not r.stream and not r.is_list and r.n == 1 and r.best_of == 1


def test_truncate_keeps_the_last_tokens_as_ids():
    r = parse({"inputs": "abcdef", "parameters": {"truncate": 3, "max_new_tokens": 2}})
    assert r.engine_prompts == [[ord("d"), ord("e"), ord("f")]] and r.prompt_tokens == [3]
    # Truncation rescues a prompt longer than the context.
    r = parse({"inputs": "x" * 100, "parameters": {"truncate": 10, "max_new_tokens": 2}})
    assert r.prompt_tokens == [10]


def test_n_and_best_of_give_distinct_seeds():
    r = parse({"inputs": "hi", "parameters": {"do_sample": True, "seed": 7, "n": 2,
                                              "best_of": 3, "max_new_tokens": 2}})
    assert (r.n, r.best_of) == (2, 3)
    assert [p.seed for p in r.sample_params()] == [7, 8, 9]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"parameters": {}}, "inputs", 'no "inputs"'),
        ({"inputs": ""}, "inputs", "non-empty string"),
        ({"inputs": []}, "inputs", "non-empty list"),
        ({"inputs": ["ok", 3]}, "inputs[1]", "must be a non-empty string"),
        ({"inputs": 5}, "inputs", "string or a list of strings"),
        ([1, 2], "body", "JSON object"),
        ({"inputs": "hi", "prompt": "x"}, "prompt", "unknown request field(s) 'prompt'"),
        ({"inputs": "hi", "parameters": {"max_tokens": 5, "temp": 1}}, "max_tokens",
         "unknown parameter(s) 'max_tokens', 'temp'"),
        ({"inputs": "hi", "parameters": [1]}, "parameters", "JSON object"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens", ">= 1"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, "max_new_tokens", "integer"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 63}}, "max_new_tokens",
         "prompt tokens (2) + max_new_tokens (63) = 65 exceeds the model's context of 64"),
        ({"inputs": "x" * 64}, "inputs", "64 tokens but the model's context holds 64"),
        ({"inputs": ["ok", "x" * 70]}, "inputs[1]", "70 tokens"),
        ({"inputs": "hi", "parameters": {"temperature": -0.5}}, "temperature", ">= 0"),
        ({"inputs": "hi", "parameters": {"top_p": 0}}, "top_p", "(0, 1]"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "top_p", "(0, 1]"),
        ({"inputs": "hi", "parameters": {"top_k": -1}}, "top_k", ">= 0"),
        ({"inputs": "hi", "parameters": {"do_sample": "yes"}}, "do_sample", "true or false"),
        ({"inputs": "hi", "parameters": {"seed": -1}}, "seed", ">= 0"),
        ({"inputs": "hi", "parameters": {"details": 1}}, "details", "true or false"),
        ({"inputs": "hi", "parameters": {"truncate": 0}}, "truncate", ">= 1"),
        ({"inputs": "hi", "parameters": {"n": 2}}, "n", "needs do_sample=true"),
        ({"inputs": "hi", "parameters": {"n": 3, "best_of": 2, "do_sample": True}}, "best_of",
         "best_of (2) must be >= n (3)"),
        ({"inputs": "hi", "parameters": {"best_of": 112818449, "do_sample": True}}, "best_of",
         "best_of must be <= 128, got 112818449"),
        ({"inputs": "hi", "parameters": {"n": 129, "best_of": 129, "do_sample": True}}, "n",
         "n must be <= 128"),
        ({"inputs": "hi", "stream": "yes"}, "stream", "true or false"),
        ({"inputs": ["a", "b"], "stream": True}, "stream", "one string input"),
        ({"inputs": "hi", "stream": True, "parameters": {"n": 2, "do_sample": True}}, "n",
         "n=1"),
    ],
)
def test_lmi_validation(body, field, message):
    error = error_of(body)
    assert error.field == field
    assert message in error.message
    assert field.split("[")[0] in error.message


def test_unknown_parameter_lists_every_accepted_one():
    message = error_of({"inputs": "hi", "parameters": {"foo": 1}}).message
    for name in ACCEPTED_PARAMETERS | HANDLER_PARAMETERS:
        assert name in message


# ---- TGI -------------------------------------------------------------------------------------


def test_tgi_routes():
    assert parse({"inputs": "hi", "parameters": {"max_new_tokens": 2}},
                 Api.TGI_GENERATE_STREAM).stream
    r = parse({"inputs": "hi", "parameters": {"stop": ["x"], "watermark": False,
                                              "max_new_tokens": 2, "best_of": 2,
                                              "do_sample": True}}, Api.TGI)
    assert r.params.stop_sequences == ("x",) and (r.n, r.best_of) == (1, 2)
    assert error_of({"inputs": "hi", "stream": True}, Api.TGI_GENERATE).field == "stream"
    assert error_of({"inputs": ["a"]}, Api.TGI).field == "inputs"
    assert error_of({"inputs": "hi", "parameters": {"watermark": True}}, Api.TGI).field == \
        "watermark"


# ---- OpenAI ----------------------------------------------------------------------------------


def test_openai_completions_mapping():
    r = parse({"model": "m", "prompt": "hello", "stop": "x", "user": "u", "seed": 3,
               "logprobs": 2, "echo": True, "stream": True,
               "stream_options": {"include_usage": True}}, Api.OPENAI_COMPLETIONS)
    p = r.params
    # OpenAI's defaults: 16 tokens, temperature 1.0 = sampling.
    assert p.max_new_tokens == 16 and p.do_sample and p.temperature == 1.0
    assert p.stop_sequences == ("x",) and p.seed == 3 and p.top_n_tokens == 2
    assert p.decoder_input_details  # echo + logprobs reports prompt log-probs
    assert r.model == "m" and r.logprobs == 2 and r.echo and r.stream and r.include_usage
    greedy = parse({"prompt": ["a", "b"], "temperature": 0, "n": 2}, Api.OPENAI_COMPLETIONS)
    assert not greedy.params.do_sample and greedy.is_list and greedy.n == 2  # OpenAI allows it


def test_openai_chat_mapping():
    r = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}],
               "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2,
               "response_format": {"type": "text"}, "logit_bias": {}}, Api.OPENAI_CHAT)
    assert r.chat and r.prompts == ["<user>hi<assistant>"] and r.params.max_new_tokens == 4
    assert r.logprobs == 2 and r.params.top_n_tokens == 2
    # Without max_tokens chat fills the rest of the context.
    r = parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
              Api.OPENAI_CHAT)
    assert r.params.max_new_tokens == 64 - len("<user>hi<assistant>")
    # LMI /invocations with "messages" is chat too.
    assert parse({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).chat


@pytest.mark.parametrize(
    ("api", "body", "field", "message"),
    [
        (Api.OPENAI_CHAT, {"messages": [], "max_tokens": 2}, "messages", "non-empty list"),
        (Api.OPENAI_CHAT, {"messages": [{"content": "x"}]}, "messages[0]", '"role"'),
        (Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": 5}]},
         "messages[0].content", "string"),
        (Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": "x"}], "tools": [{}]},
         "tools", "not supported"),
        (Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": "x"}],
                           "response_format": {"type": "json_object"}},
         "response_format", "not supported"),
        (Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": "x"}], "foo": 1},
         "foo", "unknown field(s) 'foo'"),
        (Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
         "top_logprobs", "needs logprobs=true"),
        (Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": 3},
         "logprobs", "true or false"),
        (Api.OPENAI_COMPLETIONS, {"prompt": "x", "logprobs": 50}, "logprobs", "<= 20"),
        (Api.OPENAI_COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
        (Api.OPENAI_COMPLETIONS, {"prompt": "x", "max_tokens": 100}, "max_tokens",
         "exceeds the model's context of 64"),
        (Api.OPENAI_COMPLETIONS, {"prompt": "x", "temperature": -1}, "temperature", ">= 0"),
        (Api.OPENAI_COMPLETIONS, {"prompt": "x", "stop": 5}, "stop", "string or a list"),
        (Api.OPENAI_COMPLETIONS, {"prompt": [1, 2]}, "prompt", "non-empty string"),
        (Api.OPENAI_COMPLETIONS, {"prompt": "x", "messages": []}, "messages", "unknown"),
        (Api.OPENAI_COMPLETIONS, {"prompt": "x", "n": 2, "best_of": 3, "stream": True},
         "best_of", "cannot stream"),
    ],
)
def test_openai_validation(api, body, field, message):
    error = error_of(body, api)
    assert error.field == field
    assert message in error.message


def test_openai_unknown_field_lists_accepted():
    message = error_of({"messages": [{"role": "user", "content": "x"}], "foo": 1},
                       Api.OPENAI_CHAT).message
    for name in OPENAI_CHAT_FIELDS:
        assert name in message


# ---- null means "not set", on every route ------------------------------------------------------

_ALL_LMI_NULL = {name: None for name in ("max_new_tokens", "temperature", "top_k", "top_p",
                                         "seed", "stop_sequences", "details", "n", "best_of",
                                         "truncate", "typical_p", "do_sample",
                                         "repetition_penalty", "decoder_input_details")}


@pytest.mark.parametrize("api", [Api.LMI, Api.TGI_GENERATE])
def test_null_parameters_are_unset(api):
    r = parse({"inputs": "hi", "parameters": _ALL_LMI_NULL, "stream": None}, api)
    default = parse({"inputs": "hi"}, api)
    assert (r.params, r.n, r.best_of, r.details, r.stream) == \
        (default.params, default.n, default.best_of, default.details, default.stream)


@pytest.mark.parametrize("api, body", [
    (Api.OPENAI_COMPLETIONS, {"prompt": "hi"}),
    (Api.OPENAI_CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_openai_nulls_are_unset(api, body):
    nulls = {k: None for k in ("model", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                               "stream", "stream_options", "logprobs", "presence_penalty",
                               "frequency_penalty", "user", "top_k", "min_p", "response_format",
                               "tools", "tool_choice", "logit_bias")}
    if api is Api.OPENAI_COMPLETIONS:
        nulls.update(echo=None, best_of=None, suffix=None)
    else:
        nulls.update(max_completion_tokens=None, top_logprobs=None)
    r, default = parse({**body, **nulls}, api), parse(body, api)
    assert (r.params, r.n, r.logprobs, r.echo, r.stream) == \
        (default.params, default.n, default.logprobs, default.echo, default.stream)


def test_an_unknown_name_is_refused_even_when_null():
    assert error_of({"inputs": "hi", "parameters": {"max_new_tokenz": None}}).field == \
        "max_new_tokenz"
    assert error_of({"prompt": "hi", "temprature": None}, Api.OPENAI_COMPLETIONS).field == \
        "temprature"
    # LoRAX/TGI names are TGI-route names: on LMI routes they stay unknown.
    assert error_of({"inputs": "hi", "parameters": {"adapter_id": None}}).field == "adapter_id"


def test_tgi_routes_take_what_tgi_and_lorax_clients_send():
    sent = {"adapter_id": None, "adapter_source": None, "merged_adapters": None,
            "api_token": None, "do_sample": False, "max_new_tokens": 4,
            "ignore_eos_token": False, "repetition_penalty": None, "return_full_text": False,
            "stop": [], "seed": None, "temperature": None, "top_k": None, "top_p": None,
            "truncate": None, "typical_p": None, "best_of": None, "watermark": False,
            "details": True, "decoder_input_details": False, "return_k_alternatives": None,
            "response_format": None, "grammar": None, "top_n_tokens": None,
            "frequency_penalty": None}
    r = parse({"inputs": "hi", "parameters": sent, "stream": False}, Api.TGI)
    assert r.params.max_new_tokens == 4 and r.details and r.alternatives == 0
    k = parse({"inputs": "hi", "parameters": {**sent, "return_k_alternatives": 3}}, Api.TGI)
    assert k.alternatives == 3 and k.params.top_n_tokens == 3
    for name, value in [("watermark", True), ("grammar", {"type": "json", "value": {}}),
                        ("api_token", "hf_x"), ("response_format", {"type": "json_object"})]:
        e = error_of({"inputs": "hi", "parameters": {**sent, name: value}}, Api.TGI)
        assert e.field == name and "omit it or send null" in e.message
    # LoRAX's adapter fields select an adapter (the handler checks the name exists).
    a = parse({"inputs": "hi", "parameters": {**sent, "adapter_id": "a",
                                              "adapter_source": "local"}}, Api.TGI)
    assert a.adapters == ("a",) and a.merge is None
    m = parse({"inputs": "hi", "parameters": {**sent, "merged_adapters": {
        "ids": ["a", "b"], "weights": [0.25, 0.75], "merge_strategy": "linear"}}}, Api.TGI)
    assert m.merge == (("a", "b"), (0.25, 0.75)) and m.adapters == ()


def test_adapter_fields_are_checked_by_name():
    assert parse({"inputs": ["x", "y"], "adapters": ["a", ""]}).adapters == ("a", None)
    assert parse({"inputs": "x", "adapters": "a"}).adapters == ("a",)
    assert error_of({"inputs": ["x", "y"], "adapters": ["a"]}).field == "adapters"
    assert error_of({"inputs": "x", "adapters": 3}).field == "adapters"
    for params, field in [({"adapter_source": "ftp"}, "adapter_source"),
                          ({"adapter_id": 5}, "adapter_id"),
                          ({"merged_adapters": {"ids": ["a"], "merge_strategy": "ties"}},
                           "merged_adapters.merge_strategy"),
                          ({"merged_adapters": {"ids": ["a", "b"], "weights": [1]}},
                           "merged_adapters.weights"),
                          ({"merged_adapters": {"ids": []}}, "merged_adapters.ids"),
                          ({"merged_adapters": {"ids": ["a"]}, "adapter_id": "b"},
                           "merged_adapters")]:
        assert error_of({"inputs": "x", "parameters": params}, Api.TGI).field == field
