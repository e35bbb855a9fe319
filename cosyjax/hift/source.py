"""Neural-source-filter excitation: upstream `SineGen2` (both variants) + `SourceModuleHnNSF`.

f0 [B, T] (Hz per mel frame) -> source s [B, T*U] (U = 480 samples per frame):

1. `frame_phase`: rad_k = (k*f0 / sr) mod 1 for harmonics k = 1..9. Upstream computes rad per
   *sample* (f0 nearest-up-sampled), adds a random initial phase to sample 0 only, then linearly
   down-samples by 1/U; that reads samples U*t+239 and U*t+240 with weights 1/2, 1/2 -- both equal to
   the frame's value, so the result is exactly the per-frame rad and the random initial phase is
   never read (SPEC 5.3 step 4). phase = cumsum(rad) * 2 * pi * U. The cumsum is accumulated in
   float64 and rounded to float32, as torch's CPU cumsum does (acc type double); this phase reaches
   ~1e4 rad, so its float32 rounding must match bit for bit. The accumulation dtype is an explicit
   argument (`acc_dtype`): the f0 stage runs under its local `x64_enabled()` and passes float64.
2. `SourceModuleHnNSF`: phase up-sampled to samples -- CV3 (causal) `nearest` (a per-frame
   staircase, as trained), CV2 `linear` (align_corners=False, torch's float32 index arithmetic and
   fma blend replayed exactly) -- `sine_phase`; sines = 0.1*sin(phase); uv = f0 > 10 Hz; noise amplitude uv*0.003 +
   (1-uv)*0.1/3; s = tanh(Linear(9->1)(sines*uv + amp*noise)).

Noise: CV2 draws N(0,1) [B, L, 9] at every call; CV3 reads a fixed U[0,1) buffer by absolute sample
position (same rows for every batch item). `default_noise` makes either from a JAX key such that a
sample's noise does not depend on how long the call is (streaming re-runs see the same prefix). The CV3 default key is
`jax.random.key(CV3_SINE_NOISE_SEED)`; it cannot equal upstream's torch buffer (itself an unseeded
`torch.rand` at construction), so parity tests inject upstream's values.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cosyjax.errors import CosyJaxError
from cosyjax.hift.config import HiFTConfig

__all__ = ["AccumulationDtypeError", "CV3_SINE_NOISE_SEED", "SourceModuleHnNSF", "default_noise", "exact_div",
           "frame_cumsum", "frame_phase", "linear_upsample", "nearest_upsample", "scale_phase", "sine_phase",
           "upsample_phase"]


class AccumulationDtypeError(CosyJaxError):
    """An accumulation dtype this context cannot provide (float64 outside `x64_enabled()`)."""


CV3_SINE_NOISE_SEED = 0
"""Seed of the CV3 default fixed noise buffer: `uniform(key(seed), (L, 9))` (partitionable threefry)."""


def exact_div(x, divisor: float):
    """x / divisor with IEEE division. XLA rewrites `x / const` into `x * (1/const)` (not exact); the
    barrier hides the constant so the real division is kept."""
    d = lax.optimization_barrier(jnp.full(x.shape, divisor, x.dtype))
    return x / d


def _check_acc_dtype(acc_dtype):
    """The accumulation dtype as a numpy dtype; float64 needs the caller's local x64 context."""
    acc = jnp.dtype(acc_dtype)
    if acc not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise AccumulationDtypeError(f"acc_dtype must be float32 or float64, got {acc}")
    if jax.dtypes.canonicalize_dtype(acc) != acc:  # a check only: the dtype itself is the caller's choice
        raise AccumulationDtypeError("acc_dtype=float64 needs 64-bit types: call inside `x64_enabled()` "
                         "(cosyjax.hift.f0_predictor)")
    return acc


def frame_cumsum(f0, cfg: HiFTConfig, *, acc_dtype, initial=None):
    """f0 [B, T] float32 -> running sum of rad [B, T, H] in `acc_dtype` (the unscaled SineGen2 phase).

    initial ([B|1, H] `acc_dtype`, optional): the sum over earlier frames (streaming carry). It is
    prepended to the sequence rather than added afterwards, so a sequential cumsum adds in the same
    order as one over the whole signal.
    """
    acc = _check_acc_dtype(acc_dtype)
    f0 = f0.astype(jnp.float32)
    k = jnp.arange(1, cfg.num_harmonics + 1, dtype=jnp.float32)
    rad = jnp.mod(exact_div(f0[..., None] * k, float(cfg.sampling_rate)), jnp.float32(1.0)).astype(acc)
    if initial is None:
        return jnp.cumsum(rad, axis=1)
    first = jnp.broadcast_to(jnp.asarray(initial, acc), (rad.shape[0], rad.shape[2]))[:, None]
    return jnp.cumsum(jnp.concatenate([first, rad], axis=1), axis=1)[:, 1:]


def scale_phase(cum, cfg: HiFTConfig):
    """cum [B, T, H] from `frame_cumsum` -> phase [B, T, H] float32 (rounded, then * 2 * pi * U)."""
    cum = cum.astype(jnp.float32)
    # torch: cumsum(...) * 2 * np.pi, then * upsample_scale: three rounded float32 products. XLA
    # would fold the constants into one (x * 3015.93), which changes the last bit of a ~1e4 rad phase.
    for factor in (2.0, np.pi, cfg.upsample_scale):
        cum = lax.optimization_barrier(cum * jnp.float32(factor))
    return cum


def frame_phase(f0, cfg: HiFTConfig, *, acc_dtype, initial=None):
    """f0 [B, T] float32 -> unwrapped phase [B, T, H] float32 (already multiplied by U).

    `acc_dtype`: the cumsum's accumulation type; float64 (under `x64_enabled()`) is bit-faithful to
    upstream on CPU, float32 is not. `initial`: see `frame_cumsum`.
    """
    return scale_phase(frame_cumsum(f0, cfg, acc_dtype=acc_dtype, initial=initial), cfg)


@functools.lru_cache(maxsize=64)
def _nearest_index(in_len: int, scale: int) -> np.ndarray | None:
    """torch `nearest` source indices for up-sampling by `scale` (None when they equal i // scale)."""
    out_len = in_len * scale
    s = np.float32(1.0 / scale)  # compute_scales_value: (float)(1.0 / scale)
    i = np.arange(out_len)
    idx = np.minimum(np.floor(i.astype(np.float32) * s), in_len - 1).astype(np.int32)
    return None if np.array_equal(idx, i // scale) else idx


def nearest_upsample(x, scale: int):
    """torch `Upsample(scale_factor=scale, mode='nearest')` along axis 1: [B, T, ...] -> [B, T*scale, ...]."""
    idx = _nearest_index(x.shape[1], scale)
    if idx is None:
        return jnp.repeat(x, scale, axis=1)
    return jnp.take(x, jnp.asarray(idx), axis=1)


@functools.lru_cache(maxsize=64)
def _linear_plan(in_len: int, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch `interpolate(mode='linear', scale_factor=scale, align_corners=False)` indices/weights.

    Replays aten's float32 CPU arithmetic (UpSampleKernel.cpp, compiled with FMA contraction):
    src = max(fma(s, i + 0.5, -0.5), 0) with s = (float)(1/scale); i0 = floor(src);
    lambda1 = src - i0; lambda0 = 1 - lambda1. (i1 = i0 + 1 unless i0 is the last valid frame;
    that clamp depends on the true length and is applied by the caller.)
    """
    out_len = in_len * scale
    s = np.float32(1.0 / scale)
    i = np.arange(out_len)
    half = (i.astype(np.float32) + np.float32(0.5)).astype(np.float64)
    src = (np.float64(s) * half - 0.5).astype(np.float32)  # exact product, one rounding = fma
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    return i0.astype(np.int32), lam0, lam1


def linear_upsample(x, scale: int, lengths=None, *, acc_dtype):
    """torch linear up-sampling along axis 1: x [B, T, C] float32 -> [B, T*scale, C] float32.

    `lengths` ([B] int, valid frames per example): the right neighbour is clamped at the last valid
    frame (torch clamps at its input's end), so a right-padded input gives the unpadded result.
    The blend is aten's `fma(lambda0, x0, lambda1 * x1)`; with acc_dtype=float64 (under x64) the fma
    is exact (float64 sum of an exact product); with float32 it is rounded twice (<= 1 ulp apart).
    """
    acc = _check_acc_dtype(acc_dtype)
    b, t, c = x.shape
    i0, lam0, lam1 = _linear_plan(t, scale)
    i0 = jnp.asarray(i0)
    last = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    i1 = jnp.where(i0[None, :] < last[:, None] - 1, i0[None, :] + 1, i0[None, :])  # [B, L]
    x0 = jnp.take(x, i0, axis=1)
    x1 = jnp.take_along_axis(x, i1[:, :, None], axis=1)
    lam0 = jnp.asarray(lam0)[None, :, None]
    second = lax.optimization_barrier(jnp.asarray(lam1)[None, :, None] * x1)
    if acc == jnp.dtype(jnp.float64):
        wide = lam0.astype(acc) * x0.astype(acc) + second.astype(acc)
        return wide.astype(jnp.float32)
    return lam0 * x0 + second


def upsample_phase(phase, cfg: HiFTConfig, lengths=None, *, acc_dtype):
    """Frame phase [B, T, H] float32 -> per-sample phase [B, T*U, H] float32.

    CV3 (causal): nearest up-sampling (staircase); CV2: linear (torch-exact, see `linear_upsample`).
    """
    if cfg.causal:
        return nearest_upsample(phase, cfg.upsample_scale)
    return linear_upsample(phase, cfg.upsample_scale, lengths, acc_dtype=acc_dtype)


def sine_phase(f0, cfg: HiFTConfig, lengths=None, *, acc_dtype):
    """f0 [B, T] float32 -> per-sample harmonic phase [B, T*U, H] float32.

    acc_dtype: float64 (the caller is under `x64_enabled()`) for upstream's bit-exact phase, float32
    otherwise; it is the cumsum's accumulation type and CV2's interpolation blend type.
    """
    phase = frame_phase(f0, cfg, acc_dtype=acc_dtype)
    return upsample_phase(phase, cfg, lengths, acc_dtype=acc_dtype)


def default_noise(cfg: HiFTConfig, key, batch: int, frames: int):
    """Noise for `frames` mel frames: CV2 N(0,1) [B, frames*U, H]; CV3 U[0,1) [1, frames*U, H].

    Prefix-stable: sample n's value does not depend on `frames` (streaming re-runs see the same
    prefix). With partitionable threefry (a counter hash of the flat index; forced locally) one draw
    of [L, H] is prefix-stable along L; without that switch (older jax) block f of U samples comes
    from `fold_in(key, f)`. CV2 example b uses `fold_in(key, b)`. CV3 with key=None uses
    `CV3_SINE_NOISE_SEED`.
    """
    u, h = cfg.upsample_scale, cfg.num_harmonics
    if key is None:
        if not cfg.causal:
            raise ValueError("CosyVoice2 HiFT draws Gaussian noise at every call: pass a jax.random key or noise")
        key = jax.random.key(CV3_SINE_NOISE_SEED)
    draw = jax.random.uniform if cfg.causal else jax.random.normal

    def one(k):  # [frames*U, H]
        if hasattr(jax, "threefry_partitionable"):
            with jax.threefry_partitionable(True):
                return draw(k, (frames * u, h), jnp.float32)
        blocks = jax.vmap(lambda f: draw(jax.random.fold_in(k, f), (u, h), jnp.float32))(jnp.arange(frames))
        return blocks.reshape(frames * u, h)

    if cfg.causal:
        return one(key)[None]
    return jnp.stack([one(jax.random.fold_in(key, b)) for b in range(batch)])


class SourceModuleHnNSF(nn.Module):
    """(phase [B, L, H] from `sine_phase`, f0 [B, T], noise [B|1, L, H]) -> source s [B, L] in (-1, 1)."""

    cfg: HiFTConfig

    @nn.compact
    def __call__(self, phase, f0, noise):
        c = self.cfg
        b, n_samples, h = phase.shape
        if h != c.num_harmonics or f0.shape[0] != b or f0.shape[1] * c.upsample_scale != n_samples:
            raise ValueError(f"phase {phase.shape} does not match f0 {f0.shape} x {c.upsample_scale} samples")
        if noise.shape not in ((b, n_samples, h), (1, n_samples, h)):
            raise ValueError(f"noise shape {noise.shape} != {(b, n_samples, h)}")
        sines = jnp.sin(phase) * jnp.float32(c.nsf_alpha)
        f0_up = nearest_upsample(f0.astype(jnp.float32)[..., None], c.upsample_scale)  # [B, L, 1]
        voiced = f0_up > jnp.float32(c.nsf_voiced_threshold)
        uv = voiced.astype(jnp.float32)
        # uv*sigma + (1-uv)*alpha/3 evaluated in float32 for uv in {0, 1}
        amp = jnp.where(voiced, np.float32(c.nsf_sigma), np.float32(np.float32(c.nsf_alpha) / np.float32(3)))
        sine_waves = sines * uv + amp * noise.astype(jnp.float32)
        s = nn.Dense(1, precision="highest", name="l_linear")(sine_waves)
        return jnp.tanh(s[..., 0])
