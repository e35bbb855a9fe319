"""Device calls of the streaming stages that concurrent streams run together.

A streaming stage (`cosyjax.flow.cv3.incremental.IncrementalFlowCV3`'s chunks and its final full-attention
pass, the CV3 vocoder's two window programs) describes each device call as a `StageCall`: the
single-request jitted function, the arguments every request shares (parameters), the per-request arrays
and the static keywords. A stage hands its calls to a *runner*: `run_alone` (the default) calls the
function as is.

`StageGang` is the runner of streams that advance in threads (the server's scheduler runs one thread
per stream and round). A call blocks until every member thread is blocked in a call or has finished
its step; then calls with the same signature (function, static keywords, shared arguments, shapes and
dtypes of the per-request arrays) run as ONE `jax.vmap` of the function over their stacked arrays, the
rows padded to a power of two (repeating the last) so that a group size reuses its program. A group of
one runs the single-request program itself, so a stream alone does exactly what it did before.
Each row of a vmapped call computes what the request computes alone (the same program per row; the
matmul shapes differ, so results agree to float rounding, not bit for bit).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CompileOnce", "StageCall", "StageGang", "pow2_bucket", "run_alone"]


@dataclasses.dataclass(frozen=True, eq=False)
class StageCall:
    """One call `fn(*shared, *rows, **static)` of a jitted stage function.

    shared: pytrees every request of a group passes identically (parameters; compared by identity).
    rows: the per-request arrays (stacked on a new leading axis when batched).
    donate: indices into `rows` the batched program may donate (the caller gives them up, as `fn` does).
    context: a context manager factory the call must run under (e.g. `x64_enabled` for the f0 island)."""

    fn: Callable
    shared: tuple
    rows: tuple
    static: tuple = ()          # sorted (name, value) pairs, hashable
    donate: tuple = ()
    context: Optional[Callable[[], Any]] = None

    def key(self) -> tuple:
        """Calls with equal keys can run as one vmapped program."""
        leaves, tree = jax.tree_util.tree_flatten(self.rows)
        sig = tuple((np.shape(a), str(a.dtype) if hasattr(a, "dtype") else type(a).__name__) for a in leaves)
        shared = tuple(id(a) for a in jax.tree_util.tree_leaves(self.shared))
        return (self.fn, self.static, shared, tree, sig, self.donate, self.context)


def run_alone(call: StageCall):
    """The runner of a request on its own: the single-request program."""
    with (call.context() if call.context is not None else contextlib.nullcontext()):
        return call.fn(*call.shared, *call.rows, **dict(call.static))


class CompileOnce:
    """A warm-up runner: the first call of each signature (`StageCall.key`) runs for real (compiling its
    program); a repeat returns zeros of that call's output shapes without touching the device.

    Streams driven by one `CompileOnce` over every token count a voice can reach compile each program
    those lengths need once, at the price of the distinct programs, not of running every stream: the
    stage state that the zeros stand in for never reaches a listener (warm-up output is discarded).
    `programs` counts the signatures run."""

    def __init__(self):
        self._outputs: dict = {}

    @property
    def programs(self) -> int:
        return len(self._outputs)

    def __call__(self, call: StageCall):
        key = call.key()
        seen = self._outputs.get(key)
        if seen is None:
            out = run_alone(call)
            leaves, tree = jax.tree_util.tree_flatten(out)
            self._outputs[key] = (tree, [(np.shape(a), a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)
                                         for a in leaves])
            return out
        tree, leaves = seen
        with (call.context() if call.context is not None else contextlib.nullcontext()):  # float64 stays
            return jax.tree_util.tree_unflatten(tree, [jax.device_put(np.zeros(s, d)) for s, d in leaves])


def pow2_bucket(n: int) -> int:
    """Rows a group of n runs with: the next power of two (so a new group size reuses a program)."""
    b = 1
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass(eq=False)
class _Waiter:
    call: StageCall
    done: bool = False
    result: Any = None
    error: Optional[BaseException] = None


class StageGang:
    """Runs the stage calls of concurrently stepping streams together (see the module docstring).

    Threads that make stage calls enter with `with gang.member(): ...` (one stream's step; `enter(n)`
    first when n threads start together); a call from a thread outside a member block runs alone at once.
    `groups` counts the group sizes run; `stage_groups` the same per stage function name."""

    def __init__(self, pad_to_bucket: bool = True):
        self.pad_to_bucket = pad_to_bucket
        self._cv = threading.Condition()
        self._running = 0        # member threads not blocked in a call
        self._pending: list[_Waiter] = []
        self._firing = False
        self._programs: dict = {}
        self._local = threading.local()
        self.groups: collections.Counter = collections.Counter()
        self.stage_groups: collections.Counter = collections.Counter()  # (function name, group size)

    def enter(self, n: int = 1) -> None:
        """Count n members as running before their threads start (`member(entered=True)` in each), so
        that the first to call does not run before the others have started."""
        with self._cv:
            self._running += int(n)

    @contextlib.contextmanager
    def member(self, entered: bool = False):
        """This thread's stage calls meet the other members' until the block ends."""
        if not entered:
            self.enter()
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield self
        finally:
            self._local.depth -= 1
            with self._cv:
                self._running -= 1
                batch = self._take_locked()
            if batch:
                self._fire(batch)

    def __call__(self, call: StageCall):
        if not getattr(self._local, "depth", 0):
            return run_alone(call)
        w = _Waiter(call)
        with self._cv:
            self._pending.append(w)
            self._running -= 1
            batch = self._take_locked()
        if batch:
            self._fire(batch)
        with self._cv:
            while not w.done:
                self._cv.wait()
        if w.error is not None:
            raise w.error
        return w.result

    # ---- internals ---------------------------------------------------------------------------------
    def _take_locked(self) -> Optional[list]:
        """All pending calls, when no member is running any more (and no group is being run)."""
        if self._running == 0 and self._pending and not self._firing:
            batch, self._pending = self._pending, []
            self._firing = True
            return batch
        return None

    def _fire(self, batch: list) -> None:
        try:
            groups: dict = {}
            for w in batch:
                groups.setdefault(w.call.key(), []).append(w)
            for ws in groups.values():
                try:
                    results = self._run_group([w.call for w in ws])
                    for w, r in zip(ws, results):
                        w.result = r
                except BaseException as e:  # every request of the group receives the error
                    for w in ws:
                        w.error = e
                self.groups[len(ws)] += 1
                self.stage_groups[(getattr(ws[0].call.fn, "__name__", repr(ws[0].call.fn)), len(ws))] += 1
        finally:
            with self._cv:
                for w in batch:
                    w.done = True
                self._running += len(batch)  # before anyone wakes: the woken are running again
                self._firing = False
                self._cv.notify_all()

    def _program(self, call: StageCall):
        key = (call.fn, call.static, len(call.shared), len(call.rows), call.donate)
        prog = self._programs.get(key)
        if prog is None:
            ns, static = len(call.shared), dict(call.static)
            fn = call.fn

            def batched(*args):
                return jax.vmap(lambda *rows: fn(*args[:ns], *rows, **static))(*args[ns:])

            prog = jax.jit(batched, donate_argnums=tuple(ns + i for i in call.donate))
            self._programs[key] = prog
        return prog

    def _run_group(self, calls: list) -> list:
        if len(calls) == 1:
            return [run_alone(calls[0])]
        n = len(calls)
        rows = n if not self.pad_to_bucket else pow2_bucket(n)
        calls_padded = calls + [calls[-1]] * (rows - n)
        first = calls[0]
        with (first.context() if first.context is not None else contextlib.nullcontext()):  # float64 rows stay
            stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                                             *[c.rows for c in calls_padded])
            out = self._program(first)(*first.shared, *stacked)
            return [jax.tree_util.tree_map(lambda a, i=i: a[i], out) for i in range(n)]
