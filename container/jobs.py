"""Job plumbing between the routes and the workers: a Job is one client request on its way
through a model's queue to a worker and back; its response comes as one Response frame or, for
a stream, as chunks that end with a StreamEnd."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engines.contracts import protocol as P
from engines.contracts.errors import LmcError

_job_ids = itertools.count(1)


class Job:
    """One client request on its way through the queue to a worker and back."""

    __slots__ = ("id", "item", "response", "chunks", "done", "enqueued_at", "dispatched_at",
                 "first_frame_at", "done_at", "stats", "worker")

    def __init__(self, item: P.RequestItem) -> None:
        loop = asyncio.get_running_loop()
        self.id = item.id
        self.item = item
        self.response: asyncio.Future[P.Response] = loop.create_future()
        self.chunks: asyncio.Queue | None = None  # set when the response is a stream
        self.done: asyncio.Future[None] = loop.create_future()
        # Timings (time.monotonic()) and the engine's statistics, for metrics and traces.
        self.enqueued_at = time.monotonic()
        self.dispatched_at: float | None = None  # sent to a worker
        self.first_frame_at: float | None = None  # its Response arrived
        self.done_at: float | None = None  # its last frame arrived (or it failed)
        self.stats: dict | None = None  # engines/contracts/metrics.py request statistics
        self.worker: int | None = None  # the worker id that ran it

    def on_response(self, msg: P.Response) -> None:
        self.first_frame_at = time.monotonic()
        if msg.stream:
            self.chunks = asyncio.Queue()
        else:
            self.stats = msg.stats
            self.done_at = self.first_frame_at
        if not self.response.done():
            self.response.set_result(msg)
        if not msg.stream and not self.done.done():
            self.done.set_result(None)

    def on_chunk(self, data: bytes) -> None:
        if self.chunks is not None:
            self.chunks.put_nowait(data)

    def on_end(self, error: str | None, stats: dict | None = None) -> None:
        self.done_at = time.monotonic()
        self.stats = stats
        if self.chunks is not None:
            self.chunks.put_nowait(StreamEnd(error))
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: LmcError) -> None:
        """End the job with an error, whether or not its response has started."""
        if self.done_at is None:
            self.done_at = time.monotonic()
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


async def stream_chunks(job: Job) -> AsyncIterator[bytes | StreamEnd]:
    """Chunks of a streamed response, ending with the StreamEnd."""
    assert job.chunks is not None
    while True:
        item = await job.chunks.get()
        yield item
        if isinstance(item, StreamEnd):
            return
