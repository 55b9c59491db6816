"""Dynamic batching: concurrent requests merge into one model call.

A single worker task takes the oldest request, then adds whatever else is queued (and, up to
``max_delay``, whatever arrives) until ``max_batch_size`` rows, concatenates the inputs along axis
0, runs the model once (in a dedicated thread, or on the loop when it is fast: see below) and hands
each request its slice of the outputs. While a batch runs, new requests queue up and form the next
batch, so under load batches grow without any waiting.

- The queue is bounded: it counts every admitted request that has not started running (queued or
  in a batch still being formed); one that finds it full is refused at once (``Overloaded``).
  So is one that arrives while the oldest queued request has waited over ``max_queue_wait_s``:
  under overload the service sheds the excess fast and keeps admitted requests' latency bounded.
- A request whose deadline passed, or whose caller went away, while queued is dropped before
  inference (``DeadlineExpired``).
- One request never fails another. Inputs are validated before they are queued; if a merged
  batch still fails, each of its requests is re-run alone so that only the culprit fails, with
  ``InvalidInput`` when onnxruntime refused its values and ``InferenceFailed`` otherwise (the
  isolations are counted in ``nnserve_batch_isolations_total``). The worker goes on.
- A request larger than ``max_batch_size`` runs alone, in one call.
- A small request (at most ``inline_max_rows`` rows) that finds the model idle (nothing queued,
  no batch running) runs at once on the event loop, if the model is fast (``inline_budget_s``): no
  thread hand-off and no wake-ups, which on CPU is most of a small model's serving overhead.
  Requests that meet contention queue and batch as above; a batch that fits the same budget
  also runs on the loop (capped at the rows that fit it), a larger one in the thread. Where
  inline_max_rows is 0 (GPUs, spare cores) every batch goes to the thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from services.core import tracing
from services.core.errors import DeadlineExpired, InferenceFailed, InvalidInput, NnserveError, Overloaded, Unavailable
from services.core.metrics import ModelMetrics

log = logging.getLogger(__name__)

# The longest model call the inline path may make on the event loop, by default: a slower model
# would hold up every other call (health checks too) for longer and keep its queue from forming,
# so overload would not be shed. Measured per row, as a moving average. The thread hand-off a
# longer call pays instead costs 0.1-0.3 ms of CPU on one core (BENCHMARKS.md), so at 5 ms it is
# at most about 5% of any call that takes it, and a 5 ms stall of the loop is far inside any
# health probe's timeout or a client's deadline. The service's ``inline_budget_ms`` sets it.
INLINE_BUDGET_S = 0.005

# After a model call of at least this many rows, a batcher that then stays idle for
# IDLE_RELEASE_S gives the arena memory the call grew back (see OnnxModel.release_memory).
RELEASE_AFTER_ROWS = 8
IDLE_RELEASE_S = 2.0

# A server sees a call's deadline a little after the client set it (the call's transit time), so
# a call cancelled this close to its deadline is counted as timed out rather than abandoned.
DEADLINE_SLACK_S = 0.1

Arrays = Mapping[str, np.ndarray]
Predict = Callable[[Arrays], dict[str, np.ndarray]]


def failure_for(exc: BaseException, model: str) -> NnserveError:
    """What a request that failed *on its own* is told: its input's fault, or the model's.

    onnxruntime raises its ``InvalidArgument`` for values a kernel refuses (an index out of
    bounds): that is the request's fault. Anything else is the server's, and says no more.
    """
    if type(exc).__name__ == "InvalidArgument":
        detail = str(exc).split("Status Message:", 1)[-1].strip()
        return InvalidInput("inputs", f"model {model} refused these values: {detail[:200]}")
    return InferenceFailed(f"model {model} failed on this request")


@dataclass
class BatchStats:
    """Plain counters kept beside the Prometheus metrics, for the OIP ModelStatistics call.

    Durations are nanoseconds. ``success``/``fail`` count requests (from queueing to their
    result); ``rows`` and ``batches`` count model work; ``by_batch_size`` maps a batch's row count
    to (executions, compute ns).
    """

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    rows: int = 0
    batches: int = 0
    last_inference_ms: int = 0
    by_batch_size: dict[int, list[int]] = field(default_factory=dict)

    def record_execution(self, rows: int, seconds: float, metrics: ModelMetrics | None) -> None:
        """One successful model call of ``rows`` rows: the statistics and the Prometheus metrics,
        in one place for every batcher."""
        ns = int(seconds * 1e9)
        self.compute_count += 1
        self.compute_ns += ns
        self.rows += rows
        self.batches += 1
        self.last_inference_ms = int(time.time() * 1000)
        per_size = self.by_batch_size.get(rows)
        if per_size is None:
            per_size = self.by_batch_size[rows] = [0, 0]
        per_size[0] += 1
        per_size[1] += ns
        if metrics:
            metrics.inference_duration.observe(seconds)
            metrics.batch_size.observe(rows)
            metrics.rows.inc(rows)
            metrics.batches.inc()


@dataclass(eq=False)
class _Request:
    inputs: Arrays
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float | None
    enqueued: float = field(default_factory=time.perf_counter)
    trace: object = None  # the caller's trace context, when tracing is on


async def idle_release(
    wakeup: asyncio.Event, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, release: Callable[[], None]
) -> bool:
    """Wait for ``wakeup``; if it stays unset for IDLE_RELEASE_S, run ``release`` in ``executor``.

    Returns whether it released (False: woken first, with nothing done).
    """
    try:
        await asyncio.wait_for(wakeup.wait(), IDLE_RELEASE_S)
        return False
    except TimeoutError:
        pass
    try:
        await loop.run_in_executor(executor, release)
    except Exception:  # giving memory back is best effort
        log.exception("releasing model memory failed")
    return True


class DynamicBatcher:
    """Merges concurrent ``submit`` calls into batched calls of ``predict``."""

    def __init__(
        self,
        predict: Predict,
        *,
        name: str,
        max_batch_size: int = 64,
        max_delay_s: float = 0.002,
        max_queue_size: int = 1024,
        max_queue_wait_s: float = 0.0,
        enabled: bool = True,
        metrics: ModelMetrics | None = None,
        inline_max_rows: int = 0,
        inline_budget_s: float = INLINE_BUDGET_S,
        release: Callable[[], None] | None = None,
    ) -> None:
        self._predict = predict
        self.inline_max_rows = inline_max_rows
        self.inline_budget_s = inline_budget_s
        self._release = release
        self._grown = False  # a large call ran since memory was last released
        self.seconds_per_row = 0.0  # moving average of model time per row, 0 until measured
        # Moving average of the time of calls the inline path could have made (at most inline_max_rows
        # rows): a batched call's cheaper time per row must not open that path to a slow model.
        self.small_call_s = 0.0
        # The most rows a call may run on the event loop, from the two averages (0: none may).
        self._loop_rows = inline_max_rows
        self._executing = False  # a model call is running (in the executor, or inline)
        self.name = name
        self.max_batch_size = max_batch_size if enabled else 1
        self.max_delay_s = max_delay_s if enabled else 0.0
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._worker: asyncio.Task[None] | None = None
        self._accepting = False
        self._flush = False
        self._waiting = 0  # admitted requests not yet running: the bounded quantity
        self.stats = BatchStats()

    @property
    def queue_depth(self) -> int:
        """Admitted requests that have not started running."""
        return self._waiting

    @property
    def accepting(self) -> bool:
        """Started and not shutting down."""
        return self._accepting

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._accepting = True
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    def begin_drain(self) -> None:
        """Stop waiting ``max_delay`` for stragglers: run what is queued at once (shutdown)."""
        self._flush = True
        self._wakeup.set()

    async def stop(self) -> None:
        """Refuse new work, finish what is queued without waiting for stragglers, then stop."""
        self._accepting = False
        self._flush = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def submit(self, inputs: Arrays, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Queue ``inputs`` (batch-first arrays with equal row counts) and await their outputs.

        ``deadline`` is a ``time.perf_counter()`` instant after which the request is not run.
        """
        rows = len(next(iter(inputs.values())))
        # The common case first: a small request that finds the model idle runs now, on the loop.
        if rows <= self._loop_rows and not self._executing and not self._queue and self._accepting:
            return self._run_inline(inputs, rows, deadline)
        if not self._accepting:
            raise Unavailable("server is shutting down")
        if self._waiting >= self.max_queue_size:
            if self._metrics:
                self._metrics.queue_full.inc()
            raise Overloaded(
                f"queue for model {self.name} is full "
                f"(max_queue_size={self.max_queue_size} requests waiting); retry later",
                limit="max_queue_size",
                subject=f"model {self.name}",
                retry_after_s=self._drain_estimate_s(),
            )
        if self.max_queue_wait_s and self._queue:
            waited = time.perf_counter() - self._queue[0].enqueued
            if waited > self.max_queue_wait_s:
                # Shed load early: a queue this old means the model cannot keep up, and admitting
                # more would only make every admitted request later.
                if self._metrics:
                    self._metrics.queue_full.inc()
                raise Overloaded(
                    f"model {self.name} is overloaded: the oldest queued request has waited {waited * 1000:.0f} ms "
                    f"(max_queue_wait_ms={self.max_queue_wait_s * 1000:.0f}); retry later",
                    limit="max_queue_wait_ms",
                    subject=f"model {self.name}",
                    retry_after_s=self._drain_estimate_s(),
                )
        request = _Request(inputs, rows, asyncio.get_running_loop().create_future(), deadline)
        if tracing.enabled:
            request.trace = tracing.capture()
        self._queue.append(request)
        self._waiting += 1
        if self._metrics:
            self._metrics.queue_depth.inc()
        self._wakeup.set()
        return await request.future

    def _update_loop_rows(self) -> None:
        """How many rows fit the event loop's budget (inline_budget_s), from the moving averages:
        none when even small calls take longer (a slow per-call model), and up to inline_max_rows."""
        if not self.inline_max_rows or self.small_call_s > self.inline_budget_s:
            self._loop_rows = 0
        elif not self.seconds_per_row:
            self._loop_rows = self.inline_max_rows
        else:
            self._loop_rows = min(self.inline_max_rows, int(self.inline_budget_s / self.seconds_per_row))

    def _batch_limit(self) -> int:
        """The most rows a batch takes: max_batch_size, or, where batches run on the event loop, as
        many rows as fit its budget (on CPU a row costs about the same in any batch, so smaller
        batches on the loop beat larger ones behind a thread hand-off)."""
        if not self._loop_rows:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self._loop_rows))

    def _drain_estimate_s(self) -> float | None:
        """Model time the queued rows need (a retry hint for shed requests); None until measured."""
        if not self.seconds_per_row:
            return None
        return sum(r.rows for r in self._queue) * self.seconds_per_row

    def _run_inline(self, inputs: Arrays, rows: int, deadline: float | None) -> dict[str, np.ndarray]:
        """Run one small request now, on the calling (event loop) thread; the model is idle."""
        started = time.perf_counter()
        stats = self.stats
        m = self._metrics
        if deadline is not None and started >= deadline:
            self.stats.fail_count += 1
            if m:
                m.deadline.inc()
            raise DeadlineExpired("deadline expired before inference")
        self._executing = True
        try:
            outputs = self._predict(inputs)
        except Exception as exc:
            if m:
                m.failures.inc()
            failure = failure_for(exc, self.name)
            if isinstance(failure, InferenceFailed):
                log.error("model %s failed on a request of %d rows", self.name, rows, exc_info=exc)
            stats.fail_count += 1
            stats.fail_ns += int((time.perf_counter() - started) * 1e9)
            raise failure from None
        finally:
            self._executing = False
        finished = time.perf_counter()
        self._account(rows, 1, started, finished)
        if tracing.enabled:
            tracing.ran_inline(self.name, m, rows, started, finished)
        if m:
            m.queue_wait.observe(0.0)
        stats.queue_count += 1
        return outputs

    def _account(
        self, rows: int, requests: int, started: float, finished: float, enqueued: list[float] | None = None
    ) -> None:
        """Statistics and metrics of one successful model call and the requests it served (queued at
        ``enqueued``; None: one request that ran at once)."""
        took = finished - started
        per_row = took / max(rows, 1)
        self.seconds_per_row = per_row if not self.seconds_per_row else 0.9 * self.seconds_per_row + 0.1 * per_row
        if rows <= self.inline_max_rows:
            self.small_call_s = took if not self.small_call_s else 0.9 * self.small_call_s + 0.1 * took
        self._update_loop_rows()
        stats = self.stats
        stats.record_execution(rows, finished - started, self._metrics)
        stats.success_count += requests
        if enqueued is None:
            stats.success_ns += int((finished - started) * 1e9)
        else:
            stats.success_ns += sum(int((finished - t) * 1e9) for t in enqueued)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._accepting or self._queue:
            if not self._queue:
                self._wakeup.clear()
                if self._grown and self._release is not None:
                    self._grown = not await idle_release(self._wakeup, loop, self._executor, self._release)
                else:
                    await self._wakeup.wait()
                continue
            batch = await self._collect(loop)
            batch = self._drop_unrunnable(batch)
            if batch:
                await self._execute(loop, batch)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Request]:
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        wait_until = time.perf_counter() + self.max_delay_s
        limit = self._batch_limit()
        while rows < limit:
            if not self._queue:
                remaining = wait_until - time.perf_counter()
                if remaining <= 0 or self._flush:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
                continue
            if rows + self._queue[0].rows > limit:
                break
            request = self._queue.popleft()
            batch.append(request)
            rows += request.rows
        self._waiting -= len(batch)
        if self._metrics:
            self._metrics.queue_depth.dec(len(batch))
        return batch

    def _drop_unrunnable(self, batch: list[_Request]) -> list[_Request]:
        now = time.perf_counter()
        runnable = []
        for request in batch:
            expired = request.deadline is not None and now >= request.deadline
            if request.future.done():  # gRPC cancelled the call: the client went away or its deadline passed
                timed_out = request.deadline is not None and now >= request.deadline - DEADLINE_SLACK_S
                self._count_failure(request, now)
                if self._metrics:
                    (self._metrics.deadline if timed_out else self._metrics.cancelled).inc()
            elif expired:
                self._count_failure(request, now)
                if self._metrics:
                    self._metrics.deadline.inc()
                request.future.set_exception(
                    DeadlineExpired(
                        f"deadline expired after {now - request.enqueued:.3f}s in the queue, before inference"
                    )
                )
            else:
                runnable.append(request)
        return runnable

    def _count_failure(self, request: _Request, now: float) -> None:
        self.stats.fail_count += 1
        self.stats.fail_ns += int((now - request.enqueued) * 1e9)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        started = time.perf_counter()
        m = self._metrics
        stats = self.stats
        for request in batch:
            stats.queue_ns += int((started - request.enqueued) * 1e9)
            if m:
                m.queue_wait.observe(started - request.enqueued)
        stats.queue_count += len(batch)
        if tracing.enabled:
            tracing.queued(self.name, m, batch, started)
        await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {k: np.concatenate([r.inputs[k] for r in batch]) for k in batch[0].inputs}
        rows = sum(r.rows for r in batch)
        m = self._metrics
        started = time.perf_counter()
        self._executing = True
        try:
            if rows <= self._loop_rows:  # no thread hand-off: the model is fast enough to run here
                outputs = self._predict(inputs)
            else:
                outputs = await loop.run_in_executor(self._executor, self._predict, inputs)
        except Exception as exc:
            self._executing = False
            if m:
                m.failures.inc()
            if len(batch) > 1:
                # Isolate: one bad request must not fail the valid ones merged with it.
                log.warning(
                    "model %s failed on a merged batch of %d requests (%s); re-running each alone",
                    self.name,
                    len(batch),
                    str(exc)[:200],
                )
                if m:
                    m.isolations.inc()
                for request in batch:
                    if not request.future.done():
                        await self._run_batch(loop, [request])
                return
            request = batch[0]
            failure = failure_for(exc, self.name)
            if isinstance(failure, InferenceFailed):
                log.error("model %s failed on a request of %d rows", self.name, rows, exc_info=exc)
            self._count_failure(request, time.perf_counter())
            if tracing.enabled:
                tracing.ran(self.name, m, batch, rows, started, time.perf_counter(), failure)
            if not request.future.done():
                request.future.set_exception(failure)
            return
        self._executing = False
        finished = time.perf_counter()
        self._grown |= rows >= RELEASE_AFTER_ROWS
        self._account(rows, len(batch), started, finished, [r.enqueued for r in batch])
        if tracing.enabled:
            tracing.ran(self.name, m, batch, rows, started, finished)
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        offset = 0
        for request in batch:
            end = offset + request.rows
            if not request.future.done():
                request.future.set_result({k: v[offset:end] for k, v in outputs.items()})
            offset = end
