"""What option.quantize costs in accuracy: each method against fp32 on real text.

The text (default: the project's README.md) is tokenized and cut into windows of --window
tokens; each window runs as one prefill through the native engine's own forward pass
(LlamaModel, fp32 activations), once with fp32 weights and once per method. Per method:

    mean |Δ log-prob|   mean over positions of |log p_q(t) - log p_fp32(t)|, t the text's
                        next token (teacher forcing: the "chosen" token is the real one)
    top-1 agreement     share of positions where the method's argmax equals fp32's
                        (greedy decoding would pick the same token)

    .venv/bin/python benchmarks/quant_accuracy.py                  # SmolLM2, README.md
    .venv/bin/python benchmarks/quant_accuracy.py --methods int8 int4 --json out.json

Besides the option.quantize methods, --methods takes two whole-engine settings:
    dtype-bf16     option.dtype=bf16: weights, activations and the KV cache all in bf16
    matmul-torch   option.cpu_matmul=torch: fp32, x @ W through MKL instead of oneDNN (the
                   reference's path); shows what the summation order alone moves
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_METHODS = ("fp16", "bf16", "int8", "int4", "int4_g64")


@torch.inference_mode()
def window_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of `ids`, one prefill: [T, V]."""
    from engines.native.model import StepBatch

    t = len(ids)
    block = 16
    kv = model.allocate_kv_cache(-(-t // block), block)
    pos = torch.arange(t)
    batch = StepBatch(token_ids=torch.tensor(ids), positions=pos, slot_mapping=pos,
                      logits_index=pos, decode_count=0, decode_slots=None, decode_mask=None,
                      prefills=[(0, t, None, None)])
    return model.logits(model.forward(batch, kv)).log_softmax(-1)  # [T, V]


def compare(reference: list[torch.Tensor], other: list[torch.Tensor],
            windows: list[list[int]]) -> dict[str, float]:
    """mean |Δ log-prob| of the text's next tokens and top-1 agreement, over all windows."""
    deltas, agree, n = 0.0, 0, 0
    for ref, got, ids in zip(reference, other, windows):
        nxt = torch.tensor(ids[1:])  # [T-1]: the token that follows each position
        rows = torch.arange(len(ids) - 1)
        deltas += (got[rows, nxt] - ref[rows, nxt]).abs().sum().item()
        agree += (got[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum().item()
        n += len(ids) - 1
    return {"mean_abs_dlogprob": deltas / n, "top1_agreement": agree / n, "positions": n}


SETTINGS = {"dtype-bf16": {"dtype": torch.bfloat16}, "matmul-torch": {"cpu_matmul": "torch"}}


def load(model_dir: str, method: str | None):
    from engines.native.model import LlamaModel

    kw = dict(SETTINGS.get(method) or {"quantize": method})
    return LlamaModel(model_dir, dtype=kw.pop("dtype", torch.float32),
                      device=torch.device("cpu"), **kw)


def measure(model_dir: str, windows: list[list[int]], methods,
            on_result=None) -> dict[str, dict[str, float]]:
    """fp32 and each method's figures; on_result(method, figures) as each one is done."""
    ref_model = load(model_dir, None)
    reference = [window_log_probs(ref_model, w) for w in windows]
    ref_nll = -sum(r[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
                   for r, w in zip(reference, windows))
    n = sum(len(w) - 1 for w in windows)
    out = {"fp32": {"mean_abs_dlogprob": 0.0, "top1_agreement": 1.0, "positions": n,
                    "nll": ref_nll / n}}
    if on_result:
        on_result("fp32", out["fp32"])
    del ref_model
    for m in methods:
        model = load(model_dir, m)
        got = [window_log_probs(model, w) for w in windows]
        nll = -sum(g[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
                   for g, w in zip(got, windows))
        out[m] = {**compare(reference, got, windows), "nll": nll / n}
        if on_result:
            on_result(m, out[m])
        del model
    return out


def text_windows(tokenizer, text: str, window: int, max_windows: int) -> list[list[int]]:
    ids = tokenizer(text)["input_ids"]
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:max_windows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: SmolLM2-135M-Instruct, prepared)")
    ap.add_argument("--text", default=str(ROOT / "README.md"))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from engines.default_model import prepare_default_model

    model_dir = args.model or str(prepare_default_model(progress=False))
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = text_windows(tok, Path(args.text).read_text(), args.window, args.max_windows)
    t0 = time.perf_counter()
    print(f"{Path(args.text).name}: {len(windows)} windows of {args.window} tokens")
    print("| method | mean abs Δ log-prob | top-1 agreement | NLL (nats/token) |")
    print("| --- | --- | --- | --- |", flush=True)

    def row(m: str, r: dict) -> None:
        print(f"| {m} | {r['mean_abs_dlogprob']:.4f} | {100 * r['top1_agreement']:.1f}% "
              f"| {r['nll']:.3f} |", flush=True)

    res = measure(model_dir, windows, args.methods, on_result=row)
    print(f"{res['fp32']['positions']} positions, {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
