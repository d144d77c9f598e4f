"""GET /metrics after a known workload on a live server: exact counter values, histograms that
observed exactly the requests sent, engine gauges back to idle (no KV block leaked), and text
that prometheus-client's own parser reads."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import make_tiny_llama

from engines.contracts.metrics import ITL_BUCKETS, Histogram, RequestClock
from tests.server_utils import FIXTURES, LmcServer

PROMPT = "the quick brown fox jumps over the lazy dog " * 4
ROUTE = "/predictions/{model}"


def scrape(srv) -> dict[tuple[str, tuple], float]:
    r = srv.request("GET", "/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def generate(srv, body: dict) -> tuple[int, bytes]:
    r = srv.request("POST", "/predictions/tiny", body)
    return r.status, r.body


def aborted_stream(srv) -> None:
    """A stream whose client goes away after the first chunk."""
    body = json.dumps({"inputs": PROMPT, "stream": True,
                       "parameters": {"max_new_tokens": 150, "min_new_tokens": 150}}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as c:
        c.sendall(b"POST /predictions/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        out = b""
        while b"\r\n\r\n" not in out:
            out += c.recv(4096)
        assert out.startswith(b"HTTP/1.1 200")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    tiny = make_tiny_llama(root / "tiny")
    echo = root / "echo"
    import shutil

    shutil.copytree(FIXTURES / "server" / "echo", echo)
    (echo / "serving.properties").write_text("job_queue_size=1\n")
    env = {"SERVING_LOAD_MODELS": f"tiny={tiny},echo={echo}"}
    with LmcServer([], env=env, timeout_s=120) as srv:
        yield srv


def test_metrics_after_a_known_workload(served):
    srv = served
    params = {"max_new_tokens": 4, "min_new_tokens": 4, "details": True,
              "decoder_input_details": True}
    prompt_tokens = 0
    bodies_in = 0
    for _ in range(3):  # 3 plain generations of exactly 4 tokens
        body = {"inputs": PROMPT, "parameters": params}
        status, out = generate(srv, body)
        assert status == 200
        prompt_tokens += len(json.loads(out)["details"]["prefill"])
        bodies_in += len(json.dumps(body))
    per_prompt = prompt_tokens // 3
    for _ in range(2):  # 2 streams of exactly 4 tokens
        body = {"inputs": PROMPT, "stream": True,
                "parameters": {"max_new_tokens": 4, "min_new_tokens": 4}}
        status, out = generate(srv, body)
        assert status == 200 and len(out.splitlines()) == 4
        bodies_in += len(json.dumps(body))
    bad = {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}
    assert generate(srv, bad)[0] == 400  # refused before the engine: no engine statistics
    bodies_in += len(json.dumps(bad))
    aborted_stream(srv)

    # The echo model holds one request in its queue: one running, one queued, the third 503.
    statuses = []

    def echo(sleep):
        statuses.append(srv.request("POST", "/predictions/echo", {"sleep": sleep}).status)

    first = threading.Thread(target=echo, args=(1.5,))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=echo, args=(0,))
    second.start()
    time.sleep(0.3)
    echo(0)
    first.join()
    second.join()
    assert sorted(statuses) == [200, 200, 503]

    # Engine gauges come about once a second: wait until the engine is idle again.
    deadline = time.monotonic() + 10
    while True:
        m = scrape(srv)
        idle = (value(m, "lmc_num_requests_running", model="tiny") == 0
                and value(m, "lmc_kv_cache_blocks", model="tiny", state="used") == 0
                and value(m, "lmc_e2e_request_latency_seconds_count", model="tiny") == 6)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    # Front end: every request counted by route, model and status.
    assert value(m, "lmc_requests_total", route=ROUTE, model="tiny", code="200") == 6
    assert value(m, "lmc_requests_total", route=ROUTE, model="tiny", code="400") == 1
    assert value(m, "lmc_requests_total", route=ROUTE, model="echo", code="200") == 2
    assert value(m, "lmc_requests_total", route=ROUTE, model="echo", code="503") == 1
    assert value(m, "lmc_requests_rejected_total", route=ROUTE, model="echo") == 1
    assert value(m, "lmc_requests_timed_out_total", route=ROUTE, model="echo") == 0
    assert value(m, "lmc_request_duration_seconds_count", route=ROUTE, model="tiny") == 7
    assert value(m, "lmc_request_duration_seconds_count", route=ROUTE, model="echo") == 3
    # Queue time: every request that reached a worker (not the 503).
    assert value(m, "lmc_request_queue_time_seconds_count", model="tiny") == 7
    assert value(m, "lmc_request_queue_time_seconds_count", model="echo") == 2
    tiny_bytes = bodies_in + len(json.dumps({"inputs": PROMPT, "stream": True, "parameters": {
        "max_new_tokens": 150, "min_new_tokens": 150}}))
    assert value(m, "lmc_request_bytes_total", route=ROUTE, model="tiny") == tiny_bytes
    assert value(m, "lmc_queue_depth", model="echo") == 0
    assert value(m, "lmc_queue_capacity", model="echo") == 1
    assert value(m, "lmc_workers", model="tiny", state="READY") == 1

    # Engine: 5 requests of exactly 4 tokens, and the aborted one with 1..150.
    generated = value(m, "lmc_generation_tokens_total", model="tiny")
    aborted_tokens = generated - 20
    assert 1 <= aborted_tokens <= 150
    assert value(m, "lmc_prompt_tokens_total", model="tiny") == 6 * per_prompt
    assert value(m, "lmc_time_to_first_token_seconds_count", model="tiny") == 6
    assert value(m, "lmc_e2e_request_latency_seconds_count", model="tiny") == 6
    # Inter-token latencies: one per token after each sequence's first.
    assert value(m, "lmc_inter_token_latency_seconds_count", model="tiny") == \
        5 * 3 + aborted_tokens - 1
    length = value(m, "lmc_request_success_total", model="tiny", finish_reason="length")
    assert length == 5 + (aborted_tokens == 150)  # the aborted one ends without a reason
    assert value(m, "lmc_adapter_requests_total", model="tiny", adapter="") == 6
    # Histogram buckets are cumulative and end with the count.
    ttft = [v for (name, labels), v in m.items()
            if name == "lmc_time_to_first_token_seconds_bucket" and ("model", "tiny") in labels]
    assert ttft == sorted(ttft) and max(ttft) == 6

    # Engine gauges, back to idle: nothing running, no KV block held (no leak).
    assert value(m, "lmc_num_requests_running", model="tiny") == 0
    assert value(m, "lmc_num_requests_waiting", model="tiny") == 0
    assert value(m, "lmc_kv_cache_blocks", model="tiny", state="used") == 0
    assert value(m, "lmc_kv_cache_usage_ratio", model="tiny") == 0
    assert value(m, "lmc_kv_cache_blocks", model="tiny", state="total") > 0
    # The same prompt 6 times: the prefix cache was asked for every prompt token and found
    # whole blocks of it after the first request.
    assert value(m, "lmc_prefix_cache_queries_total", model="tiny") == 6 * per_prompt
    hits = value(m, "lmc_prefix_cache_hits_total", model="tiny")
    assert 0 < hits < 6 * per_prompt
    assert value(m, "lmc_preemptions_total", model="tiny") == 0
    assert value(m, "lmc_batch_size_count", model="tiny") > 0
    # The echo handler keeps no engine statistics: no engine series for it.
    assert ("lmc_generation_tokens_total", (("model", "echo"),)) not in m


def test_histogram_and_request_clock():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1, 1] and h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    other = Histogram((0.1, 1.0))
    other.add(h.to_wire())
    assert other.counts == h.counts and other.sum == pytest.approx(3.65)
    with pytest.raises(ValueError, match="histogram of 3 buckets added to one of 4"):
        Histogram((0.1, 1.0, 2.0)).add(h.to_wire())

    clock = RequestClock(prompt_tokens=7, adapter="a")
    for t in (1.0, 1.5, 1.75):  # sequence 0
        clock.token(0, now=t)
    clock.token(1, now=1.2)  # sequence 1: its first token has no interval
    clock.finished("length")
    clock.finished("eos_token")
    s = clock.stats()
    assert s["generation_tokens"] == 4 and s["prompt_tokens"] == 7 and s["adapter"] == "a"
    itl = Histogram(ITL_BUCKETS)
    itl.add(s["itl"])
    assert itl.count == 2 and itl.sum == pytest.approx(0.75)
    assert s["finish"] == {"length": 1, "eos_token": 1}


def test_metrics_can_be_turned_off(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "server" / "echo", tmp_path / "echo")
    with LmcServer(["--model-dir", str(tmp_path / "echo")], env={"LMC_METRICS": "false"}) as s:
        r = s.request("GET", "/metrics")
        assert r.status == 404 and "LMC_METRICS=false" in r.json()["message"]


def test_readme_lists_every_metric():
    from container.metrics import METRICS
    from tests.server_utils import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Metrics (`GET /metrics`)"):]
    listed = set(re.findall(r"^\| `(lmc_[a-z0-9_]+)` \|", section, flags=re.M))
    assert listed == set(METRICS)
