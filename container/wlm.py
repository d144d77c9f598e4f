"""Workload manager: per model a bounded job queue, a dynamic batcher and a pool of workers.

Each worker is a separate process (later: an MPI group whose rank 0 connects) that talks to us
over its own Unix socket with the frames of engines/contracts/protocol.py. A worker's dispatch loop takes
a batch from the model's queue, sends it as one Request, and waits until every job of the batch
is finished (its Response, and for a stream its End) before taking the next batch.

Lifecycle: minWorkers permanent workers start with the model; temporary ones are added up to
maxWorkers when the queue is deeper than 2 x batch_size and retire after max_idle_time idle. A
worker that dies fails its in-flight jobs at once (WorkerDied, naming the exit), and is
restarted; after retry_threshold consecutive crashes the model is FAILED.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engines.contracts import protocol as P
from container.batcher import collect_batch
from container.config import ModelConfig
from container.groups import GroupSpec, LayoutError, count_gpus, parse_tp, plan_groups
from engines.contracts.errors import (LmcError, ModelNotReady, PredictTimeout, QueueFull,
                              ServiceUnavailable, WorkerDied)

log = logging.getLogger("lmc.wlm")


class ModelStatus(enum.Enum):
    LOADING = "Loading"
    READY = "Healthy"
    FAILED = "Failed"
    STOPPED = "Stopped"


class WorkerState(enum.Enum):
    STARTING = "STARTING"
    READY = "READY"
    BUSY = "BUSY"
    STOPPED = "STOPPED"


_job_ids = itertools.count(1)


class Job:
    """One client request on its way through the queue to a worker and back."""

    __slots__ = ("id", "item", "response", "chunks", "done", "enqueued_at")

    def __init__(self, item: P.RequestItem) -> None:
        loop = asyncio.get_running_loop()
        self.id = item.id
        self.item = item
        self.response: asyncio.Future[P.Response] = loop.create_future()
        self.chunks: asyncio.Queue | None = None  # set when the response is a stream
        self.done: asyncio.Future[None] = loop.create_future()
        self.enqueued_at = time.monotonic()

    def on_response(self, msg: P.Response) -> None:
        if msg.stream:
            self.chunks = asyncio.Queue()
        if not self.response.done():
            self.response.set_result(msg)
        if not msg.stream and not self.done.done():
            self.done.set_result(None)

    def on_chunk(self, data: bytes) -> None:
        if self.chunks is not None:
            self.chunks.put_nowait(data)

    def on_end(self, error: str | None) -> None:
        if self.chunks is not None:
            self.chunks.put_nowait(StreamEnd(error))
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: LmcError) -> None:
        """End the job with an error, whether or not its response has started."""
        if not self.response.done():
            self.response.set_exception(exc)
        elif self.chunks is not None and not self.done.done():
            self.chunks.put_nowait(StreamEnd(exc.message))
        if not self.done.done():
            self.done.set_result(None)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    error: str | None


def new_request_item(properties: dict[str, str], content: list[tuple[str, bytes]]) -> P.RequestItem:
    return P.RequestItem(next(_job_ids), properties, content)


# ---------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------

_worker_ids = itertools.count(1)


@dataclass
class WorkerInfo:
    id: int
    pid: int | None
    state: str
    permanent: bool
    started_at: float
    requests: int
    tp: int = 1
    ranks: list[dict] = field(default_factory=list)  # [{"rank", "pid"}] of a TP group
    devices: str | None = None  # its CUDA_VISIBLE_DEVICES slice


class Worker:
    """One worker process (rank 0 of a group) and the connection to it."""

    def __init__(self, model: Model, *, permanent: bool, group: GroupSpec) -> None:
        self.model = model
        self.group = group
        self.rank_pids: list[int] = []
        self.id = next(_worker_ids)
        self.permanent = permanent
        self.state = WorkerState.STARTING
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.inflight: dict[int, Job] = {}
        self.requests = 0
        self.started_at = time.time()
        self.retire = False  # set by scale-down; the dispatch loop exits after its batch
        self._sock_dir = tempfile.mkdtemp(prefix=f"lmc-{model.name}-w{self.id}-")
        self.sock_path = os.path.join(self._sock_dir, "sock")
        self._connected: asyncio.Future[tuple] = asyncio.get_running_loop().create_future()
        self._server: asyncio.AbstractServer | None = None
        self._reader_task: asyncio.Task | None = None
        self.exit_reason: str | None = None
        self.max_concurrency = 1

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.id, self.proc.pid if self.proc else None, self.state.value,
                          self.permanent, self.started_at, self.requests, self.group.tp,
                          [{"rank": r, "pid": p} for r, p in enumerate(self.rank_pids)],
                          self.group.visible_devices)

    def _command(self) -> list[str]:
        """One process, or `mpirun -np TP` of them for a tensor-parallel group (or engine=MPI
        / DeepSpeed, which LMI runs under MPI even at TP=1)."""
        worker = [sys.executable, "-m", "handlers.worker", "--socket", self.sock_path,
                  "--name", f"{self.model.name}/w{self.id}"]
        if self.group.tp == 1 and self.model.config.engine == "Python":
            return worker
        mpirun = os.environ.get("LMC_MPIRUN") or shutil.which("mpirun")
        if mpirun is None:
            raise WorkerDied(f"tensor_parallel_degree={self.group.tp} (engine="
                             f"{self.model.config.engine}) runs each worker group under mpirun, "
                             f"which is not installed; install OpenMPI (Debian: openmpi-bin)")
        # Local ranks inherit this environment; --bind-to none leaves thread placement to
        # torch; oversubscribe lets a CPU-only host run more ranks than it has slots.
        return [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                "-np", str(self.group.tp), *worker]

    async def start(self) -> None:
        """Spawn the process and wait for its Ready; raises LmcError if loading fails."""
        cfg = self.model.config

        async def on_connect(reader, writer):
            if not self._connected.done():
                self._connected.set_result((reader, writer))
            else:  # only rank 0 may connect, once
                writer.close()

        self._server = await asyncio.start_unix_server(on_connect, path=self.sock_path)
        env = dict(os.environ)
        env.update(self.model.worker_env)
        if self.group.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.group.visible_devices
        if self.group.tp > 1:
            env["MASTER_ADDR"] = "127.0.0.1"
            env["MASTER_PORT"] = str(_free_port())
        self.proc = await asyncio.create_subprocess_exec(*self._command(), env=env)
        log.info("model %s: worker %d starting (pid %d)", self.model.name, self.id, self.proc.pid)
        exit_wait = asyncio.ensure_future(self.proc.wait())
        try:
            async with asyncio.timeout(cfg.model_loading_timeout_s):
                done, _ = await asyncio.wait({self._connected, exit_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                if self._connected not in done:
                    raise WorkerDied(f"worker exited with {_exit_text(self.proc.returncode)} "
                                     f"before connecting")
                reader, self.writer = self._connected.result()
                self.writer.write(P.encode(P.Init(self.model.name, cfg.model_dir,
                                                  self.model.init_properties)))
                msg = await P.read_message(reader)
        except TimeoutError:
            await self.kill()
            raise ServiceUnavailable(f"model {self.model.name!r} did not load within "
                                     f"option.model_loading_timeout={cfg.model_loading_timeout_s:g}s")
        except (asyncio.IncompleteReadError, ConnectionError):
            rc = await self._wait_exit(5)
            raise WorkerDied(f"worker exited with {_exit_text(rc)} while loading the model")
        except BaseException:
            await self.kill()
            raise
        finally:
            exit_wait.cancel()
            self._server.close()
        if isinstance(msg, P.InitFailed):
            await self._wait_exit(5)
            raise LmcError(msg.error)
        if not isinstance(msg, P.Ready):
            await self.kill()
            raise WorkerDied(f"worker sent {type(msg).__name__} instead of Ready")
        self.state = WorkerState.READY
        self.rank_pids = [int(p) for p in msg.info.get("ranks", str(msg.pid)).split(",")]
        # A continuous-batching worker takes many requests at once; others one batch at a time.
        self.max_concurrency = max(1, int(msg.info.get("max_concurrency", "1")))
        self._reader_task = asyncio.create_task(self._read_loop(reader))
        log.info("model %s: worker %d ready (pid %d)", self.model.name, self.id, self.proc.pid)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        inflight = self.inflight
        decoder = P.FrameDecoder()
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                for msg in decoder.feed(data):
                    t = type(msg)
                    if t is P.Response:
                        job = inflight.get(msg.id)
                        if job is not None:
                            job.on_response(msg)
                            if not msg.stream:
                                del inflight[msg.id]
                        self.model.consecutive_failures = 0
                    elif t is P.Chunk:
                        job = inflight.get(msg.id)
                        if job is not None:
                            job.on_chunk(msg.data)
                    elif t is P.End:
                        job = inflight.pop(msg.id, None)
                        if job is not None:
                            job.on_end(msg.error)
                    else:
                        log.warning("worker %d sent unexpected %s", self.id, t.__name__)
        except (ConnectionError, P.ProtocolError) as e:
            log.error("model %s: worker %d connection broke: %s", self.model.name, self.id, e)
        except asyncio.CancelledError:
            return
        # EOF: the process is gone or going.
        rc = await self._wait_exit(2)
        self._on_exit(rc)

    async def _wait_exit(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    def _on_exit(self, rc: int | None) -> None:
        expected = self.state is WorkerState.STOPPED
        self.state = WorkerState.STOPPED
        self.exit_reason = _exit_text(rc)
        if self.inflight:
            err = WorkerDied(f"worker {self.id} of model {self.model.name!r} (pid "
                             f"{self.proc.pid if self.proc else '?'}) exited with "
                             f"{self.exit_reason} while handling this request")
            for job in self.inflight.values():
                job.fail(err)
            self.inflight.clear()
        if not expected:
            log.error("model %s: worker %d exited unexpectedly with %s", self.model.name,
                      self.id, self.exit_reason)
            self.model.on_worker_crash(self)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def run(self, jobs: list[Job]) -> None:
        """Dispatch one batch and wait until all of its jobs are finished."""
        if self.state is WorkerState.STOPPED:
            for job in jobs:
                job.fail(WorkerDied(f"worker {self.id} of model {self.model.name!r} is gone"))
            return
        self.state = WorkerState.BUSY
        for job in jobs:
            self.inflight[job.id] = job
        self.requests += len(jobs)
        self.writer.write(P.encode(P.Request([j.item for j in jobs])))
        if len(jobs) == 1:
            await jobs[0].done
        else:
            await asyncio.gather(*(j.done for j in jobs))
        if self.state is WorkerState.BUSY and not self.inflight:
            self.state = WorkerState.READY

    def abort(self, job_id: int) -> None:
        if job_id in self.inflight and self.writer is not None and not self.writer.is_closing():
            self.writer.write(P.encode(P.Abort([job_id])))

    async def stop(self, *, drain_s: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it does not within `drain_s`."""
        if self.state is WorkerState.STOPPED and (self.proc is None or
                                                  self.proc.returncode is not None):
            self._cleanup()
            return
        self.state = WorkerState.STOPPED
        if self.writer is not None and not self.writer.is_closing():
            try:
                self.writer.write(P.encode(P.Shutdown(drain=True)))
                self.writer.close()
            except ConnectionError:
                pass
        await self._wait_exit(drain_s)
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._on_exit(self.proc.returncode if self.proc else None)
        self._cleanup()

    async def kill(self) -> None:
        self.state = WorkerState.STOPPED
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        for p in (self.sock_path, self._sock_dir):
            try:
                os.rmdir(p) if p == self._sock_dir else os.unlink(p)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "unknown status"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


# ---------------------------------------------------------------------------------------------
# Model: queue + batcher + worker pool
# ---------------------------------------------------------------------------------------------


class Model:
    def __init__(self, config: ModelConfig, *, worker_env: dict[str, str] | None = None) -> None:
        self.config = config
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
        # Tensor-parallel layout: each worker is a group of `tp` ranks on its own device slice.
        # Without GPUs and TP=1 any number of workers fit (None: unconstrained).
        gpus = count_gpus()
        self.tp = parse_tp(config.options.get("tensor_parallel_degree"), len(gpus))
        cpu_slots = os.environ.get("LMC_CPU_DEVICES")
        self.device_groups: list[GroupSpec] | None = None
        if gpus or self.tp > 1:
            self.device_groups = plan_groups(tp=self.tp, gpus=gpus,
                                             cpu_devices=int(cpu_slots) if cpu_slots else None)
            if self.max_workers > len(self.device_groups):
                log.info("model %s: %d worker group(s) of TP=%d fit the devices; maxWorkers=%d "
                         "lowered to %d", config.name, len(self.device_groups), self.tp,
                         self.max_workers, len(self.device_groups))
                self.max_workers = len(self.device_groups)
                self.min_workers = min(self.min_workers, self.max_workers)
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
        if self.consecutive_failures >= self.config.retry_threshold:
            self._set_failed(f"{self.consecutive_failures} consecutive worker failures "
                             f"(retry_threshold={self.config.retry_threshold}); last: {reason}")

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
        if w.max_concurrency > 1:
            await self._dispatch_concurrent(w)
            return
        idle = None if w.permanent else float(self.config.max_idle_time_s)
        try:
            while w.state is not WorkerState.STOPPED and not w.retire:
                jobs = await collect_batch(self.queue, self.batch_size, self.max_batch_delay_s,
                                           idle_timeout_s=idle)
                if not jobs:  # a temporary worker idled out
                    log.info("model %s: worker %d idle for %ss, stopping", self.name, w.id, idle)
                    break
                if w.state is WorkerState.STOPPED:
                    # Died while we waited: give the jobs back to the others.
                    for j in jobs:
                        self._requeue(j)
                    return
                await w.run(jobs)
        except asyncio.CancelledError:
            return
        if w in self.workers:
            self.workers.remove(w)
        await w.stop()

    async def _dispatch_concurrent(self, w: Worker) -> None:
        """Rolling batch: send each job to the worker as soon as it arrives, keeping at most
        `max_concurrency` in flight; the engine batches them token by token. Jobs beyond that
        wait in this model's bounded queue, so job_queue_size still caps what is accepted."""
        slots = asyncio.Semaphore(w.max_concurrency)
        idle = None if w.permanent else float(self.config.max_idle_time_s)
        running: set[asyncio.Task] = set()
        try:
            while w.state is not WorkerState.STOPPED and not w.retire:
                await slots.acquire()
                jobs = await collect_batch(self.queue, 1, 0.0, idle_timeout_s=idle)
                if not jobs:
                    slots.release()
                    if not running:
                        break  # a temporary worker idled out
                    continue
                if w.state is WorkerState.STOPPED:
                    for j in jobs:
                        self._requeue(j)
                    return
                t = asyncio.create_task(w.run(jobs))
                running.add(t)
                t.add_done_callback(lambda t: (running.discard(t), slots.release()))
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
            "workers": [vars(w.info()) for w in self.workers],
        }


async def stream_chunks(job: Job) -> AsyncIterator[bytes | StreamEnd]:
    """Chunks of a streamed response, ending with the StreamEnd."""
    assert job.chunks is not None
    while True:
        item = await job.chunks.get()
        yield item
        if isinstance(item, StreamEnd):
            return
