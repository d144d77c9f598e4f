"""The default LLM handler: LMI's text-generation schema over an engine from the registry.

Request  `{"inputs": str | [str], "parameters": {...}}` (DESIGN.md §5);
response `{"generated_text": str}`, or a list of those for a list input.

One call to `handle` is one dynamic batch: every valid request's prompts go to the engine as a
single `generate` call; an invalid request gets a 400 body and does not stop the others.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engines.registry import get_engine_class
from engines.types import GenerationResult, SamplingParams, ValidationError
from handlers.inputs import Input, batch_key
from handlers.outputs import Output
from handlers.service import ITEM_CODE_PROPERTY

logger = logging.getLogger(__name__)

# The only engine wired in so far; option.rolling_batch will choose among more.
DEFAULT_ENGINE = "hf"
ACCEPTED_REQUEST_KEYS = ("inputs", "parameters", "stream")

InputFormatter = Callable[..., Any]
OutputFormatter = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class _Request:
    """One validated request: its prompts and whether the client sent a list."""

    prompts: list[str]
    params: SamplingParams
    is_list: bool


class LLMHandler:
    """`handle(inputs)` for text generation, loaded by handlers.service as the default handler.

    input_formatter: LMI's custom input formatter, called as `fn(decoded_payload)` (plus
        `tokenizer=` when it accepts it) for each request; returns the request object.
    output_formatter: called on each `{"generated_text": ...}` dict; returns what is sent
        (a str is sent as-is, anything else as JSON).
    """

    def __init__(
        self,
        input_formatter: InputFormatter | None = None,
        output_formatter: OutputFormatter | None = None,
    ) -> None:
        self.input_formatter = input_formatter
        self.output_formatter = output_formatter
        self.engine: Any = None

    # ------------------------------------------------------------------------------------------
    # Entry point
    # ------------------------------------------------------------------------------------------

    def handle(self, inputs: Input) -> Output | None:
        if self.engine is None:
            # DJL's warm-up call carries the init properties (and no content): load the model.
            self.engine = self._load_engine(inputs.get_properties())
        if inputs.is_empty():
            return None  # the warm-up itself, or a keep-alive; LMI answers both with nothing

        items = inputs.get_batches()
        parsed: list[_Request | ValidationError] = []
        for item in items:
            try:
                parsed.append(self._parse(item))
            except ValidationError as exc:
                parsed.append(exc)

        valid = [p for p in parsed if isinstance(p, _Request)]
        prompts = [prompt for request in valid for prompt in request.prompts]
        params = [request.params for request in valid for _ in request.prompts]
        results = iter(self.engine.generate(prompts, params) if prompts else [])

        output = Output()
        n_errors = 0
        for i, request in enumerate(parsed):
            index = i if inputs.is_batch() else None
            if isinstance(request, ValidationError):
                n_errors += 1
                self._add(output, _error_body(request), index, "application/json")
                if index is not None:  # this item alone is a 400 (see handlers/service.py)
                    output.add_property(batch_key(index, ITEM_CODE_PROPERTY), "400")
                continue
            answers = [self._format(next(results)) for _ in request.prompts]
            body = answers if request.is_list else answers[0]
            content_type = "text/plain" if isinstance(body, str) else "application/json"
            self._add(output, body, index, content_type)

        if n_errors == len(parsed):
            output.set_code(400).set_message("Bad Request")
        return output

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------

    def _load_engine(self, properties: dict[str, str]) -> Any:
        model_dir = _resolve_model_dir(properties)
        engine_class = get_engine_class(DEFAULT_ENGINE)
        dtype = properties.get("dtype") or "auto"
        logger.info("loading %s with the %s engine (dtype=%s)", model_dir, DEFAULT_ENGINE, dtype)
        return engine_class(model_dir, dtype=dtype)

    # ------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------

    def _parse(self, item: Input) -> _Request:
        payload = _decode_body(item)
        if self.input_formatter is not None:
            payload = self._call_input_formatter(payload)
        if not isinstance(payload, dict):
            raise ValidationError(
                "inputs",
                f'the request must be a JSON object like {{"inputs": "text"}}, '
                f"got {type(payload).__name__}",
            )
        unknown = sorted(set(payload) - set(ACCEPTED_REQUEST_KEYS))
        if unknown:
            raise ValidationError(
                unknown[0],
                f"unknown request field(s) {', '.join(map(repr, unknown))}; accepted fields: "
                f"{', '.join(ACCEPTED_REQUEST_KEYS)} (generation options go under 'parameters')",
            )
        if payload.get("stream", False) not in (False, None):
            # Streaming arrives with the LMI schema work; refusing is better than buffering.
            raise ValidationError("stream", "stream=true is not supported yet; omit 'stream'")

        prompts, is_list = _parse_inputs(payload.get("inputs"))
        params = SamplingParams.from_request(payload.get("parameters"))
        limit = self.engine.max_context
        for i, prompt in enumerate(prompts):
            n_tokens = self.engine.count_tokens(prompt)
            if n_tokens >= limit:
                where = f"inputs[{i}]" if is_list else "inputs"
                raise ValidationError(
                    where,
                    f"{where} has {n_tokens} tokens but the model's context holds {limit} "
                    "(prompt + generated tokens); shorten the input",
                )
        return _Request(prompts=prompts, params=params, is_list=is_list)

    def _call_input_formatter(self, payload: Any) -> Any:
        assert self.input_formatter is not None
        # LMI formatters take `tokenizer=`; simple ones take the payload alone.
        parameters = inspect.signature(self.input_formatter).parameters.values()
        takes_tokenizer = any(
            p.name == "tokenizer" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )
        if takes_tokenizer:
            return self.input_formatter(payload, tokenizer=self.engine.tokenizer)
        return self.input_formatter(payload)

    def _format(self, result: GenerationResult) -> Any:
        answer: dict[str, Any] = {"generated_text": result.text}
        if self.output_formatter is not None:
            return self.output_formatter(answer)
        return answer

    @staticmethod
    def _add(output: Output, body: Any, index: int | None, content_type: str) -> None:
        if isinstance(body, str):
            output.add(body, batch_index=index)
        else:
            output.add_as_json(body, batch_index=index)
        key = "content-type" if index is None else batch_key(index, "content-type")
        output.add_property(key, content_type)


def _resolve_model_dir(properties: dict[str, str]) -> str:
    """option.model_id when it is a local dir, else the model dir the server was given."""
    model_id = properties.get("model_id")
    if model_id and os.path.isdir(model_id):
        return model_id
    model_dir = properties.get("model_dir")
    if model_dir and os.path.isfile(os.path.join(model_dir, "config.json")):
        return model_dir
    if model_id:
        raise ValueError(
            f"option.model_id={model_id} is not a local directory and {model_dir} has no "
            "config.json; point option.model_id at a local model dir (hub downloads are off)"
        )
    raise ValueError(
        f"no model to load: {model_dir} has no config.json and option.model_id is not set"
    )


def _decode_body(item: Input) -> Any:
    raw = item.get_as_bytes()
    if raw is None:
        raise ValidationError("inputs", 'the request has no body; send {"inputs": "text"}')
    content_type = (item.get_property("content-type") or "").lower()
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("body", f"the body is not UTF-8 text: {exc}") from exc
    if content_type.startswith("text/"):
        # LMI takes a plain-text body as the prompt itself.
        return {"inputs": text}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            "body",
            f'the body is not valid JSON ({exc}); send {{"inputs": "text", "parameters": {{}}}} '
            "or use Content-Type: text/plain",
        ) from exc


def _parse_inputs(value: Any) -> tuple[list[str], bool]:
    """(prompts, whether the client sent a list)."""
    if isinstance(value, str):
        if not value:
            raise ValidationError("inputs", "inputs must be a non-empty string")
        return [value], False
    if isinstance(value, list):
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
    raise ValidationError(
        "inputs", f"inputs must be a string or a list of strings, got {type(value).__name__}"
    )


def _error_body(error: ValidationError) -> dict[str, Any]:
    return {"code": 400, "type": "ValidationError", "field": error.field, "message": error.message}
