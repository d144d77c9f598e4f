"""Tensor parallelism in the native engine: two ranks under a real `mpirun` (gloo on CPU) give
token for token what one process gives, on tiny random Llama-family models whose heads split
over 2 ranks (8 query heads, 4 KV heads): untied and tied embeddings, vocabularies that do and
do not divide by 2 (a padded vocab shard), Qwen2 q/k/v biases, chunked prefill, requests added
while others generate, prompt log-probs. Models whose heads do not split are refused by name.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_lora, make_tiny_model, make_tiny_qwen2
from tp_scripts.native_tp_run import run_case

from engines.native.engine import NativeEngine
from engines.native.loop import start_native_engine
from engines.selection import choose_engine

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "tp_scripts" / "native_tp_run.py"
HEADS = {"num_heads": 8, "num_kv_heads": 4}


def _workload(seed: int, n: int, *, vocab: int) -> tuple[list[list[int]], list[dict]]:
    """Prompts of 3..40 tokens; every other request runs to max_new_tokens, the others may
    stop on EOS; the first also asks for prompt log-probs."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))])
        new = rng.randint(4, 24)
        params.append({"max_new_tokens": new, "min_new_tokens": new if i % 2 else 0,
                       "decoder_input_details": i == 0, "top_n_tokens": 2 if i == 1 else 0})
    return prompts, params


def _cases(root: Path) -> list[dict]:
    models = {
        # untied, V = 383: the second rank's vocab shard is padded
        "llama": make_tiny_model(root / "llama", vocab_size=383, seed=4, **HEADS),
        "llama-tied": make_tiny_model(root / "llama-tied", vocab_size=301, seed=5,
                                      tie_word_embeddings=True, **HEADS),
        "qwen2": make_tiny_qwen2(root / "qwen2", **HEADS),  # tied, q/k/v biases, V = 384
    }
    base = {"dtype": "fp32", "device": "cpu", "block_size": 4, "num_blocks": 256}
    cases = []
    for i, (name, path) in enumerate(models.items()):
        vocab = {"llama": 383, "llama-tied": 301, "qwen2": 384}[name]
        prompts, params = _workload(seed=i, n=6, vocab=vocab)
        cases.append({"name": f"{name}-batch", "model_dir": str(path), "engine": base,
                      "prompts": prompts, "params": params})
    # Chunked prefill (8 tokens a step) and requests joining a running batch.
    for name in ("llama", "qwen2"):
        prompts, params = _workload(seed=10, n=6, vocab=301)
        for p in params[:3]:  # the first wave outlives the moment the second joins
            p.update(max_new_tokens=24, min_new_tokens=24)
        cases.append({"name": f"{name}-chunked-staggered", "model_dir": str(models[name]),
                      "engine": {**base, "max_num_batched_tokens": 8}, "prompts": prompts,
                      "params": params, "stagger": 3})
    # LoRA: A and B sharded like the weights they modify (column-parallel q/k/v/gate/up: B's
    # rows; row-parallel o/down: A's columns); 3 adapters in 2 slots, so the followers load
    # their shards again when a slot is reused.
    for name in ("llama", "qwen2"):
        adapters = {
            "qkv": make_tiny_lora(models[name], root / f"{name}-qkv", r=8, seed=1,
                                  targets=("q_proj", "k_proj", "v_proj")),
            "od": make_tiny_lora(models[name], root / f"{name}-od", r=16, alpha=32, seed=2,
                                 targets=("o_proj", "down_proj")),
            "all": make_tiny_lora(models[name], root / f"{name}-all", r=8, seed=3,
                                  use_rslora=True),
        }
        vocab = {"llama": 383, "qwen2": 384}[name]
        prompts, params = _workload(seed=20, n=8, vocab=vocab)
        cases.append({"name": f"{name}-lora", "model_dir": str(models[name]),
                      "engine": {**base, "enable_lora": True, "max_loras": 2},
                      "prompts": prompts, "params": params,
                      "adapters": {k: str(v) for k, v in adapters.items()},
                      "which": [None, "qkv", "od", "all"] * 2})
    return cases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(case: dict) -> list[dict]:
    loop = start_native_engine(case["model_dir"], **case["engine"])
    try:
        return run_case(loop, case)
    finally:
        loop.shutdown()


def test_tp2_matches_tp1_token_for_token(tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun (OpenMPI) is not installed: the TP test launches 2 real ranks")
    cases = _cases(tmp_path / "models")
    cases_path = tmp_path / "cases.json"
    cases_path.write_text(json.dumps(cases))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", "PYTHONPATH", "-x", "HF_HUB_OFFLINE=1", "-x", "OMP_NUM_THREADS=1",
           sys.executable, str(SCRIPT), str(cases_path), str(out), str(_free_port())]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    started = time.monotonic()
    # The 2 ranks run while this process computes the TP=1 reference.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = [_reference(c) for c in cases]
    finally:
        torch.set_num_threads(saved)
    try:
        log, _ = proc.communicate(timeout=max(10.0, 120 - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"the TP ranks did not finish:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-8000:]
    got = json.loads((out / "results.json").read_text())
    assert json.loads((out / "rank0.json").read_text()) == ["led"] * len(cases)
    # Rank 1 came back from follow() after every engine's shutdown.
    assert json.loads((out / "rank1.json").read_text()) == ["followed"] * len(cases)
    for case, g_case, w_case in zip(cases, got, want, strict=True):
        for i, (g, w) in enumerate(zip(g_case, w_case, strict=True)):
            where = f"{case['name']} request {i}"
            assert g["token_ids"] == w["token_ids"], where
            assert g["finish_reason"] == w["finish_reason"], where
            assert g["log_probs"] == pytest.approx(w["log_probs"], abs=1e-4), where
            if w["prefill_log_probs"] is None:
                assert g["prefill_log_probs"] is None, where
            else:
                assert g["prefill_log_probs"][0] is None
                assert g["prefill_log_probs"][1:] == pytest.approx(
                    w["prefill_log_probs"][1:], abs=1e-4), where
        if case.get("which"):  # LoRA through TP=2 is PEFT's adapter merged into the base
            from test_lora_native import greedy_with_logprobs, reference

            for i, (g, name) in enumerate(zip(g_case, case["which"])):
                p = case["params"][i]
                if p["min_new_tokens"] != p["max_new_tokens"]:
                    continue  # may stop at EOS: compared with TP=1 above
                ids, lps = greedy_with_logprobs(
                    reference(case["model_dir"], case["adapters"][name] if name else None),
                    case["prompts"][i], p["max_new_tokens"])
                assert g["token_ids"] == ids, f"{case['name']} request {i}"
                # PEFT's merged weights (W + BA rounded once) against the deltas added to each
                # matmul's output, over 21 tokens of fp32 in a different op order: 2e-4.
                assert g["log_probs"] == pytest.approx(lps, abs=2e-4)


def test_heads_that_do_not_split_are_refused(tmp_path):
    """SmolLM2's shape: 3 KV heads cannot be split over 2 ranks. The engine (before it needs a
    process group) and engine selection both say which number and what to set instead."""
    # SmolLM2-135M's config: the check runs before any weight or tokenizer is read.
    path = tmp_path / "smollm2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"num_key_value_heads=3 is not divisible by "
                                         r"tensor_parallel_degree=2.*one of \[1, 3\]"):
        NativeEngine(str(path), dtype="fp32", device="cpu", num_blocks=8, tp_size=2)
    with pytest.raises(ValueError, match="num_key_value_heads=3 is not divisible"):
        choose_engine(str(path), {"tensor_parallel_degree": "2"}, cuda=False)
    # The hf engine cannot shard either: TP > 1 never falls back to it.
    with pytest.raises(ValueError, match="tensor_parallel_degree=2 needs the native engine"):
        choose_engine(str(path), {"tensor_parallel_degree": "2", "rolling_batch": "disable"},
                      cuda=False)
    assert choose_engine(str(path), {"tensor_parallel_degree": "1"}, cuda=False).kwargs.get(
        "tp_size") is None


def test_tp1_makes_no_distributed_calls(tmp_path, monkeypatch):
    """Without TP the engine never touches torch.distributed (no group needed, no overhead)."""
    import torch.distributed as dist

    def forbidden(*a, **k):
        raise AssertionError("torch.distributed used at tensor_parallel_degree=1")

    path = make_tiny_model(tmp_path / "llama", **HEADS)
    for name in ("all_reduce", "broadcast_object_list", "gather", "barrier", "new_group",
                 "init_process_group"):
        monkeypatch.setattr(dist, name, forbidden)
    loop = start_native_engine(str(path), dtype="fp32", device="cpu", num_blocks=64,
                               block_size=4)
    try:
        prompts, params = _workload(seed=1, n=3, vocab=384)
        assert len(run_case(loop, {"prompts": prompts, "params": params, "stagger": 1})) == 3
    finally:
        loop.shutdown()
