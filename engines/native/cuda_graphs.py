"""CUDA graphs for decode-only steps.

A decode step of a small model on a GPU is dominated by launch overhead: a few hundred small
kernels per step, each microseconds of work. Capturing the whole decode forward pass (embedding,
every layer, paged attention, final norm, LM head) once per batch-size bucket and replaying it
turns those launches into one.

A graph replays fixed addresses and fixed shapes, so every input lives in a static buffer sized
for the largest bucket: a step of B sequences copies its tokens, positions, KV slots, block
tables and lengths into the first B rows and runs the smallest bucket >= B. The rows past B are
padding: they read one key of the scratch block (the KV pool's extra last block, which no
sequence owns) and write their own key/value there, so they touch nothing real. Attention reads
lengths and block tables from device memory (paged_attention.py), so one graph serves any mix of
sequence lengths up to `max_blocks` blocks.

With LoRA, each row's adapter slot is one more static input ([max_batch] int32, 0 for the base
model and for padding) that the gathered LoRA kernel reads, so one graph serves any mix of
adapters too.

Without CUDA (tests), `capture=False` runs the same padded static path eagerly, which is what
CPU CI checks against transformers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from engines.native.lora import LoraSlots, StepLora
from engines.native.model import LlamaModel, StepBatch
from engines.native.plan import PlanChunk

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 16 up to max_batch (and
    max_batch itself), so padding wastes at most 15 rows past 8."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache, *, block_size: int, max_batch: int,
                 max_blocks: int, scratch_block: int, capture: bool,
                 lora: LoraSlots | None = None) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.block_size, self.max_blocks = block_size, max_blocks
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        dev = model.device
        n = self.max_batch
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        # Static inputs; row i of every bucket's batch is row i of these.
        self.token_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, device=dev)
        self.lora = lora
        self.lora_rows = torch.zeros(n, dtype=torch.int32, device=dev)
        self.lora_kernel = None
        if lora is not None:
            from engines.native.lora_kernels import lora_delta_parts

            self.lora_kernel = lora_delta_parts
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def _batch(self, size: int) -> StepBatch:
        return StepBatch(
            token_ids=self.token_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            logits_index=self.rows[:size],
            decode_count=size,
            decode_slots=self.tables[:size],
            decode_mask=None,
            prefills=[],
            decode_seq_lens=self.seq_lens[:size],
            lora=(StepLora(self.lora, [], self.lora_rows[:size], self.lora_kernel)
                  if self.lora is not None else None),
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model.forward(self._batch(size), self.kv_cache)
        return self.model.logits(hidden)  # [size, V] fp32

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller graphs then fit in the memory pool the largest reserved.
        for size in reversed(self.sizes):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (allocator, Triton compile) off-graph
                self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.sizes,
                 time.perf_counter() - start)

    def fits(self, chunks: Sequence[PlanChunk]) -> bool:
        """Whether this step can run here: decode rows only, few enough, short enough."""
        return (0 < len(chunks) <= self.max_batch
                and all(c.is_decode and not c.prompt_targets
                        and c.start < self.max_blocks * self.block_size for c in chunks))

    @torch.inference_mode()
    def run(self, chunks: Sequence[PlanChunk]) -> torch.Tensor:
        """Logits [B, V] fp32 of the decode rows, in chunk order; ModelRunner.execute samples
        them like any other step's. With captured graphs the tensor is the graph's output
        buffer: read it before the next step."""
        b = len(chunks)
        size = next(s for s in self.sizes if s >= b)
        bs = self.block_size
        tokens, positions, slots, lens = [], [], [], []
        for c in chunks:
            tokens.append(c.token_ids[0])
            positions.append(c.start)
            slots.append(c.block_table[c.start // bs] * bs + c.start % bs)
            lens.append(c.start + 1)
        pad = size - b
        head = torch.tensor([tokens + [0] * pad, positions + [0] * pad,
                             slots + [self.scratch_slot] * pad, lens + [1] * pad])  # [4, size]
        self.token_ids[:size].copy_(head[0], non_blocking=True)
        self.positions[:size].copy_(head[1], non_blocking=True)
        self.slot_mapping[:size].copy_(head[2], non_blocking=True)
        self.seq_lens[:size].copy_(head[3], non_blocking=True)
        if self.lora is not None:
            slots = [c.lora_slot for c in chunks] + [0] * pad
            self.lora_rows[:size].copy_(torch.tensor(slots, dtype=torch.int32), non_blocking=True)
        width = max(-(-n // bs) for n in lens)
        # Shorter rows' tables are padded to the longest; the kernel stops at each row's length.
        tables = torch.tensor([c.block_table[:width] + [0] * (width - len(c.block_table))
                               for c in chunks], dtype=torch.int32)  # [B, width]
        self.tables[:b, :width].copy_(tables, non_blocking=True)
        if pad:
            self.tables[b:size, 0] = self.scratch_block
        graph = self.graphs.get(size)
        if graph is None:
            return self._forward(size)[:b]
        graph.replay()
        return self.outputs[size][:b]
