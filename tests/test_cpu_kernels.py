"""The native engine's C++ CPU decode attention (engines/native/csrc/decode_attention.cpp),
option.attention_backend=cpp, the CPU default where it builds.

- the op against a float64 softmax(q k^T) v: GQA, strided queries, rows of different lengths
  (1 up to the whole capacity), a sliding window, fp32 and bf16 buffers;
- bad arguments are errors naming the argument, not a crash;
- the engine gives the same greedy tokens and log-probs with the kernel as with torch's ops
  (and test_native_engine holds the default, the kernel, against transformers);
- where the kernel cannot be built, auto falls back to torch and `cpp` fails at startup with
  the reason.
"""

import shutil

import pytest
import torch
from tiny_models import make_tiny_llama, make_tiny_mistral

from engines.native import cpu_kernels
from engines.native.engine import NativeEngine
from engines.types import SamplingParams

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                 reason="no C++ compiler to build the kernels with")]


@pytest.fixture(scope="module")
def ops():
    ops = cpu_kernels.load()
    assert ops is not None, cpu_kernels.error()
    return ops


def reference(q, kbuf, vbuf, lens, scale, window):
    """float64, row by row: [B, H, D]."""
    b_, h, d = q.shape
    g = h // kbuf.shape[1]
    out = []
    for b in range(b_):
        n = int(lens[b])
        lo = max(0, n - window) if window else 0
        k = kbuf[b, :, :, lo:n].double().transpose(-1, -2).repeat_interleave(g, 0)  # [H, n, D]
        v = vbuf[b, :, lo:n].double().repeat_interleave(g, 0)  # [H, n, D]
        s = torch.einsum("hd,hnd->hn", q[b].double(), k) * scale
        out.append(torch.einsum("hn,hnd->hd", s.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
def test_op_matches_softmax_attention(ops, dtype, window):
    torch.manual_seed(0)
    b, kv, g, d, cap = 6, 2, 3, 32, 50
    kbuf = torch.randn(b, kv, d, cap).to(dtype)  # keys transposed, as the engine keeps them
    vbuf = torch.randn(b, kv, cap, d).to(dtype)
    q = torch.randn(b, kv * g + 4, d).to(dtype)[:, :kv * g]  # a strided view, as in the model
    lens = torch.tensor([1, 2, 17, 33, 49, 50])
    got = ops.decode_attention(q, kbuf, vbuf, lens, 0.2, window)
    assert got.shape == (b, kv * g, d) and got.dtype == dtype
    want = reference(q, kbuf, vbuf, lens, 0.2, window)
    tol = 2e-6 if dtype == torch.float32 else 1e-2  # bf16: the output is rounded to bf16
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_large_scores_do_not_overflow(ops):
    # Scores in the hundreds: the max-subtracted exp keeps the softmax finite and exact.
    kbuf = torch.full((1, 1, 4, 8), 10.0)
    vbuf = torch.arange(32, dtype=torch.float32).view(1, 1, 8, 4)
    q = torch.full((1, 1, 4), 10.0)
    kbuf[..., 3] = 10.5  # one key scores 20 above the rest (400): e^-20, all the weight
    got = ops.decode_attention(q, kbuf, vbuf, torch.tensor([8]), 1.0, 0)
    torch.testing.assert_close(got[0, 0], vbuf[0, 0, 3], atol=1e-5, rtol=0)


def test_bad_arguments_name_what_is_wrong(ops):
    kbuf, vbuf = torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 8, 4)
    q = torch.zeros(2, 2, 4)
    with pytest.raises(RuntimeError, match=r"lens\[1\] = 9 outside \[1, 8\]"):
        ops.decode_attention(q, kbuf, vbuf, torch.tensor([3, 9]), 1.0, 0)
    with pytest.raises(RuntimeError, match="lens must be int64"):
        ops.decode_attention(q, kbuf, vbuf, torch.tensor([3, 4], dtype=torch.int32), 1.0, 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.decode_attention(q.bfloat16(), kbuf, vbuf, torch.tensor([3, 4]), 1.0, 0)
    with pytest.raises(RuntimeError, match="disagree"):
        ops.decode_attention(q, kbuf, torch.zeros(2, 1, 4, 8), torch.tensor([3, 4]), 1.0, 0)


@pytest.mark.parametrize("name", ["llama", "mistral"])  # GQA; a sliding window of 16
def test_engine_same_tokens_with_kernel_and_torch(tmp_path, ops, name):
    path = (make_tiny_llama(tmp_path / name) if name == "llama"
            else make_tiny_mistral(tmp_path / name, sliding_window=16, num_kv_heads=4))
    prompts = [list(range(5, 12)), [13, 14, 15], list(range(20, 60))]
    params = [SamplingParams(max_new_tokens=24, min_new_tokens=24)] * 3
    out = {}
    for backend in ("cpp", "torch"):
        e = NativeEngine(str(path), dtype="fp32", device="cpu", num_blocks=96, block_size=4,
                         attention_backend=backend)
        assert e.runner.attention == backend
        assert (e.model.decode_kernel is not None) == (backend == "cpp")
        out[backend] = e.generate(prompts, params)
    for a, b in zip(out["cpp"], out["torch"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.log_prob - y.log_prob) for x, y in zip(a.tokens, b.tokens)) < 1e-4


def test_without_the_kernel_auto_falls_back_and_cpp_fails(tmp_path, monkeypatch):
    path = str(make_tiny_llama(tmp_path / "llama"))
    monkeypatch.setattr(cpu_kernels, "_state", {"ops": None, "error": "CalledProcessError: no c++"})
    e = NativeEngine(path, dtype="fp32", device="cpu", num_blocks=16, block_size=4)
    assert e.runner.attention == "torch" and e.model.decode_kernel is None
    with pytest.raises(ValueError, match="option.attention_backend=cpp needs .*no c\\+\\+"):
        NativeEngine(path, dtype="fp32", device="cpu", num_blocks=16, block_size=4,
                     attention_backend="cpp")


def test_cpp_refuses_fp16(tmp_path, ops):
    path = str(make_tiny_llama(tmp_path / "llama"))
    with pytest.raises(ValueError, match="option.attention_backend=cpp needs a CPU device, fp32 "
                                         "or bf16"):
        NativeEngine(path, dtype="fp16", device="cpu", num_blocks=16, block_size=4,
                     attention_backend="cpp")


@pytest.mark.parametrize("rows", [1, 2, 6, 7, 13, 32])
def test_int8_linear_matches_its_dequantized_weight(ops, rows):
    from engines.native.quant import Int8Linear

    torch.manual_seed(rows)
    w = torch.randn(96, 150) * 0.05  # [K, N]; N not a multiple of the 64-channel panels
    lin = Int8Linear(w)
    assert lin.kernel is not None and lin.q.shape == (3, 96, 64)
    x = torch.randn(rows, 96)
    want = (x.double() @ lin.dequantized().double())
    torch.testing.assert_close(lin(x).double(), want, atol=1e-5, rtol=1e-5)
    # bf16 activations: fp32 arithmetic, the output rounded to bf16.
    got = lin(x.bfloat16())
    assert got.dtype == torch.bfloat16
    want_b = x.bfloat16().double() @ lin.dequantized().double()
    torch.testing.assert_close(got.double(), want_b, atol=2e-2, rtol=1e-2)
    # The rounding is per-channel int8: within half a step of the weight.
    step = w.abs().amax(0) / 127
    assert ((lin.dequantized() - w).abs() <= step / 2 + 1e-7).all()


def test_int8_kernel_and_torch_fallback_agree(monkeypatch):
    from engines.native import quant

    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.05, torch.randn(3, 64)
    fast = quant.Int8Linear(w)
    monkeypatch.setattr(cpu_kernels, "op", lambda device, name: None)
    slow = quant.Int8Linear(w)
    assert fast.kernel is not None and slow.kernel is None
    torch.testing.assert_close(fast.dequantized(), slow.dequantized(), atol=1e-7, rtol=0)
    torch.testing.assert_close(fast(x), slow(x), atol=1e-4, rtol=1e-4)


def test_int8_linear_bad_arguments(ops):
    q, s = torch.zeros(2, 8, 64, dtype=torch.int8), torch.zeros(128)
    with pytest.raises(RuntimeError, match=r"x is \[1, 9\], q \[2, 8, 64\]"):
        ops.int8_linear(torch.zeros(1, 9), q, s, 100)
    with pytest.raises(RuntimeError, match="n = 60"):  # 60 channels fit in one panel, not two
        ops.int8_linear(torch.zeros(1, 8), q, s, 60)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.int8_linear(torch.zeros(1, 8, dtype=torch.float16), q, s, 100)


def hf_rms_norm(x, w, eps):
    """transformers' LlamaRMSNorm, as the reference."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_ops_match_transformers(ops, dtype):
    torch.manual_seed(3)
    x = (torch.randn(37, 96) * 3).to(dtype)
    w = (torch.randn(96) * 0.1 + 1).to(dtype)
    delta = torch.randn(37, 96).to(dtype)
    # bf16: the same up to one rounding step, where the fp32 sums round differently.
    tol = {"atol": 2e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), hf_rms_norm(x, w, 1e-5), **tol)
    # A strided input (rows of a wider tensor) reads the right elements.
    wide = torch.cat([x, x], dim=1)[:, :96]
    torch.testing.assert_close(ops.rms_norm(wide, w, 1e-5), hf_rms_norm(x, w, 1e-5), **tol)
    # add_rms_norm_: the residual add is exactly torch's, in place; the norm of the sum.
    xs = x.clone()
    h = ops.add_rms_norm_(xs, delta, w, 1e-5)
    assert torch.equal(xs, x + delta)
    torch.testing.assert_close(h, hf_rms_norm(x + delta, w, 1e-5), **tol)
    with pytest.raises(RuntimeError, match="both be fp32 or both bf16"):
        ops.rms_norm(x, w.half(), 1e-5)
    with pytest.raises(RuntimeError, match="delta must match x"):
        ops.add_rms_norm_(xs, delta[:3], w, 1e-5)


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 32])
def test_int4_linear_matches_its_dequantized_weight(ops, group, rows):
    from engines.native.quant import Int4Linear

    torch.manual_seed(rows + group)
    k, n = 128, 150  # N not a multiple of the 64-channel panels
    w = torch.randn(k, n) * 0.05
    lin = Int4Linear(w, group)
    assert lin.kernel is not None and lin.packed.shape == (3, k, 32)
    # The quantization, written out: per (channel, group) minimum and range / 15.
    wg = w.t().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    deq = (q * scale[..., None] + lo[..., None]).reshape(n, k).t()  # [K, N]
    assert ((deq - w).abs() <= scale.repeat_interleave(group, 1).t() / 2 + 1e-6).all()
    x = torch.randn(rows, k)
    torch.testing.assert_close(lin(x).double(), x.double() @ deq.double(), atol=1e-5, rtol=1e-5)
    got = lin(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), x.bfloat16().double() @ deq.double(), atol=2e-2,
                               rtol=1e-2)


def test_int4_kernel_and_torch_fallback_agree(monkeypatch):
    from engines.native import quant

    torch.manual_seed(1)
    w, x = torch.randn(64, 128) * 0.05, torch.randn(3, 64)
    fast = quant.Int4Linear(w, 32)
    monkeypatch.setattr(cpu_kernels, "op", lambda device, name: None)
    slow = quant.Int4Linear(w, 32)
    assert fast.kernel is not None and slow.kernel is None
    torch.testing.assert_close(fast(x), slow(x), atol=1e-4, rtol=1e-4)
