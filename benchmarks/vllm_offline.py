"""The vLLM side of benchmarks/vllm_compare.py, run under the vllm interpreter (.venv-vllm): output
tokens per second of vLLM's own offline `LLM.generate` (--mode offline), or of LMC's vllm engine
(engines/vllm/engine.py, AsyncLLM behind LMC's contract; --mode lmc), on prompts given as token
ids in a JSON file. Greedy, EOS ignored, every request producing exactly --output-len tokens;
one small warm-up call, then --repeats timed calls. Prints one JSON line (tok/s of each).

    .venv-vllm/bin/python benchmarks/vllm_offline.py --mode offline --model-dir DIR --prompts F
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def offline(model_dir: str, prompts: list[list[int]], output_len: int, kv_gb: int,
            repeats: int) -> list[float]:
    from engines.vllm.engine import _cpu_env

    _cpu_env(kv_gb)  # the same CPU settings LMC's vllm engine uses
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(map(len, prompts)) + output_len
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_num_seqs=len(prompts),
              max_model_len=longest, max_num_batched_tokens=8192, seed=0)

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)

    llm.generate([TokensPrompt(prompt_token_ids=p[:8]) for p in prompts[:2]], params(4),
                 use_tqdm=False)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            params(output_len), use_tqdm=False)
        runs.append(len(prompts) * output_len / (time.perf_counter() - t))
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return runs


def lmc(model_dir: str, prompts: list[list[int]], output_len: int, kv_gb: int,
        repeats: int) -> list[float]:
    from engines.types import SamplingParams
    from engines.vllm.engine import VLLMEngine

    longest = max(map(len, prompts)) + output_len
    engine = VLLMEngine(model_dir, dtype="fp32", max_num_seqs=len(prompts),
                        max_model_len=longest, max_num_batched_tokens=8192,
                        cpu_kv_cache_gb=kv_gb)
    warm = SamplingParams(max_new_tokens=4, min_new_tokens=4, ignore_eos_token=True)
    engine.generate([p[:8] for p in prompts[:2]], [warm] * 2)
    params = SamplingParams(max_new_tokens=output_len, min_new_tokens=output_len,
                            ignore_eos_token=True)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        results = engine.generate(prompts, [params] * len(prompts))
        runs.append(len(prompts) * output_len / (time.perf_counter() - t))
        assert all(len(r.token_ids) == output_len for r in results)
    engine.shutdown()
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["offline", "lmc"], required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--kv-cache-gb", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls (after one warm-up)")
    args = ap.parse_args()
    prompts = json.loads(Path(args.prompts).read_text())
    run = offline if args.mode == "offline" else lmc
    runs = run(args.model_dir, prompts, args.output_len, args.kv_cache_gb, args.repeats)
    print(json.dumps({"mode": args.mode, "out_tok_s": runs}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
