"""Plain request/response types shared by engines, handlers and the front end.

No torch and nothing heavy: the front end imports this module to validate requests before they
reach a worker, and handlers import it without loading an engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any


class FinishReason(str, Enum):
    """Why a sequence stopped; the values are the LMI `details.finish_reason` strings."""

    LENGTH = "length"  # max_new_tokens reached, or the model's context is full
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


class ValidationError(ValueError):
    """A request value a user can fix; `field` names it so the 400 body can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# Seeds go to torch.Generator.manual_seed, which takes an unsigned 64-bit value.
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to generate for one request. Defaults are LMI's (DESIGN.md §5).

    `do_sample=False` means greedy whatever the other knobs say (as in LMI and transformers);
    with sampling, `temperature=0` also means greedy, `top_k=0` and `top_p=1.0` mean "off".
    The same `seed` gives the same text for the same prompt and model; `None` draws a fresh one.
    """

    max_new_tokens: int = 30
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    # Generation stops once the text contains one of these; the text keeps the stop sequence,
    # as TGI returns it.
    stop_sequences: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if not isinstance(self.do_sample, bool):
            raise ValidationError(
                "do_sample", f"do_sample must be true or false, got {self.do_sample!r}"
            )
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValidationError(
                "temperature", f"temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        _check_int("top_k", self.top_k, minimum=0, hint=" (0 disables top-k)")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValidationError(
                "top_p", f"top_p must be in (0, 1] (1 disables top-p), got {self.top_p}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed > _MAX_SEED:
                raise ValidationError("seed", f"seed must be <= {_MAX_SEED}, got {self.seed}")
        if not isinstance(self.stop_sequences, tuple) or not all(
            isinstance(s, str) and s for s in self.stop_sequences
        ):
            raise ValidationError(
                "stop_sequences", "stop_sequences must be a list of non-empty strings"
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
            values["stop_sequences"] = (stops,) if isinstance(stops, str) else _as_tuple(stops)
        else:
            values.pop("stop_sequences", None)
        return cls(**values)


ACCEPTED_PARAMETERS = frozenset(f.name for f in fields(SamplingParams))


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """One finished sequence. `token_ids` are the generated ids (the EOS id included when the
    sequence ended on it); `text` is their decoding without special tokens."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.LENGTH
    prompt_tokens: int = 0

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


def _check_int(name: str, value: object, *, minimum: int, hint: str = "") -> None:
    # bool is an int subclass; `"max_new_tokens": true` is a client bug, not the number 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(name, f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValidationError(name, f"{name} must be >= {minimum}{hint}, got {value}")


def _check_number(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValidationError(name, f"{name} must be a number, got {value!r}")


def _as_tuple(value: object) -> tuple[Any, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ValidationError(
        "stop_sequences", f"stop_sequences must be a string or a list of strings, got {value!r}"
    )
