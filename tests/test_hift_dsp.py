"""HiFT signal pieces: window, STFT/iSTFT, torch-exact resamplers, SineGen2 phase bits, default noise."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosyjax.hift.config import HiFTConfig
from cosyjax.hift.f0_predictor import x64_active, x64_enabled
from cosyjax.hift.source import (AccumulationDtypeError, _linear_plan, default_noise, exact_div, frame_cumsum,
                                 frame_phase, linear_upsample, nearest_upsample, sine_phase)
from cosyjax.hift.stft import hann_window, istft, stft

N_FFT, HOP = 16, 4
CV2 = HiFTConfig(causal=False, base_channels=16, f0_cond_channels=8)
CV3 = dataclasses.replace(CV2, causal=True)


def test_hann_window_matches_scipy():
    signal = pytest.importorskip("scipy.signal")
    np.testing.assert_array_equal(hann_window(16), signal.get_window("hann", 16, fftbins=True).astype(np.float32))


@jax.jit
def _istft(re, im, frame_lengths=None):
    return istft(re, im, N_FFT, HOP, frame_lengths)


def _stft_reference(x):
    """numpy torch.stft(center=True, reflect, periodic Hann, onesided) -> [B, frames, bins] complex."""
    xp = np.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect").astype(np.float64)
    n = (xp.shape[1] - N_FFT) // HOP + 1
    frames = np.stack([xp[:, i * HOP: i * HOP + N_FFT] for i in range(n)], axis=1) * hann_window(N_FFT)
    return np.fft.rfft(frames, axis=-1)


def test_stft_matches_reference_and_istft_inverts_it():
    x = np.random.RandomState(0).randn(2, 480).astype(np.float32)
    spec = np.asarray(jax.jit(lambda a: stft(a, N_FFT, HOP))(x))
    ref = _stft_reference(x)
    assert spec.shape == (2, 121, 18)
    np.testing.assert_allclose(spec[..., :9], ref.real, atol=2e-5)
    np.testing.assert_allclose(spec[..., 9:], ref.imag, atol=2e-5)
    y = np.asarray(_istft(spec[..., :9], spec[..., 9:]))
    assert y.shape == (2, 480)
    np.testing.assert_allclose(y, x, atol=2e-5)  # perfect reconstruction incl. the window-sum edges


def test_istft_ignores_dc_and_nyquist_imaginary_parts():
    rng = np.random.RandomState(1)
    re, im = rng.randn(1, 9, 9).astype(np.float32), rng.randn(1, 9, 9).astype(np.float32)
    a = _istft(re, im)
    im[..., [0, 8]] = 0.0
    np.testing.assert_array_equal(a, _istft(re, im))


def test_stft_and_istft_of_right_padded_batches_equal_unpadded():
    rng = np.random.RandomState(2)
    x = rng.randn(1, 160).astype(np.float32)
    padded = np.concatenate([x, rng.randn(1, 320).astype(np.float32)], axis=1)
    s_pad = jax.jit(lambda a: stft(a, N_FFT, HOP, lengths=jnp.array([160])))(padded)
    s = jax.jit(lambda a: stft(a, N_FFT, HOP))(x)
    np.testing.assert_array_equal(np.asarray(s_pad)[:, :41], np.asarray(s))
    spec = rng.randn(1, 121, 18).astype(np.float32)
    y_pad = _istft(spec[..., :9], spec[..., 9:], np.array([41]))
    y = _istft(spec[:, :41, :9], spec[:, :41, 9:])
    np.testing.assert_allclose(np.asarray(y_pad)[:, :160], np.asarray(y), rtol=1e-6, atol=1e-7)
    assert not np.any(np.asarray(y_pad)[:, 160 + N_FFT // 2:])


def test_exact_div_is_ieee_division_under_jit():
    x = np.random.RandomState(3).rand(4096).astype(np.float32) * 1300
    np.testing.assert_array_equal(jax.jit(lambda a: exact_div(a, 24000.0))(x), x / np.float32(24000))


def _phase_reference(f0, cfg):
    """torch CPU SineGen2 frame phase: float32 ops, cumsum accumulated in float64."""
    k = np.arange(1, cfg.num_harmonics + 1, dtype=np.float32)
    rad = (f0[..., None] * k / np.float32(cfg.sampling_rate)) % np.float32(1)
    cum = np.cumsum(rad.astype(np.float64), axis=1).astype(np.float32)
    return cum * np.float32(2) * np.float32(np.pi) * np.float32(cfg.upsample_scale)


def test_frame_phase_is_bitwise_torch_under_x64_jit():
    f0 = (np.random.RandomState(4).rand(2, 37) * 400).astype(np.float32)
    with x64_enabled():
        assert x64_active()
        got = jax.jit(lambda f: frame_phase(f, CV3, acc_dtype=jnp.float64))(f0)
    assert not x64_active()
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), _phase_reference(f0, CV3))


def test_frame_phase_carry_continues_the_whole_sum_and_float64_needs_x64():
    f0 = (np.random.RandomState(6).rand(1, 300, ) * 400).astype(np.float32)
    with x64_enabled():
        whole = jax.jit(lambda f: frame_phase(f, CV3, acc_dtype=jnp.float64))(f0)
        carry = jax.jit(lambda f: frame_cumsum(f, CV3, acc_dtype=jnp.float64))(f0[:, :170])[:, -1]
        assert carry.dtype == jnp.float64
        tail = jax.jit(lambda f, c: frame_phase(f, CV3, acc_dtype=jnp.float64, initial=c))(f0[:, 170:], carry)
    np.testing.assert_array_equal(np.asarray(tail), np.asarray(whole)[:, 170:])
    # float32 accumulation is selectable (and differs from torch's double accumulation somewhere)
    f32 = jax.jit(lambda f: frame_phase(f, CV3, acc_dtype=jnp.float32))(f0)
    assert f32.dtype == jnp.float32 and not np.array_equal(np.asarray(f32), np.asarray(whole))
    with pytest.raises(AccumulationDtypeError, match="x64_enabled"):
        frame_phase(f0, CV3, acc_dtype=jnp.float64)
    with pytest.raises(AccumulationDtypeError, match="float32 or float64"):
        frame_phase(f0, CV3, acc_dtype=jnp.float16)


def test_linear_upsample_replays_aten_and_respects_lengths():
    i0, lam0, lam1 = _linear_plan(3, 480)
    assert i0[0] == 0 and lam1[0] == 0 and lam0[0] == 1  # src clamped at 0
    assert i0[239 + 480] == 0 and i0[240 + 480] == 1  # frame centres at 480t + 239.5
    x = np.random.RandomState(5).randn(1, 5, 9).astype(np.float32) * 1000
    with x64_enabled():
        up = jax.jit(functools.partial(linear_upsample, acc_dtype=jnp.float64), static_argnums=1)
        full = np.asarray(up(x[:, :3], 480))
        padded = np.asarray(up(x, 480, jnp.array([3])))
    np.testing.assert_array_equal(padded[:, :1440], full)
    np.testing.assert_array_equal(full[0, -240:], np.broadcast_to(x[0, 2], (240, 9)))  # clamped at the end
    # aten: src = fma(scale, i + 0.5, -0.5) in float32 (one rounding), lambda0 = 1 - (src - i0)
    src = (np.float64(np.float32(1 / 480)) * (np.arange(1440, dtype=np.float32) + np.float32(0.5)) - 0.5)
    src = np.maximum(src.astype(np.float32), np.float32(0))
    ref = np.float32(1) - np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    np.testing.assert_array_equal(lam0, ref)


def test_nearest_upsample_and_staircase_phase():
    x = jnp.arange(6, dtype=jnp.float32).reshape(1, 3, 2)
    np.testing.assert_array_equal(nearest_upsample(x, 480), np.repeat(np.asarray(x), 480, axis=1))
    f0 = jnp.asarray([[100.0, 0.0, 250.0]])
    with x64_enabled():
        ph = np.asarray(jax.jit(lambda f: sine_phase(f, CV3, acc_dtype=jnp.float64))(f0))
    assert ph.shape == (1, 1440, 9)
    assert np.all(ph[0, :480] == ph[0, 0]) and np.all(ph[0, 480:960] == ph[0, 480])  # CV3: per-frame staircase


def test_default_noise_is_prefix_stable_and_has_the_right_law():
    @jax.jit
    def draws(key):
        return (default_noise(CV3, key, 2, 3), default_noise(CV3, key, 2, 5), default_noise(CV3, None, 2, 3),
                default_noise(CV3, jax.random.key(0), 2, 3), default_noise(CV2, key, 2, 4),
                default_noise(CV2, key, 2, 3))

    short, long, none, seed0, g, g_short = draws(jax.random.key(7))
    assert short.shape == (1, 1440, 9) and long.shape == (1, 2400, 9)
    np.testing.assert_array_equal(short, long[:, :1440])
    assert float(long.min()) >= 0.0 and float(long.max()) < 1.0  # uniform [0, 1), like torch.rand
    np.testing.assert_array_equal(none, seed0)
    assert g.shape == (2, 1920, 9)
    np.testing.assert_array_equal(g[:, :1440], g_short)
    assert not np.allclose(g[0], g[1])  # fresh Gaussian per example
    assert abs(float(g.mean())) < 0.05 and abs(float(g.std()) - 1) < 0.05
    with pytest.raises(ValueError, match="pass a jax.random key"):
        default_noise(CV2, None, 1, 1)
