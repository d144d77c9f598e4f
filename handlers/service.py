"""Loads a model's handler and turns one dispatch (a request or a dynamic batch) into one
result per request, following DJL Serving's rules for what `handle(inputs)` may return.

Resolution of the handler, first match wins:
  1. properties["entryPoint"]: a file (relative to model_dir, or absolute), a dotted module
     name, or one of LMI's built-in handler names (-> the default LLM handler);
  2. model_dir/model.py;
  3. the default LLM handler, when model_dir/config.json exists (a Hugging Face model);
  4. otherwise HandlerLoadError.
A loaded module is used as: its `handle(inputs)`; else SageMaker-style model_fn/input_fn/
predict_fn/output_fn; else its @input_formatter/@output_formatter functions plugged into the
default LLM handler.

DJL's other handler functions: a request whose "handler" property names one of
register_adapter / update_adapter / unregister_adapter (the front end's adapter API sends them
to every worker) goes to that function of the model.py, or of the default LLM handler, instead
of handle; a handler that does not define it answers 400 saying so.

How a user's handle(inputs) is driven (DJL's modes):
  - plain: one dispatch at a time, on the worker's main thread;
  - async: handle is `async def` (or option.async_mode=true, DJL's switch): up to
    option.max_rolling_batch_size requests at once, every one a coroutine on the worker's one
    event loop (handlers/async_runner.py). handle returns an Output (a plain one, or one
    carrying an Output.binary_encode frame), None, or an async generator of frame Outputs: a
    stream (handlers/frames.py). option.async_mode=false keeps an async handle one at a time;
  - rolling batch: option.rolling_batch set to anything but "disable" (handlers/rolling.py).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from engines.contracts.engine import Capabilities, TPMode
from engines.contracts.errors import ValidationError, error_body, handler_error
from engines.options import _parse_bool as parse_bool
from engines.contracts.names import (ADAPTER_FUNCTIONS, CONTROL_FUNCTIONS, FUNCTION_PROPERTY,
                                     ITEM_CODE_PROPERTY, LMI_BUILTIN_ENTRY_POINTS)
from handlers.async_runner import AsyncRunner, is_async_iterable
from handlers.formatters import (INIT_HANDLER_TAG, INPUT_FORMATTER_TAG, OUTPUT_FORMATTER_TAG,
                                 PREDICTION_HANDLER_TAG)
from handlers.frames import FrameError, FrameStream, frames_result, output_frame
from handlers.inputs import Input, input_from_items, split_batch_key
from handlers.outputs import Output
from handlers.ranks import rank_and_world
from handlers.rolling import DEFAULT_MAX_ROLLING_BATCH_SIZE, RollingBatch
from handlers.sagemaker import SAGEMAKER_FUNCTIONS, DecoratedHandler, SageMakerHandler

if TYPE_CHECKING:
    from engines.contracts.protocol import RequestItem
    from engines.selection import LLMPlan

logger = logging.getLogger(__name__)

Handle = Callable[[Input], "Output | None"]

# The default handler lives in its own module so that torch is imported only when it is used.
DEFAULT_HANDLER_MODULE = "handlers.llm"
DEFAULT_HANDLER_CLASS = "LLMHandler"



_module_ids = itertools.count()


@dataclass
class ItemResult:
    """The answer to one request. With `stream` set, `body` is empty and the chunks come from
    the iterator, produced lazily while the worker sends them."""

    code: int
    message: str
    headers: dict[str, str]
    body: bytes
    stream: Iterator[bytes] | None = field(default=None, repr=False)
    # Output.finalize's function: the worker calls it once the answer is sent.
    finalize: Callable[[], None] | None = field(default=None, repr=False)
    # Engine statistics for the server's metrics: a dict, or (a stream) a function the worker
    # calls when the stream has ended.
    stats: dict | Callable[[], dict | None] | None = field(default=None, repr=False)


class HandlerLoadError(Exception):
    """The handler could not be found, imported or warmed up. The message names the file."""


def error_result(exc: BaseException) -> ItemResult:
    """The result for a request whose handler raised `exc` (engines/contracts/errors.py's table)."""
    status, type_, reason = handler_error(exc)
    return failed_result(status, reason, str(exc) or type(exc).__name__, type_,
                         field=getattr(exc, "field", None))


def failed_result(status: int, reason: str, message: str, type_: str | None = None, *,
                  field: str | None = None) -> ItemResult:
    return ItemResult(status, reason, {"content-type": "application/json"},
                      error_body(status, message, type_, field=field, lmi=True))


# ---- the service -----------------------------------------------------------------------------


class EngineHost(Protocol):
    """A handler object that owns an engine (the default LLM handler): the worker asks it, by
    name, how many requests it serves at once and how a tensor-parallel group runs it."""

    capabilities: Capabilities

    def follow(self) -> None: ...

    def shutdown(self) -> None: ...


# A plain handle(inputs) function: one call at a time; in a TP group every rank runs it.
_PLAIN_HANDLER = Capabilities(max_concurrency=1, tp_mode=TPMode.REPLICATE)

# Response headers a handler must not set: the HTTP layer owns them. (DJL's own test handlers
# copy every request property, Content-Length and Host included, onto their Output.)
_TRANSPORT_HEADERS = frozenset({
    "content-length", "transfer-encoding", "connection", "keep-alive", "host", "upgrade",
    "te", "trailer", "proxy-connection", "expect", "request_tracking_id"})


def clean_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _TRANSPORT_HEADERS}


class ModelService:
    def __init__(self, handle: Handle, *, source: str, host: EngineHost | None = None,
                 functions: dict[str, Callable] | None = None,
                 concurrency: int = 1) -> None:
        self.handle = handle
        self.source = source  # where the handler came from, for logs and error messages
        self.host = host
        # DJL's named handler functions besides handle (register_adapter, ...): a request whose
        # "handler" property names one is passed to it instead of handle.
        self.functions = functions or {}
        # > 1: an async handler, that many requests at once on the event loop.
        self.concurrency = concurrency
        self.runner: AsyncRunner | None = None  # made on the first awaitable a handler returns
        self._runner_lock = threading.Lock()
        self.rolling = None  # handlers.rolling.RollingBatch, for a rolling-batch handler

    @property
    def capabilities(self) -> Capabilities:
        if self.host is not None:
            return self.host.capabilities
        if self.rolling is not None:
            return self.rolling.capabilities
        if self.concurrency > 1:
            return Capabilities(max_concurrency=self.concurrency, tp_mode=TPMode.NONE)
        return _PLAIN_HANDLER

    def _resolve(self, value):
        """A handler's return value, awaited on the event loop when it is awaitable."""
        if not inspect.isawaitable(value):
            return value
        if self.runner is None:
            with self._runner_lock:
                if self.runner is None:
                    self.runner = AsyncRunner()
        return self.runner.resolve(value)

    def call(self, handle: Callable, inputs: Input):
        return self._resolve(handle(inputs))

    def follow(self) -> None:
        """On a rank > 0 of a TPMode.ENGINE group: serve the engine's steps until rank 0 shuts
        it down."""
        assert self.host is not None, "only an engine that drives its ranks has follow()"
        self.host.follow()

    def stats(self) -> dict | None:
        """Engine-wide statistics for the Stats message (None: this handler keeps none)."""
        stats = getattr(self.host, "stats", None)
        return stats() if stats is not None else None

    def shutdown(self) -> None:
        if self.host is not None:
            self.host.shutdown()
        if self.rolling is not None:
            self.rolling.shutdown()
        if self.runner is not None:
            self.runner.shutdown()

    @classmethod
    def load(cls, model_dir: str, properties: dict[str, str],
             llm: LLMPlan | None = None) -> ModelService:
        """Find, import and warm up the handler. Raises HandlerLoadError. `llm`: the front end's
        plan for the default LLM handler (None: it decides from `properties` if it runs)."""
        handle, source, host, functions = _resolve_handler(model_dir, properties, llm)
        service = cls(handle, source=source, host=host, functions=functions)
        mode = _mode(handle, host, properties, source)
        # DJL's contract: the first call carries no content, only the init properties, so a
        # handler can load its model there. Whatever it returns is ignored.
        try:
            service.call(handle, Input(dict(properties)))
        except Exception as e:
            raise HandlerLoadError(
                f"{source}: handle() failed during warm-up: {type(e).__name__}: {e}. Hint: the "
                "first call to handle() has no content, only init properties; load the model "
                "there and return None when inputs.is_empty()") from e
        if mode != "plain":
            size = _int_property(properties, "max_rolling_batch_size",
                                 DEFAULT_MAX_ROLLING_BATCH_SIZE, source)
        if mode == "rolling":
            service.rolling = RollingBatch(lambda inputs: service.call(handle, inputs), source,
                                           size, clean_headers)
        elif mode == "async":
            service.concurrency = size
        return service

    def invoke(self, items: Sequence[RequestItem]) -> list[ItemResult]:
        """One result per item, in order. Handler errors become error results, never raise."""
        n = len(items)
        assert n > 0, "invoke() needs at least one request"
        handle = self.handle
        function = items[0].properties.get(FUNCTION_PROPERTY)
        if function is not None:
            handle = self.functions.get(function)
            if handle is None:
                message = (f"{self.source} does not define {function}(inputs)"
                           if function in CONTROL_FUNCTIONS else
                           f"unknown handler function {function!r}; known: "
                           f"{', '.join(CONTROL_FUNCTIONS)}")
                if function in ADAPTER_FUNCTIONS:
                    message += "; it cannot manage LoRA adapters"
                return [failed_result(400, "Bad Request", message, "BadRequest")] * n
        elif self.rolling is not None:
            return self.rolling.invoke(items)
        try:
            out = self.call(handle, input_from_items(items))
        except Exception as e:
            if not isinstance(e, ValidationError):
                logger.exception("handler %s failed on a batch of %d", self.source, n)
            return [error_result(e) for _ in range(n)]
        if out is None:
            return [ItemResult(204, "No Content", {}, b"") for _ in range(n)]
        if is_async_iterable(out):
            if n != 1:
                error = (f"handler streamed one response for a batch of {n}; streaming needs "
                         "batch size 1")
                return [failed_result(424, "Invalid output", error) for _ in range(n)]
            return [frames_result(self._frame_stream(out), clean_headers)]
        if not isinstance(out, Output):
            error = (f"Invalid output type: handle() returned {type(out).__name__}; "
                     "return an Output, None or (async) a generator of Outputs")
            return [failed_result(424, "Invalid output type", error) for _ in range(n)]
        try:
            frame = output_frame(out, strict=False) if n == 1 else None
            if frame is not None:
                return [frames_result(FrameStream(iter([(frame, out.properties)]), _nothing),
                                      clean_headers)]
            if out.stream_content is not None and is_async_iterable(out.stream_content):
                out.stream_content = self._async_items(out.stream_content)
            results = _split_output(out, n)
        except Exception as e:  # the handler's mistake: that request's 424, never a dead worker
            logger.exception("handler %s returned an Output that cannot be sent", self.source)
            error = f"handler returned an unusable Output: {type(e).__name__}: {e}"
            return [failed_result(424, "Invalid output", error) for _ in range(n)]
        if out.stats:
            for i, r in enumerate(results):
                r.stats = out.stats.get(i if n > 1 else None, out.stats.get(i))
        if out.finalize_function is not None:
            finalize = out.finalize_function
            results[-1].finalize = lambda: self._resolve(finalize(*out.finalize_args))
        return results

    def _async_items(self, agen):
        self._resolve(_noop())  # make sure the event loop exists
        assert self.runner is not None
        return self.runner.iterate(agen)

    def _frame_stream(self, agen) -> FrameStream:
        """An async generator of frame Outputs as the frames of one request."""
        items = self._async_items(agen)

        def frames():
            for item in items:
                if isinstance(item, Output):
                    yield output_frame(item, strict=True), item.properties
                elif isinstance(item, (str, bytes, bytearray)):  # plain chunks: data, not last
                    text = item if isinstance(item, str) else bytes(item).decode("utf-8")
                    yield {"data": text}, {}
                else:
                    raise FrameError(424, f"async handler yielded {type(item).__name__}; "
                                          "yield Outputs made with Output.binary_encode")

        return FrameStream(frames(), items.close)


# ---- splitting an Output back into per-request results ---------------------------------------



def _split_output(out: Output, n: int) -> list[ItemResult]:
    headers = _split_headers(out.properties, n)
    stream = out.iter_stream()
    if stream is not None:
        if n != 1:
            error = (f"handler streamed one response for a batch of {n}; streaming needs "
                     "batch size 1 (set batch_size=1, or return per-item content)")
            return [failed_result(424, "Invalid output", error) for _ in range(n)]
        # Content added next to a stream is sent before it rather than dropped.
        head = [bytes(v) for _, v in out.content]
        chunks = itertools.chain(head, stream) if head else stream
        return [ItemResult(out.code, out.message, headers[0], b"", chunks)]

    bodies = _split_content(out, n)
    if isinstance(bodies, str):
        return [failed_result(424, "Invalid output", bodies) for _ in range(n)]
    results = []
    for i, body in enumerate(bodies):
        if body is None:
            results.append(failed_result(
                424, "Invalid output", f"handler returned no output for batch item {i}"))
            continue
        # LMC extension: property "batch_%03d_code" gives one item of a batch its own status
        # (e.g. 400 for one bad request among good ones); it is not sent as a header.
        code = headers[i].pop(ITEM_CODE_PROPERTY, None)
        if code and not (code.isdigit() and 100 <= int(code) <= 599):
            results.append(failed_result(424, "Invalid output", (
                f"handler set property {ITEM_CODE_PROPERTY!r}={code!r} for batch item {i}; it "
                f"must be an HTTP status code (100-599)")))
            continue
        results.append(ItemResult(int(code) if code else out.code, out.message, headers[i], body))
    return results


def _split_headers(properties: dict[str, str], n: int) -> list[dict[str, str]]:
    shared: dict[str, str] = {}
    own: list[dict[str, str]] = [{} for _ in range(n)]
    for key, value in properties.items():
        split = split_batch_key(key)
        if split is None:
            shared[key] = str(value)
        elif split[0] < n:
            own[split[0]][split[1]] = str(value)
    return [clean_headers({**shared, **mine}) for mine in own]


def _nothing() -> None:
    pass


async def _noop() -> None:
    pass


def _flag(properties: dict[str, str], key: str, source: str) -> bool | None:
    value = properties.get(key)
    if value is None or value.strip() == "":
        return None
    try:
        return parse_bool(value)
    except ValueError:
        raise HandlerLoadError(f"{source}: option.{key}={value!r} is not a boolean; use true "
                               "or false") from None


def _int_property(properties: dict[str, str], key: str, default: int, source: str) -> int:
    value = properties.get(key)
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise HandlerLoadError(f"{source}: option.{key}={value!r} must be an integer >= 1")
    return number


def _mode(handle: Handle, host: EngineHost | None, properties: dict[str, str],
          source: str) -> str:
    """How the worker drives a user's handle: "plain", "async" or "rolling" (module docstring).
    The default LLM handler (which owns an engine) is always driven by its engine."""
    if host is not None:
        return "plain"
    async_mode = _flag(properties, "async_mode", source)
    if async_mode is None:
        async_mode = inspect.iscoroutinefunction(handle) or inspect.isasyncgenfunction(handle)
    rolling = (properties.get("rolling_batch") or "disable").strip().lower() != "disable"
    sagemaker = isinstance(getattr(handle, "__self__", None), SageMakerHandler)
    mode = "async" if async_mode else "rolling" if rolling and not sagemaker else "plain"
    if mode != "plain" and rank_and_world()[1] > 1:
        switch = "option.async_mode" if mode == "async" else "option.rolling_batch"
        raise HandlerLoadError(
            f"{source}: {switch} runs a custom handler in one process; it cannot also run in "
            f"a tensor-parallel group of {rank_and_world()[1]} ranks. Set "
            "tensor_parallel_degree=1 (the handler may use several devices itself)")
    return mode


def _pick(entries: list[tuple[str | None, bytes]]) -> bytes | None:
    """The body among several entries: the one named "data", else the first."""
    for key, value in entries:
        if key == "data":
            return bytes(value)
    return bytes(entries[0][1]) if entries else None


def _split_content(out: Output, n: int) -> list[bytes | None] | str:
    """Per-item bodies (None: no output for that item), or a message saying why they can't be
    matched to the batch."""
    entries = list(out.content)
    prefixed: dict[int, list[tuple[str | None, bytes]]] = {}
    for key, value in entries:
        split = split_batch_key(key)
        if split is not None and split[0] < n:
            prefixed.setdefault(split[0], []).append((split[1], value))
    if prefixed:
        return [_pick(prefixed.get(i, [])) for i in range(n)]
    if len(entries) == n:
        return [bytes(v) for _, v in entries]
    if n == 1:
        return [_pick(entries) or b""]
    if out.code >= 400 and len(entries) == 1:
        # Output.error() on a batch: the one error answers every request in it.
        return [bytes(entries[0][1])] * n
    return f"handler returned {len(entries)} outputs for a batch of {n}"


# ---- finding and importing the handler -------------------------------------------------------


# (handle, where it came from, the engine-owning handler object when it is the default one,
#  the control functions it defines: register_adapter, ...)
Resolved = tuple[Handle, str, "EngineHost | None", dict[str, Callable]]


def _functions(obj: object) -> dict[str, Callable]:
    return {name: f for name in CONTROL_FUNCTIONS
            if callable(f := getattr(obj, name, None))}


def _resolve_handler(model_dir: str, properties: dict[str, str],
                     llm: LLMPlan | None) -> Resolved:
    entry = properties.get("entryPoint")
    if entry:
        if entry in LMI_BUILTIN_ENTRY_POINTS:
            return _default_handler(f"option.entryPoint={entry}", llm)
        path = entry if os.path.isabs(entry) else os.path.join(model_dir, entry)
        if os.path.isfile(path):
            return _handler_from_module(_import_file(path), model_dir, path, properties)
        if entry.endswith(".py") or "/" in entry or os.sep in entry:
            raise HandlerLoadError(
                f"option.entryPoint={entry}: no such file {path}. Hint: give a path relative "
                f"to the model directory {model_dir}, an absolute path, or a module name")
        module = _import_module(entry, model_dir)
        return _handler_from_module(module, model_dir, getattr(module, "__file__", None) or entry,
                                    properties)
    path = os.path.join(model_dir, "model.py")
    if os.path.isfile(path):
        return _handler_from_module(_import_file(path), model_dir, path, properties)
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return _default_handler(f"default LLM handler for {model_dir}", llm)
    raise HandlerLoadError(
        f"no model.py, no option.entryPoint and no config.json in {model_dir}: nothing to "
        "serve. Hint: add a model.py with handle(inputs), set option.entryPoint, or point "
        "option.model_id at a Hugging Face model")


def _add_to_path(directory: str) -> None:
    # So a model.py can import the modules next to it, as it could under DJL Serving.
    directory = os.path.abspath(directory)
    if directory not in sys.path:
        sys.path.insert(0, directory)


def _import_file(path: str) -> ModuleType:
    _add_to_path(os.path.dirname(path))
    stem = os.path.basename(path).split(".")[0] or "model"
    # A fresh name per load: two models (or two tests) with a model.py must not share a module.
    name = f"lmc_user_{stem}_{next(_module_ids)}"
    # SourceFileLoader explicitly, so a file not ending in .py (model.py.example) loads too.
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and pickle look the module up by name.
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise HandlerLoadError(
            f"{path}: import failed: {type(e).__name__}: {e}. Hint: check the file runs with "
            "`python` in the model directory and that its requirements are installed") from e
    return module


def _import_module(name: str, model_dir: str) -> ModuleType:
    _add_to_path(model_dir)
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise HandlerLoadError(
            f"option.entryPoint={name}: cannot import module: {type(e).__name__}: {e}. Hint: "
            f"use a file in {model_dir} (e.g. model.py) or an importable module name") from e


def _handler_from_module(module: ModuleType, model_dir: str, source: str,
                         properties: dict[str, str]) -> Resolved:
    # option.handler: DJL's name for the entry function (default handle).
    name = (properties.get(FUNCTION_PROPERTY) or "").strip() or "handle"
    handle = getattr(module, name, None)
    if callable(handle):
        return handle, source, None, _functions(module)
    if name != "handle":
        raise HandlerLoadError(f"{source}: option.handler={name} names no function in it")
    in_fmt = _tagged(module, INPUT_FORMATTER_TAG)
    out_fmt = _tagged(module, OUTPUT_FORMATTER_TAG)
    init, predict = _tagged(module, INIT_HANDLER_TAG), _tagged(module, PREDICTION_HANDLER_TAG)
    if init is not None or predict is not None:
        handler = DecoratedHandler(model_dir, init=init, predict=predict,
                                   input_formatter=in_fmt, output_formatter=out_fmt)
        return (handler.handle, f"{source} (@init_handler/@prediction_handler)", None,
                _functions(module))
    if any(callable(getattr(module, f, None)) for f in SAGEMAKER_FUNCTIONS):
        return SageMakerHandler(module, model_dir).handle, source, None, _functions(module)
    if in_fmt is not None or out_fmt is not None:
        # The front end does not import a model.py, so this handler chooses its engine itself.
        handle, _, host, functions = _default_handler(source, None, input_formatter=in_fmt,
                                                      output_formatter=out_fmt)
        return handle, f"{source} (formatters on the default LLM handler)", host, functions
    raise HandlerLoadError(
        f"{source}: defines no handle(inputs), no SageMaker model_fn/predict_fn, no "
        "@init_handler/@prediction_handler and no @input_formatter/@output_formatter function. "
        "Hint: add `def handle(inputs)`")


def _tagged(module: ModuleType, tag: str) -> Callable | None:
    found = [v for v in vars(module).values() if callable(v) and getattr(v, tag, False) is True]
    if len(found) > 1:
        names = ", ".join(getattr(f, "__name__", "?") for f in found)
        raise HandlerLoadError(f"{module.__file__}: several functions marked {tag}: {names}; "
                               "keep one")
    return found[0] if found else None


def _default_handler(source: str, llm: LLMPlan | None,
                     **formatters: Callable | None) -> Resolved:
    try:
        cls = getattr(importlib.import_module(DEFAULT_HANDLER_MODULE), DEFAULT_HANDLER_CLASS)
        handler = cls(plan=llm, **formatters)
    except Exception as e:
        raise HandlerLoadError(
            f"{source}: cannot start the default LLM handler ({DEFAULT_HANDLER_MODULE}): "
            f"{type(e).__name__}: {e}") from e
    return handler.handle, source, handler, _functions(handler)
