"""The engine contract: what the LLM handler and the worker process may call on an engine.

Every engine in engines/registry.py returns an object that satisfies `Engine`. What differs
between engines is stated in `capabilities`, never probed with hasattr:

    max_concurrency  requests served at once from different threads. 1: one call at a time (a
                     static batch per call, as `hf`); > 1: continuous batching, the worker runs
                     that many request threads and the engine batches them token by token.
    tp_mode          how a tensor-parallel worker group runs it (TPMode below).
    lora             serves LoRA adapters (option.enable_lora): generate/generate_stream take
                     `adapters` (a name per prompt, None for the base model) and the engine has
                     add_adapter / update_adapter / remove_adapter / list_adapters /
                     merge_adapters (`LoraEngine` below).

An engine that batches continuously is usually built as a `SteppedEngine` (add_request / step /
abort) wrapped by a loop that gives it the thread-safe `Engine` API (engines/native/loop.py).

No torch here: the front end and tests import this module.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from engines.types import GenerationResult, SamplingParams, TokenEvent


class TPMode(str, enum.Enum):
    """How the ranks of a tensor-parallel worker group share the work."""

    NONE = "none"  # a single rank
    # Every rank runs every request in lockstep: rank 0 broadcasts each request batch, all ranks
    # call the engine identically, only rank 0 answers (DeepSpeed AutoTP, custom model.py).
    REPLICATE = "replicate"
    # The engine drives the other ranks itself (rank 0 broadcasts each step's plan); ranks > 0
    # call `follow()` until rank 0's `shutdown()` (the native engine).
    ENGINE = "engine"


@dataclass(frozen=True, slots=True)
class Capabilities:
    max_concurrency: int = 1
    tp_mode: TPMode = TPMode.NONE
    lora: bool = False

    def __post_init__(self) -> None:
        assert self.max_concurrency >= 1, self.max_concurrency


@runtime_checkable
class Engine(Protocol):
    """The batch API. `prompts[i]` goes with `params[i]`; results and events come back in that
    order (TokenEvent.index). Bad inputs raise engines.types.ValidationError before any step."""

    capabilities: Capabilities
    tokenizer: Any
    max_context: int  # most tokens (prompt + generated) one sequence may hold
    vocab_size: int
    eos_token_ids: frozenset[int]

    def encode(self, prompt: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = True) -> str: ...

    def generate(self, prompts: list[list[int] | str], params: list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[GenerationResult]: ...

    def generate_stream(self, prompts: list[list[int] | str], params: list[SamplingParams],
                        adapters: list[str | None] | None = None
                        ) -> Iterator[list[TokenEvent]]: ...

    def follow(self) -> None:
        """TPMode.ENGINE, ranks > 0: run rank 0's steps until it shuts down (blocks)."""
        ...

    def shutdown(self) -> None:
        """Release threads and, with TPMode.ENGINE, the other ranks. Idempotent."""
        ...


@runtime_checkable
class SteppedEngine(Protocol):
    """The continuous-batching API, driven by one thread: requests join and leave between
    steps; each step returns (request id, event) for every request that produced a token."""

    def add_request(self, rid: object, prompt: list[int] | str,
                    params: SamplingParams) -> None: ...

    def step(self) -> list[tuple[object, TokenEvent]]: ...

    def abort(self, rid: object) -> None: ...

    def has_unfinished(self) -> bool: ...


@runtime_checkable
class LoraEngine(Protocol):
    """What an engine with `capabilities.lora` adds (native, hf). Names are the registry's;
    errors are engines.contracts.errors' AdapterNotFound (404), InvalidAdapter (400),
    Conflict (409) and NoAdapterSlot (507)."""

    def add_adapter(self, name: str, src: str, *, pin: bool = False,
                    preload: bool = True) -> dict[str, Any]: ...

    def update_adapter(self, name: str, *, src: str | None = None, pin: bool | None = None,
                       preload: bool | None = None) -> dict[str, Any]: ...

    def remove_adapter(self, name: str) -> dict[str, Any]: ...

    def list_adapters(self) -> list[dict[str, Any]]: ...

    def check_adapter(self, name: str) -> None:
        """AdapterNotFound (naming the registered ones) unless `name` is registered."""
        ...

    def merge_adapters(self, names: list[str], weights: list[float]) -> str: ...
