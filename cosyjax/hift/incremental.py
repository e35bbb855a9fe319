"""Exact incremental CosyVoice3 vocoder for streaming: each push costs O(new frames + a constant context).

Upstream `CosyVoice3Model.token2wav(stream=True)` (and `cosyjax.streaming.CV3Token2Wav`) re-runs
`hift.inference(all_mel, finalize)` on the whole accumulated mel at every chunk and yields
`speech[:, speech_offset:]`: O(n^2) over an utterance. The `CausalHiFTGenerator` is causal with a
bounded left receptive field, except for two things that depend on absolute position:
* the SineGen2 harmonic phase, a running sum over all frames -> carried exactly as a float64
  accumulator (`frame_cumsum(initial=...)`, the same float64 accumulation as the whole-mel path);
* the fixed noise buffer, read at absolute sample positions -> sliced at the window's offset.

So a push vocodes only a window: the mel frames from `g0` (the first frame the new output samples can
depend on, `left_context_frames`) to the end, with the f0 predictor seeing `f0_left_context` more
frames on the left. The window is the whole-mel computation shifted by `g0 * 480` samples, with the
left-boundary effects (zero padding of causal convs, STFT reflection, ReflectionPad1d, iSTFT
envelope) confined to samples before the first one it returns. The right end is the same as the
recompute call's (same total length, same look-ahead trims), so every push returns the samples the
recompute path yields for that call, up to float32 rounding of convolutions on a different length.
Both stages are the vocoder's jitted programs (`_f0_window_jit`, `_wave_jit`), compiled per window
bucket (`INCREMENTAL_BUCKETS`).

CosyVoice2 needs none of this: `CV2Token2Wav` already vocodes only its 8-frame mel cache plus the new
frames (`cv2_vocoder_frames`).
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

from cosyjax.errors import CosyJaxError
from cosyjax.hift.config import HiFTConfig, causal_padding
from cosyjax.hift.f0_predictor import x64_enabled
from cosyjax.hift.source import default_noise
from cosyjax.hift.vocoder import (DEFAULT_BUCKETS, PHASE_DTYPE, _f0_window_jit, _split, _trims, _wave_call,
                                  bucket_length, device_params, f0_dtype)
from cosyjax.stage_batch import StageCall, run_alone

__all__ = ["INCREMENTAL_BUCKETS", "IncrementalInputError", "IncrementalVocoderCV3", "cv2_vocoder_frames",
           "earliest_inputs", "f0_left_context", "left_context_frames"]

INCREMENTAL_BUCKETS = tuple(range(16, 513, 16)) + tuple(b for b in DEFAULT_BUCKETS if b > 512)
"""Window lengths (mel frames) compiled by `IncrementalVocoderCV3`: fine steps, since a window is
one chunk plus a constant context and padding is computed work."""

NOISE_MIN_FRAMES = 256
"""Smallest default-noise draw (frames): draws are powers of two >= this (prefix-stable, so the size
changes no sample), so a stream of any length reuses the few compiled draw programs."""


class IncrementalInputError(CosyJaxError):
    """A bad push (wrong mel shape or dtype, push after the final one, too short a first chunk, short noise)."""


def _resblock_reach(kernel_size: int, dilations) -> int:
    """Left reach (frames) of one causal ResBlock: per dilation conv1 (k-1)*d + conv2 (k-1)."""
    return sum(causal_padding(kernel_size, d) + causal_padding(kernel_size, 1) for d in dilations)


def earliest_inputs(cfg: HiFTConfig, n: int) -> tuple[int, int]:
    """(earliest mel frame, earliest source sample) that CV3 output sample n depends on through the generator.

    Walks the causal decode backwards with each layer's exact index map: iSTFT frame coverage,
    conv_post, per stage the resblocks (widest kernel), the source branch (source resblock, strided
    causal down-sampling conv, STFT frame support), ReflectionPad1d((1, 0)) and the nearest+conv
    up-sampling. conv_pre only looks right. (The source sample's f0 frame needs
    `f0_left_context` more mel frames; see `IncrementalVocoderCV3`.)
    """
    if not cfg.causal:
        raise IncrementalInputError("earliest_inputs describes CosyVoice3's causal generator only")
    hop, half = cfg.hop_len, cfg.n_fft // 2
    e = -(-(n + half - (cfg.n_fft - 1)) // hop)  # first STFT frame whose window covers sample n
    e -= causal_padding(7, 1)  # conv_post
    src = None
    res_reach = max(_resblock_reach(k, d) for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
    for i in reversed(range(cfg.num_upsamples)):
        e -= res_reach  # resblocks read x = ups(...) + source branch
        u = cfg.source_down_rates[i]
        es = e - _resblock_reach(cfg.source_resblock_kernel_sizes[i], cfg.source_resblock_dilation_sizes[i])
        frame = es * u - (u - 1 if u > 1 else 0)  # CausalConv1dDownSample (k = 2u, left pad u-1) or k=1 conv
        first_sample = frame * hop - half  # STFT frame f reads samples hop*f - n_fft/2 ...
        src = first_sample if src is None else min(src, first_sample)
        if i == cfg.num_upsamples - 1:
            e -= 1  # ReflectionPad1d((1, 0)): frame j is the up-sampled frame j-1
        r, k = cfg.upsample_rates[i], cfg.upsample_kernel_sizes[i]
        e = (e - (k - 1)) // r  # nearest x r, then a conv left-padded by k-1
    return e, src


@functools.lru_cache(maxsize=None)  # a pure walk of the config, ~15 ms of Python: once per config, not per stream
def left_context_frames(cfg: HiFTConfig) -> int:
    """Mel frames before output frame a//480 that the generator window must include (exact, from the config).

    The maximum over one 480-sample period of a//480 - min(earliest mel frame, earliest source frame)
    (the index maps are periodic with the 480-sample frame, so one period covers every offset).
    """
    u = cfg.upsample_scale
    base = 1000 * u
    worst = 0
    for r in range(u):
        mel, src = earliest_inputs(cfg, base + r)
        worst = max(worst, (base + r) // u - min(mel, src // u))
    return worst


def f0_left_context(cfg: HiFTConfig) -> int:
    """Mel frames of left context the CV3 f0 predictor needs: its 4 left-padded k=3 convs (2 each)."""
    return sum(causal_padding(3, 1) for _ in range(1, cfg.f0_num_layers))


def cv2_vocoder_frames(new_frames: int, has_cache: bool, mel_cache_len: int = 8) -> int:
    """Mel frames `CV2Token2Wav` vocodes for one chunk: the new frames plus its mel cache after the first."""
    return int(new_frames) + (int(mel_cache_len) if has_cache else 0)


def _placed(params, cfg: HiFTConfig) -> bool:
    f0, rest = _split(params)
    want = f0_dtype(cfg)
    leaves_f0, leaves_rest = jax.tree_util.tree_leaves(f0), jax.tree_util.tree_leaves(rest)
    return (all(isinstance(a, jax.Array) and a.dtype == want for a in leaves_f0)
            and all(isinstance(a, jax.Array) and a.dtype == np.float32 for a in leaves_rest))


class IncrementalVocoderCV3:
    """Streaming CosyVoice3 HiFT with bounded state; `push` returns what `CV3Token2Wav` would yield.

    params: the HiFT tree (from `device_params`; a host tree is placed once here). noise: the fixed
    U[0,1) buffer [1, L, 9] read at absolute sample positions (L >= samples of the longest call), or
    None for `source.default_noise(cfg, key, ...)` (key None: `CV3_SINE_NOISE_SEED`), the noise
    `vocode` uses for the same key. precision / dtype: the generator convs, as in `vocode`.

    State between pushes: the last mel frames the next window needs (left context + f0 context +
    the 8 look-ahead frames not yet vocoded), the float64 phase accumulator at the next window's start,
    and the number of samples emitted.
    """

    def __init__(self, params, cfg: HiFTConfig, *, noise=None, key=None, precision=None, dtype=None,
                 buckets=INCREMENTAL_BUCKETS, run: Callable = run_alone):
        if not isinstance(cfg, HiFTConfig):
            raise IncrementalInputError(f"cfg must be a HiFTConfig, got {type(cfg).__name__}")
        if not cfg.causal:
            raise IncrementalInputError("IncrementalVocoderCV3 needs CosyVoice3's CausalHiFTGenerator; CosyVoice2 "
                                        "streams through CV2Token2Wav (8-frame mel cache + cache_source)")
        self.cfg = cfg
        self.params = params if _placed(params, cfg) else device_params(params, cfg)
        self._f0_params, self._rest = _split(self.params)
        self.precision, self.dtype, self.buckets = precision, dtype, tuple(buckets)
        self.run = run  # runs the two programs' `StageCall`s (`cosyjax.stage_batch`: alone or with other streams)
        self.context = left_context_frames(cfg)
        self.f0_context = f0_left_context(cfg)
        h = cfg.num_harmonics
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            if noise.ndim != 3 or noise.shape[0] != 1 or noise.shape[2] != h:
                raise IncrementalInputError(f"noise must be the fixed buffer [1, L, {h}], got {noise.shape}")
            if key is not None:
                raise IncrementalInputError("pass either noise or key, not both")
        self._noise = noise
        self._noise_is_fixed = noise is not None
        self._key = key
        self._mel = np.zeros((1, 0, cfg.in_channels), np.float32)  # frames [mel_start, total)
        self._mel_start = 0
        self.total_frames = 0
        self.emitted_samples = 0
        self._window_start = 0  # g0 of the next push; the carry is the rad sum over frames [0, g0)
        with x64_enabled():
            self._carry = jnp.zeros((1, h), PHASE_DTYPE)
        self.finalized = False

    # ---- helpers ---------------------------------------------------------------------------------
    def _check(self, mel_new):
        c = self.cfg
        shape = tuple(getattr(mel_new, "shape", ()))
        if len(shape) != 3 or shape[0] != 1 or shape[2] != c.in_channels:
            hint = (f" (looks like upstream's [1, {c.in_channels}, F] layout: transpose it)"
                    if len(shape) == 3 and shape[1] == c.in_channels else "")
            raise IncrementalInputError(f"mel_new must be [1, F, {c.in_channels}] (one stream, new frames, mel "
                                        f"bins); got shape {shape}{hint}")
        if not np.issubdtype(np.dtype(getattr(mel_new, "dtype", np.float32)), np.floating):
            raise IncrementalInputError(f"mel_new must be floating point, got dtype {mel_new.dtype}")
        mel_new = np.asarray(mel_new, np.float32)
        if not np.all(np.isfinite(mel_new)):
            raise IncrementalInputError("mel_new contains NaN or inf")
        return mel_new

    def _noise_window(self, start: int, stop: int, need: int, padded: int):
        """Noise samples [start, stop) at absolute positions, zero-padded to `padded` samples."""
        if self._noise_is_fixed:
            if self._noise.shape[1] < need:
                raise IncrementalInputError(f"noise buffer has {self._noise.shape[1]} samples; this push needs "
                                            f">= {need} (absolute sample positions)")
        elif self._noise is None or self._noise.shape[1] < stop:
            # prefix-stable draws (see `default_noise`): regrow by doubling, O(final length) in total
            u = self.cfg.upsample_scale
            frames = max(-(-stop // u), 2 * (0 if self._noise is None else self._noise.shape[1] // u))
            # a power of two: the eager draw compiles once per size, not once per utterance length
            frames = max(NOISE_MIN_FRAMES, 1 << (frames - 1).bit_length())
            self._noise = np.asarray(default_noise(self.cfg, self._key, 1, frames))
        win = self._noise[:, start:min(stop, self._noise.shape[1])]
        return np.pad(win, ((0, 0), (0, padded - win.shape[1]), (0, 0)))

    # ---- the public step -------------------------------------------------------------------------
    def push(self, mel_new, finalize: bool) -> tuple[np.ndarray, int]:
        """Append mel_new [1, F, 80] float32 (F >= 0) and vocode the window it completes.

        Returns (audio [1, N] float32, vocoder_frames). audio = the samples the recompute path
        (`streaming.RecomputeVocoderCV3`, upstream token2wav) yields for this call: every sample up to
        (T-8)*480 (non-final) or T*480 (final), T = frames pushed so far, minus those already returned.
        vocoder_frames = mel frames in the generator window (context included, bucket padding
        excluded; the f0 predictor sees `f0_context` more). An empty final push with nothing pushed
        before returns ([1, 0], 0), as the recompute path does.
        """
        if self.finalized:
            raise IncrementalInputError("push after the final push (finalize=True): start a new IncrementalVocoderCV3")
        mel_new = self._check(mel_new)
        c, u = self.cfg, self.cfg.upsample_scale
        t = self.total_frames + mel_new.shape[1]
        if t == 0 and finalize:  # an empty utterance: nothing to vocode (as the recompute path)
            self.finalized = True
            return np.zeros((1, 0), np.float32), 0
        if not finalize and t <= c.finalize_false_trim:
            raise IncrementalInputError(f"a non-final push needs more than {c.finalize_false_trim} mel frames in "
                                        f"total ({c.f0_lookahead} f0 + {c.conv_pre_look_right} conv_pre look-ahead "
                                        f"+ 1 dropped frame); got {t}")
        mel = np.concatenate([self._mel, mel_new], axis=1)
        stop = t * u if finalize else (t - c.finalize_false_trim) * u
        g0 = self._window_start
        f0_start = max(0, g0 - self.f0_context)
        w = t - g0
        tb = bucket_length(w, self.buckets)
        k = self.f0_context
        f0_in = mel[:, f0_start - self._mel_start: t - self._mel_start]
        f0_in = np.pad(f0_in, ((0, 0), (0, tb + k - f0_in.shape[1]), (0, 0)))
        gen_in = np.pad(mel[:, g0 - self._mel_start:], ((0, 0), (0, tb - w), (0, 0)))
        next_start = 0 if finalize else max(0, stop // u - self.context)
        need = t * u if finalize else (t - c.f0_lookahead) * u
        noise = self._noise_window(g0 * u, t * u, need, tb * u)
        f0, phase, carry = self.run(StageCall(
            _f0_window_jit, (self._f0_params,),
            (f0_in, np.array([t - f0_start], np.int32), np.int32(g0 - f0_start), self._carry,
             np.int32(next_start - g0)), static=(("cfg", c), ("context", k)), context=x64_enabled))
        wav, _, _ = self.run(_wave_call(self._rest, gen_in, np.array([w], np.int32), f0, phase, noise, None, None,
                                        _trims(c, finalize), cfg=c, precision=self.precision, dtype=self.dtype))
        # slice on the host: an eager slice of the device array compiles once per (start, stop) size
        audio = np.asarray(wav, np.float32)[:, self.emitted_samples - g0 * u: stop - g0 * u]
        self.total_frames, self.emitted_samples = t, stop
        self._carry, self._window_start = carry, next_start
        keep = max(0, next_start - k)
        self._mel, self._mel_start = mel[:, keep - self._mel_start:], keep
        self.finalized = bool(finalize)
        return audio, w
