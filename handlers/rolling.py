"""DJL's rolling-batch contract for a custom model.py (option.rolling_batch set to anything but
"disable", with the model's own handle(inputs)).

The worker keeps the active requests in arrival order and calls handle() again and again, each
time with ONE batch Input holding every active request (batch_size = how many, keys prefixed
"batch_%03d_"). A request's first call carries its properties (headers) and its body under
"data" (plus DJL's random "seed" entry); later calls carry an empty "data" and no properties, so
the handler recognises a request by its position. The handler answers with one content entry per
request, in order: an Output.binary_encode({"data": ..., "last": ..., "code"?, "error"?}) frame
(handlers/frames.py says how frames become a response). "batch_<i>_<name>" properties go to
request i. Requests whose frame was last leave the batch; the order of the rest is kept, and
new requests join at the end, up to option.max_rolling_batch_size.

If handle() raises, answers with a status other than 200, or with a different number of entries,
every active request fails with that error and the next call carries "reset_rollingbatch":
"true", so the handler can drop its state, as DJL does.

A request whose client went away stays in the batch until the handler finishes it (its position
is the only name the handler knows it by); its frames are dropped.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engines.contracts.engine import Capabilities, TPMode
from handlers.frames import (FrameError, FrameItem, FrameStream, failed, frames_result,
                             is_last, value_frame)
from handlers.inputs import BATCH_SIZE_KEY, Input, batch_key, split_custom_attributes
from handlers.outputs import Output
from handlers.pair_list import PairList

if TYPE_CHECKING:
    from engines.contracts.protocol import RequestItem
    from handlers.service import ItemResult

logger = logging.getLogger(__name__)

RESET_PROPERTY = "reset_rollingbatch"
# DJL's default for option.max_rolling_batch_size (also how many requests an async handler runs).
DEFAULT_MAX_ROLLING_BATCH_SIZE = 32
# batch_0_x, batch_000_x and DJL's batch_0.x all name request 0.
_BATCH_PROPERTY = re.compile(r"^batch_(\d+)[_.](.*)$", re.DOTALL)

_END = object()


@dataclass(eq=False)
class _Request:
    item: RequestItem
    frames: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    started: bool = False  # handle() has seen its body
    gone: bool = False  # the client went away: keep stepping it, drop its frames
    seed: str = field(default_factory=lambda: str(random.randrange(2**31)))

    def stream(self) -> FrameStream:
        def frames() -> Iterator[FrameItem]:
            while True:
                got = self.frames.get()
                if got is _END:
                    return
                if isinstance(got, FrameError):
                    raise got
                yield got

        def close() -> None:
            self.gone = True

        return FrameStream(frames(), close)


class RollingBatch:
    """Drives one custom handler's rolling batch on its own thread."""

    def __init__(self, call: Callable[[Input], object], source: str, max_size: int,
                 clean_headers: Callable[[dict[str, str]], dict[str, str]]) -> None:
        self.call = call  # handle(inputs), awaited if it is async
        self.source = source
        self.max_size = max_size
        self.clean_headers = clean_headers
        self.capabilities = Capabilities(max_concurrency=max_size, tp_mode=TPMode.NONE)
        self._waiting: list[_Request] = []
        self._active: list[_Request] = []
        self._cond = threading.Condition()
        self._reset = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lmc-rolling", daemon=True)
        self._thread.start()

    # ---- the worker's side ---------------------------------------------------------------

    def invoke(self, items: Sequence[RequestItem]) -> list[ItemResult]:
        requests = [_Request(item) for item in items]
        with self._cond:
            self._waiting.extend(requests)
            self._cond.notify_all()
        return [frames_result(r.stream(), self.clean_headers) for r in requests]

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # ---- the batch loop ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not (self._active or self._waiting):
                    self._cond.wait()
                if self._stop:
                    batch = self._active + self._waiting
                    self._active, self._waiting = [], []
                    for r in batch:
                        r.frames.put(FrameError(503, "the worker is shutting down"))
                    return
                room = self.max_size - len(self._active)
                if room > 0 and self._waiting:
                    self._active.extend(self._waiting[:room])
                    del self._waiting[:room]
                batch = list(self._active)
                reset, self._reset = self._reset, False
            self._step(batch, reset)

    def _step(self, batch: list[_Request], reset: bool) -> None:
        try:
            out = self.call(self._batch_input(batch, reset))
            frames = self._frames(out, len(batch))
        except Exception as e:  # noqa: BLE001 - the handler's failure fails its batch, not us
            status = e.status if isinstance(e, FrameError) else 424
            if not isinstance(e, FrameError):
                logger.exception("rolling batch of %d failed in %s", len(batch), self.source)
            self._fail(batch, FrameError(status, f"batch inference failed: "
                                                 f"{type(e).__name__}: {e}"))
            return
        done = set()
        for r, (frame, props) in zip(batch, frames):
            r.started = True
            if not r.gone:
                r.frames.put((frame, props))
            if is_last(frame) or failed(frame):
                r.frames.put(_END)
                done.add(r)
        if done:
            with self._cond:
                self._active = [r for r in self._active if r not in done]

    def _fail(self, batch: list[_Request], error: FrameError) -> None:
        for r in batch:
            r.frames.put(error)
        with self._cond:
            self._active = [r for r in self._active if r not in batch]
            self._reset = True

    def _batch_input(self, batch: list[_Request], reset: bool) -> Input:
        props = {BATCH_SIZE_KEY: str(len(batch))}
        if reset:
            props[RESET_PROPERTY] = "true"
        content = PairList()
        for i, r in enumerate(batch):
            if r.started:
                content.add(batch_key(i, "data"), b"")
                continue
            for k, v in split_custom_attributes(r.item.properties).items():
                props[batch_key(i, k)] = v
            for k, v in r.item.content:
                content.add(batch_key(i, k), v)
            content.add(batch_key(i, "seed"), r.seed.encode())
        return Input(props, content)

    def _frames(self, out: object, n: int) -> list[FrameItem]:
        if not isinstance(out, Output):
            raise FrameError(424, f"handle() returned {type(out).__name__} to a rolling batch; "
                                  "return an Output with one Output.binary_encode frame per "
                                  "request")
        if out.code != 200:
            body = out.content.value_at(0) if not out.content.is_empty() else b""
            raise FrameError(out.code, f"handler answered {out.code} {out.message}: "
                                       f"{bytes(body)[:500].decode('utf-8', 'replace')}")
        if len(out.content) != n:
            raise FrameError(424, f"handler returned {len(out.content)} outputs for a rolling "
                                  f"batch of {n}")
        own: list[dict[str, str]] = [{} for _ in range(n)]
        for key, value in out.properties.items():
            m = _BATCH_PROPERTY.match(key)
            if m and int(m.group(1)) < n:
                own[int(m.group(1))][m.group(2)] = str(value)
        return [(value_frame(out.content.value_at(i), strict=True), own[i]) for i in range(n)]
