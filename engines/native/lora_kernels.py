"""Gathered multi-LoRA delta for a heterogeneous batch (BGMV style): every token row may use a
different adapter, picked by its slot in a stack of adapters' weights, and all rows are done in
one pair of launches, whatever the mix of adapters.

    out[t] += (x[t] @ a_slots[s]) @ b_slots[s]      for every row t with s = row_slots[t] > 0

Slot 0 means "no adapter": those rows are skipped (slot 0's weights are never read and the row
of `out` is left byte for byte as it was). The products are summed in fp32 and the sum is
added to `out` in fp32, then written back in out's dtype.

Two Triton kernels. Shrink: one program per (row, tile of R) walks IN in blocks and writes
x[t] @ A into an fp32 scratch row [R]. Expand: one program per (row, tile of OUT) reads that
scratch row and the B tile, adds the product into out's tile. Each program reads its row's slot
from `row_slots` on the device, so the launches have the same shape every step, nothing is
allocated whose size depends on the slots' values, and the pair can be captured in a CUDA graph
(pass `scratch=` to keep even the scratch buffer fixed). Slot values are not checked against S
(that would need a sync): the caller keeps them in 0 .. S-1.

On a machine with CUDA the kernels are compiled; without one, the same source runs in Triton's
interpreter (numpy) on CPU tensors, which is how CI checks it. `lora_delta_reference` is the
same computation in plain torch (a loop over the distinct slots: gather rows, two matmuls,
index_add), which the tests compare it with.

Shapes: T = token rows, IN = input features, OUT = output features, R = LoRA rank (any, masked;
need not be a power of two), S = adapter slots, slot 0 included.
    x [T, IN]          fp32/fp16/bf16, rows may be strided (unit column stride)
    a_slots [S, IN, R] contiguous: slot s's A, transposed (lora_A.weight.T)
    b_slots [S, R, OUT] contiguous: slot s's B, transposed and scaled by alpha / r
    row_slots [T]      int32 or int64, on x's device
    out [T, OUT]       x's dtype, rows may be strided (unit column stride); updated in place
"""

# No `from __future__ import annotations` here: Triton reads the kernels' parameter
# annotations (tl.constexpr) at run time.

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU Triton can only interpret kernels, and it must know before it is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # installs without Triton: lora_delta raises, saying so
    triton = None


def lora_delta_reference(x: torch.Tensor, a_slots: torch.Tensor, b_slots: torch.Tensor,
                         row_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The same as lora_delta, in plain torch (data-dependent: not for CUDA graphs)."""
    slots = row_slots.long()
    delta = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for s in slots.unique().tolist():
        if s == 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        part = (x[rows].float() @ a_slots[s].float()) @ b_slots[s].float()  # [n, OUT]
        delta.index_add_(0, rows, part)
    touched = (slots != 0).nonzero().squeeze(1)
    out[touched] = (out[touched].float() + delta[touched]).to(out.dtype)
    return out


if triton is not None:
    # Undecorated: _kernels() applies triton.jit once it is first needed, after the choice
    # between compiling and interpreting has been made.

    def _lora_shrink_kernel(
        x_ptr, a_ptr, slots_ptr, scratch_ptr,
        IN, R,
        stride_xt, stride_as, stride_ai, stride_st,
        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        r_tile = tl.program_id(1)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        if slot == 0:
            return
        r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        r_ok = r < R
        k = tl.arange(0, BLOCK_K)
        x_row = x_ptr + row * stride_xt
        a_slot = a_ptr + slot * stride_as
        acc = tl.zeros([BLOCK_R], tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            kk = k0 + k  # [BK]
            k_ok = kk < IN
            xv = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
            av = tl.load(a_slot + kk[:, None] * stride_ai + r[None, :],
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [BK, BR]
            acc += tl.sum(xv[:, None] * av, axis=0)
        tl.store(scratch_ptr + row * stride_st + r, acc, mask=r_ok)

    def _lora_expand_kernel(
        scratch_ptr, b_ptr, slots_ptr, out_ptr,
        R, OUT,
        stride_st, stride_bs, stride_br, stride_ot,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        n_tile = tl.program_id(1)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        if slot == 0:
            return
        n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = n < OUT
        r = tl.arange(0, BLOCK_R)
        s_row = scratch_ptr + row * stride_st
        b_slot = b_ptr + slot * stride_bs
        acc = tl.zeros([BLOCK_N], tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + r  # [BR]
            r_ok = rr < R
            sv = tl.load(s_row + rr, mask=r_ok, other=0.0)  # [BR], fp32
            bv = tl.load(b_slot + rr[:, None] * stride_br + n[None, :],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # [BR, BN]
            acc += tl.sum(sv[:, None] * bv, axis=0)
        o_ptrs = out_ptr + row * stride_ot + n
        o = tl.load(o_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (o + acc).to(out_ptr.dtype.element_ty), mask=n_ok)


_compiled = None


def _kernels():
    global _compiled
    if _compiled is None:
        _compiled = (triton.jit(_lora_shrink_kernel), triton.jit(_lora_expand_kernel))
    return _compiled


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(x, a_slots, b_slots, row_slots, out, scratch) -> None:
    if x.dim() != 2 or a_slots.dim() != 3 or b_slots.dim() != 3 or out.dim() != 2:
        raise ValueError("need x [T, IN], a_slots [S, IN, R], b_slots [S, R, OUT], "
                         "out [T, OUT]")
    t, n_in = x.shape
    s, r = a_slots.shape[0], a_slots.shape[2]
    n_out = out.shape[1]
    if (a_slots.shape[1] != n_in or tuple(b_slots.shape) != (s, r, n_out)
            or out.shape[0] != t or tuple(row_slots.shape) != (t,)):
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)}, a_slots "
                         f"{tuple(a_slots.shape)}, b_slots {tuple(b_slots.shape)}, row_slots "
                         f"{tuple(row_slots.shape)}, out {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise ValueError(f"out is {out.dtype} but x is {x.dtype}")
    if row_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_slots must be int32 or int64, not {row_slots.dtype}")
    if x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("x and out need a unit column stride")
    if not (a_slots.is_contiguous() and b_slots.is_contiguous()):
        raise ValueError("a_slots and b_slots must be contiguous")
    tensors = [x, a_slots, b_slots, row_slots, out] + ([scratch] if scratch is not None else [])
    if any(v.device != x.device for v in tensors):
        raise ValueError("all tensors must be on one device")
    if scratch is not None and (scratch.dtype != torch.float32 or scratch.dim() != 2
                                or scratch.shape[0] < t or scratch.shape[1] < r
                                or scratch.stride(1) != 1):
        raise ValueError(f"scratch must be fp32 [T, R] = [{t}, {r}] (or larger) with a unit "
                         f"column stride, not {scratch.dtype} {tuple(scratch.shape)}")
    if x.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "anything imports triton")


def lora_delta(x: torch.Tensor, a_slots: torch.Tensor, b_slots: torch.Tensor,
               row_slots: torch.Tensor, out: torch.Tensor, *,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] += (x[t] @ a_slots[s]) @ b_slots[s] for s = row_slots[t] > 0, in place, summed in
    fp32; rows with slot 0 are not touched. Shapes in the module docstring. `scratch`, an fp32
    [T, R] buffer for x @ A, is allocated from the shapes when not given. Returns out."""
    if triton is None:
        raise RuntimeError("lora_delta needs Triton (pip install triton)")
    _check(x, a_slots, b_slots, row_slots, out, scratch)
    t = x.shape[0]
    r = b_slots.shape[1]
    if t == 0 or r == 0:
        return out
    if scratch is None:
        scratch = torch.empty((t, r), dtype=torch.float32, device=x.device)
    _shrink(x, a_slots, row_slots, scratch)
    _expand(scratch, b_slots, row_slots, out)
    return out


def _shrink(x, a_slots, row_slots, scratch) -> None:
    """scratch[t, :R] = x[t] @ a_slots[row_slots[t]] (fp32) for rows with a slot."""
    shrink, _ = _kernels()
    t, n_in = x.shape
    r = a_slots.shape[2]
    # Tiles of up to 16 ranks (R = 48 -> 3 programs a row), IN in blocks of ~4K elements.
    block_r = min(_pow2(r), 16)
    block_k = max(16, min(_pow2(n_in), 4096 // block_r))
    shrink[(t, triton.cdiv(r, block_r))](
        x, a_slots, row_slots, scratch,
        n_in, r,
        x.stride(0), a_slots.stride(0), a_slots.stride(1), scratch.stride(0),
        BLOCK_K=block_k, BLOCK_R=block_r,
    )


def _expand(scratch, b_slots, row_slots, out) -> None:
    """out[t] += scratch[t] @ b_slots[row_slots[t]] for rows with a slot; scratch and out may
    be column views (row strides are passed)."""
    _, expand = _kernels()
    t = out.shape[0]
    r, n_out = b_slots.shape[1], b_slots.shape[2]
    # The whole rank at once up to 64 (looped beyond), OUT in tiles of 64..256.
    block_re = min(_pow2(r), 64)
    block_n = max(64, min(_pow2(n_out), 8192 // block_re, 256))
    expand[(t, triton.cdiv(n_out, block_n))](
        scratch, b_slots, row_slots, out,
        r, n_out,
        scratch.stride(0), b_slots.stride(0), b_slots.stride(1), out.stride(0),
        BLOCK_R=block_re, BLOCK_N=block_n,
    )


def lora_delta_parts(x: torch.Tensor, a_slots: torch.Tensor, b_parts: list[torch.Tensor],
                     row_slots: torch.Tensor, out: torch.Tensor, *,
                     scratch: torch.Tensor | None = None) -> torch.Tensor:
    """A fused op's LoRA (q|k|v, gate|up): one shrink with the fused A [S, IN, n * R] into an
    fp32 scratch [T, n * R], then one expand per part j: out[:, cols of j] += scratch[:, j's R]
    @ b_parts[j] [S, R, OUT_j], the parts' outputs side by side in out's columns. Each part's B
    is stored compactly (no block-diagonal zeros to read). Returns out."""
    if triton is None:
        raise RuntimeError("lora_delta_parts needs Triton (pip install triton)")
    r = b_parts[0].shape[1]
    widths = [b.shape[2] for b in b_parts]
    if (a_slots.shape[2] != r * len(b_parts) or sum(widths) != out.shape[1]
            or any(b.shape[1] != r or not b.is_contiguous() for b in b_parts)):
        raise ValueError(f"a_slots {tuple(a_slots.shape)} and b_parts "
                         f"{[tuple(b.shape) for b in b_parts]} do not fit out "
                         f"{tuple(out.shape)}")
    # The shared checks, on the fused A and an empty stand-in for B (the parts are checked
    # above): shapes, dtypes, strides, devices, the interpreter on CPU.
    _check(x, a_slots, a_slots.new_empty(a_slots.shape[0], a_slots.shape[2], 0), row_slots,
           out[:, :0], scratch)
    t = x.shape[0]
    if t == 0:
        return out
    if scratch is None:
        scratch = torch.empty((t, a_slots.shape[2]), dtype=torch.float32, device=x.device)
    _shrink(x, a_slots, row_slots, scratch)
    col = 0
    for j, (b, width) in enumerate(zip(b_parts, widths)):
        _expand(scratch[:, j * r:(j + 1) * r], b, row_slots, out[:, col:col + width])
        col += width
    return out
