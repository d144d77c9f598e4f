"""Engines plug in by name; each is imported only when chosen.

An engine's heavy dependency (torch, vllm, tensorrt_llm, deepspeed, ...) is imported by its own
subpackage, so choosing one never pays for the others, and this module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engines.contracts.engine import Engine
    from engines.selection import EngineChoice

# name -> "module:attribute". Add an engine by adding a line here.
_ENGINES: dict[str, str] = {
    "deepspeed": "engines.deepspeed.engine:DeepSpeedEngine",
    "hf": "engines.hf.engine:HFEngine",
    "native": "engines.native.loop:start_native_engine",
    "neuronx": "engines.neuronx.engine:NeuronXEngine",
    "trtllm": "engines.trtllm.engine:TRTLLMEngine",
    "vllm": "engines.vllm.engine:VLLMEngine",
}


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def get_engine_class(name: str) -> type:
    """The engine class registered as `name` (case-insensitive), imported on first use."""
    target = _ENGINES.get(name.strip().lower())
    if target is None:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(engine_names())}")
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def create_engine(choice: EngineChoice) -> Engine:
    """Build the chosen engine from its typed options (engines/options.py)."""
    return get_engine_class(choice.name)(choice.model_dir, **choice.kwargs)
