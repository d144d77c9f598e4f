"""What one engine step computes, as plain data (pure Python, no torch).

The engine turns the scheduler's output into a StepPlan; the model runner builds its tensors
from the plan alone. With tensor parallelism rank 0 broadcasts the plan and every rank builds
the same batch from it, so the plan carries everything the runner reads: each chunk's tokens
and block table, and the prompt tokens it scores for decoder_input_details.

Rank 0 also sends Keepalive while idle (so a follower's wait never reaches the process group's
timeout) and Shutdown when its engine stops.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from engines.native.scheduler import SchedulerOutput
from engines.native.sequence import Sequence


@dataclass(frozen=True, slots=True)
class PlanChunk:
    """Compute tokens [start, start + num_tokens) of sequence `seq_id`."""

    seq_id: int
    start: int
    num_tokens: int
    sample: bool  # its last row's logits give the sequence's next token
    token_ids: list[int]  # the chunk's tokens: num_tokens of them
    block_table: list[int]  # the sequence's KV blocks, covering at least start + num_tokens
    # Prompt log-probs: the prompt tokens at positions start + 1, start + 2, ... that this
    # chunk's rows score (one per row, from the first row on); empty when none are wanted.
    prompt_targets: list[int] = field(default_factory=list)
    lora_slot: int = 0  # the LoRA weight slot its rows use (0: the base model)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.sample


@dataclass(frozen=True, slots=True)
class StepPlan:
    chunks: list[PlanChunk]
    # LoRA weights to put in slots before this step runs: (slot, adapter uid, adapter path).
    # Every rank loads its own shard, so the path travels with the plan.
    lora_loads: list[tuple[int, int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Nothing to compute: rank 0 is idle and still alive."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Rank 0's engine stopped: followers return from follow()."""


def make_plan(out: SchedulerOutput, seqs: Mapping[int, Sequence],
              tables: Mapping[int, list[int]], prompt_logprobs: Collection[int] = (),
              lora_loads: list[tuple[int, int, str]] | None = None) -> StepPlan:
    """The plan for the scheduler's chunks; `prompt_logprobs`: seq ids whose prompt tokens are
    scored (decoder_input_details)."""
    chunks = []
    for c in out.chunks:
        seq = seqs[c.seq_id]
        end = c.start + c.num_tokens
        targets: list[int] = []
        if c.seq_id in prompt_logprobs:
            # Rows at positions p < prompt_len - 1 predict prompt token p + 1. (A 1-token chunk
            # that samples sits at the last position: it never has one.)
            stop = min(end, len(seq.prompt_ids) - 1)
            targets = seq.prompt_ids[c.start + 1:stop + 1]
        chunks.append(PlanChunk(c.seq_id, c.start, c.num_tokens, c.sample,
                                seq.token_ids[c.start:end], tables[c.seq_id], targets,
                                seq.lora_slot))
    return StepPlan(chunks, lora_loads or [])
