"""The paged-attention decode kernel (engines/native/paged_attention.py) against the same
computation in plain torch, in Triton's interpreter on CPU (compiled when CUDA is present); and
the CUDA-graph batch buckets."""

import pytest
import torch

from engines.native.cuda_graphs import bucket_sizes
from engines.native.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
)

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(*, heads, kv_heads, head_dim, block_size, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    kv_shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache = torch.randn(kv_shape, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(kv_shape, generator=g).to(DEVICE, dtype)
    width = max(-(-n // block_size) for n in lens)
    # Each row's blocks are scattered over the pool, in no order.
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens])
    # q as the model makes it: the first columns of a fused qkv row, so rows are strided.
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q = qkv[:, :heads * head_dim].view(len(lens), heads, head_dim)
    return (q, k_cache, v_cache, tables.to(DEVICE, torch.int32),
            torch.tensor(lens, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 32), (32, 8, 80)])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("window", [0, 5])
def test_kernel_matches_reference_fp32(heads, kv_heads, head_dim, block_size, window):
    lens = [1, block_size, block_size + 1, 3 * block_size - 2, 45]
    q, k, v, tables, seq_lens = case(heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                     block_size=block_size, lens=lens, dtype=torch.float32)
    kw = dict(block_size=block_size, scale=head_dim ** -0.5, sliding_window=window)
    got = paged_decode_attention(q, k, v, tables, seq_lens, **kw)
    want = paged_decode_attention_reference(q, k, v, tables, seq_lens, **kw)
    assert got.shape == (len(lens), heads, head_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_matches_reference_fp16_and_long_rows():
    lens = [200, 7, 129]
    q, k, v, tables, seq_lens = case(heads=8, kv_heads=2, head_dim=64, block_size=16, lens=lens,
                                     dtype=torch.float16, seed=1)
    kw = dict(block_size=16, scale=0.125)
    got = paged_decode_attention(q, k, v, tables, seq_lens, **kw)
    want = paged_decode_attention_reference(q, k, v, tables, seq_lens, **kw)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def test_kernel_rejects_shapes_it_cannot_run():
    q, k, v, tables, seq_lens = case(heads=6, kv_heads=4, head_dim=32, block_size=8, lens=[3],
                                     dtype=torch.float32)
    with pytest.raises(ValueError, match="H % KV"):
        paged_decode_attention(q, k, v, tables, seq_lens, block_size=8, scale=1.0)


def test_graph_buckets_cover_every_batch_size_with_little_padding():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and bucket_sizes(256)[-1] == 256
    for max_batch in (1, 5, 32, 100, 256):
        sizes = bucket_sizes(max_batch)
        for b in range(1, max_batch + 1):
            size = next(s for s in sizes if s >= b)
            assert size - b < max(16, b)


def test_options_choose_attention_and_graphs(tmp_path):
    from tiny_models import make_tiny_llama

    from engines.selection import choose_engine

    path = str(make_tiny_llama(tmp_path / "llama"))
    choice = choose_engine(path, {"attention_backend": "triton", "enforce_eager": "true"},
                           cuda=True)
    assert choice.kwargs["attention_backend"] == "triton"
    assert choice.kwargs["cuda_graphs"] is False
    assert "cuda_graphs" not in choose_engine(path, {"enforce_eager": "false"}, cuda=True).kwargs
    with pytest.raises(ValueError, match=r"option.attention_backend='flash' is not one of auto"):
        choose_engine(path, {"attention_backend": "flash"}, cuda=True)
    with pytest.raises(ValueError, match=r"option.enforce_eager='yes' is not true or false"):
        choose_engine(path, {"enforce_eager": "yes"}, cuda=True)
