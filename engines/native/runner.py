"""Model runner: the only part of the native engine that builds tensors.

Turns a StepPlan (which tokens of which sequences to compute, with their block tables) into a
StepBatch, runs the model, and returns the logits of the rows that sample, in chunk order (plus,
for sequences that ask, the log-prob of every prompt token given the ones before it). With
tensor parallelism every rank runs the same plan; only rank 0 gets logits back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engines.native.model import LlamaModel, StepBatch
from engines.native.plan import StepPlan

log = logging.getLogger(__name__)


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


ATTENTION_BACKENDS = ("auto", "triton", "torch")


def check_attention_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"option.attention_backend={name!r} is not one of "
                         f"{', '.join(ATTENTION_BACKENDS)}")
    return name


def _triton_installed() -> bool:
    # Without importing it: Triton is large, and on CPU only the interpreter tests use it.
    import importlib.util

    return importlib.util.find_spec("triton") is not None


class ModelRunner:
    """`attention`: how decode rows attend. "triton": the paged-attention kernel, reading KV
    blocks in place (compiled on CUDA, interpreted on CPU, which only tests want); "torch":
    gather + SDPA, with contiguous per-sequence buffers on CPU; "auto": triton on CUDA when
    Triton is installed, else torch. `cuda_graphs`: replay captured graphs for decode-only steps
    of up to `max_batch` rows (needs the triton backend; None: on CUDA without TP; True on CPU
    runs the same padded static path uncaptured, for tests)."""

    def __init__(self, model: LlamaModel, *, num_blocks: int, block_size: int,
                 attention: str = "auto", cuda_graphs: bool | None = None, max_batch: int = 32,
                 max_context: int | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        # One block more than the block manager hands out: padded rows of a CUDA graph write
        # their keys and values there.
        self.kv_cache = model.allocate_kv_cache(num_blocks + 1, block_size)
        self.sliding_window = model.spec.sliding_window
        check_attention_backend(attention)
        if attention == "auto":
            attention = "triton" if self.device.type == "cuda" and _triton_installed() else "torch"
        elif attention == "triton" and not _triton_installed():
            raise ValueError("option.attention_backend=triton needs the triton package")
        self.attention = attention
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and model.tp is None
        if cuda_graphs and attention != "triton":
            log.info("CUDA graphs off: decode attention is %s, not the paged kernel", attention)
            cuda_graphs = False
        self.graphs = None
        if cuda_graphs:
            from engines.native.cuda_graphs import DecodeGraphs

            context = max_context or num_blocks * block_size
            self.graphs = DecodeGraphs(
                model, self.kv_cache, block_size=block_size, max_batch=max_batch,
                max_blocks=-(-context // block_size), scratch_block=num_blocks,
                capture=self.device.type == "cuda")

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def build(self, plan: StepPlan) -> tuple[StepBatch, list[int], list[_PromptRows]]:
        """The step's tensors, the seq ids of the sampling rows in order, and the prompt rows
        scored for the chunks with prompt targets (their logits come after the sampling
        rows')."""
        dev = self.device
        decodes = [c for c in plan.chunks if c.is_decode]
        prefills = [c for c in plan.chunks if not c.is_decode]
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_rows: list[int] = []
        logits_seq: list[int] = []
        prompt_rows: list[_PromptRows] = []

        # Decode rows: one token each, attending to everything before it (and itself).
        lengths = []
        for c in decodes:
            token_ids.append(c.token_ids[0])
            positions.append(c.start)
            slot_mapping.extend(self._slots(c.block_table, c.start, c.start + 1))
            lengths.append(c.start + 1)
            logits_rows.append(len(token_ids) - 1)
            logits_seq.append(c.seq_id)
        decode_slots = decode_mask = decode_seq_lens = None
        if decodes:
            max_len = max(lengths)
            bs = self.block_size
            max_blocks = -(-max_len // bs)
            decode_slots = torch.tensor([(c.block_table + [0] * max_blocks)[:max_blocks]
                                         for c in decodes], dtype=torch.long, device=dev)  # [B, NB]
        if decodes and self.attention == "triton":
            decode_seq_lens = torch.tensor(lengths, dtype=torch.int32, device=dev)  # [B]
        elif decodes:
            # Whole blocks are gathered (one contiguous block_size x KV x D copy each), so the
            # key axis is padded to a block multiple and masked past each row's length.
            pos = torch.arange(max_blocks * bs, device=dev)  # [L = NB * bs]
            lens = torch.tensor(lengths, device=dev)[:, None]  # [B, 1]
            mask = pos[None, :] < lens  # [B, L]
            if self.sliding_window:
                mask &= pos[None, :] > lens - 1 - self.sliding_window
            decode_mask = mask[:, None, None, :]  # [B, 1, 1, L]

        prefill_parts = []
        for c in prefills:
            table = c.block_table
            row = len(token_ids)
            end = c.start + c.num_tokens
            token_ids.extend(c.token_ids)
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
            if c.prompt_targets:
                prompt_rows.append(_PromptRows(
                    c.seq_id, c.start, list(range(row, row + len(c.prompt_targets))),
                    c.prompt_targets))

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
            decode_seq_lens=decode_seq_lens,
        )
        return batch, logits_seq, prompt_rows

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> RunnerOutput:
        """Logits of the sampling rows with their seq ids; for the chunks with prompt targets,
        the log-probs of those prompt tokens. With tensor parallelism, ranks > 0 get an empty
        output (rank 0 alone samples)."""
        if self.graphs is not None and self.graphs.fits(plan.chunks):
            return RunnerOutput(self.graphs.run(plan.chunks), [c.seq_id for c in plan.chunks])
        batch, logits_seq, prompt_rows = self.build(plan)
        hidden = self.model.forward(batch, self.kv_cache)
        if not logits_seq and not prompt_rows:
            return RunnerOutput(None, [])
        logits = self.model.logits(hidden)  # [N + P, V] fp32; None on ranks > 0
        if logits is None:
            return RunnerOutput(None, [])
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
