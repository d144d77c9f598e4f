"""The default LLM handler: LMI's text-generation schema (plus OpenAI and TGI routes) over an
engine from the registry.

One call to `handle` is one dynamic batch: every valid non-streaming request's prompts go to the
engine as a single `generate` call; an invalid request gets a 400 body (per-item status, see
handlers/service.py) and does not stop the others. A streaming request must come alone (the
default batch_size is 1) and is answered with a generator over `engine.generate_stream`.

Request parsing lives in handlers/llm_schema.py, response shapes in handlers/llm_formats.py.

Which shape a response takes:
  X-LMC-API openai.completions / openai.chat  OpenAI bodies and SSE chunks (+ data: [DONE])
  X-LMC-API tgi.*                             TGI /generate body, TGI SSE
  none (LMI), body with "messages"            chat.completion; streamed: jsonlines_chat
                                              (sse_chat when option.output_formatter says so)
  none (LMI), body with "inputs"              option.output_formatter:
      json (default)  {"generated_text", "details"?}; a list for a list input; with
                      option.tgi_compat the body is wrapped in a list. Streamed: jsonlines
      jsonlines       same, streamed as jsonlines
      sse             streamed as TGI SSE (also what tgi_compat streams)
      json_chat | jsonlines_chat | sse_chat   chat.completion shapes for plain inputs too
      none            the bare generated text (text/plain), streamed as raw text
      anything else   a custom formatter: "module:function", or a function name in the model
                      dir's model.py (as is an @output_formatter function in model.py)

Custom output formatters (LMI's vLLM-style contract, `fn(response: dict) -> dict | str`): on a
non-streamed LMI response the formatter gets each per-input dict ({"generated_text", "details"?},
or the chat.completion dict) and its result is sent instead (str as text, else JSON); on a
stream it gets each line's dict and returns the item to send (str/bytes as-is, else framed as the
stream's JSON line or SSE event). OpenAI and TGI routes keep their fixed shapes, since their
clients parse them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from dataclasses import replace

from engines.contracts.engine import Capabilities, Engine
from engines.contracts.errors import (AdapterNotFound, LmcError, SessionNotFound, exception_body,
                                      parse_json)
from engines.contracts.names import ADAPTER_HEADER, API_PROPERTY, ITEM_CODE_PROPERTY
from engines.options import OUTPUT_FORMATS, HandlerOptions
from engines.registry import create_engine
from engines.selection import LLMPlan, plan_from_properties
from engines.types import GenerationResult, SamplingParams, TokenEvent, ValidationError
from handlers import llm_formats as fmt
from handlers.inputs import Input, batch_key
from handlers.llm_schema import Api, LLMRequest, parse_request
from handlers.outputs import Output
from handlers.ranks import rank_and_world
from handlers.sessions import LLMSessions, SessionAnswer

logger = logging.getLogger(__name__)


BUILTIN_OUTPUT_FORMATS = frozenset(OUTPUT_FORMATS)

InputFormatter = Callable[..., Any]
OutputFormatter = Callable[[Any], Any]


class LLMHandler:
    """`handle(inputs)` for text generation, loaded by handlers.service as the default handler.

    plan: the handler options and engine choice the front end parsed at startup; None for a
        model.py with formatters (the front end does not import it), which this handler then
        derives from the init properties with the same parser.
    input_formatter: LMI's custom input formatter, called as `fn(decoded_payload)` (plus
        `tokenizer=` when it accepts it) for each request; returns the request object.
    output_formatter: a custom output formatter (see the module docstring).
    """

    def __init__(
        self,
        plan: LLMPlan | None = None,
        input_formatter: InputFormatter | None = None,
        output_formatter: OutputFormatter | None = None,
    ) -> None:
        self.plan = plan
        self.input_formatter = input_formatter
        self.output_formatter = output_formatter
        self.output_format = "json"
        self.tgi_compat = False
        self.model_name = "model"
        self.engine: Engine | None = None
        self.sessions = LLMSessions()  # stateful sessions, from the options in _configure

    # ------------------------------------------------------------------------------------------
    # Entry point
    # ------------------------------------------------------------------------------------------

    def handle(self, inputs: Input) -> Output | None:
        if self.engine is None:
            # DJL's warm-up call carries the init properties (and no content): load the model.
            properties = inputs.get_properties()
            plan = self.plan or plan_from_properties(properties, cuda=_cuda_available(),
                                                     tp=_group_size())
            self._configure(plan.handler, properties.get("model_dir"))
            self.engine = self._load_engine(plan)
        if inputs.is_empty():
            return None  # the warm-up itself, or a keep-alive; LMI answers both with nothing

        items = inputs.get_batches()
        parsed: list[LLMRequest | SessionAnswer | LmcError] = []
        for item in items:
            try:
                # requestType NEW_SESSION / CLOSE is answered here; a session header is checked.
                answer = self.sessions.answer(item, lmi=not item.get_property(API_PROPERTY))
                if answer is not None:
                    parsed.append(answer)
                    continue
                request = self._parse(item)
                if request.stream and inputs.is_batch():
                    raise ValidationError(
                        "stream", "streaming needs batch_size=1 for this model (a stream cannot "
                        "share a dynamic batch); set batch_size=1 or send stream=false")
                parsed.append(request)
            except (ValidationError, AdapterNotFound, SessionNotFound) as exc:
                parsed.append(exc)

        if not inputs.is_batch() and isinstance(parsed[0], LLMRequest) and parsed[0].stream:
            return self._stream_output(parsed[0])

        valid = [p for p in parsed if isinstance(p, LLMRequest)]
        groups = iter(self._generate(valid))

        output = Output()
        n_errors = 0
        for i, request in enumerate(parsed):
            index = i if inputs.is_batch() else None
            if isinstance(request, SessionAnswer):
                request.add_to(output, index)
                continue
            if isinstance(request, LmcError):
                n_errors += 1
                self._add(output, exception_body(request), index, fmt.JSON)
                if index is not None:  # this item alone is a 4xx (see handlers/service.py)
                    output.add_property(batch_key(index, ITEM_CODE_PROPERTY), str(request.status))
                continue
            request_groups = [next(groups) for _ in request.prompts]
            body = self._format(request, request_groups)
            content_type = fmt.TEXT if isinstance(body, str) else fmt.JSON
            self._add(output, body, index, content_type)

        if n_errors == len(parsed):
            status = {p.status for p in parsed}
            code = status.pop() if len(status) == 1 else 400
            output.set_code(code).set_message("Not Found" if code == 404 else "Bad Request")
        return output

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------

    def _configure(self, options: HandlerOptions, model_dir: str | None) -> None:
        name = options.output_formatter
        if name in BUILTIN_OUTPUT_FORMATS:
            self.output_format = name
        else:
            # A custom function named in serving.properties wins over a decorated one.
            self.output_formatter = _load_function(name, model_dir)
        self.tgi_compat = options.tgi_compat
        self.sessions = LLMSessions.from_options(options)
        model_id = options.model_id or model_dir or "model"
        self.model_name = os.path.basename(model_id.rstrip("/")) or model_id

    def _load_engine(self, plan: LLMPlan) -> Engine:
        choice = plan.engine
        logger.info("loading %s with the %s engine (%s; %s)", choice.model_dir, choice.name,
                    choice.reason, ", ".join(f"{k}={v}" for k, v in choice.kwargs.items()))
        return create_engine(choice)

    # The engine contract, as the worker asks for it (handlers/service.EngineHost).

    @property
    def capabilities(self) -> Capabilities:
        assert self.engine is not None, "asked before the warm-up loaded the engine"
        return self.engine.capabilities

    def follow(self) -> None:
        assert self.engine is not None
        self.engine.follow()

    # ------------------------------------------------------------------------------------------
    # LoRA adapters: DJL's handler functions, called by the front end's adapter API on every
    # worker (properties name, src; content or properties preload, pin)
    # ------------------------------------------------------------------------------------------

    def _lora_engine(self):
        if self.engine is None or not self.engine.capabilities.lora:
            raise ValidationError("adapters", "LoRA adapters are not enabled for this model; "
                                              "set option.enable_lora=true to serve them")
        return self.engine

    def register_adapter(self, inputs: Input) -> Output:
        name, src = inputs.get_property("name"), inputs.get_property("src")
        if not name or not src:
            raise ValidationError("name" if not name else "src",
                                  "register_adapter needs properties name and src")
        info = self._lora_engine().add_adapter(
            name, src, pin=_flag(inputs, "pin", False), preload=_flag(inputs, "preload", True))
        return Output().add_as_json({"status": f"Adapter {name} registered", "adapter": info})

    def update_adapter(self, inputs: Input) -> Output:
        name = inputs.get_property("name")
        info = self._lora_engine().update_adapter(
            name, src=inputs.get_property("src") or None, pin=_flag(inputs, "pin", None),
            preload=_flag(inputs, "preload", None))
        return Output().add_as_json({"status": f"Adapter {name} updated", "adapter": info})

    def unregister_adapter(self, inputs: Input) -> Output:
        name = inputs.get_property("name")
        self._lora_engine().remove_adapter(name)
        return Output().add_as_json({"status": f"Adapter {name} unregistered"})

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    # ------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------

    def _parse(self, item: Input) -> LLMRequest:
        raw_api = item.get_property(API_PROPERTY)
        try:
            api = Api(raw_api) if raw_api else Api.LMI
        except ValueError:
            raise ValidationError(API_PROPERTY, f"unknown API {raw_api!r}") from None
        payload = _decode_body(item)
        if self.input_formatter is not None and api is Api.LMI:
            payload = self._call_input_formatter(payload)
        return self._with_adapters(parse_request(payload, api, self.engine), item)

    def _with_adapters(self, request: LLMRequest, item: Input) -> LLMRequest:
        """The request's LoRA adapters: from the body (LMI "adapters", LoRAX adapter_id or
        merged_adapters), else the X-Amzn-SageMaker-Adapter-Identifier header (also what the
        front end sets for an OpenAI `model` or a SageMaker inference component naming an
        adapter), else ?adapter=. "" or the base model's name is the base model. An unknown
        name is a 404 listing the adapters: never silently the base model."""
        names: list[str | None] | None = list(request.adapters) or None
        if names is None and request.merge is None:
            given = item.get_property(ADAPTER_HEADER)
            if given is None and item.contains_key("adapter"):
                given = item.get_as_string("adapter")
            if given:
                names = [given] * len(request.prompts)
        if names is None and request.merge is None:
            return request
        names = [None if n in ("", self.model_name) else n for n in names or []]
        if not any(names) and request.merge is None:
            return replace(request, adapters=())
        if not self.capabilities.lora:
            raise ValidationError("adapters", "LoRA adapters are not enabled for this model; "
                                              "set option.enable_lora=true to serve them")
        if request.merge is not None:
            ids, weights = request.merge
            try:
                merged = self.engine.merge_adapters(list(ids), list(weights))
            except ValidationError as exc:
                raise ValidationError("merged_adapters", exc.message) from None
            names = [merged] * len(request.prompts)
        for name in {n for n in names if n}:
            self.engine.check_adapter(name)
        return replace(request, adapters=tuple(names))

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

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def _generate(self, requests: list[LLMRequest]) -> list[list[GenerationResult]]:
        """One engine call for the whole batch; one group of results per prompt, best first."""
        prompts: list[str | list[int]] = []
        params: list[SamplingParams] = []
        adapters: list[str | None] = []
        sizes: list[int] = []
        for request in requests:
            samples = request.sample_params()
            for i, prompt in enumerate(request.engine_prompts):
                prompts.extend([prompt] * len(samples))
                params.extend(samples)
                adapters.extend([request.adapters[i] if request.adapters else None]
                                * len(samples))
                sizes.append(len(samples))
        if not prompts:
            results = []
        elif any(adapters):
            results = self.engine.generate(prompts, params, adapters)
        else:
            results = self.engine.generate(prompts, params)
        groups: list[list[GenerationResult]] = []
        start = 0
        for size in sizes:
            group = results[start:start + size]
            start += size
            if size > 1:
                group = sorted(group, key=fmt.cumulative_log_prob, reverse=True)
            groups.append(group)
        return groups

    def _format(self, request: LLMRequest, groups: list[list[GenerationResult]]) -> Any:
        api = request.api
        if api is Api.OPENAI_COMPLETIONS:
            return fmt.openai_completion(request, groups, self._meta(request, chat=False))
        if api is Api.OPENAI_CHAT:
            return fmt.openai_chat(request, groups, self._meta(request, chat=True))
        if api.is_tgi:
            body = fmt.tgi_response(request, 0, groups[0])
            # TGI's compat root answers a list, as TGI's and LoRAX's clients read it.
            return [body] if api is Api.TGI else body
        if request.chat or self.output_format.endswith("_chat"):
            bodies = [self._custom(fmt.openai_chat(request, [g], self._meta(request, chat=True)))
                      for g in groups]
        elif self.output_format == "none":
            bodies = [_full_text(request, i, g[0]) for i, g in enumerate(groups)]
        else:
            bodies = [self._custom(fmt.lmi_response(request, i, g)) for i, g in enumerate(groups)]
        if request.is_list:
            return bodies
        body = bodies[0]
        # tgi_compat: TGI's json answer is a list even for one input.
        return [body] if self.tgi_compat and not isinstance(body, str) else body

    def _custom(self, body: dict[str, Any]) -> Any:
        return self.output_formatter(body) if self.output_formatter is not None else body

    def _meta(self, request: LLMRequest, *, chat: bool) -> fmt.OpenAIMeta:
        return fmt.OpenAIMeta.new(chat=chat, model=request.model or self.model_name)

    # ------------------------------------------------------------------------------------------
    # Streaming
    # ------------------------------------------------------------------------------------------

    def _stream_format(self, request: LLMRequest) -> fmt.StreamFormat:
        api = request.api
        if api is Api.OPENAI_COMPLETIONS:
            return fmt.OpenAICompletionStream(request, self._meta(request, chat=False))
        if api is Api.OPENAI_CHAT:
            return fmt.OpenAIChatStream(request, self._meta(request, chat=True))
        if api.is_tgi:
            return fmt.TgiSSE(request)
        name = self.output_format
        stream: fmt.StreamFormat
        if request.chat or name.endswith("_chat"):
            sse = name in ("sse", "sse_chat")
            stream = fmt.OpenAIChatStream(request, self._meta(request, chat=True), sse=sse)
        elif name == "none":
            return fmt.RawText(request)
        elif name == "sse" or self.tgi_compat:
            stream = fmt.TgiSSE(request)
        else:
            stream = fmt.LmiJsonlines(request)
        if self.output_formatter is not None:
            stream = fmt.with_custom_formatter(stream, self.output_formatter)
        return stream

    def _stream_output(self, request: LLMRequest) -> Output:
        stream = self._stream_format(request)
        output = Output()
        output.add_property("content-type", stream.content_type)
        samples = request.sample_params()  # best_of == n when streaming (llm_schema checks)
        prompts = [p for p in request.engine_prompts for _ in samples]
        params = samples * len(request.engine_prompts)
        stream.states = [
            fmt.SequenceState(index=i, prompt_index=i // len(samples), choice=i)
            for i in range(len(prompts))
        ]
        # Called here, not in the generator: the engine rejects bad inputs before the first
        # step, and that should be an error status, not a 200 stream that says "error".
        if request.adapters:
            adapters = [a for a in request.adapters for _ in samples]
            steps = self.engine.generate_stream(prompts, params, adapters)
        else:
            steps = self.engine.generate_stream(prompts, params)
        output.add_stream_content(self._stream(stream, steps))
        return output

    def _stream(self, stream: fmt.StreamFormat,
                steps: Iterator[list[TokenEvent]]) -> Iterator[bytes]:
        for item in stream.start():
            yield stream.encode(item)
        try:
            for step in steps:
                for event in step:
                    state = stream.states[event.index]
                    state.add(event)
                    for item in stream.token(state, event):
                        yield stream.encode(item)
        except Exception as exc:
            # Headers (200) are gone already: the stream itself must say it failed.
            logger.exception("generation failed mid-stream")
            for item in stream.error(f"{type(exc).__name__}: {exc}"):
                yield stream.frame(item)
            return
        for item in stream.end():
            yield stream.encode(item)

    @staticmethod
    def _add(output: Output, body: Any, index: int | None, content_type: str) -> None:
        if isinstance(body, (str, bytes)):
            output.add(body, batch_index=index)
        else:
            output.add_as_json(body, batch_index=index)
        key = "content-type" if index is None else batch_key(index, "content-type")
        output.add_property(key, content_type)


def _flag(inputs: Input, key: str, default: bool | None) -> bool | None:
    """A true/false flag of an adapter call, from its properties or its content (DJL sends
    preload and pin as content)."""
    value = inputs.get_property(key)
    if value is None and inputs.contains_key(key):
        value = inputs.get_as_string(key)
    if value is None or value == "":
        return default
    if value.lower() not in ("true", "false"):
        raise ValidationError(key, f"{key} must be true or false, got {value!r}")
    return value.lower() == "true"


def _full_text(request: LLMRequest, index: int, result: GenerationResult) -> str:
    return request.prompts[index] + result.text if request.return_full_text else result.text


def _load_function(name: str, model_dir: str | None) -> Callable[..., Any]:
    """option.output_formatter naming a function: "module:function", or a function of the
    model dir's model.py."""
    module_name, sep, attr = name.partition(":")
    if sep:
        if model_dir and os.path.abspath(model_dir) not in sys.path:
            sys.path.insert(0, os.path.abspath(model_dir))
        module = importlib.import_module(module_name)
    else:
        attr = name
        path = os.path.join(model_dir or ".", "model.py")
        if not os.path.isfile(path):
            raise ValueError(
                f"option.output_formatter={name} is not one of "
                f"{', '.join(sorted(BUILTIN_OUTPUT_FORMATS))} and there is no {path} to find a "
                "function of that name in; use a built-in name or module:function")
        spec = importlib.util.spec_from_file_location(f"lmc_output_formatter_{id(path)}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"option.output_formatter={name}: {module.__name__} has no function "
                         f"{attr!r}")
    return function


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
    return parse_json(text)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _group_size() -> int:
    """The worker group's size (what tensor_parallel_degree=max means here)."""
    return rank_and_world()[1]
