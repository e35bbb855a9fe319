"""CFM solver (cosyjax/flow/cfm.py): time grid, CFG batch layout, Euler replay of golden steps."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyjax.flow.cfm import euler_schedule, solve_cfm, t_span
from tests.conftest import GOLDEN

INFERENCE = os.path.join(GOLDEN, "cosyvoice3", "flow", "inference.npz")
needs_golden = pytest.mark.skipif(not os.path.exists(INFERENCE), reason="golden flow fixtures absent")


@needs_golden
def test_time_grid_matches_upstream_bitwise():
    z = np.load(INFERENCE)
    np.testing.assert_array_equal(t_span(10), z["t_span"])
    t_in, dt = euler_schedule(10)
    np.testing.assert_array_equal(t_in, z["nonstream__t_per_step"])
    assert t_in.dtype == dt.dtype == np.float32
    # the running sum reaches 1 (within float32) and dt follows upstream's recomputation rule
    assert abs(float(t_in[-1] + dt[-1]) - 1.0) < 1e-6


def test_time_grid_shapes_and_errors():
    ts = t_span(4)
    assert ts.shape == (5,) and ts[0] == 0.0 and abs(ts[-1] - 1.0) < 1e-7
    assert np.all(np.diff(ts) > 0)
    np.testing.assert_allclose(t_span(4, "linear"), np.linspace(0, 1, 5), atol=1e-7)
    with pytest.raises(ValueError, match="n_steps"):
        t_span(0)
    with pytest.raises(ValueError, match="t_scheduler"):
        t_span(3, "sigmoid")


@needs_golden
def test_euler_replay_of_recorded_estimator_outputs():
    """Feeding upstream's recorded raw estimator outputs reproduces its per-step states and final mel."""
    z = np.load(INFERENCE)
    dphi = jnp.asarray(np.swapaxes(z["nonstream__dphi_per_step"], -1, -2))  # [n, 2, T, 80]
    t_rec = jnp.asarray(z["nonstream__t_per_step"])
    mu = np.swapaxes(z["nonstream__mu"], 1, 2)
    cond = np.swapaxes(z["nonstream__cond"], 1, 2)
    noise = np.swapaxes(z["nonstream__noise_z"], 1, 2)
    spks = z["nonstream__spks"]

    def est(x, mask, mu_, t, s, c):
        assert x.shape == (2,) + mu.shape[1:] and t.shape == (2,)
        return dphi[jnp.argmin(jnp.abs(t_rec - t[0]))]

    x1, tr = jax.jit(lambda: solve_cfm(est, mu, np.ones(mu.shape[:2], bool), spks, cond, noise,
                                       return_trajectory=True))()
    np.testing.assert_allclose(np.swapaxes(np.asarray(tr.x)[:, 0], 1, 2), z["nonstream__x_per_step"], atol=2e-6)
    P = mu.shape[1] - z["nonstream__mel"].shape[2]
    np.testing.assert_allclose(np.asarray(x1)[0, P:].T, z["nonstream__mel"][0], atol=2e-6)
    assert x1.dtype == jnp.float32


def test_cfg_batch_layout_and_guidance():
    """Row block 0 is conditional, row block 1 has mu = spks = cond = 0 with the same x, mask, t."""
    B, T, C, S = 2, 7, 5, 3
    rng = np.random.default_rng(0)
    mu, cond, noise = (rng.normal(size=(B, T, C)).astype(np.float32) for _ in range(3))
    spks = rng.normal(size=(B, S)).astype(np.float32)
    mask = np.ones((B, T), bool)
    mask[1, 5:] = False
    seen = {}

    def est(x, m, mu_, t, s, c):
        seen.update(x=x, m=m, mu=mu_, t=t, s=s, c=c)
        # a velocity that depends on every input, so that the CFG combination is observable
        return mu_ + c + s[:, None, :1] + 0.0 * x

    x1 = solve_cfm(est, mu, mask, spks, cond, noise, n_steps=3, cfg_rate=0.7)
    assert seen["x"].shape == (2 * B, T, C) and seen["t"].shape == (2 * B,)
    np.testing.assert_array_equal(seen["mu"][B:], 0)
    np.testing.assert_array_equal(seen["c"][B:], 0)
    np.testing.assert_array_equal(seen["s"][B:], 0)
    np.testing.assert_array_equal(seen["m"][:B], seen["m"][B:])
    np.testing.assert_array_equal(seen["m"][:B], mask)
    # v constant over time: x1 = noise + 1.7 * v_cond (v_uncond = 0), since sum(dt) = 1
    v = mu + cond + spks[:, None, :1]
    np.testing.assert_allclose(np.asarray(x1), noise + 1.7 * v, rtol=1e-5, atol=1e-5)


def test_no_cfg_runs_batch_b_and_integrates_linear_ode():
    """cfg_rate=0 evaluates B rows; dx/dt = -x integrates close to exp(-1) with 200 Euler steps."""
    B, T, C = 1, 4, 2
    noise = np.ones((B, T, C), np.float32)
    z = np.zeros((B, T, C), np.float32)
    rows = []

    def est(x, m, mu, t, s, c):
        rows.append(x.shape[0])
        return -x

    x1 = solve_cfm(est, z, np.ones((B, T), bool), np.zeros((B, 1), np.float32), z, noise, n_steps=200,
                   cfg_rate=0.0, t_scheduler="linear")
    assert rows == [B]  # traced once inside the scan
    np.testing.assert_allclose(np.asarray(x1), np.exp(-1.0), rtol=3e-3)


def test_low_precision_estimator_keeps_f32_state():
    B, T, C = 1, 3, 2
    z = np.zeros((B, T, C), np.float32)
    x1 = solve_cfm(lambda x, m, mu, t, s, c: jnp.full(x.shape, 0.1, jnp.bfloat16), z, np.ones((B, T), bool),
                   np.zeros((B, 1), np.float32), z, z + 1.0)
    assert x1.dtype == jnp.float32


def test_shape_errors():
    z = np.zeros((1, 4, 2), np.float32)
    m = np.ones((1, 4), bool)
    s = np.zeros((1, 3), np.float32)
    f = lambda *a: a[0]  # noqa: E731
    with pytest.raises(ValueError, match="noise"):
        solve_cfm(f, z, m, s, z, np.zeros((1, 5, 2), np.float32))
    with pytest.raises(ValueError, match="mask"):
        solve_cfm(f, z, np.ones((1, 3), bool), s, z, z)
    with pytest.raises(ValueError, match="spks"):
        solve_cfm(f, z, m, np.zeros((2, 3), np.float32), z, z)
