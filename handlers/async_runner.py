"""An asyncio event loop on its own thread, for async handlers (`async def handle(inputs)`,
option.async_mode=true): every request's coroutine runs on this one loop, so while one awaits
(a model call, a sleep, an HTTP call) the others go on. The worker's request threads block on
their own request's result; they never run handler code themselves."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any


class AsyncRunner:
    def __init__(self, name: str = "lmc-async") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def resolve(self, value: Any) -> Any:
        """`value` itself, or its result when it is awaitable (run on the loop; the calling
        thread waits). An exception it raises is raised here."""
        if not inspect.isawaitable(value):
            return value
        return self._call(_awaited(value))

    def _call(self, coro) -> Any:
        """Run `coro` on the loop in the calling thread's context (so the request ids it logs
        with, engines/logs.py, follow it) and wait for its result."""
        context = contextvars.copy_context()
        done: concurrent.futures.Future = concurrent.futures.Future()

        def start() -> None:
            task = self.loop.create_task(coro, context=context)

            def finished(t: asyncio.Task) -> None:
                if t.cancelled():
                    done.cancel()
                elif t.exception() is not None:
                    done.set_exception(t.exception())
                else:
                    done.set_result(t.result())

            task.add_done_callback(finished)

        self.loop.call_soon_threadsafe(start)
        return done.result()

    def iterate(self, agen: AsyncIterator[Any]) -> Iterator[Any]:
        """A blocking iterator over an async iterator whose steps run on the loop. Closing it
        early closes the async generator on the loop too."""
        finished = False
        try:
            while True:
                try:
                    item = self._call(_next(agen))
                except StopAsyncIteration:
                    finished = True
                    return
                yield item
        finally:
            aclose = getattr(agen, "aclose", None)
            if not finished and aclose is not None and not self.loop.is_closed():
                try:
                    asyncio.run_coroutine_threadsafe(aclose(), self.loop).result(timeout=10)
                except Exception:  # noqa: BLE001 - a generator that fails to close is done anyway
                    pass

    def shutdown(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _awaited(value: Any) -> Any:
    return await value


async def _next(agen: AsyncIterator[Any]) -> Any:
    return await agen.__anext__()


def is_async_iterable(value: Any) -> bool:
    return hasattr(value, "__anext__") or inspect.isasyncgen(value)
