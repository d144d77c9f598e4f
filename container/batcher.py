"""Dynamic batching policy (DJL semantics), as one pure coroutine over a plain asyncio.Queue."""

from __future__ import annotations

import asyncio


async def collect_batch(queue: asyncio.Queue, max_size: int, max_delay_s: float, *,
                        idle_timeout_s: float | None = None) -> list:
    """Wait for a first job, drain up to `max_size` without waiting, then wait for more for at
    most `max_delay_s` in total (counted from the first job). Returns [] only when
    `idle_timeout_s` passes with no job at all (the caller may then retire an idle worker)."""
    if idle_timeout_s is None:
        first = await queue.get()
    else:
        try:
            async with asyncio.timeout(idle_timeout_s):
                first = await queue.get()
        except TimeoutError:
            return []
    batch = [first]
    while len(batch) < max_size and not queue.empty():
        batch.append(queue.get_nowait())
    if len(batch) >= max_size or max_delay_s <= 0:
        return batch
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_delay_s
    try:
        async with asyncio.timeout_at(deadline):
            while len(batch) < max_size:
                batch.append(await queue.get())
                while len(batch) < max_size and not queue.empty():
                    batch.append(queue.get_nowait())
    except TimeoutError:
        pass
    return batch
