"""DJL's handler modes beyond a plain handle(inputs): async handlers (`async def handle`,
option.async_mode) on one event loop, and custom rolling-batch handlers (option.rolling_batch),
both answering with Output.binary_encode frames. Checked the way DJL's PyEngineTest checks its
async_echo and rolling_batch models: concurrency, incremental streams, per-request tokens."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from engines.contracts.protocol import RequestItem
from handlers.outputs import Output, decode_frame
from handlers.service import HandlerLoadError, ModelService
from tests.server_utils import LmcServer

FIXTURES = Path(__file__).parent / "fixtures" / "handlers"


def load(name: str, **props: str) -> ModelService:
    model_dir = str(FIXTURES / name)
    return ModelService.load(model_dir, {"model_dir": model_dir, **props})


def item(body: dict, i: int = 0, **headers: str) -> RequestItem:
    props = {"Content-Type": "application/json", **{k.replace("_", "-"): v
                                                   for k, v in headers.items()}}
    return RequestItem(i, props, [("data", json.dumps(body).encode())])


def in_threads(fn, n: int) -> dict[int, object]:
    out: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == n
    return out


def test_binary_encode_is_djl_wire_format():
    frame = Output.binary_encode({"data": "hé", "last": True, "code": None})
    assert bytes(frame) == (b"\x00\x03" b"\x00\x00\x00\x04data" b"\x00\x00\x00\x03h\xc3\xa9"
                            b"\x00\x00\x00\x04last" b"\x00\x00\x00\x04True"
                            b"\x00\x00\x00\x04code" b"\xff\xff\xff\xff")
    assert decode_frame(frame) == {"data": "hé", "last": "True", "code": None}
    with pytest.raises(ValueError, match="not an Output.binary_encode frame"):
        decode_frame(b'{"generated_text": "x"}')


# ---- async handlers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_svc():
    svc = load("async_echo")
    yield svc
    svc.shutdown()


def test_async_handle_serves_many_at_once(async_svc):
    assert async_svc.capabilities.max_concurrency == 32  # DJL's max_rolling_batch_size default
    start = time.monotonic()
    body = {"inputs": "x", "parameters": {"tokens": 2, "delay": 0.25}}
    results = in_threads(lambda i: async_svc.invoke([item({**body, "inputs": f"r{i}"}, i)]), 5)
    elapsed = time.monotonic() - start
    # Five requests of 0.5 s each on one event loop overlap: far less than 2.5 s in a row.
    assert elapsed < 1.5, elapsed
    for i, [r] in results.items():
        assert (r.code, r.stream) == (200, None)
        assert json.loads(r.body) == {"generated_text": f"r{i}-0 r{i}-1"}
    [state] = async_svc.invoke([item({"inputs": "state"})])
    state = json.loads(state.body)
    assert state["peak"] == 5 and state["running"] == 0 and state["warmups"] == 1


def test_async_frame_headers_drop_transport_headers(async_svc):
    # The handler copies every request property onto its Output, Content-Length included.
    [r] = async_svc.invoke([item({"inputs": "h", "parameters": {"tokens": 1, "delay": 0}},
                                 X_Trace="t-1", Content_Length="999", Host="evil")])
    assert r.headers == {"Content-Type": "application/json", "X-Trace": "t-1"}


def test_async_generator_streams_frames_in_order(async_svc):
    [r] = async_svc.invoke([item({"inputs": "s", "stream": True,
                                  "parameters": {"tokens": 3, "delay": 0.01}})])
    assert r.code == 200 and r.body == b""
    assert r.headers == {"Content-Type": "application/jsonlines", "x-prompt": "s"}
    assert list(r.stream) == [json.dumps({"token": f"s-{i}"}).encode() + b"\n" for i in range(3)]


def test_async_error_frames(async_svc):
    # Before the first byte: the frame's code is the response status, its error the message.
    [r] = async_svc.invoke([item({"inputs": "e", "parameters": {"tokens": 1, "fail_at": 0}})])
    assert r.code == 422 and json.loads(r.body)["message"] == "the handler refused it"
    # After it: the stream breaks with the frame's error (the worker sends it as the End).
    [r] = async_svc.invoke([item({"inputs": "e", "stream": True,
                                  "parameters": {"tokens": 3, "delay": 0, "fail_at": 1}})])
    chunks = iter(r.stream)
    assert next(chunks) == b'{"token": "e-0"}\n'
    with pytest.raises(RuntimeError, match="failed at token 1"):
        next(chunks)


def test_async_stream_closed_early_stops_the_generator(async_svc):
    [r] = async_svc.invoke([item({"inputs": "c", "stream": True,
                                  "parameters": {"tokens": 50, "delay": 0.01}})])
    chunks = iter(r.stream)
    next(chunks)
    chunks.close()  # what the worker does when the client goes away
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        [s] = async_svc.invoke([item({"inputs": "state"})])
        if json.loads(s.body)["running"] == 0:
            break
        time.sleep(0.02)
    assert json.loads(s.body)["running"] == 0


def test_async_mode_switch(tmp_path):
    # option.async_mode=false keeps an async handle, one request at a time.
    svc = load("async_echo", async_mode="false")
    try:
        assert svc.capabilities.max_concurrency == 1
        [r] = svc.invoke([item({"inputs": "q", "parameters": {"tokens": 1, "delay": 0}})])
        assert json.loads(r.body) == {"generated_text": "q-0"}
    finally:
        svc.shutdown()
    svc = load("async_echo", max_rolling_batch_size="4")
    assert svc.capabilities.max_concurrency == 4
    svc.shutdown()
    with pytest.raises(HandlerLoadError, match=r"option.async_mode='flase' is not a boolean"):
        load("async_echo", async_mode="flase")
    with pytest.raises(HandlerLoadError, match=r"option.max_rolling_batch_size='0' must be"):
        load("async_echo", max_rolling_batch_size="0")


def test_plain_async_handle_returning_plain_output(tmp_path):
    (tmp_path / "model.py").write_text(
        "from djl_python import Output\n"
        "async def handle(inputs):\n"
        "    if inputs.is_empty():\n"
        "        return None\n"
        "    return Output().add_as_json({'echo': inputs.get_as_json()})\n")
    svc = ModelService.load(str(tmp_path), {"model_dir": str(tmp_path)})
    try:
        [r] = svc.invoke([item({"a": 1})])
        assert (r.code, json.loads(r.body)) == (200, {"echo": {"a": 1}})
    finally:
        svc.shutdown()


# ---- custom rolling batch --------------------------------------------------------------------


@pytest.fixture()
def rolling_svc():
    svc = load("rolling_tokens", rolling_batch="auto", max_rolling_batch_size="3")
    yield svc
    svc.shutdown()


def stats(svc) -> dict:
    [r] = svc.invoke([item({"inputs": "stats"})])
    return json.loads(r.body)


def test_rolling_batch_tokens_per_request_no_cross_talk(rolling_svc):
    assert rolling_svc.capabilities.max_concurrency == 3

    def one(i):
        [r] = rolling_svc.invoke([item({"inputs": f"p{i}", "parameters": {"max_length": 2 + i}},
                                       i)])
        return r.code, r.headers, b"".join(r.stream)

    results = in_threads(one, 5)
    for i, (code, headers, body) in results.items():
        assert code == 200 and headers == {"x-prompt": f"p{i}"}
        assert body.decode() == "".join(f" p{i}:{k}" for k in range(1, 3 + i))
    calls = stats(rolling_svc)["calls"]
    assert max(calls) == 3  # never more than max_rolling_batch_size at once
    # Every token of every request came from exactly one call (2+3+4+5+6 tokens).
    assert sum(calls) == sum(2 + i for i in range(5))


def test_rolling_batch_failure_fails_the_batch_and_resets(rolling_svc):
    [first] = rolling_svc.invoke([item({"inputs": "f0", "parameters": {"max_length": 50}})])
    assert first.stream is not None  # streaming: it has its first token
    # A request that makes the handler raise fails the whole batch, as in DJL: itself before
    # its first byte (424 with the error), the one already streaming with a broken stream.
    [second] = rolling_svc.invoke([item({"inputs": "f1", "parameters": {"fail": True}}, 1)])
    assert second.code == 424
    assert "a request asked the batch to fail" in json.loads(second.body)["message"]
    with pytest.raises(RuntimeError, match="a request asked the batch to fail"):
        b"".join(first.stream)
    # The next call tells the handler to reset, and a new request works.
    [r] = rolling_svc.invoke([item({"inputs": "z", "parameters": {"max_length": 1}})])
    assert (r.code, r.body) == (200, b" z:1")
    assert stats(rolling_svc)["resets"] == 1


def test_rolling_batch_size_must_be_positive():
    with pytest.raises(HandlerLoadError, match=r"option.max_rolling_batch_size='x' must be"):
        load("rolling_tokens", rolling_batch="auto", max_rolling_batch_size="x")


# ---- through the server ----------------------------------------------------------------------


def served(tmp_path: Path, fixture: str, properties: str = "") -> Path:
    dst = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, dst)
    if properties:
        (dst / "serving.properties").write_text(properties)
    return dst


async def timed_request(session, url: str, body: dict) -> tuple[int, list[tuple[float, bytes]]]:
    start = time.monotonic()
    async with session.post(url, json=body) as resp:
        chunks = []
        async for data, _ in resp.content.iter_chunks():
            chunks.append((time.monotonic() - start, data))
        return resp.status, chunks


def test_async_handler_served_concurrently_and_streams_incrementally(tmp_path):
    with LmcServer(["--model-dir", str(served(tmp_path, "async_echo"))]) as srv:
        url = f"{srv.url}/invocations"

        async def run():
            async with aiohttp.ClientSession() as s:
                bodies = [{"inputs": f"r{i}", "stream": i % 2 == 0,
                           "parameters": {"tokens": 4, "delay": 0.25}} for i in range(5)]
                start = time.monotonic()
                got = await asyncio.gather(*(timed_request(s, url, b) for b in bodies))
                return time.monotonic() - start, got

        elapsed, got = asyncio.run(run())
        # Five 1-second requests on one worker's event loop: together, not 5 s in a row.
        assert elapsed < 3.0, elapsed
        for i, (status, chunks) in enumerate(got):
            assert status == 200
            body = b"".join(c for _, c in chunks)
            if i % 2 == 0:
                lines = body.decode().splitlines()
                assert [json.loads(x)["token"] for x in lines] == [f"r{i}-{k}" for k in range(4)]
                # Incremental: the first token arrives long before the last one.
                assert chunks[0][0] < chunks[-1][0] - 0.5, chunks
            else:
                assert json.loads(body) == {"generated_text": " ".join(f"r{i}-{k}"
                                                                       for k in range(4))}


def test_rolling_batch_handler_served(tmp_path):
    with LmcServer(["--model-dir", str(served(tmp_path, "rolling_tokens"))]) as srv:
        url = f"{srv.url}/invocations"

        async def run():
            async with aiohttp.ClientSession() as s:
                bodies = [{"inputs": f"q{i}", "parameters": {"max_length": 3 + i}}
                          for i in range(5)]
                return await asyncio.gather(*(timed_request(s, url, b) for b in bodies))

        for i, (status, chunks) in enumerate(asyncio.run(run())):
            assert status == 200
            text = b"".join(c for _, c in chunks).decode()
            assert text == "".join(f" q{i}:{k}" for k in range(1, 4 + i))
        r = srv.post("/invocations", {"inputs": "stats"})
        assert r.status == 200 and max(r.json()["calls"]) == 3


# ---- @init_handler / @prediction_handler -----------------------------------------------------

DECORATED = '''
from djl_python.input_parser import init_handler, prediction_handler, input_formatter
from djl_python.output_formatter import output_formatter

class Scale:
    def __init__(self, factor):
        self.factor = factor
    def predict(self, X):
        return [x * self.factor for x in X]

@init_handler
def load(model_dir, **kwargs):
    return Scale(float(open(model_dir + "/factor.txt").read()))

@prediction_handler
def predict(X, model, **kwargs):
    return [x + 1 for x in model.predict(X)]
'''


def test_decorated_handlers(tmp_path):
    (tmp_path / "factor.txt").write_text("3")
    (tmp_path / "model.py").write_text(DECORATED)
    svc = ModelService.load(str(tmp_path), {"model_dir": str(tmp_path)})
    assert "@init_handler/@prediction_handler" in svc.source
    [r] = svc.invoke([item({"inputs": [1, 2]})])
    assert (r.code, json.loads(r.body)) == (200, {"predictions": [4.0, 7.0]})
    assert r.headers["Content-Type"] == "application/json"
    # With formatters: the input formatter gets the Input, the output formatter the predictions.
    (tmp_path / "model.py").write_text(DECORATED + '''
@input_formatter
def parse(inputs, content_type=None, **kwargs):
    return [float(x) for x in inputs.get_as_string().split(",")]

@output_formatter
def show(predictions):
    return ";".join(f"{p:g}" for p in predictions)
''')
    svc = ModelService.load(str(tmp_path), {"model_dir": str(tmp_path)})
    [r] = svc.invoke([RequestItem(0, {"Content-Type": "text/csv"}, [("data", b"1,2,5")])])
    assert (r.code, r.body) == (200, b"4;7;16")


def test_option_handler_names_the_entry_function(tmp_path):
    (tmp_path / "model.py").write_text(
        "from djl_python import Output\n"
        "def predict(inputs):\n"
        "    return None if inputs.is_empty() else Output().add('via predict')\n")
    svc = ModelService.load(str(tmp_path), {"model_dir": str(tmp_path), "handler": "predict"})
    [r] = svc.invoke([item({})])
    assert r.body == b"via predict"
    with pytest.raises(HandlerLoadError, match="option.handler=infer names no function"):
        ModelService.load(str(tmp_path), {"model_dir": str(tmp_path), "handler": "infer"})


def test_tensor_bodies_are_labelled():
    import numpy as np

    out = Output().add_as_numpy([np.zeros(2, dtype="float32")])
    assert out.properties == {"Content-Type": "tensor/ndlist"}
    out = Output().add_property("content-type", "application/x-mine")
    out.add_as_npz([np.zeros(2)], batch_index=0)
    assert out.properties == {"content-type": "application/x-mine",
                              "batch_000_Content-Type": "tensor/npz"}


def test_accumulator_keeps_state_across_calls(tmp_path):
    import urllib.request

    import numpy as np

    from handlers.ndlist import decode_ndlist, encode_ndlist

    def post(url: str, array) -> tuple[str, np.ndarray]:
        request = urllib.request.Request(url, data=encode_ndlist([array]),
                                         headers={"Content-Type": "tensor/ndlist"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.headers["Content-Type"], decode_ndlist(r.read())[0]

    with LmcServer(["--model-dir", str(served(tmp_path, "accumulate"))]) as srv:
        step = np.array([1.5, -2.0], dtype=np.float32)
        for k in range(1, 4):
            content_type, total = post(f"{srv.url}/invocations", step)
            assert content_type == "tensor/ndlist"
            np.testing.assert_array_equal(total, step * k)
        # Concurrent calls on the one (sync) worker run one at a time: no update is lost.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: post(f"{srv.url}/invocations", step), range(6)))
        np.testing.assert_array_equal(post(f"{srv.url}/invocations", step)[1], step * 10)


def test_async_handler_runs_in_the_request_context(tmp_path):
    """An async handler's coroutine (and its stream) runs in the request thread's context, so
    the request id the worker binds there is on the handler's log lines too."""
    from engines import logs

    (tmp_path / "model.py").write_text(
        "from djl_python import Output\n"
        "from engines.logs import current_request_id\n"
        "async def ids():\n"
        "    yield Output().add(Output.binary_encode({'data': current_request_id(), "
        "'last': False}))\n"
        "    yield Output().add(Output.binary_encode({'data': '|' + current_request_id(), "
        "'last': True}))\n"
        "async def handle(inputs):\n"
        "    if inputs.is_empty():\n"
        "        return None\n"
        "    if inputs.get_as_json().get('stream'):\n"
        "        return ids()\n"
        "    return Output().add(current_request_id())\n")
    svc = ModelService.load(str(tmp_path), {"model_dir": str(tmp_path)})
    try:
        def one(i):
            token = logs.bind(f"req-{i}")
            try:
                [r] = svc.invoke([item({"stream": i % 2 == 1}, i)])
                return r.body + b"".join(r.stream or ())
            finally:
                logs.unbind(token)

        results = in_threads(one, 4)
        assert results == {0: b"req-0", 1: b"req-1|req-1", 2: b"req-2", 3: b"req-3|req-3"}
    finally:
        svc.shutdown()
