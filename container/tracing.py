"""OpenTelemetry tracing of requests: one trace per request, exported over OTLP/HTTP (protobuf).

Off unless configured, the standard way: OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, or OTEL_TRACES_EXPORTER names an exporter (otlp, or
console to print spans); OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none keep it off.
The standard variables are honoured (see `Settings`): the resource (OTEL_SERVICE_NAME, here
"lmc" unless set, OTEL_RESOURCE_ATTRIBUTES, read by the OpenTelemetry SDK's Resource), the
sampler (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG), the propagators (OTEL_PROPAGATORS: W3C
tracecontext; baggage is accepted and has nothing to carry here), the exporter
(OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT / HEADERS / TIMEOUT / COMPRESSION / CERTIFICATE) and the
batching (OTEL_BSP_SCHEDULE_DELAY, _MAX_QUEUE_SIZE, _MAX_EXPORT_BATCH_SIZE, _EXPORT_TIMEOUT).
OTEL_PYTHON_EXCLUDED_URLS (comma-separated regular expressions searched in the path) names
requests that are not traced; unset, /ping and /metrics are not. A value this module cannot
honour is a ConfigError at startup, naming the variable.

Why not the SDK's tracer: it costs ~300 µs of CPU per traced request here (span objects,
attribute checks, the batch processor, its encoder), a third of the echo front end's
throughput. Here a request costs a W3C traceparent parse and two random ids when it arrives,
one tuple appended to a queue when it ends; the export thread builds the request's spans and
encodes them straight into OTLP protobuf bytes (container/otlp.py), off the event loop.

While off, nothing of opentelemetry is imported and start_request returns None at once.

A trace (container/observe.py calls start_request and end_request around every request):

    {METHOD} {route}    SERVER span, the client's traceparent as its parent
      parse             arrival -> the job is queued (reading and checking the body)
      queue             queued -> sent to a worker
      worker            sent to a worker -> its last frame arrived
        generation      the engine's time on it (the worker's statistics)

The children are made from the job's timings (time.monotonic(), turned into wall-clock time
with one reference pair read when the request arrived).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

from engines.options import ConfigError

log = logging.getLogger("lmc.tracing")

TRACE_KEY = "lmc_trace"  # request[TRACE_KEY]: the request's RequestTrace
DEFAULT_EXCLUDED = (r"^/ping$", r"^/metrics$")
_EXPORTERS = ("otlp", "console", "none")
_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio")
_PROPAGATORS = ("tracecontext", "baggage", "none")

KIND_INTERNAL, KIND_SERVER = 1, 2  # OTLP SpanKind
# The export thread gives the GIL back after this many requests' (or spans') work, ~0.5 ms:
# a batch of 512 built at once would hold the event loop up for ~15 ms.
YIELD_EVERY = 32
STATUS_UNSET, STATUS_ERROR = 0, 2  # OTLP StatusCode


class SpanData(NamedTuple):
    """A finished span, as the exporters take it. Ids are ints (trace 128 bits, span 64);
    times are epoch nanoseconds; events are (name, time) pairs."""

    trace_id: int
    span_id: int
    parent_span_id: int  # 0: a root span
    parent_remote: bool
    trace_state: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict
    events: tuple = ()
    status_code: int = STATUS_UNSET
    status_message: str = ""


def wanted_exporters(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; [] means tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if raw:
        names = [n.strip().lower() for n in raw.split(",") if n.strip()]
        for n in names:
            if n not in _EXPORTERS:
                raise ConfigError(f"OTEL_TRACES_EXPORTER={raw!r}: {n!r} is not one of "
                                  f"{', '.join(_EXPORTERS)} (from environment variable "
                                  f"OTEL_TRACES_EXPORTER)")
        return [] if "none" in names else list(dict.fromkeys(names))
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def _env_error(var: str, value: str, why: str) -> ConfigError:
    return ConfigError(f"{var}={value!r}: {why} (from environment variable {var})")


def _env_int(env: Mapping[str, str], var: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _env_error(var, raw, "not an integer") from None
    if value < minimum:
        raise _env_error(var, raw, f"must be at least {minimum}")
    return value


def _either(env: Mapping[str, str], name: str) -> tuple[str, str]:
    """OTEL_EXPORTER_OTLP_TRACES_{name}, else OTEL_EXPORTER_OTLP_{name}: (variable, value)."""
    for var in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = env.get(var, "").strip()
        if value:
            return var, value
    return "", ""


class Sampler:
    """OTEL_TRACES_SAMPLER: whether a new request's trace is recorded. A parent-based sampler
    follows the client's sampled flag when a traceparent came; traceidratio keeps a trace when
    the low 64 bits of its id fall under ratio·2⁶⁴ (the SDK's rule, so every service that
    samples by ratio keeps the same traces)."""

    def __init__(self, name: str, ratio: float) -> None:
        self.name, self.ratio = name, ratio
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        bound = {"always_on": 1 << 64, "always_off": 0}.get(root)
        self.bound = round(ratio * (1 << 64)) if bound is None else bound

    def __call__(self, trace_id: int, parent_sampled: bool | None) -> bool:
        if self.parent_based and parent_sampled is not None:
            return parent_sampled
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound


def _sampler(env: Mapping[str, str]) -> Sampler:
    raw = env.get("OTEL_TRACES_SAMPLER", "").strip()
    name = raw.lower() or "parentbased_always_on"
    if name not in _SAMPLERS:
        raise _env_error("OTEL_TRACES_SAMPLER", raw, f"not one of {', '.join(_SAMPLERS)}")
    ratio = 1.0
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if name.endswith("traceidratio") and arg:
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise _env_error("OTEL_TRACES_SAMPLER_ARG", arg,
                             "the sampling ratio must be a number in [0, 1]")
    return Sampler(name, ratio)


class Settings(NamedTuple):
    exporters: list[str]
    excluded: re.Pattern | None  # one pattern: the alternation of OTEL_PYTHON_EXCLUDED_URLS
    sampler: Sampler
    extract: bool  # read the client's traceparent (OTEL_PROPAGATORS names tracecontext)
    endpoint: str
    headers: dict[str, str]
    timeout_s: float
    gzip: bool
    certificate: str | None
    schedule_delay_s: float
    max_queue: int
    max_batch: int
    export_timeout_s: float


def settings(env: Mapping[str, str]) -> Settings | None:
    """Tracing's settings from the environment; None while it is off. ConfigError for a value
    it cannot honour."""
    exporters = wanted_exporters(env)
    if not exporters:
        return None
    var, protocol = _either(env, "PROTOCOL")
    if protocol and protocol != "http/protobuf":
        raise _env_error(var, protocol, "this build exports traces over http/protobuf only")
    raw = env.get("OTEL_PYTHON_EXCLUDED_URLS")
    try:
        patterns = [p.strip() for p in (DEFAULT_EXCLUDED if raw is None else raw.split(","))
                    if p.strip()]
        for p in patterns:
            re.compile(p)
        excluded = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    except re.error as e:
        raise _env_error("OTEL_PYTHON_EXCLUDED_URLS", raw,
                         f"not a list of regular expressions ({e})") from None
    raw = env.get("OTEL_PROPAGATORS", "").strip()
    propagators = [p.strip().lower() for p in raw.split(",") if p.strip()] or ["tracecontext"]
    for p in propagators:
        if p not in _PROPAGATORS:
            raise _env_error("OTEL_PROPAGATORS", raw,
                             f"{p!r} is not one this build has ({', '.join(_PROPAGATORS)})")

    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
        endpoint = base.rstrip("/") + "/v1/traces"
    if not re.match(r"^https?://[^/]+", endpoint):
        var = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
               else "OTEL_EXPORTER_OTLP_ENDPOINT")
        raise _env_error(var, endpoint, "not an http:// or https:// URL")
    headers = {}
    var, raw = _either(env, "HEADERS")
    if raw:
        from urllib.parse import unquote

        for pair in raw.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise _env_error(var, raw, f"{pair.strip()!r} is not key=value")
            headers[unquote(key.strip())] = unquote(value.strip())
    var, raw = _either(env, "TIMEOUT")
    timeout_ms = 10000
    if raw:
        timeout_ms = _env_int(env, var, 10000)
    var, compression = _either(env, "COMPRESSION")
    if compression.lower() not in ("", "gzip", "none"):
        raise _env_error(var, compression, "not gzip or none")
    _, certificate = _either(env, "CERTIFICATE")
    if certificate and not os.path.isfile(certificate):
        var, _ = _either(env, "CERTIFICATE")
        raise _env_error(var, certificate, "no such file")
    max_queue = _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    max_batch = _env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    if max_batch > max_queue:
        raise _env_error("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", str(max_batch),
                         f"larger than OTEL_BSP_MAX_QUEUE_SIZE ({max_queue})")
    return Settings(
        exporters=exporters, excluded=excluded, sampler=_sampler(env),
        extract="tracecontext" in propagators, endpoint=endpoint, headers=headers,
        timeout_s=timeout_ms / 1000, gzip=compression.lower() == "gzip",
        certificate=certificate or None,
        schedule_delay_s=_env_int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000, minimum=0) / 1000,
        max_queue=max_queue, max_batch=max_batch,
        export_timeout_s=_env_int(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000) / 1000)


# -- the live state ------------------------------------------------------------------------------

_settings: Settings | None = None
_processor: BatchProcessor | None = None
_rand = random.Random(os.urandom(16)).getrandbits  # ids need to be unique, not secret


def configure(env: Mapping[str, str] | None = None, *, exporter=None) -> bool:
    """Turn tracing on if the environment asks for it (once, at startup). Returns whether it
    is on. A setting this build cannot honour is a ConfigError. `exporter` (an object with
    `export(list[SpanData])`) replaces the ones the environment names (tests)."""
    global _settings, _processor
    env = os.environ if env is None else env
    shutdown()  # a second call replaces the first
    found = settings(env)
    if found is None:
        return False
    from container import otlp

    resource = otlp.resource_attributes(env)
    if exporter is not None:
        exporters = [exporter]
    else:
        exporters = [otlp.OtlpHttpExporter(found, resource) if name == "otlp"
                     else otlp.ConsoleExporter(resource) for name in found.exporters]
    _processor = BatchProcessor(exporters, found)
    _settings = found
    log.info("tracing on: %s, service %s, sampler %s", ", ".join(
        f"OTLP/HTTP to {found.endpoint}" if n == "otlp" else n for n in found.exporters),
        resource.get("service.name"), found.sampler.name
        + (f" {found.sampler.ratio}" if found.sampler.name.endswith("ratio") else ""))
    return True


def enabled() -> bool:
    return _settings is not None


def counts() -> dict[str, int] | None:
    """Spans exported, spans whose export failed, traces dropped (queue full); None while
    tracing is off (GET /metrics)."""
    p = _processor
    return None if p is None else {"exported": p.exported, "failed": p.failed,
                                   "dropped": p.dropped}


def flush(timeout_s: float = 5.0) -> bool:
    """Export everything queued now; whether it all went within `timeout_s`."""
    processor = _processor
    return processor.flush(timeout_s) if processor is not None else True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is queued (within `timeout_s`) and stop. Blocking: run it off the loop."""
    global _settings, _processor
    processor, _processor, _settings = _processor, None, None
    if processor is not None:
        processor.shutdown(timeout_s)


# -- the request path ----------------------------------------------------------------------------

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """A W3C traceparent header as (trace id, parent span id, sampled), or None when it is
    absent or invalid (then the request starts a new trace, as the spec says)."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags = m.groups()
    value = value.strip()
    if version == "ff" or (version == "00" and len(value) != 55) or value[55:56] not in ("", "-"):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


class RequestTrace:
    """A request's trace: its server span's ids and the clock pair that places its job's
    timings. `trace_id` (hex) is set only when the trace is recorded (sampled)."""

    __slots__ = ("trace_int", "span_id", "parent_id", "parent_remote", "trace_state",
                 "sampled", "t0_ns", "t0_mono", "trace_id")

    def __init__(self, trace_int: int, span_id: int, parent_id: int, trace_state: str,
                 sampled: bool, t0_ns: int, t0_mono: float) -> None:
        self.trace_int, self.span_id, self.parent_id = trace_int, span_id, parent_id
        self.parent_remote = bool(parent_id)
        self.trace_state, self.sampled = trace_state, sampled
        self.t0_ns, self.t0_mono = t0_ns, t0_mono
        self.trace_id = f"{trace_int:032x}" if sampled else None

    def ns(self, mono: float) -> int:
        """A time.monotonic() reading as epoch nanoseconds."""
        return self.t0_ns + int((mono - self.t0_mono) * 1e9)

    @property
    def traceparent(self) -> str:
        """This request's W3C traceparent (its server span as the parent)."""
        return f"00-{self.trace_int:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


UNSAMPLED = RequestTrace(1, 1, 0, "", False, 0, 0.0)  # every unsampled new trace


def start_request(request) -> RequestTrace | None:
    """The request's trace, started now (None while tracing is off, or for a path not
    traced). Also kept as request[TRACE_KEY]."""
    found = _settings
    if found is None:
        return None
    excluded = found.excluded
    if excluded is not None and excluded.search(request.path):
        return None
    parent = parse_traceparent(request.headers.get("traceparent")) if found.extract else None
    if parent is None:
        trace_int, parent_id, state = _rand(128) or 1, 0, ""
        sampled = found.sampler(trace_int, None)
        if not sampled:  # nothing to record, nothing to pass on: no trace of its own
            request[TRACE_KEY] = UNSAMPLED
            return UNSAMPLED
    else:
        trace_int, parent_id, parent_sampled = parent
        state = request.headers.get("tracestate", "")
        sampled = found.sampler(trace_int, parent_sampled)
    trace = RequestTrace(trace_int, _rand(64) or 1, parent_id, state, sampled, time.time_ns(),
                         time.monotonic())
    request[TRACE_KEY] = trace
    return trace


def end_request(trace: RequestTrace, request, status: int, job) -> None:
    """Queue the request's spans for export (nothing while it is not sampled)."""
    processor = _processor
    if processor is None or not trace.sampled:
        return
    try:
        from container.observe import MODEL_KEY, REQUEST_ID_KEY, route_of

        timings = None
        if job is not None:
            timings = (job.enqueued_at, job.dispatched_at, job.first_frame_at, job.done_at,
                       job.id, job.worker, job.stats)
        processor.add((trace, time.time_ns(), status, request.method, route_of(request),
                       request.path, request.scheme, request.version, request.remote,
                       request.headers.get("User-Agent"), request.get(MODEL_KEY),
                       request.get(REQUEST_ID_KEY), timings))
    except Exception:  # noqa: BLE001 - a trace must never cost the request
        log.exception("tracing the request failed")


# -- the spans of one request (built on the export thread) ---------------------------------------


def request_spans(record: tuple) -> list[SpanData]:
    """The spans of one finished request (what end_request queued)."""
    (trace, end_ns, status, method, route, path, scheme, version, remote, agent, model, rid,
     timings) = record
    attributes = {"http.request.method": method, "url.path": path, "url.scheme": scheme,
                  "network.protocol.version": f"{version.major}.{version.minor}",
                  "http.response.status_code": status}
    if route != "unmatched":
        attributes["http.route"] = route
    if remote:
        attributes["client.address"] = remote
    if agent:
        attributes["user_agent.original"] = agent
    if model:
        attributes["lmc.model"] = model
    if rid:
        attributes["lmc.request_id"] = rid
    error = status >= 500
    if error:
        attributes["error.type"] = str(status)
    tid, server_id = trace.trace_int, trace.span_id
    spans = [SpanData(tid, server_id, trace.parent_id, trace.parent_remote, trace.trace_state,
                      method if route == "unmatched" else f"{method} {route}", KIND_SERVER,
                      trace.t0_ns, end_ns, attributes,
                      status_code=STATUS_ERROR if error else STATUS_UNSET,
                      status_message=f"HTTP {status}" if error else "")]
    if timings is None:
        return spans
    enqueued_at, dispatched_at, first_frame_at, done_at, job_id, worker, stats = timings
    state = trace.trace_state

    def child(name: str, parent: int, start: int, end: int, attrs: dict, events=(),
              code: int = STATUS_UNSET) -> int:
        span_id = _rand(64) or 1
        spans.append(SpanData(tid, span_id, parent, False, state, name, KIND_INTERNAL, start,
                              end, attrs, events, code, "server error" if code else ""))
        return span_id

    enqueued = trace.ns(enqueued_at)
    child("parse", server_id, trace.t0_ns, enqueued, {})
    if dispatched_at is None:  # never reached a worker (queue full, timeout, client gone)
        child("queue", server_id, enqueued, trace.ns(done_at) if done_at is not None else end_ns,
              {"lmc.dispatched": False})
        return spans
    dispatched = trace.ns(dispatched_at)
    child("queue", server_id, enqueued, dispatched, {})
    attrs = {"lmc.job_id": job_id}
    if worker is not None:
        attrs["lmc.worker"] = worker
    events = (("first_frame", trace.ns(first_frame_at)),) if first_frame_at is not None else ()
    worker_id = child("worker", server_id, dispatched,
                      trace.ns(done_at) if done_at is not None else end_ns, attrs, events,
                      STATUS_ERROR if error else STATUS_UNSET)
    if stats:
        _generation_span(child, worker_id, stats, model)
    return spans


def _generation_span(child: Callable, parent: int, stats: dict, model: str | None) -> None:
    start_unix, e2e = stats.get("start_unix"), stats.get("e2e_s")
    if start_unix is None or e2e is None:
        return
    attributes: dict = {}
    if model:
        attributes["gen_ai.request.model"] = model
    adapter = stats.get("adapter")
    if adapter:
        attributes["lmc.adapter"] = adapter
    for key, name in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                      ("generation_tokens", "gen_ai.usage.output_tokens"),
                      ("ttft_s", "lmc.ttft_s")):
        value = stats.get(key)
        if value is not None:
            attributes[name] = value
    finish = stats.get("finish")
    if finish:
        attributes["gen_ai.response.finish_reasons"] = sorted(finish)
    start = int(start_unix * 1e9)
    first = stats.get("first_token_unix")
    events = (("first_token", int(first * 1e9)),) if first is not None else ()
    child("generation", parent, start, start + int(e2e * 1e9), attributes, events)


class BatchProcessor:
    """Finished requests wait in a bounded queue; one thread turns them into spans and exports
    them in batches: every OTEL_BSP_SCHEDULE_DELAY, or as soon as OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    requests wait. A full queue drops the newest request's trace (counted and logged)."""

    def __init__(self, exporters: list, found: Settings) -> None:
        self.exporters = exporters
        self.delay_s, self.max_queue, self.max_batch = (found.schedule_delay_s, found.max_queue,
                                                        found.max_batch)
        self.queue: collections.deque = collections.deque()
        self.dropped = 0
        self.exported = 0  # spans every exporter took (the collector answered 2xx)
        self.failed = 0  # spans an exporter gave up on
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0  # requests taken off the queue, not yet exported
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmc-trace-export", daemon=True)
        self._thread.start()

    def add(self, record: tuple) -> None:
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("trace queue full (OTEL_BSP_MAX_QUEUE_SIZE=%d): %d traces dropped",
                            self.max_queue, self.dropped)
            return
        queue.append(record)
        if len(queue) >= self.max_batch:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()
            if self._stop:
                return

    def _drain(self) -> None:
        queue = self.queue
        while queue:
            records = []
            with self._idle:
                while queue and len(records) < self.max_batch:
                    records.append(queue.popleft())
                self._pending = len(records)
            spans: list[SpanData] = []
            for i, record in enumerate(records):
                if i and i % YIELD_EVERY == 0:
                    time.sleep(0)  # let the event loop have the GIL: no long stalls
                try:
                    spans.extend(request_spans(record))
                except Exception:  # noqa: BLE001 - one bad record must not lose the batch
                    log.exception("building a request's spans failed")
            ok = True
            for exporter in self.exporters:
                try:
                    ok = exporter.export(spans) is not False and ok
                except Exception:  # noqa: BLE001 - the collector's trouble, not the server's
                    log.exception("exporting %d spans failed", len(spans))
                    ok = False
            if ok:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
            with self._idle:
                self._pending = 0
                self._idle.notify_all()

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._idle:
            while self.queue or self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
                self._wake.set()
        return True

    def shutdown(self, timeout_s: float) -> None:
        self.flush(timeout_s)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        for exporter in self.exporters:
            close = getattr(exporter, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - the server is stopping anyway
                    log.exception("stopping the trace exporter failed")
