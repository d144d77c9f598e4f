"""Triton kernel source for paged_attention.py (kept apart: Triton reads the annotations of a
kernel's parameters at run time, so this module must not use `from __future__ import
annotations`, and it imports only where Triton is installed). Undecorated: paged_attention.py
applies triton.jit once it has chosen between compiling and interpreting."""

import triton.language as tl


def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
    scale, window,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_tb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + row)

    g = tl.arange(0, GROUP_PAD)  # this KV head's query heads
    d = tl.arange(0, DIM_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G, D]

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores
    s = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)  # running sum of exp(score - m) * v

    first = 0
    if window > 0:
        first = tl.maximum(seq_len - window, 0)
    offs = tl.arange(0, BLOCK_SIZE)
    for blk in range(first // BLOCK_SIZE, tl.cdiv(seq_len, BLOCK_SIZE)):
        block_id = tl.load(tables_ptr + row * stride_tb + blk).to(tl.int64)
        pos = blk * BLOCK_SIZE + offs  # [BS]
        ok = (pos < seq_len) & (pos >= first)
        slots = block_id * BLOCK_SIZE + offs
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BS, D]
        v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BS, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, BS]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # [G]
        p = tl.exp(scores - m_new[:, None])  # [G, BS]
        alpha = tl.exp(m - m_new)  # [G]; exp(-inf) = 0 on the first block
        s = s * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [G, D]
        m = m_new

    out = acc / s[:, None]
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
