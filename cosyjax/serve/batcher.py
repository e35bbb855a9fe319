"""The device worker: one thread that owns the engine, gathers concurrent requests into batches and
interleaves streams.

* Non-streaming jobs (each a list of text segments with one key each) wait at most `window_s` after the
  first one arrives, then up to `max_batch` segments of the same `speed` run as ONE call of the batched
  jitted core. The row count is rounded up to a bucket (1, 2, 4, ..., max_batch) by repeating the last
  row, so a new batch size inside a bucket reuses the compiled program; padded rows are dropped.
  Each row equals what the request gives alone with its key (the core vmaps over rows).
* Streams: each is a generator of audio chunks; the worker advances every active stream by one chunk
  per round, between batches. A cancelled stream (client gone) is closed at the next round and its
  generator's work stops. Without a `gang` the streams of a round advance one after the other; with
  one (`cosyjax.stage_batch.StageGang`) each advances in its own thread inside `gang.member()`, so
  their stage calls meet and run batched, and the round ends when every stream has its chunk.

The worker only calls the two functions it is given, so the scheduling is testable without a model.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from cosyjax.stage_batch import pow2_bucket

__all__ = ["BatchConfig", "Scheduler", "StreamTicket", "batch_bucket"]

log = logging.getLogger("cosyjax.serve")

RunBatch = Callable[[list, list, float], list]          # (model_inputs, keys, speed) -> [1, N] arrays
OpenStream = Callable[[Any, Any], Iterator[np.ndarray]]  # (model_input, key) -> [1, n] chunks


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 8           # most segments in one batched call
    window_s: float = 0.02       # how long the first waiting job waits for company
    pad_to_bucket: bool = True   # round batch rows up to a power of two (<= max_batch)

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {self.window_s}")


def batch_bucket(n: int, max_batch: int) -> int:
    """Rows a batch of n segments runs with: the next power of two, capped at max(max_batch, n)."""
    return max(n, min(pow2_bucket(n), max_batch))


@dataclasses.dataclass(eq=False)
class _Job:
    inputs: list
    keys: list
    speed: float
    future: concurrent.futures.Future
    arrived: float


class StreamTicket:
    """Handle of one stream: `cancel()` asks the worker to drop it (safe from any thread)."""

    def __init__(self, inputs: Sequence, keys: Sequence, emit: Callable[[str, Any], None]):
        self.inputs, self.keys, self.emit = list(inputs), list(keys), emit
        self._cancel = threading.Event()
        self.gen: Optional[Iterator] = None    # all segments' chunks (worker thread only)
        self.first: Optional[Iterator] = None  # the first segment's iterator (closed even if never started)

    def close(self) -> None:
        """Stop the stream's work (worker thread): close the chunk generator and the first segment."""
        for it in (self.gen, self.first):
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Scheduler:
    """Owns the device work. `submit` (non-streaming) returns a Future of per-request [N] audio;
    `stream` calls `emit('chunk', [n] float32)` per chunk, then `emit('done', None)` or `emit('error', exc)`."""

    def __init__(self, run_batch: RunBatch, open_stream: OpenStream, config: BatchConfig = BatchConfig(),
                 on_batch: Optional[Callable[[int, int, float], None]] = None, gang=None):
        self.run_batch, self.open_stream, self.config = run_batch, open_stream, config
        self.gang = gang
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None  # stream threads (with a gang)
        self.on_batch = on_batch  # (real rows, padded rows, seconds) after every batch, for metrics
        self._cv = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._streams: list[StreamTicket] = []
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.cancelled_streams = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cosyjax-device", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_depth(self) -> int:
        with self._cv:
            return sum(len(j.inputs) for j in self._jobs)

    def active_streams(self) -> int:
        with self._cv:
            return len(self._streams)

    # ------------------------------------------------------------------ requests
    def submit(self, inputs: Sequence, keys: Sequence, speed: float = 1.0) -> concurrent.futures.Future:
        if len(inputs) != len(keys) or not inputs:
            raise ValueError("submit needs one key per model input and at least one input")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop:
                raise RuntimeError("scheduler stopped")
            self._jobs.append(_Job(list(inputs), list(keys), float(speed), fut, time.monotonic()))
            self._cv.notify_all()
        return fut

    def stream(self, inputs: Sequence, keys: Sequence, emit: Callable[[str, Any], None]) -> StreamTicket:
        if len(inputs) != len(keys) or not inputs:
            raise ValueError("stream needs one key per model input and at least one input")
        t = StreamTicket(inputs, keys, emit)
        with self._cv:
            if self._stop:
                raise RuntimeError("scheduler stopped")
            self._streams.append(t)
            self._cv.notify_all()
        return t

    # ------------------------------------------------------------------ worker
    def _take_batch(self, now: float) -> tuple[list[_Job], float]:
        """Jobs to run now (same speed, <= max_batch segments; one oversized job runs alone), or ([], wait)."""
        if not self._jobs:
            return [], float("inf")
        first = self._jobs[0]
        rows = sum(len(j.inputs) for j in self._jobs if j.speed == first.speed)
        wait = first.arrived + self.config.window_s - now
        if rows < self.config.max_batch and wait > 0:
            return [], wait
        taken, n = [], 0
        for j in list(self._jobs):
            if j.speed != first.speed:
                continue
            if taken and n + len(j.inputs) > self.config.max_batch:
                break
            taken.append(j)
            n += len(j.inputs)
        for j in taken:
            self._jobs.remove(j)
        return taken, 0.0

    def _run_jobs(self, jobs: list[_Job]) -> None:
        inputs = [x for j in jobs for x in j.inputs]
        keys = [k for j in jobs for k in j.keys]
        n = len(inputs)
        rows = batch_bucket(n, self.config.max_batch) if self.config.pad_to_bucket else n
        inputs += [inputs[-1]] * (rows - n)
        keys += [keys[-1]] * (rows - n)
        t0 = time.perf_counter()
        try:
            audios = self.run_batch(inputs, keys, jobs[0].speed)
        except Exception as e:  # not swallowed: every waiting request receives it; the worker keeps serving
            for j in jobs:
                j.future.set_exception(e)
            return
        dt = time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(n, rows, dt)
        i = 0
        for j in jobs:
            parts = [np.asarray(a, np.float32).reshape(-1) for a in audios[i:i + len(j.inputs)]]
            i += len(j.inputs)
            j.future.set_result(np.concatenate(parts) if parts else np.zeros(0, np.float32))

    def _stream_gen(self, t: StreamTicket) -> Iterator[np.ndarray]:
        """All segments' chunks; the first segment is opened now (a slot pool inserts it at once)."""
        first = self.open_stream(t.inputs[0], t.keys[0])

        def chunks():
            try:
                yield from first
            finally:
                close = getattr(first, "close", None)
                if close is not None:
                    close()
            for mi, key in zip(t.inputs[1:], t.keys[1:]):
                yield from self.open_stream(mi, key)

        return chunks(), first

    def _step_streams(self) -> None:
        with self._cv:
            streams = list(self._streams)
        for t in streams:  # open every new stream before any runs: streams that arrive together decode together
            if t.gen is None and not t.cancelled:
                try:
                    t.gen, t.first = self._stream_gen(t)
                except Exception as e:  # this stream fails alone (e.g. its prompt does not fit a slot)
                    with self._cv:
                        self._streams.remove(t)
                    t.emit("error", e)
        with self._cv:
            streams = [t for t in self._streams if t.gen is not None or t.cancelled]  # newcomers open next round
        live = [t for t in streams if not t.cancelled]
        if self.gang is not None and len(live) > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="cosyjax-stream")
            self.gang.enter(len(live))  # all count as running before any starts: none calls alone
            futures = {id(t): self._pool.submit(self._advance_in_gang, t) for t in live}
            outcome = {k: f.result() for k, f in futures.items()}
        else:
            outcome = {id(t): self._advance(t) for t in live}
        for t in streams:
            finished, error = False, None
            if t.cancelled:
                finished = True
                self.cancelled_streams += 1
            else:
                finished, error = outcome[id(t)]
            if finished:
                t.close()
                with self._cv:
                    self._streams.remove(t)
                if not t.cancelled:
                    t.emit("error", error) if error is not None else t.emit("done", None)

    def _advance(self, t: StreamTicket) -> tuple[bool, Optional[BaseException]]:
        """One chunk of stream t, emitted -> (finished, error)."""
        try:
            chunk = next(t.gen)
            t.emit("chunk", np.asarray(chunk, np.float32).reshape(-1))
        except StopIteration:
            return True, None
        except Exception as e:  # this stream fails alone; the others continue
            return True, e
        return False, None

    def _advance_in_gang(self, t: StreamTicket) -> tuple[bool, Optional[BaseException]]:
        with self.gang.member(entered=True):
            return self._advance(t)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    break
                jobs, wait = self._take_batch(time.monotonic())
                if not jobs and not self._streams:
                    self._cv.wait(None if wait == float("inf") else wait)
                    continue
            if jobs:
                self._run_jobs(jobs)
            self._step_streams()
        # shut down: fail what is still waiting, end streams
        with self._cv:
            jobs, self._jobs = list(self._jobs), collections.deque()
            streams, self._streams = list(self._streams), []
        for j in jobs:
            j.future.set_exception(RuntimeError("server shutting down"))
        for t in streams:
            t.close()
            t.emit("error", RuntimeError("server shutting down"))
