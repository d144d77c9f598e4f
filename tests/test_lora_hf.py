"""The hf engine's LoRA (PEFT adapters, one static batch per adapter) against PEFT merged into
the base model, with the same registry checks and API as the native engine."""

import pytest
from test_lora_native import ADAPTERS, check_against_peft, mixed_requests
from tiny_models import make_tiny_llama, make_tiny_lora

from engines.contracts.errors import AdapterNotFound, InvalidAdapter
from engines.hf.engine import HFEngine
from engines.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-hf")
    base = make_tiny_llama(root / "base")
    adapters = {name: str(make_tiny_lora(base, root / name, **kw)) for name, kw in ADAPTERS.items()}
    engine = HFEngine(str(base), enable_lora=True, max_loras=2, max_cpu_loras=2)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return str(base), adapters, engine


def test_sub_batches_per_adapter_equal_peft(hf):
    base, adapters, engine = hf
    assert engine.capabilities.lora
    prompts, which = mixed_requests([None, *adapters], 8, seed=7)
    params = [SamplingParams(max_new_tokens=5, min_new_tokens=5)] * len(prompts)
    results = engine.generate(prompts, params, which)
    check_against_peft(base, adapters, prompts, which, results, 5)
    # Streaming runs the groups one after the other, each event at its prompt's index.
    seen = {}
    for step in engine.generate_stream(prompts, params, which):
        for event in step:
            seen.setdefault(event.index, []).append(event.token.id)
    assert [seen[i] for i in range(len(prompts))] == [r.token_ids for r in results]


def test_registry_and_merge(hf, tmp_path):
    base, adapters, engine = hf
    with pytest.raises(InvalidAdapter, match="use_dora"):
        engine.add_adapter("d", str(make_tiny_lora(base, tmp_path / "d", use_dora=True)))
    with pytest.raises(AdapterNotFound, match="registered adapters: all16, mlp8rs, qv8"):
        engine.check_adapter("nope")
    prompt, params = [[20, 21, 22, 23]], [SamplingParams(max_new_tokens=5, min_new_tokens=5)]
    single = engine.generate(prompt, params, ["qv8"])[0].token_ids
    merged = engine.merge_adapters(["qv8", "qv8"], [0.5, 0.5])
    assert engine.generate(prompt, params, [merged])[0].token_ids == single
    assert [a["name"] for a in engine.list_adapters()] == ["all16", "mlp8rs", "qv8"]
