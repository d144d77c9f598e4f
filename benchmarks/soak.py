"""Soak test: a mixed, hostile load against one server for a fixed time, and what it leaves.

Closed loop, --concurrency clients, each picking its next request at random:
    45%  streamed LMI generation, read to the end
    25%  plain LMI generation
    10%  a bad request (unknown parameter): must be a 400
    10%  a stream the client drops after its first token
    10%  a request the client drops right after sending it
Every answer must be what that request deserves (200 with the full text, the 400, or a 503 with
Retry-After under overload); anything else (a 5xx, a hang past --timeout) counts as an error.
Reported: requests by outcome, errors, p50/p99 latency of the completed ones, and the RSS and
open file descriptors of the server and its workers at the start and at the end.

    .venv/bin/python benchmarks/soak.py --start --duration 600          # SmolLM2, 10 minutes
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8080 --duration 60

tests/test_soak.py runs `run()` for 30 s against a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
KINDS = (("stream", 45), ("plain", 25), ("bad", 10), ("drop_stream", 10), ("drop_sent", 10))


def _processes(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            pass
    return out


def resources(pid: int) -> dict:
    """RSS (MiB) and open fds of the server and its workers."""
    rss, fds = 0, 0
    for p in _processes(pid):
        try:
            rss += int(next(line.split()[1] for line in open(f"/proc/{p}/status")
                            if line.startswith("VmRSS:")))
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, StopIteration):
            pass
    return {"rss_mib": round(rss / 1024, 1), "fds": fds, "processes": len(_processes(pid))}


async def _one(session: aiohttp.ClientSession, url: str, kind: str, max_new_tokens: int,
               rng: random.Random) -> str:
    """The outcome of one request: "ok", "400", "503", "dropped", or "error: ..."."""
    prompt = " ".join(rng.choice(("river", "model", "city", "light", "story", "garden"))
                      for _ in range(rng.randint(5, 40)))
    params = {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}
    if kind == "bad":
        params["max_new_tokenz"] = 3
    body = {"inputs": prompt, "parameters": params,
            "stream": kind in ("stream", "drop_stream")}
    if kind == "drop_sent":
        task = asyncio.ensure_future(session.post(url, json=body))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return "dropped"
    async with session.post(url, json=body) as r:
        if r.status == 503:
            return "503" if r.headers.get("Retry-After") else "error: 503 without Retry-After"
        if kind == "bad":
            return "400" if r.status == 400 else f"error: bad request got {r.status}"
        if r.status != 200:
            return f"error: {r.status} {(await r.text())[:100]}"
        if kind == "drop_stream":
            await r.content.readline()
            r.close()
            return "dropped"
        if kind == "plain":
            out = await r.json()
            return "ok" if out.get("generated_text") is not None else "error: no text"
        last = None
        async for line in r.content:
            if line.strip():
                last = json.loads(line)
        if not last or last.get("finish_reason") == "error" or "generated_text" not in last:
            return f"error: stream ended with {str(last)[:100]}"
        return "ok"


async def run(url: str, *, duration_s: float, concurrency: int = 16, max_new_tokens: int = 32,
              timeout_s: float = 120.0, pid: int | None = None, seed: int = 0) -> dict:
    """Run the mix against `url` (the server's base URL) for `duration_s`; the report."""
    invocations = url.rstrip("/") + "/invocations"
    outcomes: collections.Counter = collections.Counter()
    latencies: list[float] = []
    start_res = resources(pid) if pid else None
    names, weights = zip(*KINDS)
    deadline = time.monotonic() + duration_s

    async def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                kind = rng.choices(names, weights)[0]
                t = time.monotonic()
                try:
                    outcome = await _one(session, invocations, kind, max_new_tokens, rng)
                except asyncio.TimeoutError:
                    outcome = f"error: {kind} hung past {timeout_s:g} s"
                except aiohttp.ClientError as e:
                    outcome = f"error: {kind}: {type(e).__name__}: {e}"
                outcomes[outcome] += 1
                if outcome in ("ok", "400"):
                    latencies.append(time.monotonic() - t)

    t0 = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    wall = time.monotonic() - t0
    await asyncio.sleep(1.0)  # let the server reap the connections the clients closed
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    errors = {k: v for k, v in outcomes.items() if k.startswith("error")}
    return {"duration_s": round(wall, 1), "requests": sum(outcomes.values()),
            "outcomes": dict(outcomes), "errors": sum(errors.values()),
            "latency_p50_s": round(pct(0.50), 3), "latency_p99_s": round(pct(0.99), 3),
            "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else 0.0,
            "start": start_res, "end": resources(pid) if pid else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server")
    ap.add_argument("--start", action="store_true", help="start `lmc serve` (SmolLM2) for it")
    ap.add_argument("--model-dir", help="with --start: the model (default: SmolLM2)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving import start_server

    proc = None
    if args.start:
        proc, url = start_server(args.model_dir, args.concurrency)
    elif args.url:
        url = args.url
    else:
        ap.error("give --url or --start")
    try:
        report = asyncio.run(run(url, duration_s=args.duration, concurrency=args.concurrency,
                                 max_new_tokens=args.max_new_tokens,
                                 pid=proc.pid if proc else None))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
