"""Everything the server records about a request as it ends: its metrics (container/metrics.py),
its trace (container/tracing.py) and its access-log line. One middleware, outermost, so it sees
every request, errors included, with its final status and the bytes that went out.

Routes tell it which model served the request (request[MODEL_KEY]) and which job carried it to
a worker (request[JOB_KEY]); invoke.submit sets both.
"""

from __future__ import annotations

import logging
import time
import uuid

from aiohttp import web

from container import tracing
from engines import logs

MODEL_KEY = "lmc_model"
JOB_KEY = "lmc_job"
METRICS_KEY = "metrics"
REQUEST_ID_KEY = "lmc_request_id"

# Headers a client may name its request with (first one present wins); else a uuid. Echoed as
# the x-request-id response header, sent to the worker, and on every log line of the request.
REQUEST_ID_HEADERS = ("X-Amzn-SageMaker-Inference-Id", "X-Request-Id")

access_log = logging.getLogger("lmc.access")


def route_of(request: web.Request) -> str:
    """The route's template ("/models/{model}"), never the raw path: bounded label values."""
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None:  # no route matched (404/405): aiohttp's system route
        return "unmatched"
    return resource.canonical


@web.middleware
async def observe_middleware(request: web.Request, handler):
    start = time.perf_counter()
    metrics = request.app.get(METRICS_KEY)
    rid = request_id(request)
    span = tracing.start_request(request)
    bound = logs.bind(rid, span.trace_id if span is not None else None)
    status = 500
    response = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        seconds = time.perf_counter() - start
        job = request.get(JOB_KEY)
        model = request.get(MODEL_KEY, "")
        route = route_of(request)
        if metrics is not None:
            queue_s = None
            if job is not None and job.dispatched_at is not None:
                queue_s = job.dispatched_at - job.enqueued_at
            metrics.observe_request(route, model, status, seconds, request.content_length or 0,
                                    _bytes_out(response), queue_s)
        if span is not None:
            tracing.end_request(span, request, status, job)
        if access_log.isEnabledFor(logging.INFO):
            _access_line(request, route, model, status, seconds, job, rid,
                         span.trace_id if span is not None else None)
        logs.unbind(bound)


def request_id(request: web.Request) -> str:
    """The request's id, decided once: the client's (REQUEST_ID_HEADERS; one that is longer
    than 256 characters or not printable is not used, it goes into every log line) or a new
    uuid."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is None:
        headers = request.headers
        for h in REQUEST_ID_HEADERS:
            rid = headers.get(h)
            if rid:
                if len(rid) <= 256 and rid.isprintable():
                    break
        else:
            rid = uuid.uuid4().hex
        request[REQUEST_ID_KEY] = rid
    return rid


def worker_properties(request: web.Request) -> dict[str, str]:
    """The request properties that carry its ids to the worker (for its log lines)."""
    props = {logs.REQUEST_ID_PROPERTY: request_id(request)}
    trace = request.get(tracing.TRACE_KEY)
    if trace is not None and trace.trace_id is not None:
        props[logs.TRACE_ID_PROPERTY] = trace.trace_id
    return props


def _access_line(request: web.Request, route: str, model: str, status: int, seconds: float,
                 job, rid: str, trace_id: str | None) -> None:
    """One INFO line on lmc.access: `METHOD route status model=... latency_ms=...
    prompt_tokens=... generated_tokens=...` (then request_id=, trace_id= from the formatter);
    in JSON the same values are fields of their own."""
    stats = job.stats if job is not None else None
    prompt = stats.get("prompt_tokens") if stats else None
    generated = stats.get("generation_tokens") if stats else None
    ms = round(seconds * 1000, 1)
    fields = {"method": request.method, "route": route, "status": status, "model": model or None,
              "latency_ms": ms, "prompt_tokens": prompt, "generated_tokens": generated}
    access_log.info("%s %s %d model=%s latency_ms=%.1f prompt_tokens=%s generated_tokens=%s",
                    request.method, route, status, model or "-", ms,
                    "-" if prompt is None else prompt, "-" if generated is None else generated,
                    extra={"request_id": rid, "trace_id": trace_id, "lmc_fields": fields})


def _bytes_out(response: web.StreamResponse | None) -> int:
    if response is None:
        return 0
    if response.prepared:  # a stream, written in full by now
        return response.body_length
    body = getattr(response, "body", None)  # a plain Response, sent after this returns
    return len(body) if isinstance(body, (bytes, bytearray)) else 0
