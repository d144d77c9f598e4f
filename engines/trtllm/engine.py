"""TensorRT-LLM's high-level `LLM` (PyTorch backend) behind LMC's engine contract.

Requests stream through `LLM.generate_async(..., streaming=True)` on an asyncio loop of this
engine's own thread; each output carries the new tokens as `token_ids_diff` / `text_diff` /
`logprobs_diff`; closing a stream early calls the request's `abort()`. Sampling parameters map
through engines/backends/params.py (unit-tested there). NOT RUN HERE: LMC's machines have no
NVIDIA GPU, so this file follows TensorRT-LLM's LLM API documentation and is unverified.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

from engines.backends.params import trtllm_sampling_kwargs
from engines.contracts.engine import Capabilities
from engines.prompt import prompt_ids
from engines.tokenizing import TokenizerMixin
from engines.types import FinishReason, GenerateFromStream, SamplingParams, Token, TokenEvent

_DTYPES = {"auto": "auto", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TRTLLMEngine(GenerateFromStream, TokenizerMixin):
    def __init__(self, model_dir: str, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                 max_batch_size: int = 64, max_seq_len: int | None = None,
                 enable_block_reuse: bool = True) -> None:
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._init_tokens()
        self._llm = LLM(model=model_dir, backend="pytorch", dtype=_DTYPES[dtype],
                        tensor_parallel_size=tensor_parallel_size, max_batch_size=max_batch_size,
                        max_seq_len=max_seq_len,
                        kv_cache_config=KvCacheConfig(enable_block_reuse=enable_block_reuse))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self.max_context = max_seq_len or config.max_position_embeddings
        self.vocab_size = config.vocab_size
        eos = self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if eos is not None else [])
        self.capabilities = Capabilities(max_concurrency=max_batch_size)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ids = itertools.count()

    def generate_stream(self, prompts: list[str | list[int]], params: list[SamplingParams],
                        adapters: list[str | None] | None = None) -> Iterator[list[TokenEvent]]:
        from tensorrt_llm import SamplingParams as TSamplingParams

        if adapters and any(adapters):
            raise ValueError("the trtllm engine serves no LoRA adapters here")
        ids = [prompt_ids(p, sp, encode=self.encode, vocab_size=self.vocab_size,
                          max_context=self.max_context) for p, sp in zip(prompts, params)]
        tparams = [TSamplingParams(**trtllm_sampling_kwargs(p)) for p in params]
        return self._stream(ids, params, tparams)

    def _stream(self, ids, params, tparams) -> Iterator[list[TokenEvent]]:
        out: queue.SimpleQueue = queue.SimpleQueue()
        handles: dict[int, Any] = {}

        async def pump(i: int) -> None:
            try:
                result = self._llm.generate_async(ids[i], tparams[i], streaming=True)
                handles[i] = result
                async for output in result:
                    out.put((i, output))
            except Exception as e:
                out.put((i, e))

        for i in range(len(ids)):
            asyncio.run_coroutine_threadsafe(pump(i), self._loop)
        pending, started = set(range(len(ids))), set()
        try:
            while pending:
                i, output = out.get()
                if isinstance(output, Exception):
                    raise output
                c = output.outputs[0]
                events = []
                new = list(c.token_ids_diff)
                lps = list(c.logprobs_diff or [])
                for k, tid in enumerate(new):
                    last = k == len(new) - 1
                    lp = lps[k] if k < len(lps) else None
                    top = _top(self, lp, params[i].top_n_tokens)
                    prefill = None
                    if params[i].decoder_input_details and i not in started and k == 0:
                        prefill = tuple(self._token(t, _lp(p, t)) for t, p in zip(
                            ids[i], [None, *(output.prompt_logprobs or [])]))
                    done = output.finished and last
                    events.append(TokenEvent(i, self._token(tid, _lp(lp, tid)),
                                             c.text_diff if last else "", top,
                                             _finish(c) if done else None, prefill))
                if new:
                    started.add(i)
                if output.finished:
                    pending.discard(i)
                if events:
                    yield events
        finally:
            for i in pending:
                if i in handles:
                    handles[i].abort()

    def follow(self) -> None:
        raise RuntimeError("TensorRT-LLM runs its own tensor-parallel workers")

    def shutdown(self) -> None:
        self._llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)


def _lp(entry: Any, token_id: int) -> float | None:
    """A log-prob from TensorRT-LLM's per-position {token_id: Logprob} dict (or None)."""
    if not entry or token_id not in entry:
        return None
    value = entry[token_id]
    value = getattr(value, "logprob", value)
    return float(value) if value is not None and math.isfinite(value) else None


def _top(engine: TRTLLMEngine, entry: Any, n: int) -> tuple[Token, ...]:
    if not n or not entry:
        return ()
    ranked = sorted(entry.items(), key=lambda kv: -float(getattr(kv[1], "logprob", kv[1])))[:n]
    return tuple(engine._token(t, _lp(entry, t)) for t, _ in ranked)


def _finish(completion: Any) -> FinishReason:
    if completion.finish_reason == "length":
        return FinishReason.LENGTH
    if isinstance(completion.stop_reason, str):
        return FinishReason.STOP_SEQUENCE
    return FinishReason.EOS_TOKEN
