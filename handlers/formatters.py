"""`@input_formatter` / `@output_formatter`: mark functions in a model.py that has no `handle`,
so the default LLM handler runs with them (LMI's custom formatter contract).
`@init_handler` / `@prediction_handler`: DJL's two other markers, used by its scikit-learn and
XGBoost handlers: `init(model_dir, **kwargs)` returns the loaded model (instead of loading the
model file), `predict(X, model, **kwargs)` returns the predictions (instead of model.predict(X)).

The decorators only tag the function (an attribute set to True, the names below); the loader
finds tagged functions by the tag, so a model.py may name them anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

INPUT_FORMATTER_TAG = "is_input_formatter"
OUTPUT_FORMATTER_TAG = "is_output_formatter"
INIT_HANDLER_TAG = "is_init_handler"
PREDICTION_HANDLER_TAG = "is_prediction_handler"


def input_formatter(fn: F) -> F:
    """Turns a decoded request into the handler's request: `fn(decoded_payload, **kwargs)`."""
    setattr(fn, INPUT_FORMATTER_TAG, True)
    return fn


def output_formatter(fn: F) -> F:
    """Turns one generation output into the bytes/str sent to the client: `fn(output)`."""
    setattr(fn, OUTPUT_FORMATTER_TAG, True)
    return fn


def init_handler(fn: F) -> F:
    """Loads the model: `fn(model_dir, **kwargs)` returns it (None: load the model file)."""
    setattr(fn, INIT_HANDLER_TAG, True)
    return fn


def prediction_handler(fn: F) -> F:
    """Predicts: `fn(X, model, **kwargs)` returns the predictions (None: model.predict(X))."""
    setattr(fn, PREDICTION_HANDLER_TAG, True)
    return fn
