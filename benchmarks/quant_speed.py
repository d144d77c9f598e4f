"""option.quantize speed: native engines with different weights in one process, alternating.

On a shared, noisy machine separate runs of benchmarks/offline.py swing by 2-5x; here every
method's engine is built once, then the rounds alternate (fp32, method, fp32, method, ...) on
the offline workload (random prompts, greedy, EOS ignored, out tok/s over wall time with
prefill). Reports each method's best and median round and the median of its ratio to the
fp32 round just before it.

    .venv/bin/python benchmarks/quant_speed.py --num-prompts 32 --rounds 3
    .venv/bin/python benchmarks/quant_speed.py --num-prompts 1 --methods fp16 bf16 int8 int4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # as offline.py and LMC's workers

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    from engines.default_model import prepare_default_model
    from engines.native.engine import NativeEngine
    from engines.types import SamplingParams

    model_dir = Path(args.model_dir or prepare_default_model(progress=False))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    kv_gb = 2 * 30 * 3 * 64 * 4 * args.num_prompts * (args.input_len + args.output_len) / 2**30
    engines = {m: NativeEngine(str(model_dir), dtype="fp32", device="cpu",
                               max_num_seqs=args.num_prompts, max_num_batched_tokens=8192,
                               kv_cache_gb=max(0.1, 1.5 * kv_gb),
                               quantize=None if m == "fp32" else m)
               for m in ["fp32", *args.methods]}
    warm = SamplingParams(max_new_tokens=4, ignore_eos_token=True)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos_token=True)
    for e in engines.values():
        e.generate([p[:8] for p in prompts], [warm] * len(prompts))

    def once(m: str) -> float:
        t = time.perf_counter()
        out = engines[m].generate(prompts, [params] * len(prompts))
        assert all(len(r.token_ids) == args.output_len for r in out)
        return len(prompts) * args.output_len / (time.perf_counter() - t)

    tok_s = {m: [] for m in engines}
    ratios = {m: [] for m in args.methods}
    print(f"{model_dir.name}: {args.num_prompts} prompts x {args.input_len} in, "
          f"{args.output_len} out; load {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        for m in args.methods:
            base = once("fp32")
            got = once(m)
            tok_s["fp32"].append(base)
            tok_s[m].append(got)
            ratios[m].append(got / base)
            print(f"round {r + 1}: fp32 {base:7.1f}  {m} {got:7.1f} out tok/s  "
                  f"x{got / base:.2f}  (load {os.getloadavg()[0]:.2f})", flush=True)
    print("| weights | best out tok/s | median | median × fp32 (same round) |")
    print("| --- | --- | --- | --- |")
    for m, v in tok_s.items():
        ratio = f"{statistics.median(ratios[m]):.2f}" if m in ratios else "1.00"
        print(f"| {m} | {max(v):.1f} | {statistics.median(v):.1f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "tok_s": tok_s,
                                               "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
