"""What the native engine needs to know about a checkpoint, read from its config.json alone.

Pure Python (no torch): engine selection runs in the front end at startup and asks here whether
the native engine can serve a model, and whether its heads split over the TP degree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


class UnsupportedModel(ValueError):
    """The model cannot run on the native engine; the caller falls back to `hf`."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None


def read_spec(model_dir: str | Path) -> tuple[ModelSpec, dict]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM"}.get(cfg.get("model_type"), "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(f"architecture {arch} is not supported by the native engine "
                               f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"RoPE type {rope_type!r} is not supported by the native engine")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    use_sw = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    spec = ModelSpec(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate_size=cfg["intermediate_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
        sliding_window=cfg.get("sliding_window") if use_sw else None,
    )
    return spec, cfg


def check_divisible(*, num_heads: int, num_kv_heads: int, intermediate_size: int,
                    tp_size: int) -> None:
    """ValueError unless every sharded dimension splits evenly over `tp_size` ranks."""
    dims = (("num_key_value_heads", num_kv_heads), ("num_attention_heads", num_heads),
            ("intermediate_size", intermediate_size))
    for name, value in dims:
        if value % tp_size:
            fits = [d for d in range(1, 9) if all(v % d == 0 for _, v in dims)]
            raise ValueError(
                f"{name}={value} is not divisible by tensor_parallel_degree={tp_size}: the "
                f"native engine splits attention heads (and the MLP) evenly across ranks, so "
                f"num_key_value_heads, num_attention_heads and intermediate_size must all be "
                f"multiples of the degree; set option.tensor_parallel_degree to one of {fits}")
