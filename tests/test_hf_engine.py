"""The `hf` engine against transformers itself, on a tiny random-weight Llama (CPU, no downloads).

Also the engine registry and the shared types, which must stay free of torch.
"""

import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from tiny_models import EOS, make_tiny_llama

from engines.detokenizer import TextStream
from engines.hf.engine import HFEngine
from engines.registry import engine_names, get_engine_class
from engines.types import FinishReason, SamplingParams, ValidationError

PROMPTS = [
    "Hello",
    "The capital of France is Paris. What is the capital of France?",
    "Once upon a time",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def assert_same_generation(got, expected):
    """Same tokens and text; log-probs equal up to the float noise that padding brings."""
    assert (got.token_ids, got.text, got.finish_reason) == (
        expected.token_ids,
        expected.text,
        expected.finish_reason,
    )
    got_lp = [t.log_prob for t in got.tokens]
    assert got_lp == pytest.approx([t.log_prob for t in expected.tokens], abs=1e-4)


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


# ---- greedy ----------------------------------------------------------------------------------


def test_engine_contract(engine):
    from engines.contracts.engine import Capabilities, Engine, TPMode

    assert isinstance(engine, Engine)
    assert engine.capabilities == Capabilities(max_concurrency=1, tp_mode=TPMode.NONE)
    engine.shutdown()
    engine.shutdown()  # idempotent, and the engine still serves
    assert engine.generate([[5, 6]], [SamplingParams(max_new_tokens=1)])[0].token_ids
    with pytest.raises(RuntimeError, match="no tensor parallelism"):
        engine.follow()


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
        PROMPTS,
        [
            SamplingParams(max_new_tokens=8),
            SamplingParams(max_new_tokens=3),
            SamplingParams(max_new_tokens=20),
        ],
    )
    assert_same_generation(batched[0], alone)
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
    assert_same_generation(sample(engine, 7, prompts=[PROMPTS[0], PROMPTS[1]])[0], first)
    assert_same_generation(sample(engine, 7, prompts=[PROMPTS[1], PROMPTS[0]])[1], first)
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


# ---- streaming -------------------------------------------------------------------------------


def run_stream(engine, prompts, params):
    """Run generate_stream, check the event invariants, and return the events per request."""
    events: list[list] = [[] for _ in prompts]
    running = set(range(len(prompts)))
    for step in engine.generate_stream(prompts, params):
        # One event per still-running request, in batch order.
        assert [e.index for e in step] == sorted(running)
        for event in step:
            events[event.index].append(event)
            if event.finish_reason is not None:
                running.discard(event.index)
    assert not running, "the stream ended with requests still running"
    for request_events, p in zip(events, params):
        assert 1 <= len(request_events) <= p.max_new_tokens
        assert all(e.finish_reason is None for e in request_events[:-1])
        assert request_events[-1].finish_reason is not None
        assert all(e.prefill is None for e in request_events[1:])
        assert (request_events[0].prefill is not None) == p.decoder_input_details
    return events


def check_stream_matches_generate(engine, prompts, params):
    """Streaming and generate agree: the streamed text pieces add up to the result text."""
    events = run_stream(engine, prompts, params)
    results = engine.generate(prompts, params)
    for request_events, result, p in zip(events, results, params):
        assert "".join(e.text for e in request_events) == result.text
        assert [e.token.id for e in request_events] == result.token_ids
        assert request_events[-1].finish_reason is result.finish_reason
        decoded = engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if result.finish_reason is FinishReason.STOP_SEQUENCE:
            # Cut right before a stop sequence, which the last token completed.
            assert decoded.startswith(result.text)
            rest = decoded[len(result.text) :]
            assert any(rest.startswith(s) for s in p.stop_sequences)
            assert not any(s in result.text for s in p.stop_sequences) or p.min_new_tokens
            before_last = engine.tokenizer.decode(result.token_ids[:-1], skip_special_tokens=True)
            assert not any(s in before_last[len(result.text) :] for s in p.stop_sequences), (
                p.stop_sequences,
                result.token_ids,
                before_last,
                result.text,
            )
        else:
            assert result.text == decoded
    return results


def test_stream_events_add_up_to_generate_across_many_requests(engine):
    """Property-style: varied prompts and parameters, every one streamed and collected."""
    rng = random.Random(1234)
    greedy = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=24)] * len(PROMPTS))
    texts = [r.text for r in greedy]
    prompts, params = [], []
    for case in range(24):
        i = rng.randrange(len(PROMPTS))
        text = texts[i]
        stops: tuple[str, ...] = ()
        if case % 3:
            # Stop sequences taken from the greedy text (so they do occur when sampling is off),
            # plus one that likely occurs somewhere: a single common character.
            # U+FFFD is left out: it stands for bytes not yet complete, which the stream holds
            # back, so the token that "completes" such a stop sequence is not well defined.
            size = rng.randint(1, 3)
            stop = rng.choice(
                [
                    text[j : j + size]
                    for j in range(len(text) - size)
                    if "\ufffd" not in text[j : j + size]
                ]
            )
            stops = (stop, rng.choice(" e"))
        params.append(
            SamplingParams(
                max_new_tokens=rng.randint(1, 24),
                do_sample=case % 2 == 1,
                seed=case,
                temperature=rng.choice([0.7, 1.0, 1.5]),
                top_k=rng.choice([0, 5, 50]),
                min_new_tokens=rng.choice([0, 0, 1, 3]) if case % 4 == 0 else 0,
                stop_sequences=stops,
                top_n_tokens=rng.choice([0, 2]),
                decoder_input_details=case % 5 == 0,
            )
        )
        prompts.append(PROMPTS[i] if case % 7 else engine.encode(PROMPTS[i]))
    # One big batch (requests finishing at different steps) and a few small ones.
    results = check_stream_matches_generate(engine, prompts, params)
    assert {r.finish_reason for r in results} >= {FinishReason.LENGTH, FinishReason.STOP_SEQUENCE}
    for start in range(0, len(prompts), 8):
        check_stream_matches_generate(engine, prompts[start : start + 3], params[start : start + 3])


def test_stop_sequence_cuts_the_text_before_it(engine):
    full = engine.generate([PROMPTS[1]], [SamplingParams(max_new_tokens=20)])[0]
    decoded = full.text
    # A clean ASCII stop sequence from the middle of the greedy text.
    start = next(
        i for i in range(len(decoded) // 2, len(decoded) - 2)
        if decoded[i : i + 2].isascii() and decoded[i : i + 2].strip()
    )  # fmt: skip
    stop = decoded[start : start + 2]
    params = SamplingParams(max_new_tokens=20, stop_sequences=(stop,))
    (result,) = check_stream_matches_generate(engine, [PROMPTS[1]], [params])
    assert result.finish_reason is FinishReason.STOP_SEQUENCE
    assert result.text == decoded[: decoded.find(stop)]
    assert result.token_ids == full.token_ids[: len(result.token_ids)]
    # The token that completed the stop sequence is the last one generated.
    assert stop in engine.tokenizer.decode(result.token_ids)
    assert stop not in engine.tokenizer.decode(result.token_ids[:-1])


def test_stream_holds_back_incomplete_characters(engine):
    # The byte-level tokenizer splits these characters into byte tokens: the stream must not
    # emit a half character, and must still emit each one once it completes.
    text = "héllo wörld € 😀"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text), "want multi-byte characters split across tokens"
    stream = TextStream(engine._decode)
    pieces = [stream.push(ids[: n + 1], final=n == len(ids) - 1)[0] for n in range(len(ids))]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_text_stream_stop_sequences_with_fake_tokens():
    vocab = ["He", "llo", " wo", "rld", "!", " S", "TOP", " more"]

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    def run(stops, ids, *, min_new_tokens=0):
        stream = TextStream(decode, stops, min_new_tokens=min_new_tokens)
        pieces = []
        for n in range(1, len(ids) + 1):
            piece, stopped = stream.push(ids[:n], final=n == len(ids))
            pieces.append(piece)
            if stopped:
                break
        assert "".join(pieces) == stream.text
        return pieces, stopped

    # " STOP" spans two tokens: " S" is held back, then dropped with the rest of the match.
    assert run((" STOP",), [0, 1, 5, 6, 7]) == (["He", "llo", "", ""], True)
    # A false start is released once it can no longer become the stop sequence.
    assert run((" STOP",), [0, 5, 2, 3]) == (["He", "", " S wo", "rld"], False)
    # Held-back text is flushed by the last token when no stop sequence completed.
    assert run((" STOP",), [0, 5]) == (["He", " S"], False)
    # The earliest of several stop sequences wins; the text ends before it.
    assert run(("rld", "wo"), [0, 1, 2, 3]) == (["He", "llo", " "], True)
    # Inside the first min_new_tokens tokens a stop sequence does not count.
    assert run(("llo",), [0, 1, 2, 1], min_new_tokens=2) == (["He", "llo", " wo", ""], True)
    assert run(("llo",), [0, 1, 2, 3], min_new_tokens=2) == (["He", "llo", " wo", "rld"], False)


# ---- log-probs -------------------------------------------------------------------------------


def reference_logits(engine, ids: list[int]) -> torch.Tensor:
    """Plain transformers forward over one unpadded sequence: [L, V] float32."""
    with torch.no_grad():
        return engine.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_log_probs_and_top_tokens_match_transformers(engine):
    params = SamplingParams(max_new_tokens=12, top_n_tokens=5, decoder_input_details=True)
    results = engine.generate(PROMPTS, [params] * len(PROMPTS))  # left padded batch
    for prompt, result in zip(PROMPTS, results):
        prompt_ids = engine.encode(prompt)
        # One pass over prompt + output gives every step's distribution.
        log_probs = reference_logits(engine, prompt_ids + result.token_ids).log_softmax(-1)
        n = len(prompt_ids)
        for step, (token, top) in enumerate(zip(result.tokens, result.top_tokens)):
            expected = log_probs[n - 1 + step]  # [V]
            assert token.log_prob == pytest.approx(expected[token.id].item(), abs=1e-4)
            assert token.text == engine.tokenizer.decode([token.id])
            values, ids = expected.topk(5)
            assert [t.id for t in top] == ids.tolist()
            assert [t.log_prob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
            assert [t.log_prob for t in top] == sorted((t.log_prob for t in top), reverse=True)
            assert top[0].id == token.id and top[0].log_prob == token.log_prob  # greedy
        # Prompt log-probs: token j given tokens < j; the first has none.
        assert [t.id for t in result.prefill] == prompt_ids
        assert result.prefill[0].log_prob is None
        expected_prefill = log_probs[torch.arange(n - 1), torch.tensor(prompt_ids[1:])]
        got_prefill = [t.log_prob for t in result.prefill[1:]]
        assert got_prefill == pytest.approx(expected_prefill.tolist(), abs=1e-4)


def test_special_tokens_are_flagged_and_keep_their_text(engine):
    eos_id = engine.tokenizer.eos_token_id
    prompt = engine.encode(PROMPTS[0]) + [eos_id]  # token ids may hold special tokens
    params = SamplingParams(max_new_tokens=2, decoder_input_details=True)
    (result,) = engine.generate([prompt], [params])
    last = result.prefill[-1]
    assert (last.id, last.text, last.special) == (eos_id, EOS, True)
    assert not any(t.special for t in result.prefill[:-1])
    assert all(isinstance(t.log_prob, float) for t in result.prefill[1:])


def test_generated_eos_is_special_and_not_in_the_text(engine):
    eos_id = engine.tokenizer.eos_token_id
    prompt = engine.encode(PROMPTS[0]) + [eos_id]
    # A repetition penalty below 1 favours seen tokens: here the EOS comes first.
    params = SamplingParams(max_new_tokens=5, repetition_penalty=0.01, ignore_eos_token=True)
    (result,) = check_stream_matches_generate(engine, [prompt], [params])
    assert result.tokens[0].id == eos_id and result.tokens[0].text == EOS
    assert result.tokens[0].special and not any(t.special for t in result.tokens[1:])
    assert len(result.token_ids) == 5 and EOS not in result.text
    assert result.text == engine.tokenizer.decode(result.token_ids[1:])
    # Without ignore_eos_token the same EOS ends the request, adding no text.
    (ended,) = engine.generate([prompt], [replace(params, ignore_eos_token=False)])
    assert ended.token_ids == [eos_id] and ended.text == ""
    assert ended.finish_reason is FinishReason.EOS_TOKEN


def test_prompt_as_token_ids_equals_prompt_as_text(engine):
    params = [SamplingParams(max_new_tokens=8)] * 2
    as_text = engine.generate(PROMPTS[:2], params)
    as_ids = engine.generate([engine.encode(p) for p in PROMPTS[:2]], params)
    assert as_ids == as_text
    with pytest.raises(ValidationError, match=r"list of integers in \[0, "):
        engine.generate([[1, 10**6]], [SamplingParams()])
    with pytest.raises(ValidationError, match="empty"):
        engine.generate([[]], [SamplingParams()])


# ---- each parameter --------------------------------------------------------------------------


def greedy_ids(engine, prompt=PROMPTS[0], n=20, **kwargs):
    return engine.generate([prompt], [SamplingParams(max_new_tokens=n, **kwargs)])[0].token_ids


def test_sampling_that_leaves_one_candidate_is_greedy(engine):
    greedy = greedy_ids(engine)
    assert sample(engine, 3, min_p=1.0)[0].token_ids == greedy
    assert sample(engine, 3, temperature=1e-3)[0].token_ids == greedy
    # Greedy with a temperature knob set: the log-probs are those of the raw logits.
    tokens = sample(engine, 3, temperature=0.0)[0].tokens
    assert [t.log_prob for t in tokens] == pytest.approx(
        [
            t.log_prob
            for t in engine.generate([PROMPTS[0]], [SamplingParams(max_new_tokens=20)])[0].tokens
        ]
    )


def test_sampled_log_probs_are_of_the_warped_distribution(engine):
    # With top_k=2 and a temperature, a token's log-prob comes from the renormalised pair.
    (result,) = sample(engine, 5, temperature=0.5, top_k=2, top_n_tokens=3)
    prompt_ids = engine.encode(PROMPTS[0])
    logits = reference_logits(engine, prompt_ids + result.token_ids)[len(prompt_ids) - 1 :]
    for step, (token, top) in enumerate(zip(result.tokens, result.top_tokens)):
        values, ids = (logits[step] / 0.5).topk(2)
        expected = values.log_softmax(-1)
        assert token.id in ids.tolist()
        assert token.log_prob == pytest.approx(
            expected[ids.tolist().index(token.id)].item(), abs=1e-4
        )
        assert [t.id for t in top] == ids.tolist()  # the rest are -inf and left out


def test_typical_p_small_keeps_the_most_typical_token(engine):
    runs = [sample(engine, seed, typical_p=1e-6)[0] for seed in (1, 2, 3)]
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids  # nothing left to draw
    assert sample(engine, 1)[0].token_ids != sample(engine, 2)[0].token_ids
    # The one survivor: surprisal closest to the entropy, not the most likely token.
    log_probs = reference_logits(engine, engine.encode(PROMPTS[0]))[-1].log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum()
    assert runs[0].token_ids[0] == int((-log_probs - entropy).abs().argmin())
    assert runs[0].tokens[0].log_prob == pytest.approx(0.0, abs=1e-6)


REPEATING_PROMPT = PROMPTS[0]  # greedy output of the tiny model repeats tokens


def test_repetition_penalty_stops_repeats(engine):
    plain = greedy_ids(engine, REPEATING_PROMPT, 24)
    assert len(set(plain)) < len(plain), "want a prompt whose greedy output repeats"
    penalised = greedy_ids(engine, REPEATING_PROMPT, 24, repetition_penalty=100.0)
    assert len(set(penalised)) == len(penalised)


def test_presence_and_frequency_penalties_follow_their_formula(engine):
    plain = greedy_ids(engine, REPEATING_PROMPT, 24)
    prompt_ids = engine.encode(REPEATING_PROMPT)
    for presence, frequency in [(2.0, 0.0), (0.0, 2.0), (-0.5, 1.5)]:
        (result,) = engine.generate(
            [REPEATING_PROMPT],
            [SamplingParams(max_new_tokens=24, presence_penalty=presence,
                            frequency_penalty=frequency)],
        )  # fmt: skip
        assert result.token_ids != plain
        logits = reference_logits(engine, prompt_ids + result.token_ids)[len(prompt_ids) - 1 :]
        counts = torch.zeros(logits.shape[-1])
        for step, token in enumerate(result.tokens):
            scores = logits[step] - presence * (counts > 0) - frequency * counts
            assert token.id == int(scores.argmax())
            assert token.log_prob == pytest.approx(
                scores.log_softmax(-1)[token.id].item(), abs=1e-4
            )
            counts[token.id] += 1


def test_min_new_tokens_delays_stop_ids(engine):
    greedy = greedy_ids(engine)
    first = greedy[0]
    stopped = engine.generate([PROMPTS[0]], [SamplingParams(stop_token_ids=(first,))])[0]
    assert stopped.token_ids == [first] and stopped.finish_reason is FinishReason.EOS_TOKEN
    assert stopped.text == engine.tokenizer.decode([first])  # a non-special stop id keeps its text

    params = SamplingParams(max_new_tokens=20, min_new_tokens=4, stop_token_ids=(first,))
    (delayed,) = check_stream_matches_generate(engine, [PROMPTS[0]], [params])
    assert len(delayed.token_ids) > 4
    assert first not in delayed.token_ids[:4]
    if delayed.finish_reason is FinishReason.EOS_TOKEN:
        assert delayed.token_ids[-1] == first and first not in delayed.token_ids[:-1]


def test_ignore_eos_token_runs_to_max_new_tokens(engine):
    greedy = greedy_ids(engine, PROMPTS[2], 12)
    saved = engine.eos_token_ids
    engine.eos_token_ids = {greedy[3]}
    try:
        stopped = engine.generate([PROMPTS[2]], [SamplingParams(max_new_tokens=12)])[0]
        ignored = engine.generate(
            [PROMPTS[2]], [SamplingParams(max_new_tokens=12, ignore_eos_token=True)]
        )[0]
    finally:
        engine.eos_token_ids = saved
    assert stopped.finish_reason is FinishReason.EOS_TOKEN and len(stopped.token_ids) <= 4
    assert ignored.finish_reason is FinishReason.LENGTH and ignored.token_ids == greedy


def test_context_limit_ends_with_length(engine):
    prompt = engine.encode("Hello " * 60)
    room = engine.max_context - len(prompt)
    params = SamplingParams(max_new_tokens=room + 5, ignore_eos_token=True)
    (result,) = check_stream_matches_generate(engine, [prompt], [params])
    assert len(result.token_ids) == room and result.finish_reason is FinishReason.LENGTH
    with pytest.raises(ValidationError, match="stop_token_ids"):
        engine.generate(["Hello"], [SamplingParams(stop_token_ids=(10**6,))])
