"""The native engine: continuous batching over a paged KV cache.

    engine.add_request(rid, prompt, params)   # any time, also between steps
    events = engine.step()                    # schedule -> run (model + sampling) -> update
    engine.abort(rid)                         # frees the request's KV blocks at once

A step is three calls, as in vLLM v1 / nano-vllm: the scheduler (scheduler.py, pure Python)
picks which tokens of which sequences to compute; the runner (runner.py, the only tensor code)
runs them and samples, returning plain lists; the update appends the tokens and applies the
stop rules. NativeEngine.step says where LoRA, structured output and speculative decoding go.

`generate_stream` / `generate` offer the same batch API as the `hf` engine on top of that, so the
LLM handler can use either engine.

With tensor parallelism (tp_size > 1, parallel.py) every rank builds a NativeEngine over its
shard of the weights. Rank 0's is the one above: it schedules, broadcasts each step's plan and
samples. The other ranks call `follow()`, which runs every broadcast plan until rank 0's
`shutdown()`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.detokenizer import TextStream
from engines.lora.slots import SlotTable
from engines.lora.store import AdapterRecord, AdapterStore
from engines.native.block_manager import BlockManager
from engines.native.model import LlamaModel
from engines.native.quant import resolve_method
from engines.native.spec import read_spec
from engines.native.plan import Keepalive, Shutdown, StepPlan, make_plan
from engines.native.runner import ModelRunner, ModelRunnerOutput
from engines.native.scheduler import Scheduler, SchedulerOutput
from engines.native.sequence import Sequence
from engines.sampler import RowState
from engines.tokenizing import TokenizerMixin
from engines.prompt import prompt_ids
from engines.types import (FinishReason, GenerationResult, SamplingParams, Token, TokenEvent,
                           collect_results)

log = logging.getLogger("lmc.native")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class _Request:
    rid: object
    seq: Sequence
    params: SamplingParams
    text: TextStream
    row: RowState
    prefill: tuple[Token, ...] | None = None
    first_event: bool = True
    # decoder_input_details: log-probs of prompt tokens 1.., filled in as prefill chunks run.
    prompt_lps: list[float | None] | None = None


class NativeEngine(TokenizerMixin):
    def __init__(self, model_dir: str, *, dtype: str = "auto", device: str | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 2048,
                 block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_gb: float | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, tp_size: int = 1,
                 attention_backend: str = "auto", cuda_graphs: bool | None = None,
                 enable_lora: bool = False, max_loras: int = 4, max_cpu_loras: int | None = None,
                 max_lora_rank: int = 16, quantize: str | None = None,
                 cpu_matmul: str = "auto") -> None:
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = Path(model_dir)
        spec, cfg = read_spec(path)
        self.tp = None
        if tp_size > 1:
            from engines.native.parallel import TensorParallel
            from engines.native.spec import check_divisible

            # Before touching the process group: a model that cannot split is a config error.
            check_divisible(num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                            intermediate_size=spec.intermediate_size, tp_size=tp_size)
            self.tp = TensorParallel(tp_size)
        if device is None and torch.cuda.is_available():
            # With TP the worker has set each rank's device (its slice of CUDA_VISIBLE_DEVICES).
            device = f"cuda:{torch.cuda.current_device()}" if self.tp else "cuda"
        self.device = torch.device(device or "cpu")
        self.dtype = self._resolve_dtype(dtype, cfg)
        # option.quantize: checked against the device before any weight is read.
        self.quantize = resolve_method(quantize, self.device) if quantize else None
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = LlamaModel(path, dtype=self.dtype, device=self.device, tp=self.tp,
                                quantize=self.quantize, cpu_matmul=cpu_matmul)
        self.max_context = spec.max_position_embeddings
        self.vocab_size = spec.vocab_size
        self.eos_token_ids = self._eos_ids(cfg, path)
        self._init_tokens()
        if num_blocks is None:
            num_blocks = self._num_blocks(block_size, kv_cache_gb, gpu_memory_utilization)
        if self.tp is not None:
            # Every rank must page identically: the smallest pool any rank can hold.
            num_blocks = self.tp.min_int(num_blocks)
        self.block_manager = BlockManager(num_blocks, block_size,
                                          enable_prefix_caching=enable_prefix_caching)
        # LoRA: adapters by name and their host-memory cache (any thread), the device slots
        # (engine thread), and the slot tensors the runner fills.
        self.lora_store: AdapterStore | None = None
        self.lora_slots: SlotTable | None = None
        lora_tensors = None
        if enable_lora:
            from engines.lora.weights import load_any
            from engines.native.lora import LoraSlots

            tp_rank, tp_world = (self.tp.rank, self.tp.size) if self.tp else (0, 1)
            self.lora_store = AdapterStore(
                spec, max_rank=max_lora_rank, max_cpu_loras=max_cpu_loras or max_loras,
                load=lambda p: load_any(p, spec, max_rank=max_lora_rank, dtype=self.dtype,
                                        device=self.device, tp_rank=tp_rank, tp_size=tp_world))
            self.lora_slots = SlotTable(max_loras)
            lora_tensors = LoraSlots(self.model, max_loras=max_loras, max_rank=max_lora_rank)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   lora=self.lora_slots)
        # One sequence can never hold more tokens than the whole KV pool: past that it would be
        # preempted and re-admitted forever, so such a sequence ends with "length" instead.
        self.max_context = min(self.max_context, num_blocks * block_size)
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=block_size,
                                  attention=attention_backend, cuda_graphs=cuda_graphs,
                                  max_batch=max_num_seqs, max_context=self.max_context,
                                  lora=lora_tensors,
                                  lora_loader=(self.lora_store.weights if self.lora_store
                                               else None))
        self._requests: dict[int, _Request] = {}
        self._by_rid: dict[object, int] = {}
        self._seq_ids = itertools.count()
        # Seq ids whose prompt log-probs are still being computed (decoder_input_details).
        self._want_prompt_lps: set[int] = set()
        self._stopped = False
        log.info("native engine: %s %s%s on %s, %d KV blocks of %d tokens, %s decode attention"
                 "%s%s%s", spec.architecture, self.dtype,
                 f" ({self.quantize} weights)" if self.quantize else
                 f" ({self.model.cpu_matmul} matmuls)" if self.device.type == "cpu" else "",
                 self.device,
                 num_blocks, block_size,
                 self.runner.attention, ", CUDA graphs" if self.runner.graphs else "",
                 f", tensor-parallel rank {self.tp.rank} of {self.tp.size}" if self.tp else "",
                 f", LoRA: {max_loras} slots of rank {max_lora_rank} "
                 f"({lora_tensors.nbytes() / 2**20:.0f} MiB)" if lora_tensors else "")

    # -- setup helpers --------------------------------------------------------------------------

    def _resolve_dtype(self, dtype: str, cfg: dict) -> torch.dtype:
        if dtype in _DTYPES:
            return _DTYPES[dtype]
        if dtype != "auto":
            raise ValueError(f"option.dtype={dtype!r} is not one of auto, fp32, fp16, bf16")
        if self.device.type == "cpu":
            return torch.float32  # half precision matmuls are slow on most CPUs
        return _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), torch.bfloat16)

    def _num_blocks(self, block_size: int, kv_cache_gb: float | None, utilization: float) -> int:
        per_block = self.model.kv_bytes_per_token() * block_size
        if kv_cache_gb is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * utilization
        else:
            budget = (kv_cache_gb if kv_cache_gb is not None else 2.0) * 1024**3
        return max(1, int(budget // per_block))

    def _eos_ids(self, cfg: dict, model_dir: Path) -> frozenset[int]:
        """EOS ids from config.json, generation_config.json and the tokenizer."""
        import json

        sources = [cfg.get("eos_token_id"), self.tokenizer.eos_token_id]
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        ids: set[int] = set()
        for src in sources:
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, list):
                ids.update(src)
        return frozenset(ids)

    # -- tokenizer API shared with the hf engine ------------------------------------------------

    # -- continuous batching API ----------------------------------------------------------------

    def add_request(self, rid: object, prompt: str | list[int], params: SamplingParams,
                    adapter: AdapterRecord | None = None) -> None:
        """`adapter`: a LoRA adapter of `lora_store` (None: the base model)."""
        ids = prompt_ids(prompt, params, encode=self.encode, vocab_size=self.vocab_size,
                         max_context=self.max_context)
        sid = next(self._seq_ids)
        stops = self.eos_token_ids if not params.ignore_eos_token else frozenset()
        stop_ids = frozenset(stops) | frozenset(params.stop_token_ids)
        seq = Sequence(sid, ids)
        if adapter is not None:
            if self.lora_slots is None:
                raise ValueError("LoRA is not enabled on this engine (option.enable_lora=true)")
            seq.adapter = adapter.uid
            seq.cache_salt = b"lora:" + adapter.uid.to_bytes(8, "little")
        req = _Request(rid, seq, params,
                       TextStream(self._decode, params.stop_sequences,
                                  min_new_tokens=params.min_new_tokens),
                       RowState(params, ids, stop_ids, device=self.device))
        if params.decoder_input_details:
            # Every prompt position must be computed to score it, so no prefix-cache hits.
            req.seq.skip_prefix_cache = True
            req.prompt_lps = [None] * (len(ids) - 1)
            self._want_prompt_lps.add(sid)
        self._requests[sid] = req
        self._by_rid[rid] = sid
        self.scheduler.add(req.seq)

    def abort(self, rid: object) -> None:
        sid = self._by_rid.pop(rid, None)
        if sid is not None:
            self._requests.pop(sid, None)
            self._want_prompt_lps.discard(sid)
            self.scheduler.abort(sid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- LoRA slots (engine thread; the store's registry is thread-safe on its own) -------------

    def pin_adapter(self, record: AdapterRecord) -> bool:
        """Give the adapter a slot for good; False when every slot is pinned or in use."""
        return self.lora_slots.pin(record.uid) is not None

    def unpin_adapter(self, record: AdapterRecord) -> None:
        self.lora_slots.unpin(record.uid)

    def drop_adapter(self, record: AdapterRecord) -> None:
        """Unregistered: its slot frees now, or when the last request using it ends."""
        self.lora_slots.remove(record.uid)

    def step(self) -> list[tuple[object, TokenEvent]]:
        """One engine step: (request id, event) for every request that produced a token.

        Schedule -> run -> update: the scheduler picks the chunks, the runner computes them
        and samples (tensors stay behind it), the update turns its plain lists into events.
        Features go behind these three calls, not into this method:
          LoRA                  the scheduler admits a sequence once its adapter has a slot;
                                the plan carries each chunk's slot and the slot loads; the
                                runner applies the weights to the chunk's rows.
          structured output     the grammar's mask state on the request's RowState; the
                                runner's sampling applies the mask, the update advances it.
          speculative decoding  the scheduler schedules draft tokens, the runner verifies
                                them, the update accepts several tokens per sequence.
        """
        assert self.is_leader, "ranks > 0 run follow(), never step()"
        if self._stopped:
            raise RuntimeError("the native engine was shut down")
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        output = self.runner.execute(self._plan(scheduled), self._sampling_rows(scheduled))
        return self._update(scheduled, output)

    def _plan(self, scheduled: SchedulerOutput) -> StepPlan:
        """The step's plan, sent to the other ranks first with tensor parallelism."""
        tables = {c.seq_id: self.block_manager.block_table(c.seq_id) for c in scheduled.chunks}
        loads = None
        if self.lora_slots is not None:
            loads = [(slot, uid, self.lora_store.by_uid(uid).path)
                     for slot, uid in self.lora_slots.take_loads()]
        plan = make_plan(scheduled, self.scheduler.seqs, tables, self._want_prompt_lps, loads)
        if self.tp is not None:
            self.tp.broadcast(plan)
        return plan

    def _sampling_rows(self, scheduled: SchedulerOutput) -> dict[int, RowState]:
        """Seq id -> sampling state of every chunk that samples this step."""
        return {c.seq_id: self._requests[c.seq_id].row for c in scheduled.chunks if c.sample}

    def _update(self, scheduled: SchedulerOutput,
                output: ModelRunnerOutput) -> list[tuple[object, TokenEvent]]:
        """Apply the runner's output: prompt log-probs, new tokens, stop rules; the events."""
        for sid, (pos, lps) in output.prompt_logprobs.items():
            # By position: a chunk recomputed after preemption overwrites the same values.
            self._requests[sid].prompt_lps[pos:pos + len(lps)] = lps
        self.scheduler.update(scheduled, dict(zip(output.seq_ids, output.token_ids)))
        events: list[tuple[object, TokenEvent]] = []
        for sid, token_id, log_prob, top in zip(output.seq_ids, output.token_ids,
                                                output.log_probs, output.top):
            req = self._requests[sid]
            if sid in self._want_prompt_lps:
                self._finish_prefill(req)
            events.append((req.rid, self._postprocess(req, token_id, log_prob, top)))
        return events

    # -- tensor parallelism ---------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True on rank 0 (and without TP): the rank that schedules and samples."""
        return self.tp is None or self.tp.is_leader

    def follow(self) -> None:
        """Ranks > 0: run every step rank 0 broadcasts until it shuts down. A broken process
        group (rank 0 died) raises from the collective, so the worker exits."""
        assert not self.is_leader, "rank 0 steps; only ranks > 0 follow"
        while True:
            message = self.tp.receive()
            if isinstance(message, StepPlan):
                self.runner.execute(message)  # no rows: only rank 0 samples
            elif isinstance(message, Shutdown):
                self.tp.barrier()  # the handshake: rank 0 knows every follower is out
                log.info("rank %d: rank 0 shut the engine down", self.tp.rank)
                return
            elif not isinstance(message, Keepalive):
                raise RuntimeError(f"rank {self.tp.rank} got an unknown control message "
                                   f"{type(message).__name__} from rank 0")

    def keepalive(self) -> None:
        """Rank 0, while idle: let the followers' wait start over (parallel.KEEPALIVE_S)."""
        if self.tp is not None and not self._stopped:
            self.tp.broadcast(Keepalive())

    def shutdown(self) -> None:
        """Rank 0: release the followers (they return from follow()). Idempotent; nothing to
        do without TP."""
        if self.tp is not None and self.is_leader and not self._stopped:
            self._stopped = True
            self.tp.broadcast(Shutdown())
            self.tp.barrier()

    def _finish_prefill(self, req: _Request) -> None:
        """The prompt is fully computed (the sequence just sampled): build its prefill tokens."""
        ids, lps = req.seq.prompt_ids, req.prompt_lps
        assert lps is not None and None not in lps, "a prompt position was never scored"
        req.prefill = (self._token(ids[0], None),
                       *(self._token(t, lp) for t, lp in zip(ids[1:], lps)))
        req.prompt_lps = None
        # Done scoring: a recompute after preemption may use the prefix cache again.
        req.seq.skip_prefix_cache = False
        self._want_prompt_lps.discard(req.seq.id)

    def _postprocess(self, req: _Request, token_id: int, log_prob: float,
                     top: list[tuple[int, float]]) -> TokenEvent:
        seq, p = req.seq, req.params
        n_out = len(seq.output_ids)
        finish: FinishReason | None = None
        # The sampler masks stop ids before min_new_tokens; the count check also covers a row
        # whose every other logit was -inf (as the hf engine does).
        if token_id in req.row.stop_ids and n_out > p.min_new_tokens:
            finish = FinishReason.EOS_TOKEN
        elif n_out >= p.max_new_tokens or seq.num_tokens >= self.max_context:
            finish = FinishReason.LENGTH
        # The stop token stays in the decoded ids, as in the hf engine: EOS is special and
        # decodes to nothing, while a plain stop_token_ids token keeps its text (as in vLLM).
        text, stopped = req.text.push(seq.output_ids, final=finish is not None)
        if stopped:
            finish = FinishReason.STOP_SEQUENCE
        event = TokenEvent(
            index=0, token=self._token(token_id, log_prob), text=text,
            top_tokens=tuple(self._token(t, lp) for t, lp in top),
            finish_reason=finish, prefill=req.prefill if req.first_event else None)
        req.first_event = False
        if finish is not None:
            self._requests.pop(seq.id, None)
            self._by_rid.pop(req.rid, None)
            self.scheduler.finish(seq.id)
        return event

    # -- batch API (same as the hf engine) ------------------------------------------------------

    def generate_stream(self, prompts: list[str | list[int]],
                        params: list[SamplingParams]) -> Iterator[list[TokenEvent]]:
        assert len(prompts) == len(params)
        keys = [object() for _ in prompts]
        index = {k: i for i, k in enumerate(keys)}
        try:
            for k, prompt, p in zip(keys, prompts, params):
                self.add_request(k, prompt, p)
            pending = set(keys)
            while pending:
                step = self.step()
                batch = []
                for rid, ev in step:
                    i = index[rid]
                    batch.append(TokenEvent(i, ev.token, ev.text, ev.top_tokens,
                                            ev.finish_reason, ev.prefill))
                    if ev.finish_reason is not None:
                        pending.discard(rid)
                if batch:
                    yield batch
        finally:
            for k in keys:
                self.abort(k)

    def generate(self, prompts: list[str | list[int]],
                 params: list[SamplingParams]) -> list[GenerationResult]:
        prompt_lens = [len(p) if isinstance(p, list) else len(self.encode(p)) for p in prompts]
        return collect_results(self.generate_stream(prompts, params), params, prompt_lens)
