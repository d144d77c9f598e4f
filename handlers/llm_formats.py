"""Response shapes of the default LLM handler: LMI json/jsonlines, TGI json/SSE, OpenAI
completions and chat (whole and streamed), raw text.

Non-streamed: functions from finished `GenerationResult`s (best first) to one JSON-able body.
Streamed: a `StreamFormat` turns engine `TokenEvent`s into items (dicts, or bytes sent as-is);
its `encode` makes one item one complete line or event, which is what a chunked HTTP response
(and SageMaker's PayloadPart framing) needs. Each format also says how a failure after the first
byte ends its stream: a final item with finish_reason "error" and the message.

Custom output formatters under LMI's RequestOutput contract (first parameter annotated
RequestOutput / TextGenerationOutput) are driven here too: `RequestOutputFormatter` keeps one
input's TextGenerationOutput and calls the formatter once per generated token;
`format_request_output` joins the pieces for a whole answer, `RequestOutputStream` sends them.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engines.types import FinishReason, GenerationResult, Token, TokenEvent
from handlers import request_io
from handlers.llm_schema import LLMRequest
from handlers.outputs import to_json_bytes

JSON = "application/json"
JSONLINES = "application/jsonlines"
EVENT_STREAM = "text/event-stream"
TEXT = "text/plain"

ERROR_FINISH_REASON = "error"

# LMI/TGI finish reasons -> OpenAI's: both EOS and a stop string are a natural "stop".
_OPENAI_FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}


def cumulative_log_prob(result: GenerationResult) -> float:
    return sum(t.log_prob or 0.0 for t in result.tokens)


def _reason(reason: FinishReason | str | None) -> str | None:
    return reason.value if isinstance(reason, FinishReason) else reason


def _openai_reason(reason: FinishReason | str | None) -> str | None:
    if isinstance(reason, FinishReason):
        return _OPENAI_FINISH[reason]
    return reason


# ---- tokens ----------------------------------------------------------------------------------


def lmi_token(token: Token, text: str | None = None) -> dict[str, Any]:
    return {"id": token.id, "text": token.text if text is None else text,
            "log_prob": token.log_prob, "special_token": token.special}


def tgi_token(token: Token, text: str | None = None,
              alternatives: tuple[Token, ...] | None = None) -> dict[str, Any]:
    """`alternatives`: LoRAX's alternative_tokens (return_k_alternatives)."""
    out = {"id": token.id, "text": token.text if text is None else text,
           "logprob": token.log_prob, "special": token.special}
    if alternatives is not None:
        out["alternative_tokens"] = [tgi_prefill_token(t) for t in alternatives]
    return out


def tgi_prefill_token(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.log_prob}


# ---- LMI -------------------------------------------------------------------------------------


def _full_text(request: LLMRequest, index: int, text: str) -> str:
    return request.prompts[index] + text if request.return_full_text else text


def lmi_details(request: LLMRequest, index: int, result: GenerationResult) -> dict[str, Any]:
    details: dict[str, Any] = {
        "finish_reason": _reason(result.finish_reason),
        "generated_tokens": len(result.tokens) or result.generated_tokens,
        "inputs": request.prompts[index],
        "tokens": [lmi_token(t) for t in result.tokens],
    }
    if request.params.decoder_input_details:
        details["prefill"] = [lmi_token(t) for t in result.prefill or ()]
    if request.params.top_n_tokens:
        details["top_tokens"] = [[lmi_token(t) for t in step] for step in result.top_tokens]
    return details


def lmi_response(request: LLMRequest, index: int, results: list[GenerationResult]) -> dict:
    """{"generated_text", "details"?}; with n > 1 the other n-1 sequences go under
    details.best_of_sequences (TGI's field), so n > 1 always carries details."""
    best = results[0]
    body: dict[str, Any] = {"generated_text": _full_text(request, index, best.text)}
    if request.details or request.n > 1:
        details = lmi_details(request, index, best)
        if request.n > 1:
            details["best_of_sequences"] = [
                {"generated_text": _full_text(request, index, r.text),
                 **lmi_details(request, index, r)}
                for r in results[1:request.n]
            ]
        body["details"] = details
    return body


# ---- TGI -------------------------------------------------------------------------------------


def _tgi_details(request: LLMRequest, result: GenerationResult) -> dict[str, Any]:
    tops = result.top_tokens if request.alternatives else [None] * len(result.tokens)
    details: dict[str, Any] = {
        "finish_reason": _reason(result.finish_reason),
        "generated_tokens": len(result.tokens) or result.generated_tokens,
        "prompt_tokens": result.prompt_tokens,  # LoRAX's clients require it
        "seed": request.params.seed,
        # TGI always sends prefill (empty unless decoder_input_details); clients require it.
        "prefill": [tgi_prefill_token(t) for t in result.prefill or ()],
        "tokens": [tgi_token(t, alternatives=alt) for t, alt in zip(result.tokens, tops)],
    }
    if request.params.top_n_tokens:
        details["top_tokens"] = [[tgi_token(t) for t in step] for step in result.top_tokens]
    return details


def tgi_response(request: LLMRequest, index: int, results: list[GenerationResult]) -> dict:
    """TGI /generate: {"generated_text", "details"?}; best_of's other samples in
    details.best_of_sequences."""
    best = results[0]
    body: dict[str, Any] = {"generated_text": _full_text(request, index, best.text)}
    if request.details:
        details = _tgi_details(request, best)
        if request.best_of > 1:
            details["best_of_sequences"] = [
                {"generated_text": _full_text(request, index, r.text), **_tgi_details(request, r)}
                for r in results[1:]
            ]
        body["details"] = details
    return body


# ---- OpenAI ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenAIMeta:
    """What every OpenAI body (and every chunk of one stream) shares."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, *, chat: bool, model: str) -> OpenAIMeta:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(tokens: list[Token], tops: list[tuple[Token, ...]],
                         offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, top alternatives as {text: logprob}."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.log_prob for t in tokens],
        "top_logprobs": [{alt.text: alt.log_prob for alt in step} for step in tops]
        if tops else None,
        "text_offset": offsets,
    }


def _chat_logprob(token: Token, top: tuple[Token, ...], text: str | None = None) -> dict:
    text = token.text if text is None else text
    return {
        "token": text,
        "logprob": token.log_prob,
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [{"token": t.text, "logprob": t.log_prob,
                          "bytes": list(t.text.encode("utf-8"))} for t in top],
    }


def _tops(request: LLMRequest, result: GenerationResult) -> list[tuple[Token, ...]]:
    if request.params.top_n_tokens and result.top_tokens:
        return list(result.top_tokens)
    return [() for _ in result.tokens] if request.logprobs is not None else []


def openai_completion(request: LLMRequest, groups: list[list[GenerationResult]],
                      meta: OpenAIMeta) -> dict[str, Any]:
    choices = []
    completion_tokens = 0
    for p, results in enumerate(groups):
        for k, result in enumerate(results[:request.n]):
            completion_tokens += len(result.tokens) or result.generated_tokens
            text = result.text
            logprobs = None
            if request.logprobs is not None:
                tokens, tops = list(result.tokens), _tops(request, result)
                if request.echo and result.prefill is not None:
                    tokens = list(result.prefill) + tokens
                    tops = [() for _ in result.prefill] + tops if tops else tops
                logprobs = _completion_logprobs(tokens, tops, 0)
            if request.echo:
                text = request.prompts[p] + text
            choices.append({"index": p * request.n + k, "text": text,
                            "logprobs": logprobs,
                            "finish_reason": _openai_reason(result.finish_reason)})
    return {"id": meta.id, "object": "text_completion", "created": meta.created,
            "model": meta.model, "choices": choices,
            "usage": _usage(sum(request.prompt_tokens), completion_tokens)}


def openai_chat(request: LLMRequest, groups: list[list[GenerationResult]],
                meta: OpenAIMeta) -> dict[str, Any]:
    (results,) = groups  # a chat request has one prompt
    choices = []
    completion_tokens = 0
    for k, result in enumerate(results[:request.n]):
        completion_tokens += len(result.tokens) or result.generated_tokens
        logprobs = None
        if request.logprobs is not None:
            tops = _tops(request, result) or [() for _ in result.tokens]
            logprobs = {"content": [_chat_logprob(t, top)
                                    for t, top in zip(result.tokens, tops)]}
        choices.append({"index": k,
                        "message": {"role": "assistant", "content": result.text},
                        "logprobs": logprobs,
                        "finish_reason": _openai_reason(result.finish_reason)})
    return {"id": meta.id, "object": "chat.completion", "created": meta.created,
            "model": meta.model, "choices": choices,
            "usage": _usage(request.prompt_tokens[0], completion_tokens)}


# ---- streams ---------------------------------------------------------------------------------


@dataclass(slots=True)
class SequenceState:
    """One streamed sequence so far (engine request `index`)."""

    index: int
    prompt_index: int
    choice: int
    text: str = ""
    generated_tokens: int = 0
    finish_reason: FinishReason | None = None
    prefill: tuple[Token, ...] | None = None

    def add(self, event: TokenEvent) -> None:
        self.text += event.text
        self.generated_tokens += 1
        if event.prefill is not None:
            self.prefill = event.prefill
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


Item = dict[str, Any] | bytes


@dataclass
class StreamFormat:
    """Base: subclasses build items; `encode` frames one item."""

    request: LLMRequest
    content_type: str = JSONLINES
    states: list[SequenceState] = field(default_factory=list)
    # A user output formatter, run on every dict item before framing (not on error items:
    # a formatter that fails must not hide the error it would be reporting).
    custom: Callable[[Any], Any] | None = None

    def start(self) -> list[Item]:
        return []

    def token(self, state: SequenceState, event: TokenEvent) -> list[Item]:
        raise NotImplementedError

    def end(self) -> list[Item]:
        return []

    def error(self, message: str) -> list[Item]:
        raise NotImplementedError

    def encode(self, item: Any) -> bytes:
        if self.custom is not None and isinstance(item, dict):
            item = self.custom(item)
        return self.frame(item)

    def frame(self, item: Any) -> bytes:
        """One item as one complete line or event."""
        if isinstance(item, (bytes, bytearray)):
            return bytes(item)
        if isinstance(item, str):
            return item.encode("utf-8")
        return to_json_bytes(item) + b"\n"


class _SSE(StreamFormat):
    def frame(self, item: Any) -> bytes:
        if isinstance(item, (bytes, bytearray)):
            return bytes(item)
        if isinstance(item, str):
            return item.encode("utf-8")
        return b"data: " + to_json_bytes(item) + b"\n\n"


class LmiJsonlines(StreamFormat):
    """{"token": {...}} per step; the last line adds generated_text and details (always:
    finish_reason, generated_tokens, inputs; prefill when decoder_input_details)."""

    def token(self, state: SequenceState, event: TokenEvent) -> list[Item]:
        line: dict[str, Any] = {"token": lmi_token(event.token, event.text)}
        if self.request.params.top_n_tokens:
            line["top_tokens"] = [lmi_token(t) for t in event.top_tokens]
        if event.finish_reason is not None:
            line["generated_text"] = _full_text(self.request, state.prompt_index, state.text)
            line["details"] = self._details(state, _reason(event.finish_reason))
        return [line]

    def _details(self, state: SequenceState, reason: str | None) -> dict[str, Any]:
        details: dict[str, Any] = {"finish_reason": reason,
                                   "generated_tokens": state.generated_tokens,
                                   "inputs": self.request.prompts[state.prompt_index]}
        if self.request.params.decoder_input_details:
            details["prefill"] = [lmi_token(t) for t in state.prefill or ()]
        return details

    def error(self, message: str) -> list[Item]:
        state = self.states[0]
        return [{"generated_text": None,
                 "details": self._details(state, ERROR_FINISH_REASON), "error": message}]


class TgiSSE(_SSE):
    """TGI's /generate_stream events; huggingface_hub requires index, token.logprob/special,
    and on the last event details.input_length."""

    def __init__(self, request: LLMRequest) -> None:
        super().__init__(request, EVENT_STREAM)

    def token(self, state: SequenceState, event: TokenEvent) -> list[Item]:
        alternatives = event.top_tokens if self.request.alternatives else None
        item: dict[str, Any] = {"index": state.generated_tokens - 1,
                                "token": tgi_token(event.token, event.text, alternatives)}
        if self.request.params.top_n_tokens:
            item["top_tokens"] = [tgi_token(t) for t in event.top_tokens]
        done = event.finish_reason is not None
        item["generated_text"] = (
            _full_text(self.request, state.prompt_index, state.text) if done else None)
        item["details"] = self._details(state, _reason(event.finish_reason)) if done else None
        return [item]

    def _details(self, state: SequenceState, reason: str | None) -> dict[str, Any]:
        prompt_tokens = self.request.prompt_tokens[state.prompt_index]
        # input_length: huggingface_hub's name; prompt_tokens: LoRAX's.
        return {"finish_reason": reason, "generated_tokens": state.generated_tokens,
                "input_length": prompt_tokens, "prompt_tokens": prompt_tokens,
                "seed": self.request.params.seed}

    def error(self, message: str) -> list[Item]:
        state = self.states[0]
        # "error" (+ error_type) is what TGI sends and what huggingface_hub raises on.
        return [{"index": state.generated_tokens, "token": None, "generated_text": None,
                 "details": self._details(state, ERROR_FINISH_REASON),
                 "error": message, "error_type": "generation"}]


class OpenAICompletionStream(_SSE):
    def __init__(self, request: LLMRequest, meta: OpenAIMeta) -> None:
        super().__init__(request, EVENT_STREAM)
        self.meta = meta
        self.offsets: dict[int, int] = {}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.meta.id, "object": "text_completion", "created": self.meta.created,
                 "model": self.meta.model, "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None  # as OpenAI: only the extra last chunk carries usage
        return chunk

    def start(self) -> list[Item]:
        if not self.request.echo:
            return []
        return [self._chunk([{"index": s.choice, "text": self.request.prompts[s.prompt_index],
                              "logprobs": None, "finish_reason": None}]) for s in self.states]

    def token(self, state: SequenceState, event: TokenEvent) -> list[Item]:
        logprobs = None
        if self.request.logprobs is not None:
            offset = self.offsets.get(state.choice, 0)
            token = Token(event.token.id, event.text, event.token.log_prob, event.token.special)
            logprobs = _completion_logprobs([token], [event.top_tokens], offset)
            self.offsets[state.choice] = offset + len(event.text)
        return [self._chunk([{"index": state.choice, "text": event.text, "logprobs": logprobs,
                              "finish_reason": _openai_reason(event.finish_reason)}])]

    def end(self) -> list[Item]:
        items: list[Item] = []
        if self.request.include_usage:
            usage = _usage(sum(self.request.prompt_tokens),
                           sum(s.generated_tokens for s in self.states))
            items.append({**self._chunk([]), "usage": usage})
        return [*items, b"data: [DONE]\n\n"]

    def error(self, message: str) -> list[Item]:
        open_choices = [s for s in self.states if s.finish_reason is None] or self.states[:1]
        chunk = self._chunk([{"index": s.choice, "text": "", "logprobs": None,
                              "finish_reason": ERROR_FINISH_REASON} for s in open_choices])
        # The openai client raises APIError on a chunk with "error": the caller learns of it.
        chunk["error"] = {"message": message, "type": "server_error", "code": 500}
        return [chunk, b"data: [DONE]\n\n"]


class OpenAIChatStream(_SSE):
    """chat.completion.chunk events. `sse=False` gives LMI's jsonlines_chat (one chunk per
    line, no [DONE])."""

    def __init__(self, request: LLMRequest, meta: OpenAIMeta, *, sse: bool = True) -> None:
        super().__init__(request, EVENT_STREAM if sse else JSONLINES)
        self.meta = meta
        self.sse = sse

    def frame(self, item: Any) -> bytes:
        return super().frame(item) if self.sse else StreamFormat.frame(self, item)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.meta.id, "object": "chat.completion.chunk",
                 "created": self.meta.created, "model": self.meta.model, "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[Item]:
        # The first chunk of each choice says who speaks, as OpenAI's do.
        return [self._chunk([{"index": s.choice,
                              "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]) for s in self.states]

    def token(self, state: SequenceState, event: TokenEvent) -> list[Item]:
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = {"content": [_chat_logprob(event.token, event.top_tokens, event.text)]}
        return [self._chunk([{"index": state.choice, "delta": {"content": event.text},
                              "logprobs": logprobs,
                              "finish_reason": _openai_reason(event.finish_reason)}])]

    def end(self) -> list[Item]:
        items: list[Item] = []
        if self.request.include_usage:
            usage = _usage(self.request.prompt_tokens[0],
                           sum(s.generated_tokens for s in self.states))
            items.append({**self._chunk([]), "usage": usage})
        return [*items, b"data: [DONE]\n\n"] if self.sse else items

    def error(self, message: str) -> list[Item]:
        open_choices = [s for s in self.states if s.finish_reason is None] or self.states[:1]
        chunk = self._chunk([{"index": s.choice, "delta": {}, "logprobs": None,
                              "finish_reason": ERROR_FINISH_REASON} for s in open_choices])
        chunk["error"] = {"message": message, "type": "server_error", "code": 500}
        return [chunk, b"data: [DONE]\n\n"] if self.sse else [chunk]


class RawText(StreamFormat):
    """option.output_formatter=none: the text itself, as it grows."""

    def __init__(self, request: LLMRequest) -> None:
        super().__init__(request, TEXT)

    def token(self, state: SequenceState, event: TokenEvent) -> list[Item]:
        return [event.text.encode("utf-8")] if event.text else []

    def error(self, message: str) -> list[Item]:
        return [f"\n[error: {message}]".encode()]


def with_custom_formatter(fmt: StreamFormat, formatter: Callable[[Any], Any]) -> StreamFormat:
    """Run a user output formatter on every dict item of `fmt` before it is framed: a str or
    bytes result is sent as-is, anything else is framed by the format."""
    fmt.custom = formatter
    return fmt


# ---- LMI's RequestOutput formatter contract --------------------------------------------------
#
# A custom output formatter whose first parameter is annotated RequestOutput or
# TextGenerationOutput (djl_python.output_formatter / djl_python.request_io, or a subclass) gets
# LMI's per-step contract instead of the dict one: one TextGenerationOutput per input, which
# grows by one token per call, and the formatter is called once per generated token, returning
# a str. A non-streamed answer is the concatenation of what it returned; a stream sends each
# non-empty piece as one chunk. A non-streamed request replays the engine's events in order
# (the formatter cannot tell it from a live stream), so both give the same pieces.

_REQUEST_OUTPUT_NAMES = frozenset({"RequestOutput", "TextGenerationOutput"})


def takes_request_output(fn: Callable[..., Any] | None) -> bool:
    """Whether `fn` follows LMI's RequestOutput contract: its first parameter is annotated
    RequestOutput / TextGenerationOutput (a subclass, or the name as a string annotation, counts
    too). A `dict` annotation, any other one, or none keeps the dict contract."""
    if fn is None:
        return False
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not parameters:
        return False
    annotation = parameters[0].annotation
    if isinstance(annotation, str):  # `from __future__ import annotations` in the model.py
        try:
            annotation = typing.get_type_hints(fn).get(parameters[0].name, annotation)
        except Exception:
            pass
    if isinstance(annotation, str):
        return annotation.strip().strip("'\"").rsplit(".", 1)[-1] in _REQUEST_OUTPUT_NAMES
    return isinstance(annotation, type) and issubclass(annotation, request_io.RequestOutput)


def formatter_content_type(fn: Callable[..., Any]) -> str:
    """The content type of a RequestOutput formatter's answer: text/plain (LMC does not guess
    what the formatter wrote), unless the function carries a `content_type` attribute."""
    declared = getattr(fn, "content_type", None)
    return declared if isinstance(declared, str) and declared else TEXT


def _io_token(token: Token, text: str | None = None) -> request_io.Token:
    return request_io.Token(token.id, token.text if text is None else text, token.log_prob,
                    token.special)


class RequestOutputFormatter:
    """One input's TextGenerationOutput, fed one engine event at a time (`feed`); each event
    appends the token to its sequence and calls the user's formatter once.

    Sequence k is sample k of the input (best_of / n); once every sequence has finished,
    best_sequence_index is the one with the highest cumulative log prob and
    other_sequences_indices the next n - 1. A Token's text is the text that step added to the
    output (what LMI's json formatter concatenates into generated_text), so joining the texts
    gives generated_text exactly."""

    def __init__(self, fn: Callable[[Any], Any], request: LLMRequest, prompt_index: int, *,
                 request_id: int, samples: int, parameters: dict[str, Any],
                 adapter: str | None = None, client_request_id: str | None = None,
                 tokenizer: Any = None, tgi_compat: bool = False) -> None:
        self.fn = fn
        self.keep = request.n
        self.top_n = request.params.top_n_tokens
        text_input = request_io.TextInput(
            request_id=request_id, client_request_id=client_request_id, output_formatter=fn,
            parameters=parameters, server_parameters=dataclasses.asdict(request.params),
            tgi_compat=tgi_compat, input_text=request.prompts[prompt_index], adapters=adapter,
            tokenizer=tokenizer)
        # LMI's schema lists input_ids on TextInput: the prompt's token ids, as the engine got them.
        text_input.input_ids = list(request.engine_prompts[prompt_index])
        self.output = request_io.TextGenerationOutput(request_id=request_id, input=text_input)
        for k in range(1, samples):
            self.output.sequences[k] = request_io.Sequence()
        self.open = set(range(samples))

    @property
    def finished(self) -> bool:
        return self.output.finished

    def feed(self, sample: int, event: TokenEvent) -> str:
        out = self.output
        if event.prefill is not None and not out.prompt_tokens_details:
            out.prompt_tokens_details = [_io_token(t) for t in event.prefill]
        last = event.finish_reason is not None
        out.set_next_token(_io_token(event.token, event.text), sequence_index=sample,
                           is_last_token=last, finish_reason=_reason(event.finish_reason))
        out.sequences[sample].cumulative_log_prob += event.token.log_prob or 0.0
        if self.top_n:
            out.set_next_top_tokens([_io_token(t) for t in event.top_tokens], sample)
        if last:
            self.open.discard(sample)
            if not self.open:
                self._finish()
        return self._call()

    def fail(self, message: str) -> str:
        """The generation failed: as LMI does, every open sequence gets a last token with id -1
        and `error_msg`, finish_reason "error", and the formatter is called once more."""
        out = self.output
        for k in sorted(self.open) or [out.best_sequence_index]:
            token = request_io.Token(-1, "", log_prob=-1.0, special_token=True, error_msg=message)
            out.set_next_token(token, sequence_index=k, is_last_token=True,
                               finish_reason=ERROR_FINISH_REASON)
        self.open.clear()
        out.finished = True
        return self._call()

    def _finish(self) -> None:
        out = self.output
        if len(out.sequences) > 1:
            ranked = sorted(out.sequences, key=lambda k: out.sequences[k].cumulative_log_prob,
                            reverse=True)
            out.best_sequence_index = ranked[0]
            out.other_sequences_indices = ranked[1:self.keep]
        out.finished = True

    def _call(self) -> str:
        piece = self.fn(self.output)
        if piece is None:
            return ""
        if isinstance(piece, (bytes, bytearray)):
            return bytes(piece).decode("utf-8")
        if not isinstance(piece, str):
            name = getattr(self.fn, "__name__", repr(self.fn))
            raise TypeError(f"output formatter {name} takes a RequestOutput, so it must return "
                            f"a str (one piece of the response), got {type(piece).__name__}")
        return piece


def format_request_output(formatter: RequestOutputFormatter,
                          events: list[tuple[int, TokenEvent]]) -> str:
    """A non-streamed answer: the formatter called on each (sample, event) in the order the
    engine produced them, its pieces joined."""
    return "".join(formatter.feed(sample, event) for sample, event in events)


class RequestOutputStream(StreamFormat):
    """A stream under the RequestOutput contract: each event goes to its input's formatter and
    the piece it returns is one chunk, sent as-is (an empty piece sends nothing). A failure
    after the first byte is told to the formatters as LMI tells it (`RequestOutputFormatter.
    fail`); should a formatter fail on that too, the stream ends with a plain-text error line."""

    def __init__(self, request: LLMRequest, formatters: list[RequestOutputFormatter],
                 samples: int, content_type: str = TEXT) -> None:
        super().__init__(request, content_type)
        self.formatters = formatters
        self.samples = samples

    def token(self, state: SequenceState, event: TokenEvent) -> list[Item]:
        formatter = self.formatters[state.prompt_index]
        piece = formatter.feed(state.index - state.prompt_index * self.samples, event)
        return [piece.encode("utf-8")] if piece else []

    def error(self, message: str) -> list[Item]:
        pieces: list[Item] = []
        for formatter in self.formatters:
            if formatter.finished:
                continue
            try:
                piece = formatter.fail(message)
            except Exception as exc:  # the formatter is what failed: say so in plain text
                return [*pieces, f"\n[error: {message}; the output formatter failed on the "
                                 f"error too: {type(exc).__name__}: {exc}]\n".encode()]
            if piece:
                pieces.append(piece.encode("utf-8"))
        return pieces
