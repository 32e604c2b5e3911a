"""Dynamic batching: concurrent requests to one model share one call of its core.

Each model has one :class:`Batcher`: requests put their prepared images in a bounded queue;
one loop takes what is waiting (up to ``max_batch`` images, waiting at most ``max_wait_ms``
for more after the first), runs the core once in the model's inference thread (never on the
event loop), then splits the outputs back and post-processes each request with its own
options (``conf``, ``topk``). A request that timed out while waiting is dropped from its
batch; a queue that is full refuses at once (:class:`Overloaded`, answered 429).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch


class Overloaded(Exception):
    """The model's queue holds as many images as it may; try again shortly."""


@dataclass
class Job:
    """One request's prepared images, its options, and where its results go."""

    xs: list[torch.Tensor]
    metas: list[dict[str, Any]]
    options: dict[str, Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    timing: dict[str, float] = field(default_factory=dict)
    dropped: bool = False
    embeddings: Any = None  # (n, D) array when the batcher has an embedding tap


class Batcher:
    """Groups the requests of one :class:`~cnnkit.runtime.pipeline.Predictor`.

    Args:
        predictor: the loaded model.
        max_batch: most images per core call (1 for pipelines that cannot stack inputs).
        max_wait_ms: how long the first request of a batch may wait for requests already
            arriving (admitted, their bodies being read or decoded); with none arriving and
            none queued, a batch starts at once.
        max_queue: most images waiting; beyond it :meth:`submit` raises :class:`Overloaded`.
        max_queue_ms: refuse a request whose expected wait (the images ahead of it times the
            recent time per image) is longer than this; None for no limit but ``max_queue``.
        on_batch: called with the number of images of every batch run (for metrics).
        tap: an :class:`~cnnkit.methods.drift.EmbeddingTap` on the predictor, whose embeddings
            come back with each request's results (for drift monitoring).

    :meth:`admit` and :meth:`release` bracket a request from its arrival (before its body is
    read), so an overloaded server refuses at once instead of decoding what it cannot run.
    """

    def __init__(self, predictor, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch=None, max_queue_ms: float | None = None, tap=None):
        self.predictor = predictor
        self.tap = tap
        self.max_batch = max_batch if predictor.pipeline.batchable else 1
        self.max_wait = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.waiting = 0  # images queued and not yet taken into a batch
        self.arriving = 0  # requests admitted and not yet queued (reading, decoding)
        self.max_queue_s = max_queue_ms / 1e3 if max_queue_ms else None
        self.per_image_s: float | None = None  # moving average of the core's time per image
        self.busy_until = 0.0  # perf_counter() at which the batch running now should end
        self.queue: asyncio.Queue[Job] | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cnnkit-infer")
        self._carry: Job | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait before its own batch starts: the rest of
        the batch running now and the images ahead of it (0 before any batch ran, and with
        nothing ahead: the first in line is always admitted)."""
        running = max(0.0, self.busy_until - time.perf_counter())
        return running + (self.waiting + self.arriving) * (self.per_image_s or 0.0)

    def admit(self) -> bool:
        """Reserve room for one arriving request; False (refuse it) when the queue is full or
        its expected wait is over ``max_queue_ms``."""
        if self.waiting + self.arriving >= self.max_queue:
            return False
        if self.max_queue_s is not None and self.expected_wait() > self.max_queue_s:
            return False
        self.arriving += 1
        return True

    def release(self) -> None:
        self.arriving -= 1

    async def submit(self, xs: list[torch.Tensor], metas: list[dict[str, Any]], options: dict[str, Any],
                     timeout: float) -> tuple[list, dict[str, float], Any]:
        """The results of ``xs`` (prepared inputs), the time spent queued and in inference, and
        the images' embeddings (None without a tap).

        Raises:
            Overloaded: the queue is full.
            TimeoutError: no result within ``timeout`` seconds (the images are dropped).
        """
        if self.queue is None:
            raise RuntimeError("the batcher is not started")
        if self.waiting + len(xs) > self.max_queue:
            raise Overloaded
        job = Job(xs, metas, options, asyncio.get_running_loop().create_future())
        self.waiting += len(xs)
        self.queue.put_nowait(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except (TimeoutError, asyncio.CancelledError):
            job.dropped = True
            raise

    async def _next(self, timeout: float | None) -> Job:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self.queue.get()
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._next(None)]
            n = len(jobs[0].xs)
            deadline = loop.time() + self.max_wait
            while n < self.max_batch:
                left = deadline - loop.time()
                # wait only for company known to be coming (admitted, still being read or
                # decoded), and at most max_wait: a request alone starts at once
                if self.queue.empty() and (left <= 0 or self.arriving == 0):
                    break
                try:
                    job = await self._next(max(left, 0.0) or 1e-4)
                except TimeoutError:
                    break
                if n + len(job.xs) > self.max_batch:
                    self._carry = job  # starts the next batch
                    break
                jobs.append(job)
                n += len(job.xs)
            self.waiting -= sum(len(j.xs) for j in jobs)
            live = [j for j in jobs if not j.dropped and not j.future.done()]
            if not live:
                continue
            started = time.perf_counter()
            for j in live:
                j.timing["queue_ms"] = (started - j.enqueued) * 1e3
            images = sum(len(j.xs) for j in live)
            self.busy_until = started + images * (self.per_image_s or 0.0)
            try:
                outs = await loop.run_in_executor(self.executor, self._run, live)
                per = (time.perf_counter() - started) / images
                self.per_image_s = per if self.per_image_s is None else 0.8 * self.per_image_s + 0.2 * per
            except Exception as e:  # noqa: BLE001 - a model failure answers every request of its batch
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            finally:
                self.busy_until = 0.0
            for j, out in zip(live, outs):
                if not j.future.done():
                    j.future.set_result((out, j.timing, j.embeddings))

    def _run(self, jobs: list[Job]) -> list[list]:
        """In the inference thread: one core call over every job's images (one per image when
        the pipeline cannot stack), then each job's post-processing with its options."""
        p = self.predictor
        xs = [x for j in jobs for x in j.xs]
        metas = [m for j in jobs for m in j.metas]
        t0 = time.perf_counter()
        if p.pipeline.batchable:
            call = lambda: [p.infer(torch.stack(xs), metas)]
        else:
            call = lambda: [p.infer(x[None], [m]) for x, m in zip(xs, metas)]
        raws, emb = self.tap.run(call, len(xs)) if self.tap is not None else (call(), None)
        t1 = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(len(xs))
        outs, start = [], 0
        for j in jobs:
            stop = start + len(j.xs)
            tj = time.perf_counter()
            if p.pipeline.batchable:  # batch-first outputs: this job's rows
                raw = tuple(r[start:stop] for r in raws[0])
                results = p.pipeline.postprocess(raw, j.metas, **j.options)
            else:
                results = [r for i in range(start, stop) for r in p.pipeline.postprocess(raws[i], [metas[i]],
                                                                                        **j.options)]
            j.embeddings = emb[start:stop] if emb is not None else None
            j.timing["inference_ms"] = (t1 - t0) * 1e3
            j.timing["postprocess_ms"] = (time.perf_counter() - tj) * 1e3
            outs.append(results)
            start = stop
        return outs
