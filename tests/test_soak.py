"""benchmarks/soak.py's mixed, hostile load for 30 s against a tiny model (the 10-minute run
is in the README): no request gets a wrong answer, a 5xx or a hang; bad requests are 400s;
the server's and workers' open file descriptors and memory do not grow."""

import asyncio
import sys
from pathlib import Path

from server_utils import LmcServer
from tiny_models import make_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402


def test_soak_30s(tmp_path):
    d = make_tiny_llama(tmp_path / "tiny")
    (d / "serving.properties").write_text("option.max_rolling_batch_size=8\njob_queue_size=64\n")
    with LmcServer(["--model-dir", str(d)], timeout_s=120) as s:
        # Warm the routes first, so the start figures are the steady state.
        asyncio.run(soak.run(s.url, duration_s=3, concurrency=8, pid=s.proc.pid, seed=1))
        report = asyncio.run(soak.run(s.url, duration_s=30, concurrency=8, pid=s.proc.pid))
        assert report["errors"] == 0, report["outcomes"]
        outcomes = report["outcomes"]
        assert outcomes.get("ok", 0) > 20 and outcomes.get("400", 0) > 0
        assert outcomes.get("dropped", 0) > 0
        start, end = report["start"], report["end"]
        assert end["fds"] <= start["fds"] + 4, report
        assert end["rss_mib"] <= start["rss_mib"] * 1.25 + 50, report
        assert s.request("GET", "/ping").status == 200
