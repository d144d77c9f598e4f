"""vLLM's V1 async engine (`AsyncLLM`) behind LMC's engine contract.

The worker's request threads call `generate_stream` as on every engine; vLLM runs on an asyncio
loop of its own thread (the engine core is vLLM's own child process, and vLLM spawns its own
tensor-parallel workers). Each prompt is one vLLM request streaming DELTA outputs; closing the
stream early (the client went away) calls `AsyncLLM.abort`, which frees the request in vLLM's
scheduler. Sampling parameters map through engines/backends/params.py.

vLLM needs its own interpreter (its pins differ from LMC's): the worker of a vllm model runs
under LMC_VLLM_PYTHON (container/worker_process.py), made by `make install-vllm`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engines.backends.params import vllm_sampling_kwargs
from engines.contracts.engine import Capabilities
from engines.prompt import prompt_ids
from engines.tokenizing import TokenizerMixin
from engines.types import FinishReason, GenerateFromStream, SamplingParams, Token, TokenEvent

log = logging.getLogger("lmc.vllm")

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True, slots=True)
class _Output:
    """One DELTA output of one vLLM request, on its way to the requesting thread."""

    index: int  # the prompt's place in its generate_stream call
    output: Any  # vllm.RequestOutput


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


def _cpu_env(kv_cache_gb: float | None) -> None:
    """vLLM's CPU settings, read from the environment when its engine starts; a value the
    user set wins."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_cache_gb or 2))))
    # vLLM's "auto" binding reserves a core per rank for its scheduler process on x86, which
    # leaves one thread for the model on a 2-core machine: bind every core this process has.
    cores = sorted(os.sched_getaffinity(0))
    if cores == list(range(cores[0], cores[-1] + 1)):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")


class VLLMEngine(GenerateFromStream, TokenizerMixin):
    """`AsyncLLM` over a local HF model dir. Keyword arguments are vLLM's engine arguments as
    engines/options.py's VLLMOptions resolves them."""

    def __init__(self, model_dir: str, *, dtype: str = "auto", max_num_seqs: int = 32,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 tensor_parallel_size: int = 1, quantization: str | None = None,
                 enforce_eager: bool | None = None, cpu_kv_cache_gb: float | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        cuda = torch.cuda.is_available()
        if not cuda:
            _cpu_env(cpu_kv_cache_gb)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._init_tokens()
        args = AsyncEngineArgs(
            model=model_dir, tokenizer=model_dir,
            # LMC's auto is fp32 on CPU (bf16 hangs in vLLM on AVX2-only CPUs), the checkpoint's
            # dtype on GPU.
            dtype=_DTYPES.get(dtype, "auto" if cuda else "float32"),
            max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            tensor_parallel_size=tensor_parallel_size, quantization=quantization,
            # torch.compile on CPU was never tried here; eager is what was measured.
            enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
            # LMC's log-probs are of the distribution a token was drawn from (after temperature
            # and penalties), as the native and hf engines report them.
            logprobs_mode="processed_logprobs", seed=0, disable_log_stats=False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lmc-vllm",
                                        daemon=True)
        self._thread.start()

        async def start() -> AsyncLLM:
            return AsyncLLM.from_engine_args(args)

        self._llm = self._run(start(), timeout_s=None)
        config = self._llm.model_config
        self.max_context: int = config.max_model_len
        self.vocab_size: int = config.get_vocab_size()
        self.eos_token_ids = frozenset(self._eos_ids(model_dir))
        self.capabilities = Capabilities(max_concurrency=max_num_seqs)
        self._ids = itertools.count()
        self._aborted = 0  # requests aborted before they finished (client gone)
        self._lock = threading.Lock()

    def _eos_ids(self, model_dir: str) -> set[int]:
        from transformers import GenerationConfig

        ids: set[int] = set()
        try:
            value = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
        except OSError:
            value = None
        for v in (value, self.tokenizer.eos_token_id):
            ids.update([v] if isinstance(v, int) else (v or []))
        return ids

    def _run(self, coro, timeout_s: float | None = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    # -- the Engine contract ----------------------------------------------------------------------

    def generate_stream(self, prompts: list[str | list[int]], params: list[SamplingParams],
                        adapters: list[str | None] | None = None) -> Iterator[list[TokenEvent]]:
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        if adapters and any(adapters):
            raise ValueError("the vllm engine serves no LoRA adapters here")
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = [prompt_ids(p, sp, encode=self.encode, vocab_size=self.vocab_size,
                          max_context=self.max_context) for p, sp in zip(prompts, params)]
        # Mapped before anything is queued: an unsupported parameter is the caller's 400.
        vparams = []
        for p, prompt in zip(params, ids):
            kw = vllm_sampling_kwargs(p)
            # As on the other engines, a sequence stops when the context is full (LENGTH).
            kw["max_tokens"] = min(kw["max_tokens"], self.max_context - len(prompt))
            kw["min_tokens"] = min(kw["min_tokens"], kw["max_tokens"])
            vparams.append(VSamplingParams(**kw, output_kind=RequestOutputKind.DELTA))
        return self._stream(ids, params, vparams)

    def _stream(self, ids: list[list[int]], params: list[SamplingParams],
                vparams: list[Any]) -> Iterator[list[TokenEvent]]:
        out: queue.SimpleQueue[_Output | _Failed | None] = queue.SimpleQueue()
        rids = [f"lmc-{next(self._ids)}" for _ in ids]
        tasks: list[Future] = [
            asyncio.run_coroutine_threadsafe(self._pump(i, rid, p, vp, out), self._loop)
            for i, (rid, p, vp) in enumerate(zip(rids, ids, vparams))]
        pending = set(range(len(ids)))
        started: set[int] = set()  # requests whose first event went out
        texts = [""] * len(ids)  # text sent so far, per request
        out_ids: list[list[int]] = [[] for _ in ids]  # tokens generated so far, per request
        try:
            while pending:
                batch = [out.get()]
                while True:
                    try:
                        batch.append(out.get_nowait())
                    except queue.Empty:
                        break
                events: list[TokenEvent] = []
                for item in batch:
                    if isinstance(item, _Failed):
                        raise item.error
                    i = item.index
                    new = self._events(i, item.output, params[i],
                                       ids[i] if i not in started else None)
                    if new:
                        started.add(i)
                        new = self._settle_text(new, texts, out_ids, i)
                    if item.output.finished:
                        pending.discard(item.index)
                    events += new
                if events:
                    yield events
        finally:
            if pending:  # closed early or failed: vLLM frees what it holds
                with self._lock:
                    self._aborted += len(pending)
                for task in tasks:
                    task.cancel()
                asyncio.run_coroutine_threadsafe(
                    self._llm.abort([rids[i] for i in pending]), self._loop)

    def _settle_text(self, events: list[TokenEvent], texts: list[str],
                     out_ids: list[list[int]], i: int) -> list[TokenEvent]:
        """Track what request i has sent; on its last event, send what vLLM drops: an
        incomplete UTF-8 character at the very end is text in LMC (U+FFFD, as the other
        engines give it), not nothing."""
        out_ids[i] += [e.token.id for e in events]
        last = events[-1]
        if last.finish_reason is not None and last.finish_reason is not FinishReason.STOP_SEQUENCE:
            full = self._decode(out_ids[i])
            if full.startswith(texts[i] + last.text):
                events[-1] = TokenEvent(last.index, last.token, full[len(texts[i]):],
                                        last.top_tokens, last.finish_reason, last.prefill)
        texts[i] += "".join(e.text for e in events)
        return events

    async def _pump(self, index: int, rid: str, prompt: list[int], vparams: Any,
                    out: queue.SimpleQueue) -> None:
        from vllm.inputs import TokensPrompt

        try:
            async for output in self._llm.generate(TokensPrompt(prompt_token_ids=prompt),
                                                   vparams, rid):
                out.put(_Output(index, output))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            out.put(_Failed(e))

    def _events(self, index: int, output: Any, params: SamplingParams,
                prompt: list[int] | None) -> list[TokenEvent]:
        """The TokenEvents of one DELTA output: one per new token; the delta's text goes on
        its last token (vLLM holds back text that may start a stop string itself). `prompt`:
        the request's prompt ids while its first event is still to come (it carries the
        prefill log-probs)."""
        completion = output.outputs[0]
        new_ids = list(completion.token_ids)
        if not new_ids:
            return []
        logprobs = completion.logprobs or [None] * len(new_ids)
        finish = _finish_reason(completion) if output.finished else None
        events = []
        for k, (tid, lp) in enumerate(zip(new_ids, logprobs)):
            last = k == len(new_ids) - 1
            top: tuple[Token, ...] = ()
            if params.top_n_tokens and lp:
                ranked = sorted(lp.items(), key=lambda kv: kv[1].rank)[:params.top_n_tokens]
                top = tuple(self._token(t, v.logprob) for t, v in ranked)
            prefill = None
            if params.decoder_input_details and prompt is not None and k == 0:
                prefill = tuple(self._prefill(prompt, output.prompt_logprobs or []))
            events.append(TokenEvent(
                index, self._token(tid, lp[tid].logprob if lp and tid in lp else None),
                completion.text if last else "", top, finish if last else None, prefill))
        return events

    def _prefill(self, ids: list[int], logprobs: list[Any]) -> Iterator[Token]:
        assert len(logprobs) == len(ids), (len(logprobs), len(ids))
        for tid, lp in zip(ids, logprobs):
            yield self._token(tid, lp[tid].logprob if lp and tid in lp else None)

    def follow(self) -> None:
        raise RuntimeError("vLLM runs its own tensor-parallel workers; there is no follower")

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._llm.shutdown()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def stats(self) -> dict[str, Any]:
        """Engine-wide statistics (engines/contracts/metrics.py): vLLM's own count of the
        requests it holds, and how many LMC aborted."""
        with self._lock:
            aborted = self._aborted
        return {"running": self._llm.get_num_unfinished_requests(), "waiting": 0,
                "aborted": aborted}


def _finish_reason(completion: Any) -> FinishReason:
    if completion.finish_reason == "length":
        return FinishReason.LENGTH
    if completion.finish_reason == "stop" and isinstance(completion.stop_reason, str):
        return FinishReason.STOP_SEQUENCE
    return FinishReason.EOS_TOKEN  # EOS, or one of stop_token_ids
