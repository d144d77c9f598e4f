"""Cost of incremental detokenization per request per step, windowed vs decoding the whole output
each step, at several output lengths, with the default model's tokenizer (run `make model`).

    .venv/bin/python benchmarks/detokenize.py [--lengths 128 512 2048] [--model DIR]

The output text is the model's tokenizer encoding of mixed prose (ASCII, accents, CJK, emoji),
so byte tokens and multi-byte characters split across tokens are part of it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.detokenizer import TextStream  # noqa: E402

PROSE = ("The quick brown fox jumps over the lazy dog; naïve café owners serve crème brûlée. "
         "日本語の文章も少し混ぜます。 Emoji too 😀🚀, and numbers 3.14159 and code `x += 1`.\n")


def per_step_us(decode, ids: list[int], last: int, windowed: bool, reps: int) -> float:
    """Mean µs of one push at output lengths last-reps+1 .. last (the stream is fed from 1)."""
    stream = TextStream(decode, ("</stop>",), windowed=windowed)
    for n in range(1, last - reps + 1):
        stream.push(ids[:n], final=False)
    start = time.perf_counter()
    for n in range(last - reps + 1, last + 1):
        stream.push(ids[:n], final=False)
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--model", default=None, help="model dir (default: the prepared SmolLM2)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    if args.model is None:
        from engines.default_model import prepare_default_model

        args.model = str(prepare_default_model(progress=False))
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def decode(token_ids: list[int]) -> str:  # what the engines pass to TextStream
        return tokenizer.decode(token_ids, skip_special_tokens=True)

    ids: list[int] = []
    while len(ids) < max(args.lengths):
        ids += tokenizer(PROSE, add_special_tokens=False)["input_ids"]
    print(f"tokenizer: {args.model}")
    print(f"{'output tokens':>13} | {'whole decode µs/step':>20} | {'windowed µs/step':>16} | ratio")
    for length in args.lengths:
        reps = min(64, length // 2)
        whole = per_step_us(decode, ids, length, windowed=False, reps=reps)
        windowed = per_step_us(decode, ids, length, windowed=True, reps=reps)
        print(f"{length:>13} | {whole:>20.1f} | {windowed:>16.1f} | ×{whole / windowed:.1f}")


if __name__ == "__main__":
    main()
