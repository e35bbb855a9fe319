"""Concurrent streams share the LLM: one slot-batched decode program for all active streams.

`SlotStreams(engine, num_slots, capacity).open(model_input, key)` yields the same audio chunks as
`engine.tts(model_input, stream=True, key=key)`, but the request's speech tokens come from a slot of a
shared `cosyjax.llm.slots` pool: when any stream needs tokens, ONE jitted call advances every active
slot by `hop` steps and the tokens of the others are buffered for them. Flow and vocoder chunks keep
per-request state; with a `gang` (`cosyjax.stage_batch.StageGang`) their device calls meet those of
the other streams stepping at the same time and run batched where their shapes agree. A stream's slot
is released when it ends or is closed (client gone). With all slots taken, a further stream decodes
with its own LLM loop (the engine's path), so no stream waits for a slot.

Streams may be advanced from several threads at once (one per stream, the scheduler's rounds): the
pool state is changed under one lock, and a decode step is taken only by a stream whose buffer is
still empty once it holds the lock.
"""
from __future__ import annotations

import collections
import threading
from typing import Iterator

import jax
import numpy as np

__all__ = ["SlotStreams"]


class SlotStreams:
    def __init__(self, engine, num_slots: int = 8, capacity: int = 1024, hop: int = 16, gang=None):
        from cosyjax.llm import slots

        self.engine, self.hop, self._slots, self.gang = engine, int(hop), slots, gang
        self._lock = threading.RLock()
        self.state = slots.init_slots(engine.config.llm, int(num_slots), int(capacity),
                                      sampling=engine.config.sampling)
        self._buffers: dict[int, collections.deque] = {}
        self.steps = 0          # batched decode calls made (for tests / metrics)
        self.solo_streams = 0   # streams that found no free slot

    def _step(self) -> None:
        self.state, new = self._slots.step(self.engine.params["llm"], self.engine.config.llm, self.state, self.hop)
        self.steps += 1
        for slot, buf in self._buffers.items():
            if new[slot].size:
                buf.append(new[slot])

    def _tokens(self, slot: int) -> Iterator[np.ndarray]:
        buf = self._buffers[slot]
        while True:
            with self._lock:  # another stream's step may have filled the buffer meanwhile
                if buf:
                    item = buf.popleft()
                elif bool(self._slots.finished(self.state)[slot]):
                    return
                else:
                    self._step()
                    continue
            yield item

    def open(self, mi, key) -> Iterator[np.ndarray]:
        """Audio chunks float32 [1, n] of one streaming request (same as the engine's own stream).

        The request is inserted into a slot NOW (not at the first `next`), so streams opened together
        decode in the same steps; the slot is released when the iterator ends or is closed."""
        with self._lock:
            free = self._slots.free_slots(self.state)
            if not free:
                self.solo_streams += 1
                return self.engine.tts(mi, stream=True, key=key, stage_runner=self.gang)
            slot = free[0]
            k_llm, _ = jax.random.split(key)  # the engine splits `key` the same way for its own LLM stream
            self.state = self._slots.insert(self.engine.params["llm"], self.engine.config.llm, self.state, slot,
                                            **self.engine.llm_inputs(mi), key=k_llm)
            self._buffers[slot] = collections.deque()
        return _SlotStream(self, slot, self.engine.tts(mi, stream=True, key=key, tokens=self._tokens(slot),
                                                       stage_runner=self.gang))

    def _release(self, slot: int) -> None:
        with self._lock:
            del self._buffers[slot]
            self.state = self._slots.release(self.state, slot)

    def active(self) -> int:
        with self._lock:
            return len(self._buffers)

    def free_count(self) -> int:
        with self._lock:
            return len(self._slots.free_slots(self.state))


class _SlotStream:
    """Iterator over one slot stream's audio chunks; ending or `close()` releases the slot (exactly once,
    also when it was never started: closing an unstarted generator would not run its cleanup)."""

    def __init__(self, pool: SlotStreams, slot: int, chunks: Iterator[np.ndarray]):
        self.pool, self.slot, self.chunks, self.open = pool, slot, chunks, True

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if not self.open:
            raise StopIteration
        try:
            return next(self.chunks)
        except BaseException:  # StopIteration or an error: the slot is freed before it propagates
            self.close()
            raise

    def close(self) -> None:
        if self.open:
            self.open = False
            self.chunks.close()
            self.pool._release(self.slot)
