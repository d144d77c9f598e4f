"""Paged attention for decode rows: one query token per sequence against that sequence's keys and
values, read in place from the block pool through its block table. No gather, no padding mask.

The Triton kernel runs one program per (sequence, KV head): it loads the query heads that share
that KV head (GQA: H / KV of them) once, walks the sequence's blocks, and keeps an online softmax
(running max, running sum, weighted sum of values) in fp32, so every key and value of the
sequence is read from memory exactly once per step, whatever the number of query heads. The loop
bound comes from `seq_lens` on the device, so the launch has the same shape every step and can be
captured in a CUDA graph.

On a machine with CUDA it is compiled; without one, the same kernel source runs in Triton's
interpreter (numpy) on CPU tensors, which is how CI checks it. `paged_decode_attention_reference`
is the same computation in plain torch (gather + softmax), which the tests compare it with.

Shapes: B = decode rows, H = query heads, KV = key/value heads, D = head dim, NB = block table
width, S = slots in the pool (num_blocks * block_size).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU Triton can only interpret kernels, and it must know before it is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton

    from engines.native.triton_kernels import paged_decode_kernel
except ImportError:  # installs without Triton: the runner then never selects the kernel
    triton = None


def _check_mode(device: torch.device) -> None:
    if device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "anything imports triton")


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor,
                                     v_cache: torch.Tensor, block_tables: torch.Tensor,
                                     seq_lens: torch.Tensor, *, block_size: int, scale: float,
                                     sliding_window: int = 0) -> torch.Tensor:
    """q [B, H, D], k/v_cache [S, KV, D], block_tables [B, NB], seq_lens [B] -> [B, H, D]."""
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    nb = block_tables.shape[1]
    length = nb * block_size
    slots = (block_tables.long()[:, :, None] * block_size
             + torch.arange(block_size, device=q.device)).view(b, length)  # [B, L]
    k = k_cache[slots].float()  # [B, L, KV, D]
    v = v_cache[slots].float()
    k = k.repeat_interleave(h // kvh, dim=2)  # [B, L, H, D]
    v = v.repeat_interleave(h // kvh, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k) * scale  # [B, H, L]
    pos = torch.arange(length, device=q.device)[None, :]  # [1, L]
    lens = seq_lens.long()[:, None]  # [B, 1]
    valid = pos < lens
    if sliding_window:
        valid &= pos >= lens - sliding_window
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    out = torch.einsum("bhl,blhd->bhd", scores.softmax(-1), v)  # [B, H, D]
    return out.to(q.dtype)


_compiled = None


def _kernel():
    global _compiled
    if _compiled is None:
        _compiled = triton.jit(paged_decode_kernel)
    return _compiled


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                           block_size: int, scale: float, sliding_window: int = 0) -> torch.Tensor:
    """q [B, H, D], k/v_cache [S, KV, D] (slot = block * block_size + offset), block_tables
    [B, NB] int, seq_lens [B] int (keys 0 .. len-1 are attended; each row's own key is already
    in the cache) -> [B, H, D] in q's dtype. Rows with seq_len 0 are not allowed."""
    if triton is None:
        raise RuntimeError("paged_decode_attention needs Triton (pip install triton)")
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    if h % kvh or block_size & (block_size - 1):
        raise ValueError(f"need H % KV == 0 and a power-of-two block size (H={h}, KV={kvh}, "
                         f"block_size={block_size})")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dim must be contiguous")
    _check_mode(q.device)
    out = torch.empty_like(q)
    group = h // kvh
    _kernel()[(b, kvh)](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        scale, sliding_window,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=_pow2(group),
        HEAD_DIM=d, DIM_PAD=_pow2(d),
        BLOCK_SIZE=block_size,
    )
    return out
