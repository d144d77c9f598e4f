"""vLLM in LMC against vLLM alone and against LMC's native engine, in one run.

The offline workload of the README (SmolLM2-135M fp32, --num-prompts prompts of --input-len
random token ids, --output-len tokens out, greedy, EOS ignored), timed five ways in turn:

    vllm offline     vLLM's own LLM.generate                        (.venv-vllm)
    vllm engine      LMC's vllm engine's generate, no server        (.venv-vllm)
    native engine    LMC's native engine's generate, no server      (this venv)
    vllm served      LMC server, option.rolling_batch=vllm: every prompt one concurrent
                     streamed /invocations request (real HTTP, aiohttp)
    native served    the same with option.rolling_batch=native

Prompts travel to the server as text; they are random ids decoded and re-encoded once here, so
every row runs the same token ids. Output tok/s = generated tokens / wall time, prefill
included. The serving overhead LMC adds to vLLM is 1 - served / offline.

    .venv/bin/python benchmarks/vllm_compare.py [--num-prompts 32 --input-len 128 --output-len 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engines.backends.requirements import vllm_python  # noqa: E402


def prompts_of(model_dir: Path, n: int, length: int) -> tuple[list[str], list[list[int]]]:
    """Random-id prompts as texts that encode back to exactly the ids used everywhere."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    texts, ids = [], []
    for _ in range(n):
        text = tok.decode([rng.randrange(100, vocab) for _ in range(length)])
        texts.append(text)
        ids.append(tok(text)["input_ids"])
    return texts, ids


def vllm_side(mode: str, model_dir: Path, ids_file: Path, output_len: int,
              repeats: int) -> list[float]:
    python = vllm_python()
    assert python, "no interpreter with vllm: run `make install-vllm`"
    # Output to a file, not a pipe: vLLM's engine-core child may outlive the script briefly
    # and would hold a pipe open.
    log = ids_file.with_name(f"{mode}.log")
    with log.open("w") as f:
        subprocess.run([python, str(ROOT / "benchmarks" / "vllm_offline.py"), "--mode", mode,
                        "--model-dir", str(model_dir), "--prompts", str(ids_file),
                        "--output-len", str(output_len), "--repeats", str(repeats)],
                       stdout=f, stderr=subprocess.STDOUT,
                       timeout=900)
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.startswith('{"mode"')]
    assert lines, text[-4000:]
    return json.loads(lines[-1])["out_tok_s"]


def native_side(model_dir: Path, ids: list[list[int]], output_len: int,
                repeats: int) -> list[float]:
    # offline.py first: it sets the worker's OpenMP spin setting before torch loads.
    code = ("import json,sys; sys.path.insert(0, 'benchmarks'); from offline import "
            "run_native; import torch; ids=json.load(open(sys.argv[1])); print('OUT', run_native("
            f"sys.argv[2], ids, {output_len}, 'fp32', torch.device('cpu'), len(ids))[0])")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    runs = []
    for _ in range(repeats):  # offline.py's run_native times one call per engine
        out = subprocess.run([sys.executable, "-c", code, f.name, str(model_dir)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
        line = [x for x in out.stdout.splitlines() if x.startswith("OUT ")]
        assert line, out.stderr[-4000:]
        runs.append(float(line[-1].split()[1]))
    return runs


def served(engine: str, model_dir: Path, texts: list[str], output_len: int,
           repeats: int) -> list[float]:
    from server_utils import LmcServer

    env = {"OPTION_ROLLING_BATCH": engine, "OPTION_DTYPE": "fp32",
           "OPTION_MAX_ROLLING_BATCH_SIZE": str(len(texts)), "OPTION_CPU_KV_CACHE_GB": "4",
           "OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS": "8192"}
    if engine == "vllm":
        env["OPTION_MAX_MODEL_LEN"] = "512"
    params = {"max_new_tokens": output_len, "min_new_tokens": output_len,
              "ignore_eos_token": True}

    async def one(session, text: str) -> int:
        async with session.post("/invocations", json={"inputs": text, "stream": True,
                                                      "parameters": params}) as r:
            assert r.status == 200, await r.text()
            lines = 0
            async for line in r.content:
                lines += bool(line.strip())
            return lines

    async def run(url: str) -> list[float]:
        runs = []
        async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(600)) as s:
            await asyncio.gather(*(one(s, t[:40]) for t in texts[:2]))  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                counts = await asyncio.gather(*(one(s, t) for t in texts))
                runs.append(len(texts) * output_len / (time.perf_counter() - t0))
                assert all(c == output_len for c in counts), counts
        return runs

    with LmcServer(["--model-dir", str(model_dir)], env=env, timeout_s=600) as server:
        return asyncio.run(run(server.url))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="default: the converted SmolLM2")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (best counts)")
    ap.add_argument("--rows", nargs="+", metavar="ROW",
                    help="only these rows, e.g. --rows 'vllm offline' 'vllm served'")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from engines.default_model import prepare_default_model

        model_dir = prepare_default_model(progress=False)
    texts, ids = prompts_of(model_dir, args.num_prompts, args.input_len)
    ids_file = Path(tempfile.mkdtemp()) / "ids.json"
    ids_file.write_text(json.dumps(ids))
    lens = sorted(map(len, ids))
    print(f"{model_dir.name}: {len(ids)} prompts of {lens[0]}-{lens[-1]} tokens in, "
          f"{args.output_len} out, greedy, fp32, CPU", flush=True)
    n, rep = args.output_len, args.repeats
    steps = {"vllm offline": lambda: vllm_side("offline", model_dir, ids_file, n, rep),
             "vllm served": lambda: served("vllm", model_dir, texts, n, rep),
             "vllm engine": lambda: vllm_side("lmc", model_dir, ids_file, n, rep),
             "native engine": lambda: native_side(model_dir, ids, n, rep),
             "native served": lambda: served("native", model_dir, texts, n, rep)}
    runs: dict[str, list[float]] = {}
    for name, fn in steps.items():
        if args.rows and name not in args.rows:
            continue
        runs[name] = fn()
        print(f"{name:14s}: best {max(runs[name]):7.1f} out tok/s  (runs: "
              f"{', '.join(f'{x:.1f}' for x in runs[name])})", flush=True)
    # Best of the repeats: on a shared machine the least-disturbed run is the engine's speed.
    r = {k: max(v) for k, v in runs.items()}
    for a, b in [("vllm served", "vllm offline"), ("vllm engine", "vllm offline"),
                 ("vllm engine", "native engine"), ("vllm served", "native served")]:
        if a in r and b in r:
            print(f"{a} / {b}: {r[a] / r[b]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
