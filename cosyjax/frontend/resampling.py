"""torchaudio-compatible band-limited resampling (`torchaudio.transforms.Resample` defaults) in NumPy.

torchaudio's `sinc_interp_hann` resampler: rates reduced by their gcd (orig -> o, new -> n), a polyphase
kernel of n phases x (o + 2w) taps with w = ceil(lowpass_filter_width * o / (min(o, n) * rolloff)),

    t[p, c] = (-p / n  [computed in float32]  +  (c - w) / o) * min(o, n) * rolloff,  clipped to +-width
    k[p, c] = sinc(pi t) * cos(pi t / (2 width))^2 * min(o, n) * rolloff / o      (float64, stored float32)

applied as a stride-o convolution over the signal zero-padded by (w, w + o), phases interleaved, and the
output cut to ceil(n * N / o) samples. The kernel here is bit-identical to torchaudio's (same float32
rounding of p / n, float64 evaluation, float32 storage); the convolution accumulates in float64.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["resample", "resampled_length", "sinc_resample_kernel"]

_DENSE_LIMIT = 1 << 24  # kernel entries; beyond this the phases are applied one at a time


def _reduce(orig_freq: int, new_freq: int) -> tuple[int, int]:
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_freq} -> {new_freq}")
    g = math.gcd(int(orig_freq), int(new_freq))
    return int(orig_freq) // g, int(new_freq) // g


def resampled_length(n: int, orig_freq: int, new_freq: int) -> int:
    """ceil(n * new / orig) with gcd-reduced rates (what torchaudio returns); n when the rates are equal."""
    if orig_freq == new_freq:
        return n
    o, m = _reduce(orig_freq, new_freq)
    return -(-m * n // o)


@functools.lru_cache(maxsize=16)
def sinc_resample_kernel(orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """(kernel float32 [new', orig' + 2 width], width) for gcd-reduced rates, as torchaudio builds it."""
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    o, n = _reduce(orig_freq, new_freq)
    base_freq = min(o, n) * rolloff
    width = math.ceil(lowpass_filter_width * o / base_freq)
    idx = np.arange(-width, width + o, dtype=np.float64) / o
    # torch: arange(0, -new, -1) is int64; `/ new` is a float32 true division, then promoted by `+ idx`.
    phase = (np.arange(0, -n, -1, dtype=np.float32) / np.float32(n)).astype(np.float64)
    t = phase[:, None] + idx[None, :]
    t *= base_freq
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    scale = base_freq / o
    with np.errstate(invalid="ignore", divide="ignore"):
        kernels = np.where(t == 0, 1.0, np.sin(t) / t)
    kernels *= window * scale
    kernels = kernels.astype(np.float32)
    kernels.setflags(write=False)
    return kernels, width


def resample(waveform: np.ndarray, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> np.ndarray:
    """Resample the last axis of `waveform` ([..., N] float) from orig_freq to new_freq -> [..., M] float32."""
    x = np.asarray(waveform)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"resample expects a floating-point waveform, got {x.dtype}")
    if orig_freq == new_freq:
        return x.astype(np.float32, copy=False)
    o, n = _reduce(orig_freq, new_freq)
    kernel, width = sinc_resample_kernel(o, n, lowpass_filter_width, rolloff)
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).astype(np.float64)
    length = flat.shape[1]
    target = resampled_length(length, o, n)
    padded = np.pad(flat, ((0, 0), (width, width + o)))
    taps = kernel.shape[1]
    n_frames = (padded.shape[1] - taps) // o + 1
    out = np.empty((flat.shape[0], n_frames, n), np.float64)
    if kernel.size <= _DENSE_LIMIT:
        k64 = kernel.astype(np.float64)
        for b in range(flat.shape[0]):
            frames = np.lib.stride_tricks.sliding_window_view(padded[b], taps)[::o][:n_frames]
            out[b] = frames @ k64.T
    else:  # very long kernels (co-prime rates): each phase touches only ~2*width*o/base taps
        for p in range(n):
            nz = np.nonzero(kernel[p])[0]
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1)
            k = kernel[p, lo:hi].astype(np.float64)
            for b in range(flat.shape[0]):
                frames = np.lib.stride_tricks.sliding_window_view(padded[b, lo:], hi - lo)[::o][:n_frames]
                out[b, :, p] = frames @ k
    y = out.reshape(flat.shape[0], -1)[:, :target].astype(np.float32)
    return y.reshape(shape[:-1] + (target,))
