"""Import layering, checked in fresh interpreters: what each layer pulls in when imported.

    container/ (front end)   never torch, never handlers/, only torch-free engines/ modules
    handlers/                never container/
    scheduler, block manager never torch
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# engines/ modules the front end may import: contracts, options and selection, all torch-free.
FRONT_END_ENGINE_MODULES = {
    "engines", "engines.contracts", "engines.contracts.engine", "engines.contracts.errors",
    "engines.contracts.metrics",
    "engines.contracts.names", "engines.contracts.protocol", "engines.logs", "engines.options",
    "engines.selection", "engines.types", "engines.native", "engines.native.spec",
    "engines.sources", "engines.sources.errors", "engines.sources.hub",
    "engines.sources.archive", "engines.sources.s3",
    # The external engines' startup checks (package, device, the vllm worker's interpreter).
    "engines.backends", "engines.backends.requirements",
}


def imported_after(*modules: str, then: str = "") -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            f"{then}\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout))


def ours(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def test_front_end_imports_no_torch_no_handlers_and_only_light_engine_modules(tmp_path):
    # Loading a model's config chooses its engine (reading config.json): still no torch.
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}))
    load = (f"cfg = sys.modules['container.config'].load_model_config('m', {str(tmp_path)!r}, "
            f"env={{}}, gpus=[]); assert cfg.llm.engine.name == 'native'")
    names = imported_after("container.server", "container.cli", "container.config", then=load)
    assert not ours(names, "torch") and not ours(names, "transformers")
    assert not ours(names, "handlers")
    assert not ours(names, "opentelemetry")  # imported only when tracing is configured
    assert ours(names, "engines") <= FRONT_END_ENGINE_MODULES, \
        ours(names, "engines") - FRONT_END_ENGINE_MODULES


def test_worker_side_imports_no_front_end():
    names = imported_after("handlers.worker", "handlers.service", "handlers.llm",
                           "handlers.llm_schema", "djl_python")
    assert not ours(names, "container"), ours(names, "container")


@pytest.mark.parametrize("module", ["engines.native.scheduler", "engines.native.block_manager",
                                    "engines.native.plan", "engines.contracts.protocol",
                                    "engines.options", "engines.selection", "engines.detokenizer",
                                    "engines.sources.s3", "engines.sources.archive",
                                    "engines.sources.hub", "engines.backends.requirements",
                                    "engines.backends.params"])
def test_pure_python_modules_never_import_torch(module):
    assert not ours(imported_after(module), "torch")
