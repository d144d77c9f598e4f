"""Log lines of the front end and of the workers: text (the default) or one JSON object a line
(LMC_LOG_FORMAT=json), each carrying the id of the request being served when it was written
(and its trace id while tracing is on).

The front end decides a request's id once, when the request arrives (container/observe.py), and
sends it to the worker with the request as the REQUEST_ID_PROPERTY property (the trace id, when
the request is traced and sampled, as TRACE_ID_PROPERTY). Each side binds them to the code
serving the request (`bind`, a context variable: per asyncio task in the front end, per thread
in a worker), and RequestContextFilter puts them on every log record written meanwhile.

Standard library only: both sides import it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Iterable, Mapping

# Request properties the front end sets for the worker (a client's own are replaced).
REQUEST_ID_PROPERTY = "x-request-id"
TRACE_ID_PROPERTY = "x-lmc-trace-id"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmc_request_id",
                                                                         default=None)
_trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmc_trace_id",
                                                                       default=None)


def bind(request_id: str | None, trace_id: str | None = None) -> tuple:
    """Make the request's ids those of the log lines written from here on (this task or thread);
    hand the result to `unbind` when the request is done."""
    return _request_id.set(request_id), _trace_id.set(trace_id)


def unbind(token: tuple) -> None:
    _request_id.reset(token[0])
    _trace_id.reset(token[1])


def current_request_id() -> str | None:
    return _request_id.get()


def ids_of(properties: Iterable[Mapping[str, str]]) -> tuple[str | None, str | None]:
    """The request and trace ids of a batch of requests (their properties), comma-joined when
    the batch holds several."""
    rids, tids = [], []
    for p in properties:
        rid, tid = p.get(REQUEST_ID_PROPERTY), p.get(TRACE_ID_PROPERTY)
        if rid:
            rids.append(rid)
        if tid:
            tids.append(tid)
    return ",".join(rids) or None, ",".join(tids) or None


class RequestContextFilter(logging.Filter):
    """Sets `request_id` and `trace_id` on every record (None outside a request) unless the
    call gave them (`extra=`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = _trace_id.get()
        return True


class TextFormatter(logging.Formatter):
    """The given format, then ` request_id=... trace_id=...` when the record has them (before
    any traceback)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        s = super().formatMessage(record)
        rid = getattr(record, "request_id", None)
        if rid:
            s += f" request_id={rid}"
        tid = getattr(record, "trace_id", None)
        if tid:
            s += f" trace_id={tid}"
        return s


class JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp (UTC, ISO 8601, ms), level, logger, message, then the
    static fields (e.g. the worker's name), request_id and trace_id when known, the record's
    `lmc_fields` (a dict, e.g. the access log's), and exception / stack text."""

    def __init__(self, static: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                         + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(self.static)
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        tid = getattr(record, "trace_id", None)
        if tid:
            out["trace_id"] = tid
        fields = getattr(record, "lmc_fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, log_format: str = "text", *, process: str | None = None,
              access_log: bool = True) -> None:
    """Root logging on stderr, as logging.basicConfig (nothing changes if the root logger
    already has a handler). `process` names a worker in its lines ([name] in text, "worker" in
    JSON). `access_log=False` silences the front end's per-request lines (logger lmc.access)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter({"worker": process} if process else None))
    else:
        tag = f"[{process.replace('%', '%%')}] " if process else ""
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s {tag}%(name)s: "
                                           f"%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if log_format == "json":
        logging.captureWarnings(True)  # Python warnings as JSON lines too (logger py.warnings)
    if not access_log:
        logging.getLogger("lmc.access").setLevel(logging.WARNING)
