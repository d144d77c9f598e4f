"""The gathered multi-LoRA kernels (engines/native/lora_kernels.py) against the same computation
in plain torch, in Triton's interpreter on CPU (compiled when CUDA is present): mixed adapter
slots in one batch, rows without an adapter left byte for byte as they were, strided rows,
ranks that are not powers of two, and a capture in a CUDA graph where CUDA is present."""

import pytest
import torch

from engines.native.lora_kernels import lora_delta, lora_delta_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Repeated slots, rows without an adapter (0) at the ends and in the middle, slot 1 unused.
SLOTS = [2, 0, 3, 2, 0, 4, 2]


def case(*, n_in, n_out, rank, dtype, slots=SLOTS, num_slots=5, seed=0, pad=24):
    g = torch.Generator().manual_seed(seed)
    t = len(slots)
    # x as the model makes it: the first columns of a wider row, so rows are strided.
    x = torch.randn(t, n_in + pad, generator=g)[:, :n_in].to(DEVICE, dtype)
    a = (torch.randn(num_slots, n_in, rank, generator=g) * n_in ** -0.5).to(DEVICE, dtype)
    b = (torch.randn(num_slots, rank, n_out, generator=g) * rank ** -0.5).to(DEVICE, dtype)
    # Slot 0 is "no adapter": poison it, so reading it anywhere would show.
    a[0] = float("nan")
    b[0] = float("nan")
    out = torch.randn(t, n_out, generator=g).to(DEVICE, dtype)
    row_slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    return x, a.contiguous(), b.contiguous(), row_slots, out


def check(x, a, b, row_slots, out, *, atol, rtol, **kw):
    before = out.clone()
    want = lora_delta_reference(x, a, b, row_slots, out.clone())
    got = lora_delta(x, a, b, row_slots, out, **kw)
    assert got is out and got.dtype == x.dtype
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    idle = row_slots == 0
    assert torch.equal(got[idle].view(torch.uint8), before[idle].view(torch.uint8))
    assert not torch.equal(got[~idle], before[~idle])
    return got


@pytest.mark.parametrize("n_in,n_out", [(64, 96), (576, 960), (1536, 576)])
@pytest.mark.parametrize("rank", [8, 16, 48])
def test_kernel_matches_reference_fp32(n_in, n_out, rank):
    x, a, b, row_slots, out = case(n_in=n_in, n_out=n_out, rank=rank, dtype=torch.float32)
    check(x, a, b, row_slots, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_in,n_out,rank", [(576, 960, 24), (1536, 576, 16)])
def test_kernel_matches_reference_half(dtype, n_in, n_out, rank):
    x, a, b, row_slots, out = case(n_in=n_in, n_out=n_out, rank=rank, dtype=dtype, seed=1)
    # Both sum in fp32 and round once; they differ by fp32 summation order, so by at most one
    # rounding step of the output's dtype.
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    check(x, a, b, row_slots, out, atol=tol, rtol=tol)


def test_int64_slots_given_scratch_and_strided_out():
    x, a, b, row_slots, _ = case(n_in=200, n_out=72, rank=12, dtype=torch.float32,
                                 slots=[1, 1, 0, 3, 1], num_slots=4, seed=2)
    # out as a slice of a fused projection's output (q of qkv): strided rows.
    fused = torch.randn(5, 72 + 40, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = fused[:, :72]
    tail = fused[:, 72:].clone()
    scratch = torch.full((5, 12), float("nan"), device=DEVICE)
    check(x, a, b, row_slots.long(), out, atol=1e-5, rtol=1e-5, scratch=scratch)
    assert torch.equal(fused[:, 72:], tail)


def test_batch_without_adapters_is_untouched():
    x, a, b, row_slots, out = case(n_in=64, n_out=96, rank=8, dtype=torch.float32,
                                   slots=[0, 0, 0])
    before = out.clone()
    assert lora_delta(x, a, b, row_slots, out) is out
    assert torch.equal(out.view(torch.uint8), before.view(torch.uint8))
    empty = x[:0], a, b, row_slots[:0], out[:0]
    assert lora_delta(*empty).shape == (0, 96)


def test_reference_is_the_per_row_formula():
    x, a, b, row_slots, out = case(n_in=40, n_out=24, rank=6, dtype=torch.float32)
    want = out.clone()
    for t, s in enumerate(SLOTS):
        if s:
            want[t] += (x[t] @ a[s]) @ b[s]
    got = lora_delta_reference(x, a, b, row_slots, out)
    assert got is out
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_inputs_it_cannot_run():
    x, a, b, row_slots, out = case(n_in=64, n_out=96, rank=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="shapes do not agree"):
        lora_delta(x, a[:, :32], b, row_slots, out)
    with pytest.raises(ValueError, match="out is"):
        lora_delta(x, a, b, row_slots, out.double())
    with pytest.raises(ValueError, match="int32 or int64"):
        lora_delta(x, a, b, row_slots.float(), out)
    with pytest.raises(ValueError, match="unit column stride"):
        lora_delta(x.t().contiguous().t(), a, b, row_slots, out)
    with pytest.raises(ValueError, match="contiguous"):
        lora_delta(x, a.transpose(1, 2).contiguous().transpose(1, 2), b, row_slots, out)
    with pytest.raises(ValueError, match="scratch"):
        lora_delta(x, a, b, row_slots, out, scratch=torch.empty(len(SLOTS), 4, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_with_new_slots():
    x, a, b, row_slots, out = case(n_in=576, n_out=960, rank=16, dtype=torch.bfloat16)
    base = out.clone()
    scratch = torch.empty(len(SLOTS), 16, dtype=torch.float32, device=DEVICE)
    lora_delta(x, a, b, row_slots, out, scratch=scratch)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_delta(x, a, b, row_slots, out, scratch=scratch)
    for slots in ([4, 4, 0, 1, 3, 0, 2], [0] * 7, SLOTS):
        row_slots.copy_(torch.tensor(slots, dtype=torch.int32))
        out.copy_(base)
        graph.replay()
        want = lora_delta_reference(x, a, b, row_slots, base.clone())
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("widths", [(64, 32, 32), (96, 96)])
def test_parts_kernel_equals_the_block_diagonal_op(widths):
    """lora_delta_parts (one shrink with the fused A, one expand per part with its compact B)
    equals lora_delta with the equivalent block-diagonal B."""
    from engines.native.lora_kernels import lora_delta_parts

    g = torch.Generator().manual_seed(3)
    rank, n_in, num_slots = 8, 64, 5
    x = torch.randn(len(SLOTS), n_in, generator=g).to(DEVICE)
    a = torch.randn(num_slots, n_in, rank * len(widths), generator=g).to(DEVICE)
    parts = [torch.randn(num_slots, rank, w, generator=g).to(DEVICE) for w in widths]
    block = torch.zeros(num_slots, rank * len(widths), sum(widths), device=DEVICE)
    col = 0
    for j, (p, w) in enumerate(zip(parts, widths)):
        block[:, j * rank:(j + 1) * rank, col:col + w] = p
        col += w
    out = torch.randn(len(SLOTS), sum(widths), generator=g).to(DEVICE)
    row_slots = torch.tensor(SLOTS, dtype=torch.int32, device=DEVICE)
    want = lora_delta_reference(x, a, block, row_slots, out.clone())
    got = lora_delta_parts(x, a, parts, row_slots, out.clone())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], out[1])  # slot 0 rows untouched
