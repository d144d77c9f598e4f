"""Offline throughput: the native engine against HF transformers `generate`, same run.

Both get the same prompts of random token ids, greedy, EOS ignored, every request producing
exactly --output-len tokens; HF runs them as one static batch (`model.generate`, left padding
not needed: equal lengths), the native engine with continuous batching. Reports output tokens
per second (generated tokens / wall time, prefill included) and the ratio.

    .venv/bin/python benchmarks/offline.py                       # SmolLM2-135M fp32 on CPU
    .venv/bin/python benchmarks/offline.py --random-config llama-1b --dtype bf16 --num-prompts 128
    .venv/bin/python benchmarks/offline.py --quantize int8 --skip-hf   # option.quantize
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

# The same OpenMP spin setting as LMC's worker processes (handlers/worker.py), for both
# engines, so the offline figures are what a served engine gets. Set before torch loads.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines.options import ATTENTION_BACKENDS, CPU_MATMUL, QUANTIZE_METHODS  # noqa: E402

# Random-weight configs for speed runs where no checkpoint is needed (e.g. on a GPU).
RANDOM_CONFIGS = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    # SmolLM2's shape with 8 query / 4 KV heads, so that TP=2 can split it.
    "smollm2-kv4": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=49152,
                        max_position_embeddings=8192, tie_word_embeddings=True,
                        rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0),
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_random_model(name: str, dtype: torch.dtype, out_dir: Path) -> Path:
    """A random-weight Llama checkpoint with a real tokenizer (the default model's)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engines.default_model import prepare_default_model

    torch.manual_seed(0)
    config = LlamaConfig(**RANDOM_CONFIGS[name], architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(prepare_default_model(progress=False)).save_pretrained(out_dir)
    return out_dir


def run_hf(model_dir: Path, prompts: list[list[int]], output_len: int, dtype, device) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)  # [B, S]: equal lengths, no padding
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
              pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm
        _sync(device)
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync(device)
        elapsed = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == output_len
    del model
    gc.collect()
    return len(prompts) * output_len / elapsed


def run_native(model_dir: Path, prompts: list[list[int]], output_len: int, dtype_name: str,
               device, max_num_seqs: int, *, attention_backend: str = "auto",
               cuda_graphs: bool | None = None, profile: int = 0,
               quantize: str | None = None, cpu_matmul: str = "auto") -> tuple[float, dict]:
    from engines.native.engine import NativeEngine
    from engines.types import SamplingParams

    engine = NativeEngine(str(model_dir), dtype=dtype_name, device=str(device),
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=8192,
                          kv_cache_gb=None if device.type == "cuda" else 4.0,
                          attention_backend=attention_backend, cuda_graphs=cuda_graphs,
                          quantize=quantize, cpu_matmul=cpu_matmul)
    warm = SamplingParams(max_new_tokens=4, ignore_eos_token=True)
    warm_prompts = [p[:8] for p in prompts[:2]]  # one with --num-prompts 1
    engine.generate(warm_prompts, [warm] * len(warm_prompts))
    params = SamplingParams(max_new_tokens=output_len, ignore_eos_token=True)
    _sync(device)
    t = time.perf_counter()
    results = engine.generate(prompts, [params] * len(prompts))
    _sync(device)
    elapsed = time.perf_counter() - t
    assert all(len(r.token_ids) == output_len for r in results)
    info = {"steps_preempted": engine.scheduler.num_preemptions,
            "kv_blocks": engine.block_manager.num_blocks,
            "attention": engine.runner.attention, "cuda_graphs": engine.runner.graphs is not None,
            "cpu_matmul": engine.model.cpu_matmul}
    if profile:
        print_profile(engine, prompts, params, device, profile)
    return len(prompts) * output_len / elapsed, info


def print_profile(engine, prompts, params, device, rows: int) -> None:
    """Run the workload again under torch.profiler and print where the time goes: the top ops
    by self time on the GPU (on CPU, by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        engine.generate(prompts, [params] * len(prompts))
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="checkpoint dir (default: the converted SmolLM2)")
    ap.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                    help="benchmark a random-weight model of this shape instead")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                    help="native engine decode attention (option.attention_backend)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="native engine without CUDA graphs (option.enforce_eager)")
    ap.add_argument("--quantize", choices=QUANTIZE_METHODS,
                    help="native engine weight quantization (option.quantize); HF stays fp32")
    ap.add_argument("--cpu-matmul", choices=CPU_MATMUL, default="auto",
                    help="native engine CPU matmuls of unquantized weights (option.cpu_matmul)")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="rerun the native workload under torch.profiler, print the top ROWS ops")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    tmp = tempfile.TemporaryDirectory()
    if args.random_config:
        model_dir = build_random_model(args.random_config, dtype, Path(tmp.name))
    elif args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from engines.default_model import prepare_default_model

        model_dir = prepare_default_model(progress=False)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    print(f"{model_dir.name}: {args.num_prompts} prompts x {args.input_len} tokens in, "
          f"{args.output_len} out, greedy, {args.dtype}"
          f"{f' ({args.quantize} weights, native)' if args.quantize else ''} on {device} "
          f"({torch.get_num_threads()} threads)", flush=True)

    result = {"config": vars(args)}
    native, info = run_native(model_dir, prompts, args.output_len, args.dtype, device,
                              max_num_seqs=max(args.num_prompts, 1),
                              attention_backend=args.attention_backend,
                              cuda_graphs=False if args.enforce_eager else None,
                              profile=args.profile, quantize=args.quantize,
                              cpu_matmul=args.cpu_matmul)
    result["native_out_tok_s"] = native
    print(f"native engine      : {native:8.1f} out tok/s  {info}", flush=True)
    if not args.skip_hf:
        gc.collect()
        hf = run_hf(model_dir, prompts, args.output_len, dtype, device)
        result["hf_out_tok_s"] = hf
        print(f"HF generate (batch): {hf:8.1f} out tok/s", flush=True)
        print(f"native / HF        : {native / hf:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
