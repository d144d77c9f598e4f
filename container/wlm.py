"""Workload manager: per model a bounded job queue, a dynamic batcher and a pool of workers.

What lives where: container/jobs.py is the job plumbing between routes and workers (Job,
StreamEnd, stream_chunks); container/worker_process.py is one worker process (or MPI group rank
0) and the Unix socket to it, in the frames of engines/contracts/protocol.py; this module is
the pool policy and dispatch.

Dispatch: one loop per worker takes work from the model's queue and keeps at most the worker's
max_concurrency dispatches in flight. A plain handler (max_concurrency 1) gets one dynamic batch
at a time, sent as one Request, and finishes every job of it (its Response, and for a stream
its End) before the next; a continuous-batching engine gets each job alone as it arrives.

Lifecycle: minWorkers permanent workers start with the model; temporary ones are added up to
maxWorkers when the queue is deeper than 2 x batch_size and retire after max_idle_time idle. A
worker that dies fails its in-flight jobs at once (WorkerDied, naming the exit), and is
restarted; once consecutive crashes exceed retry_threshold the model is FAILED (DJL counts
the same way: with 0, the first crash fails it).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable

from container.adapters import AdapterRegistry
from container.batcher import collect_batch
from container.config import ModelConfig
from container.groups import GroupSpec, plan_groups
from container.jobs import Job
from container.worker_process import Worker, WorkerState
from engines.contracts import protocol as P
from engines.contracts.metrics import ENGINE_GAUGES, add_engine_counters
from engines.options import ServerOptions, load_server_options
from engines.contracts.errors import (LmcError, ModelNotReady, PredictTimeout, QueueFull,
                              ServiceUnavailable)

log = logging.getLogger("lmc.wlm")


class ModelStatus(enum.Enum):
    LOADING = "Loading"
    READY = "Healthy"
    FAILED = "Failed"
    STOPPED = "Stopped"


class Model:
    def __init__(self, config: ModelConfig, *, server: ServerOptions | None = None,
                 worker_env: dict[str, str] | None = None) -> None:
        self.config = config
        self.server = server or load_server_options()
        self.name = config.name
        self.status = ModelStatus.LOADING
        self.failure: str | None = None
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.job_queue_size)
        self.workers: list[Worker] = []
        self.min_workers = config.min_workers
        self.max_workers = config.max_workers
        self.batch_size = config.batch_size
        self.max_batch_delay_s = config.max_batch_delay_ms / 1000.0
        self.worker_env = worker_env or {}
        self.init_properties = config.init_properties()
        self.consecutive_failures = 0
        self.ever_ready = False
        # Metrics: where each request's engine statistics go (container/metrics.py sets it),
        # and the cumulative engine counters of workers that are gone.
        self.request_stats_sink: Callable[[str, dict], None] | None = None
        self.retired_engine: dict = {}
        # Tensor-parallel layout: each worker is a group of `tp` ranks on its own device slice.
        # Without GPUs and TP=1 any number of workers fit (None: unconstrained).
        gpus = list(config.gpus)
        self.tp = config.tp
        self.device_groups: list[GroupSpec] | None = None
        if gpus or self.tp > 1:
            self.device_groups = plan_groups(tp=self.tp, gpus=gpus,
                                             cpu_devices=self.server.cpu_devices)
            if self.max_workers > len(self.device_groups):
                log.info("model %s: %d worker group(s) of TP=%d fit the devices; maxWorkers=%d "
                         "lowered to %d", config.name, len(self.device_groups), self.tp,
                         self.max_workers, len(self.device_groups))
                self.max_workers = len(self.device_groups)
                self.min_workers = min(self.min_workers, self.max_workers)
        from container.access import model_roots

        self.adapters = AdapterRegistry(self, cache_dir=self.server.cache_dir,
                                        allowed_roots=model_roots(self.server))
        self._tasks: set[asyncio.Task] = set()
        self._starting = 0
        self._loaded = asyncio.get_running_loop().create_future()

    # -- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        """Start the permanent workers; returns when the model is READY or FAILED."""
        n = max(1, self.min_workers)
        await asyncio.gather(*(self._start_worker(permanent=i < self.min_workers)
                               for i in range(n)))

    async def wait_loaded(self) -> None:
        await asyncio.shield(self._loaded)

    def _start_worker(self, *, permanent: bool) -> asyncio.Future:
        """Add a worker now (so concurrent callers see it in `workers` and `_starting` at once)
        and start its process in a task; the returned future gives the Worker or None."""
        group = self._free_group()
        if self.status in (ModelStatus.FAILED, ModelStatus.STOPPED) or group is None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        w = Worker(self, permanent=permanent, group=group)
        self.workers.append(w)
        self._starting += 1
        return self._spawn(self._boot(w, permanent=permanent))

    async def _boot(self, w: Worker, *, permanent: bool) -> Worker | None:
        try:
            await w.start()
            # Every registered LoRA adapter, before the worker's first request.
            await self.adapters.sync_worker(w)
        except LmcError as e:
            self.workers.remove(w)
            await w.kill()
            if not self.ever_ready:
                # A model that never loaded will not load on retry (bad model.py, missing
                # weights...): fail fast so /ping tells the truth at once.
                self._set_failed(f"worker failed to load the model: {e.message}")
            else:
                self._count_failure(e.message)
                if self.status is ModelStatus.READY and len(self.workers) < self.min_workers:
                    self._spawn(self._restart_after(self._backoff_s(), permanent=permanent))
            return None
        finally:
            self._starting -= 1
        if self.status is ModelStatus.STOPPED:
            await w.stop()
            return None
        self.ever_ready = True
        if self.status is ModelStatus.LOADING:
            self.status = ModelStatus.READY
            if not self._loaded.done():
                self._loaded.set_result(None)
        self._spawn(self._dispatch_loop(w))
        return w

    def _free_group(self) -> GroupSpec | None:
        """The device slice for a new worker, or None when every slice is taken."""
        if self.device_groups is None:
            return GroupSpec(0, 1, ())
        taken = {w.group.index for w in self.workers}
        return next((g for g in self.device_groups if g.index not in taken), None)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _set_failed(self, reason: str) -> None:
        log.error("model %s FAILED: %s", self.name, reason)
        self.status = ModelStatus.FAILED
        self.failure = reason
        if not self._loaded.done():
            self._loaded.set_result(None)
        err = ModelNotReady(f"model {self.name!r} failed: {reason}")
        while not self.queue.empty():
            self.queue.get_nowait().fail(err)

    def _count_failure(self, reason: str) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures > self.config.retry_threshold:
            self._set_failed(f"{self.consecutive_failures} consecutive worker failures "
                             f"(retry_threshold={self.config.retry_threshold}); last: {reason}")

    def on_request_stats(self, stats: dict) -> None:
        if self.request_stats_sink is not None:
            self.request_stats_sink(self.name, stats)

    def retire_engine_stats(self, w: Worker) -> None:
        """Keep a stopped worker's cumulative engine counters, so the model's stay monotonic."""
        stats, w.engine_stats = w.engine_stats, None
        if stats:
            self.retired_engine = add_engine_counters(self.retired_engine, stats)

    def engine_stats(self) -> dict:
        """The model's engine statistics: counters of every worker it ever had, gauges of the
        live ones (engines/contracts/metrics.py)."""
        total = dict(self.retired_engine)
        gauges = dict.fromkeys(ENGINE_GAUGES, 0)
        live = False
        for w in self.workers:
            if w.engine_stats:
                live = True
                total = add_engine_counters(total, w.engine_stats)
                for k in ENGINE_GAUGES:
                    gauges[k] += w.engine_stats.get(k, 0)
        return {**total, **gauges} if live or total else {}

    def on_worker_crash(self, w: Worker) -> None:
        if w in self.workers:
            self.workers.remove(w)
        if self.status is not ModelStatus.READY:
            return
        self._count_failure(f"worker {w.id} exited with {w.exit_reason}")
        if self.status is ModelStatus.READY and len(self.workers) < self.min_workers:
            self._spawn(self._restart_after(self._backoff_s(), permanent=w.permanent))

    def _backoff_s(self) -> float:
        return min(0.1 * 2 ** max(0, self.consecutive_failures - 1), 5.0)

    async def _restart_after(self, delay_s: float, *, permanent: bool) -> None:
        await asyncio.sleep(delay_s)
        if self.status is ModelStatus.READY and len(self.workers) < self.min_workers:
            log.info("model %s: restarting a worker", self.name)
            await self._start_worker(permanent=permanent)

    async def stop(self) -> None:
        self.status = ModelStatus.STOPPED
        for t in list(self._tasks):
            t.cancel()
        err = ModelNotReady(f"model {self.name!r} was unregistered")
        while not self.queue.empty():
            self.queue.get_nowait().fail(err)
        await asyncio.gather(*(w.stop() for w in list(self.workers)), return_exceptions=True)
        self.workers.clear()

    async def drain(self, timeout_s: float) -> None:
        """Wait until the queue is empty and no worker is busy (graceful shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.queue.empty() and not any(w.inflight for w in self.workers):
                return
            await asyncio.sleep(0.05)

    # -- dispatch --------------------------------------------------------------------------

    async def _dispatch_loop(self, w: Worker) -> None:
        """Feed `w` from the queue until it stops, retires or (a temporary one) idles out,
        with at most `w.max_concurrency` dispatches in flight."""
        # Rolling batch: the engine batches requests token by token itself, so each job goes
        # to it alone as soon as it arrives; waiting here to group them would only add
        # latency. Jobs beyond max_concurrency wait in this model's bounded queue, so
        # job_queue_size still caps what is accepted.
        rolling = w.max_concurrency > 1
        batch_size = 1 if rolling else self.batch_size
        max_delay_s = 0.0 if rolling else self.max_batch_delay_s
        idle_s = None if w.permanent else float(self.config.max_idle_time_s)
        slots = asyncio.Semaphore(w.max_concurrency)
        running: set[asyncio.Task] = set()
        try:
            while w.state is not WorkerState.STOPPED and not w.retire:
                await slots.acquire()
                jobs = await collect_batch(self.queue, batch_size, max_delay_s,
                                           idle_timeout_s=idle_s)
                collected = bool(jobs)
                # A job that timed out or was aborted while queued already has its answer:
                # running it would generate in full for nobody.
                jobs = [j for j in jobs if not j.done.done()]
                if not jobs:
                    slots.release()
                    if running or collected:
                        continue
                    log.info("model %s: worker %d idle for %ss, stopping", self.name, w.id, idle_s)
                    break
                if w.state is WorkerState.STOPPED:
                    # Died while we waited: give the jobs back to the others.
                    for j in jobs:
                        self._requeue(j)
                    return
                if rolling:
                    t = asyncio.create_task(_run_batch(w, jobs, slots))
                    running.add(t)
                    t.add_done_callback(running.discard)
                else:  # inline: one batch at a time needs no task, which keeps batch_size 1 cheap
                    await _run_batch(w, jobs, slots)
        except asyncio.CancelledError:
            return
        if w in self.workers:
            self.workers.remove(w)
        await w.stop()

    def _requeue(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            job.fail(QueueFull(f"model {self.name!r}: queue full while rescheduling"))

    def submit(self, item: P.RequestItem) -> Job:
        if self.status is not ModelStatus.READY:
            if self.status is ModelStatus.FAILED:
                raise ModelNotReady(f"model {self.name!r} failed: {self.failure}")
            raise ModelNotReady(f"model {self.name!r} is {self.status.value.lower()}; retry later")
        job = Job(item)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"model {self.name!r}: job queue is full "
                            f"(job_queue_size={self.queue.maxsize}); retry later") from None
        # Scale up on queue depth (DJL: deeper than 2 x batch_size), one new worker at a time.
        if (self.queue.qsize() > 2 * self.batch_size and self._starting == 0
                and len(self.workers) < self.max_workers):
            self._start_worker(permanent=False)
        return job

    async def result(self, job: Job) -> P.Response:
        """The job's first response frame, bounded by option.predict_timeout."""
        try:
            async with asyncio.timeout(self.config.predict_timeout_s):
                return await job.response
        except asyncio.CancelledError:  # the route went away (client gone, shutdown)
            self.abort(job)
            raise
        except TimeoutError:
            self.abort(job)
            raise PredictTimeout(f"model {self.name!r} did not answer within "
                                 f"option.predict_timeout={self.config.predict_timeout_s:g}s")

    def abort(self, job: Job) -> None:
        """The client went away: tell the worker handling it, or drop it from the queue."""
        for w in self.workers:
            if job.id in w.inflight:
                w.abort(job.id)
                return
        job.fail(ServiceUnavailable("request aborted"))

    async def scale(self, *, min_workers: int | None, max_workers: int | None) -> None:
        lo = self.min_workers if min_workers is None else min_workers
        hi = self.max_workers if max_workers is None else max_workers
        if max_workers is None and lo > hi:
            hi = lo
        if lo > hi:
            raise ValueError(f"min_worker={lo} is greater than max_worker={hi}")
        if self.device_groups is not None and hi > len(self.device_groups):
            raise ValueError(f"max_worker={hi}: only {len(self.device_groups)} worker group(s) "
                             f"of tensor_parallel_degree={self.tp} fit the devices")
        self.min_workers, self.max_workers = lo, hi
        # Promote temporaries to permanent, or demote the extras.
        for i, w in enumerate(self.workers):
            w.permanent = i < lo
        extra = len(self.workers) - hi
        for w in list(reversed(self.workers))[:max(0, extra)]:
            w.retire = True
            self.workers.remove(w)
            self._spawn(w.stop())
        missing = lo - len(self.workers)
        if missing > 0:
            await asyncio.gather(*(self._start_worker(permanent=True) for _ in range(missing)))

    def describe(self) -> dict:
        return {
            "modelName": self.name,
            "modelUrl": self.config.model_dir,
            "status": self.status.value,
            "failure": self.failure,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.config.max_batch_delay_ms,
            "maxIdleTime": self.config.max_idle_time_s,
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "queueSize": self.queue.maxsize,
            "queueLength": self.queue.qsize(),
            "tensorParallelDegree": self.tp,
            "adapters": sorted(self.adapters.adapters),
            "workers": [vars(w.info()) for w in self.workers],
        }


async def _run_batch(w: Worker, jobs: list[Job], slots: asyncio.Semaphore) -> None:
    """Run one dispatch on `w`, then free its slot (also when cancelled)."""
    try:
        await w.run(jobs)
    finally:
        slots.release()
