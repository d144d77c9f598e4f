"""Front-end benchmark: requests/s and latency of the HTTP -> queue -> worker -> HTTP path.

Serves an echo model.py (no model compute) so that what is measured is LMC itself: the aiohttp
front end, the job queue and batcher, the frame protocol and the worker process. As a baseline
measured in the same run, a bare aiohttp server (same event loop, same machine) answers the same
request in-process; the ratio says what LMC's queue + worker hop costs on top of plain HTTP.

Load comes from wrk (Debian package `wrk`; `apt-get install wrk`), one thread, keep-alive
connections. Without wrk, a Python aiohttp load generator is used, which needs far more CPU than
wrk and so understates throughput on a 2-core machine; the report says which one ran.

    .venv/bin/python benchmarks/frontend.py [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"inputs": "hello world", "parameters": {"max_new_tokens": 8}}'

ECHO_MODEL = textwrap.dedent('''
    from djl_python import Output

    def handle(inputs):
        if inputs.is_empty():
            return None
        out = Output()
        for i, item in enumerate(inputs.get_batches()):
            out.add(item.get_as_bytes(), batch_index=i)
        return out
''')

BASELINE_SERVER = textwrap.dedent('''
    import sys
    from aiohttp import web
    async def echo(request):
        return web.Response(body=await request.read(), content_type="application/json")
    app = web.Application()
    app.router.add_post("/invocations", echo)
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                **({"loop": loop_factory()} if loop_factory else {}))
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, data=BODY, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} never answered 200")


# -- load generators -----------------------------------------------------------------------------

def run_wrk(url: str, concurrency: int, duration_s: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\n'
                f"wrk.body = '{BODY.decode()}'\n"
                'wrk.headers["Content-Type"] = "application/json"\n')
        script = f.name
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--latency",
                              "-s", script, url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script)

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "errors": int(errors.group(1)) if errors else 0}


def run_python_load(url: str, concurrency: int, duration_s: float) -> dict:
    import aiohttp

    async def main():
        lat: list[float] = []
        errors = 0
        stop = time.monotonic() + duration_s

        async def loop(session):
            nonlocal errors
            while time.monotonic() < stop:
                t = time.perf_counter()
                async with session.post(url, data=BODY,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - t)

        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            t0 = time.monotonic()
            await asyncio.gather(*(loop(s) for _ in range(concurrency)))
            elapsed = time.monotonic() - t0
        lat.sort()
        return {"rps": len(lat) / elapsed, "p50_ms": lat[len(lat) // 2] * 1000,
                "p99_ms": lat[int(len(lat) * 0.99)] * 1000, "errors": errors}

    return asyncio.run(main())


# -- servers -------------------------------------------------------------------------------------

class Server:
    def __init__(self, cmd: list[str], url: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = url

    def __enter__(self):
        wait_ready(self.url)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def lmc_server(model_dir: Path, properties: str, env: dict | None = None) -> Server:
    """`lmc serve` of model_dir with these serving.properties; env is added to the server's
    environment (benchmarks/observability.py sets LMC_METRICS and OTEL_* with it)."""
    (model_dir / "serving.properties").write_text(properties)
    port = free_port()
    return Server([sys.executable, "-m", "container", "serve", "--host", "127.0.0.1",
                   "--port", str(port), "--model-dir", str(model_dir)],
                  f"http://127.0.0.1:{port}/invocations",
                  env={"LMC_LOG_LEVEL": "WARNING", **(env or {})})


def baseline_server(tmp: Path) -> Server:
    script = tmp / "baseline.py"
    script.write_text(BASELINE_SERVER)
    port = free_port()
    return Server([sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}/invocations")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    load = run_wrk if shutil.which("wrk") else run_python_load
    gen = "wrk (1 thread)" if load is run_wrk else "python aiohttp client (no wrk found)"
    print(f"load generator: {gen}; {os.cpu_count()} CPUs; {args.duration:g}s per point\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = tmp / "echo"
        model.mkdir()
        (model / "model.py").write_text(ECHO_MODEL)
        configs = [
            ("baseline: bare aiohttp echo, in-process", None),
            ("LMC batch_size=8 max_batch_delay=5ms 2 workers",
             "batch_size=8\nmax_batch_delay=5\nminWorkers=2\nmaxWorkers=2\n"),
            ("LMC batch_size=1 2 workers", "batch_size=1\nminWorkers=2\nmaxWorkers=2\n"),
        ]
        for name, props in configs:
            srv = baseline_server(tmp) if props is None else lmc_server(model, props)
            with srv:
                load(srv.url, 8, 1.0)  # warm up connections and workers
                for c in (1, 64):
                    r = load(srv.url, c, args.duration)
                    rows.append({"config": name, "concurrency": c, **r})
                    print(f"{name:50s} c={c:<3d} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
                          f"  p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}", flush=True)

    base = {r["concurrency"]: r for r in rows if r["config"].startswith("baseline")}
    print("\nLMC relative to the bare aiohttp baseline (same run):")
    for r in rows:
        if r["config"].startswith("LMC"):
            b = base[r["concurrency"]]
            print(f"  {r['config']:50s} c={r['concurrency']:<3d} throughput x{r['rps'] / b['rps']:.2f}"
                  f"  p50 x{r['p50_ms'] / b['p50_ms']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
