"""Multi-LoRA on the native engine against PEFT: every adapter merged into the base model with
`merge_and_unload` (fp32, HF transformers) is the reference. Adapters have random non-zero A
and B (PEFT's zero-initialised B would make any test pass), ranks 8 and 16, different target
modules, rsLoRA; requests for several adapters and the base model run in one batch.
"""

import functools
import random

import pytest
import torch
from tiny_models import (ALL_LINEAR_MODULES, make_tiny_llama, make_tiny_lora, make_tiny_model,
                         make_tiny_qwen2, merged_lora_model)

from engines.contracts.errors import AdapterNotFound, InvalidAdapter, NoAdapterSlot
from engines.native.loop import start_native_engine
from engines.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name -> adapter settings; between them every module, ranks 8 and 16, rsLoRA.
ADAPTERS = {
    "qv8": dict(r=8, alpha=16, targets=("q_proj", "v_proj"), seed=1),
    "all16": dict(r=16, alpha=32, targets=ALL_LINEAR_MODULES, seed=2),
    "mlp8rs": dict(r=8, alpha=8, targets=("o_proj", "gate_proj", "up_proj", "down_proj", "k_proj"),
                   seed=3, use_rslora=True),
}
BASES = {"llama": make_tiny_llama, "qwen2": make_tiny_qwen2}


@pytest.fixture(scope="module", params=sorted(BASES))
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = BASES[request.param](root / "base")
    adapters = {name: str(make_tiny_lora(base, root / name, **kw))
                for name, kw in ADAPTERS.items()}
    return str(base), adapters


@functools.cache
def reference(base: str, adapter: str | None):
    from transformers import AutoModelForCausalLM

    if adapter is None:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return merged_lora_model(base, adapter)


@torch.inference_mode()
def greedy_with_logprobs(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ids = out.sequences[0, len(prompt):].tolist()
    lps = [s[0].float().log_softmax(-1)[t].item() for s, t in zip(out.scores, ids)]
    return ids, lps


def engine(base: str, adapters: dict[str, str], **kw):
    kw.setdefault("max_loras", 4)
    e = start_native_engine(base, enable_lora=True, max_lora_rank=16, max_num_seqs=32,
                            kv_cache_gb=0.01, **kw)
    for name, path in adapters.items():
        e.add_adapter(name, path)
    return e


def mixed_requests(names: list[str | None], n: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(4, 40))] for _ in range(n)]
    return prompts, [names[i % len(names)] for i in range(n)]


def check_against_peft(base, adapters, prompts, which, results, new_tokens):
    for prompt, name, result in zip(prompts, which, results):
        ref = reference(base, adapters[name] if name else None)
        ids, lps = greedy_with_logprobs(ref, prompt, new_tokens)
        assert result.token_ids == ids, (name, prompt)
        got = [t.log_prob for t in result.tokens]
        assert max(abs(a - b) for a, b in zip(got, lps)) < 1e-4, name


def test_mixed_batch_equals_peft_merged(setup):
    """16 concurrent requests over 3 adapters and the base model, in one batch."""
    base, adapters = setup
    e = engine(base, adapters)
    try:
        prompts, which = mixed_requests([None, *adapters], 16, seed=0)
        params = [SamplingParams(max_new_tokens=8, min_new_tokens=8)] * len(prompts)
        results = e.generate(prompts, params, which)
        check_against_peft(base, adapters, prompts, which, results, 8)
        # And adapters really change the output (the test would pass for no-op adapters too).
        base_only = e.generate(prompts[:4], params[:4])
        assert any(r.token_ids != b.token_ids for r, b in zip(results[1:4], base_only[1:4]))
    finally:
        e.shutdown()


def test_more_adapters_than_slots_evicts_and_stays_correct(setup, tmp_path):
    """max_loras=2 and 5 adapters at once: all answer right, slots were reused, a pinned
    adapter keeps its slot."""
    base, adapters = setup
    extra = {f"x{i}": str(make_tiny_lora(base, tmp_path / f"x{i}", r=8, seed=10 + i,
                                         targets=("q_proj", "down_proj")))
             for i in range(2)}
    every = {**adapters, **extra}
    e = engine(base, {}, max_loras=2, max_cpu_loras=2)
    try:
        for name, path in every.items():
            e.add_adapter(name, path, pin=name == "qv8")
        pinned_slot = e.engine.lora_slots.where[e.engine.lora_store.get("qv8").uid]
        prompts, which = mixed_requests(list(every), 10, seed=1)
        params = [SamplingParams(max_new_tokens=5, min_new_tokens=5)] * len(prompts)
        results = e.generate(prompts, params, which)
        check_against_peft(base, every, prompts, which, results, 5)
        slots = e.engine.lora_slots
        assert slots.evictions >= 3  # 4 unpinned adapters took turns in 1 free slot
        assert slots.where[e.engine.lora_store.get("qv8").uid] == pinned_slot
        assert e.engine.lora_store.host_evictions > 0  # max_cpu_loras=2 < 5 adapters
        e.update_adapter("all16", pin=True)  # the second and last slot
        with pytest.raises(NoAdapterSlot, match="max_loras"):
            e.add_adapter("x9", extra["x0"], pin=True)
    finally:
        e.shutdown()


def test_prefix_cache_is_keyed_by_adapter(setup):
    """Base and adapter requests never share KV blocks; two requests on one adapter do."""
    base, adapters = setup
    e = engine(base, adapters)
    try:
        bm = e.engine.block_manager
        prompt = list(range(3, 3 + 40))  # 2 full blocks of 16 and a tail
        params = [SamplingParams(max_new_tokens=2, min_new_tokens=2)]

        def hits(adapter):
            before = bm.prefix_hit_tokens
            result = e.generate([prompt], params, [adapter])[0]
            return bm.prefix_hit_tokens - before, result

        assert hits(None)[0] == 0
        cached, with_adapter = hits("all16")
        assert cached == 0  # the base model's blocks are not reused for an adapter
        again, second = hits("all16")
        assert again == 32 and second.token_ids == with_adapter.token_ids
        assert hits("qv8")[0] == 0 and hits(None)[0] == 32
    finally:
        e.shutdown()


def test_registration_errors_name_the_problem(setup, tmp_path):
    base, adapters = setup
    e = engine(base, {})
    try:
        with pytest.raises(InvalidAdapter, match="max_lora_rank=16"):
            e.add_adapter("big", str(make_tiny_lora(base, tmp_path / "r32", r=32)))
        with pytest.raises(InvalidAdapter, match="use_dora"):
            e.add_adapter("dora", str(make_tiny_lora(base, tmp_path / "dora", use_dora=True)))
        with pytest.raises(InvalidAdapter, match="modules_to_save"):
            e.add_adapter("mts", str(make_tiny_lora(base, tmp_path / "mts",
                                                    modules_to_save=["lm_head"])))
        with pytest.raises(InvalidAdapter, match="embed_tokens"):
            e.add_adapter("emb", str(make_tiny_lora(base, tmp_path / "emb",
                                                    targets=("embed_tokens", "q_proj"))))
        with pytest.raises(AdapterNotFound, match="registered adapters: none"):
            e.generate([[5, 6, 7]], [SamplingParams(max_new_tokens=1)], ["nope"])
        e.add_adapter("qv8", adapters["qv8"])
        e.remove_adapter("qv8")
        with pytest.raises(AdapterNotFound):
            e.generate([[5, 6, 7]], [SamplingParams(max_new_tokens=1)], ["qv8"])
    finally:
        e.shutdown()


def test_shape_mismatch_with_another_base_model(tmp_path):
    """An adapter trained on a model with 2 KV heads does not fit one with 4."""
    from engines.lora.config import read_adapter

    small = make_tiny_llama(tmp_path / "small")
    adapter = make_tiny_lora(small, tmp_path / "a", r=8)
    other = make_tiny_model(tmp_path / "other", num_kv_heads=4)
    with pytest.raises(InvalidAdapter, match="k_proj.*another base model"):
        read_adapter(adapter, max_rank=16, base=other)
    assert read_adapter(adapter, max_rank=16, base=small).targets == ALL_LINEAR_MODULES


def test_linear_merge_is_the_weighted_sum_of_deltas(setup):
    """merged_adapters (LoRAX, merge_strategy linear): the result equals PEFT's
    add_weighted_adapter with combination_type="cat" (ΔW = Σ w_i ΔW_i), merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapters = setup
    e = engine(base, {"qv8": adapters["qv8"], "mlp8rs": adapters["mlp8rs"]})
    try:
        name = e.merge_adapters(["qv8", "mlp8rs"], [0.7, 0.3])
        prompt = list(range(10, 30))
        got = e.generate([prompt], [SamplingParams(max_new_tokens=6, min_new_tokens=6)],
                         [name])[0]
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapters["qv8"],
            adapter_name="qv8")
        model.load_adapter(adapters["mlp8rs"], adapter_name="mlp8rs")
        model.add_weighted_adapter(["qv8", "mlp8rs"], [0.7, 0.3], "m", combination_type="cat")
        model.set_adapter("m")
        ref = model.merge_and_unload(adapter_names=["m"]).eval()
        ids, lps = greedy_with_logprobs(ref, prompt, 6)
        assert got.token_ids == ids
        assert max(abs(t.log_prob - lp) for t, lp in zip(got.tokens, lps)) < 1e-4
    finally:
        e.shutdown()


def test_gpu_path_kernels_and_graph_inputs_on_cpu(setup):
    """The CUDA path (gathered LoRA kernel, paged attention, the CUDA-graph static inputs with
    each row's slot) run eagerly on CPU in Triton's interpreter: still PEFT's tokens."""
    pytest.importorskip("triton")
    base, adapters = setup
    e = engine(base, adapters, attention_backend="triton", cuda_graphs=True)
    try:
        assert e.engine.runner.lora_kernel is not None and e.engine.runner.graphs is not None
        prompts, which = mixed_requests([None, *adapters], 6, seed=4)
        params = [SamplingParams(max_new_tokens=4, min_new_tokens=4)] * len(prompts)
        results = e.generate(prompts, params, which)
        check_against_peft(base, adapters, prompts, which, results, 4)
    finally:
        e.shutdown()


def test_bin_adapter_is_loaded_as_tensors_only(setup, tmp_path):
    """adapter_model.bin (no safetensors): loaded with torch.load(weights_only=True), its
    shapes checked after loading, and served like any other."""
    base, _ = setup
    path = make_tiny_lora(base, tmp_path / "bin", r=8, seed=9, safetensors=False,
                          targets=("q_proj", "up_proj"))
    assert (path / "adapter_model.bin").is_file()
    assert not (path / "adapter_model.safetensors").exists()
    e = engine(base, {"bin": str(path)})
    try:
        prompts, which = mixed_requests(["bin", None], 2, seed=5)
        params = [SamplingParams(max_new_tokens=4, min_new_tokens=4)] * 2
        check_against_peft(base, {"bin": str(path)}, prompts, which,
                           e.generate(prompts, params, which), 4)
    finally:
        e.shutdown()


def test_packed_decode_path_equals_peft(setup, tmp_path):
    """Five adapters decoding at once (few rows each): the groups run as one batched matmul
    pair over the slots (lora.pack_groups); still PEFT's tokens."""
    from engines.native.lora import pack_groups

    base, adapters = setup
    extra = {f"p{i}": str(make_tiny_lora(base, tmp_path / f"p{i}", r=8, seed=20 + i))
             for i in range(2)}
    every = {**adapters, **extra}
    e = engine(base, every, max_loras=5)
    try:
        prompts, which = mixed_requests([None, *every], 12, seed=6)
        params = [SamplingParams(max_new_tokens=5, min_new_tokens=5)] * len(prompts)
        check_against_peft(base, every, prompts, which, e.generate(prompts, params, which), 5)
    finally:
        e.shutdown()
    # The decision: many small groups over a dense slot range pack; big groups or a sparse
    # range do not.
    small = [(1, 0, 2), (2, 2, 4), (3, 4, 6), (5, 6, 7)]
    assert pack_groups(small, 7, device="cpu") is not None
    assert pack_groups([(1, 0, 9), *small[1:]], 9, device="cpu") is None
    assert pack_groups([(1, 0, 1), (9, 1, 2), (17, 2, 3), (30, 3, 4)], 4, device="cpu") is None


def test_packed_and_grouped_deltas_agree():
    import types

    from engines.native.lora import StepLora, pack_groups

    g = torch.Generator().manual_seed(0)
    # A fused op of two parts (as q|k|v or gate|up): R = 2, outputs of 3 and 2 columns.
    slots = types.SimpleNamespace(a=[{"o": torch.randn(6, 8, 4, generator=g)}],
                                  b=[{"o": [torch.randn(6, 2, 3, generator=g),
                                            torch.randn(6, 2, 2, generator=g)]}], max_rank=2)
    groups = [(1, 0, 2), (2, 2, 3), (4, 3, 5), (5, 6, 7)]  # row 5 has no adapter
    x = torch.randn(7, 8, generator=g)
    base = torch.randn(7, 5, generator=g)
    grouped, packed = base.clone(), base.clone()
    StepLora(slots, groups).apply(0, "o", x, grouped)
    StepLora(slots, groups, packed=pack_groups(groups, 7, device="cpu")).apply(0, "o", x, packed)
    assert torch.allclose(grouped, packed, atol=1e-6)
    assert torch.equal(packed[5], base[5])
    # Against the definition, row by row.
    want = base.clone()
    for slot, start, end in groups:
        for row in range(start, end):
            y = x[row] @ slots.a[0]["o"][slot]
            want[row] += torch.cat([y[:2] @ slots.b[0]["o"][0][slot],
                                    y[2:] @ slots.b[0]["o"][1][slot]])
    assert torch.allclose(grouped, want, atol=1e-5)
