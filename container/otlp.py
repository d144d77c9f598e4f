"""OTLP/HTTP export of tracing's spans (container/tracing.py): the protobuf encoding written
straight to bytes, a keep-alive HTTP exporter, and a console exporter.

The encoding follows opentelemetry-proto's trace.proto and collector/trace/v1 (the message
ExportTraceServiceRequest); tests/test_tracing.py parses what it writes with opentelemetry-proto's
own classes. Field numbers used:

    ExportTraceServiceRequest  1 resource_spans
    ResourceSpans              1 resource, 2 scope_spans
    Resource                   1 attributes
    ScopeSpans                 1 scope, 2 spans
    InstrumentationScope       1 name, 2 version
    Span                       1 trace_id, 2 span_id, 3 trace_state, 4 parent_span_id, 5 name,
                               6 kind, 7 start_time_unix_nano, 8 end_time_unix_nano,
                               9 attributes, 11 events, 15 status, 16 flags
    Span.Event                 1 time_unix_nano, 2 name
    Status                     2 message, 3 code
    KeyValue                   1 key, 2 value
    AnyValue                   1 string, 2 bool, 3 int, 4 double, 5 array (ArrayValue 1 values)
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import os
import ssl
import struct
import sys
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

log = logging.getLogger("lmc.tracing")

SCOPE_NAME = "lmc"
YIELD_EVERY = 64
_RETRY_STATUSES = (429, 502, 503, 504)
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) whose tag byte is `tag`."""
    n = len(payload)
    return bytes((tag, n)) + payload if n < 0x80 else bytes((tag,)) + _varint(n) + payload


def _any_value(v) -> bytes:
    if isinstance(v, str):
        return _len(0x0A, v.encode())
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
    if isinstance(v, float):
        return b"\x21" + _pack_d(v)
    if isinstance(v, (list, tuple)):
        return _len(0x2A, b"".join(_len(0x0A, _any_value(x)) for x in v))
    return _len(0x0A, str(v).encode())


_keys: dict[str, bytes] = {}
# Encoded attributes (tag, key, value) of the values that repeat (method, route, status, model,
# client address, ...): most attributes of a request are the same as the last one's. Not the
# unique ones. Likewise span names and event names.
_pairs: dict[tuple, bytes] = {}
_strings: dict[tuple[int, str], bytes] = {}
_MAX_CACHED = 4096
UNIQUE_KEYS = frozenset({"lmc.request_id", "lmc.job_id", "lmc.ttft_s"})


def _attribute(tag: int, key: str, value) -> bytes:
    """One KeyValue as field tag byte `tag`."""
    cacheable = key not in UNIQUE_KEYS and type(value) in (str, int, bool)
    if cacheable:
        encoded = _pairs.get((tag, key, type(value), value))
        if encoded is not None:
            return encoded
    prefix = _keys.get(key)
    if prefix is None:
        prefix = _keys[key] = _len(0x0A, key.encode())
    encoded = _len(tag, prefix + _len(0x12, _any_value(value)))
    if cacheable and len(_pairs) < _MAX_CACHED:
        _pairs[(tag, key, type(value), value)] = encoded
    return encoded


def _string(tag: int, text: str) -> bytes:
    """A string field of a value that repeats (span and event names)."""
    encoded = _strings.get((tag, text))
    if encoded is None:
        encoded = _len(tag, text.encode())
        if len(_strings) < _MAX_CACHED:
            _strings[(tag, text)] = encoded
    return encoded


def attributes(tag: int, attrs: Mapping) -> bytes:
    """Repeated KeyValue under field tag byte `tag`."""
    return b"".join([_attribute(tag, k, v) for k, v in attrs.items()])


_FLAGS = {False: b"\x85\x01" + _pack_i(0x101), True: b"\x85\x01" + _pack_i(0x301)}


def encode_span(s) -> bytes:
    """One Span message (tracing.SpanData)."""
    out = [b"\x0a\x10", s.trace_id.to_bytes(16, "big"), b"\x12\x08", s.span_id.to_bytes(8, "big")]
    if s.trace_state:
        out.append(_string(0x1A, s.trace_state))
    if s.parent_span_id:
        out += (b"\x22\x08", s.parent_span_id.to_bytes(8, "big"))
    out += (_string(0x2A, s.name), b"\x30", bytes((s.kind,)),
            b"\x39", _pack_q(s.start_ns), b"\x41", _pack_q(s.end_ns))
    if s.attributes:
        for k, v in s.attributes.items():
            out.append(_attribute(0x4A, k, v))
    for name, at in s.events:
        out.append(_len(0x5A, b"\x09" + _pack_q(at) + _string(0x12, name)))
    if s.status_code:
        status = (_len(0x12, s.status_message.encode()) if s.status_message else b"") + \
            b"\x18" + bytes((s.status_code,))
        out.append(_len(0x7A, status))
    # flags: sampled (0x01), the parent's is-remote bit is known (0x100), and set (0x200).
    out.append(_FLAGS[s.parent_remote])
    return b"".join(out)


def encode_request(resource: bytes, scope: bytes, spans) -> bytes:
    """An ExportTraceServiceRequest body: one resource, one scope, `spans`."""
    parts = []
    for i, s in enumerate(spans):
        if i and i % YIELD_EVERY == 0:
            time.sleep(0)  # let the event loop have the GIL (see tracing.YIELD_EVERY)
        parts.append(_len(0x12, encode_span(s)))
    body = b"".join(parts)
    scope_spans = _len(0x0A, scope) + body
    resource_spans = _len(0x0A, resource) + _len(0x12, scope_spans)
    return _len(0x0A, resource_spans)


def resource_attributes(env: Mapping[str, str]) -> dict:
    """The resource every span is exported under: the OpenTelemetry SDK's Resource (it reads
    OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, adds telemetry.sdk.*), with service.name
    "lmc" unless one is set and service.version LMC's."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    saved = {}
    if env is not os.environ:  # Resource.create reads os.environ: show it `env`'s values
        for var in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
            saved[var] = os.environ.get(var)
            if var in env:
                os.environ[var] = env[var]
            else:
                os.environ.pop(var, None)
    try:
        attrs = dict(Resource.create().attributes)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    if str(attrs.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attrs[SERVICE_NAME] = "lmc"
    if SERVICE_VERSION not in attrs:
        try:
            from importlib.metadata import version

            attrs[SERVICE_VERSION] = version("lmc")
        except Exception:  # noqa: BLE001 - not installed as a distribution: no version
            pass
    return attrs


def _scope() -> bytes:
    try:
        from importlib.metadata import version

        v = version("lmc")
    except Exception:  # noqa: BLE001
        v = ""
    return _len(0x0A, SCOPE_NAME.encode()) + (_len(0x12, v.encode()) if v else b"")


class OtlpHttpExporter:
    """POSTs ExportTraceServiceRequest bodies to the collector over one kept-alive connection;
    retries 429/502/503/504 and connection errors with backoff within the export timeout, then
    drops the batch with a warning."""

    def __init__(self, found, resource: Mapping) -> None:
        url = urlsplit(found.endpoint)
        self.https = url.scheme == "https"
        self.host, self.port = url.hostname, url.port or (443 if self.https else 80)
        self.path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.timeout_s, self.export_timeout_s = found.timeout_s, found.export_timeout_s
        self.gzip = found.gzip
        self.headers = {"Content-Type": "application/x-protobuf", "User-Agent": "lmc-otlp",
                        **found.headers}
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.context = (ssl.create_default_context(cafile=found.certificate)
                        if self.https else None)
        self.resource = attributes(0x0A, resource)
        self.scope = _scope()
        self.conn: http.client.HTTPConnection | None = None
        self.failures = 0

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.https:
                self.conn = http.client.HTTPSConnection(self.host, self.port,
                                                        timeout=self.timeout_s,
                                                        context=self.context)
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port,
                                                       timeout=self.timeout_s)
        return self.conn

    def export(self, spans) -> bool:
        if not spans:
            return True
        body = encode_request(self.resource, self.scope, spans)
        if self.gzip:
            body = gzip.compress(body, 6)
        deadline = time.monotonic() + self.export_timeout_s
        delay = 0.1
        while True:
            try:
                conn = self._connection()
                conn.request("POST", self.path, body, self.headers)
                response = conn.getresponse()
                response.read()
                if 200 <= response.status < 300:
                    self.failures = 0
                    return True
                why = f"HTTP {response.status}"
                retry = response.status in _RETRY_STATUSES
            except (OSError, http.client.HTTPException) as e:
                self.close()
                why, retry = f"{type(e).__name__}: {e}", True
            if not retry or time.monotonic() + delay > deadline:
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    log.warning("exporting %d spans to %s://%s:%s%s failed (%s); %d batches "
                                "dropped so far", len(spans), "https" if self.https else "http",
                                self.host, self.port, self.path, why, self.failures)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class ConsoleExporter:
    """OTEL_TRACES_EXPORTER=console: one JSON object per span on stdout."""

    def __init__(self, resource: Mapping, stream=None) -> None:
        self.resource = dict(resource)
        self.stream = stream or sys.stdout

    def export(self, spans) -> bool:
        lines = []
        for s in spans:
            lines.append(json.dumps({
                "name": s.name, "trace_id": f"{s.trace_id:032x}", "span_id": f"{s.span_id:016x}",
                "parent_id": f"{s.parent_span_id:016x}" if s.parent_span_id else None,
                "kind": "SERVER" if s.kind == 2 else "INTERNAL",
                "start_time_unix_nano": s.start_ns, "end_time_unix_nano": s.end_ns,
                "attributes": s.attributes,
                "events": [{"name": n, "time_unix_nano": t} for n, t in s.events],
                "status": "ERROR" if s.status_code == 2 else "UNSET",
                "resource": self.resource}, default=str))
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        return True
