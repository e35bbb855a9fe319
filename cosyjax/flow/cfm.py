"""Conditional flow matching solver shared by both flows (upstream `flow_matching.py`).

Upstream `CausalConditionalCFM.forward` + `ConditionalCFM.solve_euler`: fixed Euler steps on a
cosine time grid, classifier-free guidance evaluated as one batch of [conditional; unconditional]
rows (the unconditional rows get mu = spks = cond = 0 but share x, mask and t).

The solver is estimator-agnostic:
`estimator_fn(x [2B,T,C] f32, mask [2B,T] bool, mu [2B,T,C], t [2B] f32, spks [2B,S], cond [2B,T,C])
-> v [2B,T,C]`. All steps run inside one `lax.scan`; the ODE state stays float32 whatever dtype
the estimator computes in.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EstimatorFn", "Trajectory", "t_span", "euler_schedule", "solve_cfm"]

EstimatorFn = Callable[..., jax.Array]


class Trajectory(NamedTuple):
    """Per-step record of a solve: what the estimator was fed and what it returned."""

    x: jax.Array  # [n_steps, B, T, C] float32: state fed at each step (x[0] = noise)
    v: jax.Array  # [n_steps, 2B, T, C] (or [n_steps, B, T, C] without CFG): raw estimator outputs
    t: jax.Array  # [n_steps] float32: time fed at each step


def t_span(n_steps: int, scheduler: str = "cosine") -> np.ndarray:
    """Upstream's time grid -> float32 [n_steps + 1].

    `torch.linspace(0, 1, n+1)` (float32; first half `start + step*i`, second half
    `end - step*(n-i)`, as torch's CPU kernel), then `1 - cos(t * 0.5 * pi)` for 'cosine'.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    f = np.float32
    steps = n_steps + 1
    step = f(1.0) / f(n_steps)
    idx = np.arange(steps)
    lin = np.where(idx < steps // 2, f(0) + step * idx.astype(f), f(1) - step * (steps - idx - 1).astype(f)).astype(f)
    if scheduler == "cosine":
        # float32 argument, correctly rounded cosine (torch's vectorised cos is ulp-accurate; numpy's
        # float32 cos is not always), float32 subtraction
        cos = np.cos(((lin * f(0.5)) * f(np.pi)).astype(np.float64)).astype(f)
        return (f(1) - cos).astype(f)
    if scheduler == "linear":
        return lin
    raise ValueError(f"unknown t_scheduler {scheduler!r} (expected 'cosine' or 'linear')")


def euler_schedule(n_steps: int, scheduler: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(t fed at each step, dt of each step), float32 [n_steps] each.

    Upstream accumulates `t = t + dt` and recomputes `dt = t_span[k+1] - t` from the running sum
    (`ConditionalCFM.solve_euler`), which differs from `diff(t_span)` in the last float32 bits.
    """
    ts = t_span(n_steps, scheduler)
    t = ts[0]
    dt = np.float32(ts[1] - ts[0])
    t_in, dts = [], []
    for k in range(1, n_steps + 1):
        t_in.append(t)
        dts.append(dt)
        t = np.float32(t + dt)
        if k < n_steps:
            dt = np.float32(ts[k + 1] - t)
    return np.asarray(t_in, np.float32), np.asarray(dts, np.float32)


def _check(mu, mask, spks, cond, noise):
    if mu.ndim != 3:
        raise ValueError(f"mu must be [B, T, C], got {mu.shape}")
    B, T, C = mu.shape
    if noise.shape != (B, T, C):
        raise ValueError(f"noise {noise.shape} must match mu {mu.shape}")
    if cond.shape != (B, T, C):
        raise ValueError(f"cond {cond.shape} must match mu {mu.shape}")
    if mask.shape != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}, got {mask.shape}")
    if spks.ndim != 2 or spks.shape[0] != B:
        raise ValueError(f"spks must be [B, S] with B = {B}, got {spks.shape}")


def solve_cfm(estimator_fn: EstimatorFn, mu, mask, spks, cond, noise, n_steps: int = 10,
              cfg_rate: float = 0.7, return_trajectory: bool = False, t_scheduler: str = "cosine"):
    """Euler-integrate the CFM ODE from `noise` -> x1 [B, T, C] float32 (+ `Trajectory`).

    mu, cond, noise: [B, T, C]; mask: [B, T] (bool, True = valid frame); spks: [B, S].
    `v = (1 + cfg_rate) * v_cond - cfg_rate * v_uncond`; with `cfg_rate == 0` the unconditional
    rows are skipped (batch B instead of 2B). `n_steps`, `cfg_rate`, `t_scheduler` are static.
    """
    mu, spks, cond = jnp.asarray(mu), jnp.asarray(spks), jnp.asarray(cond)
    noise = jnp.asarray(noise)
    mask = jnp.asarray(mask).astype(jnp.bool_)
    _check(mu, mask, spks, cond, noise)
    B = mu.shape[0]
    cfg = float(cfg_rate) != 0.0
    if cfg:
        mu_in = jnp.concatenate([mu, jnp.zeros_like(mu)], axis=0)
        spks_in = jnp.concatenate([spks, jnp.zeros_like(spks)], axis=0)
        cond_in = jnp.concatenate([cond, jnp.zeros_like(cond)], axis=0)
        mask_in = jnp.concatenate([mask, mask], axis=0)
    else:
        mu_in, spks_in, cond_in, mask_in = mu, spks, cond, mask
    rows = mu_in.shape[0]
    t_in, dts = euler_schedule(n_steps, t_scheduler)
    c_cond = np.float32(1.0 + cfg_rate)
    c_unc = np.float32(cfg_rate)

    def step(x, td):
        t, dt = td
        x_in = jnp.concatenate([x, x], axis=0) if cfg else x
        v_raw = estimator_fn(x_in, mask_in, mu_in, jnp.full((rows,), t, jnp.float32), spks_in, cond_in)
        v_raw = v_raw.astype(jnp.float32)
        v = c_cond * v_raw[:B] - c_unc * v_raw[B:] if cfg else v_raw
        x_next = x + dt * v
        return x_next, ((x, v_raw) if return_trajectory else None)

    x0 = noise.astype(jnp.float32)
    x1, ys = jax.lax.scan(step, x0, (jnp.asarray(t_in), jnp.asarray(dts)))
    if return_trajectory:
        return x1, Trajectory(ys[0], ys[1], jnp.asarray(t_in))
    return x1
