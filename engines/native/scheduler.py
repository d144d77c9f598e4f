"""Token-budget continuous batching (pure Python, no torch).

Every step the scheduler fills a budget of `max_num_batched_tokens`:
  1. running sequences first, oldest first: one token each when decoding, or the next chunk of a
     prompt that is still being prefilled;
  2. then waiting sequences in arrival order (preempted ones first), each with as much of its
     prompt as the budget allows (chunked prefill), while fewer than `max_num_seqs` run.
When the KV cache has no block for a running sequence, the most recently admitted running
sequence is preempted by recompute: its blocks are freed and it goes back to the front of the
waiting queue, to be recomputed (prompt + what it generated so far) once blocks free up.

The engine's step is: out = schedule(); sampled = runner(out); scheduler.update(out, sampled).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engines.lora.slots import SlotTable
from engines.native.block_manager import BlockManager
from engines.native.sequence import Sequence, SeqStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of sequence `seq_id` this step."""

    seq_id: int
    start: int
    num_tokens: int
    # True when the chunk ends at the sequence's last known token: its logits give the next
    # token. False for a prompt chunk that is not the last one.
    sample: bool


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, lora: SlotTable | None = None) -> None:
        assert max_num_seqs > 0 and max_num_batched_tokens > 0
        self.bm = block_manager
        # LoRA weight slots: a waiting sequence is admitted only once its adapter has one.
        self.lora = lora
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seqs: dict[int, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last is preempted first
        self.num_preemptions = 0

    # -- requests come and go ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        assert seq.id not in self.seqs
        self.seqs[seq.id] = seq
        self.waiting.append(seq)

    def finish(self, seq_id: int) -> None:
        """A sequence is done (stop condition or abort): free its blocks at once."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.bm.free(seq_id)
        self._release_slot(seq)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot:
            self.lora.release(seq.adapter)
            seq.lora_slot = 0

    abort = finish

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- the policy ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # 1. Running sequences, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.bm.grow(seq.id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.chunks.append(ScheduledChunk(seq.id, seq.num_computed, n,
                                                 seq.num_computed + n == seq.num_tokens))
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted: no room for anyone newer either

        # 2. Waiting sequences, in order, while there is budget, room and blocks. One whose
        # LoRA adapter has no free slot yet is passed over (it keeps its place) rather than
        # holding up requests for the base model or for adapters already loaded.
        preempted_now = set(out.preempted)
        passed: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.id in preempted_now:
                break  # do not re-admit in the step that preempted it
            if seq.adapter:
                slot = self.lora.acquire(seq.adapter)
                if slot is None:
                    passed.append(self.waiting.popleft())
                    continue
                seq.lora_slot = slot
            # Blocks for the cached prefix + 1 token first, then grow to the chunk we can afford.
            cached = self.bm.allocate(seq.id, seq.token_ids, 1,
                                      use_prefix_cache=not seq.skip_prefix_cache,
                                      salt=seq.cache_salt)
            if cached is None:
                self._release_slot(seq)
                break  # FIFO: no overtaking a request that does not fit yet
            if seq.num_preemptions == 0:
                seq.num_cached_prompt = cached
            seq.num_computed = cached
            n = min(seq.num_uncomputed, budget)
            if not self.bm.grow(seq.id, seq.num_computed + n):
                self.bm.free(seq.id)
                self._release_slot(seq)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq.id, seq.num_computed, n,
                                             seq.num_computed + n == seq.num_tokens))
            budget -= n
        self.waiting.extendleft(reversed(passed))
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free(seq.id)
        self._release_slot(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq.id)
        # Drop chunks already scheduled for it this step.
        out.chunks = [c for c in out.chunks if c.seq_id != seq.id]

    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """After the model ran `out`: mark the chunks computed and append sampled tokens.
        `sampled` maps seq id -> new token for every chunk with sample=True."""
        for c in out.chunks:
            seq = self.seqs.get(c.seq_id)
            if seq is None:
                continue  # finished/aborted meanwhile
            seq.num_computed = c.start + c.num_tokens
            self.bm.register_full_blocks(seq.id, seq.token_ids, seq.num_computed)
            if c.sample:
                seq.output_ids.append(sampled[c.seq_id])
