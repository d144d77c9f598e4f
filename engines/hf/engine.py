"""The `hf` engine: any transformers causal LM, one static batch per call.

Requests in a call run as one left-padded batch with a KV cache carried across steps; each row
keeps its own sampling parameters and its own seeded generator, so one request's result does not
depend on what it was batched with (up to float noise from padding). The decode loop is ours
rather than `model.generate` so that per-request seeds, lengths, stop rules, streaming and
log-probs need no global RNG state or generate() hooks; greedy output still equals
`model.generate` token for token.

`generate_stream` is the loop; `generate` collects its events.

LoRA (option.enable_lora): adapters are PEFT adapters on the model (PeftModel), checked at
registration like the native engine's (engines/lora/config.py). A call whose prompts use several
adapters runs one static batch per adapter (the base model's with the adapters disabled), one
after the other; a linear merge is PEFT's add_weighted_adapter with combination_type "cat"
(ΔW = Σ w_i ΔW_i, the native engine's merge).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engines.contracts.engine import Capabilities
from engines.detokenizer import TextStream
from engines.lora.api import LoraApi
from engines.lora.store import AdapterRecord, AdapterStore
from engines.tokenizing import TokenizerMixin
from engines.prompt import prompt_ids as checked_prompt_ids
from engines.sampler import RowState, sample_rows
from engines.types import (
    FinishReason,
    GenerationResult,
    SamplingParams,
    Token,
    TokenEvent,
    collect_results,
)

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DTYPE_CHOICES = ("auto", *_DTYPES)

# Tokenizers without a real limit report this sentinel (int(1e30)) as model_max_length.
_NO_TOKENIZER_LIMIT = 10**9


@dataclass(slots=True)
class _Row:
    """One request's decode state inside a batch."""

    index: int  # position in the caller's list
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_new_tokens, clipped so prompt + output fits the context
    stop_ids: frozenset[int]  # generating one of these ends the request (EOS, stop_token_ids)
    text: TextStream
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class HFEngine(LoraApi, TokenizerMixin):
    """Loads a local HF model dir (safetensors) with transformers and generates in batches."""

    # One call at a time: each call is its own static batch (engines/contracts/engine.py).
    capabilities = Capabilities()
    lora_store: AdapterStore | None = None

    def __init__(self, model_dir: str, *, dtype: str = "auto", device: str | None = None,
                 enable_lora: bool = False, max_loras: int = 4, max_cpu_loras: int | None = None,
                 max_lora_rank: int = 16) -> None:
        # Models come from local dirs only; a hub lookup would hang without network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a model dir: it has no config.json")

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self._resolve_dtype(path, dtype), local_files_only=True
        ).to(self.device)
        self.model.eval()
        self.dtype: torch.dtype = self.model.dtype

        self.eos_token_ids = self._eos_token_ids()
        self.vocab_size: int = self.model.get_input_embeddings().num_embeddings
        self._init_tokens()
        # Padding only fills masked slots, so any id works; EOS is the usual choice when the
        # tokenizer has no pad token.
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else min(self.eos_token_ids, default=0)
        if enable_lora:
            from engines.lora.config import base_spec_or_none

            self.capabilities = Capabilities(lora=True)
            self._peft_names = (f"lmc{i}" for i in itertools.count())
            self.lora_store = AdapterStore(
                base_spec_or_none(path), max_rank=max_lora_rank,
                # Every adapter PEFT loads stays on the model; the cache bounds how many.
                max_cpu_loras=max(max_cpu_loras or max_loras, max_loras), load=self._peft_load,
                on_evict=self._peft_delete)

    # ------------------------------------------------------------------------------------------
    # LoRA (PEFT)
    # ------------------------------------------------------------------------------------------

    def _peft_load(self, path: str) -> str:
        """Load an adapter (or a linear merge of adapters) onto the model: its PEFT name."""
        from engines.lora.weights import MERGE_PREFIX

        name = next(self._peft_names)
        if path.startswith(MERGE_PREFIX):
            merge = json.loads(path[len(MERGE_PREFIX):])
            parts = [self._peft_load(p) for p in merge["ids"]]
            self.model.add_weighted_adapter(parts, merge["weights"], name,
                                            combination_type="cat")
            for part in parts:
                self.model.delete_adapter(part)
            return name
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        return name

    def _peft_delete(self, name: str) -> None:
        self.model.delete_adapter(name)

    def _drop(self, record: AdapterRecord) -> None:
        self.lora_store.evict(record.uid)

    @contextlib.contextmanager
    def _adapter(self, peft_name: str | None):
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield
        elif peft_name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(peft_name)
            yield

    # ------------------------------------------------------------------------------------------
    # Public helpers
    # ------------------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        limits = [getattr(self.model.config, "max_position_embeddings", None)]
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if tokenizer_limit is not None and tokenizer_limit < _NO_TOKENIZER_LIMIT:
            limits.append(tokenizer_limit)
        known = [limit for limit in limits if limit]
        assert known, "the model config has no max_position_embeddings"
        return min(known)

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(
        self, prompts: list[str | list[int]], params: list[SamplingParams],
        adapters: list[str | None] | None = None,
    ) -> list[GenerationResult]:
        """Generate for all prompts as one batch (one per adapter); results in the order of
        `prompts`."""
        rows = self._new_rows(prompts, params)
        stream = self._by_adapter(rows, self.adapter_records(adapters, len(rows)))
        return collect_results(stream, params, [len(r.prompt_ids) for r in rows])

    def generate_stream(
        self, prompts: list[str | list[int]], params: list[SamplingParams],
        adapters: list[str | None] | None = None,
    ) -> Iterator[list[TokenEvent]]:
        """Generate for all prompts as one batch, yielding after every decode step the events of
        that step: one per request still running, in batch order. With several adapters, one
        batch per adapter runs after the other.

        Bad inputs raise here, before the first step; the iterator only runs the model.
        """
        rows = self._new_rows(prompts, params)
        return self._by_adapter(rows, self.adapter_records(adapters, len(rows)))

    def _by_adapter(self, rows: list[_Row],
                    records: list[AdapterRecord | None]) -> Iterator[list[TokenEvent]]:
        if not any(records):
            yield from self._run(rows)
            return
        groups: dict[int, list[int]] = {}
        for i, record in enumerate(records):
            groups.setdefault(record.uid if record else 0, []).append(i)
        for uid, members in groups.items():
            record = records[members[0]]
            peft_name = self.lora_store.weights_of(record) if record else None
            local = [replace(rows[i], index=j) for j, i in enumerate(members)]
            with self._adapter(peft_name):
                for events in self._run(local):
                    yield [replace(e, index=members[e.index]) for e in events]

    # ---- lifecycle (the Engine contract) ---------------------------------------------------------

    def follow(self) -> None:
        raise RuntimeError("the hf engine has no tensor parallelism: there is no rank 0 to "
                           "follow (only TPMode.ENGINE engines run follow())")

    def shutdown(self) -> None:
        """Nothing to release: no threads, no other ranks."""

    # ---- the decode loop ------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, rows: list[_Row]) -> Iterator[list[TokenEvent]]:
        if not rows:
            return
        input_ids, attention_mask = self._left_pad([row.prompt_ids for row in rows])
        # Positions count real tokens only, so a left-padded row sees the same positions as it
        # would alone; pad slots get 0 (any value works, they are masked).
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
        want_prefill = any(row.params.decoder_input_details for row in rows)
        # Prompt log-probs need the logits of every prompt position; otherwise only the last
        # position is sampled and the [B, S, V] projection is skipped.
        logits, cache = self._forward(
            input_ids, attention_mask, position_ids, cache=None, all_positions=want_prefill
        )  # [B, S or 1, V]
        prefills = [
            self._prefill(row, logits[i], input_ids.shape[1]) if row.params.decoder_input_details
            else None
            for i, row in enumerate(rows)
        ]  # fmt: skip
        logits = logits[:, -1, :]  # [B, V]
        states = [RowState(row.params, row.prompt_ids, row.stop_ids, device=self.device)
                  for row in rows]

        live = rows  # the rows still in the batch, in batch order
        while True:
            step = sample_rows(logits, [states[row.index] for row in live])
            events = [
                self._advance(row, token_id, log_prob, top, prefills[row.index])
                for row, token_id, log_prob, top in zip(
                    live, step.token_ids, step.log_probs, step.top
                )
            ]
            yield events
            keep = [i for i, row in enumerate(live) if row.finish_reason is None]
            if not keep:
                return
            next_ids = torch.tensor(step.token_ids, device=self.device)[:, None]  # [B, 1]
            if len(keep) < len(live):
                # Finished rows leave the batch, so later steps cost only what the live rows
                # need (16 rows on CPU, one running 10x longer than the rest: 30% less time than
                # decoding the finished rows along). The cache's beam-search reorder is a row
                # selection that every cache type implements.
                index = torch.tensor(keep, device=self.device)
                cache.reorder_cache(index)
                attention_mask, position_ids, next_ids = (
                    attention_mask[index], position_ids[index], next_ids[index]
                )  # fmt: skip
                live = [live[i] for i in keep]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(live), 1))], dim=1
            )  # [B, S + step]
            position_ids = position_ids[:, -1:] + 1  # [B, 1]
            logits, cache = self._forward(next_ids, attention_mask, position_ids, cache=cache)
            logits = logits[:, -1, :]  # [B, V]

    def _advance(
        self,
        row: _Row,
        token_id: int,
        log_prob: float,
        top: list[tuple[int, float]],
        prefill: tuple[Token, ...] | None,
    ) -> TokenEvent:
        """Record one generated token; return its event, with the finish reason if it ended the
        request."""
        first = not row.output_ids
        row.output_ids.append(token_id)
        generated = len(row.output_ids)
        # Stop ids are masked before min_new_tokens; the count check also covers a row whose
        # every other logit was -inf.
        stop_id = token_id in row.stop_ids and generated > row.params.min_new_tokens
        full = generated >= row.max_new_tokens
        text, stopped = row.text.push(row.output_ids, final=stop_id or full)
        if stopped:
            row.finish_reason = FinishReason.STOP_SEQUENCE
        elif stop_id:
            row.finish_reason = FinishReason.EOS_TOKEN
        elif full:
            row.finish_reason = FinishReason.LENGTH
        return TokenEvent(
            index=row.index,
            token=self._token(token_id, log_prob),
            text=text,
            top_tokens=tuple(self._token(t, lp) for t, lp in top),
            finish_reason=row.finish_reason,
            prefill=prefill if first else None,
        )

    def _prefill(self, row: _Row, logits: torch.Tensor, width: int) -> tuple[Token, ...]:
        """Each prompt token with its log-prob given the tokens before it. logits: [S, V], the
        row's prefill logits (left padded to `width`)."""
        ids = row.prompt_ids
        start = width - len(ids)
        # The logits at position j predict token j + 1; the first token has no prediction.
        predicting = logits[start : width - 1].float().log_softmax(dim=-1)  # [L - 1, V]
        targets = torch.tensor(ids[1:], device=predicting.device)[:, None]  # [L - 1, 1]
        log_probs = predicting.gather(1, targets)[:, 0].tolist()  # [L - 1]
        return (
            self._token(ids[0], None),
            *(self._token(t, lp) for t, lp in zip(ids[1:], log_probs)),
        )

    def _forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, S_past + T]
        position_ids: torch.Tensor,  # [B, T]
        *,
        cache: Any,
        all_positions: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if all_positions else 1,  # 0 keeps all
        )
        return out.logits, out.past_key_values  # [B, T or 1, V]

    # ---- requests -------------------------------------------------------------------------------

    def _new_rows(self, prompts: list[str | list[int]], params: list[SamplingParams]) -> list[_Row]:
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        return [self._new_row(i, prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]

    def _new_row(self, index: int, prompt: str | list[int], params: SamplingParams) -> _Row:
        prompt_ids = checked_prompt_ids(prompt, params, encode=self.encode,
                                        vocab_size=self.vocab_size, max_context=self.max_context)
        room = self.max_context - len(prompt_ids)
        eos = frozenset() if params.ignore_eos_token else frozenset(self.eos_token_ids)
        return _Row(
            index=index,
            prompt_ids=prompt_ids,
            params=params,
            # Stopping at the context end (finish reason "length") rather than failing.
            max_new_tokens=min(params.max_new_tokens, room),
            stop_ids=eos | frozenset(params.stop_token_ids),
            text=TextStream(
                self._decode, params.stop_sequences, min_new_tokens=params.min_new_tokens
            ),
        )

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full(
            (len(sequences), width), self.pad_token_id, dtype=torch.long
        )  # [B, S]
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, S]
        for i, ids in enumerate(sequences):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    # ---- text -----------------------------------------------------------------------------------

    # ------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------

    def _resolve_dtype(self, path: Path, dtype: str) -> torch.dtype | str:
        if dtype != "auto":
            return _DTYPES[dtype]
        if self.device.type == "cpu":
            # Half precision is slow and partly unsupported on CPU; fp32 is the safe default.
            return torch.float32
        return "auto"  # the checkpoint's own dtype

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        for source in (generation_config, self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids
