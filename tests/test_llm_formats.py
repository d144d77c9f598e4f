"""Exact response shapes (handlers/llm_formats.py) from hand-built engine results and events."""

import json

from engines.types import FinishReason, GenerationResult, SamplingParams, Token, TokenEvent
from handlers import llm_formats as fmt
from handlers.llm_schema import Api, LLMRequest

A = Token(5, "Hi", -0.5)
B = Token(6, " there", -1.0)
EOS = Token(2, "<eos>", -0.1, special=True)
RESULT = GenerationResult(text="Hi there", token_ids=[5, 6, 2],
                          finish_reason=FinishReason.EOS_TOKEN, prompt_tokens=3,
                          tokens=[A, B, EOS])
META = fmt.OpenAIMeta("id-1", 123, "tiny")


def request(api=Api.LMI, **kw) -> LLMRequest:
    params = kw.pop("params", SamplingParams())
    return LLMRequest(api=api, prompts=["Say"], engine_prompts=["Say"], prompt_tokens=[3],
                      params=params, **kw)


def events() -> list[TokenEvent]:
    return [TokenEvent(0, A, "Hi"), TokenEvent(0, B, ""),
            TokenEvent(0, EOS, " there", finish_reason=FinishReason.EOS_TOKEN)]


def run(stream: fmt.StreamFormat) -> list[bytes]:
    stream.states = [fmt.SequenceState(0, 0, 0)]
    out = [stream.encode(i) for i in stream.start()]
    for event in events():
        stream.states[0].add(event)
        out += [stream.encode(i) for i in stream.token(stream.states[0], event)]
    return out + [stream.encode(i) for i in stream.end()]


def test_lmi_json():
    assert fmt.lmi_response(request(), 0, [RESULT]) == {"generated_text": "Hi there"}
    body = fmt.lmi_response(request(details=True, return_full_text=True), 0, [RESULT])
    assert body == {"generated_text": "SayHi there", "details": {
        "finish_reason": "eos_token", "generated_tokens": 3, "inputs": "Say",
        "tokens": [{"id": 5, "text": "Hi", "log_prob": -0.5, "special_token": False},
                   {"id": 6, "text": " there", "log_prob": -1.0, "special_token": False},
                   {"id": 2, "text": "<eos>", "log_prob": -0.1, "special_token": True}]}}


def test_tgi_json():
    body = fmt.tgi_response(request(Api.TGI_GENERATE, details=True), 0, [RESULT])
    assert body["details"]["prefill"] == [] and body["details"]["seed"] is None
    assert body["details"]["tokens"][2] == {"id": 2, "text": "<eos>", "logprob": -0.1,
                                            "special": True}


def test_openai_bodies():
    body = fmt.openai_completion(request(Api.OPENAI_COMPLETIONS, logprobs=0), [[RESULT]], META)
    assert body == {"id": "id-1", "object": "text_completion", "created": 123, "model": "tiny",
                    "choices": [{"index": 0, "text": "Hi there", "finish_reason": "stop",
                                 "logprobs": {"tokens": ["Hi", " there", "<eos>"],
                                              "token_logprobs": [-0.5, -1.0, -0.1],
                                              "top_logprobs": [{}, {}, {}],
                                              "text_offset": [0, 2, 8]}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
    chat = fmt.openai_chat(request(Api.OPENAI_CHAT, logprobs=0), [[RESULT]], META)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hi there"}
    assert chat["choices"][0]["logprobs"]["content"][0] == {
        "token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}


def test_lmi_jsonlines_stream():
    lines = [json.loads(b) for b in run(fmt.LmiJsonlines(request()))]
    assert lines[0] == {"token": {"id": 5, "text": "Hi", "log_prob": -0.5,
                                  "special_token": False}}
    assert lines[1]["token"]["text"] == ""  # held back, still a line
    assert lines[2]["generated_text"] == "Hi there"
    assert lines[2]["details"] == {"finish_reason": "eos_token", "generated_tokens": 3,
                                   "inputs": "Say"}
    assert "".join(line["token"]["text"] for line in lines) == "Hi there"


def test_tgi_sse_stream():
    chunks = run(fmt.TgiSSE(request(Api.TGI_GENERATE_STREAM)))
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    events_ = [json.loads(c[6:]) for c in chunks]
    assert events_[0] == {"index": 0, "token": {"id": 5, "text": "Hi", "logprob": -0.5,
                                                "special": False},
                          "generated_text": None, "details": None}
    assert events_[2]["details"] == {"finish_reason": "eos_token", "generated_tokens": 3,
                                     "input_length": 3, "prompt_tokens": 3, "seed": None}


def test_openai_streams():
    chunks = run(fmt.OpenAIChatStream(request(Api.OPENAI_CHAT, include_usage=True), META))
    assert chunks[-1] == b"data: [DONE]\n\n"
    data = [json.loads(c[6:]) for c in chunks[:-1]]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"]["content"] for d in data[1:4]] == ["Hi", "", " there"]
    assert data[3]["choices"][0]["finish_reason"] == "stop"
    assert data[4]["choices"] == [] and data[4]["usage"]["completion_tokens"] == 3
    chunks = run(fmt.OpenAICompletionStream(request(Api.OPENAI_COMPLETIONS), META))
    first = json.loads(chunks[0][6:])
    assert first["object"] == "text_completion" and first["choices"][0]["text"] == "Hi"


def test_error_items():
    for stream in (fmt.LmiJsonlines(request()), fmt.TgiSSE(request(Api.TGI)),
                   fmt.OpenAIChatStream(request(Api.OPENAI_CHAT), META)):
        stream.states = [fmt.SequenceState(0, 0, 0)]
        first = stream.encode(stream.error("boom")[0]).decode()
        assert '"error"' in first and "boom" in first


def test_custom_formatter_on_stream_items():
    stream = fmt.with_custom_formatter(fmt.LmiJsonlines(request()),
                                       lambda item: item["token"]["text"].upper())
    assert b"".join(run(stream)) == b"HI THERE"
