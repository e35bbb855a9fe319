"""torch-exact STFT / iSTFT for HiFT (n_fft 16, hop 4, periodic Hann, center=True, reflect padding).

Both are small dense transforms: the STFT is a strided conv of the reflect-padded signal with the
windowed DFT basis ([n_fft, 1, 2*bins] kernel, stride hop), the iSTFT a [2*bins -> n_fft] matmul
(windowed inverse real DFT; imaginary parts of the DC and Nyquist bins ignored, as C2R does)
followed by an overlap-add done with reshapes and n_fft/hop shifted adds, then division by the
overlap-added squared window of the frames that exist (1.5 inside, smaller at the ends).
Both are pinned to precision='highest' (cheap; TF32 would cost ~1e-3 relative).

Right-padded batches: `lengths` (valid samples / valid frames per example) make the reflection
happen at each example's own end and leave the padded frames out of the overlap-add, so a bucketed
call reproduces the unpadded result.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["hann_window", "istft", "stft"]


@functools.lru_cache(maxsize=8)
def hann_window(n: int) -> np.ndarray:
    """Periodic Hann, float32: `scipy.signal.get_window('hann', n, fftbins=True)` (its formula, float64)."""
    fac = np.linspace(-np.pi, np.pi, n + 1)[:-1]
    return (0.5 + 0.5 * np.cos(fac)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _stft_kernel(n_fft: int) -> np.ndarray:
    """[n_fft, 1, 2*bins]: window * [cos, -sin] of the forward DFT."""
    w = hann_window(n_fft).astype(np.float64)
    n = np.arange(n_fft)[:, None]
    k = np.arange(n_fft // 2 + 1)[None, :]
    ang = 2 * np.pi * n * k / n_fft
    re, im = w[:, None] * np.cos(ang), -w[:, None] * np.sin(ang)
    im[:, 0] = 0.0
    im[:, -1] = 0.0
    return np.concatenate([re, im], axis=1)[:, None, :].astype(np.float32)


@functools.lru_cache(maxsize=8)
def _istft_matrix(n_fft: int) -> np.ndarray:
    """[2*bins, n_fft]: (real, imag) -> window * irfft (1/n normalisation, one-sided weights 1,2,...,2,1)."""
    w = hann_window(n_fft).astype(np.float64)
    bins = n_fft // 2 + 1
    k = np.arange(bins)[:, None]
    n = np.arange(n_fft)[None, :]
    ang = 2 * np.pi * k * n / n_fft
    c = np.full((bins, 1), 2.0)
    c[0] = c[-1] = 1.0
    re = c * np.cos(ang) / n_fft * w[None, :]
    im = -c * np.sin(ang) / n_fft * w[None, :]
    im[0] = 0.0
    im[-1] = 0.0
    return np.concatenate([re, im], axis=0).astype(np.float32)


def _reflect_index(n_out: int, pad: int, lengths, n_in: int):
    """[B, n_out] gather indices of a reflect-padded signal whose valid length is `lengths` [B]."""
    q = jnp.arange(n_out, dtype=jnp.int32)[None, :] - pad
    last = lengths.astype(jnp.int32)[:, None] - 1
    q = jnp.abs(q)  # left reflection (edge sample not repeated)
    q = jnp.where(q > last, 2 * last - q, q)  # right reflection at the example's own end
    return jnp.clip(q, 0, n_in - 1)


def stft(x, n_fft: int, hop: int, lengths=None):
    """x [B, L] -> [B, L//hop + 1, 2*bins] = [real bins ; imag bins] (torch.stft center/reflect).

    lengths: valid samples per example ([B] int); frames beyond an example's end are garbage.
    """
    b, n = x.shape
    if n % hop:
        raise ValueError(f"stft: signal length {n} is not a multiple of hop {hop}")
    pad = n_fft // 2
    if lengths is None:
        xp = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    else:
        idx = _reflect_index(n + 2 * pad, pad, lengths, n)
        xp = jnp.take_along_axis(x, idx, axis=1)
    return lax.conv_general_dilated(
        xp[:, :, None].astype(jnp.float32), jnp.asarray(_stft_kernel(n_fft)), window_strides=(hop,),
        padding=[(0, 0)], dimension_numbers=("NWC", "WIO", "NWC"), precision=lax.Precision.HIGHEST)


def _overlap_add(frames, hop: int):
    """frames [B, F, n_fft] -> [B, hop*(F-1) + n_fft]: y[hop*f + n] += frames[f, n]."""
    b, f, n_fft = frames.shape
    r = n_fft // hop
    parts = frames.reshape(b, f, r, hop)
    y = 0
    for j in range(r):  # r = 4 shifted adds, static
        y = y + jnp.pad(parts[:, :, j, :], ((0, 0), (j, r - 1 - j), (0, 0)))
    return y.reshape(b, (f + r - 1) * hop)


def istft(real, imag, n_fft: int, hop: int, frame_lengths=None):
    """(real, imag) [B, F, bins] -> [B, hop*(F-1)] (torch.istft center=True, window Hann periodic).

    frame_lengths: valid frames per example ([B] int): later frames are left out of the overlap-add,
    so samples before `hop*(valid-1)` equal an unpadded call's; from `hop*(valid-1) + n_fft/2` on they are 0.
    """
    b, f, bins = real.shape
    spec = jnp.concatenate([real, imag], axis=-1).astype(jnp.float32)
    frames = jnp.einsum("bfk,kn->bfn", spec, jnp.asarray(_istft_matrix(n_fft)), precision=lax.Precision.HIGHEST)
    w2 = jnp.asarray(np.square(hann_window(n_fft)))
    if frame_lengths is None:
        valid = jnp.ones((1, f, 1), jnp.float32)
    else:
        valid = (jnp.arange(f)[None, :, None] < frame_lengths[:, None, None]).astype(jnp.float32)
        frames = frames * valid
    y = _overlap_add(frames, hop)
    env = _overlap_add(jnp.broadcast_to(valid * w2, (valid.shape[0], f, n_fft)), hop)
    start, stop = n_fft // 2, n_fft // 2 + hop * (f - 1)
    y, env = y[:, start:stop], env[:, start:stop]
    return jnp.where(env > 1e-11, y / jnp.where(env > 1e-11, env, 1.0), 0.0)
