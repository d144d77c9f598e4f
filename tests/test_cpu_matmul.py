"""option.cpu_matmul: the native engine's unquantized CPU weights in oneDNN's blocked layout
(engines/native/quant.py OneDnnLinear, the default) or multiplied as plain tensors (torch).

- a weight packed once computes x @ W for any number of rows, to fp32 rounding;
- both paths give the same greedy tokens and log-probs (and the engine tests hold the default
  path token-for-token against transformers);
- the option is checked at startup, naming the key, the value and where it came from.
"""

import pytest
import torch
from tiny_models import make_tiny_llama

from engines.native.engine import NativeEngine
from engines.native.quant import OneDnnLinear, onednn_available
from engines.options import ConfigError, NativeOptions, Setting, parse_options
from engines.types import SamplingParams

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("cpu_matmul") / "llama"))


@pytest.mark.parametrize("rows", [1, 3, 32, 33, 300])
def test_one_packed_weight_serves_any_row_count(rows):
    torch.manual_seed(rows)
    w = torch.randn(192, 320) * 0.05  # [K, N] as the model stores it
    x = torch.randn(rows, 192)
    lin = OneDnnLinear(w)
    assert (lin.in_features, lin.out_features, lin.nbytes()) == (192, 320, 192 * 320 * 4)
    got = lin(x)
    assert got.shape == (rows, 320) and got.dtype == torch.float32
    want = (x.double() @ w.double()).float()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # A strided input (a column slice, as the engine's q/k/v views are) gives the same.
    wide = torch.cat([x, torch.randn(rows, 7)], dim=1)[:, :192]
    torch.testing.assert_close(lin(wide), got, atol=1e-6, rtol=1e-6)
    # bf16 weights: the input and the output rounded to bf16, fp32 in between.
    half = OneDnnLinear(w, torch.bfloat16)
    assert half.nbytes() == 192 * 320 * 2
    ref = x.bfloat16().float() @ w.bfloat16().float()
    torch.testing.assert_close(half(x), ref, atol=1e-2, rtol=8e-3)


def test_both_paths_give_the_same_tokens(tiny):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 61))]
    params = [SamplingParams(max_new_tokens=12, min_new_tokens=12)] * 3
    out = {}
    for path in ("onednn", "torch"):
        e = NativeEngine(tiny, dtype="fp32", device="cpu", num_blocks=64, block_size=4,
                         cpu_matmul=path)
        assert e.model.cpu_matmul == path
        assert isinstance(e.model.layers[0]["qkv"], OneDnnLinear) == (path == "onednn")
        out[path] = e.generate(prompts, params)
    # auto picks oneDNN where torch has it.
    auto = NativeEngine(tiny, dtype="fp32", device="cpu", num_blocks=64, block_size=4)
    assert auto.model.cpu_matmul == "onednn"
    for a, b in zip(out["onednn"], out["torch"]):
        assert a.token_ids == b.token_ids
        for ta, tb in zip(a.tokens, b.tokens):
            assert abs(ta.log_prob - tb.log_prob) < 1e-4


def test_option_is_checked_at_startup(tiny):
    src = "serving.properties"
    opts = parse_options(NativeOptions, {"option.cpu_matmul": Setting("torch", src)},
                         max_rolling_batch_size=8)
    assert opts.engine_kwargs()["cpu_matmul"] == "torch"
    assert "cpu_matmul" not in parse_options(NativeOptions, {}, max_rolling_batch_size=8
                                             ).engine_kwargs()
    with pytest.raises(ConfigError) as e:
        parse_options(NativeOptions, {"option.cpu_matmul": Setting("mkl", src)},
                      max_rolling_batch_size=8)
    assert "option.cpu_matmul" in str(e.value) and "mkl" in str(e.value) and src in str(e.value)
    # oneDNN asked for where it cannot serve: fp16 weights.
    with pytest.raises(ValueError, match="option.cpu_matmul=onednn needs .* fp32 or bf16"):
        NativeEngine(tiny, dtype="fp16", device="cpu", num_blocks=16, cpu_matmul="onednn")
