"""OpenTelemetry tracing of requests: one trace per request, exported over OTLP/HTTP (protobuf).

Off unless configured, the standard way: OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, or OTEL_TRACES_EXPORTER names an exporter (otlp, or
console to print spans); OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none keep it off. The
SDK reads the rest itself: OTEL_SERVICE_NAME (here "lmc" unless set), OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_(TRACES_)HEADERS / TIMEOUT / COMPRESSION /
CERTIFICATE, OTEL_BSP_* (the batch span processor), OTEL_PROPAGATORS (default W3C tracecontext
and baggage). OTEL_PYTHON_EXCLUDED_URLS (comma-separated regular expressions searched in the
path) names requests that are not traced; unset, /ping and /metrics are not.

While off, nothing of opentelemetry is imported and start_request returns None at once.

A trace (container/observe.py calls start_request and end_request around every request):

    {METHOD} {route}    SERVER span, the client's traceparent as its parent
      parse             arrival -> the job is queued (reading and checking the body)
      queue             queued -> sent to a worker
      worker            sent to a worker -> its last frame arrived
        generation      the engine's time on it (the worker's statistics)

The children are made when the request ends, from the job's timings (time.monotonic(), turned
into wall-clock time with one reference pair read when the request arrived).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping

from engines.options import ConfigError

log = logging.getLogger("lmc.tracing")

_tracer = None  # an opentelemetry Tracer while tracing is on
_provider = None
_excluded: tuple[re.Pattern, ...] = ()
_api = None  # the opentelemetry names end_request uses, imported by configure()

TRACE_KEY = "lmc_trace"  # request[TRACE_KEY]: the request's RequestTrace
DEFAULT_EXCLUDED = (r"^/ping$", r"^/metrics$")
_EXPORTERS = ("otlp", "console", "none")


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


def configure(env: Mapping[str, str] | None = None, *, exporter=None) -> bool:
    """Turn tracing on if the environment asks for it (once, at startup). Returns whether it
    is on. A setting this build cannot honour is a ConfigError. `exporter` (a SpanExporter)
    replaces the ones the environment names (tests). `env` decides whether tracing is on; the
    SDK reads its own settings from os.environ."""
    global _tracer, _provider, _excluded, _api
    env = os.environ if env is None else env
    shutdown()  # a second call replaces the first
    exporters = wanted_exporters(env)
    if not exporters:
        return False
    if "otlp" in exporters:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(var, "").strip()
            if protocol:
                if protocol != "http/protobuf":
                    raise ConfigError(f"{var}={protocol!r}: this build exports traces over "
                                      f"http/protobuf only (from environment variable {var})")
                break
    raw = env.get("OTEL_PYTHON_EXCLUDED_URLS")
    try:
        _excluded = tuple(re.compile(p.strip()) for p in
                          (DEFAULT_EXCLUDED if raw is None else raw.split(",")) if p.strip())
    except re.error as e:
        raise ConfigError(f"OTEL_PYTHON_EXCLUDED_URLS={raw!r} is not a list of regular "
                          f"expressions ({e}) (from environment variable "
                          f"OTEL_PYTHON_EXCLUDED_URLS)") from None

    from opentelemetry import propagate, trace
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind, Status, StatusCode

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "lmc"}))
    if SERVICE_VERSION not in resource.attributes:
        try:
            from importlib.metadata import version

            resource = resource.merge(Resource({SERVICE_VERSION: version("lmc")}))
        except Exception:  # noqa: BLE001 - not installed as a distribution: no version
            pass
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
    for span_exporter in [exporter] if exporter is not None else map(_exporter, exporters):
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    _api = _Api(propagate.extract, trace.set_span_in_context, SpanKind.SERVER,
                Status(StatusCode.ERROR, "server error"), Status, StatusCode.ERROR)
    _provider = provider
    _tracer = provider.get_tracer("lmc")
    endpoint = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318")
    log.info("tracing on: %s, service %s", ", ".join(
        f"OTLP/HTTP to {endpoint}" if n == "otlp" else n for n in exporters),
        resource.attributes.get(SERVICE_NAME))
    return True


def _exporter(name: str):
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout, ...: OTEL_EXPORTER_OTLP_*
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter()


def enabled() -> bool:
    return _tracer is not None


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is queued (within `timeout_s`) and stop. Blocking: run it off the loop."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is None:
        return
    try:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()
    except Exception:  # noqa: BLE001 - the server is stopping anyway
        log.exception("stopping the trace exporter failed")


class _Api:
    __slots__ = ("extract", "in_context", "server", "error", "status", "error_code")

    def __init__(self, extract, in_context, server, error, status, error_code) -> None:
        self.extract, self.in_context, self.server = extract, in_context, server
        self.error, self.status, self.error_code = error, status, error_code


class RequestTrace:
    """A request's server span and the clock pair that places its job's timings."""

    __slots__ = ("span", "t0_ns", "t0_mono", "trace_id")

    def __init__(self, span, t0_ns: int, t0_mono: float) -> None:
        self.span = span
        self.t0_ns = t0_ns
        self.t0_mono = t0_mono
        ctx = span.get_span_context()
        # Logged with the request only when the trace is kept (sampled).
        self.trace_id = f"{ctx.trace_id:032x}" if ctx.trace_flags.sampled else None

    def ns(self, mono: float) -> int:
        """A time.monotonic() reading as epoch nanoseconds."""
        return self.t0_ns + int((mono - self.t0_mono) * 1e9)


def start_request(request) -> RequestTrace | None:
    """The request's server span, started now (None while tracing is off, or for a path not
    traced). Also kept as request[TRACE_KEY]."""
    tracer = _tracer
    if tracer is None:
        return None
    path = request.path
    for p in _excluded:
        if p.search(path):
            return None
    from container.observe import route_of

    route = route_of(request)
    method = request.method
    attributes = {"http.request.method": method, "url.path": path, "url.scheme": request.scheme,
                  "network.protocol.version": f"{request.version.major}.{request.version.minor}"}
    if route != "unmatched":
        attributes["http.route"] = route
    remote = request.remote
    if remote:
        attributes["client.address"] = remote
    agent = request.headers.get("User-Agent")
    if agent:
        attributes["user_agent.original"] = agent
    t0_mono = time.monotonic()
    t0_ns = time.time_ns()
    span = tracer.start_span(method if route == "unmatched" else f"{method} {route}",
                             context=_api.extract(request.headers), kind=_api.server,
                             attributes=attributes, start_time=t0_ns)
    trace = RequestTrace(span, t0_ns, t0_mono)
    request[TRACE_KEY] = trace
    return trace


def end_request(trace: RequestTrace, request, status: int, job) -> None:
    """End the server span with the response's status, and add the job's spans under it."""
    try:
        _end(trace, request, status, job)
    except Exception:  # noqa: BLE001 - a trace must never cost the request
        log.exception("tracing the request failed")


def _end(trace: RequestTrace, request, status: int, job) -> None:
    span = trace.span
    end_ns = time.time_ns()
    if not span.is_recording():  # not sampled
        span.end(end_time=end_ns)
        return
    span.set_attribute("http.response.status_code", status)
    from container.observe import MODEL_KEY, REQUEST_ID_KEY

    model = request.get(MODEL_KEY)
    if model:
        span.set_attribute("lmc.model", model)
    rid = request.get(REQUEST_ID_KEY)
    if rid:
        span.set_attribute("lmc.request_id", rid)
    if status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(_api.status(_api.error_code, f"HTTP {status}"))
    if job is not None:
        _job_spans(trace, job, model, status, end_ns)
    span.end(end_time=end_ns)


def _job_spans(trace: RequestTrace, job, model: str | None, status: int, end_ns: int) -> None:
    tracer = _tracer
    if tracer is None:
        return
    ctx = _api.in_context(trace.span)
    enqueued = trace.ns(job.enqueued_at)
    tracer.start_span("parse", context=ctx, start_time=trace.t0_ns).end(end_time=enqueued)
    if job.dispatched_at is None:  # never reached a worker (queue full, timeout, client gone)
        queue = tracer.start_span("queue", context=ctx, start_time=enqueued,
                                  attributes={"lmc.dispatched": False})
        queue.end(end_time=trace.ns(job.done_at) if job.done_at is not None else end_ns)
        return
    dispatched = trace.ns(job.dispatched_at)
    tracer.start_span("queue", context=ctx, start_time=enqueued).end(end_time=dispatched)
    attributes = {"lmc.job_id": job.id}
    if job.worker is not None:
        attributes["lmc.worker"] = job.worker
    worker = tracer.start_span("worker", context=ctx, start_time=dispatched,
                               attributes=attributes)
    if job.first_frame_at is not None:
        worker.add_event("first_frame", timestamp=trace.ns(job.first_frame_at))
    if status >= 500:
        worker.set_status(_api.error)
    stats = job.stats
    if stats:
        _generation_span(tracer, _api.in_context(worker), stats, model)
    worker.end(end_time=trace.ns(job.done_at) if job.done_at is not None else end_ns)


def _generation_span(tracer, ctx, stats: dict, model: str | None) -> None:
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
    span = tracer.start_span("generation", context=ctx, start_time=start, attributes=attributes)
    first = stats.get("first_token_unix")
    if first is not None:
        span.add_event("first_token", timestamp=int(first * 1e9))
    span.end(end_time=start + int(e2e * 1e9))
