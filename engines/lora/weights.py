"""LoRA weights in memory: an adapter's lora_A / lora_B per layer and module, as the engines
apply them (B already multiplied by the adapter's scale).

With tensor parallelism each rank keeps the part of A or B that matches its shard of the base
weight the adapter modifies (engines/native/parallel.py):
    q/k/v, gate/up   column-parallel base: B's rows are sharded like the base weight's rows;
                     A is whole (its input, the hidden state, is whole on every rank)
    o, down          row-parallel base: A's columns are sharded like the base weight's input;
                     B is whole, and the partial products join the base layer's all-reduce
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from engines.lora.config import (MODULES, AdapterSpec, _KEY, check_keys, check_shapes,
                                 read_adapter)
from engines.native.spec import ModelSpec

# A merged adapter travels as a path of this form (so tensor-parallel followers rebuild it):
#   merge:{"ids": [...paths...], "weights": [...]}
MERGE_PREFIX = "merge:"


@dataclass
class LoraWeights:
    """layers[i][module] = (A [r, in], B [out, r] · scale), this rank's shard."""

    rank: int
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)


def _shards(base: ModelSpec, rank: int, size: int) -> dict[str, tuple[str, tuple[int, int]]]:
    """module -> ("A" cols | "B" rows, [lo, hi)) of this rank's shard."""
    d = base.head_dim
    h, kv = base.num_heads // size, base.num_kv_heads // size
    ff = base.intermediate_size // size
    q = (rank * h * d, (rank + 1) * h * d)
    kvr = (rank * kv * d, (rank + 1) * kv * d)
    f = (rank * ff, (rank + 1) * ff)
    return {"q_proj": ("B", q), "k_proj": ("B", kvr), "v_proj": ("B", kvr), "o_proj": ("A", q),
            "gate_proj": ("B", f), "up_proj": ("B", f), "down_proj": ("A", f)}


def _read(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    if spec.weights_file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(spec.weights_file)
    # A pickle may run code unless restricted to tensors.
    tensors = torch.load(spec.weights_file, map_location="cpu", weights_only=True)
    if not isinstance(tensors, dict):
        from engines.contracts.errors import InvalidAdapter

        raise InvalidAdapter("src", f"{spec.weights_file} does not hold a state dict")
    return tensors


def load_lora(spec: AdapterSpec, base: ModelSpec, *, dtype: torch.dtype,
              device: torch.device | str = "cpu", tp_rank: int = 0,
              tp_size: int = 1) -> LoraWeights:
    """Read the adapter's weights, check them against the base model (a .bin's shapes are
    first known here) and keep this rank's shard, B scaled."""
    tensors = _read(spec)
    where = f"adapter {spec.path}"
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    check_keys(shapes, where)
    check_shapes(spec, shapes, base)
    shards = _shards(base, tp_rank, tp_size)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, _, module, ab = _KEY.match(key).groups()
        pairs.setdefault((int(layer), module), {})[ab] = t
    out = LoraWeights(spec.rank, [{} for _ in range(base.num_layers)])
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            from engines.contracts.errors import InvalidAdapter

            raise InvalidAdapter("target_modules", f"{where}: layer {layer} {module} has "
                                                   f"lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"].float(), ab["B"].float() * spec.scale
        which, (lo, hi) = shards[module]
        if tp_size > 1:
            if which == "A":
                a = a[:, lo:hi]
            else:
                b = b[lo:hi]
        out.layers[layer][module] = (a.to(device, dtype).contiguous(),
                                     b.to(device, dtype).contiguous())
    return out


def merge_path(paths: list[str], weights: list[float]) -> str:
    return MERGE_PREFIX + json.dumps({"ids": paths, "weights": weights})


def load_any(path: str, base: ModelSpec, *, max_rank: int, dtype: torch.dtype,
             device: torch.device | str = "cpu", tp_rank: int = 0,
             tp_size: int = 1) -> LoraWeights:
    """`path` an adapter dir, or a merge (merge_path) of several."""
    if not path.startswith(MERGE_PREFIX):
        spec = read_adapter(path, max_rank=max_rank, base=base)
        return load_lora(spec, base, dtype=dtype, device=device, tp_rank=tp_rank,
                         tp_size=tp_size)
    merge = json.loads(path[len(MERGE_PREFIX):])
    parts = [load_any(p, base, max_rank=max_rank, dtype=dtype, device=device, tp_rank=tp_rank,
                      tp_size=tp_size) for p in merge["ids"]]
    return merge_linear(parts, merge["weights"])


def merge_linear(parts: list[LoraWeights], weights: list[float]) -> LoraWeights:
    """The adapter whose update is Σ w_i ΔW_i, exactly: A stacked over the parts' ranks, B
    side by side with each part's columns times its weight (B A = Σ w_i B_i A_i)."""
    rank = sum(p.rank for p in parts)
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for i in range(len(parts[0].layers)):
        merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in MODULES:
            present = [(p, w) for p, w in zip(parts, weights) if module in p.layers[i]]
            if not present:
                continue
            ref_a, ref_b = present[0][0].layers[i][module]
            a_parts, b_parts = [], []
            for p, w in zip(parts, weights):
                if module in p.layers[i]:
                    a, b = p.layers[i][module]
                    a_parts.append(a)
                    b_parts.append(b * w)
                else:  # this part leaves the module alone: zero rows/cols of its rank
                    a_parts.append(ref_a.new_zeros(p.rank, ref_a.shape[1]))
                    b_parts.append(ref_b.new_zeros(ref_b.shape[0], p.rank))
            merged[module] = (torch.cat(a_parts).contiguous(), torch.cat(b_parts, 1).contiguous())
        layers.append(merged)
    return LoraWeights(rank, layers)
