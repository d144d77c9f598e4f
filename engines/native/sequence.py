"""One request's state inside the native engine (pure Python)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    id: int
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    # Tokens whose keys/values are in the KV cache. Tokens past this are still to be computed:
    # the rest of the prompt (chunked prefill, or recompute after preemption) or the newest token.
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at (first) admission
    num_preemptions: int = 0
    # Compute every prompt position, skipping prefix-cache hits: the engine wants the logits of
    # all of them (prompt log-probs, decoder_input_details).
    skip_prefix_cache: bool = False
    # LoRA: the adapter's uid (0: the base model) and, while running, its weight slot. The
    # prefix cache keys this sequence's blocks under the adapter's salt: KV computed with one
    # adapter's weights is never reused for another adapter or the base model.
    adapter: int = 0
    lora_slot: int = 0
    cache_salt: bytes | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed
