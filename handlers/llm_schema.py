"""Request parsing and validation for the default LLM handler: one `LLMRequest` per HTTP request,
whatever API it came through (LMI, OpenAI completions/chat, TGI).

Every check a user can fail raises `ValidationError(field, message)` before anything reaches the
engine, so a bad request costs a fast 400 that names the field and the limit.

Request-level parameters (handled here and by the handler, not by the engine):
  return_full_text  prepend the prompt to generated_text (non-streamed text and the final line)
  details           add `details` (finish reason, tokens with log-probs) to the response
  n / best_of       run best_of samples per prompt, return the n with the highest cumulative
                    log-prob. n > 1 or best_of > 1 needs do_sample=true on the LMI and TGI
                    routes (greedy would return n identical sequences; TGI refuses the same);
                    each sample gets seed + k so a seeded request still gives n different texts.
  truncate          keep only the last `truncate` prompt tokens (the engine gets token ids)
Everything else under `parameters` is an engine SamplingParams key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Protocol

from engines.contracts.names import API_PROPERTY
from engines.types import (ACCEPTED_PARAMETERS, MAX_SAMPLES, MAX_TOP_N_TOKENS, SamplingParams, ValidationError,
                           check_int)


class Api(str, Enum):
    """Which wire API a request came through; the front end says so in property X-LMC-API."""

    LMI = "lmi"  # /invocations and friends: no X-LMC-API property
    OPENAI_COMPLETIONS = "openai.completions"
    OPENAI_CHAT = "openai.chat"
    TGI_GENERATE = "tgi.generate"  # never streamed
    TGI_GENERATE_STREAM = "tgi.generate_stream"  # always streamed
    TGI = "tgi"  # POST / : "stream" in the body decides

    @property
    def is_openai(self) -> bool:
        return self in (Api.OPENAI_COMPLETIONS, Api.OPENAI_CHAT)

    @property
    def is_tgi(self) -> bool:
        return self in (Api.TGI, Api.TGI_GENERATE, Api.TGI_GENERATE_STREAM)


HANDLER_PARAMETERS = frozenset({"return_full_text", "details", "n", "best_of", "truncate"})
LMI_PARAMETERS = HANDLER_PARAMETERS | ACCEPTED_PARAMETERS
LMI_REQUEST_KEYS = ("inputs", "parameters", "stream", "adapters")
# LoRAX's adapter sources (parameters.adapter_source); the front end fetches local and s3 ones.
ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")
MERGE_STRATEGIES = ("linear",)


class Tokenizing(Protocol):
    """The part of the engine that validation needs."""

    max_context: int

    def encode(self, prompt: str) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One validated request. `prompts[i]` is what the client sent (for return_full_text/echo);
    `engine_prompts[i]` is what the engine gets: its token ids (after truncation), tokenized here
    once; engines take ids and never encode the prompt again."""

    api: Api
    prompts: list[str]
    engine_prompts: list[list[int]]
    prompt_tokens: list[int]
    params: SamplingParams
    stream: bool = False
    is_list: bool = False  # the client sent a list: answer with a list
    chat: bool = False  # the prompt came from chat messages: answer as chat.completion
    n: int = 1
    best_of: int = 1
    return_full_text: bool = False
    details: bool = False
    # TGI routes: LoRAX's return_k_alternatives (alternative_tokens on each token); 0: not asked
    alternatives: int = 0
    # OpenAI only
    model: str | None = None
    logprobs: int | None = None  # None: not asked; else how many top alternatives per token
    echo: bool = False
    include_usage: bool = False
    # LoRA: the adapter of each prompt by name ("" / None: the base model); () when the body
    # names none (the handler then looks at the adapter header and ?adapter=).
    adapters: tuple[str | None, ...] = ()
    # LoRAX's merged_adapters: (adapter names, weights), merged linearly for this request.
    merge: tuple[tuple[str, ...], tuple[float, ...]] | None = None

    def sample_params(self) -> list[SamplingParams]:
        """The params of the best_of engine requests of one prompt: seed + k per sample, so a
        seeded request does not return best_of copies of one text."""
        if self.best_of == 1 or self.params.seed is None:
            return [self.params] * self.best_of
        return [replace(self.params, seed=self.params.seed + k) for k in range(self.best_of)]


# ---- entry point -----------------------------------------------------------------------------


def parse_request(payload: Any, api: Api, engine: Tokenizing) -> LLMRequest:
    if not isinstance(payload, dict):
        raise ValidationError(
            "body",
            f'the request body must be a JSON object like {{"inputs": "text"}}, '
            f"got {type(payload).__name__}",
        )
    if api is Api.OPENAI_COMPLETIONS:
        return _parse_openai(payload, engine, chat=False, api=api)
    if api is Api.OPENAI_CHAT or (api is Api.LMI and "messages" in payload):
        # LMI routes a body with "messages" on /invocations to its chat-completions schema.
        return _parse_openai(payload, engine, chat=True, api=api)
    return _parse_lmi(payload, api, engine)


# ---- LMI and TGI -----------------------------------------------------------------------------

# TGI's parameter names that differ from LMI's.
_TGI_RENAMES = {"stop": "stop_sequences"}
# Parameters TGI's and LoRAX's clients send on every request, accepted only at the value that
# changes nothing (null, or false): anything else would be silently ignored, so it is refused
# by name instead, saying why.
_TGI_OFF_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "watermark": ((False,), "watermarking is not supported"),
    "grammar": ((), "grammar-constrained generation is not supported yet"),
    "response_format": ((), "structured output (response_format) is not supported yet"),
    "api_token": ((), "api_token is for downloading adapters from a hub, which this server "
                      "does not do (adapters come from the model dir, a local path, s3:// or "
                      "the local Hugging Face cache)"),
}


@dataclass(frozen=True, slots=True)
class _TgiAdapter:
    name: str | None = None
    merge: tuple[tuple[str, ...], tuple[float, ...]] | None = None


def _tgi_adapter(parameters: dict[str, Any]) -> _TgiAdapter:
    """LoRAX's adapter_id / adapter_source / merged_adapters (popped from `parameters`)."""
    adapter_id = parameters.pop("adapter_id", None)
    source = parameters.pop("adapter_source", None)
    merged = parameters.pop("merged_adapters", None)
    if adapter_id is not None and not isinstance(adapter_id, str):
        raise ValidationError("adapter_id", f"adapter_id must be a string, got {adapter_id!r}")
    if source is not None and source not in ADAPTER_SOURCES:
        raise ValidationError("adapter_source", f"adapter_source must be one of "
                              f"{', '.join(ADAPTER_SOURCES)}, got {source!r}")
    if merged is None:
        return _TgiAdapter(adapter_id or None)
    if adapter_id:
        raise ValidationError("merged_adapters", "send adapter_id or merged_adapters, not both")
    if not isinstance(merged, dict):
        raise ValidationError("merged_adapters", "merged_adapters must be an object with ids, "
                                                 "weights and merge_strategy")
    unknown = sorted(set(merged) - {"ids", "weights", "merge_strategy", "density",
                                    "majority_sign_method"})
    if unknown:
        raise ValidationError(f"merged_adapters.{unknown[0]}", f"unknown merged_adapters field "
                              f"{unknown[0]!r}; accepted: ids, weights, merge_strategy")
    strategy = merged.get("merge_strategy") or "linear"
    if strategy not in MERGE_STRATEGIES:
        raise ValidationError("merged_adapters.merge_strategy", f"merge_strategy={strategy!r} "
                              f"is not supported; supported: {', '.join(MERGE_STRATEGIES)}")
    for name in ("density", "majority_sign_method"):
        if merged.get(name) not in (None, 1, 1.0, "total"):
            raise ValidationError(f"merged_adapters.{name}", f"{name} applies to the ties/dare "
                                  f"merge strategies; linear merges do not use it")
    ids = merged.get("ids")
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(i, str) and i for i in ids)):
        raise ValidationError("merged_adapters.ids", "merged_adapters.ids must be a non-empty "
                                                     "list of adapter names")
    weights = merged.get("weights")
    if weights is None:
        weights = [1.0 / len(ids)] * len(ids)
    if (not isinstance(weights, list) or len(weights) != len(ids)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                       for w in weights)):
        raise ValidationError("merged_adapters.weights", f"merged_adapters.weights must be a "
                              f"list of {len(ids)} numbers, one per id")
    return _TgiAdapter(None, (tuple(ids), tuple(float(w) for w in weights)))


def _parse_adapters(value: Any, prompts: int, is_list: bool) -> tuple[str | None, ...]:
    """LMI's top-level "adapters": one name for every input, or a list with one per input."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value or None,) * prompts
    if isinstance(value, list) and is_list and len(value) == prompts and all(
            isinstance(v, str) for v in value):
        return tuple(v or None for v in value)
    want = (f"a string or a list of {prompts} strings (one per input)" if is_list
            else "a string")
    raise ValidationError("adapters", f"adapters must be {want}, got {value!r}")


def _tgi_parameters(parameters: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """TGI/LoRAX parameters as LMI's; also LoRAX's return_k_alternatives (0: not asked)."""
    for name, (off, why) in _TGI_OFF_VALUES.items():
        value = parameters.pop(name, None)
        if value is not None and value not in off:
            raise ValidationError(name, f"{name}={value!r}: {why}; omit it or send null")
    for tgi_name, ours in _TGI_RENAMES.items():
        if tgi_name in parameters:
            parameters[ours] = parameters.pop(tgi_name)
    k = parameters.pop("return_k_alternatives", None)
    if k is None:
        return parameters, 0
    _check_range("return_k_alternatives", k, 1, MAX_TOP_N_TOKENS)
    top_n = parameters.get("top_n_tokens")
    if top_n is not None and top_n != k:
        raise ValidationError("return_k_alternatives", f"return_k_alternatives={k} and "
                              f"top_n_tokens={top_n} disagree; send one of them")
    parameters["top_n_tokens"] = k
    return parameters, k


def _drop_nulls(values: dict[str, Any]) -> dict[str, Any]:
    """A value sent as JSON null means "not set", as in TGI, LoRAX, vLLM and LMI."""
    return {k: v for k, v in values.items() if v is not None}


def _parse_lmi(payload: dict[str, Any], api: Api, engine: Tokenizing) -> LLMRequest:
    unknown = sorted(set(payload) - set(LMI_REQUEST_KEYS))
    if unknown:
        raise ValidationError(
            unknown[0],
            f"unknown request field(s) {_names(unknown)}; accepted fields: "
            f"{', '.join(LMI_REQUEST_KEYS)} (generation options go under 'parameters'; chat "
            "requests send 'messages')",
        )
    stream = _parse_stream(payload.get("stream"), api)
    prompts, is_list = _parse_inputs(payload.get("inputs"), allow_list=not api.is_tgi)
    parameters = payload.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping):
        raise ValidationError(
            "parameters", f"parameters must be a JSON object, got {type(parameters).__name__}"
        )
    parameters = dict(parameters)
    alternatives = 0
    adapters = _parse_adapters(payload.get("adapters"), len(prompts), is_list)
    merge = None
    if api.is_tgi:
        tgi_adapter = _tgi_adapter(parameters)
        parameters, alternatives = _tgi_parameters(parameters)
        if tgi_adapter.name is not None:
            adapters = (tgi_adapter.name,)
        merge = tgi_adapter.merge

    unknown = sorted(set(parameters) - LMI_PARAMETERS)
    if unknown:
        raise ValidationError(
            unknown[0],
            f"unknown parameter(s) {_names(unknown)}; accepted parameters: "
            + ", ".join(sorted(LMI_PARAMETERS)),
        )
    parameters = _drop_nulls(parameters)
    own = {k: parameters.pop(k) for k in HANDLER_PARAMETERS if k in parameters}
    params = SamplingParams.from_request(parameters)
    return_full_text = _bool(own, "return_full_text", False)
    details = _bool(own, "details", False)
    n = _int(own, "n", 1, minimum=1)
    best_of = _int(own, "best_of", n, minimum=1)
    _check_samples(n, best_of, params, stream=stream, greedy_ok=False)
    if stream and (is_list or n > 1):
        raise ValidationError(
            "stream" if is_list else "n",
            "stream=true needs one string input and n=1 (one stream carries one sequence); "
            "send a list or n > 1 without streaming",
        )
    truncate = own.get("truncate")
    return _finish(
        engine, api, prompts, params, truncate=truncate,
        stream=stream, is_list=is_list, n=n, best_of=best_of,
        return_full_text=return_full_text, details=details, alternatives=alternatives,
        adapters=adapters, merge=merge,
    )


def _parse_stream(value: Any, api: Api) -> bool:
    if api is Api.TGI_GENERATE:
        if value:
            raise ValidationError("stream", "/generate never streams; use /generate_stream")
        return False
    if api is Api.TGI_GENERATE_STREAM:
        return True
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError("stream", f"stream must be true or false, got {value!r}")
    return value


def _parse_inputs(value: Any, *, allow_list: bool) -> tuple[list[str], bool]:
    """(prompts, whether the client sent a list)."""
    if isinstance(value, str):
        if not value:
            raise ValidationError("inputs", "inputs must be a non-empty string")
        return [value], False
    if isinstance(value, list) and allow_list:
        if not value:
            raise ValidationError("inputs", "inputs must be a non-empty list of strings")
        for i, prompt in enumerate(value):
            if not isinstance(prompt, str) or not prompt:
                raise ValidationError(
                    f"inputs[{i}]", f"inputs[{i}] must be a non-empty string, got {prompt!r}"
                )
        return list(value), True
    if value is None:
        raise ValidationError("inputs", 'the request has no "inputs"; send {"inputs": "text"}')
    kinds = "a string or a list of strings" if allow_list else "a string"
    raise ValidationError("inputs", f"inputs must be {kinds}, got {type(value).__name__}")


# ---- OpenAI ----------------------------------------------------------------------------------

# What each OpenAI field becomes. Fields in _OPENAI_HARMLESS are accepted and ignored, but only
# at the value that changes nothing; every other field the API defines (tools, response_format
# json, logit_bias with entries, suffix, ...) is refused by name rather than silently dropped.
#
#   field                     completions  chat   becomes
#   model                     yes          yes    echoed back as "model"
#   prompt                    yes          -      the prompt(s): string or list of strings
#   messages                  -            yes    tokenizer chat template -> prompt
#   max_tokens                yes (16)     yes    max_new_tokens (chat default: rest of context)
#   max_completion_tokens     -            yes    max_new_tokens
#   temperature (1.0)         yes          yes    > 0: do_sample + temperature; 0: greedy
#   top_p, seed               yes          yes    same name
#   presence/frequency_penalty yes         yes    same name
#   n, best_of                yes / n only        samples per prompt (best_of: completions only)
#   stop                      yes          yes    stop_sequences (string or list)
#   stream, stream_options    yes          yes    stream; include_usage adds a usage chunk
#   logprobs                  int 0..20    bool   per-token log-probs (+ top alternatives)
#   top_logprobs              -            0..20  alternatives per token (needs logprobs)
#   echo                      yes          -      prepend the prompt to the text
#   user                      yes          yes    ignored
#   top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids: vLLM extensions
_OPENAI_FIELDS_COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
    "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "user",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
})
OPENAI_COMPLETION_FIELDS = _OPENAI_FIELDS_COMMON | {"prompt", "echo", "best_of"}
OPENAI_CHAT_FIELDS = _OPENAI_FIELDS_COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
_OPENAI_HARMLESS: dict[str, Any] = {
    # field: predicate on the value that makes it a no-op
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": lambda v: not v,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,
    "store": lambda v: not v,
    "metadata": lambda v: True,
    "service_tier": lambda v: True,
}
_OPENAI_EXTENSIONS = {
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens", "ignore_eos": "ignore_eos_token",
    "stop_token_ids": "stop_token_ids",
}
MAX_OPENAI_LOGPROBS = 20
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def _parse_openai(payload: dict[str, Any], engine: Tokenizing, *, chat: bool,
                  api: Api) -> LLMRequest:
    accepted = OPENAI_CHAT_FIELDS if chat else OPENAI_COMPLETION_FIELDS
    unknown = sorted(set(payload) - accepted - set(_OPENAI_HARMLESS))
    if unknown:
        raise ValidationError(
            unknown[0],
            f"unknown field(s) {_names(unknown)}; accepted fields: {', '.join(sorted(accepted))}",
        )
    body = _drop_nulls(payload)
    for name, harmless in _OPENAI_HARMLESS.items():
        if name in body:
            value = body.pop(name)
            if not harmless(value):
                raise ValidationError(
                    name, f"{name}={value!r} is not supported by this server; omit it")

    if chat:
        prompts, is_list = [_render_chat(body.get("messages"), engine)], False
    else:
        prompts, is_list = _parse_prompt(body.get("prompt"))

    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ValidationError("stream", f"stream must be true or false, got {stream!r}")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ValidationError("stream_options", "stream_options must be an object")
        include_usage = bool(options.get("include_usage", False))

    values: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None and not chat:
        max_tokens = _COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is not None:
        values["max_new_tokens"] = max_tokens
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    # OpenAI's default temperature 1.0 means sampling; only 0 is greedy.
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        values["do_sample"] = temperature > 0
    values["temperature"] = temperature
    for name in ("top_p", "seed", "presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            values[name] = body[name]
    for name, ours in _OPENAI_EXTENSIONS.items():
        if body.get(name) is not None:
            values[ours] = body[name]
    stop = body.get("stop")
    if stop is not None:
        values["stop_sequences"] = stop

    logprobs: int | None = None
    raw_logprobs = body.get("logprobs")
    if chat:
        if raw_logprobs is not None and not isinstance(raw_logprobs, bool):
            raise ValidationError("logprobs", "logprobs must be true or false for chat")
        top = body.get("top_logprobs")
        if top is not None:
            _check_range("top_logprobs", top, 0, MAX_OPENAI_LOGPROBS)
            if not raw_logprobs:
                raise ValidationError("top_logprobs", "top_logprobs needs logprobs=true")
        if raw_logprobs:
            logprobs = top or 0
    elif raw_logprobs is not None:
        _check_range("logprobs", raw_logprobs, 0, MAX_OPENAI_LOGPROBS)
        logprobs = raw_logprobs
    if logprobs:
        values["top_n_tokens"] = logprobs
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ValidationError("echo", f"echo must be true or false, got {echo!r}")
    if echo and logprobs is not None:
        values["decoder_input_details"] = True  # echo + logprobs reports the prompt's too

    n = _int(body, "n", 1, minimum=1)
    best_of = _int(body, "best_of", n, minimum=1)
    model = body.get("model")
    try:
        params = SamplingParams.from_request(_check_stop(values))
    except ValidationError as exc:
        raise _openai_field(exc) from None
    # OpenAI returns n identical choices at temperature 0 rather than refusing; so do we.
    _check_samples(n, best_of, params, stream=stream, greedy_ok=True)
    return _finish(
        engine, api, prompts, params, truncate=None, stream=stream, is_list=is_list,
        chat=chat, n=n, best_of=best_of, model=model if isinstance(model, str) else None,
        logprobs=logprobs, echo=echo, include_usage=include_usage,
        fill_context=max_tokens is None,
    )


def _check_stop(values: dict[str, Any]) -> dict[str, Any]:
    stop = values.get("stop_sequences")
    if stop is not None and not isinstance(stop, (str, list)):
        raise ValidationError("stop", "stop must be a string or a list of strings")
    return values


# SamplingParams names the engine's field; an OpenAI client should read its own field name.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "stop_sequences": "stop",
                 "min_new_tokens": "min_tokens", "ignore_eos_token": "ignore_eos"}


def _openai_field(exc: ValidationError) -> ValidationError:
    name = _OPENAI_NAMES.get(exc.field)
    if name is None:
        return exc
    return ValidationError(name, exc.message.replace(exc.field, name))


def _parse_prompt(value: Any) -> tuple[list[str], bool]:
    if isinstance(value, str) and value:
        return [value], False
    if isinstance(value, list) and value and all(isinstance(p, str) and p for p in value):
        return list(value), True
    if value is None:
        raise ValidationError("prompt", "the request has no prompt; send \"prompt\": \"text\"")
    raise ValidationError(
        "prompt", "prompt must be a non-empty string or a list of non-empty strings "
        "(token-id prompts are not supported)")


def _render_chat(messages: Any, engine: Tokenizing) -> str:
    if not isinstance(messages, list) or not messages:
        raise ValidationError("messages", "messages must be a non-empty list of "
                              '{"role": ..., "content": ...} objects')
    plain: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValidationError(where, f'{where} must be an object with a string "role"')
        content = message.get("content")
        if isinstance(content, list):
            # OpenAI's content parts: only text parts can go through a text model.
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValidationError(
                        f"{where}.content", f"{where}.content: only text parts are supported")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValidationError(f"{where}.content", f"{where}.content must be a string")
        plain.append({**message, "content": content})
    try:
        return engine.apply_chat_template(plain, add_generation_prompt=True)
    except ValueError as exc:
        raise ValidationError("messages", str(exc)) from exc


# ---- shared ----------------------------------------------------------------------------------


def _check_samples(n: int, best_of: int, params: SamplingParams, *, stream: bool,
                   greedy_ok: bool) -> None:
    for name, value in (("n", n), ("best_of", best_of)):
        if value > MAX_SAMPLES:
            raise ValidationError(name, f"{name} must be <= {MAX_SAMPLES}, got {value}")
    if best_of < n:
        raise ValidationError("best_of", f"best_of ({best_of}) must be >= n ({n})")
    if best_of > 1 and params.greedy and not greedy_ok:
        raise ValidationError(
            "n" if n > 1 else "best_of",
            f"n={n}, best_of={best_of} needs do_sample=true (and temperature > 0): greedy "
            "decoding would return identical sequences")
    if stream and best_of > n:
        raise ValidationError(
            "best_of", "best_of > n cannot stream: the best samples are known only at the end")


def _finish(engine: Tokenizing, api: Api, prompts: list[str], params: SamplingParams, *,
            truncate: Any, fill_context: bool = False, **kwargs: Any) -> LLMRequest:
    """Tokenize, truncate and check every prompt against the context."""
    if truncate is not None:
        check_int("truncate", truncate, minimum=1)
    limit = engine.max_context
    is_list = kwargs.get("is_list", False)
    prompt_field = "prompt" if api.is_openai else "inputs"
    engine_prompts: list[list[int]] = []
    counts: list[int] = []
    for i, prompt in enumerate(prompts):
        where = f"{prompt_field}[{i}]" if is_list else prompt_field
        if kwargs.get("chat"):
            where = "messages"
        ids = engine.encode(prompt)
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]
        engine_prompts.append(ids)
        if len(ids) >= limit:
            raise ValidationError(
                where,
                f"{where} has {len(ids)} tokens but the model's context holds {limit} "
                "(prompt + generated tokens); shorten the input or set truncate")
        counts.append(len(ids))
    longest = max(counts)
    if fill_context:
        # OpenAI chat without max_tokens: generate until the context is full.
        params = replace(params, max_new_tokens=limit - longest)
    elif longest + params.max_new_tokens > limit:
        name = "max_tokens" if api.is_openai else "max_new_tokens"
        raise ValidationError(
            name,
            f"prompt tokens ({longest}) + {name} ({params.max_new_tokens}) = "
            f"{longest + params.max_new_tokens} exceeds the model's context of {limit} tokens; "
            f"lower {name} to at most {limit - longest}")
    return LLMRequest(api=api, prompts=prompts, engine_prompts=engine_prompts,
                      prompt_tokens=counts, params=params, **kwargs)


def _bool(values: dict[str, Any], name: str, default: bool) -> bool:
    value = values.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(name, f"{name} must be true or false, got {value!r}")
    return value


def _int(values: dict[str, Any], name: str, default: int, *, minimum: int) -> int:
    value = values.get(name)
    if value is None:
        return default
    check_int(name, value, minimum=minimum)
    return value


def _check_range(name: str, value: Any, low: int, high: int) -> None:
    check_int(name, value, minimum=low)
    if value > high:
        raise ValidationError(name, f"{name} must be <= {high}, got {value}")


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


__all__ = [
    "API_PROPERTY", "Api", "HANDLER_PARAMETERS", "LLMRequest", "LMI_PARAMETERS",
    "OPENAI_CHAT_FIELDS", "OPENAI_COMPLETION_FIELDS", "parse_request",
]
