"""The HTTP API as an OpenAPI 3.1 document, served at GET /openapi.json.

Plain Python data (no dependency), built once. It describes every route container/server.py
registers (tests/test_fuzz.py fails on a route without an operation here, or the reverse), the
request bodies of the default LLM handler (the field names are checked against
handlers/llm_schema.py's in the same test) and every answer: status codes, content types and
bodies, including the one error shape (engines/contracts/errors.error_body), TGI's error shape
on the TGI routes and the SageMaker runtime API's on /endpoints/*. tests/test_fuzz.py runs
schemathesis against a live server with this document.

A custom model.py decides itself what an inference route takes and answers; the bodies here are
the default LLM handler's (LMI, OpenAI, TGI schemas).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from engines.types import (MAX_REPETITION_PENALTY, MAX_SAMPLES, MAX_TOP_N_TOKENS,
                           MIN_REPETITION_PENALTY, FinishReason)

JSON = "application/json"
JSONLINES = "application/jsonlines"
EVENT_STREAM = "text/event-stream"
TEXT = "text/plain"
EVENT_STREAM_AWS = "application/vnd.amazon.eventstream"

MAX_SEED = 2**64 - 1  # engines/types._MAX_SEED: torch.Generator takes an unsigned 64-bit seed
MAX_OPENAI_LOGPROBS = 20  # handlers/llm_schema.MAX_OPENAI_LOGPROBS

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _or_null(schema: Schema) -> Schema:
    """`schema`, or JSON null (which every LLM route reads as "not set")."""
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return schema
    if isinstance(kind, str):
        out = {**schema, "type": [kind, "null"]}
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict[str, Schema], required: tuple[str, ...] = (), *,
         closed: bool = False, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    out.update(extra)
    return out


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


_STR = {"type": "string"}
_NONEMPTY = {"type": "string", "minLength": 1}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_LOGPROB = {"type": ["number", "null"]}
_FINISH = {"type": "string", "enum": [r.value for r in FinishReason]}
_STREAM_FINISH = {"type": ["string", "null"], "enum": [*(r.value for r in FinishReason), "error",
                                                       None]}
_OPENAI_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", "error", None]}


# ---- schemas ---------------------------------------------------------------------------------

_LMI_PARAMETERS: dict[str, Schema] = {
    # engines/types.SamplingParams
    "max_new_tokens": {"type": "integer", "minimum": 1, "default": 30,
                       "description": "prompt tokens + max_new_tokens must fit the context"},
    "min_new_tokens": {"type": "integer", "minimum": 0, "default": 0,
                       "description": "<= max_new_tokens; EOS and stop sequences are ignored "
                                      "before this many tokens"},
    "do_sample": {"type": "boolean", "default": False},
    "temperature": {"type": "number", "minimum": 0, "default": 1.0,
                    "description": "0 means greedy"},
    "top_k": {"type": "integer", "minimum": 0, "default": 0, "description": "0 disables it"},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0},
    "typical_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
    "repetition_penalty": {"type": "number", "minimum": MIN_REPETITION_PENALTY,
                           "maximum": MAX_REPETITION_PENALTY, "default": 1.0},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0.0},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "default": 0.0},
    "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
    "stop_sequences": {"anyOf": [_NONEMPTY, _array(_NONEMPTY)],
                       "description": "the text ends before the first stop string"},
    "stop_token_ids": _array({"type": "integer", "minimum": 0}),
    "ignore_eos_token": {"type": "boolean", "default": False},
    "top_n_tokens": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_N_TOKENS, "default": 0},
    "decoder_input_details": {"type": "boolean", "default": False,
                              "description": "the prompt's log-probs in details.prefill"},
    # handlers/llm_schema.HANDLER_PARAMETERS
    "return_full_text": {"type": "boolean", "default": False},
    "details": {"type": "boolean", "default": False},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES, "default": 1,
          "description": "n > 1 needs do_sample=true"},
    "best_of": {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES,
                "description": ">= n; default n"},
    "truncate": {"type": "integer", "minimum": 1,
                 "description": "keep only the last `truncate` prompt tokens"},
}

# TGI's and LoRAX's names on /generate, /generate_stream and / (handlers/llm_schema._tgi_*).
_TGI_EXTRA_PARAMETERS: dict[str, Schema] = {
    "stop": {"anyOf": [_NONEMPTY, _array(_NONEMPTY)], "description": "TGI's stop_sequences"},
    "watermark": {"type": "boolean", "enum": [False],
                  "description": "only false: watermarking is not supported"},
    "grammar": {"type": "null", "description": "not supported: only null"},
    "response_format": {"type": "null", "description": "not supported: only null"},
    "api_token": {"type": "null", "description": "not supported: only null"},
    "return_k_alternatives": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_N_TOKENS},
    "adapter_id": {"type": "string",
                   "description": "a registered adapter, or one to load (adapter_source)"},
    "adapter_source": {"type": "string", "enum": ["hub", "local", "s3", "pbase"],
                       "description": "pbase is refused"},
    "merged_adapters": _obj({
        "ids": _array(_NONEMPTY, minItems=1),
        "weights": _array(_NUM),
        "merge_strategy": {"type": "string", "enum": ["linear"]},
        "density": {"type": ["number", "null"]},
        "majority_sign_method": {"type": ["string", "null"]},
    }, ("ids",), closed=True),
}


def _parameters(props: dict[str, Schema]) -> Schema:
    return _obj({k: _or_null(v) for k, v in props.items()}, closed=True,
                description="generation parameters; an unknown name is a 400 that names it, "
                            "null means not set")


_MESSAGE = _obj({
    "role": _STR,
    "content": {"anyOf": [
        {"type": ["string", "null"]},
        _array(_obj({"type": {"type": "string", "enum": ["text"]}, "text": _STR}, ("type",))),
    ]},
}, ("role",))

# OpenAI's fields accepted only at the value that changes nothing (llm_schema._OPENAI_HARMLESS).
_OPENAI_HARMLESS: dict[str, Schema] = {
    "response_format": {"anyOf": [{"type": "null"},
                                  _obj({"type": {"type": "string", "enum": ["text"]}}, ("type",))]},
    "logit_bias": {"description": "only empty or null"},
    "suffix": {"description": "only empty or null"},
    "tools": {"description": "only empty or null"},
    "tool_choice": {"type": ["string", "null"], "enum": ["none", None]},
    "parallel_tool_calls": {"description": "ignored"},
    "store": {"description": "only false or null"},
    "metadata": {"description": "ignored"},
    "service_tier": {"description": "ignored"},
}

_OPENAI_COMMON: dict[str, Schema] = {
    "model": {"type": "string", "description": "a model, or an adapter of one; with one model "
                                                "served, any name (unless LoRA is on)"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "default": 1.0,
                    "description": "0 is greedy, > 0 samples"},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES, "default": 1},
    "stop": {"anyOf": [_NONEMPTY, _array(_NONEMPTY)]},
    "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
    "stream": _BOOL,
    "stream_options": _obj({"include_usage": _BOOL}),
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "user": {"type": "string", "description": "ignored"},
    # vLLM's extensions
    "top_k": {"type": "integer", "minimum": 0},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "repetition_penalty": {"type": "number", "minimum": MIN_REPETITION_PENALTY,
                           "maximum": MAX_REPETITION_PENALTY},
    "min_tokens": {"type": "integer", "minimum": 0},
    "ignore_eos": _BOOL,
    "stop_token_ids": _array({"type": "integer", "minimum": 0}),
}


def _openai_request(own: dict[str, Schema], required: str) -> Schema:
    props = {**{k: _or_null(v) for k, v in {**_OPENAI_COMMON, **own}.items()},
             **_OPENAI_HARMLESS}
    props[required] = own[required]
    return _obj(props, (required,), closed=True)


_COMPLETION_REQUEST = _openai_request({
    "prompt": {"anyOf": [_NONEMPTY, _array(_NONEMPTY, minItems=1)]},
    "echo": _BOOL,
    "best_of": {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLES},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_OPENAI_LOGPROBS},
}, "prompt")

_CHAT_REQUEST = _openai_request({
    "messages": _array(_MESSAGE, minItems=1),
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "logprobs": _BOOL,
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_OPENAI_LOGPROBS,
                     "description": "needs logprobs=true"},
}, "messages")

_LMI_REQUEST = _obj({
    "inputs": {"anyOf": [_NONEMPTY, _array(_NONEMPTY, minItems=1)],
               "description": "a prompt, or a list of prompts (answered with a list)"},
    "parameters": _or_null(_parameters(_LMI_PARAMETERS)),
    "stream": {"type": ["boolean", "null"],
               "description": "one JSON line per token; needs one string input and n=1"},
    "adapters": {"anyOf": [{"type": ["string", "null"]}, _array(_STR)],
                 "description": "the LoRA adapter, or one per input (\"\": the base model)"},
}, ("inputs",), closed=True)

_TGI_REQUEST = _obj({
    "inputs": _NONEMPTY,
    "parameters": _or_null(_parameters({**_LMI_PARAMETERS, **_TGI_EXTRA_PARAMETERS})),
    "stream": {"type": ["boolean", "null"],
               "description": "/: SSE when true; /generate: only false; /generate_stream: "
                              "always streams"},
    "adapters": {"type": ["string", "null"]},
}, ("inputs",), closed=True)

_LMI_TOKEN = _obj({"id": _INT, "text": _STR, "log_prob": _LOGPROB, "special_token": _BOOL},
                  ("id", "text", "log_prob", "special_token"), closed=True)
_LMI_DETAILS_PROPS = {
    "finish_reason": _FINISH,
    "generated_tokens": _INT,
    "inputs": _STR,
    "tokens": _array(_ref("LmiToken")),
    "prefill": _array(_ref("LmiToken")),
    "top_tokens": _array(_array(_ref("LmiToken"))),
}
_LMI_DETAILS = _obj({
    **_LMI_DETAILS_PROPS,
    "best_of_sequences": _array(_obj({"generated_text": _STR, **_LMI_DETAILS_PROPS},
                                     ("generated_text", "finish_reason", "generated_tokens",
                                      "tokens"), closed=True)),
}, ("finish_reason", "generated_tokens", "inputs", "tokens"), closed=True)
_LMI_GENERATION = _obj({"generated_text": _STR, "details": _ref("LmiDetails")},
                       ("generated_text",), closed=True)
_LMI_STREAM_LINE = _obj({
    "token": _ref("LmiToken"),
    "top_tokens": _array(_ref("LmiToken")),
    "generated_text": {"type": ["string", "null"]},
    "details": _obj({"finish_reason": _STREAM_FINISH, "generated_tokens": _INT, "inputs": _STR,
                     "prefill": _array(_ref("LmiToken"))},
                    ("finish_reason", "generated_tokens", "inputs"), closed=True),
    "error": _STR,
}, closed=True, description="one line of an LMI jsonlines stream: a token; the last line adds "
                            "generated_text and details; a failure ends with error")

# A jsonlines stream on the LMI routes: LMI's lines, or chat.completion.chunk lines for a chat
# request (option.output_formatter jsonlines_chat too).
_LMI_STREAM_ITEM = {"anyOf": [_ref("LmiStreamLine"), _ref("ChatCompletionChunk")]}

_TGI_PREFILL_TOKEN = _obj({"id": _INT, "text": _STR, "logprob": _LOGPROB},
                          ("id", "text", "logprob"), closed=True)
_TGI_TOKEN = _obj({"id": _INT, "text": _STR, "logprob": _LOGPROB, "special": _BOOL,
                   "alternative_tokens": _array(_ref("TgiPrefillToken"))},
                  ("id", "text", "logprob", "special"), closed=True)
_TGI_DETAILS_PROPS = {
    "finish_reason": _FINISH,
    "generated_tokens": _INT,
    "prompt_tokens": _INT,
    "seed": {"type": ["integer", "null"]},
    "prefill": _array(_ref("TgiPrefillToken")),
    "tokens": _array(_ref("TgiToken")),
    "top_tokens": _array(_array(_ref("TgiToken"))),
}
_TGI_DETAILS = _obj({
    **_TGI_DETAILS_PROPS,
    "best_of_sequences": _array(_obj({"generated_text": _STR, **_TGI_DETAILS_PROPS},
                                     ("generated_text", "finish_reason", "generated_tokens",
                                      "tokens", "prefill"), closed=True)),
}, ("finish_reason", "generated_tokens", "prompt_tokens", "seed", "prefill", "tokens"),
    closed=True)
_TGI_GENERATION = _obj({"generated_text": _STR, "details": _ref("TgiDetails")},
                       ("generated_text",), closed=True)
_TGI_STREAM_EVENT = _obj({
    "index": _INT,
    "token": _or_null(_ref("TgiToken")),
    "top_tokens": _array(_ref("TgiToken")),
    "generated_text": {"type": ["string", "null"]},
    "details": _or_null(_obj({"finish_reason": _STREAM_FINISH, "generated_tokens": _INT,
                              "input_length": _INT, "prompt_tokens": _INT,
                              "seed": {"type": ["integer", "null"]}},
                             ("finish_reason", "generated_tokens", "input_length"),
                             closed=True)),
    "error": _STR,
    "error_type": _STR,
}, ("index", "token", "generated_text", "details"), closed=True)

_USAGE = _obj({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
              ("prompt_tokens", "completion_tokens", "total_tokens"), closed=True)
_STREAM_ERROR = _obj({"message": _STR, "type": _STR, "code": _INT}, ("message",))
_COMPLETION_LOGPROBS = _or_null(_obj({
    "tokens": _array(_STR),
    "token_logprobs": _array(_LOGPROB),
    "top_logprobs": _or_null(_array(_obj({}, additionalProperties=_LOGPROB))),
    "text_offset": _array(_INT),
}, ("tokens", "token_logprobs", "top_logprobs", "text_offset"), closed=True))
_CHAT_LOGPROB = _obj({
    "token": _STR, "logprob": _LOGPROB, "bytes": _array(_INT),
    "top_logprobs": _array(_obj({"token": _STR, "logprob": _LOGPROB, "bytes": _array(_INT)},
                                ("token", "logprob", "bytes"), closed=True)),
}, ("token", "logprob", "bytes", "top_logprobs"), closed=True)
_CHAT_LOGPROBS = _or_null(_obj({"content": _array(_CHAT_LOGPROB)}, ("content",), closed=True))


def _openai_body(object_: str, choice: Schema, *, chunk: bool) -> Schema:
    props = {"id": _STR, "object": {"type": "string", "const": object_}, "created": _INT,
             "model": _STR, "choices": _array(choice)}
    if chunk:
        props |= {"usage": _or_null(_ref("Usage")), "error": _ref("StreamError")}
    else:
        props["usage"] = _ref("Usage")
    required = ("id", "object", "created", "model", "choices") + (() if chunk else ("usage",))
    return _obj(props, required, closed=True)


_COMPLETION = _openai_body("text_completion", _obj(
    {"index": _INT, "text": _STR, "logprobs": _COMPLETION_LOGPROBS,
     "finish_reason": _OPENAI_FINISH},
    ("index", "text", "logprobs", "finish_reason"), closed=True), chunk=False)
_COMPLETION_CHUNK = _openai_body("text_completion", _obj(
    {"index": _INT, "text": _STR, "logprobs": _COMPLETION_LOGPROBS,
     "finish_reason": _OPENAI_FINISH},
    ("index", "text", "logprobs", "finish_reason"), closed=True), chunk=True)
_CHAT = _openai_body("chat.completion", _obj(
    {"index": _INT,
     "message": _obj({"role": {"type": "string", "const": "assistant"}, "content": _STR},
                     ("role", "content"), closed=True),
     "logprobs": _CHAT_LOGPROBS, "finish_reason": _OPENAI_FINISH},
    ("index", "message", "logprobs", "finish_reason"), closed=True), chunk=False)
_CHAT_CHUNK = _openai_body("chat.completion.chunk", _obj(
    {"index": _INT,
     "delta": _obj({"role": {"type": "string", "const": "assistant"}, "content": _STR},
                   closed=True),
     "logprobs": _CHAT_LOGPROBS, "finish_reason": _OPENAI_FINISH},
    ("index", "delta", "logprobs", "finish_reason"), closed=True), chunk=True)

_ERROR = _obj({
    "code": {"type": "integer", "minimum": 400, "maximum": 599},
    "type": {"type": "string", "description": "the same mistake has the same type on every "
                                              "route (ValidationError, ModelNotFound, ...)"},
    "message": _STR,
    "field": {"type": "string", "description": "the request field at fault"},
    "error": {"type": "string", "description": "the message again, on a handler's failure "
                                               "(where LMI's clients read it)"},
}, ("code", "type", "message"), closed=True)
_TGI_ERROR = _obj({
    "error": _STR,
    "error_type": {"type": "string", "enum": ["validation", "overloaded", "generation"]},
    "type": _STR,
    "field": _STR,
}, ("error", "type"), closed=True, description="TGI's error shape, with LMC's type (and field)")

_HEALTH = _obj({"status": {"type": "string", "enum": ["Loading", "Healthy", "Failed", "Stopped"]},
                "error": _STR}, ("status",), closed=True)
_PING = {"anyOf": [
    _obj({"status": {"type": "string", "const": "Loading"}}, ("status",), closed=True,
         description="starting: no model registered yet"),
    _obj({}, additionalProperties=_ref("ModelHealth"), description="each model's status"),
]}
_STATUS = _obj({"status": _STR}, ("status",), closed=True)
_WORKER = _obj({
    "id": _INT, "pid": {"type": ["integer", "null"]},
    "state": {"type": "string", "enum": ["STARTING", "READY", "BUSY", "STOPPED"]},
    "permanent": _BOOL, "started_at": _NUM, "requests": _INT, "tp": _INT,
    "ranks": _array(_obj({"rank": _INT, "pid": {"type": ["integer", "null"]}},
                         ("rank", "pid"), closed=True)),
    "devices": {"type": ["string", "null"]},
}, ("id", "pid", "state", "permanent", "started_at", "requests", "tp", "ranks", "devices"),
    closed=True)
_MODEL_DESCRIPTION = _obj({
    "modelName": _STR, "modelUrl": _STR, "status": _HEALTH["properties"]["status"],
    "failure": {"type": ["string", "null"]}, "batchSize": _INT, "maxBatchDelay": _INT,
    "maxIdleTime": _NUM, "minWorkers": _INT, "maxWorkers": _INT, "queueSize": _INT,
    "queueLength": _INT, "tensorParallelDegree": _INT, "adapters": _array(_STR),
    "workers": _array(_ref("Worker")),
}, ("modelName", "modelUrl", "status", "failure", "batchSize", "maxBatchDelay", "maxIdleTime",
    "minWorkers", "maxWorkers", "queueSize", "queueLength", "tensorParallelDegree", "adapters",
    "workers"), closed=True)
_MODEL_LIST = _obj({"models": _array(_obj(
    {"modelName": _STR, "modelUrl": _STR, "status": _HEALTH["properties"]["status"]},
    ("modelName", "modelUrl", "status"), closed=True))}, ("models",), closed=True)
_ADAPTER = _obj({"name": _STR, "src": _STR, "path": _STR, "preload": _BOOL, "pin": _BOOL},
                ("name", "src", "path", "preload", "pin"), additionalProperties=_STR,
                description="the options given at registration ride along as strings")
_ADAPTER_LIST = _obj({"adapters": _array(_ref("Adapter")),
                      "nextPageToken": {"type": "string",
                                        "description": "pass as next_page_token for more"}},
                     ("adapters",), closed=True)
_OPENAI_MODELS = _obj({
    "object": {"type": "string", "const": "list"},
    "data": _array(_obj({"id": _STR, "object": {"type": "string", "const": "model"},
                         "created": _INT, "owned_by": _STR, "root": _STR,
                         "parent": {"type": ["string", "null"]}},
                        ("id", "object", "created", "owned_by", "root", "parent"), closed=True)),
}, ("object", "data"), closed=True)
_SM_VALIDATION = _obj({"Message": _STR}, ("Message",), closed=True)
_SM_MODEL_ERROR = _obj({"ErrorCode": {"type": "string", "enum": ["CLIENT_ERROR_FROM_MODEL",
                                                                 "SERVER_ERROR_FROM_MODEL"]},
                        "OriginalStatusCode": _INT, "OriginalMessage": _STR, "Message": _STR,
                        "LogStreamArn": _STR},
                       ("ErrorCode", "OriginalStatusCode", "OriginalMessage", "Message",
                        "LogStreamArn"), closed=True)

SCHEMAS: dict[str, Schema] = {
    "Error": _ERROR, "TgiError": _TGI_ERROR, "Status": _STATUS,
    "ModelHealth": _HEALTH, "Ping": _PING, "Worker": _WORKER,
    "ModelDescription": _MODEL_DESCRIPTION, "ModelList": _MODEL_LIST,
    "Adapter": _ADAPTER, "AdapterList": _ADAPTER_LIST,
    "LmiRequest": _LMI_REQUEST, "LmiToken": _LMI_TOKEN, "LmiDetails": _LMI_DETAILS,
    "LmiGeneration": _LMI_GENERATION, "LmiStreamLine": _LMI_STREAM_LINE,
    "LmiStreamItem": _LMI_STREAM_ITEM,
    "TgiRequest": _TGI_REQUEST, "TgiToken": _TGI_TOKEN, "TgiPrefillToken": _TGI_PREFILL_TOKEN,
    "TgiDetails": _TGI_DETAILS, "TgiGeneration": _TGI_GENERATION,
    "TgiStreamEvent": _TGI_STREAM_EVENT,
    "CompletionRequest": _COMPLETION_REQUEST, "ChatCompletionRequest": _CHAT_REQUEST,
    "Completion": _COMPLETION, "CompletionChunk": _COMPLETION_CHUNK,
    "ChatCompletion": _CHAT, "ChatCompletionChunk": _CHAT_CHUNK,
    "Usage": _USAGE, "StreamError": _STREAM_ERROR, "OpenAIModelList": _OPENAI_MODELS,
    "SageMakerValidationError": _SM_VALIDATION, "SageMakerModelError": _SM_MODEL_ERROR,
}


# ---- responses -------------------------------------------------------------------------------

_REQUEST_ID = {"x-request-id": {
    "description": "the request's id: X-Amzn-SageMaker-Inference-Id or X-Request-Id when the "
                   "client sent one, else a new one", "required": True, "schema": _STR}}
_RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": _STR}}
_ERROR_TYPE = {"x-amzn-ErrorType": {"description": "the runtime API's error shape",
                                    "required": True, "schema": _STR}}

_ERROR_TEXT = {
    400: "a request value the client can fix (ValidationError names the field) or a bad "
         "request",
    403: "a management call from a client outside LMC_MANAGEMENT_ALLOW, or a directory outside "
         "LMC_ALLOWED_URLS",
    404: "unknown model or adapter",
    408: "the body did not arrive in full within LMC_BODY_TIMEOUT",
    409: "already registered",
    413: "the body is larger than the maximum request size",
    424: "the handler failed (ModelError)",
    500: "a worker died, or an internal error",
    503: "loading, queue full or shutting down; retry after Retry-After",
    504: "no answer within option.predict_timeout",
    507: "out of memory, or no free adapter slot",
}

# Every route: 503 while the server drains after SIGTERM, 500 for a bug of ours.
_ALWAYS = (500, 503)
_INFERENCE = (400, 404, 408, 409, 413, 424, 500, 503, 504, 507)
_MANAGEMENT = (403, 500, 503)
# TGI's statuses for our errors (engines/contracts/errors._TGI_ERRORS): 422 validation, 429
# overloaded; those without a TGI error_type keep their code (403: LoRAX's adapter_source=local
# names a directory outside the allowed ones).
_TGI_CODES = (403, 404, 408, 409, 413, 422, 424, 429, 500, 504, 507)


def _content(*pairs: tuple[str, Schema | None]) -> dict:
    return {mt: ({"schema": s} if s is not None else {}) for mt, s in pairs}


def _response(description: str, *pairs: tuple[str, Schema | None],
              headers: dict | None = None) -> dict:
    out: dict = {"description": description, "headers": {**_REQUEST_ID, **(headers or {})}}
    if pairs:
        out["content"] = _content(*pairs)
    return out


def _errors(*codes: int) -> dict[str, dict]:
    return {str(c): {"$ref": f"#/components/responses/Error{c}"} for c in codes}


RESPONSES = {
    f"Error{code}": _response(text, (JSON, _ref("Error")),
                              headers=_RETRY_AFTER if code == 503 else None)
    for code, text in _ERROR_TEXT.items()
}


def _sse(data: Schema, *, done: bool) -> Schema:
    """One server-sent event whose data is a JSON value (schemathesis validates it), or the
    final `[DONE]`."""
    json_data = {"type": "string", "contentMediaType": JSON, "contentSchema": data}
    if done:
        json_data = {"type": "string", "if": {"const": "[DONE]"}, "else": json_data}
    return _obj({"data": json_data, "event": _STR}, ("data",))


_ANY_SSE = _obj({"data": _STR, "event": _STR}, ("data",))


def _jsonlines(line: str) -> Schema:
    """JSON lines (OpenAPI 3.1 has no schema for a sequence): the body as text, and what each
    line is under x-line-schema (tests/test_fuzz.py checks every line against it)."""
    return {"type": "string",
            "description": f"one JSON value per line, each a {line} "
                           f"(#/components/schemas/{line})", "x-line-schema": _ref(line)}


# ---- parameters ------------------------------------------------------------------------------

def _path(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": _STR,
            "description": description}


def _query(name: str, schema: Schema, description: str, *, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema,
            "description": description}


def _header(name: str, description: str) -> dict:
    return {"name": name, "in": "header", "required": False, "schema": _STR,
            "description": description}


_MODEL = _path("model", "a registered model's name")
_ADAPTER_NAME = _path("adapter", "a registered adapter's name")
_BOOL_QUERY = {"type": "string", "enum": ["true", "false"]}
_COUNT = {"type": "integer", "minimum": 0}
_ADAPTER_QUERY = _query("adapter", _STR, "the LoRA adapter to use (\"\": the base model)")
_TARGET_MODEL = _header("X-Amzn-SageMaker-Target-Model", "the model, when several are served")
_ADAPTER_HEADER = _header("X-Amzn-SageMaker-Adapter-Identifier", "the LoRA adapter to use")


# ---- operations ------------------------------------------------------------------------------

_LMI_BODY = {"required": True, "content": {
    JSON: {"schema": {"anyOf": [_ref("LmiRequest"), _ref("ChatCompletionRequest")]}},
    TEXT: {"schema": _NONEMPTY},
}, "description": "LMI's {\"inputs\", \"parameters\"}, a chat request (\"messages\"), or "
                  "text/plain: the prompt itself. A custom model.py reads the body itself."}

_LMI_OK = _response(
    "the generation: an object, a list for a list of inputs, a chat.completion for a chat "
    "request; streamed as JSON lines (or SSE or text, by option.output_formatter)",
    (JSON, {"anyOf": [_ref("LmiGeneration"), _ref("ChatCompletion"),
                      _array({"anyOf": [_ref("LmiGeneration"), _ref("ChatCompletion")]})]}),
    (JSONLINES, _jsonlines("LmiStreamItem")),
    (EVENT_STREAM, _ANY_SSE),
    (TEXT, _STR))


def _lmi_operation(op_id: str, summary: str, params: list[dict]) -> dict:
    return {"operationId": op_id, "summary": summary, "tags": ["inference"],
            "parameters": params + [_ADAPTER_QUERY, _ADAPTER_HEADER],
            "requestBody": _LMI_BODY,
            "responses": {"200": _LMI_OK, **_errors(*_INFERENCE)}}


def _openai_operation(op_id: str, summary: str, request: str, body: str, chunk: str) -> dict:
    return {"operationId": op_id, "summary": summary, "tags": ["openai"],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
            "responses": {
                "200": _response(f"a {body}, or with stream=true its chunks as SSE",
                                 (JSON, _ref(body)),
                                 (EVENT_STREAM, _sse(_ref(chunk), done=True))),
                **_errors(400, 404, 408, 409, 413, 424, 500, 503, 504, 507)}}


def _tgi_responses(ok: dict) -> dict:
    out = {"200": ok}
    for code in _TGI_CODES:
        schema = _ref("TgiError")
        if code == 500:  # also our own error shape: an internal error of the front end
            schema = {"anyOf": [_ref("TgiError"), _ref("Error")]}
        out[str(code)] = _response("an error in TGI's shape: 422 validation, 429 overloaded "
                                   "(Retry-After), 424/500/507 generation",
                                   (JSON, schema), headers=_RETRY_AFTER if code == 429 else None)
    out["503"] = {"$ref": "#/components/responses/Error503"}
    return out


def _tgi_operation(op_id: str, summary: str, ok: dict) -> dict:
    return {"operationId": op_id, "summary": summary, "tags": ["tgi"],
            "parameters": [_query("model_name", _STR, "the model, when several are served"),
                           _TARGET_MODEL],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("TgiRequest")}}},
            "responses": _tgi_responses(ok)}


_TGI_STREAM = (EVENT_STREAM, _sse(_ref("TgiStreamEvent"), done=False))


def _sagemaker_operation(op_id: str, summary: str, *, stream: bool) -> dict:
    params = [_path("name", "the endpoint: a model name, or any name when one model is served"),
              _TARGET_MODEL,
              _header("X-Amzn-SageMaker-Inference-Component",
                      "an adapter's name selects that LoRA adapter; the model's, the base model"),
              _header("X-Amzn-SageMaker-Custom-Attributes", "passed to the handler and back")]
    if stream:
        params.append(_header("X-Amzn-SageMaker-Accept", "the Accept the model sees"))
        ok = _response("AWS event-stream messages: one PayloadPart per chunk the model produced;"
                       " a failure mid-stream is a ModelStreamError message",
                       (EVENT_STREAM_AWS, None),
                       headers={"X-Amzn-SageMaker-Content-Type": {
                           "description": "the model's content type", "required": True,
                           "schema": _STR}})
    else:
        ok = _response("the model's answer, as /invocations gives it (a stream buffered)")
        ok["content"] = _LMI_OK["content"]
    return {"operationId": op_id, "summary": summary, "tags": ["sagemaker"],
            "parameters": params, "requestBody": _LMI_BODY,
            "responses": {
                "200": ok,
                "400": _response("ValidationError: the platform's own refusal (unknown target "
                                 "model or inference component)",
                                 (JSON, _ref("SageMakerValidationError")), headers=_ERROR_TYPE),
                "424": _response("ModelError: the model answered non-2xx (its status and body "
                                 "in OriginalStatusCode and OriginalMessage)",
                                 (JSON, _ref("SageMakerModelError")), headers=_ERROR_TYPE),
                **_errors(*_ALWAYS)}}


def _management(op: dict) -> dict:
    op = {"tags": ["management"], **op}
    op["responses"] = {**op["responses"], **_errors(*_MANAGEMENT)}
    return op


def _adapter_operations(prefix: str, model_params: list[dict], where: str) -> dict[str, dict]:
    ok_status = _response("done", (JSON, _ref("Status")))
    # Without /models/{model}: the only model; several models served is a 400, none a 503.
    missing = (400, 404)
    return {
        prefix: {
            "get": _management({
                "operationId": f"listAdapters{where}", "summary": "list LoRA adapters",
                "parameters": model_params + [
                    _query("limit", {"type": "integer", "minimum": 1}, "page size (100)"),
                    _query("next_page_token", _COUNT, "from a previous page's nextPageToken")],
                "responses": {"200": _response("a page of adapters",
                                               (JSON, _ref("AdapterList"))),
                              **_errors(*missing)}}),
            "post": _management({
                "operationId": f"registerAdapter{where}", "summary": "register a LoRA adapter",
                "parameters": model_params + [
                    _query("name", _NONEMPTY, "the adapter's name", required=True),
                    _query("src", _NONEMPTY, "a local directory (under the model directory or "
                           "LMC_ALLOWED_URLS), an s3:// prefix or a hub id in the local cache",
                           required=True),
                    _query("preload", _BOOL_QUERY, "load it on every worker now (true)"),
                    _query("pin", _BOOL_QUERY, "keep it in a device slot for good (false)")],
                "responses": {"200": ok_status,
                              **_errors(*missing, 409, 424, 507)}}),
        },
        prefix + "/{adapter}": {
            "get": _management({
                "operationId": f"describeAdapter{where}", "summary": "describe a LoRA adapter",
                "parameters": model_params + [_ADAPTER_NAME],
                "responses": {"200": _response("the adapter (a list of one, as DJL answers)",
                                               (JSON, _array(_ref("Adapter")))),
                              **_errors(*missing)}}),
            "delete": _management({
                "operationId": f"unregisterAdapter{where}",
                "summary": "unregister a LoRA adapter",
                "parameters": model_params + [_ADAPTER_NAME],
                "responses": {"200": ok_status, **_errors(*missing)}}),
        },
        prefix + "/{adapter}/update": {
            "post": _management({
                "operationId": f"updateAdapter{where}", "summary": "update a LoRA adapter",
                "parameters": model_params + [
                    _ADAPTER_NAME,
                    _query("src", _NONEMPTY, "a new source"),
                    _query("preload", _BOOL_QUERY, "preload"),
                    _query("pin", _BOOL_QUERY, "pin")],
                "responses": {"200": ok_status, **_errors(*missing, 409, 424, 507)}}),
        },
    }


def _vllm_operation(op_id: str, summary: str, props: dict[str, Schema]) -> dict:
    return _management({
        "operationId": op_id, "summary": summary, "tags": ["management", "openai"],
        "requestBody": {"required": True, "content": {JSON: {"schema": _obj(
            props, tuple(props))}}},
        "responses": {"200": _response("done", (TEXT, _STR)),
                      **_errors(400, 404, 409, 424, 507)}})


def _paths() -> dict[str, dict]:
    status = _response("done", (JSON, _ref("Status")))
    paths: dict[str, dict] = {
        "/ping": {"get": {
            "operationId": "ping", "summary": "health: every model's status", "tags": ["health"],
            "responses": {
                "200": _response("every model is ready", (JSON, _ref("Ping"))),
                "500": _response("a model FAILED (with the reason)", (JSON, _ref("Ping"))),
                "503": _response("starting or loading", (JSON, _ref("Ping")))}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics (container/metrics.py)",
            "tags": ["health"],
            "responses": {"200": _response("the Prometheus text exposition format 0.0.4",
                                           (TEXT, _STR)),
                          "404": _response("metrics are off (LMC_METRICS=false)",
                                           (JSON, _ref("Error"))),
                          **_errors(*_ALWAYS)}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "this document", "tags": ["health"],
            "responses": {"200": _response("the OpenAPI document", (JSON, {"type": "object"})),
                          **_errors(*_ALWAYS)}}},
        "/invocations": {"post": _lmi_operation(
            "invocations", "run the model (SageMaker's inference route)",
            [_query("model_name", _STR, "the model, when several are served"), _TARGET_MODEL,
             _header("X-Model-Name", "the model, when several are served")])},
        "/predictions/{model}": {"post": _lmi_operation(
            "predictions", "run a named model", [_MODEL])},
        "/predictions/{model}/{version}": {"post": _lmi_operation(
            "predictionsVersion", "run a named model (the version is ignored)",
            [_MODEL, _path("version", "ignored")])},
        "/models/{model}/invoke": {"post": _lmi_operation(
            "invokeModel", "run a named model (DJL's route)", [_MODEL])},
        "/models": {
            "get": _management({
                "operationId": "listModels", "summary": "list the models",
                "responses": {"200": _response("the models", (JSON, _ref("ModelList")))}}),
            "post": _management({
                "operationId": "registerModel", "summary": "register a model from a local "
                                                           "directory under LMC_ALLOWED_URLS",
                "parameters": [
                    _query("url", _NONEMPTY, "the model directory (file:// allowed)",
                           required=True),
                    _query("model_name", _STR, "default: the directory's name"),
                    *(_query(q, _COUNT, q) for q in (
                        "batch_size", "max_batch_delay", "max_idle_time", "min_worker",
                        "max_worker", "job_queue_size")),
                    _query("engine", _STR, "the engine (option.engine)"),
                    _query("synchronous", _STR, "false: answer 202 at once (default true)")],
                "responses": {"200": status,
                              "202": _response("registration scheduled", (JSON, _ref("Status"))),
                              **_errors(400, 409, 424)}}),
        },
        "/models/{model}": {
            "get": _management({
                "operationId": "describeModel", "summary": "describe a model",
                "parameters": [_MODEL],
                "responses": {"200": _response("the model (a list of one, as DJL answers)",
                                               (JSON, _array(_ref("ModelDescription")))),
                              **_errors(404)}}),
            "put": _management({
                "operationId": "scaleModel", "summary": "scale a model's workers",
                "parameters": [_MODEL, _query("min_worker", _COUNT, "min workers"),
                               _query("max_worker", {"type": "integer", "minimum": 1},
                                      "max workers")],
                "responses": {"200": status, **_errors(400, 404)}}),
            "delete": _management({
                "operationId": "unregisterModel", "summary": "unregister a model",
                "parameters": [_MODEL],
                "responses": {"200": status, **_errors(404)}}),
        },
        **_adapter_operations("/models/{model}/adapters", [_MODEL], ""),
        **_adapter_operations("/adapters", [], "OfTheModel"),
        "/v1/load_lora_adapter": {"post": _vllm_operation(
            "vllmLoadLoraAdapter", "register a LoRA adapter on the only model (vLLM's route)",
            {"lora_name": _NONEMPTY, "lora_path": _NONEMPTY})},
        "/v1/unload_lora_adapter": {"post": _vllm_operation(
            "vllmUnloadLoraAdapter", "unregister a LoRA adapter (vLLM's route)",
            {"lora_name": _NONEMPTY})},
        "/v1/models": {"get": {
            "operationId": "openaiModels", "summary": "models and their LoRA adapters",
            "tags": ["openai"],
            "responses": {"200": _response("the list", (JSON, _ref("OpenAIModelList"))),
                          **_errors(*_ALWAYS)}}},
        "/v1/completions": {"post": _openai_operation(
            "openaiCompletions", "OpenAI completions", "CompletionRequest", "Completion",
            "CompletionChunk")},
        "/v1/chat/completions": {"post": _openai_operation(
            "openaiChatCompletions", "OpenAI chat completions", "ChatCompletionRequest",
            "ChatCompletion", "ChatCompletionChunk")},
        "/generate": {"post": _tgi_operation(
            "tgiGenerate", "TGI generate (never streams)",
            _response("the generation", (JSON, _ref("TgiGeneration"))))},
        "/generate_stream": {"post": _tgi_operation(
            "tgiGenerateStream", "TGI generate_stream: one SSE event per token",
            _response("the tokens as server-sent events", _TGI_STREAM))},
        "/": {"post": _tgi_operation(
            "tgiCompat", "TGI's compat route: a list, or SSE with stream=true",
            _response("the generation in a list, or its tokens as SSE",
                      (JSON, _array(_ref("TgiGeneration"))), _TGI_STREAM))},
        "/endpoints/{name}/invocations": {"post": _sagemaker_operation(
            "invokeEndpoint", "SageMaker runtime InvokeEndpoint", stream=False)},
        "/endpoints/{name}/invocations-response-stream": {"post": _sagemaker_operation(
            "invokeEndpointWithResponseStream",
            "SageMaker runtime InvokeEndpointWithResponseStream", stream=True)},
    }
    for path_item in paths.values():  # every operation: 500 and 503 may answer it
        for op in path_item.values():
            for code, ref in _errors(*_ALWAYS).items():
                op["responses"].setdefault(code, ref)
    return paths


def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LMC",
            "version": "0.1.0",
            "description": "LMC's HTTP API: SageMaker/LMI inference, DJL Serving's management "
                           "API, OpenAI, TGI and the SageMaker runtime API. Errors are "
                           "{\"code\", \"type\", \"message\"} (plus \"field\") everywhere but "
                           "the TGI routes (TGI's shape) and /endpoints/* (the runtime API's). "
                           "Management routes answer only LMC_MANAGEMENT_ALLOW clients.",
        },
        "paths": _paths(),
        "components": {"schemas": SCHEMAS, "responses": RESPONSES},
    }


_BODY: bytes | None = None


async def serve(request: web.Request) -> web.Response:
    """GET /openapi.json"""
    global _BODY
    if _BODY is None:
        _BODY = json.dumps(document()).encode()
    return web.Response(body=_BODY, content_type=JSON)
