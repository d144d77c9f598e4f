"""The native engine against HF transformers (fp32, CPU), on tiny random-weight Llama-family
models: greedy tokens equal `model.generate`, log-probs equal log_softmax of HF's logits, and
paging (preemption, prefix caching, chunked prefill, requests joining between steps) changes
nothing. Stop rules and text are checked against the `hf` engine on the same model.
"""

import functools
import random
from dataclasses import replace

import pytest
import torch
from tiny_models import make_tiny_llama, make_tiny_mistral, make_tiny_model, make_tiny_qwen2

from engines.contracts.engine import Capabilities, Engine, TPMode
from engines.hf.engine import HFEngine
from engines.native.engine import NativeEngine
from engines.types import FinishReason, SamplingParams

EOS_ID = 2  # tiny_models' tokenizer: PAD 0, BOS 1, EOS 2

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

# name -> builder; between them: GQA and full MHA, tied and untied embeddings, a sliding window
# (16) shorter than most prompts, q/k/v biases, llama3 RoPE scaling.
MODELS = {
    "llama": make_tiny_llama,  # GQA 4/2, untied
    "mistral": lambda p: make_tiny_mistral(p, sliding_window=16, num_kv_heads=4),
    "qwen2": make_tiny_qwen2,  # GQA, tied, attention bias
    "llama3-rope": lambda p: make_tiny_model(p, seed=3, num_kv_heads=1, tie_word_embeddings=True,
                                             rope_parameters=LLAMA3_ROPE),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def model_dir(name: str, root: str) -> str:
    return str(MODELS[name](f"{root}/{name}"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("native-models"))
    return lambda name: model_dir(name, root)


@functools.cache
def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def hf_greedy(path: str, prompt: tuple[int, ...], n: int, min_new: int) -> list[int]:
    """`model.generate` for one prompt alone (no padding), cut after EOS."""
    out = hf_model(path).generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n, min_new_tokens=min_new, do_sample=False, pad_token_id=0,
        eos_token_id=EOS_ID)[0, len(prompt):].tolist()  # [n]
    return out[:out.index(EOS_ID) + 1] if EOS_ID in out else out


@torch.inference_mode()
def hf_log_softmax(path: str, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's raw logits at every position of `ids`: [len(ids), V]."""
    return hf_model(path)(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def workload(seed: int, n: int = 16, *, vocab: int = 384, prefix: list[int] = ()):
    """Prompts of 3..60 tokens and outputs of 1..40; every other request ignores EOS through
    min_new_tokens (the way HF generate can), the others may stop on it."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        length = rng.randint(3, 60)
        prompts.append(list(prefix) + [rng.randrange(3, vocab) for _ in range(length)])
        new = rng.randint(1, 40)
        params.append(SamplingParams(max_new_tokens=new, min_new_tokens=new if i % 2 else 0))
    return prompts, params


def expected(path: str, prompts, params) -> list[list[int]]:
    return [hf_greedy(path, tuple(p), sp.max_new_tokens, sp.min_new_tokens)
            for p, sp in zip(prompts, params)]


def native(path: str, **kw) -> NativeEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 512)
    return NativeEngine(path, dtype="fp32", device="cpu", **kw)


def assert_log_probs_match(path: str, prompt: list[int], result, params: SamplingParams):
    """Each chosen token's log-prob is log_softmax of HF's logits at its position (with stop ids
    masked while min_new_tokens holds, as the sampler reports the distribution it chose from)."""
    ref = hf_log_softmax(path, prompt + result.token_ids[:-1])[len(prompt) - 1:]  # [n, V]
    for j, tok in enumerate(result.tokens):
        row = ref[j]
        if j < params.min_new_tokens:
            logits = row.clone()
            logits[EOS_ID] = float("-inf")
            row = logits.log_softmax(-1)
        assert tok.log_prob == pytest.approx(row[tok.id].item(), abs=1e-4)


# ---- greedy token-exact ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_hf_generate_and_log_probs(dirs, name):
    path = dirs(name)
    prompts, params = workload(seed=len(name))
    engine = native(path)
    results = engine.generate(prompts, params)
    for prompt, p, r, want in zip(prompts, params, results, expected(path, prompts, params)):
        assert r.token_ids == want, (len(prompt), p)
        assert r.prompt_tokens == len(prompt)
        if want[-1] == EOS_ID and len(want) > p.min_new_tokens:
            assert r.finish_reason is FinishReason.EOS_TOKEN
        else:
            assert r.finish_reason is FinishReason.LENGTH and len(want) == p.max_new_tokens
        assert_log_probs_match(path, prompt, r, p)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- the GPU decode path (paged-attention kernel, CUDA-graph static batches) on CPU ----------
#
# On CPU the Triton kernel runs in Triton's interpreter and the graph runner runs its padded
# static batches uncaptured: the same code a GPU runs, checked against transformers here.


def _count_graph_steps(engine: NativeEngine) -> list[int]:
    sizes = []
    run = engine.runner.graphs.run

    def counting(chunks):
        sizes.append(len(chunks))
        return run(chunks)

    engine.runner.graphs.run = counting
    return sizes


@pytest.mark.parametrize("name", ["llama", "mistral"])  # GQA; a sliding window
def test_gpu_decode_path_matches_hf_generate_and_log_probs(dirs, name):
    pytest.importorskip("triton")
    path = dirs(name)
    prompts, params = workload(seed=len(name) + 1, n=8)
    # max_num_seqs 6: buckets 1, 2, 4, 6, so most steps run with padding rows.
    engine = native(path, attention_backend="triton", cuda_graphs=True, block_size=8,
                    num_blocks=256, max_num_seqs=6)
    assert engine.runner.attention == "triton" and engine.runner.graphs is not None
    graph_steps = _count_graph_steps(engine)
    results = engine.generate(prompts, params)
    for prompt, p, r, want in zip(prompts, params, results, expected(path, prompts, params)):
        assert r.token_ids == want, (len(prompt), p)
        assert_log_probs_match(path, prompt, r, p)
    assert len(graph_steps) > 10 and any(n not in (1, 2, 4, 6) for n in graph_steps)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_paged_kernel_in_mixed_steps_with_preemption(dirs):
    """Kernel without graphs: decode rows share steps with prefill chunks, and a small pool
    preempts."""
    pytest.importorskip("triton")
    path = dirs("llama")
    prompts, params = workload(seed=7, n=8)
    # 20 blocks of 8: room for one request (at most 100 tokens) but not for all at once.
    engine = native(path, attention_backend="triton", cuda_graphs=False, block_size=8,
                    num_blocks=20, max_num_batched_tokens=16)
    assert engine.runner.graphs is None
    chunks = _prompt_chunks(engine)
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == expected(path, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert any(not c.sample for c in chunks)


def _prompt_chunks(engine: NativeEngine) -> list:
    """Record every scheduled chunk of the engine's steps."""
    chunks = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        chunks.extend(out.chunks)
        return out

    engine.scheduler.schedule = recording
    return chunks


@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("case", ["preemption", "prefix-cache", "chunked-prefill"])
def test_paging_keeps_greedy_exact(dirs, name, case):
    path = dirs(name)
    prefix = [] if case != "prefix-cache" else [random.Random(9).randrange(3, 384)
                                                 for _ in range(21)]
    prompts, params = workload(seed=7, prefix=prefix)
    kw = {
        # 40 blocks of 4: room for one request (at most 100 tokens) but not for all at once.
        "preemption": {"num_blocks": 40},
        # Few at a time, so later requests find the shared prefix's blocks computed.
        "prefix-cache": {"max_num_seqs": 4},
        "chunked-prefill": {"max_num_batched_tokens": 8},
    }[case]
    engine = native(path, **kw)
    chunks = _prompt_chunks(engine)
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == expected(path, prompts, params)
    if case == "preemption":
        assert engine.scheduler.num_preemptions > 0
    elif case == "prefix-cache":
        assert engine.block_manager.prefix_hit_tokens > 0
    else:
        assert any(not c.sample for c in chunks), "no prompt was split over several steps"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- prompt log-probs (decoder_input_details) -------------------------------------------------


def test_prefill_log_probs_match_hf(dirs):
    path = dirs("mistral")
    hf = HFEngine(path, dtype="fp32", device="cpu")
    rng = random.Random(3)
    shared = [rng.randrange(3, 384) for _ in range(24)]
    prompts = [shared + [rng.randrange(3, 384) for _ in range(k)] for k in (3, 17, 30)]
    prompts.append([5, 6])  # the shortest prompt with a scored token
    params = [SamplingParams(max_new_tokens=3, decoder_input_details=True)] * len(prompts)
    want = hf.generate(prompts, params)
    # Chunked prefill, and the shared prefix already cached by an earlier request: every
    # position must still be computed and scored.
    engine = native(path, max_num_batched_tokens=8)
    engine.generate([shared + [7, 7]], [SamplingParams(max_new_tokens=2)])
    got = engine.generate(prompts, params)
    assert engine.block_manager.prefix_hit_tokens == 0
    for prompt, g, w in zip(prompts, got, want):
        assert [t.id for t in g.prefill] == prompt == [t.id for t in w.prefill]
        assert g.prefill[0].log_prob is None and w.prefill[0].log_prob is None
        ref = hf_log_softmax(path, prompt)  # [L, V]
        for i, tok in enumerate(g.prefill[1:], start=1):
            assert tok.log_prob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
            assert tok.log_prob == pytest.approx(w.prefill[i].log_prob, abs=1e-4)
        assert g.token_ids == w.token_ids
    # Without the flag there is no prefill, and the cache is used again.
    plain = engine.generate(prompts[:1], [SamplingParams(max_new_tokens=1)])[0]
    assert plain.prefill is None and engine.block_manager.prefix_hit_tokens > 0


def test_prefill_only_on_first_stream_event(dirs):
    engine = native(dirs("llama"))
    params = SamplingParams(max_new_tokens=4, decoder_input_details=True)
    events = [e for step in engine.generate_stream([[5, 6, 7]], [params]) for e in step]
    assert len(events) == 4 and events[0].prefill is not None
    assert all(e.prefill is None for e in events[1:])


# ---- continuous batching and abort -------------------------------------------------------------


def _run_until_done(engine: NativeEngine, done: dict) -> None:
    while engine.has_unfinished():
        for rid, ev in engine.step():
            done.setdefault(rid, []).append(ev.token.id)


def test_requests_added_between_steps_match_hf(dirs):
    path = dirs("qwen2")
    prompts, params = workload(seed=11, n=18)
    engine = native(path, num_blocks=64)
    got: dict[int, list[int]] = {}
    waves = [range(0, 6), range(6, 12), range(12, 18)]
    for wave in waves:
        for i in wave:
            engine.add_request(i, prompts[i], params[i])
        for _ in range(3):
            for rid, ev in engine.step():
                got.setdefault(rid, []).append(ev.token.id)
    _run_until_done(engine, got)
    assert [got[i] for i in range(18)] == expected(path, prompts, params)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_frees_blocks_at_once(dirs):
    engine = native(dirs("llama"), num_blocks=64, enable_prefix_caching=False)
    bm = engine.block_manager
    long = SamplingParams(max_new_tokens=40, ignore_eos_token=True)
    engine.add_request("a", list(range(3, 40)), long)
    engine.add_request("b", list(range(50, 60)), long)
    engine.add_request("c", list(range(100, 130)), long)
    for _ in range(3):
        engine.step()
    used_by_a = len(bm.block_table(0))
    free = bm.num_free_blocks
    engine.abort("a")
    assert bm.num_free_blocks == free + used_by_a
    engine.abort("a")  # twice, and an unknown id: no-ops
    engine.abort("nope")
    done: dict = {}
    _run_until_done(engine, done)
    assert "a" not in done and len(done["b"]) == len(done["c"]) == 40 - 3
    assert bm.num_free_blocks == bm.num_blocks
    # Aborting a request that has not been scheduled yet.
    engine.add_request("d", [5, 6, 7], long)
    engine.abort("d")
    assert not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


# ---- sampling and stop rules -------------------------------------------------------------------


def test_seeded_sampling_does_not_depend_on_batch_company(dirs):
    engine = native(dirs("llama"))
    sampled = SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=50,
                             top_p=0.95, seed=1234, ignore_eos_token=True)
    prompt = [10, 20, 30, 40]
    alone = engine.generate([prompt], [sampled])[0]
    prompts, company = workload(seed=5, n=7)
    company = [replace(p, do_sample=bool(i % 2), seed=i, repetition_penalty=1.1)
               for i, p in enumerate(company)]
    crowd = engine.generate(prompts[:3] + [prompt] + prompts[3:],
                            company[:3] + [sampled] + company[3:])[3]
    assert crowd.token_ids == alone.token_ids
    assert [t.log_prob for t in crowd.tokens] == pytest.approx(
        [t.log_prob for t in alone.tokens], abs=1e-5)
    other = engine.generate([prompt], [replace(sampled, seed=4321)])[0]
    assert other.token_ids != alone.token_ids


def test_stop_rules_and_top_tokens_match_hf_engine(dirs):
    path = dirs("llama")
    hf = HFEngine(path, dtype="fp32", device="cpu")
    engine = native(path)
    texts = ["The capital of France is", "Once upon a time", "Hello world! How are you",
             "Large language models"]
    base = [SamplingParams(max_new_tokens=24, ignore_eos_token=True)] * len(texts)
    greedy = engine.generate(texts, base)
    cases: list[tuple[str, SamplingParams]] = []
    for text, g in zip(texts, greedy):
        ids = g.token_ids
        mid = g.text[len(g.text) // 3:len(g.text) // 3 + 3]
        cases += [
            (text, SamplingParams(max_new_tokens=24)),  # may stop on EOS
            (text, SamplingParams(max_new_tokens=24, stop_sequences=(mid, "zzzz"),
                                  ignore_eos_token=True)),
            (text, SamplingParams(max_new_tokens=24, stop_token_ids=(ids[3],),
                                  ignore_eos_token=True)),
            (text, SamplingParams(max_new_tokens=24, stop_token_ids=(ids[1],),
                                  min_new_tokens=5, ignore_eos_token=True)),
            (text, SamplingParams(max_new_tokens=8, top_n_tokens=3)),
            (text, SamplingParams(max_new_tokens=24, stop_sequences=(mid,), min_new_tokens=20,
                                  ignore_eos_token=True)),
        ]
    prompts, params = [c[0] for c in cases], [c[1] for c in cases]
    want = hf.generate(prompts, params)
    got = engine.generate(prompts, params)
    for p, g, w in zip(params, got, want):
        assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason), p
        assert [t.text for t in g.tokens] == [t.text for t in w.tokens]
        assert [t.log_prob for t in g.tokens] == pytest.approx(
            [t.log_prob for t in w.tokens], abs=1e-4)
        if p.top_n_tokens:
            assert [[t.id for t in top] for top in g.top_tokens] == [
                [t.id for t in top] for top in w.top_tokens]
            assert [t.log_prob for top in g.top_tokens for t in top] == pytest.approx(
                [t.log_prob for top in w.top_tokens for t in top], abs=1e-4)
    # The rules did fire: the stop sequence taken from the text, and the stop id.
    assert {g.finish_reason for g in got[1::6]} == {FinishReason.STOP_SEQUENCE}
    assert {g.finish_reason for g in got[2::6]} == {FinishReason.EOS_TOKEN}
    assert all(len(g.token_ids) >= 5 for g in got[3::6])


# ---- the runner's output ------------------------------------------------------------------------


def _plain(value) -> bool:
    """Built of Python numbers, None, lists, tuples and dicts only (no tensors anywhere)."""
    if value is None or type(value) in (int, float):
        return True
    if type(value) in (list, tuple):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


@pytest.mark.parametrize("path", ["eager", "graphs"])
def test_runner_output_is_plain_python(dirs, path):
    """Every step's ModelRunnerOutput (decode, chunked prefill, prompt log-probs, top tokens,
    sampling, the CUDA-graph path) holds plain Python values, one entry per sampled row."""
    import dataclasses

    kw = {"max_num_batched_tokens": 8}
    if path == "graphs":
        pytest.importorskip("triton")
        kw.update(attention_backend="triton", cuda_graphs=True, block_size=8, num_blocks=64,
                  max_num_seqs=4)
    engine = native(dirs("llama"), **kw)
    outputs = []
    execute = engine.runner.execute

    def recording(plan, rows=None):
        outputs.append(execute(plan, rows))
        return outputs[-1]

    engine.runner.execute = recording
    graph_steps = _count_graph_steps(engine) if path == "graphs" else []
    params = [SamplingParams(max_new_tokens=5, decoder_input_details=True),
              SamplingParams(max_new_tokens=5, top_n_tokens=3, do_sample=True, seed=1,
                             repetition_penalty=1.2),
              SamplingParams(max_new_tokens=5)]
    engine.generate([list(range(3, 23)), [10, 11, 12], [13, 14]], params)
    assert any(o.prompt_logprobs for o in outputs) and any(any(o.top) for o in outputs)
    assert bool(graph_steps) == (path == "graphs")
    for o in outputs:
        assert all(_plain(getattr(o, f.name)) for f in dataclasses.fields(o)), o
        assert len(o.seq_ids) == len(o.token_ids) == len(o.log_probs) == len(o.top)


# ---- the real model ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_smollm2_greedy_matches_hf_generate():
    from engines.default_model import prepare_default_model

    path = str(prepare_default_model(progress=False))
    engine = NativeEngine(path, dtype="fp32", device="cpu", num_blocks=256)
    topics = ["the ocean", "Paris", "a small robot", "prime numbers", "tea", "the moon",
              "a library", "winter", "bicycles", "volcanoes", "music", "a lighthouse",
              "bread", "chess", "rivers", "the internet"]
    prompts = []
    for i, topic in enumerate(topics):
        question = f"Tell me about {topic}." + " Please be detailed." * (i % 4)
        prompts.append(engine.encode(engine.apply_chat_template(
            [{"role": "user", "content": question}])))
    got = engine.generate(prompts, [SamplingParams(max_new_tokens=24)] * len(prompts))
    model = hf_model(path)
    eos = sorted(engine.eos_token_ids)
    for prompt, g in zip(prompts, got):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0])[0, len(prompt):].tolist()
        ends = [i for i, t in enumerate(out) if t in eos]
        assert g.token_ids == (out[:ends[0] + 1] if ends else out)


def test_weights_the_model_would_ignore_are_refused(tmp_path):
    from engines.native.model import LlamaModel
    from engines.native.spec import UnsupportedModel

    # Llama with attention_bias also has an o_proj bias, which the native forward lacks.
    path = make_tiny_model(tmp_path / "biased", extra={"attention_bias": True})
    with pytest.raises(UnsupportedModel, match="o_proj.bias"):
        LlamaModel(path, dtype=torch.float32, device=torch.device("cpu"))


# -- the engine loop: many request threads, one batch ------------------------------------------


def test_loop_batches_concurrent_threads_and_matches_hf(dirs):
    """Requests from 12 threads at once go through one engine thread; each gets exactly the
    tokens HF generates for it alone."""
    import concurrent.futures

    from engines.native.loop import EngineLoop

    path = dirs("llama")
    prompts, params = workload(seed=11, n=12)
    loop = EngineLoop(native(path, max_num_seqs=8, num_blocks=64))
    assert isinstance(loop, Engine)
    assert loop.capabilities == Capabilities(max_concurrency=8, tp_mode=TPMode.NONE)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda a: loop.generate([a[0]], [a[1]])[0],
                                zip(prompts, params)))
    assert [r.token_ids for r in results] == expected(path, prompts, params)


def test_loop_closing_a_stream_aborts_and_frees_blocks(dirs):
    """A client that goes away closes its stream: the engine drops the request and frees its
    KV blocks within a step, while the other request carries on."""
    import time

    from engines.native.loop import EngineLoop

    path = dirs("llama")
    engine = native(path, max_num_seqs=8, num_blocks=64)
    loop = EngineLoop(engine)
    free_at_start = engine.block_manager.num_free_blocks
    long = SamplingParams(max_new_tokens=200, ignore_eos_token=True)
    stream = loop.generate_stream([[5, 6, 7, 8]], [long])
    other = loop.generate_stream([[9, 10, 11]], [SamplingParams(max_new_tokens=30,
                                                                ignore_eos_token=True)])
    next(stream)
    next(stream)
    stream.close()
    got = [e for events in other for e in events]
    assert len(got) == 30 and got[-1].finish_reason is not None
    deadline = time.monotonic() + 5
    while engine.block_manager.num_free_blocks != free_at_start and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.block_manager.num_free_blocks == free_at_start
    assert not engine.has_unfinished()


def test_loop_fails_requests_on_a_step_error_and_at_shutdown(dirs):
    """A step that raises fails the requests it ran (with that error) and the loop carries on;
    a shutdown fails what still runs and frees its blocks."""
    from engines.native.loop import EngineLoop

    engine = native(dirs("llama"), max_num_seqs=8, num_blocks=64)
    step = engine.step

    def broken():
        engine.step = step  # only this once
        raise ValueError("boom")

    engine.step = broken
    loop = EngineLoop(engine)
    short = [SamplingParams(max_new_tokens=3)]
    with pytest.raises(ValueError, match="boom"):
        loop.generate([[5, 6, 7]], short)
    assert len(loop.generate([[5, 6, 7]], short)[0].token_ids) == 3
    stream = loop.generate_stream([[5, 6, 7]], [SamplingParams(max_new_tokens=200,
                                                               ignore_eos_token=True)])
    next(stream)
    loop.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        for _ in stream:
            pass
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    loop.shutdown()  # idempotent


def test_disconnect_storm_frees_every_block(dirs):
    """Requests abandoned every way a client can (before their first token, mid-stream, while
    still waiting for a slot), round after round, on the threaded loop the server uses: every
    KV block is back in the pool, and the next request is still exactly greedy."""
    import threading

    from engines.native.loop import start_native_engine

    path = dirs("llama")
    loop = start_native_engine(path, dtype="fp32", device="cpu", num_blocks=96, block_size=4,
                               max_num_seqs=4)
    try:
        engine = loop.engine
        prompt = list(range(5, 25))
        params = SamplingParams(max_new_tokens=40, ignore_eos_token=True)

        def client(kind: int) -> None:
            stream = loop.generate_stream([prompt], [params])
            if kind == 1:  # mid-stream, after a few tokens
                for _, _ in zip(range(3), stream):
                    pass
            elif kind == 2:  # after the first token
                next(stream)
            stream.close()  # kind 0: before its first token (queued behind the others)

        for _ in range(3):
            threads = [threading.Thread(target=client, args=(i % 3,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        want = loop.generate([prompt], [SamplingParams(max_new_tokens=8)])[0].token_ids
        assert want == hf_greedy(path, tuple(prompt), 8, 0)
        loop._call(lambda e: None)  # one more pass of the loop: the last aborts applied
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.scheduler.has_work
    finally:
        loop.shutdown()
