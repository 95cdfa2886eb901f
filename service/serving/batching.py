"""Dynamic micro-batching: concurrent predict requests share one pass through the network.

A request's images join a queue; one runner takes up to ``max_batch`` of them and runs them as
one batch on a single inference thread (the network itself uses every core). While a batch runs,
the next one fills, so under load batches grow on their own. The runner waits for company (at
most ``max_wait`` after the first image) only while other requests have announced images that
are still being decoded (``expecting``): a lone request never waits at all.

A small batch with nothing queued or announced behind it runs through ``infer_alone`` when
given: the predictor's session that trades idle CPU for latency (models.onnx_session "in_run").
And when the batcher is ``idle()``, a lone request can skip the queue altogether: ``run_alone``
runs its whole job (decode and infer) in one trip to the inference thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class MicroBatcher:
    ALONE_MAX = 4  # images: a batch this small, with nothing behind it, is latency-bound

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float,
                 infer_alone: Callable[[np.ndarray], np.ndarray] | None = None):
        self._infer = infer
        self._infer_alone = infer_alone or infer
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._runner: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
        self._expected = 0  # images announced by requests that are still decoding them
        self._running = 0  # jobs handed to the inference thread and not finished

    def idle(self) -> bool:
        """Nothing queued, announced or running: a request now would have the cores to itself."""
        return self._running == 0 and self._expected <= 0 and (self._queue is None or self._queue.empty())

    async def run_alone(self, job: Callable[[], T]) -> T:
        """Run a lone request's whole job on the inference thread (one thread hop instead of a
        decode hop plus a batch). Batches queued meanwhile run after it: one inference at a time."""
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, job)
        finally:
            self._running -= 1

    @contextlib.contextmanager
    def expecting(self, n: int) -> Iterator[None]:
        """Announce n images on their way (being decoded): batches wait for them, up to max_wait."""
        self._expected += n
        try:
            yield
        finally:
            self._expected -= n

    def enqueue(self, images: np.ndarray) -> list[asyncio.Future]:
        """Queue a stack of preprocessed images (N x C x H x W); a future per image's probabilities."""
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
            self._loop = asyncio.get_running_loop()
            self._runner = self._loop.create_task(self._run())

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
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
            live = [(x, f) for x, f in batch if not f.done()]
            if not live:
                continue
            alone = len(live) <= self.ALONE_MAX and self.idle()  # nothing queued, announced or running behind it
            self._running += 1
            try:
                probs = await loop.run_in_executor(self._executor, self._infer_alone if alone else self._infer,
                                                   np.stack([x for x, _ in live]))
            except Exception as e:  # the requests fail, the runner lives on
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            finally:
                self._running -= 1
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
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("the model was unloaded"))
