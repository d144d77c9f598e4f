"""The `deepspeed` engine: DeepSpeed AutoTP with TP=2 under a real `mpirun -np 2` (gloo on CPU)
gives the same greedy tokens as the `hf` engine with TP=1, and every rank chooses the same
tokens (the lockstep the worker relies on), sampling without a seed included.

Skipped, with the reason, where deepspeed or mpirun is missing. Selection tests need neither.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from engines.contracts.engine import Capabilities, TPMode
from engines.selection import choose_engine
from engines.types import SamplingParams

SCRIPT = Path(__file__).parent / "ds_scripts" / "generate.py"
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MPIRUN = shutil.which("mpirun")

needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed "
                                     "(pip install -c constraints.txt deepspeed)")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun (OpenMPI) is not on PATH")

GREEDY_PROMPTS = ["Hello", "The capital of France is Paris. What is", "Once upon a time"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 4 query and 4 KV heads: AutoTP gives each of the 2 ranks 2 of each.
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-kv4"), num_kv_heads=4)


@pytest.fixture(scope="module")
def hf_engine(model_dir):
    from engines.hf.engine import HFEngine

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield HFEngine(str(model_dir), dtype="fp32", device="cpu")
    torch.set_num_threads(saved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tp(model_dir: Path, requests: list[dict], out_dir: Path, *, np: int = 2) -> list[dict]:
    """Run tests/ds_scripts/generate.py on `np` ranks; each rank's report, rank 0 first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_SIZE", None)  # keep DeepSpeed's CPU all-reduce on gloo (see the engine)
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np),
           sys.executable, str(SCRIPT), str(model_dir), str(out_dir), str(_free_port()),
           json.dumps(requests)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"mpirun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(np)]


# ---- TP=2 against TP=1 --------------------------------------------------------------------------


@needs_deepspeed
@needs_mpirun
def test_tp2_greedy_matches_hf_tp1_and_ranks_agree(model_dir, hf_engine, tmp_path):
    n = 12
    requests = [{"prompt": p, "params": {"max_new_tokens": n}} for p in GREEDY_PROMPTS]
    # Sampling: with a seed (same generator as on TP=1) and without (rank 0 draws, broadcasts).
    requests.append({"prompt": "Hello", "params": {"max_new_tokens": n, "do_sample": True,
                                                  "seed": 7}})
    requests.append({"prompt": "Hello", "params": {"max_new_tokens": n, "do_sample": True}})
    rank0, rank1 = run_tp(model_dir, requests, tmp_path)

    assert rank0["tp_size"] == rank1["tp_size"] == 2
    full_rows = hf_engine.model.model.layers[0].self_attn.q_proj.weight.shape[0]
    assert rank0["q_proj_rows"] == rank1["q_proj_rows"] == full_rows // 2, "not sharded"

    # Every rank produced the same tokens: the unseeded sample too, so the seed was shared.
    assert rank0["results"] == rank1["results"]
    assert rank0["stream"] == rank1["stream"]

    params = [SamplingParams(**r["params"]) for r in requests[:4]]
    expected = hf_engine.generate([r["prompt"] for r in requests[:4]], params)
    for got, want in zip(rank0["results"], expected):
        assert got["token_ids"] == want.token_ids
        assert got["text"] == want.text
        assert got["finish_reason"] == want.finish_reason.value
    # generate_stream gives what generate gave, for the deterministic requests.
    assert rank0["stream"][:4] == [r["token_ids"] for r in rank0["results"][:4]]


@pytest.mark.e2e
@needs_deepspeed
@needs_mpirun
def test_tp2_smollm2_matches_hf_tp1(tmp_path):
    """SmolLM2 has 9 query / 3 KV heads, which 2 ranks cannot split evenly: AutoTP gives the
    ranks uneven shares of whole KV groups (2 + 1 KV heads, 6 + 3 query heads)."""
    from engines.default_model import DefaultModelError, prepare_default_model
    from engines.hf.engine import HFEngine

    try:
        model = prepare_default_model(progress=False)
    except DefaultModelError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")

    prompt = "The capital of France is"
    rank0, rank1 = run_tp(model, [{"prompt": prompt, "params": {"max_new_tokens": 8}}], tmp_path)
    assert rank0["results"] == rank1["results"]
    assert sorted([rank0["q_proj_rows"], rank1["q_proj_rows"]]) == [192, 384]  # 3 and 6 heads
    expected = HFEngine(str(model), dtype="fp32", device="cpu").generate(
        [prompt], [SamplingParams(max_new_tokens=8)])[0]
    assert rank0["results"][0]["token_ids"] == expected.token_ids


@needs_deepspeed
def test_tp1_without_process_group_is_hf(model_dir, hf_engine):
    from engines.deepspeed import DeepSpeedEngine

    engine = DeepSpeedEngine(str(model_dir), dtype="fp32")
    # One rank: nothing to replicate to.
    assert engine.capabilities == Capabilities(max_concurrency=1, tp_mode=TPMode.NONE)
    assert engine.tp_size == 1
    params = [SamplingParams(max_new_tokens=10)] * len(GREEDY_PROMPTS)
    got = engine.generate(GREEDY_PROMPTS, params)
    want = hf_engine.generate(GREEDY_PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert engine.count_tokens("Hello") == hf_engine.count_tokens("Hello")
    assert engine.max_context == hf_engine.max_context
    assert engine.vocab_size == hf_engine.vocab_size


@needs_deepspeed
def test_tp_size_other_than_the_group_is_an_error(model_dir):
    from engines.deepspeed import DeepSpeedEngine

    with pytest.raises(ValueError, match="mpirun -np 2"):
        DeepSpeedEngine(str(model_dir), tp_size=2)


# ---- registry and selection (no deepspeed needed) -----------------------------------------------


def test_registry_imports_deepspeed_only_when_an_engine_is_built():
    code = ("import sys; from engines.registry import get_engine_class; "
            "cls = get_engine_class('DeepSpeed'); assert cls.capabilities.max_concurrency == 1; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("options, reason", [
    ({"engine": "DeepSpeed"}, "engine=DeepSpeed"),
    ({"engine": "DeepSpeed", "rolling_batch": "deepspeed"}, "option.rolling_batch=deepspeed"),
    ({"rolling_batch": "deepspeed"}, "option.rolling_batch=deepspeed"),
    ({"engine": "deepspeed", "batch_size": "4"}, "engine=DeepSpeed"),  # dynamic batching
])
def test_selection_picks_deepspeed(options, reason):
    choice = choose_engine("/no/model", {**options, "dtype": "fp16",
                                         "tensor_parallel_degree": "2"}, cuda=False)
    assert (choice.name, choice.kwargs, choice.reason) == (
        "deepspeed", {"dtype": "fp16", "tp_size": 2}, reason)


def test_selection_rejects_deepspeed_with_another_rolling_batch():
    with pytest.raises(ValueError, match="engine=DeepSpeed cannot run option.rolling_batch=vllm"):
        choose_engine("/no/model", {"engine": "DeepSpeed", "rolling_batch": "vllm"}, cuda=False)
