"""service.serving.batching.MicroBatcher: concurrent requests share batches; a lone one never waits."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.serving.batching import MicroBatcher


class _Net:
    def __init__(self, delay: float = 0.0):
        self.batches: list[int] = []
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True) * np.ones((1, 2))


def test_concurrent_requests_are_batched_and_answers_stay_in_order():
    net = _Net(delay=0.02)
    batcher = MicroBatcher(net, max_batch=8, max_wait_s=0.005)

    async def main():
        xs = [np.full((1, 2, 2), i, np.float32) for i in range(40)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in xs))
        return [float(o[0, 0]) for o in outs]

    sums = asyncio.run(main())
    assert sums == [4.0 * i for i in range(40)]
    assert max(net.batches) == 8 and sum(net.batches) == 40 and len(net.batches) <= 8
    assert len(net.threads) == 1  # one inference at a time: the network itself uses every core
    batcher.close()


def test_a_lone_request_does_not_wait_for_company():
    net = _Net()
    batcher = MicroBatcher(net, max_batch=32, max_wait_s=1.0)

    async def main():
        await batcher.submit(np.zeros((1, 2, 2), np.float32))  # warm the runner
        t = time.perf_counter()
        await batcher.submit(np.zeros((1, 2, 2), np.float32))
        return time.perf_counter() - t

    assert asyncio.run(main()) < 0.5  # far below max_wait: nobody else announced images
    assert net.batches == [1, 1]
    batcher.close()


def test_a_small_batch_with_nothing_behind_it_runs_alone_and_load_does_not():
    net, alone = _Net(delay=0.02), _Net()
    batcher = MicroBatcher(net, max_batch=8, max_wait_s=0.005, infer_alone=alone)

    async def main():
        await batcher.submit(np.zeros((1, 2, 2), np.float32))  # lone: nothing queued or announced
        await batcher.submit(np.zeros((MicroBatcher.ALONE_MAX, 2, 2), np.float32))  # still small and alone
        await batcher.submit(np.zeros((MicroBatcher.ALONE_MAX + 1, 2, 2), np.float32))  # too big for alone
        with batcher.expecting(1):  # another request is still decoding an image: not alone
            first = batcher.enqueue(np.zeros((1, 2, 2), np.float32))
            await asyncio.sleep(0.001)
            second = batcher.enqueue(np.zeros((1, 2, 2), np.float32))
            await asyncio.gather(*first, *second)
        # 40 concurrent requests: the first batch may run alone, the ones queued behind it not
        await asyncio.gather(*(batcher.submit(np.zeros((1, 2, 2), np.float32)) for _ in range(40)))

    asyncio.run(main())
    assert alone.batches[:2] == [1, MicroBatcher.ALONE_MAX]
    assert net.batches[0] == MicroBatcher.ALONE_MAX + 1 and net.batches[1] == 2
    assert sum(alone.batches) + sum(net.batches) == 1 + 4 + 5 + 2 + 40
    assert sum(net.batches[2:]) >= 40 - MicroBatcher.ALONE_MAX  # under load the sleeping session does the work
    batcher.close()


def test_announced_images_are_waited_for_up_to_max_wait():
    net = _Net()
    batcher = MicroBatcher(net, max_batch=32, max_wait_s=1.0)

    async def main():
        first = asyncio.ensure_future(batcher.submit(np.zeros((1, 2, 2), np.float32)))
        with batcher.expecting(1):  # another request still decoding its image
            await asyncio.sleep(0.05)
            second = batcher.enqueue(np.ones((1, 2, 2), np.float32))  # as predictions.predict does
        await asyncio.gather(first, *second)
        assert net.batches == [2]  # the first waited for the announced one
        with batcher.expecting(1):  # announced but never sent (its image failed to decode)
            t = time.perf_counter()
            await batcher.submit(np.zeros((1, 2, 2), np.float32))
            return time.perf_counter() - t

    waited = asyncio.run(main())
    assert 0.9 < waited < 3  # max_wait, not forever
    assert net.batches == [2, 1]
    batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_runner_lives_on():
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.ones((len(x), 2))

    batcher = MicroBatcher(flaky, max_batch=4, max_wait_s=0.001)

    async def main():
        with pytest.raises(RuntimeError):
            await batcher.submit(np.zeros((1, 1), np.float32))
        return await batcher.submit(np.zeros((2, 1), np.float32))

    assert asyncio.run(main()).shape == (2, 2)
    batcher.close()


def test_run_alone_takes_the_inference_thread_and_batches_queue_behind_it():
    net = _Net()
    order: list[str] = []

    def infer(x: np.ndarray) -> np.ndarray:
        order.append("batch")
        return net(x)

    def job() -> str:
        order.append("job")
        time.sleep(0.05)
        order.append("job done")
        return threading.current_thread().name

    batcher = MicroBatcher(infer, max_batch=8, max_wait_s=0.005)

    async def main():
        assert batcher.idle()
        await batcher.submit(np.zeros((1, 2, 2), np.float32))  # the inference thread exists now
        lone = asyncio.ensure_future(batcher.run_alone(job))
        await asyncio.sleep(0.01)
        assert not batcher.idle()  # a later request must not take the lone path too
        thread, _ = await asyncio.gather(lone, batcher.submit(np.zeros((1, 2, 2), np.float32)))
        assert batcher.idle()
        return thread

    assert asyncio.run(main()) in net.threads  # the one inference thread: never two inferences at once
    assert order == ["batch", "job", "job done", "batch"] and net.batches == [1, 1]
    batcher.close()


class _Overlap(_Net):
    """Counts how many batches run at the same moment."""

    def __init__(self, delay: float):
        super().__init__(delay)
        self._lock = threading.Lock()
        self.now = self.most = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super().__call__(x)
        finally:
            with self._lock:
                self.now -= 1


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_parallel_batches_run_at_once_on_their_own_threads_and_still_fill(parallel):
    net = _Overlap(delay=0.03)
    batcher = MicroBatcher(net, max_batch=4, max_wait_s=0.005, parallel=parallel)

    async def main():
        xs = [np.full((1, 2, 2), i, np.float32) for i in range(60)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in xs))
        return [float(o[0, 0]) for o in outs]

    assert asyncio.run(main()) == [4.0 * i for i in range(60)]
    assert net.most == parallel and len(net.threads) == parallel  # never more than `parallel` at once
    assert max(net.batches) == 4 and sum(net.batches) == 60  # the queue fills while all threads run
    batcher.close()


def test_with_parallel_batches_run_alone_still_has_the_cores_to_itself():
    net = _Overlap(delay=0.01)
    batcher = MicroBatcher(net, max_batch=8, max_wait_s=0.005, parallel=2)
    order: list[str] = []

    def job() -> None:
        order.append("job")
        time.sleep(0.05)
        order.append("job done")

    async def main():
        await batcher.submit(np.zeros((1, 2, 2), np.float32))  # the runner exists now
        lone = asyncio.ensure_future(batcher.run_alone(job))
        await asyncio.sleep(0.01)
        later = [batcher.submit(np.zeros((1, 2, 2), np.float32)) for _ in range(3)]
        await asyncio.sleep(0.01)
        order.append(f"{len(net.batches)} batches meanwhile")
        await asyncio.gather(lone, *later)

    asyncio.run(main())
    assert order == ["job", "1 batches meanwhile", "job done"]  # the second thread stayed idle
    assert net.batches == [1, 3]
    batcher.close()


def test_closing_fails_the_requests_of_a_batch_in_flight():
    started = threading.Event()
    release = threading.Event()

    def slow(x):
        started.set()
        release.wait(5)
        return np.ones((len(x), 2))

    batcher = MicroBatcher(slow, max_batch=4, max_wait_s=0.001, parallel=2)

    async def main():
        pending = asyncio.ensure_future(batcher.submit(np.zeros((2, 1), np.float32)))
        while not started.is_set():
            await asyncio.sleep(0.005)
        batcher.close()
        with pytest.raises(RuntimeError, match="unloaded"):
            await asyncio.wait_for(pending, 5)

    try:
        asyncio.run(main())
    finally:
        release.set()
