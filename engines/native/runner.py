"""Model runner: the only part of the native engine that builds and reads tensors.

Turns a StepPlan (which tokens of which sequences to compute, with their block tables) into a
StepBatch, runs the model (or replays a CUDA graph for a decode-only step), samples the next
token of every row that samples from its request's RowState, and scores prompt tokens for the
sequences that ask (decoder_input_details). What comes back is a ModelRunnerOutput of plain
Python lists, as vLLM v1's runner returns: the engine never touches a tensor.

With tensor parallelism every rank runs the same plan (the forward pass meets the other ranks in
its collectives); only rank 0 gets logits, so only rank 0 samples, and the other ranks get an
empty output.

LoRA: the plan says which adapter weights to load into which slot before the step (every rank
loads its own shard) and each chunk's slot; the runner orders the rows by slot and hands the
model the groups (engines/native/lora.py). Future features (NativeEngine.step has the list):
the sampling applies a RowState's grammar mask, and speculative decoding's verification of
draft tokens happens here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from engines.native.lora import LoraSlots, StepLora, pack_groups, row_groups
from engines.native.model import LlamaModel, StepBatch
from engines.native.plan import PlanChunk, StepPlan
from engines.sampler import RowState, StepOutput, sample_rows
from engines.options import ATTENTION_BACKENDS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelRunnerOutput:
    """One step's results as plain Python (no tensors). Entry i of `token_ids`, `log_probs` and
    `top` is the token sampled for sequence `seq_ids[i]`, in plan chunk order (decodes first)."""

    seq_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)  # of each chosen token
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # (id, log-prob), best first
    # seq id -> (p, log-probs): log-probs of prompt tokens p + 1, p + 2, ... computed this step.
    prompt_logprobs: dict[int, tuple[int, list[float]]] = field(default_factory=dict)


@dataclass
class _PromptRows:
    """Rows of a prefill chunk whose logits score the next prompt token."""

    seq_id: int
    first_pos: int  # position of the first row; its logits score token first_pos + 1
    rows: list[int]
    targets: list[int]


@dataclass(slots=True)
class _Rows:
    """A step's flat per-token inputs, filled chunk by chunk, and the rows that sample."""

    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    lora_slots: list[int] = field(default_factory=list)  # each row's LoRA slot (0: none)
    logits_rows: list[int] = field(default_factory=list)  # the sampling rows, in order
    logits_seq: list[int] = field(default_factory=list)  # the seq id of each

    def sample(self, row: int, seq_id: int) -> None:
        self.logits_rows.append(row)
        self.logits_seq.append(seq_id)




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
                 max_context: int | None = None, lora: LoraSlots | None = None,
                 lora_loader: Callable[[int, str], object] | None = None) -> None:
        self.model = model
        # LoRA: the weight slots, and how to get an adapter's weights (uid, path) -> LoraWeights.
        self.lora = lora
        self.lora_loader = lora_loader
        self.lora_kernel = None
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        # One block more than the block manager hands out: padded rows of a CUDA graph write
        # their keys and values there.
        self.kv_cache = model.allocate_kv_cache(num_blocks + 1, block_size)
        self.sliding_window = model.spec.sliding_window
        check_attention_backend(attention)
        # The C++ decode attention: on CPU, fp32 or bf16, where the kernels built.
        cpp = model.cpu_ops.decode_attention if model.cpu_ops is not None else None
        if attention == "auto":
            if self.device.type == "cuda":
                attention = "triton" if _triton_installed() else "torch"
            else:
                attention = "cpp" if cpp is not None else "torch"
        elif attention == "triton" and not _triton_installed():
            raise ValueError("option.attention_backend=triton needs the triton package")
        elif attention == "cpp" and cpp is None:
            from engines.native import cpu_kernels

            raise ValueError("option.attention_backend=cpp needs a CPU device, fp32 or bf16 "
                             f"and the C++ kernels built ({model.device.type}, "
                             f"{model.dtype}; {cpu_kernels.error() or 'not tried'})")
        self.attention = attention
        model.decode_kernel = cpp if attention == "cpp" else None
        if lora is not None and attention == "triton":
            # With the GPU kernels (compiled on CUDA; in Triton's interpreter on CPU, for tests)
            # each row reads its own adapter slot: one launch pair per op, any mix of adapters.
            from engines.native.lora_kernels import lora_delta_parts

            self.lora_kernel = lora_delta_parts
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
                capture=self.device.type == "cuda", lora=lora)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def build(self, plan: StepPlan) -> tuple[StepBatch, list[int], list[_PromptRows]]:
        """The step's tensors, the seq ids of the sampling rows in order, and the prompt rows
        scored for the chunks with prompt targets (their logits come after the sampling
        rows')."""
        dev = self.device
        decodes = [c for c in plan.chunks if c.is_decode]
        prefill_chunks = [c for c in plan.chunks if not c.is_decode]
        if self.lora is not None:
            # Rows of one adapter side by side: each adapter is then one slice per op.
            decodes.sort(key=lambda c: c.lora_slot)
            prefill_chunks.sort(key=lambda c: c.lora_slot)
        rows = _Rows()
        # Decode rows: one token each, attending to everything before it (and itself).
        lengths = []
        for c in decodes:
            rows.token_ids.append(c.token_ids[0])
            rows.lora_slots.append(c.lora_slot)
            rows.positions.append(c.start)
            rows.slot_mapping.extend(self._slots(c.block_table, c.start, c.start + 1))
            lengths.append(c.start + 1)
            rows.sample(len(rows.token_ids) - 1, c.seq_id)
        decode_slots, decode_mask, decode_seq_lens = self._decode_inputs(decodes, lengths)
        prefills, prompt_rows = self._add_prefills(rows, prefill_chunks)
        batch = StepBatch(
            token_ids=torch.tensor(rows.token_ids, dtype=torch.long, device=dev),  # [T]
            positions=torch.tensor(rows.positions, dtype=torch.long, device=dev),  # [T]
            slot_mapping=torch.tensor(rows.slot_mapping, dtype=torch.long, device=dev),  # [T]
            logits_index=torch.tensor(rows.logits_rows + [r for pr in prompt_rows for r in pr.rows],
                                      dtype=torch.long, device=dev),  # [N + P]
            decode_count=len(decodes),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            decode_key=tuple(c.seq_id for c in decodes),
            decode_lens=tuple(lengths),
            prefills=prefills,
            decode_seq_lens=decode_seq_lens,
            lora=self._step_lora(rows.lora_slots),
        )
        return batch, rows.logits_seq, prompt_rows

    def _step_lora(self, slots: list[int]) -> StepLora | None:
        if self.lora is None or not any(slots):
            return None
        if self.lora_kernel is not None:
            row_slots = torch.tensor(slots, dtype=torch.int32, device=self.device)
            return StepLora(self.lora, [], row_slots, self.lora_kernel)
        groups = row_groups(slots)
        return StepLora(self.lora, groups,
                        packed=pack_groups(groups, len(slots), device=self.device))

    def _load_adapters(self, plan: StepPlan) -> None:
        """Put the plan's adapters into their slots (before any row uses them)."""
        for slot, uid, path in plan.lora_loads:
            self.lora.load(slot, self.lora_loader(uid, path))

    def _decode_inputs(self, decodes: list[PlanChunk], lengths: list[int]) -> tuple[
            torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(block tables, attention mask, lengths) of the decode rows, as StepBatch wants them
        for this runner's attention backend; all None without decode rows."""
        if not decodes:
            return None, None, None
        dev, bs = self.device, self.block_size
        max_blocks = -(-max(lengths) // bs)
        slots = torch.tensor([(c.block_table + [0] * max_blocks)[:max_blocks] for c in decodes],
                             dtype=torch.long, device=dev)  # [B, NB]
        if self.attention == "triton":
            return slots, None, torch.tensor(lengths, dtype=torch.int32, device=dev)  # [B]
        # Whole blocks are gathered (one contiguous block_size x KV x D copy each), so the key
        # axis is padded to a block multiple and masked past each row's length.
        pos = torch.arange(max_blocks * bs, device=dev)  # [L = NB * bs]
        lens = torch.tensor(lengths, device=dev)[:, None]  # [B, 1]
        mask = pos[None, :] < lens  # [B, L]
        if self.sliding_window:
            mask &= pos[None, :] > lens - 1 - self.sliding_window
        return slots, mask[:, None, None, :], None  # mask [B, 1, 1, L]

    def _add_prefills(self, rows: _Rows, prefills: list[PlanChunk]) -> tuple[
            list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]], list[_PromptRows]]:
        """Append the prefill chunks' rows; StepBatch.prefills and the scored prompt rows."""
        dev = self.device
        parts = []
        prompt_rows: list[_PromptRows] = []
        for c in prefills:
            table = c.block_table
            row = len(rows.token_ids)
            end = c.start + c.num_tokens
            rows.token_ids.extend(c.token_ids)
            rows.lora_slots.extend([c.lora_slot] * c.num_tokens)
            rows.positions.extend(range(c.start, end))
            rows.slot_mapping.extend(self._slots(table, c.start, end))
            if c.start == 0 and not (self.sliding_window and end > self.sliding_window):
                parts.append((row, c.num_tokens, None, None))
            else:
                kpos = torch.arange(end, device=dev)  # [L]
                qpos = torch.arange(c.start, end, device=dev)[:, None]  # [n, 1]
                mask = kpos[None, :] <= qpos  # [n, L] causal, offset by the chunk's start
                if self.sliding_window:
                    mask &= kpos[None, :] > qpos - self.sliding_window
                slots = torch.tensor(self._slots(table, 0, end), dtype=torch.long, device=dev)
                parts.append((row, c.num_tokens, slots, mask))
            if c.sample:
                rows.sample(row + c.num_tokens - 1, c.seq_id)
            if c.prompt_targets:
                prompt_rows.append(_PromptRows(
                    c.seq_id, c.start, list(range(row, row + len(c.prompt_targets))),
                    c.prompt_targets))
        return parts, prompt_rows

    @torch.inference_mode()
    def execute(self, plan: StepPlan,
                rows: Mapping[int, RowState] | None = None) -> ModelRunnerOutput:
        """Run the plan and sample: `rows` holds the RowState of every chunk that samples (by
        seq id). With tensor parallelism, ranks > 0 pass no rows and get an empty output."""
        logits, seq_ids, prompt_rows = self._logits(plan)
        if logits is None:
            return ModelRunnerOutput()
        assert rows is not None, "the rank that gets logits samples: it must pass the rows"
        n = len(seq_ids)
        sampled = (sample_rows(logits[:n], [rows[s] for s in seq_ids]) if n
                   else StepOutput([], [], []))
        prompt_lps = self._prompt_logprobs(logits[n:], prompt_rows) if prompt_rows else {}
        return ModelRunnerOutput(seq_ids, sampled.token_ids, sampled.log_probs, sampled.top,
                                 prompt_lps)

    def _logits(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[int], list[_PromptRows]]:
        """Logits [N + P, V] fp32 of the sampling rows (N, their seq ids in order) and then the
        scored prompt rows (P); None when nothing samples or scores, and on TP ranks > 0."""
        if plan.lora_loads:
            self._load_adapters(plan)
        if self.graphs is not None and self.graphs.fits(plan.chunks):
            # A graph's output buffer: sampled before the next step overwrites it.
            return self.graphs.run(plan.chunks), [c.seq_id for c in plan.chunks], []
        batch, seq_ids, prompt_rows = self.build(plan)
        hidden = self.model.forward(batch, self.kv_cache)
        if not seq_ids and not prompt_rows:
            return None, [], []
        return self.model.logits(hidden), seq_ids, prompt_rows

    def _prompt_logprobs(self, logits: torch.Tensor,
                         prompt_rows: list[_PromptRows]) -> dict[int, tuple[int, list[float]]]:
        """Seq id -> (first position, log-probs of the prompt tokens its rows score).
        logits: [P, V], the prompt rows' in order."""
        # As the hf engine: log_softmax of the raw logits, gathered at the next token.
        targets = torch.tensor([t for pr in prompt_rows for t in pr.targets],
                               device=self.device)[:, None]  # [P, 1]
        lps = logits.log_softmax(dim=-1).gather(1, targets)[:, 0].tolist()  # [P]
        out, i = {}, 0
        for pr in prompt_rows:
            out[pr.seq_id] = (pr.first_pos, lps[i:i + len(pr.rows)])
            i += len(pr.rows)
        return out
