"""The front end, workload manager and workers together: a real server process on a loopback
port, a real worker process running a model.py, real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest

from server_utils import LmcServer, model_dir


def gather_posts(url: str, bodies: list, *, timeout_s: float = 30.0,
                 headers: dict | None = None) -> list[tuple[int, bytes, float]]:
    """POST all bodies concurrently; (status, body, seconds) each."""

    async def one(session, body):
        t = time.monotonic()
        async with session.post(url, json=body, headers=headers) as r:
            return r.status, await r.read(), time.monotonic() - t

    async def run():
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            return await asyncio.gather(*(one(s, b) for b in bodies))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    d = model_dir(tmp_path_factory.mktemp("m"), "echo", "max_request_size_is_not_a_key=1\n")
    (d / "serving.properties").write_text("job_queue_size=100\n")
    with LmcServer(["--model-dir", str(d)], env={"SAGEMAKER_MAX_REQUEST_SIZE": "100000"}) as s:
        yield s


# -- basic contract ------------------------------------------------------------------------------


def test_ping_and_invocations(echo_server):
    r = echo_server.request("GET", "/ping")
    assert r.status == 200 and r.json() == {"echo": {"status": "Healthy"}}
    r = echo_server.post("/invocations", {"hello": "world"})
    assert r.status == 200
    assert r.json()["echo"] == {"hello": "world"}
    assert r.headers["Content-Type"].startswith("application/json")


def test_all_inference_routes_reach_the_model(echo_server):
    for path in ("/invocations", "/predictions/echo", "/predictions/echo/v1",
                 "/models/echo/invoke", "/invocations?model_name=echo"):
        r = echo_server.post(path, {"route": path})
        assert r.status == 200, (path, r.body)
        assert r.json()["echo"] == {"route": path}


def test_request_id_on_every_response(echo_server):
    r = echo_server.post("/invocations", {"a": 1},
                         headers={"X-Amzn-SageMaker-Inference-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    for resp in (echo_server.post("/invocations", {"a": 1}), echo_server.request("GET", "/ping"),
                 echo_server.request("GET", "/nowhere")):
        assert len(resp.headers["x-request-id"]) >= 16


def test_headers_and_custom_attributes_reach_the_handler(echo_server):
    r = echo_server.post("/invocations", {"a": 1},
                         headers={"X-Amzn-SageMaker-Custom-Attributes": "x-trace=7;x-user=bob",
                                  "X-Thing": "yes"})
    props = r.json()["props"]
    assert props["X-Thing"] == "yes"
    assert props["x-trace"] == "7" and props["x-user"] == "bob"


def test_init_properties_reach_warmup(echo_server):
    init = echo_server.post("/invocations", {"a": 1}).json()["init"]
    assert init["batch_size"] == "1" and init["model_dir"].endswith("echo")


def test_handler_exception_is_424_with_message(echo_server):
    r = echo_server.post("/invocations", {"raise": "bad"})
    assert r.status == 424
    body = r.json()
    assert body["code"] == 424 and body["type"] == "ModelError" and "bad" in body["message"]
    assert echo_server.post("/invocations", {"ok": 1}).status == 200  # still serving


def test_none_is_204_and_wrong_type_is_424(echo_server):
    assert echo_server.post("/invocations", {"none": True}).status == 204
    r = echo_server.post("/invocations", {"bad_type": True})
    assert r.status == 424 and "Invalid output type" in r.json()["message"]


def test_bad_requests_get_clear_4xx(echo_server):
    r = echo_server.post("/invocations", b"x" * 200_000)
    assert r.status == 413 and "max_request_size" in r.json()["message"]
    r = echo_server.post("/predictions/nope", {"a": 1})
    assert r.status == 404 and "nope" in r.json()["message"]
    assert r.json()["type"] == "ModelNotFound"
    r = echo_server.request("GET", "/invocations")
    assert r.status == 405 and r.json()["type"] == "MethodNotAllowed"
    r = echo_server.request("GET", "/no/such/route")
    assert r.status == 404 and "/no/such/route" in r.json()["message"]
    r = echo_server.post("/invocations", b"{not json", headers={"Content-Type": "application/json"})
    # The handler's get_as_json: a body that is not JSON is the client's mistake, a 400.
    assert r.status == 400 and "Expecting property name" in r.json()["message"]
    r = echo_server.request("PUT", "/models/echo?min_worker=abc")
    assert r.status == 400 and "min_worker='abc'" in r.json()["message"]
    assert echo_server.post("/invocations", {"still": "serving"}).status == 200


def test_streamed_custom_output_arrives_chunked(echo_server):
    async def run():
        async with aiohttp.ClientSession() as s:
            async with s.post(echo_server.url + "/invocations",
                              json={"stream": 5, "delay": 0.2}) as r:
                assert r.headers.get("Transfer-Encoding") == "chunked"
                arrivals = []
                async for line in r.content:
                    arrivals.append((time.time(), json.loads(line)))
                return arrivals

    arrivals = asyncio.run(run())
    assert [a[1]["chunk"] for a in arrivals] == [0, 1, 2, 3, 4]
    # Each chunk reached the client before the handler produced the next one (0.2 s later),
    # not all at the end; a bound relative to production, so a busy CI box cannot fail it.
    received = [t for t, _ in arrivals]
    produced = [c["t"] for _, c in arrivals]
    assert all(r < p for r, p in zip(received, produced[1:])), (received, produced)
    assert received[-1] - produced[-1] < 0.5, (received, produced)
    assert arrivals[-1][0] - arrivals[0][0] > 0.6


# -- batching, queue, scaling ---------------------------------------------------------------------


def test_dynamic_batch_of_four(tmp_path):
    d = model_dir(tmp_path, "echo", "batch_size=4\nmax_batch_delay=200\n")
    with LmcServer(["--model-dir", str(d)]) as s:
        results = gather_posts(s.url + "/invocations", [{"n": i} for i in range(4)])
    assert [st for st, _, _ in results] == [200] * 4
    bodies = [json.loads(b) for _, b, _ in results]
    assert [b["echo"]["n"] for b in bodies] == [0, 1, 2, 3]  # each client got its own item
    assert all(b["batch_size"] == 4 for b in bodies)  # one Input of 4 reached handle


def test_full_queue_gives_503_and_nothing_is_lost(tmp_path):
    d = model_dir(tmp_path, "echo", "job_queue_size=8\nminWorkers=1\nmaxWorkers=1\n")
    with LmcServer(["--model-dir", str(d)]) as s:
        t = time.monotonic()
        results = gather_posts(s.url + "/invocations",
                               [{"sleep": 0.05, "n": i} for i in range(40)], timeout_s=20)
        elapsed = time.monotonic() - t
        assert s.post("/invocations", {"after": 1}).status == 200
    statuses = [st for st, _, _ in results]
    assert len(statuses) == 40 and set(statuses) <= {200, 503}
    assert 1 <= statuses.count(200) <= 10  # 1 in the worker + at most 8 queued (+1 race)
    assert statuses.count(503) >= 30
    for st, body, _ in results:
        if st == 200:
            assert "n" in json.loads(body)["echo"]
        else:
            err = json.loads(body)
            assert err["type"] == "QueueFull" and "job_queue_size=8" in err["message"]
    assert elapsed < 5


def test_put_scales_workers(tmp_path):
    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)]) as s:
        [desc] = s.request("GET", "/models/echo").json()
        assert len(desc["workers"]) == 1
        r = s.request("PUT", "/models/echo?min_worker=2&max_worker=2")
        assert r.status == 200, r.body
        [desc] = s.request("GET", "/models/echo").json()
        assert (desc["minWorkers"], desc["maxWorkers"]) == (2, 2)
        assert len(desc["workers"]) == 2
        assert len({w["pid"] for w in desc["workers"]}) == 2
        # Both serve: two slow requests at once finish in about one request's time.
        res = gather_posts(s.url + "/invocations", [{"sleep": 0.5}, {"sleep": 0.5}])
        assert {json.loads(b)["pid"] for _, b, _ in res} == {w["pid"] for w in desc["workers"]}
        r = s.request("PUT", "/models/echo?min_worker=1&max_worker=1")
        [desc] = s.request("GET", "/models/echo").json()
        assert len(desc["workers"]) == 1


def test_scale_up_on_queue_depth_and_idle_scale_down(tmp_path):
    d = model_dir(tmp_path, "echo", "minWorkers=1\nmaxWorkers=2\nmax_idle_time=1\n")
    with LmcServer(["--model-dir", str(d)]) as s:
        res = gather_posts(s.url + "/invocations", [{"sleep": 0.3, "n": i} for i in range(10)])
        assert all(st == 200 for st, _, _ in res)
        pids = {json.loads(b)["pid"] for _, b, _ in res}
        assert len(pids) == 2  # a temporary worker joined under load
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            [desc] = s.request("GET", "/models/echo").json()
            if len(desc["workers"]) == 1:
                break
            time.sleep(0.2)
        assert len(desc["workers"]) == 1 and desc["workers"][0]["permanent"]


def test_worker_crash_fails_fast_and_restarts(tmp_path):
    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)]) as s:
        t = time.monotonic()
        r = s.post("/invocations", {"crash": True})
        assert time.monotonic() - t < 3
        assert r.status == 500
        err = r.json()
        assert err["type"] == "WorkerDied" and "SIGKILL" in err["message"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            r = s.post("/invocations", {"after": "crash"})
            if r.status == 200:
                break
            time.sleep(0.1)
        assert r.status == 200 and r.json()["echo"] == {"after": "crash"}
        assert s.request("GET", "/ping").status == 200


def test_killed_worker_mid_request(tmp_path):
    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)]) as s:
        [desc] = s.request("GET", "/models/echo").json()
        pid = desc["workers"][0]["pid"]

        async def run():
            async with aiohttp.ClientSession() as sess:
                req = asyncio.ensure_future(sess.post(s.url + "/invocations",
                                                      json={"sleep": 10}))
                await asyncio.sleep(0.5)
                os.kill(pid, signal.SIGKILL)
                t = time.monotonic()
                r = await req
                return r.status, await r.json(), time.monotonic() - t

        status, body, dt = asyncio.run(run())
        assert status == 500 and dt < 2 and str(pid) in body["message"]


def test_retry_threshold_marks_model_failed(tmp_path):
    # DJL's rule: FAILED once the crashes exceed retry_threshold, so 1 tolerates one crash.
    d = model_dir(tmp_path, "echo", "retry_threshold=1\n")
    with LmcServer(["--model-dir", str(d)]) as s:
        assert s.post("/invocations", {"crash": True}).status == 500
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # wait for the restart, then crash it again
            r = s.post("/invocations", {"crash": True})
            if r.status == 500:
                break
            time.sleep(0.1)
        r = s.wait_for_ping(500, 10)
        assert r.json()["echo"]["status"] == "Failed"
        assert "retry_threshold=1" in r.json()["echo"]["error"]
        r = s.post("/invocations", {"a": 1})
        assert r.status == 503 and "failed" in r.json()["message"]


def test_ping_503_while_loading_then_200(tmp_path):
    d = model_dir(tmp_path, "echo", "option.load_delay_s=3\n")
    with LmcServer(["--model-dir", str(d)], wait_status=None) as s:
        r = s.wait_for_ping(503, 10)
        t = time.monotonic()
        assert s.request("GET", "/ping").status == 503
        assert time.monotonic() - t < 0.5  # /ping never blocks on the load
        r = s.post("/invocations", {"a": 1})
        assert r.status == 503 and r.json()["type"] == "ModelNotReady"
        s.wait_for_ping(200, 15)
        assert s.post("/invocations", {"a": 1}).status == 200


def test_model_that_fails_to_load_reports_failed(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "model.py").write_text("import no_such_module_anywhere\n")
    with LmcServer(["--model-dir", str(d)], wait_status=500) as s:
        r = s.request("GET", "/ping")
        assert "no_such_module_anywhere" in r.json()["broken"]["error"]


def test_unknown_config_key_fails_startup(tmp_path):
    d = model_dir(tmp_path, "echo", "batch_sise=4\n")
    with LmcServer(["--model-dir", str(d)], wait_status=None) as s:
        rc = s.proc.wait(30)
        out = s.output()
    assert rc != 0
    assert "batch_sise" in out and "serving.properties" in out and "batch_size" in out


def test_management_api(tmp_path):
    a = model_dir(tmp_path / "a", "echo")
    b = model_dir(tmp_path / "b", "echo")
    with LmcServer(["--model-dir", str(a)], env={"LMC_ALLOWED_URLS": str(tmp_path / "b")}) as s:
        r = s.request("POST", f"/models?url={b}&model_name=second&batch_size=2"
                              f"&max_batch_delay=10&min_worker=1&max_worker=2")
        assert r.status == 200, r.body
        names = {m["modelName"] for m in s.request("GET", "/models").json()["models"]}
        assert names == {"echo", "second"}
        [desc] = s.request("GET", "/models/second").json()
        assert (desc["batchSize"], desc["maxBatchDelay"], desc["maxWorkers"]) == (2, 10, 2)
        assert s.post("/predictions/second", {"x": 2}).json()["echo"] == {"x": 2}
        # Two models: /invocations must be told which one.
        r = s.post("/invocations", {"x": 1})
        assert r.status == 400 and "second" in r.json()["message"]
        assert s.post("/invocations", {"x": 1},
                      headers={"X-Amzn-SageMaker-Target-Model": "second"}).status == 200
        r = s.request("POST", f"/models?url={b}&model_name=second")
        assert r.status == 409
        r = s.request("POST", "/models?url=/no/such/dir")
        assert r.status == 400 and "/no/such/dir" in r.json()["message"]
        r = s.request("POST", f"/models?url={b}&model_name=third&synchronous=false")
        assert r.status == 202
        # Outside LMC_ALLOWED_URLS: refused, saying which option allows it.
        r = s.request("POST", f"/models?url={a}&model_name=fourth")
        assert r.status == 403 and "LMC_ALLOWED_URLS" in r.json()["message"]
        assert s.request("DELETE", "/models/second").status == 200
        assert s.request("GET", "/models/second").status == 404
        assert s.post("/predictions/second", {"x": 2}).status == 404


def test_sigterm_drains_in_flight_requests(tmp_path):
    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)]) as s:

        async def run():
            async with aiohttp.ClientSession() as sess:
                req = asyncio.ensure_future(sess.post(s.url + "/invocations",
                                                      json={"sleep": 1.0, "n": 1}))
                await asyncio.sleep(0.3)
                s.proc.send_signal(signal.SIGTERM)
                r = await req
                return r.status, await r.json()

        status, body = asyncio.run(run())
        assert status == 200 and body["echo"]["n"] == 1
        assert s.proc.wait(30) == 0


def test_model_store_serves_each_folder(tmp_path):
    store = tmp_path / "store"
    model_dir(store, "echo")
    (store / "echo").rename(store / "alpha")
    model_dir(store, "echo")
    (store / "echo").rename(store / "beta")
    with LmcServer(["--model-store", str(store)]) as s:
        assert set(s.request("GET", "/ping").json()) == {"alpha", "beta"}
        for name in ("alpha", "beta"):
            r = s.post(f"/predictions/{name}", {"to": name})
            assert r.status == 200 and r.json()["echo"] == {"to": name}


def test_predict_timeout_gives_504(tmp_path):
    d = model_dir(tmp_path, "echo", "option.predict_timeout=0.5\n")
    with LmcServer(["--model-dir", str(d)]) as s:
        t = time.monotonic()
        r = s.post("/invocations", {"sleep": 3})
        assert r.status == 504 and "predict_timeout=0.5" in r.json()["message"]
        assert time.monotonic() - t < 2


def test_a_job_that_timed_out_in_the_queue_never_reaches_the_worker(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    d = model_dir(tmp_path, "echo", "option.predict_timeout=0.5\n")
    with LmcServer(["--model-dir", str(d)]) as s, ThreadPoolExecutor(2) as pool:
        busy = pool.submit(s.post, "/invocations", {"sleep": 1.0})  # holds the one worker
        time.sleep(0.1)
        queued = pool.submit(s.post, "/invocations", {"sleep": 3})  # waits in the queue
        assert busy.result().status == 504 and queued.result().status == 504
        time.sleep(0.8)  # the worker is free again; had it taken the queued job, it would
        r = s.post("/invocations", {"after": 1})  # sleep 3 s more and this would time out
        assert r.status == 200 and r.json()["echo"] == {"after": 1}


def test_client_disconnect_aborts_stream_in_worker(tmp_path):
    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)]) as s:

        async def run():
            async with aiohttp.ClientSession() as sess:
                r = await sess.post(s.url + "/invocations", json={"stream": 100, "delay": 0.05})
                await r.content.readline()
                await r.content.readline()
                r.close()  # the client goes away after 2 of 100 chunks (5 s of work)
                t = time.monotonic()
                async with sess.post(s.url + "/invocations", json={"after": 1}) as r2:
                    assert r2.status == 200
                return time.monotonic() - t

        # The single worker was freed by the abort, not by finishing the 5 s stream.
        assert asyncio.run(run()) < 1.5


def test_management_api_answers_only_allowed_client_networks(tmp_path):
    """Default: loopback only. Here only 127.0.0.2 may manage; a client on 127.0.0.1 (another
    loopback address stands in for a remote host) gets 403, while inference stays open."""
    import http.client

    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)], env={"LMC_MANAGEMENT_ALLOW": "127.0.0.2/32"}) as s:
        r = s.request("GET", "/models")
        assert r.status == 403 and "LMC_MANAGEMENT_ALLOW" in r.json()["message"]
        assert s.request("DELETE", "/models/echo").status == 403
        assert s.post("/invocations", {"x": 1}).status == 200
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10,
                                          source_address=("127.0.0.2", 0))
        conn.request("GET", "/models")
        assert conn.getresponse().status == 200
        conn.close()


def test_a_client_gone_while_queued_never_reaches_a_worker(tmp_path):
    """One worker, busy; a streaming request waits in the queue and its client disconnects.
    Its place is freed at once: the worker never runs it (it runs 2 requests, not 3)."""
    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)]) as s:

        async def run():
            async with aiohttp.ClientSession() as sess:
                busy = asyncio.ensure_future(sess.post(s.url + "/invocations",
                                                       json={"sleep": 1.5}))
                await asyncio.sleep(0.3)
                gone = asyncio.ensure_future(sess.post(s.url + "/invocations",
                                                       json={"stream": 20, "delay": 0.05}))
                await asyncio.sleep(0.3)
                gone.cancel()  # closes the connection while the request is queued
                await asyncio.gather(gone, return_exceptions=True)
                r = await busy
                assert r.status == 200
                async with sess.post(s.url + "/invocations", json={"after": 1}) as r2:
                    assert r2.status == 200

        asyncio.run(run())
        workers = s.request("GET", "/models/echo").json()[0]["workers"]
        assert sum(w["requests"] for w in workers) == 2


LONG_STREAM = {"inputs": "Once upon a time", "stream": True,
               "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}


async def _long_stream(sess, url: str, started: asyncio.Semaphore) -> list[dict]:
    """One streamed LMI request read to its end (its JSON lines); `started` is released when
    the first line arrives."""
    async with sess.post(url + "/invocations", json=LONG_STREAM) as r:
        assert r.status == 200
        lines = []
        async for line in r.content:
            if line.strip():
                lines.append(json.loads(line))
                if len(lines) == 1:
                    started.release()
        return lines


def test_sigterm_under_load_drains_streams_and_refuses_new_requests(tmp_path):
    """8 streams accepted when SIGTERM arrives (2 running on the native engine, 6 queued):
    every one finishes in full, a new request meanwhile gets 503 with Retry-After, and the
    server exits 0 within the 30 s SageMaker allows."""
    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path / "tiny")
    (d / "serving.properties").write_text("option.max_rolling_batch_size=2\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=120) as s:

        async def run():
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as sess:
                started = asyncio.Semaphore(0)
                streams = [asyncio.ensure_future(_long_stream(sess, s.url, started))
                           for _ in range(8)]
                for _ in range(2):  # the first two are generating; the rest are queued
                    await started.acquire()
                await asyncio.sleep(0.2)  # every request has reached the server
                s.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                async with aiohttp.ClientSession() as fresh:  # a new connection
                    async with fresh.post(s.url + "/invocations", json={"inputs": "hi"}) as r:
                        refused = (r.status, r.headers.get("Retry-After"), await r.json())
                return await asyncio.gather(*streams), refused

        t0 = time.monotonic()
        results, (status, retry_after, body) = asyncio.run(run())
        assert status == 503 and retry_after == "1" and "shutting down" in body["message"]
        for lines in results:
            assert lines[-1]["details"]["generated_tokens"] == 200
            assert len([x for x in lines if x.get("token")]) == 200
        assert s.proc.wait(30) == 0
        assert time.monotonic() - t0 < 30


def _fds_and_threads(pid: int) -> tuple[int, int]:
    import os

    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = int(next(line.split()[1] for line in open(f"/proc/{pid}/status")
                       if line.startswith("Threads:")))
    return fds, threads


def _assert_engine_idle(s, model: str = "tiny", timeout_s: float = 10.0) -> None:
    """/metrics says the engine runs nothing, holds nothing waiting, and every KV block is back
    in the pool (the engine reports about once a second)."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        text = s.request("GET", "/metrics").body.decode()
        values = {(x.name, x.labels.get("state")): x.value
                  for f in text_string_to_metric_families(text) for x in f.samples
                  if x.labels.get("model") == model}
        now = (values.get(("lmc_num_requests_running", None)),
               values.get(("lmc_num_requests_waiting", None)),
               values.get(("lmc_kv_cache_blocks", "used")))
        if now == (0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert now == (0, 0, 0), f"running, waiting, KV blocks used: {now}"
    assert values[("lmc_kv_cache_blocks", "total")] > 0


def test_overload_is_200_or_503_never_a_hang(tmp_path):
    """4x more concurrent requests than the engine runs plus the queue holds, half of them
    streaming: each gets a full 200 or a 503 with Retry-After, none hangs, and afterwards the
    server answers normally with no leaked connections or threads in the front end and no KV
    block left allocated in the engine."""
    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path / "tiny")
    (d / "serving.properties").write_text("job_queue_size=4\noption.max_rolling_batch_size=2\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=120) as s:
        body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 24,
                                                                "ignore_eos_token": True}}
        want = s.post("/invocations", body).json()["generated_text"]
        before = _fds_and_threads(s.proc.pid)

        async def one(sess, i):
            streaming = i % 2 == 0
            async with sess.post(s.url + "/invocations", json={**body, "stream": streaming}) as r:
                if r.status == 503:
                    return 503, r.headers.get("Retry-After"), None
                assert r.status == 200, await r.text()
                if not streaming:
                    return 200, None, (await r.json())["generated_text"]
                lines = [json.loads(x) for x in (await r.read()).splitlines() if x.strip()]
                return 200, None, lines[-1]["generated_text"]

        async def run():
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as sess:
                return await asyncio.gather(*(one(sess, i) for i in range(24)))

        results = asyncio.run(run())
        codes = [c for c, _, _ in results]
        assert set(codes) == {200, 503}, codes
        assert all(r == "1" for c, r, _ in results if c == 503)
        assert all(text == want for c, _, text in results if c == 200)  # greedy: same text
        assert s.request("GET", "/ping").status == 200
        assert s.post("/invocations", body).json()["generated_text"] == want
        time.sleep(1.0)  # connections the clients closed are reaped
        fds, threads = _fds_and_threads(s.proc.pid)
        assert fds <= before[0] + 2 and threads <= before[1] + 2, (before, (fds, threads))
        _assert_engine_idle(s)


def test_disconnect_storm_leaves_the_server_serving(tmp_path):
    """Rounds of clients that drop mid-stream, right after sending, and while queued: the
    queue empties, nothing hangs, and a well-behaved client then gets its exact answer."""
    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path / "tiny")
    (d / "serving.properties").write_text("option.max_rolling_batch_size=2\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=120) as s:
        body = {"inputs": "Hello world", "parameters": {"max_new_tokens": 40,
                                                        "ignore_eos_token": True}}
        want = s.post("/invocations", body).json()["generated_text"]

        async def rude(sess, kind):
            task = asyncio.ensure_future(sess.post(s.url + "/invocations",
                                                   json={**body, "stream": True}))
            if kind == 0:  # gone right after sending (queued or not yet started)
                await asyncio.sleep(0.05)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return
            r = await task
            await r.content.readline()  # mid-stream, after the first token
            r.close()

        async def run():
            for _ in range(3):
                async with aiohttp.ClientSession() as sess:
                    await asyncio.gather(*(rude(sess, i % 2) for i in range(10)))
            await asyncio.sleep(0.5)

        asyncio.run(run())
        t = time.monotonic()
        assert s.post("/invocations", body).json()["generated_text"] == want
        assert time.monotonic() - t < 20
        described = s.request("GET", "/models/tiny").json()[0]
        assert described["queueLength"] == 0
        _assert_engine_idle(s)  # every dropped client's KV blocks are back in the pool


def test_slow_and_malformed_clients_get_a_bounded_answer(tmp_path):
    """Raw-socket clients: a Content-Length far above the limit, a body that never arrives in
    full, invalid UTF-8, JSON nested 100k deep (on the LMI and OpenAI routes) and two
    pipelined requests. Each gets its 4xx (or both answers) within a bounded time, and a
    normal client is served throughout."""
    import socket

    d = model_dir(tmp_path, "echo")
    env = {"LMC_BODY_TIMEOUT": "1", "SAGEMAKER_MAX_REQUEST_SIZE": "1000000"}
    with LmcServer(["--model-dir", str(d)], env=env) as s:

        def raw(data: bytes, timeout: float = 10.0) -> tuple[float, bytes]:
            with socket.create_connection(("127.0.0.1", s.port), timeout=timeout) as c:
                c.sendall(data)
                t = time.monotonic()
                out = b""
                while b"\r\n\r\n" not in out:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    out += chunk
                return time.monotonic() - t, out

        def post(path: str, body: bytes, length: int | None = None) -> bytes:
            n = len(body) if length is None else length
            return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {n}\r\n\r\n").encode() + body

        small = b'{"x": 1}'
        elapsed, out = raw(post("/invocations", small, length=10**9))
        assert out.startswith(b"HTTP/1.1 413") and elapsed < 2
        elapsed, out = raw(post("/invocations", small, length=100))
        assert out.startswith(b"HTTP/1.1 408") and 0.9 < elapsed < 5
        assert s.post("/invocations", {"ok": 1}).status == 200  # others are unaffected
        _, out = raw(post("/v1/completions", b"\xff\xfe\xfa"))
        assert out.startswith(b"HTTP/1.1 400")
        nested = b"[" * 100_000 + b"]" * 100_000
        for path, status in (("/v1/completions", b"400"), ("/invocations", b"400"),
                             ("/generate", b"422")):  # TGI's status for a validation error
            _, out = raw(post(path, nested))
            assert out.startswith(b"HTTP/1.1 " + status), (path, out[:200])
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(post("/invocations", small) * 2)
            seen, deadline = b"", time.monotonic() + 10
            while seen.count(b"HTTP/1.1 200") < 2 and time.monotonic() < deadline:
                seen += c.recv(65536)
            assert seen.count(b"HTTP/1.1 200") == 2
        assert s.request("GET", "/ping").status == 200


def test_slow_loris_headers_get_408_and_a_closed_connection(tmp_path):
    """Headers trickled a byte at a time past LMC_HEADER_TIMEOUT: a 408 and the connection
    closed, while a normal client is served meanwhile; a slow body has its own deadline (above),
    and an idle keep-alive connection between requests is not cut by the header deadline."""
    import socket

    d = model_dir(tmp_path, "echo")
    with LmcServer(["--model-dir", str(d)], env={"LMC_HEADER_TIMEOUT": "1"}) as s:
        head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            start = time.monotonic()
            out = b""
            trickle = b"X-Slow: loris\r\n" * 3
            try:
                c.sendall(head)
                for i in range(len(trickle)):  # one header byte every 0.1 s, for 4.5 s
                    if i == 3:  # meanwhile a normal client is served
                        assert s.post("/invocations", {"ok": 1}).status == 200
                    c.sendall(trickle[i:i + 1])
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed the connection: what we expect
            try:
                while chunk := c.recv(65536):
                    out += chunk
            except ConnectionResetError:
                pass
            elapsed = time.monotonic() - start
        assert out.startswith(b"HTTP/1.1 408"), out[:200]
        assert b"LMC_HEADER_TIMEOUT" in out and 0.9 < elapsed < 4, elapsed
        # A kept-alive connection may sit idle between requests longer than the deadline.
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            request = head + b"\r\n{}"
            for _ in range(2):
                c.sendall(request)
                assert c.recv(65536).startswith(b"HTTP/1.1 200")
                time.sleep(1.5)
        assert s.request("GET", "/ping").status == 200


def test_worker_killed_under_many_streams_ends_each_with_an_error(tmp_path):
    """SIGKILL of the worker while 6 streams generate: every stream ends with an error line
    naming the dead worker (none hangs), and the restarted worker serves again."""
    import os

    from tiny_models import make_tiny_llama

    d = make_tiny_llama(tmp_path / "tiny")
    with LmcServer(["--model-dir", str(d)], timeout_s=120) as s:
        pid = s.request("GET", "/models/tiny").json()[0]["workers"][0]["pid"]

        async def run():
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as sess:
                started = asyncio.Semaphore(0)
                streams = [asyncio.ensure_future(_long_stream(sess, s.url, started))
                           for _ in range(6)]
                for _ in range(6):
                    await started.acquire()
                os.kill(pid, signal.SIGKILL)
                return await asyncio.gather(*streams)

        for lines in asyncio.run(run()):
            last = lines[-1]
            assert last.get("finish_reason") == "error", last
            assert "SIGKILL" in last["error"] and len(lines) < 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the restarted worker answers
            r = s.post("/invocations", {"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            if r.status == 200:
                break
            time.sleep(0.2)
        assert r.status == 200 and r.json()["generated_text"]
