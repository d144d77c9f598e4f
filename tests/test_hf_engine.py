"""The `hf` engine against transformers itself, on a tiny random-weight Llama (CPU, no downloads).

Also the engine registry and the shared types, which must stay free of torch.
"""

import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_llama

from engines.hf.engine import HFEngine
from engines.registry import engine_names, get_engine_class
from engines.types import FinishReason, SamplingParams, ValidationError

PROMPTS = [
    "Hello",
    "The capital of France is Paris. What is the capital of France?",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine(str(model_dir), dtype="fp32", device="cpu")


def hf_greedy(engine: HFEngine, prompt_ids: list[list[int]], max_new_tokens: int, **kwargs):
    """model.generate on a left-padded batch; returns the generated ids per row, cut after EOS."""
    width = max(map(len, prompt_ids))
    pad = engine.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])  # [B, S]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])  # [B, S]
    eos = kwargs.pop("eos_token_id", sorted(engine.eos_token_ids))
    out = engine.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        **kwargs,
    )[:, width:]  # [B, N]
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    rows = []
    for row in out.tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


# ---- registry and types ----------------------------------------------------------------------


def test_registry_resolves_hf_lazily():
    assert get_engine_class("hf") is HFEngine
    assert get_engine_class(" HF ") is HFEngine
    assert "hf" in engine_names()


def test_registry_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown engine 'nope'.*known engines: .*hf"):
        get_engine_class("nope")


def test_registry_and_types_do_not_import_torch():
    code = (
        "import sys, engines, engines.registry, engines.types; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampling_params_defaults_and_validation():
    p = SamplingParams.from_request({})
    defaults = (p.max_new_tokens, p.do_sample, p.temperature, p.top_k, p.top_p)
    assert defaults == (30, False, 1.0, 0, 1.0)
    assert p.greedy
    assert SamplingParams.from_request({"stop_sequences": "x"}).stop_sequences == ("x",)
    with pytest.raises(ValidationError, match="unknown parameter.*'max_tokens'.*max_new_tokens"):
        SamplingParams.from_request({"max_tokens": 3})
    with pytest.raises(ValidationError, match="max_new_tokens must be an integer"):
        SamplingParams(max_new_tokens=True)
    assert FinishReason.EOS_TOKEN.value == "eos_token"


# ---- greedy ----------------------------------------------------------------------------------


def test_greedy_batch_matches_model_generate_token_for_token(engine):
    n = 16
    results = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=n)] * len(PROMPTS))
    prompt_ids = [engine.encode(p) for p in PROMPTS]
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS), "want different lengths"

    batched = hf_greedy(engine, prompt_ids, n)
    for result, ids, expected_batched in zip(results, prompt_ids, batched):
        # Left padding must not change a row: compare with the prompt generated alone too.
        (expected_alone,) = hf_greedy(engine, [ids], n)
        assert result.token_ids == expected_alone == expected_batched
        assert result.prompt_tokens == len(ids)
        assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if len(result.token_ids) == n:
            assert result.finish_reason is FinishReason.LENGTH


def test_result_does_not_depend_on_batch_mates(engine):
    alone = engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=8)])[0]
    batched = engine.generate(
        PROMPTS, [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=3),
                  SamplingParams(max_new_tokens=20)]
    )
    assert batched[0] == alone
    assert len(batched[1].token_ids) <= 3 and len(batched[2].token_ids) <= 20


def test_eos_stops_generation(engine):
    greedy = engine.generate([PROMPTS[2]], [SamplingParams(max_new_tokens=12)])[0].token_ids
    # Declare the 4th generated token to be EOS: generation must stop right after its first
    # occurrence, exactly where model.generate stops.
    eos = greedy[3]
    stop_at = greedy.index(eos)
    saved = engine.eos_token_ids
    engine.eos_token_ids = {eos}
    try:
        result = engine.generate([PROMPTS[2]], [SamplingParams(max_new_tokens=12)])[0]
    finally:
        engine.eos_token_ids = saved
    assert result.finish_reason is FinishReason.EOS_TOKEN
    assert result.token_ids == greedy[: stop_at + 1]
    (expected,) = hf_greedy(engine, [engine.encode(PROMPTS[2])], 12, eos_token_id=eos)
    assert expected == result.token_ids


def test_stop_sequence_stops_generation(engine):
    full = engine.generate([PROMPTS[1]], [SamplingParams(max_new_tokens=20)])[0]
    start = next(
        i for i in range(1, len(full.text) - 1) if full.text[i : i + 2].isascii()
        and full.text[i : i + 2].strip()
    )
    stop = full.text[start : start + 2]
    result = engine.generate(
        [PROMPTS[1]], [SamplingParams(max_new_tokens=20, stop_sequences=(stop,))]
    )[0]
    assert result.finish_reason is FinishReason.STOP_SEQUENCE
    assert result.text.endswith(stop)
    assert result.token_ids == full.token_ids[: len(result.token_ids)]


def test_max_new_tokens_and_context_limit(engine):
    assert engine.max_context == 256
    result = engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=5)])[0]
    assert len(result.token_ids) == 5 and result.finish_reason is FinishReason.LENGTH
    with pytest.raises(ValueError, match="context holds 256"):
        engine.generate(["Hello " * 300], [SamplingParams()])
    # A request asking for more than fits is cut at the context end, not an error.
    prompt = "Hello " * 60
    room = engine.max_context - engine.count_tokens(prompt)
    long = engine.generate([prompt], [SamplingParams(max_new_tokens=1000)])[0]
    assert 0 < room < 1000 and len(long.token_ids) <= room


# ---- sampling --------------------------------------------------------------------------------


def sample(engine, seed, prompts=PROMPTS[:1], **kwargs):
    params = SamplingParams(do_sample=True, max_new_tokens=20, seed=seed, **kwargs)
    return engine.generate(list(prompts), [params] * len(prompts))


def test_same_seed_same_text_and_different_seeds_differ(engine):
    first = sample(engine, 7)[0]
    assert sample(engine, 7)[0] == first
    # Batching with other requests must not disturb a row's random stream.
    assert sample(engine, 7, prompts=[PROMPTS[0], PROMPTS[1]])[0] == first
    assert sample(engine, 8)[0].token_ids != first.token_ids


def test_sampling_knobs(engine):
    greedy = engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=20)])[0]
    # Only one candidate survives top_k=1 (or a tiny top_p), so sampling becomes greedy.
    assert sample(engine, 3, top_k=1)[0].token_ids == greedy.token_ids
    assert sample(engine, 3, top_p=1e-6)[0].token_ids == greedy.token_ids
    assert sample(engine, 3, temperature=0.0)[0].token_ids == greedy.token_ids
    assert sample(engine, 3, temperature=0.7, top_k=50, top_p=0.9)[0].token_ids


def test_unseeded_sampling_runs(engine):
    assert len(sample(engine, None)[0].token_ids) > 0


# ---- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)],
)
def test_dtype_option(model_dir, dtype, expected):
    engine = HFEngine(str(model_dir), dtype=dtype, device="cpu")
    assert engine.dtype == expected
    assert next(engine.model.parameters()).dtype == expected
    result = engine.generate(PROMPTS[:2], [SamplingParams(max_new_tokens=4)] * 2)
    assert all(len(r.token_ids) >= 1 for r in result)


def test_bad_dtype_and_bad_dir(model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*auto, fp32, fp16, bf16"):
        HFEngine(str(model_dir), dtype="fp8")
    with pytest.raises(ValueError, match="no config.json"):
        HFEngine(str(tmp_path))


def test_chat_template(engine):
    text = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The template already carries BOS as text; encode must not add a second one.
    ids = engine.encode(text)
    assert ids.count(engine.tokenizer.bos_token_id) == 2  # one per <|im_start|>
