"""`cosyjax.stage_batch`: stage calls of concurrent threads meet and run as one vmapped program
(stand-in jitted functions; the model-level equality is in tests/test_serve.py)."""
from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyjax.hift.f0_predictor import x64_enabled
from cosyjax.serve.batcher import Scheduler
from cosyjax.stage_batch import CompileOnce, StageCall, StageGang, run_alone


@functools.partial(jax.jit, static_argnames=("scale",), donate_argnums=(1,))
def _affine(w, state, x, *, scale):
    """w [4, 4] shared; state [4], x [4] per request -> (y [4], new state [4])."""
    y = scale * (w @ x) + state
    return y, state + 1.0


@jax.jit
def _f64(carry, x):
    return carry + x.astype(carry.dtype) * 1e-9


def _call(w, state, x, scale=2.0):
    return StageCall(_affine, (w,), (state, x), static=(("scale", scale),), donate=(0,))


def _threads(n, body, gang=None):
    """Run body(i) in n threads at once (entered in `gang` first); -> results by i (errors re-raised)."""
    out, errs = [None] * n, []
    if gang is not None:
        gang.enter(n)

    def run(i):
        try:
            out[i] = body(i)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errs.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts), "a gang member never returned (deadlock)"
    if errs:
        raise errs[0]
    return out


def _want(w, i, scale=2.0):
    x = np.arange(4, dtype=np.float32) + i
    return scale * (np.asarray(w) @ x) + i, np.full(4, i + 1.0, np.float32)


def test_members_meet_in_one_vmapped_call_equal_to_each_alone():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
    gang = StageGang()

    def body(i):
        with gang.member(entered=True):
            y, s = gang(_call(w, jnp.full((4,), float(i)), np.arange(4, dtype=np.float32) + i))
            y2, _ = gang(_call(w, s, np.arange(4, dtype=np.float32) + i))  # a second round of calls
            return np.asarray(y), np.asarray(s), np.asarray(y2)

    out = _threads(5, body, gang)
    for i, (y, s, y2) in enumerate(out):
        wy, ws = _want(w, i)
        np.testing.assert_allclose(y, wy, rtol=1e-6)
        np.testing.assert_array_equal(s, ws)
        np.testing.assert_allclose(y2, wy + 1.0, rtol=1e-6)
    assert gang.groups == {5: 2}  # both rounds: one group of all five (run as a bucket of 8)


def test_calls_of_different_signatures_run_in_separate_groups_and_alone_outside_members():
    w = jnp.eye(4, dtype=jnp.float32)
    gang = StageGang()

    def body(i):
        with gang.member(entered=True):
            scale = 1.0 if i < 2 else 3.0  # static keywords differ: two groups
            return np.asarray(gang(_call(w, jnp.zeros(4), np.ones(4, np.float32), scale))[0])

    out = _threads(4, body, gang)
    assert [float(o[0]) for o in out] == [1.0, 1.0, 3.0, 3.0]
    assert gang.groups == {2: 2}
    y, _ = gang(_call(w, jnp.zeros(4), np.ones(4, np.float32)))  # no member block: runs at once
    np.testing.assert_array_equal(np.asarray(y), 2.0)
    assert gang.groups == {2: 2}


def test_a_member_that_makes_no_call_releases_the_others():
    w = jnp.eye(4, dtype=jnp.float32)
    gang = StageGang()
    release = threading.Event()

    def body(i):
        with gang.member(entered=True):
            if i == 0:
                release.wait(0.2)  # still running: the others wait for it, then it leaves without a call
                return None
            return float(np.asarray(gang(_call(w, jnp.zeros(4), np.full(4, i, np.float32)))[0])[0])

    assert _threads(3, body, gang) == [None, 2.0, 4.0]
    assert gang.groups == {2: 1}


def test_an_error_reaches_every_request_of_its_group_and_the_gang_keeps_working():
    gang = StageGang()

    @jax.jit
    def bad(x):
        return x

    def body(i):
        with gang.member(entered=True):
            if i < 2:
                return gang(StageCall(bad, (), (np.zeros(3),), static=(("nope", 1),)))  # TypeError in the group
            return float(np.asarray(gang(_call(jnp.eye(4), jnp.zeros(4), np.ones(4, np.float32)))[0])[0])

    with pytest.raises(TypeError):
        _threads(3, body, gang)
    assert _threads(2, lambda i: body(2), gang) == [2.0, 2.0]


def test_float64_rows_stay_float64_under_the_call_context():
    gang = StageGang()
    with x64_enabled():
        carry = jnp.zeros((2,), jnp.float64) + 1.0

    def body(i):
        with gang.member(entered=True):
            return gang(StageCall(_f64, (), (carry, np.full(2, i + 1, np.float32)), context=x64_enabled))

    out = _threads(3, body, gang)
    for i, c in enumerate(out):
        assert c.dtype == np.float64
        with x64_enabled():
            assert float(c[0]) == 1.0 + (i + 1) * 1e-9  # lost in float32
    assert run_alone(StageCall(_f64, (), (carry, np.ones(2, np.float32)), context=x64_enabled)).dtype == np.float64


def test_scheduler_rounds_with_a_gang_batch_the_streams_calls():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
    gang = StageGang()

    def open_stream(mi, key):
        state = jnp.zeros(4)
        for _ in range(3):
            y, state = gang(_call(w, state, np.full(4, mi, np.float32)))
            yield np.asarray(y)[None]

    s = Scheduler(None, open_stream, gang=gang).start()
    got = {i: [] for i in range(4)}
    done = {i: threading.Event() for i in range(4)}

    def emit_for(i):
        def emit(kind, value):
            got[i].append(value if kind == "chunk" else kind)
            if kind != "chunk":
                done[i].set()
        return emit

    try:
        for i in range(4):
            s.stream([i], [0], emit_for(i))
        assert all(d.wait(30) for d in done.values())
    finally:
        s.stop()
    for i in range(4):
        assert got[i][-1] == "done" and len(got[i]) == 4
        for k, y in enumerate(got[i][:3]):
            np.testing.assert_allclose(y, 2.0 * (np.asarray(w) @ np.full(4, i, np.float32)) + k, rtol=1e-5)
    assert max(gang.groups) == 4  # (a round with one live stream runs its calls alone, uncounted)


def test_compile_once_runs_each_signature_once_and_answers_repeats_with_zeros_of_its_shapes():
    run, w = CompileOnce(), jnp.eye(4)
    y, s = run(_call(w, jnp.zeros(4), np.arange(4, dtype=np.float32)))
    np.testing.assert_allclose(np.asarray(y), 2 * np.arange(4))  # the first call is real
    y2, s2 = run(_call(w, jnp.ones(4), np.ones(4, np.float32)))  # same signature: zeros, not computed
    assert run.programs == 1 and y2.shape == (4,) and y2.dtype == np.float32 and not np.any(np.asarray(y2))
    run(_call(w, jnp.zeros(4), np.arange(4, dtype=np.float32), scale=3.0))  # a new static: a new program
    run(_call(jnp.eye(8), jnp.zeros(8), np.arange(8, dtype=np.float32)))  # new shapes: a new program
    assert run.programs == 3
    with x64_enabled():
        carry = jnp.zeros((2,), jnp.float64)
    call = StageCall(_f64, (), (carry, np.ones(2, np.float32)), context=x64_enabled)
    assert run(call).dtype == np.float64 and run(call).dtype == np.float64  # the repeat's zeros stay float64
