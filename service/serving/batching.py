"""Dynamic micro-batching: concurrent predict requests share one pass through the network.

A request's images join a queue; one runner takes up to ``max_batch`` of them and runs them as
one batch on an inference thread. ``parallel`` batches run at once, each on its own thread: one
for a network that uses every core itself, one per core for one that runs on a single thread
(models.predictor: ONNX Runtime's batch session in the API). A batch is formed only when an
inference thread is free, so while they all run the queue fills and under load batches grow on
their own. The runner waits for company (at most ``max_wait`` after the first image) only while
other requests have announced images that are still being decoded (``expecting``): a lone
request never waits at all.

A small batch with nothing queued or announced behind it runs through ``infer_alone`` when
given: the predictor's session that trades idle CPU for latency (models.onnx_session "in_run").
And when the batcher is ``idle()``, a lone request can skip the queue altogether: ``run_alone``
runs its whole job (decode and infer) in one trip to the inference thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class MicroBatcher:
    ALONE_MAX = 4  # images: a batch this small, with nothing behind it, is latency-bound

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float,
                 infer_alone: Callable[[np.ndarray], np.ndarray] | None = None, parallel: int = 1):
        self._infer = infer
        self._infer_alone = infer_alone or infer
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._runner: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.parallel = max(1, parallel)  # batches in flight at once, one inference thread each
        self._executor = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="infer")
        self._freed: asyncio.Event | None = None  # set when an inference thread comes free
        self._batches: set[asyncio.Task] = set()  # batches in flight
        self._expected = 0  # images announced by requests that are still decoding them
        self._running = 0  # jobs handed to the inference threads and not finished
        self._alone = 0  # of which run_alone's (it has the cores to itself: no batch starts beside it)

    def idle(self) -> bool:
        """Nothing queued, announced or running: a request now would have the cores to itself."""
        return self._running == 0 and self._expected <= 0 and (self._queue is None or self._queue.empty())

    async def run_alone(self, job: Callable[[], T]) -> T:
        """Run a lone request's whole job on an inference thread (one thread hop instead of a
        decode hop plus a batch). Batches queued meanwhile wait for it (``idle`` was true)."""
        self._running += 1
        self._alone += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, job)
        finally:
            self._running -= 1
            self._alone -= 1
            self._thread_freed()

    @contextlib.contextmanager
    def expecting(self, n: int) -> Iterator[None]:
        """Announce n images on their way (being decoded): batches wait for them, up to max_wait."""
        self._expected += n
        try:
            yield
        finally:
            self._expected -= n

    def enqueue(self, images: Sequence[np.ndarray]) -> list[asyncio.Future]:
        """Queue preprocessed images (each C x H x W, or a stack of them); a future per image's
        probabilities. They are stacked into a batch on the inference thread, never on the event
        loop: a batch of four at 288 px is 4 MB to copy."""
        self._ensure_runner()
        loop = asyncio.get_running_loop()
        futures = []
        for x in images:
            fut = loop.create_future()
            self._queue.put_nowait((x, fut))  # type: ignore[union-attr]
            futures.append(fut)
        return futures

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a stack of preprocessed images (N x C x H x W)."""
        return np.stack(await asyncio.gather(*self.enqueue(images)))

    def _ensure_runner(self) -> None:
        if self._runner is None or self._runner.done():
            self._queue = asyncio.Queue()
            self._freed = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._runner = self._loop.create_task(self._run())

    def _thread_freed(self) -> None:
        if self._freed is not None:
            self._freed.set()

    async def _run(self) -> None:
        assert self._queue is not None and self._freed is not None
        loop = asyncio.get_running_loop()
        while True:
            while self._running >= self.parallel or self._alone:  # a free thread first: meanwhile the queue fills
                self._freed.clear()
                await self._freed.wait()
            live = await self._next_batch(loop)
            if not live:
                continue
            alone = len(live) <= self.ALONE_MAX and self.idle()  # nothing queued, announced or running behind it
            self._running += 1
            task = loop.create_task(self._infer_batch(live, alone))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[tuple[np.ndarray, asyncio.Future]]:
        """Up to max_batch queued images whose requests still wait, after at most max_wait for company."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self._expected <= 0:  # nothing on its way: run what there is
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(x, f) for x, f in batch if not f.done()]

    async def _infer_batch(self, live: list[tuple[np.ndarray, asyncio.Future]], alone: bool) -> None:
        """One batch on an inference thread; its requests get their rows, or its error (the runner lives on)."""
        try:
            probs = await asyncio.get_running_loop().run_in_executor(
                self._executor, _stacked, self._infer_alone if alone else self._infer, [x for x, _ in live])
        except BaseException as e:  # also a cancelled batch (close): no caller waits for ever
            error = e if isinstance(e, Exception) else RuntimeError("the model was unloaded")
            for _, f in live:
                if not f.done():
                    f.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            self._running -= 1
            self._thread_freed()
        for (_, f), p in zip(live, probs):
            if not f.done():
                f.set_result(p)

    def close(self) -> None:
        """Stop the runner (from any thread) and fail whatever is still queued, so no caller waits
        for ever; the model cache closes a batcher only when no request holds it."""
        if self._runner is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        for task in list(self._batches):
            task.cancel()
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("the model was unloaded"))


def _stacked(infer: Callable[[np.ndarray], np.ndarray], images: list[np.ndarray]) -> np.ndarray:
    return infer(np.stack(images))
