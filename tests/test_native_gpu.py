"""The native engine on CUDA: compiled paged-attention kernel and captured CUDA graphs, greedy
token-exact against transformers (fp32, on the CPU as the reference), log-probs within 1e-4.
Skipped without CUDA; run on a GPU machine with benchmarks/gpu_check.sh."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_engine_matches_hf_generate(tmp_path, name, graphs):
    from test_native_engine import MODELS, assert_log_probs_match, expected, workload

    from engines.native.engine import NativeEngine

    path = str(MODELS[name](tmp_path / name))
    prompts, params = workload(seed=3, n=16)
    engine = NativeEngine(path, dtype="fp32", device="cuda", block_size=16, num_blocks=256,
                          max_num_seqs=16, cuda_graphs=graphs)
    assert engine.runner.attention == "triton"
    assert (engine.runner.graphs is not None) == graphs
    if graphs:
        assert engine.runner.graphs.graphs, "no graph was captured"
    results = engine.generate(prompts, params)
    for prompt, p, r, want in zip(prompts, params, results, expected(path, prompts, params)):
        assert r.token_ids == want, (len(prompt), p)
        assert_log_probs_match(path, prompt, r, p)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
