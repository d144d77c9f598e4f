"""Tracing (OpenTelemetry over OTLP/HTTP, container/tracing.py) and logs (engines/logs.py, the
access log of container/observe.py): a real server exporting to a real OTLP/HTTP receiver on a
loopback port, its JSON log lines, and a text-format server whose worker logs while serving."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from aiohttp import web

from server_utils import FIXTURES, ROOT, LmcServer, free_port
from tiny_models import make_tiny_llama

from engines import logs
from engines.options import ConfigError

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest
    (protobuf), on its own event loop thread. `spans` holds (resource attributes, Span)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spans: list = []
        self.posts = 0
        self.headers: list = []  # of every POST
        self._lock = threading.Lock()

    def __enter__(self) -> OtlpReceiver:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)

        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip" and body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)  # (aiohttp decompresses a gzip body itself)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        with self._lock:
            self.posts += 1
            self.headers.append(request.headers.copy())  # case-insensitive
            for rs in msg.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append((resource, span))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def trace(self, trace_id: str, names: set[str], timeout_s: float = 15.0) -> dict:
        """The spans of `trace_id` by name, once all of `names` arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                got = {s.name: (res, s) for res, s in self.spans if s.trace_id.hex() == trace_id}
            if names <= set(got) or time.monotonic() > deadline:
                assert names <= set(got), f"spans {names - set(got)} never arrived: {sorted(got)}"
                return got
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


def attrs(span) -> dict:
    return {a.key: _value(a.value) for a in span.attributes}


def json_lines(output: str) -> list[dict]:
    out = []
    for line in output.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A server exporting traces to an OTLP receiver, logging JSON, serving a tiny random llama
    ("tiny-llama", the default LLM handler) and the logging model.py ("logger")."""
    store = tmp_path_factory.mktemp("store")
    make_tiny_llama(store / "tiny-llama")
    shutil.copytree(FIXTURES / "server" / "logger", store / "logger")
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
               "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
               "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20t0ken,x-tenant=a",
               "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
               "LMC_LOG_FORMAT": "json", "LMC_LOG_LEVEL": "INFO"}
        with LmcServer(["--model-store", str(store)], env=env, timeout_s=180) as srv:
            yield srv, receiver


def test_a_generation_request_is_one_trace_under_the_clients_span(traced):
    srv, receiver = traced
    r = srv.post("/generate", {"inputs": "The capital of France is",
                               "parameters": {"max_new_tokens": 6, "details": True}},
                 headers={"traceparent": TRACEPARENT, "tracestate": "vendor=x",
                          "X-Model-Name": "tiny-llama", "X-Request-Id": "req-gen-1"})
    assert r.status == 200, r.body
    details = r.json()["details"]
    assert r.headers["x-request-id"] == "req-gen-1"

    spans = receiver.trace(CLIENT_TRACE_ID, {"POST /generate", "parse", "queue", "worker",
                                             "generation"})
    resource, server = spans["POST /generate"]
    assert resource["service.name"] == "lmc"  # OTEL_SERVICE_NAME unset
    assert resource["deployment.environment"] == "test"
    # The server span continues the client's trace, under the client's span.
    assert server.parent_span_id.hex() == CLIENT_SPAN_ID
    assert server.kind == server.SPAN_KIND_SERVER
    assert server.trace_state == "vendor=x"
    a = attrs(server)
    assert a["http.request.method"] == "POST" and a["http.route"] == "/generate"
    assert a["http.response.status_code"] == 200 and a["url.path"] == "/generate"
    assert a["lmc.model"] == "tiny-llama" and a["lmc.request_id"] == "req-gen-1"
    assert server.status.code != server.status.STATUS_CODE_ERROR
    # OTEL_EXPORTER_OTLP_COMPRESSION and _TRACES_HEADERS (URL-decoded) reach the collector.
    with receiver._lock:
        sent = receiver.headers[-1]
    assert sent["Content-Encoding"] == "gzip"
    assert (sent.get("authorization"), sent.get("x-tenant")) == ("Bearer t0ken", "a")

    parse, queue, worker, gen = (spans[n][1] for n in ("parse", "queue", "worker", "generation"))
    for child in (parse, queue, worker):
        assert child.parent_span_id == server.span_id
    assert gen.parent_span_id == worker.span_id
    g = attrs(gen)
    assert g["gen_ai.request.model"] == "tiny-llama"
    assert g["gen_ai.usage.output_tokens"] == details["generated_tokens"]
    assert g["gen_ai.usage.input_tokens"] == details["prompt_tokens"]
    assert details["finish_reason"] in g["gen_ai.response.finish_reasons"]
    assert 0 < g["lmc.ttft_s"] < (gen.end_time_unix_nano - gen.start_time_unix_nano) / 1e9
    assert [e.name for e in gen.events] == ["first_token"]
    assert attrs(worker)["lmc.worker"] >= 0 and "lmc.adapter" not in g

    # In time order: arrival, parse, queue, worker (enclosing the generation), response.
    order = [server.start_time_unix_nano, parse.start_time_unix_nano, parse.end_time_unix_nano,
             queue.start_time_unix_nano, queue.end_time_unix_nano, worker.start_time_unix_nano,
             gen.start_time_unix_nano, gen.end_time_unix_nano, worker.end_time_unix_nano,
             server.end_time_unix_nano]
    assert order == sorted(order), order
    assert parse.start_time_unix_nano == server.start_time_unix_nano
    assert parse.end_time_unix_nano == queue.start_time_unix_nano
    assert queue.end_time_unix_nano == worker.start_time_unix_nano

    # The access line of the request, as JSON, with the trace id and the token counts.
    access = _wait_for_line(srv, lambda j: j.get("logger") == "lmc.access"
                            and j.get("request_id") == "req-gen-1")
    assert access["trace_id"] == CLIENT_TRACE_ID
    assert (access["method"], access["route"], access["status"], access["model"]) == \
        ("POST", "/generate", 200, "tiny-llama")
    assert access["prompt_tokens"] == details["prompt_tokens"]
    assert access["generated_tokens"] == details["generated_tokens"]
    assert access["latency_ms"] > 0 and access["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", access["timestamp"])


def test_a_stream_and_a_new_trace_without_traceparent(traced):
    srv, receiver = traced
    r = srv.post("/generate_stream", {"inputs": "Hello world", "parameters": {"max_new_tokens": 4}},
                 headers={"X-Model-Name": "tiny-llama"})
    assert r.status == 200
    events = [json.loads(line[5:]) for line in r.body.decode().splitlines()
              if line.startswith("data:")]
    rid = r.headers["x-request-id"]
    access = _wait_for_line(srv, lambda j: j.get("logger") == "lmc.access"
                            and j.get("request_id") == rid)
    trace_id = access["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != CLIENT_TRACE_ID
    spans = receiver.trace(trace_id, {"POST /generate_stream", "worker", "generation"})
    server, gen = spans["POST /generate_stream"][1], spans["generation"][1]
    assert not server.parent_span_id  # a root span: the client sent no traceparent
    assert attrs(gen)["gen_ai.usage.output_tokens"] == events[-1]["details"]["generated_tokens"]
    worker = spans["worker"][1]
    assert gen.end_time_unix_nano <= worker.end_time_unix_nano <= server.end_time_unix_nano


def test_worker_log_lines_carry_the_request_and_trace_ids(traced):
    srv, receiver = traced
    r = srv.post("/predictions/logger", {"log": "json-hello"},
                 headers={"traceparent": TRACEPARENT.replace("00f0", "11f0")})
    assert r.status == 200
    rid = r.headers["x-request-id"]
    assert r.json() == {"request_id": rid}  # the property the worker got
    line = _wait_for_line(srv, lambda j: j.get("logger") == "fixture.logger"
                          and "json-hello" in j["message"])
    assert line["request_id"] == rid and line["trace_id"] == CLIENT_TRACE_ID
    assert line["level"] == "INFO" and line["worker"].startswith("logger")
    spans = receiver.trace(CLIENT_TRACE_ID, {"POST /predictions/{model}"})
    assert attrs(spans["POST /predictions/{model}"][1])["lmc.model"] == "logger"


def test_json_logs_everywhere_and_health_checks_untraced(traced):
    srv, receiver = traced
    assert srv.request("GET", "/ping").status == 200
    rid = srv.request("GET", "/ping").headers["x-request-id"]
    _wait_for_line(srv, lambda j: j.get("logger") == "lmc.access" and j.get("request_id") == rid)
    lines = srv.output().splitlines()
    assert not [ln for ln in lines if TEXT_LINE.match(ln)], "a text log line in JSON mode"
    js = json_lines(srv.output())
    assert {j["logger"] for j in js} >= {"lmc.server", "lmc.wlm", "lmc.access"}
    assert any(j.get("worker") for j in js)  # the workers log JSON too
    time.sleep(0.3)  # a span would have been exported by now (50 ms batches)
    with receiver._lock:
        assert not [s for _, s in receiver.spans if s.name == "GET /ping"]


def test_metrics_count_the_spans_the_collector_took(traced):
    from prometheus_client.parser import text_string_to_metric_families

    srv, receiver = traced
    assert srv.post("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                    headers={"X-Model-Name": "tiny-llama"}).status == 200
    deadline = time.monotonic() + 10
    while True:
        text = srv.request("GET", "/metrics").body.decode()
        values = {s.name: s.value for fam in text_string_to_metric_families(text)
                  for s in fam.samples if s.name.startswith(("lmc_trace", "lmc_traces"))}
        with receiver._lock:
            received = len(receiver.spans)
        if values.get("lmc_trace_spans_exported_total") == received or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert values == {"lmc_trace_spans_exported_total": received,
                      "lmc_trace_spans_failed_total": 0, "lmc_traces_dropped_total": 0}


def _wait_for_line(srv: LmcServer, pred, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        for j in json_lines(srv.output()):
            if pred(j):
                return j
        if time.monotonic() > deadline:
            raise AssertionError(f"no such log line in:\n{srv.output()[-4000:]}")
        time.sleep(0.05)


# -- text logs, tracing off ----------------------------------------------------------------------


def test_text_access_line_and_worker_line_with_the_request_id(tmp_path):
    shutil.copytree(FIXTURES / "server" / "logger", tmp_path / "logger")
    env = {"LMC_LOG_LEVEL": "INFO"}
    with LmcServer(["--model-dir", str(tmp_path / "logger")], env=env) as srv:
        r = srv.post("/invocations", {"log": "text-hello"},
                     headers={"X-Amzn-SageMaker-Inference-Id": "inf-42"})
        assert r.status == 200 and r.headers["x-request-id"] == "inf-42"
        deadline = time.monotonic() + 10
        while "lmc.access: POST /invocations" not in srv.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = srv.output()
    worker = [ln for ln in out.splitlines() if "handling: text-hello" in ln]
    assert len(worker) == 1, out
    assert re.fullmatch(r"\S+ \S+ INFO \[logger[^\]]*\] fixture\.logger: handling: text-hello "
                        r"request_id=inf-42", worker[0]), worker[0]
    access = [ln for ln in out.splitlines() if "lmc.access:" in ln and "/invocations" in ln]
    assert len(access) == 1, out
    assert re.fullmatch(r"\S+ \S+ INFO lmc\.access: POST /invocations 200 model=logger "
                        r"latency_ms=\d+\.\d prompt_tokens=- generated_tokens=- "
                        r"request_id=inf-42", access[0]), access[0]
    assert "trace_id=" not in out and "tracing on" not in out


def test_tracing_off_imports_no_opentelemetry():
    code = ("import sys, container.cli, container.server, container.tracing as t\n"
            "assert t.configure({}) is False and not t.enabled()\n"
            "assert t.configure({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://x', "
            "'OTEL_SDK_DISABLED': 'true'}) is False\n"
            "assert t.start_request(object()) is None\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# -- in-process units ----------------------------------------------------------------------------


@pytest.mark.parametrize("env, exporters", [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, []),
    ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, []),
])
def test_when_tracing_is_on(env, exporters):
    from container.tracing import wanted_exporters

    assert wanted_exporters(env) == exporters


@pytest.mark.parametrize("env, needle", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin' is not one of otlp, console, none"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "http/protobuf only"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PYTHON_EXCLUDED_URLS": "(unclosed"},
     "not a list of regular expressions"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"},
     "OTEL_TRACES_SAMPLER='sometimes': not one of always_on"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio",
      "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG='2': the sampling ratio"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PROPAGATORS": "tracecontext,b3"},
     "OTEL_PROPAGATORS='tracecontext,b3': 'b3' is not one this build has"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "soon"},
     "OTEL_BSP_SCHEDULE_DELAY='soon': not an integer"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_QUEUE_SIZE": "8",
      "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16"}, "larger than OTEL_BSP_MAX_QUEUE_SIZE (8)"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"},
     "OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318/v1/traces': not an http:// or https:// URL"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"},
     "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION='zstd': not gzip or none"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_HEADERS": "a=1,broken"},
     "'broken' is not key=value"),
])
def test_settings_tracing_cannot_honour_are_config_errors(env, needle):
    from container import tracing

    with pytest.raises(ConfigError, match=re.escape(needle)):
        tracing.configure(env)
    assert not tracing.enabled()


def _record(msg="hello %s", args=("x",), exc_info=None, **extra) -> logging.LogRecord:
    r = logging.LogRecord("some.logger", logging.WARNING, __file__, 1, msg, args, exc_info)
    r.__dict__.update(extra)
    return r


def test_json_and_text_formatters_carry_the_bound_ids():
    handler_filter = logs.RequestContextFilter()
    token = logs.bind("rid-1", "ab" * 16)
    try:
        rec = _record()
        handler_filter.filter(rec)
    finally:
        logs.unbind(token)
    assert logs.current_request_id() is None
    j = json.loads(logs.JsonFormatter({"worker": "m worker 1"}).format(rec))
    assert j["level"] == "WARNING" and j["logger"] == "some.logger" and j["message"] == "hello x"
    assert (j["request_id"], j["trace_id"], j["worker"]) == ("rid-1", "ab" * 16, "m worker 1")
    text = logs.TextFormatter("%(levelname)s %(name)s: %(message)s").format(rec)
    assert text == f"WARNING some.logger: hello x request_id=rid-1 trace_id={'ab' * 16}"
    # Outside a request: no ids; an exception goes in as text, after the message.
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record(exc_info=sys.exc_info(), lmc_fields={"status": 500})
    handler_filter.filter(rec)
    j = json.loads(logs.JsonFormatter().format(rec))
    assert "request_id" not in j and "trace_id" not in j and j["status"] == 500
    assert "ValueError: boom" in j["exception"]
    text = logs.TextFormatter("%(message)s").format(rec)
    assert text.startswith("hello x\nTraceback") and "request_id" not in text


def test_batch_ids_are_joined():
    assert logs.ids_of([{"x-request-id": "a"}, {"x-request-id": "b", "x-lmc-trace-id": "t"}]) == \
        ("a,b", "t")
    assert logs.ids_of([{}]) == (None, None)


class _FakeRequest(dict):
    """What tracing reads of an aiohttp request."""

    def __init__(self, headers: dict, path: str = "/invocations") -> None:
        super().__init__()
        from aiohttp import HttpVersion11
        from multidict import CIMultiDict

        self.headers, self.path, self.method = CIMultiDict(headers), path, "POST"
        self.scheme = "http"
        self.version, self.remote, self.match_info = HttpVersion11, "127.0.0.1", None


class _FakeJob:
    def __init__(self, t0: float, dispatched: bool) -> None:
        self.id, self.worker = 7, 1
        self.enqueued_at = t0 + 0.001
        self.dispatched_at = t0 + 0.002 if dispatched else None
        self.first_frame_at = t0 + 0.003 if dispatched else None
        self.done_at = t0 + 0.004
        self.stats = None


class _Collect:
    """An exporter that keeps what it is given."""

    def __init__(self) -> None:
        self.spans: list = []

    def export(self, spans) -> bool:
        self.spans.extend(spans)
        return True


def test_errors_undispatched_jobs_and_unsampled_requests_in_process():
    from container import tracing

    exporter = _Collect()
    assert tracing.configure({"OTEL_TRACES_EXPORTER": "none"}, exporter=exporter) is False
    assert tracing.configure({"OTEL_TRACES_EXPORTER": "otlp"}, exporter=exporter) is True
    try:
        # A 503 whose job never reached a worker: error status, a queue span, no worker span.
        req = _FakeRequest({"traceparent": TRACEPARENT})
        trace = tracing.start_request(req)
        assert req[tracing.TRACE_KEY] is trace and trace.trace_id == CLIENT_TRACE_ID
        tracing.end_request(trace, req, 503, _FakeJob(trace.t0_mono, dispatched=False))
        # Not sampled by the client: nothing is recorded, no trace id to log.
        req = _FakeRequest({"traceparent": TRACEPARENT[:-2] + "00"})
        trace = tracing.start_request(req)
        assert trace.trace_id is None
        tracing.end_request(trace, req, 200, _FakeJob(trace.t0_mono, dispatched=True))
        # /ping is not traced by default.
        assert tracing.start_request(_FakeRequest({}, "/ping")) is None
        assert tracing.flush()
    finally:
        tracing.shutdown()
    assert not tracing.enabled()
    spans = {s.name: s for s in exporter.spans}
    assert set(spans) == {"POST", "parse", "queue"}, sorted(spans)  # unmatched route: the method
    server = spans["POST"]
    assert server.status_code == tracing.STATUS_ERROR and server.kind == tracing.KIND_SERVER
    assert (server.trace_id, server.parent_span_id) == (int(CLIENT_TRACE_ID, 16),
                                                        int(CLIENT_SPAN_ID, 16))
    assert server.attributes["http.response.status_code"] == 503
    assert server.attributes["error.type"] == "503"
    assert spans["queue"].attributes["lmc.dispatched"] is False
    assert spans["queue"].end_ns - spans["queue"].start_ns == pytest.approx(3e6, abs=2e4)
    assert {s.parent_span_id for s in (spans["parse"], spans["queue"])} == {server.span_id}


def test_the_encoding_is_what_opentelemetry_proto_reads():
    """container/otlp.py writes protobuf by hand: every field it writes, read back by
    opentelemetry-proto's own classes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    from container import otlp, tracing

    long_text = "x" * 300  # a length over one varint byte
    spans = [
        tracing.SpanData(int(CLIENT_TRACE_ID, 16), 0x1122334455667788, int(CLIENT_SPAN_ID, 16),
                         True, "vendor=a", "POST /generate", tracing.KIND_SERVER,
                         1_700_000_000_123_456_789, 1_700_000_001_000_000_000,
                         {"s": "é" + long_text, "i": 503, "neg": -2, "b": True, "f": 0.25,
                          "list": ["length", "stop"]},
                         (("first_frame", 1_700_000_000_500_000_000),), tracing.STATUS_ERROR,
                         "HTTP 503"),
        tracing.SpanData(int(CLIENT_TRACE_ID, 16), 0x99, 0x1122334455667788, False, "",
                         "parse", tracing.KIND_INTERNAL, 5, 6, {}),
    ]
    resource = otlp.resource_attributes({"OTEL_SERVICE_NAME": "svc",
                                         "OTEL_RESOURCE_ATTRIBUTES": "k=v"})
    body = otlp.encode_request(otlp.attributes(0x0A, resource), otlp._scope(), spans)
    msg = ExportTraceServiceRequest()
    msg.ParseFromString(body)
    (rs,) = msg.resource_spans
    res = {a.key: _value(a.value) for a in rs.resource.attributes}
    assert res["service.name"] == "svc" and res["k"] == "v"
    assert res["telemetry.sdk.name"] == "opentelemetry"
    (ss,) = rs.scope_spans
    assert ss.scope.name == "lmc"
    server, parse = ss.spans
    assert server.trace_id.hex() == CLIENT_TRACE_ID and server.span_id.hex() == "1122334455667788"
    assert server.parent_span_id.hex() == CLIENT_SPAN_ID and server.trace_state == "vendor=a"
    assert server.name == "POST /generate" and server.kind == Span.SPAN_KIND_SERVER
    assert (server.start_time_unix_nano, server.end_time_unix_nano) == (
        1_700_000_000_123_456_789, 1_700_000_001_000_000_000)
    assert attrs(server) == {"s": "é" + long_text, "i": 503, "neg": -2, "b": True, "f": 0.25,
                             "list": ["length", "stop"]}
    (event,) = server.events
    assert (event.name, event.time_unix_nano) == ("first_frame", 1_700_000_000_500_000_000)
    assert server.status.code == Status.STATUS_CODE_ERROR and server.status.message == "HTTP 503"
    assert server.flags == 0x301
    assert parse.parent_span_id.hex() == "1122334455667788" and not parse.attributes
    assert parse.kind == Span.SPAN_KIND_INTERNAL and parse.status.code == Status.STATUS_CODE_UNSET
    assert parse.flags == 0x101 and parse.trace_state == ""


@pytest.mark.parametrize("value, parsed", [
    (TRACEPARENT, (int(CLIENT_TRACE_ID, 16), int(CLIENT_SPAN_ID, 16), True)),
    (TRACEPARENT[:-2] + "00", (int(CLIENT_TRACE_ID, 16), int(CLIENT_SPAN_ID, 16), False)),
    ("01-" + TRACEPARENT[3:] + "-future", (int(CLIENT_TRACE_ID, 16), int(CLIENT_SPAN_ID, 16),
                                           True)),  # a later version may add fields
    (None, None), ("", None), ("garbage", None),
    ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", None),  # an all-zero trace id is invalid
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", None),
    ("ff-" + TRACEPARENT[3:], None), (TRACEPARENT + "-x", None),  # version 00 has 4 fields
    (TRACEPARENT.upper(), None),  # the spec asks for lower case hex
])
def test_traceparent_parsing(value, parsed):
    from container.tracing import parse_traceparent

    assert parse_traceparent(value) == parsed


def test_samplers():
    from container.tracing import _sampler

    low, high = 1 << 20, (1 << 64) - 1  # the low 64 bits decide a ratio
    on = _sampler({})
    assert on.name == "parentbased_always_on"
    assert on(high, None) and not on(high, False) and on(low, True)
    ratio = _sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"})
    assert ratio(low, None) and not ratio(high, None) and ratio(low, False)  # parent ignored
    assert sum(ratio(i * 0x9E3779B97F4A7C15 & high, None) for i in range(10000)) in \
        range(900, 1100)
    pb = _sampler({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                   "OTEL_TRACES_SAMPLER_ARG": "0"})
    assert not pb(low, None) and pb(high, True)
    off = _sampler({"OTEL_TRACES_SAMPLER": "always_off"})
    assert not off(low, True)


def test_the_console_exporter_writes_one_json_line_per_span():
    import io

    from container import otlp, tracing

    out = io.StringIO()
    span = tracing.SpanData(1, 2, 0, False, "", "parse", tracing.KIND_INTERNAL, 5, 6, {"a": 1})
    otlp.ConsoleExporter({"service.name": "lmc"}, out).export([span, span])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2 and lines[0]["name"] == "parse" and lines[0]["attributes"] == {"a": 1}
    assert lines[0]["trace_id"] == "0" * 31 + "1" and lines[0]["parent_id"] is None


def test_the_exporter_retries_what_a_busy_collector_refuses_and_gives_up_on_a_dead_one():
    import http.server

    from container import otlp, tracing

    answers = [503, 429, 200]
    bodies = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(answers.pop(0) if answers else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    span = tracing.SpanData(1, 2, 0, False, "", "parse", tracing.KIND_INTERNAL, 5, 6, {})
    try:
        found = tracing.settings({"OTEL_EXPORTER_OTLP_ENDPOINT":
                                  f"http://127.0.0.1:{server.server_port}"})
        exporter = otlp.OtlpHttpExporter(found, {"service.name": "lmc"})
        assert exporter.export([span]) is True  # after a 503 and a 429
        assert len(bodies) == 3 and bodies[0] == bodies[2]
        assert exporter.export([span]) is False  # a 400 is not retried
        assert len(bodies) == 4 and exporter.failures == 1
        exporter.close()
    finally:
        server.shutdown()
        server.server_close()
    # Nobody listening: retried until OTEL_BSP_EXPORT_TIMEOUT, then dropped, never raised.
    found = tracing.settings({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                              "OTEL_BSP_EXPORT_TIMEOUT": "400"})
    exporter = otlp.OtlpHttpExporter(found, {})
    t0 = time.monotonic()
    assert exporter.export([span]) is False
    assert time.monotonic() - t0 < 2


def test_the_request_id_is_decided_once():
    from container import observe

    both = _FakeRequest({"X-Request-Id": "b", "X-Amzn-SageMaker-Inference-Id": "a"})
    assert observe.request_id(both) == "a" and observe.request_id(both) == "a"
    assert observe.worker_properties(both) == {"x-request-id": "a"}
    fresh = _FakeRequest({})
    assert re.fullmatch(r"[0-9a-f]{32}", observe.request_id(fresh))
    assert observe.request_id(fresh) == observe.request_id(fresh)
    # Not echoed into every log line: a huge or unprintable id is replaced.
    for bad in ("x" * 300, "a\x1bb"):
        assert re.fullmatch(r"[0-9a-f]{32}", observe.request_id(_FakeRequest({"X-Request-Id": bad})))
