"""`@input_formatter` / `@output_formatter`: mark functions in a model.py that has no `handle`,
so the default LLM handler runs with them (LMI's custom formatter contract).

The decorators only tag the function; `ModelService.load` finds tagged functions by the tag, so
a model.py may name them anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

INPUT_FORMATTER_TAG = "is_input_formatter"
OUTPUT_FORMATTER_TAG = "is_output_formatter"


def input_formatter(fn: F) -> F:
    """Turns a decoded request into the handler's request: `fn(decoded_payload, **kwargs)`."""
    setattr(fn, INPUT_FORMATTER_TAG, True)
    return fn


def output_formatter(fn: F) -> F:
    """Turns one generation output into the bytes/str sent to the client: `fn(output)`."""
    setattr(fn, OUTPUT_FORMATTER_TAG, True)
    return fn
