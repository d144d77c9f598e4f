"""Plain request/response types shared by engines, handlers and the front end.

No torch and nothing heavy: the front end imports this module to validate requests before they
reach a worker, and handlers import it without loading an engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from engines.contracts.errors import ValidationError


class FinishReason(str, Enum):
    """Why a sequence stopped; the values are the LMI `details.finish_reason` strings."""

    LENGTH = "length"  # max_new_tokens reached, or the model's context is full
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


# Seeds go to torch.Generator.manual_seed, which takes an unsigned 64-bit value.
_MAX_SEED = 2**64 - 1
# Each step's top tokens travel in every streamed line; TGI caps them at a small number too.
MAX_TOP_N_TOKENS = 20
# Most samples (n, best_of) one prompt may ask for, OpenAI's own limit on n: each is a sequence in
# the engine, and an unbounded count is a way to exhaust the worker's memory.
MAX_SAMPLES = 128
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to generate for one request. Defaults are LMI's (DESIGN.md §5).

    `do_sample=False` means greedy whatever the other knobs say (as in LMI and transformers);
    with sampling, `temperature=0` also means greedy, `top_k=0` and `top_p=1.0` mean "off".
    The same `seed` gives the same text for the same prompt and model; `None` draws a fresh one.
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 0  # EOS and stop sequences are ignored before this many tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens with p < min_p * p(top token); 0 disables
    typical_p: float = 1.0  # locally typical sampling mass; 1 disables
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + generated tokens; 1 disables
    presence_penalty: float = 0.0  # OpenAI-style, over generated tokens; 0 disables
    frequency_penalty: float = 0.0  # OpenAI-style, over generated tokens; 0 disables
    seed: int | None = None
    # Generation stops when the text contains one of these; the returned text ends before it
    # (LMI), finish reason "stop_sequence".
    stop_sequences: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end generation like EOS
    ignore_eos_token: bool = False
    top_n_tokens: int = 0  # also return the n most likely tokens (with log-probs) per step
    decoder_input_details: bool = False  # also return the prompt tokens' log-probs (prefill)

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if not isinstance(self.do_sample, bool):
            raise ValidationError(
                "do_sample", f"do_sample must be true or false, got {self.do_sample!r}"
            )
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValidationError(
                "temperature", f"temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        check_int("top_k", self.top_k, minimum=0, hint=" (0 disables top-k)")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValidationError(
                "top_p", f"top_p must be in (0, 1] (1 disables top-p), got {self.top_p}"
            )
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)
            if self.seed > _MAX_SEED:
                raise ValidationError("seed", f"seed must be <= {_MAX_SEED}, got {self.seed}")
        if not isinstance(self.stop_sequences, tuple) or not all(
            isinstance(s, str) and s for s in self.stop_sequences
        ):
            raise ValidationError(
                "stop_sequences", "stop_sequences must be a list of non-empty strings"
            )
        check_int("min_new_tokens", self.min_new_tokens, minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValidationError(
                "min_new_tokens",
                f"min_new_tokens must be <= max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}",
            )
        _check_range("min_p", self.min_p, low=0, high=1, hint=" (0 disables min-p)")
        _check_range(
            "typical_p", self.typical_p, low=0, high=1, low_open=True, hint=" (1 disables it)"
        )
        _check_number("repetition_penalty", self.repetition_penalty)
        # Bounded on both sides: logits are float32, and a penalty of 1e-300 (> 0, but 0 in
        # float32) would turn them into inf / NaN.
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValidationError(
                "repetition_penalty",
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                f"{MAX_REPETITION_PENALTY:g}] (1 disables it), got {self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), low=-2, high=2, hint=" (0 disables it)")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValidationError(
                "stop_token_ids",
                f"stop_token_ids must be a list of token ids (integers >= 0), "
                f"got {self.stop_token_ids!r}",
            )
        for name in ("ignore_eos_token", "decoder_input_details"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValidationError(name, f"{name} must be true or false, got {value!r}")
        check_int("top_n_tokens", self.top_n_tokens, minimum=0, hint=" (0 disables it)")
        if self.top_n_tokens > MAX_TOP_N_TOKENS:
            raise ValidationError(
                "top_n_tokens",
                f"top_n_tokens must be <= {MAX_TOP_N_TOKENS}, got {self.top_n_tokens}",
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_request(cls, parameters: Mapping[str, Any] | None) -> SamplingParams:
        """Build from the `parameters` object of an LMI request, rejecting unknown keys.

        LMI drops unknown parameters silently and users lose time on typos, so we name them.
        """
        if parameters is None:
            return cls()
        if not isinstance(parameters, Mapping):
            raise ValidationError(
                "parameters", f"parameters must be a JSON object, got {type(parameters).__name__}"
            )
        unknown = sorted(set(parameters) - ACCEPTED_PARAMETERS)
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise ValidationError(
                unknown[0],
                f"unknown parameter(s) {names}; accepted parameters: "
                + ", ".join(sorted(ACCEPTED_PARAMETERS)),
            )
        values = dict(parameters)
        stops = values.get("stop_sequences")
        if stops is not None:
            # LMI accepts a single string as well as a list.
            values["stop_sequences"] = (
                (stops,)
                if isinstance(stops, str)
                else _as_tuple(stops, "stop_sequences", "a string or a list of strings")
            )
        else:
            values.pop("stop_sequences", None)
        stop_ids = values.get("stop_token_ids")
        if stop_ids is not None:
            values["stop_token_ids"] = _as_tuple(stop_ids, "stop_token_ids", "a list of integers")
        else:
            values.pop("stop_token_ids", None)
        return cls(**values)


ACCEPTED_PARAMETERS = frozenset(f.name for f in fields(SamplingParams))


@dataclass(frozen=True, slots=True)
class Token:
    """One token with its log-probability under the distribution it was drawn from (the
    log-softmax of the processed logits, i.e. after temperature/penalties; for greedy, of the
    raw logits). `log_prob` is None only for the first prompt token in `prefill`."""

    id: int
    text: str
    log_prob: float | None
    special: bool = False


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step of one request while streaming.

    `text` is what to append to the output now: the token's text, except that text that might
    start a stop sequence is held back (""), an incomplete UTF-8 character is held back until it
    completes, and a final event is cut before a stop sequence. Concatenating `text` over all
    events gives exactly `GenerationResult.text`. `finish_reason` is set on the last event of the
    request, and only there."""

    index: int  # position of the request in the batch given to generate_stream
    token: Token
    text: str
    top_tokens: tuple[Token, ...] = ()  # top_n_tokens most likely, best first
    finish_reason: FinishReason | None = None
    prefill: tuple[Token, ...] | None = None  # on the first event only, if decoder_input_details


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """One finished sequence. `token_ids` are the generated ids (the EOS id included when the
    sequence ended on it); `text` is the output text (special tokens skipped, cut before a stop
    sequence)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.LENGTH
    prompt_tokens: int = 0
    tokens: list[Token] = field(default_factory=list)  # one per generated token
    top_tokens: list[tuple[Token, ...]] = field(default_factory=list)  # if top_n_tokens > 0
    prefill: list[Token] | None = None  # if decoder_input_details

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


def check_int(name: str, value: object, *, minimum: int, hint: str = "") -> None:
    # bool is an int subclass; `"max_new_tokens": true` is a client bug, not the number 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(name, f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValidationError(name, f"{name} must be >= {minimum}{hint}, got {value}")


def _check_number(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValidationError(name, f"{name} must be a number, got {value!r}")
    # NaN passes every `<` check and would reach the sampler as NaN logits.
    if not math.isfinite(value):
        raise ValidationError(name, f"{name} must be a finite number, got {value!r}")


def _check_range(
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    hint: str = "",
) -> None:
    _check_number(name, value)
    assert isinstance(value, (int, float))
    too_low = not (value > low) if low_open else not (value >= low)
    if too_low or not value <= high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValidationError(name, f"{name} must be in {interval}{hint}, got {value}")


def _as_tuple(value: object, name: str, expected: str) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ValidationError(name, f"{name} must be {expected}, got {value!r}")


def collect_results(stream: Iterable[list[TokenEvent]], params: Sequence[SamplingParams],
                    prompt_tokens: Sequence[int]) -> list[GenerationResult]:
    """Gather a generate_stream's events into one GenerationResult per prompt, in order."""
    n = len(params)
    tokens: list[list[Token]] = [[] for _ in range(n)]
    top_tokens: list[list[tuple[Token, ...]]] = [[] for _ in range(n)]
    texts = [""] * n
    prefills: list[list[Token] | None] = [None] * n
    finish: list[FinishReason | None] = [None] * n
    for events in stream:
        for event in events:
            i = event.index
            tokens[i].append(event.token)
            texts[i] += event.text
            if params[i].top_n_tokens:
                top_tokens[i].append(event.top_tokens)
            if event.prefill is not None:
                prefills[i] = list(event.prefill)
            if event.finish_reason is not None:
                finish[i] = event.finish_reason
    results = []
    for i in range(n):
        assert finish[i] is not None, f"the stream ended with request {i} unfinished"
        results.append(GenerationResult(
            text=texts[i], token_ids=[t.id for t in tokens[i]], finish_reason=finish[i],
            prompt_tokens=prompt_tokens[i], tokens=tokens[i], top_tokens=top_tokens[i],
            prefill=prefills[i]))
    return results


class GenerateFromStream:
    """`generate` for an engine that streams: its `generate_stream`, collected into results.
    The engine gives `count_tokens` (the prompt lengths the results report)."""

    def generate(self, prompts: list[str | list[int]], params: list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[GenerationResult]:
        lens = [len(p) if isinstance(p, list) else self.count_tokens(p) for p in prompts]
        return collect_results(self.generate_stream(prompts, params, adapters), params, lens)
