"""One worker process (rank 0 of an MPI group for tensor parallelism) and the Unix-socket
transport to it, in the frames of engines/contracts/protocol.py: spawn, the Init/Ready
handshake, the frame reader that routes Response/Chunk/End to their jobs, running a batch,
abort, stop and kill. The pool policy around workers is container/wlm.py's Model."""

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from container.groups import GroupSpec
from container.jobs import Job
from engines.contracts import protocol as P
from engines.backends.requirements import worker_python
from engines.contracts.errors import LmcError, ServiceUnavailable, WorkerDied

if TYPE_CHECKING:  # the Model owns its workers; a worker reports crashes back to it
    from container.wlm import Model

log = logging.getLogger("lmc.wlm")


class WorkerState(enum.Enum):
    STARTING = "STARTING"
    READY = "READY"
    BUSY = "BUSY"
    STOPPED = "STOPPED"


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
        self.adapters_synced = False  # has every registered LoRA adapter (container/adapters.py)
        self.engine_stats: dict | None = None  # the group's last Stats (cumulative counters)

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.id, self.proc.pid if self.proc else None, self.state.value,
                          self.permanent, self.started_at, self.requests, self.group.tp,
                          [{"rank": r, "pid": p} for r, p in enumerate(self.rank_pids)],
                          self.group.visible_devices)

    def _command(self) -> list[str]:
        """One process, or `mpirun -np TP` of them for a tensor-parallel group (or engine=MPI
        / DeepSpeed, which LMI runs under MPI even at TP=1)."""
        llm = self.model.config.llm
        # A vllm worker runs under the interpreter that has vllm (engines/backends/).
        python = worker_python(llm.engine.name if llm is not None else None)
        worker = [python, "-m", "handlers.worker", "--socket", self.sock_path,
                  "--name", f"{self.model.name}/w{self.id}"]
        if self.group.tp == 1 and self.model.config.engine == "Python":
            return worker
        if llm is not None and llm.engine.name == "vllm":
            return worker  # vLLM spawns its own tensor-parallel workers
        mpirun = self.model.server.mpirun or shutil.which("mpirun")
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
                llm = cfg.llm.to_wire() if cfg.llm is not None else None
                self.writer.write(P.encode(P.Init(self.model.name, cfg.model_dir,
                                                  self.model.init_properties, llm)))
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
                        if msg.stats is not None:
                            self.model.on_request_stats(msg.stats)
                        self.model.consecutive_failures = 0
                    elif t is P.Chunk:
                        job = inflight.get(msg.id)
                        if job is not None:
                            job.on_chunk(msg.data)
                    elif t is P.End:
                        job = inflight.pop(msg.id, None)
                        if job is not None:
                            job.on_end(msg.error, msg.stats)
                        if msg.stats is not None:
                            self.model.on_request_stats(msg.stats)
                    elif t is P.Stats:
                        self.engine_stats = msg.values
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
        self.model.retire_engine_stats(self)
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
        now = time.monotonic()
        for job in jobs:
            self.inflight[job.id] = job
            job.dispatched_at = now
            job.worker = self.id
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
