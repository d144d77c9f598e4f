"""Worker process: `python -m handlers.worker --socket PATH`.

Connects to the front end's Unix socket, receives Init, loads the handler (ModelService), says
Ready, then serves Request frames. A reader thread takes frames off the socket so that Abort and
Shutdown are seen while the main thread is busy in the handler (e.g. in the middle of a stream);
only the main thread writes to the socket.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import queue
import signal
import socket
import sys
import threading

from engines import logs
from engines.contracts import protocol as P
from engines.contracts.engine import TPMode
from engines.options import load_server_options
from handlers.ranks import RankGroup, exit_without_teardown, rank_and_world

log = logging.getLogger("lmc.worker")

STATS_INTERVAL_S = 1.0  # how often engine statistics go to the front end (when they changed)


def _die_with_parent() -> None:
    """If the front end dies (even by SIGKILL), take this worker down too (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class WorkerLoop:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.aborted: set[int] = set()
        self._lock = threading.Lock()  # guards `aborted` between reader and main thread
        self._send_lock = threading.Lock()
        self.lockstep = False  # set when other ranks replicate every request with this one
        self._stopped = threading.Event()

    def send(self, *msgs: P.Message) -> None:
        data = b"".join(P.encode(m) for m in msgs)
        with self._send_lock:  # request threads of a concurrent handler share the socket
            self.sock.sendall(data)

    def _reader(self) -> None:
        try:
            while True:
                msg = P.read_message_blocking(self.sock)
                if msg is None:
                    break
                if isinstance(msg, P.Abort):
                    with self._lock:
                        self.aborted.update(msg.ids)
                else:
                    self.inbox.put(msg)
        except (OSError, P.ProtocolError) as e:
            log.error("connection to the front end broke: %s", e)
        self.inbox.put(None)  # EOF: the front end is gone or closed us

    def _report_stats(self, service) -> None:
        """Send the engine's statistics about once a second, when they changed."""
        last = None
        while not self._stopped.wait(STATS_INTERVAL_S):
            try:
                values = service.stats()
            except Exception:  # noqa: BLE001 - statistics must never cost the service
                log.exception("engine statistics failed; not reporting them any more")
                return
            if values is None:
                return  # this handler keeps none
            if values != last:
                try:
                    self.send(P.Stats(values))
                except OSError:
                    return
                last = values

    def run(self, service, *, replicate_to: RankGroup | None = None) -> None:
        """Serve until Shutdown or EOF. With `replicate_to`, every request batch is first
        broadcast to the group's other ranks, which run it too (one at a time, in order)."""
        threading.Thread(target=self._reader, name="lmc-reader", daemon=True).start()
        threading.Thread(target=self._report_stats, args=(service,), name="lmc-stats",
                         daemon=True).start()
        self.lockstep = replicate_to is not None
        pool = None
        concurrency = service.capabilities.max_concurrency
        if concurrency > 1 and replicate_to is None:
            # A continuous-batching handler: every request gets its own thread, which blocks
            # on its tokens while the engine batches all of them on the engine thread.
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(concurrency, thread_name_prefix="lmc-req")
        try:
            while True:
                msg = self.inbox.get()
                if msg is None or isinstance(msg, P.Shutdown):
                    if replicate_to is not None:
                        replicate_to.broadcast(None)  # release the other ranks
                    return
                if isinstance(msg, P.Request):
                    if replicate_to is not None:
                        replicate_to.broadcast(msg.items)
                    if pool is None:
                        self._serve(service, msg.items)
                    else:
                        pool.submit(self._serve_logged, service, msg.items)
        finally:
            self._stopped.set()
            if pool is not None:
                pool.shutdown(wait=msg is not None and getattr(msg, "drain", False))

    def _serve_logged(self, service, items: list[P.RequestItem]) -> None:
        try:
            self._serve(service, items)
        except Exception:  # the front end sees the connection drop if we cannot answer
            log.exception("serving requests %s failed", [it.id for it in items])

    def _serve(self, service, items: list[P.RequestItem]) -> None:
        # Every line logged while serving these requests carries their ids (engines/logs.py).
        bound = logs.bind(*logs.ids_of(it.properties for it in items))
        try:
            self._serve_items(service, items)
        finally:
            logs.unbind(bound)

    def _serve_items(self, service, items: list[P.RequestItem]) -> None:
        results = service.invoke(items)
        plain: list[P.Message] = []
        streams = []
        for item, r in zip(items, results):
            if r.stream is None:
                plain.append(P.Response(item.id, r.code, r.message, r.headers, r.body,
                                        stats=_stats_of(r)))
            else:
                streams.append((item.id, r))
        try:
            if plain:
                self.send(*plain)
            for rid, r in streams:
                self._stream(rid, r)
        finally:
            for r in results:
                if r.finalize is not None:
                    try:
                        r.finalize()
                    except Exception:  # noqa: BLE001 - the answer is out; only log it
                        log.exception("Output.finalize function failed")

    def _stream(self, rid: int, r) -> None:
        self.send(P.Response(rid, r.code, r.message, r.headers, r.body, stream=True))
        error = None
        gen = r.stream
        aborted = False
        try:
            for chunk in gen:
                if not aborted:
                    with self._lock:
                        aborted = rid in self.aborted
                        self.aborted.discard(rid)
                    if aborted:
                        log.info("request %d aborted by the client", rid)
                        if not self.lockstep:
                            break
                        # The other ranks step this stream with us: run it to its end
                        # without sending, or they would wait forever in a collective.
                if chunk and not aborted:
                    self.send(P.Chunk(rid, chunk))
        except Exception as e:  # the stream broke after its first byte: tell the client
            log.exception("stream of request %d failed", rid)
            error = str(e) or type(e).__name__
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()
        self.send(P.End(rid, error, _stats_of(r)))


def _stats_of(result) -> dict | None:
    stats = result.stats
    if callable(stats):
        try:
            stats = stats()
        except Exception:  # noqa: BLE001 - statistics must never cost the answer
            log.exception("request statistics failed")
            return None
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--name", default="worker")
    args = ap.parse_args(argv)
    rank, world = rank_and_world()
    name = args.name if world == 1 else f"{args.name} rank {rank}/{world}"
    options = load_server_options()
    logs.configure(options.log_level, options.log_format, process=name)
    _die_with_parent()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torch's OpenMP threads spin 300k iterations (libgomp's default) before sleeping; with
    # request threads, the front end and clients sharing a few cores that spinning steals
    # their time and stalls the next parallel region. Measured on 2 cores (README): 20k gives
    # +6% served and +4% offline throughput. Must be set before torch loads; a user's wins.
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

    group = RankGroup(rank, world) if world > 1 else None
    loop = None
    if rank == 0:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.socket)
        init = P.read_message_blocking(sock)
        if not isinstance(init, P.Init):
            log.error("expected Init, got %r", init)
            return 2
        loop = WorkerLoop(sock)
        if group is not None:  # every rank gets the init call
            group.broadcast((init.model_name, init.model_dir, init.properties, init.llm))
    else:
        init = P.Init(*group.broadcast())
    try:
        from engines.selection import LLMPlan
        from handlers.service import ModelService

        plan = LLMPlan.from_wire(init.llm) if init.llm is not None else None
        service = ModelService.load(init.model_dir, init.properties, plan)
    except Exception as e:  # any load failure goes to the front end with its message
        log.exception("loading model %s failed", init.model_name)
        if loop is not None:
            loop.send(P.InitFailed(f"{type(e).__name__}: {e}"))
        return 1  # on a group, mpirun then takes the other ranks down

    capabilities = service.capabilities
    engine_driven = capabilities.tp_mode is TPMode.ENGINE
    info = {"model": init.model_name, "max_concurrency": str(capabilities.max_concurrency)}
    if group is not None:
        info["ranks"] = ",".join(str(p) for p in group.all_gather(os.getpid()))
        info["tp"] = str(world)
    if rank == 0:
        loop.send(P.Ready(os.getpid(), info))
        if group is None:
            loop.run(service)
        elif engine_driven:
            # The engine drives the other ranks itself, step by step.
            try:
                loop.run(service)
            finally:
                service.shutdown()
        else:
            loop.run(service, replicate_to=group)
    elif engine_driven:
        service.follow()
    else:
        _replica(service, group)
    return 0


def _replica(service, group: RankGroup) -> None:
    """A rank > 0 of a group whose handler runs on every rank in lockstep (e.g. DeepSpeed):
    take each request batch rank 0 broadcasts, run it, and drop the results."""
    while True:
        items = group.broadcast()
        if items is None:
            return
        bound = logs.bind(*logs.ids_of(it.properties for it in items))
        try:
            for result in service.invoke(items):
                if result.stream is not None:
                    for _ in result.stream:  # the engine steps in lockstep with rank 0's
                        pass
        finally:
            logs.unbind(bound)


if __name__ == "__main__":
    code = main()
    if rank_and_world()[1] > 1:
        exit_without_teardown(code)
    sys.exit(code)
