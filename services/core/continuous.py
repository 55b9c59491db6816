"""Continuous (step-level) batching for iterative jobs such as diffusion sampling.

A job needs many model calls in sequence (one per denoising step). Instead of running each job's
loop on its own, one worker runs a single model call per iteration over the rows of *every*
active job, whatever step each is at, and lets each job advance with its slice of the output, as
continuous batching does for LLM decoding. Jobs join between iterations and leave when done,
cancelled or past their deadline, freeing their rows at once.

With ``enabled=False`` each model call serves one job only (round-robin), which is what running
every request's loop separately costs; the benchmark compares the two.

Admission keeps admitted jobs on time. Every active job advances one step per round, and a round
costs (rows of all jobs) x (seconds per row, measured), so a job's finish time can be estimated
from the load. A new job is refused at once (``Overloaded``) when, at the load it would add to,
it would not finish before its own deadline (``DeadlineExpired`` when not even an idle model
could make it) or would push an admitted job past its deadline; and,
as in the dynamic batcher, while the oldest waiting job has waited over ``max_queue_wait_s``.

One job never fails another: when a shared call fails, each job's rows are re-run alone so that
only the culprit fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.core import tracing
from services.core.batching import RELEASE_AFTER_ROWS, BatchStats, failure_for, idle_release
from services.core.errors import DeadlineExpired, Overloaded, Unavailable
from services.core.metrics import ModelMetrics

log = logging.getLogger(__name__)

Predict = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
ADMISSION_HEADROOM = 1.25


class IterativeJob(Protocol):
    """What the scheduler needs of a job."""

    @property
    def rows(self) -> int: ...

    @property
    def done(self) -> bool: ...

    def inputs(self) -> dict[str, np.ndarray]: ...

    def advance(self, output: np.ndarray) -> None: ...


def admissible(waiting_rows: Sequence[int], rows_in_flight: int, max_rows_in_flight: int) -> int:
    """How many of the waiting jobs (oldest first, rows each) to admit now: FIFO, while rows fit."""
    count = 0
    for rows in waiting_rows:
        if rows_in_flight + rows > max_rows_in_flight:
            break
        rows_in_flight += rows
        count += 1
    return count


def select(active_rows: Sequence[int], turn: int, max_rows_per_call: int, share: bool) -> list[int]:
    """Which active jobs (by index; rows each) go into the next call.

    Starting at a position that rotates with ``turn`` (so no job is always last), every job whose
    rows still fit, and always at least one; with ``share`` off, exactly one.
    """
    if not active_rows:
        return []
    start = turn % len(active_rows)
    order = [*range(start, len(active_rows)), *range(start)]
    if not share:
        return order[:1]
    chosen: list[int] = []
    rows = 0
    for index in order:
        if rows + active_rows[index] > max_rows_per_call and chosen:
            continue
        chosen.append(index)
        rows += active_rows[index]
    return chosen


def _remaining_calls(job: IterativeJob) -> int:
    """Model calls a job still needs (jobs that do not say are counted as one)."""
    steps = getattr(job, "steps", None)
    index = getattr(job, "index", None)
    if steps is None or index is None:
        return 1
    return max(1, len(steps) - int(index))


@dataclass(eq=False)
class _Entry:
    job: IterativeJob
    future: asyncio.Future[None]
    deadline: float | None
    on_step: Callable[[], None] | None
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    trace: object = None  # the caller's trace context, when tracing is on


class StepBatcher:
    """Runs iterative jobs, sharing each model call among all active jobs' rows."""

    def __init__(
        self,
        predict: Predict,
        *,
        name: str,
        output: str,
        max_rows_per_call: int = 256,
        max_rows_in_flight: int = 1024,
        max_waiting: int = 256,
        max_queue_wait_s: float = 0.0,
        enabled: bool = True,
        metrics: ModelMetrics | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self._predict = predict
        self._release = release
        self._grown = False
        self.name = name
        self.output = output
        self.max_rows_per_call = max_rows_per_call
        self.max_rows_in_flight = max_rows_in_flight
        self.max_waiting = max_waiting
        self.max_queue_wait_s = max_queue_wait_s
        self.enabled = enabled
        self.seconds_per_row = 0.0  # moving average over model calls; 0 until the first call
        self._metrics = metrics
        self._waiting: deque[_Entry] = deque()
        self._active: list[_Entry] = []
        self._rows_in_flight = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"steps-{name}")
        self._worker: asyncio.Task[None] | None = None
        self._accepting = False
        self._turn = 0
        self.stats = BatchStats()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def rows_in_flight(self) -> int:
        return self._rows_in_flight

    def start(self) -> None:
        self._accepting = True
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"steps-{self.name}")

    def begin_drain(self) -> None:
        """Shutdown has begun: admitted jobs still run to completion."""
        self._wakeup.set()

    async def stop(self) -> None:
        self._accepting = False
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def run(
        self, job: IterativeJob, deadline: float | None = None, on_step: Callable[[], None] | None = None
    ) -> None:
        """Run ``job`` to completion (advancing it in place). ``on_step`` is called after each step."""
        if not self._accepting:
            raise Unavailable("server is shutting down")
        if job.rows > self.max_rows_in_flight:
            raise Overloaded(
                f"{job.rows} rows per step exceed max_rows_in_flight={self.max_rows_in_flight}",
                limit="max_rows_in_flight",
                subject=f"model {self.name}",
            )
        if len(self._waiting) >= self.max_waiting:
            if self._metrics:
                self._metrics.queue_full.inc()
            raise Overloaded(
                f"{len(self._waiting)} generation jobs already wait for rows (max {self.max_waiting}); retry later",
                limit="max_waiting",
                subject=f"model {self.name}",
            )
        self._check_admission(job, deadline)
        entry = _Entry(job, asyncio.get_running_loop().create_future(), deadline, on_step)
        if tracing.enabled:
            entry.trace = tracing.capture()
        self._waiting.append(entry)
        if self._metrics:
            self._metrics.queue_depth.inc()
        self._wakeup.set()
        try:
            await entry.future
        except asyncio.CancelledError:
            entry.cancelled = True  # the worker drops it before the next step and frees its rows
            raise

    def _check_admission(self, job: IterativeJob, deadline: float | None) -> None:
        """Refuse ``job`` now if the queue is stale or it would make itself or others late."""
        now = time.perf_counter()
        if self.max_queue_wait_s and self._waiting:
            waited = now - self._waiting[0].enqueued
            if waited > self.max_queue_wait_s:
                self._shed(
                    f"model {self.name} is overloaded: the oldest waiting generation job has waited "
                    f"{waited * 1000:.0f} ms (max_queue_wait_ms={self.max_queue_wait_s * 1000:.0f}); retry later"
                )
        if not self.seconds_per_row:
            return  # no measurement yet
        rows = self._rows_in_flight + sum(e.job.rows for e in self._waiting) + job.rows
        # Headroom over the estimate: per-step overhead and a moving measurement.
        round_s = rows * self.seconds_per_row * ADMISSION_HEADROOM
        if deadline is not None:
            alone = _remaining_calls(job) * job.rows * self.seconds_per_row
            if now + alone > deadline:
                # Not even an idle server would finish in time: the deadline, not the load, is the problem.
                if self._metrics:
                    self._metrics.deadline.inc()
                raise DeadlineExpired(
                    f"this request needs about {alone:.1f} s of model time on its own, more than its deadline leaves "
                    f"({max(0.0, deadline - now):.2f} s); ask for fewer images or steps, or a longer deadline"
                )
            needed = _remaining_calls(job) * round_s
            if now + needed > deadline:
                self._shed(
                    f"model {self.name} is busy: at the current load ({rows} denoiser rows per round) this request "
                    f"needs about {needed:.1f} s, more than its deadline leaves ({max(0.0, deadline - now):.1f} s); "
                    "retry later, with fewer images or steps, or with a longer deadline"
                )
        for entry in (*self._active, *self._waiting):
            if entry.deadline is not None and now + _remaining_calls(entry.job) * round_s > entry.deadline:
                self._shed(
                    f"model {self.name} is at capacity: admitting this request would make admitted ones miss their "
                    "deadlines; retry later"
                )

    def _shed(self, message: str) -> None:
        if self._metrics:
            self._metrics.queue_full.inc()
        raise Overloaded(message, limit="admission", subject=f"model {self.name}")

    def _admit(self) -> None:
        count = admissible([e.job.rows for e in self._waiting], self._rows_in_flight, self.max_rows_in_flight)
        for _ in range(count):
            entry = self._waiting.popleft()
            if self._metrics:
                self._metrics.queue_depth.dec()
                self._metrics.queue_wait.observe(time.perf_counter() - entry.enqueued)
            self.stats.queue_count += 1
            self.stats.queue_ns += int((time.perf_counter() - entry.enqueued) * 1e9)
            self._active.append(entry)
            self._rows_in_flight += entry.job.rows
            if tracing.enabled:
                tracing.queued(self.name, self._metrics, [entry], time.perf_counter())

    def _retire(self, entry: _Entry, error: BaseException | None = None) -> None:
        if tracing.enabled:
            tracing.sampled(self.name, self._metrics, entry, error)
        self._active.remove(entry)
        self._rows_in_flight -= entry.job.rows
        elapsed = int((time.perf_counter() - entry.enqueued) * 1e9)
        if error is None and not entry.cancelled:
            self.stats.success_count += 1
            self.stats.success_ns += elapsed
        else:
            self.stats.fail_count += 1
            self.stats.fail_ns += elapsed
        if not entry.future.done():
            if error is None:
                entry.future.set_result(None)
            else:
                entry.future.set_exception(error)

    def _sweep(self) -> None:
        """Drop cancelled and expired jobs (waiting or active) before the next call."""
        now = time.perf_counter()
        for entry in [e for e in self._waiting if e.cancelled or e.future.done()]:
            self._waiting.remove(entry)
            if self._metrics:
                self._metrics.queue_depth.dec()
                self._metrics.cancelled.inc()
        for entry in list(self._active):
            if entry.cancelled or entry.future.done():
                if self._metrics:
                    self._metrics.cancelled.inc()
                self._retire(entry)
            elif entry.deadline is not None and now >= entry.deadline:
                if self._metrics:
                    self._metrics.deadline.inc()
                self._retire(entry, DeadlineExpired(f"deadline expired after step {getattr(entry.job, 'index', '?')}"))

    def _select(self) -> list[_Entry]:
        """The jobs whose rows go into this call (see :func:`select`)."""
        indices = select([e.job.rows for e in self._active], self._turn, self.max_rows_per_call, self.enabled)
        self._turn += 1
        return [self._active[i] for i in indices]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._accepting or self._active or self._waiting:
            self._sweep()
            self._admit()
            chosen = self._select()
            if not chosen:
                self._wakeup.clear()
                if not self._accepting and not self._waiting:
                    break
                if self._grown and self._release is not None:
                    self._grown = not await idle_release(self._wakeup, loop, self._executor, self._release)
                else:
                    await self._wakeup.wait()
                continue
            await self._step(loop, chosen)

    async def _step(self, loop: asyncio.AbstractEventLoop, chosen: list[_Entry]) -> None:
        """One model call over the chosen jobs' rows, and each job's advance."""
        parts = [e.job.inputs() for e in chosen]
        inputs = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        rows = sum(e.job.rows for e in chosen)
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._predict, inputs)
        except Exception as exc:
            if self._metrics:
                self._metrics.failures.inc()
            if len(chosen) > 1:
                log.warning(
                    "model %s failed on a shared step of %d jobs (%s); re-running each alone",
                    self.name,
                    len(chosen),
                    str(exc)[:200],
                )
                if self._metrics:
                    self._metrics.isolations.inc()
                for entry in chosen:
                    if entry in self._active:
                        await self._step(loop, [entry])
                return
            failure = failure_for(exc, self.name)
            log.error("model %s failed during sampling (%d rows)", self.name, rows, exc_info=exc)
            if chosen[0] in self._active:
                self._retire(chosen[0], failure)
            return
        elapsed = time.perf_counter() - started
        self._grown |= rows >= RELEASE_AFTER_ROWS
        self._account(rows, elapsed)
        output, offset = outputs[self.output], 0
        for entry in chosen:
            n = entry.job.rows
            if not entry.cancelled and not entry.future.done():
                entry.job.advance(output[offset : offset + n])
                if entry.on_step is not None:
                    entry.on_step()
            offset += n
            if entry.cancelled or entry.future.done():
                if self._metrics:
                    self._metrics.cancelled.inc()
                self._retire(entry)
            elif entry.job.done:
                self._retire(entry)

    def _account(self, rows: int, elapsed: float) -> None:
        self.stats.record_execution(rows, elapsed, self._metrics)
        per_row = elapsed / max(rows, 1)
        self.seconds_per_row = per_row if not self.seconds_per_row else 0.8 * self.seconds_per_row + 0.2 * per_row
