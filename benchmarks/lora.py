"""Multi-LoRA serving benchmark: served throughput with 0, 1, 4 and 16 adapters against base.

In one run, each configuration on a freshly started `lmc serve` with SmolLM2-135M-Instruct,
one after the other, under the load of benchmarks/serving.py (its run_level: --concurrency
closed-loop clients sending streamed LMI requests on /invocations, about 100 words in,
--max-new-tokens out, EOS ignored):

    base     LoRA disabled (no option.enable_lora), no adapter in the requests
    lora-0   option.enable_lora=true, 16 adapters registered, requests use none
    lora-N   (N = 1, 4, 16) requests spread round-robin over N distinct adapters

The adapters (rank 16, lora_alpha 32, all seven linear modules, random non-zero A and B with
std 0.02) are built with peft once into --work-dir/model-lora/adapters/a00..a15 and reused by
later runs. The LoRA model dir holds symlinks to the prepared SmolLM2 files, a
serving.properties and that adapters/ folder: LMC registers every adapters/<name>/ of a model
dir at load (LMI's convention). A request selects one with the top-level `"adapters": "a03"`.

    .venv/bin/python benchmarks/lora.py                            # all five configurations
    .venv/bin/python benchmarks/lora.py --configs base lora-16 --json /tmp/lora.json
    .venv/bin/python benchmarks/lora.py --rounds 3 --requests-per-client 1

With --rounds N the configurations run N times in turn (base, lora-0, ..., base, lora-0, ...);
each ratio is against the base run of the same round, and the table gives the medians, so a
slow spell of the machine moves a whole round rather than one configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serving  # noqa: E402
from serving import free_port, run_level  # noqa: E402

ADAPTERS = tuple(f"a{i:02d}" for i in range(16))
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What the adapters are built from; a cached adapter built from another recipe is rebuilt.
RECIPE = {"r": 16, "lora_alpha": 32, "target_modules": list(LINEAR_MODULES), "init_std": 0.02,
          "seed_base": 1000}
RECIPE_FILE = ".lmc-bench-recipe.json"
LORA_PROPERTIES = {"option.enable_lora": "true", "option.max_loras": "16",
                   "option.max_lora_rank": "16", "option.max_cpu_loras": "16"}
# name -> (LoRA enabled on the server, distinct adapters the requests use)
CONFIGS = {"base": (False, 0), "lora-0": (True, 0), "lora-1": (True, 1), "lora-4": (True, 4),
           "lora-16": (True, 16)}
# (config, of config, at least this ratio of base's out tok/s)
TARGETS = (("lora-16", 0.80), ("lora-0", 0.97))


# ---- adapters and model dirs ------------------------------------------------------------------


def _adapter_complete(path: Path, recipe: dict) -> bool:
    try:
        return ((path / "adapter_config.json").is_file()
                and (path / "adapter_model.safetensors").is_file()
                and json.loads((path / RECIPE_FILE).read_text()) == recipe)
    except (OSError, ValueError):
        return False


def build_adapters(base_dir: Path, adapters_dir: Path, names=ADAPTERS) -> list[Path]:
    """PEFT LoRA adapters for `base_dir` (tests/tiny_models.py make_tiny_lora's recipe with
    RECIPE's shape), one sub-folder of `adapters_dir` per name; those already built from the
    same recipe and base are kept. B is random too: PEFT's zero B would make each a no-op."""
    recipe = {**RECIPE, "base": str(Path(base_dir).resolve())}
    todo = [n for n in names if not _adapter_complete(adapters_dir / n, recipe)]
    if todo:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        print(f"building {len(todo)} LoRA adapter(s) in {adapters_dir}", flush=True)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        config = LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["lora_alpha"],
                            target_modules=list(LINEAR_MODULES), lora_dropout=0.0,
                            task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        adapters_dir.mkdir(parents=True, exist_ok=True)
        for name in todo:
            # One PEFT model, re-randomised per adapter: same config, different weights.
            generator = torch.Generator().manual_seed(RECIPE["seed_base"] + ADAPTERS.index(name))
            with torch.no_grad():
                for p in lora:
                    p.copy_(torch.randn(p.shape, generator=generator) * RECIPE["init_std"])
            tmp = adapters_dir / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), safe_serialization=True)
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe))
            shutil.rmtree(adapters_dir / name, ignore_errors=True)
            tmp.rename(adapters_dir / name)
    return [adapters_dir / n for n in names]


def link_model_dir(base_dir: Path, out: Path, properties: dict[str, str]) -> Path:
    """`out` with a symlink to every entry of `base_dir` and this serving.properties; an
    adapters/ folder already in `out` is left as it is."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.is_symlink() or p.name == "serving.properties":
            p.unlink()
    for f in Path(base_dir).iterdir():
        if f.name not in ("serving.properties", "adapters"):
            (out / f.name).symlink_to(f.resolve())
    (out / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    return out


# ---- the server -------------------------------------------------------------------------------

# Left out of the server's environment: serving.properties alone decides these.
_LORA_ENV = ("OPTION_ENABLE_LORA", "OPTION_MAX_LORAS", "OPTION_MAX_LORA_RANK",
             "OPTION_MAX_CPU_LORAS", "OPTION_MAX_ROLLING_BATCH_SIZE")


def start_server(model_dir: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """serving.py's start_server (`--model-dir`, `--port`), with the server in its own process
    group, so that it and its workers can all be stopped, and a server that exits or reports
    its model FAILED (/ping 500) noticed at once instead of waiting out the timeout."""
    port = free_port()
    cmd = [sys.executable, "-m", "container", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model-dir", str(model_dir)]
    env = {k: v for k, v in os.environ.items() if k not in _LORA_ENV}
    env.update(LMC_LOG_LEVEL="WARNING", SAGEMAKER_BIND_TO_PORT=str(port))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} before "
                                   f"/ping answered 200 (its log is above)")
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except urllib.error.HTTPError as e:
                if e.code == 500:  # a model FAILED to load; the server stays up saying so
                    raise RuntimeError(f"/ping 500: {_ping_error(e)}") from None
                time.sleep(0.5)  # 503: still loading
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the server did not answer /ping 200 within {timeout_s:.0f} s")
    except BaseException:
        stop_server(proc)
        raise


def _ping_error(e: urllib.error.HTTPError) -> str:
    text = e.read().decode(errors="replace")
    try:
        return "; ".join(f"{name}: {m.get('error', m.get('status'))}"
                         for name, m in json.loads(text).items())
    except (ValueError, AttributeError):
        return text


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (it drains and stops its workers), then SIGKILL to whatever of
    its process group is left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---- requests ---------------------------------------------------------------------------------


class _WithAdapter:
    """An aiohttp session whose post() adds the LMI field `"adapters": name` to the JSON body."""

    def __init__(self, session, name: str):
        self._session, self._name = session, name

    def post(self, url, *, json, **kw):
        return self._session.post(url, json={**json, "adapters": self._name}, **kw)


@contextlib.contextmanager
def round_robin_adapters(names):
    """serving.run_level sends each request with serving.one_request; for the duration, each
    request names the next adapter of `names` in turn (as the requests start). Yields a Counter
    of the requests sent per adapter."""
    sent: collections.Counter = collections.Counter()
    if not names:
        yield sent
        return
    original, cycle = serving.one_request, itertools.cycle(names)

    async def one_request(session, url, prompt, max_new_tokens):
        name = next(cycle)
        sent[name] += 1
        return await original(_WithAdapter(session, name), url, prompt, max_new_tokens)

    serving.one_request = one_request
    try:
        yield sent
    finally:
        serving.one_request = original


def generate(url: str, prompt: str, max_new_tokens: int, adapter: str | None) -> str:
    """One non-streamed, greedy LMI request; the generated text."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}
    if adapter:
        body["adapters"] = adapter
    req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    return (out[0] if isinstance(out, list) else out)["generated_text"]


def run_config(name: str, model_dir: Path, args) -> dict:
    lora, n = CONFIGS[name]
    names = list(ADAPTERS[:n])
    proc, url = start_server(model_dir)
    try:
        # Warm-up, outside the measurement, and a check that an adapter changes the output.
        prompt = "Write one sentence about a river."
        warm = {"no_adapter": generate(url, prompt, 16, None)}
        if names:
            warm[names[0]] = generate(url, prompt, 16, names[0])
        with round_robin_adapters(names) as sent:
            r = asyncio.run(run_level(url + "/invocations", args.concurrency,
                                      args.concurrency * args.requests_per_client,
                                      args.input_words, args.max_new_tokens))
    finally:
        stop_server(proc)
    return {"config": name, "lora_enabled": lora, "adapters": n, **r,
            "requests_per_adapter": dict(sorted(sent.items())), "warmup_text": warm}


# ---- report -----------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x:,.0f} ms"


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def report(runs: list[dict]) -> tuple[str, list[dict]]:
    """One line per config: medians over rounds; ratios against the same round's base."""
    bases = {r["round"]: r for r in runs if r["config"] == "base" and "error" not in r}
    for r in runs:
        if "error" not in r and r.get("round") in bases:
            r["ratio_vs_base"] = r["out_tok_s"] / bases[r["round"]]["out_tok_s"]
    rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == name and "error" not in r]
        if not mine:
            rows.append(next(r for r in runs if r["config"] == name))
            continue
        row = {"config": name, "adapters": mine[0]["adapters"], "rounds": len(mine),
               "out_tok_s": _median([r["out_tok_s"] for r in mine]),
               "out_tok_s_all": [round(r["out_tok_s"], 1) for r in mine],
               "ttft_p50": _median([r["ttft_ms"]["p50"] for r in mine]),
               "tpot_p50": _median([r["tpot_ms"]["p50"] for r in mine])}
        ratios = [r["ratio_vs_base"] for r in mine if "ratio_vs_base" in r]
        if ratios:
            row["ratio_vs_base"] = _median(ratios)
            row["ratios"] = [round(x, 3) for x in ratios]
        rows.append(row)
    lines = ["| config | distinct adapters | out tok/s (median) | TTFT p50 | TPOT p50 | "
             "× base (median of rounds) | per round |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['adapters']} | failed: {r['error']} | | | | |")
            continue
        ratio = f"×{r['ratio_vs_base']:.2f}" if "ratio_vs_base" in r else "n/a"
        per = ", ".join(f"{x:.2f}" for x in r.get("ratios", []))
        lines.append(f"| {r['config']} | {r['adapters']} | {r['out_tok_s']:.1f} | "
                     f"{_ms(r['ttft_p50'])} | {_ms(r['tpot_p50'])} | {ratio} | {per} |")
    checks = []
    by_name = {r["config"]: r for r in rows}
    for name, need in TARGETS:
        r = by_name.get(name)
        if r is None or "ratio_vs_base" not in r:
            checks.append({"check": f"{name} >= {need:.2f} x base", "result": "not measured"})
            continue
        ok = r["ratio_vs_base"] >= need
        checks.append({"check": f"{name} >= {need:.2f} x base", "ratio": r["ratio_vs_base"],
                       "result": "PASS" if ok else "FAIL"})
    lines.append("")
    for c in checks:
        got = f": ×{c['ratio']:.3f}" if "ratio" in c else ""
        lines.append(f"target {c['check']}{got} {c['result']}")
    return "\n".join(lines), checks


def main() -> int:
    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from engines.options import load_server_options

    cache = Path(load_server_options().cache_dir).expanduser()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                    help="which configurations, in this order (default: all)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--input-words", type=int, default=100, help="about 1 token per word")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--work-dir", type=Path, default=None,
                    help=f"adapters and model dirs (default: {cache / 'bench' / 'lora'}, "
                         f"else /tmp/lmc-lora-bench)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every configuration this many times, in turn; report medians")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    configs = list(dict.fromkeys(args.configs))

    work = args.work_dir
    if work is None:
        work = cache / "bench" / "lora"
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError:
            work = Path("/tmp/lmc-lora-bench")
    work.mkdir(parents=True, exist_ok=True)

    from engines.default_model import prepare_default_model

    smol = prepare_default_model(str(cache), progress=False)
    batch = {"option.max_rolling_batch_size": str(args.concurrency)}
    model_dirs = {False: link_model_dir(smol, work / "model-base", batch)}
    if any(CONFIGS[c][0] for c in configs):
        lora_dir = link_model_dir(smol, work / "model-lora", {**LORA_PROPERTIES, **batch})
        build_adapters(smol, lora_dir / "adapters")
        model_dirs[True] = lora_dir

    print(f"model {smol}; work dir {work}; {args.concurrency} clients x "
          f"{args.requests_per_client} requests, {args.input_words} words in, "
          f"{args.max_new_tokens} tokens out; {os.cpu_count()} CPUs", flush=True)
    rows = []
    for round_, name in ((k, c) for k in range(args.rounds) for c in configs):
        print(f"--- round {round_ + 1}/{args.rounds} {name}: starting the server", flush=True)
        try:
            r = run_config(name, model_dirs[CONFIGS[name][0]], args)
        except Exception as e:  # noqa: BLE001 - reported in the table, the others still run
            print(f"--- {name} failed: {e}", flush=True)
            rows.append({"config": name, "adapters": CONFIGS[name][1], "round": round_,
                         "error": str(e).splitlines()[0][:200].replace("|", "/")})
            continue
        r["round"] = round_
        rows.append(r)
        print(f"--- {name}: {r['out_tok_s']:.1f} out tok/s, TTFT p50 {r['ttft_ms']['p50']:.0f} "
              f"ms, TPOT p50 {r['tpot_ms']['p50']:.1f} ms, requests per adapter "
              f"{r['requests_per_adapter'] or '-'}", flush=True)
        warm = r["warmup_text"]
        if len(warm) > 1 and len(set(warm.values())) == 1:
            print(f"--- {name}: WARNING: adapter {ADAPTERS[0]} did not change the greedy output "
                  f"(is it applied?)", flush=True)

    table, checks = report(rows)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": str(smol), "concurrency": args.concurrency,
             "requests_per_client": args.requests_per_client, "input_words": args.input_words,
             "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
             "rounds": args.rounds, "runs": rows, "checks": checks}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
