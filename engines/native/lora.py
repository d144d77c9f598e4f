"""LoRA in the native engine's forward pass: fixed weight slots and the per-step row groups.

The model fuses q|k|v and gate|up into one matmul each, so the LoRA weights are fused the same
way, per layer and per fused op, for all `max_loras` slots at once:

    op        input     sub-modules (output columns, in order)
    qkv       hidden    q_proj | k_proj | v_proj
    o         H * D     o_proj
    gate_up   hidden    gate_proj | up_proj
    down      F         down_proj

    A[op]     [S + 1, in, n_sub * R]   slot s's A^T, each sub-module in its own R columns
    B[op][j]  [S + 1, R, out_j]        slot s's B^T · scale for sub-module j, whose output
                                       columns sit side by side in the op's output

R = option.max_lora_rank; a smaller rank and an untargeted module are zero rows/columns, which
add exactly nothing. Slot 0 is the base model and is never computed. So a mixed batch costs one
shrink and one expand per sub-module, per op and per adapter present in the step, however the
adapters differ:

    y = x[rows of slot s] @ A[op][s];  out[rows, cols of j] += y[:, j's R] @ B[op][j][s]

B is kept per sub-module rather than as one block-diagonal matrix: at 16 adapters a CPU decode
step is bound by reading the adapters' weights (a cold slot's matmuls measured twice as slow as
a cached one's), and the block-diagonal zeros were a third of those bytes (rank 16, all
modules, SmolLM2's shapes).

On CPU the runner orders the step's rows by slot and passes contiguous (slot, start, end)
groups. A decode step with many adapters has many groups of one or two rows each, where the
per-call overhead of two tiny matmuls per group dominates; there all groups go through one
batched matmul pair over the range of slots present (`Packed`: rows gathered into [slots, k, in]
padded with a zero row, then scattered back), which reads each present adapter's weights once,
as the per-group path does, in five calls instead of two per adapter. On CUDA the gathered
Triton kernel (lora_kernels.py) reads each row's slot from a [T] tensor, which also works inside
a CUDA graph (fixed tensors, no data-dependent shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engines.lora.weights import LoraWeights

OPS = ("qkv", "o", "gate_up", "down")


class LoraSlots:
    def __init__(self, model, *, max_loras: int, max_rank: int) -> None:
        s = model.spec
        hidden, q, kv = s.hidden_size, model.q_size, model.kv_size
        ff = model.ff_size  # this rank's share of the MLP width
        self.subs: dict[str, tuple[int, list[tuple[str, int]]]] = {
            "qkv": (hidden, [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]),
            "o": (q, [("o_proj", hidden)]),
            "gate_up": (hidden, [("gate_proj", ff), ("up_proj", ff)]),
            "down": (ff, [("down_proj", hidden)]),
        }
        self.max_loras, self.max_rank = max_loras, max_rank
        dev, dt = model.device, model.dtype
        n = max_loras + 1
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, list[torch.Tensor]]] = []
        for _ in range(s.num_layers):
            a, b = {}, {}
            for op, (fan_in, subs) in self.subs.items():
                a[op] = torch.zeros(n, fan_in, max_rank * len(subs), device=dev, dtype=dt)
                b[op] = [torch.zeros(n, max_rank, size, device=dev, dtype=dt)
                         for _, size in subs]
            self.a.append(a)
            self.b.append(b)

    def nbytes(self) -> int:
        tensors = [t for layer in self.a for t in layer.values()]
        tensors += [t for layer in self.b for parts in layer.values() for t in parts]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def load(self, slot: int, weights: LoraWeights) -> None:
        assert 1 <= slot <= self.max_loras and weights.rank <= self.max_rank
        R = self.max_rank
        for layer, (a, b) in enumerate(zip(self.a, self.b)):
            mods = weights.layers[layer]
            for op, (_, subs) in self.subs.items():
                a[op][slot].zero_()
                for j, (module, _) in enumerate(subs):
                    b[op][j][slot].zero_()
                    if module in mods:
                        wa, wb = mods[module]  # [r, in], [out, r]
                        r = wa.shape[0]
                        a[op][slot, :, j * R:j * R + r].copy_(wa.t())
                        b[op][j][slot, :r].copy_(wb.t())


@dataclass
class Packed:
    """Many small groups as one batch over slots lo..hi: padded position p of slot lo + p // k
    holds row `gather[p]` of x (row T: a zero row for padding); `rows[i]` is where packed
    position `valid[i]` goes back."""

    lo: int
    hi: int  # inclusive
    k: int  # rows per slot, padded
    gather: torch.Tensor  # [(hi - lo + 1) * k] long
    valid: torch.Tensor  # [n] long: packed positions that hold a real row
    rows: torch.Tensor  # [n] long: their rows in x / out


@dataclass
class StepLora:
    """The LoRA part of one forward pass: which rows use which slot."""

    slots: LoraSlots
    # Contiguous row ranges (slot, start, end), slot > 0 (CPU path)...
    groups: list[tuple[int, int, int]]
    # ...or each row's slot, [T] int32, for the gathered kernel (CUDA path).
    row_slots: torch.Tensor | None = None
    kernel: Callable | None = None
    packed: Packed | None = None  # the groups as one batch (CPU decode steps)

    def apply(self, layer: int, op: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += LoRA delta of op for every row that has an adapter (in place)."""
        a, parts = self.slots.a[layer][op], self.slots.b[layer][op]
        if self.kernel is not None:
            self.kernel(x, a, parts, self.row_slots, out)
            return
        r = self.slots.max_rank
        p = self.packed
        if p is not None:
            n, lo, hi = p.hi - p.lo + 1, p.lo, p.hi + 1
            xs = torch.cat([x, x.new_zeros(1, x.shape[1])])[p.gather]  # [n * k, in]
            y = torch.bmm(xs.view(n, p.k, -1), a[lo:hi])  # [n, k, n_sub * R]
            ds = [torch.bmm(y[:, :, j * r:(j + 1) * r], b[lo:hi]) for j, b in enumerate(parts)]
            d = (ds[0] if len(ds) == 1 else torch.cat(ds, dim=-1)).view(n * p.k, -1)
            out.index_add_(0, p.rows, d[p.valid])  # [n * k, out] back to the rows
            return
        for slot, start, end in self.groups:
            y = x[start:end] @ a[slot]  # [rows, n_sub * R]
            col = 0
            for j, b in enumerate(parts):
                width = b.shape[2]
                out[start:end, col:col + width].addmm_(y[:, j * r:(j + 1) * r], b[slot])
                col += width


def pack_groups(groups: list[tuple[int, int, int]], num_rows: int, *,
                device: torch.device, max_k: int = 4, min_groups: int = 4) -> Packed | None:
    """The groups as one batch when that is cheaper: many groups, each slot with few rows,
    and the slots present filling at least half of their range (slot weights outside the
    groups are read too). None otherwise (the per-group path)."""
    if len(groups) < min_groups:
        return None
    per_slot: dict[int, list[int]] = {}
    for slot, start, end in groups:
        per_slot.setdefault(slot, []).extend(range(start, end))
    k = max(len(rows) for rows in per_slot.values())
    lo, hi = min(per_slot), max(per_slot)
    if k > max_k or 2 * len(per_slot) < hi - lo + 1:
        return None
    gather = [num_rows] * ((hi - lo + 1) * k)
    valid, rows = [], []
    for slot, members in per_slot.items():
        base = (slot - lo) * k
        for j, r in enumerate(members):
            gather[base + j] = r
            valid.append(base + j)
            rows.append(r)
    t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Packed(lo, hi, k, t(gather), t(valid), t(rows))


def row_groups(slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal slot > 0 in a per-row slot list: [(slot, start, end)]."""
    groups: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start]:
                groups.append((slots[start], start, i))
            start = i
    return groups
