"""Prometheus metrics (`GET /metrics`), answered from the front end's own state: no worker is
asked at scrape time.

Front-end metrics are counted by the observe middleware as each request ends. Engine metrics
come from the workers over the frame protocol: each request's statistics on its last frame
(Model.on_request_stats -> `engine_request`), engine-wide gauges and counters in the Stats
message a worker sends about once a second (Model.engine_stats, read at scrape time). All state
is touched on the event loop only, so no locks; the histograms are engines/contracts/metrics.py's
(bucket counts added up, exported cumulative).

Every metric, with its vLLM counterpart where there is one, is listed in METRICS (and the
README's table is checked against it by tests/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from container import tracing
from engines.contracts.metrics import (BATCH_BUCKETS, E2E_BUCKETS, ITL_BUCKETS, QUEUE_BUCKETS,
                                       REQUEST_BUCKETS, TTFT_BUCKETS, Histogram)

if TYPE_CHECKING:
    from container.server import ModelManager

# name -> (type, labels, meaning, vLLM's metric or "")
METRICS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "lmc_requests_total": ("counter", ("route", "model", "code"),
                           "HTTP requests answered, by route, model and status code", ""),
    "lmc_request_duration_seconds": ("histogram", ("route", "model"),
                                     "time from a request's arrival to the end of its answer",
                                     "vllm:e2e_request_latency_seconds (measured at the API)"),
    "lmc_request_queue_time_seconds": ("histogram", ("model",),
                                       "time a request waited in the model's queue for a worker",
                                       "vllm:request_queue_time_seconds"),
    "lmc_requests_rejected_total": ("counter", ("route", "model"),
                                    "requests answered 503 (queue full, loading, draining)", ""),
    "lmc_requests_timed_out_total": ("counter", ("route", "model"),
                                     "requests answered 504 (option.predict_timeout)", ""),
    "lmc_request_bytes_total": ("counter", ("route", "model"), "request body bytes received", ""),
    "lmc_response_bytes_total": ("counter", ("route", "model"), "response body bytes sent", ""),
    "lmc_queue_depth": ("gauge", ("model",), "requests waiting in the model's queue", ""),
    "lmc_queue_capacity": ("gauge", ("model",), "the model's queue size (job_queue_size)", ""),
    "lmc_workers": ("gauge", ("model", "state"), "worker groups by state", ""),
    "lmc_time_to_first_token_seconds": ("histogram", ("model",),
                                        "time from the worker taking a request to its first "
                                        "generated token", "vllm:time_to_first_token_seconds"),
    "lmc_inter_token_latency_seconds": ("histogram", ("model",),
                                        "time between two generated tokens of a sequence",
                                        "vllm:inter_token_latency_seconds"),
    "lmc_e2e_request_latency_seconds": ("histogram", ("model",),
                                        "time the worker spent on a request, first to last "
                                        "token", "vllm:e2e_request_latency_seconds"),
    "lmc_prompt_tokens_total": ("counter", ("model",), "prompt tokens processed",
                                "vllm:prompt_tokens_total"),
    "lmc_generation_tokens_total": ("counter", ("model",), "tokens generated",
                                    "vllm:generation_tokens_total"),
    "lmc_request_success_total": ("counter", ("model", "finish_reason"),
                                  "sequences finished, by finish reason",
                                  "vllm:request_success_total"),
    "lmc_adapter_requests_total": ("counter", ("model", "adapter"),
                                   "generation requests by LoRA adapter (\"\": the base model)",
                                   "vllm:lora_requests_info (as a counter)"),
    "lmc_num_requests_running": ("gauge", ("model",), "requests in the engine's running batch",
                                 "vllm:num_requests_running"),
    "lmc_num_requests_waiting": ("gauge", ("model",), "requests the engine holds waiting",
                                 "vllm:num_requests_waiting"),
    "lmc_batch_size": ("histogram", ("model",), "requests per engine step", ""),
    "lmc_kv_cache_usage_ratio": ("gauge", ("model",), "KV-cache blocks in use / all blocks",
                                 "vllm:kv_cache_usage_perc"),
    "lmc_kv_cache_blocks": ("gauge", ("model", "state"),
                            "KV-cache blocks, used and total", ""),
    "lmc_prefix_cache_queries_total": ("counter", ("model",),
                                       "prompt tokens looked up in the prefix cache",
                                       "vllm:prefix_cache_queries_total"),
    "lmc_prefix_cache_hits_total": ("counter", ("model",),
                                    "prompt tokens found in the prefix cache",
                                    "vllm:prefix_cache_hits_total"),
    "lmc_preemptions_total": ("counter", ("model",), "requests preempted to free KV blocks",
                              "vllm:num_preemptions_total"),
    "lmc_trace_spans_exported_total": ("counter", (), "spans the trace collector accepted "
                                       "(while tracing is on)", ""),
    "lmc_trace_spans_failed_total": ("counter", (), "spans whose export failed after its "
                                     "retries (while tracing is on)", ""),
    "lmc_traces_dropped_total": ("counter", (), "traces dropped because the export queue was "
                                 "full (OTEL_BSP_MAX_QUEUE_SIZE; while tracing is on)", ""),
}

_ENGINE_HISTOGRAMS = {"lmc_time_to_first_token_seconds": TTFT_BUCKETS,
                      "lmc_inter_token_latency_seconds": ITL_BUCKETS,
                      "lmc_e2e_request_latency_seconds": E2E_BUCKETS}


class Metrics:
    """Every metric of one server. `observe_request` and `engine_request` count; the registry
    collects (prometheus_client calls `collect` on each scrape)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.requests: dict[tuple[str, str, str], int] = {}
        self.bytes_in: dict[tuple[str, str], int] = {}
        self.bytes_out: dict[tuple[str, str], int] = {}
        self.duration: dict[tuple[str, str], Histogram] = {}
        self.queue_time: dict[str, Histogram] = {}
        self.engine_hist: dict[tuple[str, str], Histogram] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.generation_tokens: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.adapters: dict[tuple[str, str], int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # ---- counting ----------------------------------------------------------------------------

    def observe_request(self, route: str, model: str, code: int, seconds: float,
                        bytes_in: int, bytes_out: int, queue_s: float | None) -> None:
        key = (route, model)
        self.requests[(route, model, str(code))] = self.requests.get((route, model, str(code)),
                                                                     0) + 1
        h = self.duration.get(key)
        if h is None:
            h = self.duration[key] = Histogram(REQUEST_BUCKETS)
        h.observe(seconds)
        if bytes_in:
            self.bytes_in[key] = self.bytes_in.get(key, 0) + bytes_in
        if bytes_out:
            self.bytes_out[key] = self.bytes_out.get(key, 0) + bytes_out
        if queue_s is not None:
            q = self.queue_time.get(model)
            if q is None:
                q = self.queue_time[model] = Histogram(QUEUE_BUCKETS)
            q.observe(queue_s)

    def engine_request(self, model: str, stats: dict) -> None:
        """One request's statistics, as its worker measured them."""
        self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + stats["prompt_tokens"]
        self.generation_tokens[model] = (self.generation_tokens.get(model, 0)
                                         + stats["generation_tokens"])
        if stats.get("ttft_s") is not None:
            self._engine_hist("lmc_time_to_first_token_seconds", model).observe(stats["ttft_s"])
        self._engine_hist("lmc_inter_token_latency_seconds", model).add(stats["itl"])
        self._engine_hist("lmc_e2e_request_latency_seconds", model).observe(stats["e2e_s"])
        for reason, n in stats.get("finish", {}).items():
            self.finished[(model, reason)] = self.finished.get((model, reason), 0) + n
        adapter = stats.get("adapter") or ""
        self.adapters[(model, adapter)] = self.adapters.get((model, adapter), 0) + 1

    def _engine_hist(self, name: str, model: str) -> Histogram:
        h = self.engine_hist.get((name, model))
        if h is None:
            h = self.engine_hist[(name, model)] = Histogram(_ENGINE_HISTOGRAMS[name])
        return h

    # ---- exporting ---------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        # The 0.0.4 text format: what every Prometheus (2.x and 3.x) and agent scrapes. Our
        # names need no escaping, so the body is the same in both versions.
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def collect(self) -> Iterator[Metric]:
        fams = {name: _family(name) for name in METRICS}
        for (route, model, code), n in self.requests.items():
            fams["lmc_requests_total"].add_metric([route, model, code], n)
        for (route, model, code), n in _by_code(self.requests, "503"):
            fams["lmc_requests_rejected_total"].add_metric([route, model], n)
        for (route, model, code), n in _by_code(self.requests, "504"):
            fams["lmc_requests_timed_out_total"].add_metric([route, model], n)
        for key, n in self.bytes_in.items():
            fams["lmc_request_bytes_total"].add_metric(list(key), n)
        for key, n in self.bytes_out.items():
            fams["lmc_response_bytes_total"].add_metric(list(key), n)
        for key, h in self.duration.items():
            _add_histogram(fams["lmc_request_duration_seconds"], list(key), h)
        for model, h in self.queue_time.items():
            _add_histogram(fams["lmc_request_queue_time_seconds"], [model], h)
        for (name, model), h in self.engine_hist.items():
            _add_histogram(fams[name], [model], h)
        for model, n in self.prompt_tokens.items():
            fams["lmc_prompt_tokens_total"].add_metric([model], n)
        for model, n in self.generation_tokens.items():
            fams["lmc_generation_tokens_total"].add_metric([model], n)
        for key, n in self.finished.items():
            fams["lmc_request_success_total"].add_metric(list(key), n)
        for key, n in self.adapters.items():
            fams["lmc_adapter_requests_total"].add_metric(list(key), n)
        for name, model in self.manager.models.items():
            self._collect_model(fams, name, model)
        traces = tracing.counts()
        if traces is not None:
            fams["lmc_trace_spans_exported_total"].add_metric([], traces["exported"])
            fams["lmc_trace_spans_failed_total"].add_metric([], traces["failed"])
            fams["lmc_traces_dropped_total"].add_metric([], traces["dropped"])
        yield from fams.values()

    def _collect_model(self, fams: dict[str, Metric], name: str, model) -> None:
        fams["lmc_queue_depth"].add_metric([name], model.queue.qsize())
        fams["lmc_queue_capacity"].add_metric([name], model.queue.maxsize)
        states: dict[str, int] = {}
        for w in model.workers:
            states[w.state.value] = states.get(w.state.value, 0) + 1
        for state, n in sorted(states.items()):
            fams["lmc_workers"].add_metric([name, state], n)
        engine = model.engine_stats()
        if not engine:
            return
        fams["lmc_num_requests_running"].add_metric([name], engine.get("running", 0))
        fams["lmc_num_requests_waiting"].add_metric([name], engine.get("waiting", 0))
        total, used = engine.get("kv_blocks_total", 0), engine.get("kv_blocks_used", 0)
        if total:
            fams["lmc_kv_cache_usage_ratio"].add_metric([name], used / total)
            fams["lmc_kv_cache_blocks"].add_metric([name, "used"], used)
            fams["lmc_kv_cache_blocks"].add_metric([name, "total"], total)
        for key, metric in (("prefix_queries", "lmc_prefix_cache_queries_total"),
                            ("prefix_hits", "lmc_prefix_cache_hits_total"),
                            ("preemptions", "lmc_preemptions_total")):
            if key in engine:
                fams[metric].add_metric([name], engine[key])
        if "batch_size" in engine:
            h = Histogram(BATCH_BUCKETS)
            h.add(engine["batch_size"])
            _add_histogram(fams["lmc_batch_size"], [name], h)


def _by_code(requests: dict[tuple[str, str, str], int], code: str):
    return ((k, n) for k, n in requests.items() if k[2] == code)


def _family(name: str) -> Metric:
    kind, labels, meaning, _ = METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name, meaning, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, meaning, labels=labels)
    return HistogramMetricFamily(name, meaning, labels=labels)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    family.add_metric(labels, h.cumulative(), h.sum)


async def serve(request):
    """GET /metrics: the Prometheus text exposition."""
    from aiohttp import web

    from container.observe import METRICS_KEY
    from engines.contracts import errors as E

    metrics = request.app.get(METRICS_KEY)
    if metrics is None:
        raise E.RouteNotFound("metrics are off on this server (LMC_METRICS=false)")
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})
