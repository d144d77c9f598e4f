"""Which GEMM path is fastest here: SmolLM2's four decoder matmuls (qkv, o, gate_up, down) per
layer, at 32 rows (a batch-32 decode step) and 1 row, through each kernel torch offers on CPU and
the native engine's own (oneDNN prepacked, the C++ int8/int4 kernels).

    .venv/bin/python benchmarks/gemm_paths.py

Every candidate is timed in turns (best of 3 passes of 30 calls each), in one process, so the
ratios hold on a noisy machine even when the absolute figures do not. One layer's weights fit
in the L2/L3 cache, so the 1-row figures are compute figures, not the memory-bound decode of
the whole model.
"""

from __future__ import annotations

import time
import warnings

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# [N, K]: output and input features
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def best_us(fn, calls: int = 30, passes: int = 3) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def candidates(w: torch.Tensor, x: torch.Tensor) -> dict:
    n, k = w.shape
    wt = w.t().contiguous()  # [K, N], the native engine's layout
    s8 = w.abs().amax(1) / 127
    q8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)
    g = 32
    wg = w.view(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    sc = (hi - lo).clamp(min=1e-8) / 15
    q4 = torch.round((wg - lo[..., None]) / sc[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.stack([sc.t(), (lo + 8 * sc).t()], -1).contiguous()
    wb = wt.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated
        qw = torch.quantize_per_channel(w, s8.double(), torch.zeros(n, dtype=torch.long), 0,
                                        torch.qint8)
    pk8 = torch.ops.quantized.linear_prepack(qw, None)
    pk16 = torch.ops.quantized.linear_prepack_fp16(w, None)
    from engines.native.quant import Int4Linear, Int8Linear, OneDnnLinear

    dnn32, dnn16 = OneDnnLinear(wt), OneDnnLinear(wt, torch.bfloat16)
    lmc8, lmc4 = Int8Linear(wt), Int4Linear(wt, g)
    xb = x.bfloat16()
    return {
        "fp32 oneDNN prepacked (the engine's default)": lambda: dnn32(x),
        "bf16 oneDNN prepacked (dtype=bf16)": lambda: dnn16(xb),
        "int8 LMC kernel (quantize=int8)": lambda: lmc8(x),
        "int4 g32 LMC kernel (quantize=int4)": lambda: lmc4(x),
        "fp32 mm (MKL), cpu_matmul=torch": lambda: x @ wt,
        "fp32 F.linear": lambda: torch.nn.functional.linear(x, w),
        "fp16 weights, FBGEMM (quantize=fp16)": lambda: torch.ops.quantized.linear_dynamic_fp16(
            x, pk16),
        "bf16 unpacked x @ W (oneDNN via mm)": lambda: (x.bfloat16() @ wb).float(),
        "bf16 weights upcast to fp32 per call": lambda: x @ wb.float(),
        "int8 _weight_int8pack_mm (the fallback)": lambda: torch.ops.aten._weight_int8pack_mm(
            x, q8, s8),
        "int4 g32 _weight_int4pack_mm_for_cpu (the fallback)":
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed4, g, sz),
        "int8 W8A8 dynamic, FBGEMM": lambda: torch.ops.quantized.linear_dynamic(x, pk8, True),
    }


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for m in (32, 1):
        total: dict[str, float] = {}
        flops = 0
        for n, k in SHAPES.values():
            w = torch.randn(n, k) * 0.02
            x = torch.randn(m, k)
            flops += 2 * m * n * k
            for name, fn in candidates(w, x).items():
                total[name] = total.get(name, 0.0) + best_us(fn)
        base = total["fp32 mm (MKL), cpu_matmul=torch"]
        print(f"\n{m} rows: one layer's 4 matmuls")
        print("| path | µs | GFLOP/s | × fp32 mm |")
        print("| --- | --- | --- | --- |")
        for name, us in total.items():
            print(f"| {name} | {us:.0f} | {flops / us / 1e3:.0f} | {base / us:.2f} |")


if __name__ == "__main__":
    main()
