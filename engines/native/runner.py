"""Model runner: the only part of the native engine that builds tensors.

Turns a SchedulerOutput (which tokens of which sequences to compute) plus the block tables into
a StepBatch, runs the model, and returns the logits of the rows that sample, in chunk order
(plus, for sequences that ask, the log-prob of every prompt token given the ones before it).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from engines.native.model import LlamaModel, StepBatch
from engines.native.scheduler import SchedulerOutput
from engines.native.sequence import Sequence


@dataclass
class RunnerOutput:
    logits: torch.Tensor | None  # [N, V] fp32, the sampling rows; None when nothing samples
    seq_ids: list[int]  # the seq id of each logits row
    # seq id -> (p, log-probs): log-probs of prompt tokens p + 1, p + 2, ... computed this step.
    prompt_logprobs: dict[int, tuple[int, list[float]]] = field(default_factory=dict)


@dataclass
class _PromptRows:
    """Rows of a prefill chunk whose logits score the next prompt token."""

    seq_id: int
    first_pos: int  # position of the first row; its logits score token first_pos + 1
    rows: list[int]
    targets: list[int]


class ModelRunner:
    def __init__(self, model: LlamaModel, *, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        self.kv_cache = model.allocate_kv_cache(num_blocks, block_size)
        self.sliding_window = model.spec.sliding_window

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def build(self, out: SchedulerOutput, seqs: dict[int, Sequence],
              tables: dict[int, list[int]], prompt_logprobs: Collection[int] = (),
              ) -> tuple[StepBatch, list[int], list[_PromptRows]]:
        """The step's tensors, the seq ids of the sampling rows in order, and the prompt rows
        scored for the sequences in `prompt_logprobs` (their logits come after the sampling
        rows')."""
        dev = self.device
        decodes = [c for c in out.chunks if c.num_tokens == 1 and c.sample]
        prefills = [c for c in out.chunks if not (c.num_tokens == 1 and c.sample)]
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_rows: list[int] = []
        logits_seq: list[int] = []
        prompt_rows: list[_PromptRows] = []

        # Decode rows: one token each, attending to everything before it (and itself).
        lengths = []
        for c in decodes:
            seq = seqs[c.seq_id]
            table = tables[c.seq_id]
            token_ids.append(seq.token_ids[c.start])
            positions.append(c.start)
            slot_mapping.extend(self._slots(table, c.start, c.start + 1))
            lengths.append(c.start + 1)
            logits_rows.append(len(token_ids) - 1)
            logits_seq.append(c.seq_id)
        decode_slots = decode_mask = None
        if decodes:
            max_len = max(lengths)
            bs = self.block_size
            max_blocks = -(-max_len // bs)
            # Whole blocks are gathered (one contiguous block_size x KV x D copy each), so the
            # key axis is padded to a block multiple and masked past each row's length.
            decode_slots = torch.tensor([(tables[c.seq_id] + [0] * max_blocks)[:max_blocks]
                                         for c in decodes], dtype=torch.long, device=dev)  # [B, NB]
            pos = torch.arange(max_blocks * bs, device=dev)  # [L = NB * bs]
            lens = torch.tensor(lengths, device=dev)[:, None]  # [B, 1]
            mask = pos[None, :] < lens  # [B, L]
            if self.sliding_window:
                mask &= pos[None, :] > lens - 1 - self.sliding_window
            decode_mask = mask[:, None, None, :]  # [B, 1, 1, L]

        prefill_parts = []
        for c in prefills:
            seq = seqs[c.seq_id]
            table = tables[c.seq_id]
            row = len(token_ids)
            end = c.start + c.num_tokens
            token_ids.extend(seq.token_ids[c.start:end])
            positions.extend(range(c.start, end))
            slot_mapping.extend(self._slots(table, c.start, end))
            if c.start == 0 and not (self.sliding_window and end > self.sliding_window):
                prefill_parts.append((row, c.num_tokens, None, None))
            else:
                kpos = torch.arange(end, device=dev)  # [L]
                qpos = torch.arange(c.start, end, device=dev)[:, None]  # [n, 1]
                mask = kpos[None, :] <= qpos  # [n, L] causal, offset by the chunk's start
                if self.sliding_window:
                    mask &= kpos[None, :] > qpos - self.sliding_window
                slots = torch.tensor(self._slots(table, 0, end), dtype=torch.long, device=dev)
                prefill_parts.append((row, c.num_tokens, slots, mask))
            if c.sample:
                logits_rows.append(row + c.num_tokens - 1)
                logits_seq.append(c.seq_id)
            if c.seq_id in prompt_logprobs:
                # Rows at positions p < prompt_len - 1 predict prompt token p + 1. (A 1-token
                # chunk that samples sits at the last position: it never has one.)
                stop = min(end, len(seq.prompt_ids) - 1)
                if stop > c.start:
                    prompt_rows.append(_PromptRows(
                        c.seq_id, c.start, list(range(row, row + stop - c.start)),
                        seq.prompt_ids[c.start + 1:stop + 1]))

        batch = StepBatch(
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            logits_index=torch.tensor(logits_rows + [r for pr in prompt_rows for r in pr.rows],
                                      dtype=torch.long, device=dev),
            decode_count=len(decodes),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            decode_key=tuple(c.seq_id for c in decodes),
            decode_lens=tuple(lengths),
            prefills=prefill_parts,
        )
        return batch, logits_seq, prompt_rows

    @torch.inference_mode()
    def run(self, out: SchedulerOutput, seqs: dict[int, Sequence],
            tables: dict[int, list[int]], *, prompt_logprobs: Collection[int] = ()) -> RunnerOutput:
        """Logits of the sampling rows with their seq ids; for the sequences in
        `prompt_logprobs`, the log-probs of the prompt tokens their chunks cover."""
        batch, logits_seq, prompt_rows = self.build(out, seqs, tables, prompt_logprobs)
        hidden = self.model.forward(batch, self.kv_cache)
        if not logits_seq and not prompt_rows:
            return RunnerOutput(None, [])
        logits = self.model.logits(hidden)  # [N + P, V] fp32
        n = len(logits_seq)
        result = RunnerOutput(logits[:n] if n else None, logits_seq)
        if prompt_rows:
            # As the hf engine: log_softmax of the raw logits, gathered at the next token.
            targets = torch.tensor([t for pr in prompt_rows for t in pr.targets],
                                   device=self.device)[:, None]  # [P, 1]
            lps = logits[n:].log_softmax(dim=-1).gather(1, targets)[:, 0].tolist()  # [P]
            i = 0
            for pr in prompt_rows:
                result.prompt_logprobs[pr.seq_id] = (pr.first_pos, lps[i:i + len(pr.rows)])
                i += len(pr.rows)
        return result
