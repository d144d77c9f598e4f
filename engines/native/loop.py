"""Continuous batching across threads: the native engine steps on its own thread while any
number of request threads call `generate_stream` / `generate` as on the `hf` engine.

Each request thread tokenizes and validates its prompts itself (errors raise in that thread,
before anything is queued), submits them, and reads its TokenEvents from its own queue. Closing
the iterator early (the client went away) aborts the request: its KV blocks are freed in the
engine's next step.

Threads and the loop talk in small frozen messages: request threads put commands (AddRequest,
AbortRequest, CallOnLoop, StopLoop) on the loop's one queue; the loop puts StepEvent /
RequestFailed on the requesting thread's own queue.

LoRA adapters: registering one reads and checks it on the calling thread (and loads it into
host memory when preloaded); a request on an adapter makes sure its weights are in host memory
on the request thread before it is queued. The engine thread only copies weights into a slot,
so loading an adapter never stalls the requests of others.

With tensor parallelism only rank 0's loop runs a thread; on the other ranks the worker calls
`follow()`, which runs the steps rank 0 broadcasts until rank 0's `shutdown()`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from concurrent.futures import Future
from typing import Any, Callable

from engines.contracts.engine import Capabilities, TPMode
from engines.contracts.metrics import BATCH_BUCKETS, Histogram
from engines.lora.api import LoraApi
from engines.lora.store import AdapterRecord
from engines.prompt import prompt_ids
from engines.types import GenerateFromStream, SamplingParams, TokenEvent

log = logging.getLogger("lmc.native")


# -- commands: request threads -> the loop thread ----------------------------------------------

@dataclass(frozen=True, slots=True)
class AddRequest:
    key: int  # the loop's id for the request (the engine's request id)
    prompt_ids: list[int]
    params: SamplingParams
    out: queue.SimpleQueue  # the requesting thread's queue: StepEvent / RequestFailed
    index: int  # the prompt's place in its generate_stream call (TokenEvent.index)
    adapter: AdapterRecord | None = None  # its LoRA adapter (None: the base model)


@dataclass(frozen=True, slots=True)
class AbortRequest:
    key: int


@dataclass(frozen=True, slots=True)
class CallOnLoop:
    """Run `fn(engine)` on the loop thread between steps; its result or error goes to `done`."""

    fn: Callable[[Any], Any]
    done: Future


@dataclass(frozen=True, slots=True)
class StopLoop:
    """Fail what still runs, shut the engine down (releasing TP followers), end the thread."""


Command = AddRequest | AbortRequest | CallOnLoop | StopLoop


# -- outputs: the loop thread -> a request thread's queue --------------------------------------

@dataclass(frozen=True, slots=True)
class StepEvent:
    key: int
    event: TokenEvent  # index already set to the prompt's place in its call


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The engine step (or adding the request) raised: the request ends with this error."""

    error: BaseException


class EngineLoop(GenerateFromStream, LoraApi):
    """Wraps a NativeEngine; the engine object must only be stepped by this loop's thread.
    On a tensor-parallel follower (rank > 0) no thread runs: call `follow()`."""

    def __init__(self, engine, *, thread: threading.Thread | None = None) -> None:
        """`engine` is stepped on a new thread, or, when `thread` is given, on that (already
        running) thread, which must call `_run()` itself: see `start_native_engine`."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_context = engine.max_context
        self.eos_token_ids = engine.eos_token_ids
        self.vocab_size = engine.vocab_size
        self.lora_store = engine.lora_store
        self.capabilities = Capabilities(
            max_concurrency=engine.scheduler.max_num_seqs,
            tp_mode=TPMode.ENGINE if engine.tp is not None else TPMode.NONE,
            lora=engine.lora_store is not None)
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._running: dict[int, AddRequest] = {}  # loop thread only: requests in the engine
        self._batch_sizes = Histogram(BATCH_BUCKETS)  # requests per step; loop thread adds
        self._keys = itertools.count()
        if thread is not None:
            self._thread = thread
        else:
            self._thread = threading.Thread(target=self._run, name="lmc-engine", daemon=True)
            if engine.is_leader:
                self._thread.start()

    # -- lifecycle ------------------------------------------------------------------------------

    def follow(self) -> None:
        """Ranks > 0: run rank 0's steps until it shuts down (blocks)."""
        self.engine.follow()

    def shutdown(self, *, timeout_s: float = 30.0) -> None:
        """Stop the loop thread; requests still running fail. With TP this releases the
        followers from `follow()`. Idempotent."""
        if self._thread.is_alive():
            self._commands.put(StopLoop())
            self._thread.join(timeout_s)

    # -- the tokenizer API the handler uses -----------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    def count_tokens(self, prompt: str) -> int:
        return len(self.engine.encode(prompt))

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        return self.engine.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    # -- request side (any thread) --------------------------------------------------------------

    def generate_stream(self, prompts: list[str | list[int]], params: list[SamplingParams],
                        adapters: list[str | None] | None = None) -> Iterator[list[TokenEvent]]:
        """`adapters[i]`: the LoRA adapter of prompt i by name (None or "": the base model)."""
        if not self.engine.is_leader:
            raise RuntimeError("this is a tensor-parallel follower (rank > 0): requests go to "
                               "rank 0, this rank runs follow()")
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        records = self.adapter_records(adapters, len(prompts))
        ids = [prompt_ids(p, sp, encode=self.engine.encode, vocab_size=self.vocab_size,
                          max_context=self.max_context) for p, sp in zip(prompts, params)]
        return self._stream(ids, params, records)

    def _stream(self, ids: list[list[int]], params: list[SamplingParams],
                adapters: list[AdapterRecord | None] | None = None) -> Iterator[list[TokenEvent]]:
        out: queue.SimpleQueue[StepEvent | RequestFailed] = queue.SimpleQueue()
        keys = [next(self._keys) for _ in ids]
        adapters = adapters or [None] * len(ids)
        for index, (key, prompt, p, a) in enumerate(zip(keys, ids, params, adapters)):
            self._commands.put(AddRequest(key, prompt, p, out, index, a))
        pending = set(keys)
        try:
            while pending:
                batch = [out.get()]
                while True:  # everything already produced, in one list like an engine step
                    try:
                        batch.append(out.get_nowait())
                    except queue.Empty:
                        break
                events = []
                for item in batch:
                    if isinstance(item, RequestFailed):
                        raise item.error
                    if item.event.finish_reason is not None:
                        pending.discard(item.key)
                    events.append(item.event)
                yield events
        finally:
            for key in pending:  # closed early or failed: free the engine's resources
                self._commands.put(AbortRequest(key))

    # -- LoRA adapters (any thread; engines/lora/api.py): slots change on the loop thread ------

    def _call(self, fn: Callable[[Any], Any], timeout_s: float = 60.0) -> Any:
        """fn(engine) on the loop thread, between two steps."""
        done: Future = Future()
        self._commands.put(CallOnLoop(fn, done))
        return done.result(timeout_s)

    def _pin(self, record: AdapterRecord) -> bool:
        return self._call(lambda e: e.pin_adapter(record))

    def _unpin(self, record: AdapterRecord) -> None:
        self._call(lambda e: e.unpin_adapter(record))

    def _drop(self, record: AdapterRecord) -> None:
        self._call(lambda e: e.drop_adapter(record))

    def _slots_text(self) -> str:
        return f"{self.engine.lora_slots.max_loras} adapter slots"

    # -- engine side (the loop thread) ----------------------------------------------------------

    def _apply(self, command: Command) -> bool:
        """Apply one command; False when it is the StopLoop."""
        match command:
            case StopLoop():
                self._fail_all(RuntimeError("the engine was shut down"))
                self.engine.shutdown()
                return False
            case AddRequest(key=key):
                self._running[key] = command
                try:
                    self.engine.add_request(key, command.prompt_ids, command.params,
                                            command.adapter)
                except Exception as e:  # validated already; anything here is an engine fault
                    del self._running[key]
                    command.out.put(RequestFailed(e))
            case AbortRequest(key=key):
                if self._running.pop(key, None) is not None:
                    self.engine.abort(key)
            case CallOnLoop(fn=fn, done=done):
                try:
                    done.set_result(fn(self.engine))
                except Exception as e:
                    done.set_exception(e)
        return True

    def _fail_all(self, error: BaseException) -> None:
        """End every running request with `error`, dropping it from the engine."""
        for key, request in self._running.items():
            request.out.put(RequestFailed(error))
            self.engine.abort(key)
        self._running.clear()

    def _run(self) -> None:
        engine = self.engine
        idle_timeout_s = None
        if engine.tp is not None:
            from engines.native.parallel import KEEPALIVE_S

            idle_timeout_s = KEEPALIVE_S
        while True:
            if not engine.has_unfinished():
                try:  # idle: sleep until work arrives
                    command = self._commands.get(timeout=idle_timeout_s)
                except queue.Empty:
                    try:
                        engine.keepalive()
                    except Exception:  # the group broke; the next step reports it too
                        log.exception("tensor-parallel keepalive failed")
                    continue
                if not self._apply(command):
                    return
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if not self._apply(command):
                    return
            if engine.has_unfinished():
                self._step()

    def _step(self) -> None:
        """One engine step; each event goes to its request's queue."""
        try:
            events = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing its %d requests", len(self._running))
            self._fail_all(e)
            return
        finished = 0
        for key, ev in events:
            finished += ev.finish_reason is not None
            request = self._running.get(key)
            if request is None:
                continue  # aborted meanwhile
            request.out.put(StepEvent(key, TokenEvent(request.index, ev.token, ev.text,
                                                      ev.top_tokens, ev.finish_reason,
                                                      ev.prefill)))
            if ev.finish_reason is not None:
                del self._running[key]
        # What ran in this step: the sequences still running and those that just finished.
        self._batch_sizes.observe(len(self.engine.scheduler.running) + finished)

    def stats(self) -> dict:
        """Engine-wide statistics (engines/contracts/metrics.py): read from any thread; the
        counts are a moment's snapshot, never torn."""
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "kv_blocks_total": blocks.num_blocks,
                "kv_blocks_used": blocks.num_blocks - blocks.num_free_blocks,
                "prefix_queries": blocks.prefix_query_tokens,
                "prefix_hits": blocks.prefix_hit_tokens,
                "preemptions": scheduler.num_preemptions,
                "batch_size": self._batch_sizes.to_wire()}


def start_native_engine(model_dir: str, **options) -> EngineLoop:
    """Build a NativeEngine and start its loop thread (the engine registry's "native"). With
    tp_size > 1 every rank calls this; on ranks > 0 no thread starts: call `follow()`."""
    from concurrent.futures import Future

    import torch.distributed as dist

    from engines.native.engine import NativeEngine

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # A tensor-parallel group: built on the calling thread (followers step on it; on rank
        # 0 the loop thread starts in EngineLoop). Building rank 0's engine on its loop thread
        # made the group's process abort at exit ("terminate called without an active
        # exception") in 3 of 4 runs, so TP keeps this path until that is understood.
        return EngineLoop(NativeEngine(model_dir, **options))

    # The engine is built on the thread that will step it. Measured on 2 cores: torch's
    # OpenMP matmuls run ~20% slower on a thread whose parallel team is created after the
    # main thread's (243 -> 262 out tok/s offline-equivalent when built on the loop thread),
    # so the main thread must not run torch work first.
    ready: Future = Future()

    def boot() -> None:
        try:
            loop = EngineLoop(NativeEngine(model_dir, **options), thread=threading.current_thread())
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(loop)
        loop._run()

    threading.Thread(target=boot, name="lmc-engine", daemon=True).start()
    return ready.result()
