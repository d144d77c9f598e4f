"""Serving benchmark: N concurrent streaming clients against a running LMC server.

Closed loop: each of --concurrency clients sends a streamed LMI request
(`{"inputs": ..., "parameters": {...}, "stream": true}` on /invocations), reads the JSON lines
as they arrive, and sends the next request when the last line came. Reports output throughput,
TTFT (time to the first token line) and TPOT (time per output token after the first), mean /
p50 / p99.

    .venv/bin/python benchmarks/serving.py --start                 # starts the default model
    .venv/bin/python benchmarks/serving.py --url http://127.0.0.1:8080 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a model token cache batch stream request server engine paged block attention "
         "river mountain city light sound music story garden ocean window").split()


def prompt_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one_request(session, url, prompt, max_new_tokens) -> dict:
    body = {"inputs": prompt, "stream": True,
            "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.strip():
                continue
            now = time.perf_counter()
            msg = json.loads(line)
            if msg.get("token"):
                tokens += 1
                first = first or now
                last = now
    return {"ttft": (first or time.perf_counter()) - t0, "tokens": tokens,
            "tpot": (last - first) / (tokens - 1) if tokens > 1 else 0.0,
            "latency": time.perf_counter() - t0}


async def run_level(url: str, concurrency: int, requests: int, input_words: int,
                    max_new_tokens: int, seed: int | None = None) -> dict:
    """`requests` streamed requests from `concurrency` closed-loop clients. The prompts come from
    random.Random(seed), by default seeded with the concurrency; a new seed gives new prompts
    (no prefix-cache hits from an earlier run)."""
    rng = random.Random(concurrency if seed is None else seed)
    prompts = [prompt_text(rng, input_words) for _ in range(requests)]
    results: list[dict] = []
    queue = list(prompts)

    async def client(session):
        while queue:
            results.append(await one_request(session, url, queue.pop(), max_new_tokens))

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        t = time.perf_counter()
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
        wall = time.perf_counter() - t

    def stats(key):
        xs = sorted(r[key] * 1000 for r in results)
        return {"mean": statistics.fmean(xs), "p50": xs[len(xs) // 2],
                "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))]}

    return {"concurrency": concurrency, "requests": len(results),
            "out_tok_s": sum(r["tokens"] for r in results) / wall,
            "req_s": len(results) / wall, "wall_s": wall,
            "ttft_ms": stats("ttft"), "tpot_ms": stats("tpot"), "latency_ms": stats("latency")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str | None, max_batch: int,
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`lmc serve` (SmolLM2 unless model_dir), up once /ping answers 200; env is added to the
    server's environment."""
    port = free_port()
    cmd = [sys.executable, "-m", "container", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model_dir:
        cmd += ["--model-dir", model_dir]
    env = {**os.environ, "LMC_LOG_LEVEL": "WARNING",
           "OPTION_MAX_ROLLING_BATCH_SIZE": str(max_batch), **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not become healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (default: start one with --start)")
    ap.add_argument("--start", action="store_true", help="start `lmc serve` for the run")
    ap.add_argument("--model-dir", help="with --start: the model (default: SmolLM2)")
    ap.add_argument("--random-config", help="with --start: serve a random-weight model of this "
                                            "shape (see benchmarks/offline.py RANDOM_CONFIGS)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--input-words", type=int, default=100, help="about 1 token per word")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--quantize", help="with --start: option.quantize for the served engine "
                                       "(OPTION_QUANTIZE; e.g. int8, int4, bf16)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        if not args.start:
            ap.error("give --url or --start")
        model_dir = args.model_dir
        if args.random_config:
            import tempfile

            import torch

            sys.path.insert(0, str(ROOT / "benchmarks"))
            from offline import build_random_model

            tmp = tempfile.mkdtemp(prefix="lmc-bench-")
            model_dir = str(build_random_model(args.random_config, torch.float32, Path(tmp)))
        proc, url = start_server(model_dir, max(args.concurrency),
                                 {"OPTION_QUANTIZE": args.quantize} if args.quantize else None)
    try:
        rows = []
        for c in args.concurrency:
            r = asyncio.run(run_level(url + "/invocations", c, c * args.requests_per_client,
                                      args.input_words, args.max_new_tokens))
            rows.append(r)
            print(f"c={c:<3d} {r['out_tok_s']:8.1f} out tok/s  "
                  f"TTFT mean {r['ttft_ms']['mean']:7.0f} p50 {r['ttft_ms']['p50']:7.0f} "
                  f"p99 {r['ttft_ms']['p99']:7.0f} ms  "
                  f"TPOT mean {r['tpot_ms']['mean']:6.1f} p50 {r['tpot_ms']['p50']:6.1f} "
                  f"p99 {r['tpot_ms']['p99']:6.1f} ms", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
