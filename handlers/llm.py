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

Custom output formatters take one of LMI's two contracts, chosen by the annotation of the
formatter's first parameter (OpenAI and TGI routes keep their fixed shapes, since their clients
parse them):
  dict, another annotation or none: the vLLM-style contract, `fn(response: dict) -> dict | str`.
      On a non-streamed LMI response the formatter gets each per-input dict ({"generated_text",
      "details"?}, or the chat.completion dict) and its result is sent instead (str as text/plain,
      else JSON); on a stream it gets each line's dict and returns the item to send (str/bytes
      as-is, else framed as the stream's JSON line or SSE event).
  RequestOutput / TextGenerationOutput: LMI's contract for its other backends,
      `fn(request_output: TextGenerationOutput) -> str`, called once per generated token with the
      input's TextGenerationOutput so far (handlers/llm_formats.py, RequestOutputFormatter). A
      non-streamed answer is the concatenation of what it returned (a list input: a JSON list of
      one such string per input); a stream sends each non-empty piece as one chunk. The content
      type is text/plain, or the function's `content_type` attribute when it has one.

Adapter-level formatters (LMI): an adapter directory may hold its own model.py with
@input_formatter / @output_formatter functions. They are imported when the adapter is registered
on this worker (register_adapter: an import failure is a 424 and the adapter is not registered),
replaced by update_adapter with a new src, dropped by unregister_adapter. A request on that
adapter uses the adapter's input formatter and output formatter instead of the base model's,
each falling back to the base model's when the adapter's model.py lacks it. The input formatter
is picked before parsing, from the adapter the request names (body "adapters" when it names one
adapter for all its inputs, else the adapter header, else ?adapter=); the client's "adapters"
stay in force when the formatter returns a dict without them (LMI reads the adapter before the
formatter runs). The output formatter follows each input's adapter; a stream uses its request's
adapter's when all inputs share one adapter, else the base model's.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from dataclasses import dataclass, field, replace

from engines.contracts.engine import Capabilities, Engine
from engines.contracts.metrics import RequestClock
from engines.contracts.errors import (AdapterNotFound, LmcError, ModelFailure, SessionNotFound,
                                      exception_body, parse_json)
from engines.contracts.names import ADAPTER_HEADER, API_PROPERTY, ITEM_CODE_PROPERTY
from engines.options import OUTPUT_FORMATS, HandlerOptions
from engines.registry import create_engine
from engines.selection import LLMPlan, plan_from_properties
from engines.types import (GenerationResult, SamplingParams, TokenEvent, ValidationError,
                          collect_results)
from handlers import llm_formats as fmt
from handlers.formatters import INPUT_FORMATTER_TAG, OUTPUT_FORMATTER_TAG
from handlers.inputs import Input, batch_key
from handlers.llm_schema import Api, LLMRequest, parse_request
from handlers.outputs import Output
from handlers.ranks import rank_and_world
from handlers.sessions import LLMSessions, SessionAnswer

logger = logging.getLogger(__name__)


BUILTIN_OUTPUT_FORMATS = frozenset(OUTPUT_FORMATS)

InputFormatter = Callable[..., Any]
OutputFormatter = Callable[[Any], Any]

# One input's engine events in the order they came, as (sample k of the input, event): what a
# RequestOutput formatter is replayed on for a non-streamed answer.
Steps = list[tuple[int, TokenEvent]]


@dataclass(frozen=True)
class AdapterFormatters:
    """The formatters of an adapter directory's model.py (None: that one falls back to the base
    model's)."""

    input: InputFormatter | None
    output: OutputFormatter | None
    source: str  # the model.py they came from
    module: str = ""  # its name in sys.modules


@dataclass(frozen=True)
class _Context:
    """What a RequestOutput formatter sees of a request besides the parsed LLMRequest."""

    parameters: dict[str, Any] = field(default_factory=dict)  # the body's "parameters"
    client_request_id: str | None = None


_adapter_module_ids = itertools.count()
# Request headers that name the request (the front end echoes them as x-request-id).
_REQUEST_ID_PROPERTIES = ("x-request-id", "X-Amzn-SageMaker-Inference-Id", "requestId")


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
        # Adapter-level formatters by adapter name (register_adapter of an adapter dir with a
        # model.py); a request on an adapter not in here uses the base model's.
        self.adapter_formatters: dict[str, AdapterFormatters] = {}
        self._request_ids = itertools.count(1)  # TextGenerationOutput.request_id
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
        contexts: dict[int, _Context] = {}  # by position in parsed, for each LLMRequest
        for item in items:
            try:
                # requestType NEW_SESSION / CLOSE is answered here; a session header is checked.
                answer = self.sessions.answer(item, lmi=not item.get_property(API_PROPERTY))
                if answer is not None:
                    parsed.append(answer)
                    continue
                request, context = self._parse(item)
                if request.stream and inputs.is_batch():
                    raise ValidationError(
                        "stream", "streaming needs batch_size=1 for this model (a stream cannot "
                        "share a dynamic batch); set batch_size=1 or send stream=false")
                contexts[len(parsed)] = context
                parsed.append(request)
            except (ValidationError, AdapterNotFound, SessionNotFound) as exc:
                parsed.append(exc)

        if not inputs.is_batch() and isinstance(parsed[0], LLMRequest) and parsed[0].stream:
            return self._stream_output(parsed[0], contexts[0])

        valid = [p for p in parsed if isinstance(p, LLMRequest)]
        # A RequestOutput formatter is replayed on the engine's events: keep them when one runs.
        record = any(fmt.takes_request_output(f) for p in valid for f in self._formatters_of(p))
        results, events, clocks = self._generate_steps(valid, record=record)
        groups, steps, request_clocks = iter(results), iter(events), iter(clocks)

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
            request_steps = [next(steps) for _ in request.prompts]
            body = self._format(request, request_groups, request_steps, contexts[i])
            self._add(output, body, index, self._content_type(request, body))
            output.set_stats(next(request_clocks).stats(), index)

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
        engine = self._lora_engine()
        # The adapter's own model.py first, as LMI does: if it does not import, the weights
        # are not loaded either.
        formatters = load_adapter_formatters(name, src)
        try:
            info = engine.add_adapter(name, src, pin=_flag(inputs, "pin", False),
                                      preload=_flag(inputs, "preload", True))
        except BaseException:
            _forget_module(formatters)
            raise
        self._set_adapter_formatters(name, formatters)
        return Output().add_as_json({"status": f"Adapter {name} registered", "adapter": info})

    def update_adapter(self, inputs: Input) -> Output:
        name = inputs.get_property("name")
        src = inputs.get_property("src") or None
        engine = self._lora_engine()
        # New weights from another directory bring that directory's model.py (or none).
        formatters = load_adapter_formatters(name, src) if src else None
        try:
            info = engine.update_adapter(name, src=src, pin=_flag(inputs, "pin", None),
                                         preload=_flag(inputs, "preload", None))
        except BaseException:
            _forget_module(formatters)
            raise
        if src:
            self._set_adapter_formatters(name, formatters)
        return Output().add_as_json({"status": f"Adapter {name} updated", "adapter": info})

    def unregister_adapter(self, inputs: Input) -> Output:
        name = inputs.get_property("name")
        try:
            self._lora_engine().remove_adapter(name)
        finally:
            self._set_adapter_formatters(name, None)
        return Output().add_as_json({"status": f"Adapter {name} unregistered"})

    def _set_adapter_formatters(self, name: str, formatters: AdapterFormatters | None) -> None:
        old = self.adapter_formatters.pop(name, None)
        if formatters is not None:
            self.adapter_formatters[name] = formatters
            logger.info("adapter %s: formatters from %s (input: %s, output: %s)", name,
                        formatters.source, formatters.input is not None,
                        formatters.output is not None)
        if old is not None and old is not formatters:
            _forget_module(old)

    def stats(self) -> dict | None:
        """The engine's own statistics (engines/contracts/metrics.py), when it keeps any."""
        stats = getattr(self.engine, "stats", None)
        return stats() if stats is not None else None

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    # ------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------

    def _parse(self, item: Input) -> tuple[LLMRequest, _Context]:
        raw_api = item.get_property(API_PROPERTY)
        try:
            api = Api(raw_api) if raw_api else Api.LMI
        except ValueError:
            raise ValidationError(API_PROPERTY, f"unknown API {raw_api!r}") from None
        payload = _decode_body(item)
        if api is Api.LMI:
            input_formatter = self._input_formatter_for(self._named_adapter(item, payload))
            if input_formatter is not None:
                payload = self._call_input_formatter(payload, input_formatter)
        request = self._with_adapters(parse_request(payload, api, self.engine), item)
        parameters = payload.get("parameters") if isinstance(payload, dict) else None
        context = _Context(dict(parameters) if isinstance(parameters, dict) else {},
                           next((v for k in _REQUEST_ID_PROPERTIES
                                 if (v := item.get_property(k))), None))
        return request, context

    def _named_adapter(self, item: Input, payload: Any) -> str | None:
        """The one adapter a request names before its input formatter runs (the same places,
        in the same order, as `_with_adapters`); None for the base model, or when the body's
        list names several."""
        names = payload.get("adapters") if isinstance(payload, dict) else None
        if isinstance(names, str):
            given = [names]
        elif isinstance(names, list) and names:
            given = names
        else:
            header = item.get_property(ADAPTER_HEADER)
            if header is None and item.contains_key("adapter"):
                header = item.get_as_string("adapter")
            given = [header] if header else []
        distinct = {n if isinstance(n, str) and n not in ("", self.model_name) else None
                    for n in given}
        if len(distinct) == 1 and isinstance(name := distinct.pop(), str):
            return name
        return None

    def _input_formatter_for(self, adapter: str | None) -> InputFormatter | None:
        own = self.adapter_formatters.get(adapter) if adapter else None
        return own.input if own is not None and own.input is not None else self.input_formatter

    def _output_formatter_for(self, adapter: str | None) -> OutputFormatter | None:
        own = self.adapter_formatters.get(adapter) if adapter else None
        return own.output if own is not None and own.output is not None else self.output_formatter

    def _formatters_of(self, request: LLMRequest) -> list[OutputFormatter | None]:
        """The custom output formatter of each input of a request (None: the built-in shape)."""
        if request.api is not Api.LMI:
            return [None] * len(request.prompts)
        if not request.adapters:
            return [self.output_formatter] * len(request.prompts)
        return [self._output_formatter_for(a) for a in request.adapters]

    def _stream_formatter(self, request: LLMRequest) -> OutputFormatter | None:
        """A stream has one formatter: its adapter's when every input is on that adapter."""
        formatters = self._formatters_of(request)
        if len(set(request.adapters)) > 1:
            return self.output_formatter if request.api is Api.LMI else None
        return formatters[0] if formatters else None

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

    def _call_input_formatter(self, payload: Any,
                              formatter: InputFormatter | None = None) -> Any:
        if formatter is None:
            formatter = self.input_formatter
        assert formatter is not None
        named = payload.get("adapters") if isinstance(payload, dict) else None
        # LMI formatters take `tokenizer=`; simple ones take the payload alone.
        parameters = inspect.signature(formatter).parameters.values()
        takes_tokenizer = any(
            p.name == "tokenizer" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )
        if takes_tokenizer:
            result = formatter(payload, tokenizer=self.engine.tokenizer)
        else:
            result = formatter(payload)
        if named is not None and isinstance(result, dict) and "adapters" not in result:
            # LMI takes the adapter from the request before its formatter runs: a formatter
            # that rebuilds the body does not move the request to the base model.
            result = {**result, "adapters": named}
        return result

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def _generate_steps(self, requests: list[LLMRequest], *, record: bool = False
                        ) -> tuple[list[list[GenerationResult]], list[Steps | None],
                                   list[RequestClock]]:
        """One engine call for the whole batch: one group of results per prompt (best first);
        with `record`, each prompt's engine events (else None each); each request's clock."""
        prompts: list[str | list[int]] = []
        params: list[SamplingParams] = []
        adapters: list[str | None] = []
        sizes: list[int] = []
        clocks = [RequestClock(adapter=r.adapters[0] if r.adapters else None) for r in requests]
        clock_of: list[RequestClock] = []  # engine index -> its request's clock
        for request, clock in zip(requests, clocks):
            samples = request.sample_params()
            for i, prompt in enumerate(request.engine_prompts):
                prompts.extend([prompt] * len(samples))
                params.extend(samples)
                adapters.extend([request.adapters[i] if request.adapters else None]
                                * len(samples))
                sizes.append(len(samples))
                clock_of.extend([clock] * len(samples))
        log: list[TokenEvent] | None = [] if record and prompts else None
        if not prompts:
            results = []
        else:
            # What engine.generate does (collect_results over generate_stream), timing each
            # request's tokens (and keeping the events when a formatter replays them).
            stream = (self.engine.generate_stream(prompts, params, adapters) if any(adapters)
                      else self.engine.generate_stream(prompts, params))
            results = collect_results(_timed(stream, clock_of, log), params,
                                      [len(p) if isinstance(p, list) else
                                       self._count_tokens(p) for p in prompts])
            for clock, result in zip(clock_of, results):
                clock.prompt_tokens += result.prompt_tokens
        groups: list[list[GenerationResult]] = []
        steps: list[Steps | None] = []
        owner: list[tuple[int, int]] = []  # engine index -> (prompt group, sample)
        start = 0
        for g, size in enumerate(sizes):
            group = results[start:start + size]
            owner.extend((g, k) for k in range(size))
            start += size
            if size > 1:
                group = sorted(group, key=fmt.cumulative_log_prob, reverse=True)
            groups.append(group)
            steps.append([] if log is not None else None)
        for event in log or ():
            g, k = owner[event.index]
            steps[g].append((k, event))
        return groups, steps, clocks

    def _count_tokens(self, prompt: str) -> int:
        count = getattr(self.engine, "count_tokens", None)
        return count(prompt) if count is not None else len(self.engine.encode(prompt))

    def _format(self, request: LLMRequest, groups: list[list[GenerationResult]],
                steps: list[Steps | None] | None = None, context: _Context | None = None) -> Any:
        api = request.api
        if api is Api.OPENAI_COMPLETIONS:
            return fmt.openai_completion(request, groups, self._meta(request, chat=False))
        if api is Api.OPENAI_CHAT:
            return fmt.openai_chat(request, groups, self._meta(request, chat=True))
        if api.is_tgi:
            body = fmt.tgi_response(request, 0, groups[0])
            # TGI's compat root answers a list, as TGI's and LoRAX's clients read it.
            return [body] if api is Api.TGI else body
        bodies = []
        for i, (group, formatter) in enumerate(zip(groups, self._formatters_of(request))):
            if fmt.takes_request_output(formatter):
                assert steps is not None and steps[i] is not None, "events were not recorded"
                out = self._request_output(formatter, request, i, len(group), context)
                bodies.append(fmt.format_request_output(out, steps[i]))
            elif request.chat or self.output_format.endswith("_chat"):
                meta = self._meta(request, chat=True)
                bodies.append(self._custom(fmt.openai_chat(request, [group], meta), formatter))
            elif self.output_format == "none":
                bodies.append(_full_text(request, i, group[0]))
            else:
                bodies.append(self._custom(fmt.lmi_response(request, i, group), formatter))
        if request.is_list:
            return bodies
        body = bodies[0]
        # tgi_compat: TGI's json answer is a list even for one input.
        return [body] if self.tgi_compat and not isinstance(body, str) else body

    def _custom(self, body: dict[str, Any], formatter: OutputFormatter | None = None) -> Any:
        """The dict contract: the formatter's result replaces the body."""
        return formatter(body) if formatter is not None else body

    def _request_output(self, formatter: OutputFormatter, request: LLMRequest, index: int,
                        samples: int, context: _Context | None) -> fmt.RequestOutputFormatter:
        """Input `index`'s TextGenerationOutput, for a RequestOutput formatter."""
        context = context or _Context()
        return fmt.RequestOutputFormatter(
            formatter, request, index, request_id=next(self._request_ids), samples=samples,
            parameters=dict(context.parameters),
            adapter=request.adapters[index] if request.adapters else None,
            client_request_id=context.client_request_id,
            tokenizer=getattr(self.engine, "tokenizer", None), tgi_compat=self.tgi_compat)

    def _content_type(self, request: LLMRequest, body: Any) -> str:
        if not isinstance(body, str):
            return fmt.JSON
        formatter = self._formatters_of(request)[0]
        if fmt.takes_request_output(formatter):
            return fmt.formatter_content_type(formatter)
        return fmt.TEXT

    def _meta(self, request: LLMRequest, *, chat: bool) -> fmt.OpenAIMeta:
        return fmt.OpenAIMeta.new(chat=chat, model=request.model or self.model_name)

    # ------------------------------------------------------------------------------------------
    # Streaming
    # ------------------------------------------------------------------------------------------

    def _stream_format(self, request: LLMRequest,
                       context: _Context | None = None) -> fmt.StreamFormat:
        api = request.api
        if api is Api.OPENAI_COMPLETIONS:
            return fmt.OpenAICompletionStream(request, self._meta(request, chat=False))
        if api is Api.OPENAI_CHAT:
            return fmt.OpenAIChatStream(request, self._meta(request, chat=True))
        if api.is_tgi:
            return fmt.TgiSSE(request)
        formatter = self._stream_formatter(request)
        if fmt.takes_request_output(formatter):
            samples = len(request.sample_params())
            outputs = [self._request_output(formatter, request, i, samples, context)
                       for i in range(len(request.prompts))]
            return fmt.RequestOutputStream(request, outputs, samples,
                                           fmt.formatter_content_type(formatter))
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
        if formatter is not None:
            stream = fmt.with_custom_formatter(stream, formatter)
        return stream

    def _stream_output(self, request: LLMRequest, context: _Context | None = None) -> Output:
        stream = self._stream_format(request, context)
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
        clock = RequestClock(adapter=request.adapters[0] if request.adapters else None)
        output.add_stream_content(self._stream(stream, _timed(steps, [clock] * len(prompts),
                                                              None)))

        def stats() -> dict:
            # Prompt tokens counted once the stream has ended, off the way to the first token
            # (and after its end time was taken).
            out = clock.stats()
            out["prompt_tokens"] = sum(len(p) if isinstance(p, list) else self._count_tokens(p)
                                       for p in prompts)
            return out

        output.set_stats(stats)
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


def _timed(stream: Iterator[list[TokenEvent]], clock_of: list[RequestClock],
           log: list[TokenEvent] | None) -> Iterator[list[TokenEvent]]:
    """The engine's steps unchanged; each token timed on its request's clock (and logged)."""
    for step in stream:
        now = time.perf_counter()
        for event in step:
            clock = clock_of[event.index]
            clock.token(event.index, now)
            if event.finish_reason is not None:
                clock.finished(event.finish_reason.value)
        if log is not None:
            log.extend(step)
        yield step


def load_adapter_formatters(name: str, src: str) -> AdapterFormatters | None:
    """The @input_formatter / @output_formatter functions of `src`/model.py, imported as a
    module of its own (one per registration: two adapters' model.py never share a module);
    None when there is no model.py or it marks neither. A model.py that fails to import, or marks
    two functions alike, is a ModelFailure (424, as LMI answers it)."""
    path = os.path.join(src, "model.py")
    if not os.path.isfile(path):
        return None
    module_name = f"lmc_adapter_{re.sub(r'[^0-9A-Za-z_]', '_', name)}_{next(_adapter_module_ids)}"
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    spec = importlib.util.spec_from_loader(module_name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look a module up by name
    directory = os.path.abspath(src)
    sys.path.insert(0, directory)  # so it imports the files next to it, while it loads
    try:
        loader.exec_module(module)
        found = {tag: [v for v in vars(module).values()
                       if callable(v) and getattr(v, tag, False) is True]
                 for tag in (INPUT_FORMATTER_TAG, OUTPUT_FORMATTER_TAG)}
        for tag, functions in found.items():
            if len(functions) > 1:
                names = ", ".join(getattr(f, "__name__", "?") for f in functions)
                raise ValueError(f"several functions marked {tag}: {names}; keep one")
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise ModelFailure(f"adapter {name!r}: custom code {path} failed to load: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        if directory in sys.path:
            sys.path.remove(directory)
    input_formatter = next(iter(found[INPUT_FORMATTER_TAG]), None)
    output_formatter = next(iter(found[OUTPUT_FORMATTER_TAG]), None)
    if input_formatter is None and output_formatter is None:
        sys.modules.pop(module_name, None)
        logger.info("adapter %s: %s marks no formatter; the base model's apply", name, path)
        return None
    return AdapterFormatters(input_formatter, output_formatter, path, module_name)


def _forget_module(formatters: AdapterFormatters | None) -> None:
    if formatters is not None and formatters.module:
        sys.modules.pop(formatters.module, None)


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
