"""SageMaker inference-toolkit style model.py (`model_fn`, `input_fn`, `predict_fn`, `output_fn`)
adapted to the `handle(inputs)` contract."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

from handlers.inputs import Input
from handlers.outputs import Output, to_json_bytes

SAGEMAKER_FUNCTIONS = ("model_fn", "input_fn", "predict_fn", "output_fn")


def default_input_fn(body: bytes, content_type: str | None) -> Any:
    ct = (content_type or "").lower()
    if "json" in ct:
        return json.loads(body)
    if ct.startswith("text/"):
        return body.decode("utf-8")
    if not ct:
        # curl without -H sends no Content-Type; most such clients still mean JSON.
        try:
            return json.loads(body)
        except ValueError:
            return body
    return body


def default_output_fn(prediction: Any, accept: str | None) -> tuple[bytes, str]:
    return to_json_bytes(prediction), "application/json"


class SageMakerHandler:
    def __init__(self, module: ModuleType, model_dir: str) -> None:
        self.model_dir = model_dir
        self.model_fn: Callable[[str], Any] | None = getattr(module, "model_fn", None)
        self.input_fn = getattr(module, "input_fn", None) or default_input_fn
        self.predict_fn = getattr(module, "predict_fn", None) or self._default_predict
        self.output_fn = getattr(module, "output_fn", None) or default_output_fn
        self.model: Any = None
        self.loaded = False

    def _default_predict(self, data: Any, model: Any) -> Any:
        if not callable(model):
            raise TypeError("model.py has no predict_fn(data, model) and the object returned "
                            "by model_fn is not callable: define predict_fn")
        return model(data)

    def _ensure_loaded(self) -> None:
        if not self.loaded:
            self.model = self.model_fn(self.model_dir) if self.model_fn else None
            self.loaded = True

    def handle(self, inputs: Input) -> Output | None:
        self._ensure_loaded()
        if inputs.is_empty():
            return None  # warm-up: model_fn ran above, nothing to answer
        out = Output()
        batch = inputs.get_batches()
        for i, item in enumerate(batch):
            index = i if inputs.is_batch() else None
            body, content_type = self._one(item)
            out.add(body, batch_index=index)
            if content_type:
                header = "Content-Type" if index is None else f"batch_{index:03d}_Content-Type"
                out.add_property(header, content_type)
        return out

    def _one(self, item: Input) -> tuple[bytes | str, str | None]:
        data = self.input_fn(item.get_as_bytes() or b"", item.get_property("Content-Type"))
        prediction = self.predict_fn(data, self.model)
        result = self.output_fn(prediction, item.get_property("Accept") or "application/json")
        if isinstance(result, tuple):
            body, content_type = result
        else:
            body, content_type = result, None
        if not isinstance(body, (bytes, bytearray, str)):
            body = to_json_bytes(body)
            content_type = content_type or "application/json"
        return body, content_type


class DecoratedHandler(SageMakerHandler):
    """A model.py that marks its functions with DJL's decorators instead of defining handle():
    @init_handler `fn(model_dir) -> model`, @prediction_handler `fn(X, model) -> predictions`,
    and optionally @input_formatter `fn(inputs: Input, content_type=...) -> X` and
    @output_formatter `fn(predictions) -> body`. As in DJL's handlers that use them: without an
    input formatter X is the decoded body's "inputs" (or the whole decoded body); without a
    prediction handler (or when it returns None) the model's predict(X) answers; without an
    output formatter the answer is {"predictions": ...} as JSON."""

    def __init__(self, model_dir: str, *, init: Callable | None, predict: Callable | None,
                 input_formatter: Callable | None, output_formatter: Callable | None) -> None:
        self.model_dir = model_dir
        self.model_fn = init
        self.prediction = predict
        self.input_formatter = input_formatter
        self.output_formatter = output_formatter
        self.model = None
        self.loaded = False

    def _one(self, item: Input) -> tuple[bytes | str, str | None]:
        from handlers.encode_decode import decode  # numpy-free unless the body needs it

        content_type = item.get_property("Content-Type")
        if self.input_formatter is not None:
            data = self.input_formatter(item, content_type=content_type)
        else:
            decoded = decode(item, content_type)
            data = decoded.get("inputs", decoded) if isinstance(decoded, dict) else decoded
        predictions = self.prediction(data, self.model) if self.prediction else None
        if predictions is None:
            predict = getattr(self.model, "predict", None)
            if predict is None:
                raise TypeError("model.py's @prediction_handler returned None and the model "
                                "from @init_handler has no predict(X)")
            predictions = predict(data)
        if self.output_formatter is not None:
            body = self.output_formatter(predictions)
            if isinstance(body, (bytes, bytearray, str)):
                return body, None
            return to_json_bytes(body), "application/json"
        if hasattr(predictions, "tolist"):
            predictions = predictions.tolist()
        return to_json_bytes({"predictions": predictions}), "application/json"
