"""Dynamic batching policy: size bound, delay bound, drain-without-waiting, idle timeout."""

import asyncio
import time

from container.batcher import collect_batch


def run(coro):
    return asyncio.run(coro)


def test_full_batch_returns_without_waiting():
    async def go():
        q = asyncio.Queue()
        for i in range(10):
            q.put_nowait(i)
        t = time.monotonic()
        batch = await collect_batch(q, 4, 5.0)
        return batch, time.monotonic() - t, q.qsize()

    batch, dt, left = run(go())
    assert batch == [0, 1, 2, 3]
    assert left == 6
    assert dt < 0.5  # far below the 5 s delay: a full batch never waits


def test_partial_batch_waits_max_delay_then_returns():
    async def go():
        q = asyncio.Queue()
        q.put_nowait("a")
        q.put_nowait("b")
        t = time.monotonic()
        batch = await collect_batch(q, 8, 0.2)
        return batch, time.monotonic() - t

    batch, dt = run(go())
    assert batch == ["a", "b"]
    assert 0.18 <= dt < 1.0


def test_jobs_arriving_during_delay_join_the_batch():
    async def go():
        q = asyncio.Queue()

        async def producer():
            for i in range(3):
                await asyncio.sleep(0.03)
                q.put_nowait(i)

        asyncio.get_running_loop().create_task(producer())
        t = time.monotonic()
        batch = await collect_batch(q, 3, 2.0)
        return batch, time.monotonic() - t

    batch, dt = run(go())
    assert batch == [0, 1, 2]
    assert dt < 1.0  # returned as soon as the batch was full, not after 2 s


def test_batch_size_one_never_waits():
    async def go():
        q = asyncio.Queue()
        q.put_nowait("x")
        q.put_nowait("y")
        t = time.monotonic()
        b = await collect_batch(q, 1, 10.0)
        return b, time.monotonic() - t

    b, dt = run(go())
    assert b == ["x"] and dt < 0.5


def test_idle_timeout_returns_empty():
    async def go():
        q = asyncio.Queue()
        t = time.monotonic()
        b = await collect_batch(q, 4, 0.1, idle_timeout_s=0.1)
        return b, time.monotonic() - t

    b, dt = run(go())
    assert b == [] and 0.09 <= dt < 1.0


def test_delay_counts_from_first_job_not_per_job():
    async def go():
        q = asyncio.Queue()

        async def producer():
            for i in range(20):  # a job every 40 ms: never lets a per-job timer expire
                q.put_nowait(i)
                await asyncio.sleep(0.04)

        task = asyncio.get_running_loop().create_task(producer())
        t = time.monotonic()
        b = await collect_batch(q, 100, 0.2)
        task.cancel()
        return b, time.monotonic() - t

    b, dt = run(go())
    assert 3 <= len(b) <= 7
    assert dt < 0.5
