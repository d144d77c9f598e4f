"""Where a multi-LoRA decode step's time goes, in-process: the native engine on SmolLM2 with
16 registered rank-16 adapters (benchmarks/lora.py builds them), 32 prompts of 128 random ids,
64 new tokens each, EOS ignored, the prompts spread over N distinct adapters. Reports out tok/s
and the share of the time spent in the LoRA ops (a timer around StepLora.apply).

    .venv/bin/python benchmarks/lora.py --configs lora-16 --requests-per-client 1  # builds them once
    .venv/bin/python benchmarks/lora_step.py --adapters 16
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from engines.default_model import prepare_default_model
    from engines.options import load_server_options

    cache = Path(load_server_options().cache_dir).expanduser()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=16, help="distinct adapters in the batch")
    ap.add_argument("--adapter-dir", type=Path,
                    default=cache / "bench" / "lora" / "model-lora" / "adapters")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import engines.native.lora as lora
    from engines.native.loop import start_native_engine
    from engines.types import SamplingParams

    spent = [0.0]
    apply = lora.StepLora.apply

    def timed(self, *a):
        t = time.perf_counter()
        apply(self, *a)
        spent[0] += time.perf_counter() - t

    lora.StepLora.apply = timed
    names = sorted(os.listdir(args.adapter_dir))[:16]
    engine = start_native_engine(prepare_default_model(str(cache), progress=False),
                                 max_num_seqs=32, enable_lora=True, max_loras=16,
                                 max_cpu_loras=16)
    try:
        for n in names:
            engine.add_adapter(n, str(args.adapter_dir / n))
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(32)]
        params = [SamplingParams(max_new_tokens=64, ignore_eos_token=True)] * 32
        which = [names[i % args.adapters] for i in range(32)] if args.adapters else None
        engine.generate(prompts, params, which)  # warm-up
        for _ in range(args.repeats):
            spent[0] = 0.0
            t = time.perf_counter()
            engine.generate(prompts, params, which)
            wall = time.perf_counter() - t
            print(f"{args.adapters} adapters: {32 * 64 / wall:.1f} out tok/s, LoRA ops "
                  f"{spent[0]:.2f} s of {wall:.2f} s ({100 * spent[0] / wall:.0f}%)", flush=True)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
