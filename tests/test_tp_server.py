"""Tensor-parallel worker groups for real: `mpirun -np 2` ranks behind one worker, rank 0 on
the front end's socket, every rank receiving the init call and each request."""

import asyncio
import os
import shutil
import signal
import time

import aiohttp
import pytest

from server_utils import LmcServer, model_dir

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="mpirun (Debian openmpi-bin) is not installed")


def test_group_of_two_ranks_serves_and_recovers_from_a_dead_rank(tmp_path):
    d = model_dir(tmp_path, "tp_echo", "option.tensor_parallel_degree=2\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=120) as s:
        [desc] = s.request("GET", "/models/tp_echo").json()
        assert desc["tensorParallelDegree"] == 2
        [worker] = desc["workers"]
        assert worker["tp"] == 2 and [r["rank"] for r in worker["ranks"]] == [0, 1]
        pids = [r["pid"] for r in worker["ranks"]]

        r = s.post("/invocations", {"n": 7})
        assert r.status == 200, r.body
        body = r.json()
        assert body["world"] == 2 and body["init_tp"] == "2"
        assert [x["rank"] for x in body["seen"]] == [0, 1]  # both ranks ran this request
        assert [x["pid"] for x in body["seen"]] == pids and all(x["n"] == 7 for x in body["seen"])

        async def kill_rank_1_mid_request():
            async with aiohttp.ClientSession() as sess:
                req = asyncio.ensure_future(sess.post(s.url + "/invocations",
                                                      json={"sleep": 20, "n": 1}))
                await asyncio.sleep(1.0)
                os.kill(pids[1], signal.SIGKILL)
                t = time.monotonic()
                resp = await req
                return resp.status, await resp.json(), time.monotonic() - t

        status, err, dt = asyncio.run(kill_rank_1_mid_request())
        assert status == 500 and err["type"] == "WorkerDied" and dt < 10

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the group is relaunched
            r = s.post("/invocations", {"n": 2})
            if r.status == 200:
                break
            time.sleep(0.5)
        assert r.status == 200 and [x["rank"] for x in r.json()["seen"]] == [0, 1]
        [desc] = s.request("GET", "/models/tp_echo").json()
        assert {r["pid"] for r in desc["workers"][0]["ranks"]}.isdisjoint(pids)


def test_tp_without_enough_cpu_slots_fails_startup_clearly(tmp_path):
    d = model_dir(tmp_path, "tp_echo", "option.tensor_parallel_degree=2\n")
    with LmcServer(["--model-dir", str(d)], env={"LMC_CPU_DEVICES": "1"},
                   wait_status=None) as s:
        rc = s.proc.wait(60)
        out = s.output()
    assert rc != 0 and "LMC_CPU_DEVICES=1" in out


def _generate(s: LmcServer, prompts: list[str]) -> list[dict]:
    out = []
    for p in prompts:
        r = s.post("/invocations", {"inputs": p, "parameters": {"max_new_tokens": 12,
                                                                "details": True}})
        assert r.status == 200, r.body
        out.append(r.json())
    return out


@pytest.mark.parametrize("engine_props", [
    "option.rolling_batch=native\n",
    "engine=DeepSpeed\n",
], ids=["native", "deepspeed"])
def test_tp2_over_http_matches_tp1(tmp_path, engine_props):
    """The same greedy tokens from a TP=2 group as from one process, through the real server."""
    if "DeepSpeed" in engine_props:
        pytest.importorskip("deepspeed")
    from tiny_models import make_tiny_model

    base = make_tiny_model(tmp_path / "tiny", num_heads=8, num_kv_heads=4)
    prompts = ["Hello there", "Once upon a time", "The quick brown fox"]
    with LmcServer(["--model-dir", str(base)], timeout_s=120) as s:
        want = _generate(s, prompts)
    (base / "serving.properties").write_text(engine_props + "option.tensor_parallel_degree=2\n")
    with LmcServer(["--model-dir", str(base)], timeout_s=180) as s:
        [desc] = s.request("GET", f"/models/{base.name}").json()
        assert desc["workers"][0]["tp"] == 2
        got = _generate(s, prompts)
    for w, g in zip(want, got):
        assert [t["id"] for t in g["details"]["tokens"]] == [t["id"] for t in w["details"]["tokens"]]
        assert g["generated_text"] == w["generated_text"]


def test_native_group_rank_death_fails_stream_and_group_relaunches(tmp_path):
    """Follow mode (rank 0 drives rank 1 step by step): killing rank 1 mid-stream ends that
    stream with an error in seconds, and the relaunched group serves the next request."""
    from tiny_models import make_tiny_model

    d = make_tiny_model(tmp_path / "tiny", num_heads=8, num_kv_heads=4,
                        max_position_embeddings=4096)
    (d / "serving.properties").write_text("option.rolling_batch=native\n"
                                          "option.tensor_parallel_degree=2\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=180) as s:
        [desc] = s.request("GET", f"/models/{d.name}").json()
        pids = [r["pid"] for r in desc["workers"][0]["ranks"]]

        async def stream_and_kill():
            body = {"inputs": "Hello", "stream": True,
                    "parameters": {"max_new_tokens": 3000, "ignore_eos_token": True}}
            async with aiohttp.ClientSession() as sess:
                async with sess.post(s.url + "/invocations", json=body) as r:
                    lines = []
                    t = None
                    async for line in r.content:
                        lines.append(line)
                        if len(lines) == 5:
                            os.kill(pids[1], signal.SIGKILL)
                            t = time.monotonic()
                    return lines, time.monotonic() - t

        import json as _json

        lines, dt = asyncio.run(stream_and_kill())
        last = _json.loads(lines[-1])
        assert last["details"]["finish_reason"] == "error" and dt < 15
        assert len(lines) < 3000

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = s.post("/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
            if r.status == 200:
                break
            time.sleep(0.5)
        assert r.status == 200 and r.json()["generated_text"] is not None
        [desc] = s.request("GET", f"/models/{d.name}").json()
        assert {r["pid"] for r in desc["workers"][0]["ranks"]}.isdisjoint(pids)
