"""Public HiFT API: mel [B, T, 80] -> (wav [B, T*480], source [B, T*480]).

* `hift_inference(params, cfg, mel, ...)`: upstream `hift.inference` at exactly this length.
* `vocode(params, cfg, mel, ...)`: the same, with T padded to a bucket (`DEFAULT_BUCKETS`) so that a
  new length in the same bucket reuses the compiled program. Padding is exact, not approximate:
  frames past each example's length are masked (see `HiFTGenerator.decode`, `stft`, `istft`).
* `vocode_padded(params, cfg, mel, lengths, ...)`: both stages on an already padded device batch
  (no host checks, no trimming) for pipelines that pad themselves; traceable (usable inside
  `jax.jit` / `jax.vmap`, e.g. `cosyjax.pipeline.synthesize`).
* `device_params(params, cfg)`: put a converted tree on the device once (the CV3 f0 predictor as
  float64 arrays placed under x64: they stay float64 through the caller's jit/vmap), so calls do not
  re-transfer weights and the float64 island is never rounded to float32.
* `f0_stage(params, cfg, mel, lengths)`: the f0 stage alone (what `vocode_padded` runs first).

Two jitted stages per call:
1. `_f0_jit` under a local `x64_enabled()` context: f0 predictor (CV3 in float64 like upstream,
   CV2 float32) and the SineGen2 phase (cumsum accumulated in `PHASE_DTYPE` = float64, as torch's
   CPU cumsum does; CV2's linear up-sampling blend as an exact fma) -> f0 [B, T], phase [B, T*480, 9] f32.
2. `_wave_jit` (float32): source (sines + noise), source STFT, generator, iSTFT, clamp.
Compilations are counted with the jitted functions' `_cache_size()` (no module state).
`cosyjax.hift.incremental.IncrementalVocoderCV3` runs the same two programs on streaming windows.

Randomness is explicit: `noise` (CV2: N(0,1) [B, >=T*480, 9]; CV3: the fixed U[0,1) buffer
[1|B, >=T*480, 9], read from sample 0) or a `key` (`source.default_noise`; CV2 default key is
`jax.random.key(0)`, CV3 default `jax.random.key(CV3_SINE_NOISE_SEED)`, both prefix-stable).
`rand_ini` (upstream's random initial harmonic phases) is accepted for interface parity but has no
effect: upstream adds it to sample 0 only, which its linear down-sampling never reads (SPEC 5.3).
CV3 `finalize=False` (streaming chunk) returns wav[:, :(T-8)*480] and source[:, :(T-3)*480] of the
finalize=True computation: upstream's look-ahead trims are exactly those prefixes, because every
later layer is causal (upstream's own check differs by float noise only).
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cosyjax.hift.config import HiFTConfig
from cosyjax.hift.f0_predictor import x64_enabled
from cosyjax.hift.generator import HiFTGenerator, time_mask
from cosyjax.hift.source import default_noise, frame_cumsum, scale_phase, sine_phase, upsample_phase
from cosyjax.hift.stft import istft, stft
from cosyjax.stage_batch import StageCall, run_alone

__all__ = ["DEFAULT_BUCKETS", "PHASE_DTYPE", "HiFTInputError", "bucket_length", "device_params", "f0_dtype",
           "f0_stage", "hift_inference", "vocode", "vocode_padded"]

DEFAULT_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
"""Mel lengths compiled by `vocode`; longer inputs round up to a multiple of the last bucket."""

PHASE_DTYPE = jnp.float64
"""SineGen2 cumsum accumulation type of the f0 stage (torch's CPU cumsum accumulates in double)."""


class HiFTInputError(CosyJaxError):
    """A vocoder input with the wrong shape, length or dtype (the message names it)."""


def bucket_length(t: int, buckets=DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= t (beyond the last: the next multiple of the last bucket)."""
    for b in buckets:
        if b >= t:
            return int(b)
    last = int(buckets[-1])
    return -(-t // last) * last


def _split(params) -> tuple[Any, dict]:
    if not isinstance(params, dict) or "f0_predictor" not in params:
        raise HiFTInputError("params must be the HiFT tree from convert/hift.py (a dict with 'f0_predictor', "
                             "'conv_pre', ...)")
    return params["f0_predictor"], {k: v for k, v in params.items() if k != "f0_predictor"}


def f0_dtype(cfg: HiFTConfig):
    """The f0 predictor's compute dtype: float64 for CosyVoice3 (upstream `.to(torch.float64)`), else float32."""
    return np.dtype(np.float64) if cfg.causal else np.dtype(np.float32)


def device_params(params, cfg: HiFTConfig):
    """Params on the default device, placed once: generator float32; the f0 predictor in `f0_dtype(cfg)`.

    The CosyVoice3 f0 weights are placed as float64 arrays under the local x64 context. A placed
    float64 array keeps its dtype as an argument of `jax.jit` even with x64 off, so the tree can be
    passed through the caller's own jit/vmap (e.g. `pipeline.synthesize`) to `vocode_padded`, whose f0
    stage then computes with the float64 weights. Do not `jax.device_put` the result again outside
    x64 (that would round the f0 weights to float32); already placed trees are accepted here.
    """
    f0, rest = _split(params)
    rest = jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), rest))
    with x64_enabled():
        f0 = jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a, f0_dtype(cfg)), f0))
    return {"f0_predictor": f0, **rest}


def _stage_f0(f0_params, mel, lengths, f0=None, *, cfg: HiFTConfig):
    """Jitted stage 1 (`_f0_jit`), arguments normalised so that every caller shares one cache entry."""
    return _f0_jit(f0_params, mel, lengths, f0, cfg=cfg)


def _predict_f0(f0_params, mel, lengths, cfg: HiFTConfig):
    """(f0 params, mel [B, T, 80], lengths [B]) -> f0 [B, T] float32; traced under x64.

    The weights are used in their placed dtype when it is already `f0_dtype(cfg)` (no rounding);
    float32 CV3 weights (placed without `device_params`) are widened, i.e. already rounded."""
    dtype = f0_dtype(cfg)
    mel = jnp.where(time_mask(lengths, mel.shape[1]), mel, 0.0).astype(dtype)
    f0_params = jax.tree_util.tree_map(lambda a: a if a.dtype == dtype else a.astype(dtype), f0_params)
    f0 = HiFTGenerator(cfg, f0_dtype=dtype).apply({"params": {"f0_predictor": f0_params}}, mel, lengths,
                                                  method="predict_f0")
    return f0.astype(jnp.float32)  # upstream: f0_predictor(...).to(speech_feat)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _f0_jit(f0_params, mel, lengths, f0, *, cfg: HiFTConfig):
    """(f0 params, mel [B, T, 80], lengths [B], f0 or None) -> f0 [B, T] f32, phase [B, T*480, 9] f32.

    Call under x64. A given `f0` (parity: upstream's recorded f0) skips the predictor."""
    f0 = _predict_f0(f0_params, mel, lengths, cfg) if f0 is None else f0.astype(jnp.float32)
    return f0, sine_phase(f0, cfg, lengths, acc_dtype=PHASE_DTYPE)


@functools.partial(jax.jit, static_argnames=("cfg", "context"))
def _f0_window_jit(f0_params, mel, lengths, shift, carry, advance, *, cfg: HiFTConfig, context: int):
    """The f0 stage of one streaming window (CV3, B = 1); call under x64.

    mel [1, W + context, 80]: the window's frames preceded by `shift` (<= context) frames of f0 left
    context; lengths [1] valid frames of that input; carry [1, 9] float64 = running rad sum before the
    window; advance: frames after which the next window starts.
    -> f0 [1, W] f32, phase [1, W*480, 9] f32, next carry [1, 9] float64 (the sum before frame `advance`).
    """
    w = mel.shape[1] - context
    f0 = lax.dynamic_slice_in_dim(_predict_f0(f0_params, mel, lengths, cfg), shift, w, axis=1)
    cum = frame_cumsum(f0, cfg, acc_dtype=PHASE_DTYPE, initial=carry)
    phase = upsample_phase(scale_phase(cum, cfg), cfg, acc_dtype=PHASE_DTYPE)
    last = lax.dynamic_index_in_dim(cum, jnp.maximum(advance - 1, 0), axis=1, keepdims=False)
    return f0, phase, jnp.where(advance > 0, last, carry.astype(PHASE_DTYPE))


@functools.partial(jax.jit, static_argnames=("cfg", "precision", "dtype", "intermediates"))
def _wave_jit(params, mel, lengths, f0, phase, noise, key, cache_source, trims, *, cfg: HiFTConfig, precision,
              dtype, intermediates: bool):
    """Source, STFT, generator, iSTFT for a padded batch. Returns (wav [B, T*U], source [B, T*U], extras).

    trims: int32 [2] = mel frames not output at the end of (wav, source); (0, 0) when finalizing.
    """
    b, t, _ = mel.shape
    u = cfg.upsample_scale
    n_samples = t * u
    mel = jnp.where(time_mask(lengths, t), mel, 0.0).astype(jnp.float32)
    if noise is None:
        noise = default_noise(cfg, key, b, t)
    gen = HiFTGenerator(cfg, precision=precision, dtype=dtype)
    variables = {"params": params}
    s = gen.apply(variables, phase, f0, noise, method="source")  # [B, L]
    sample = jnp.arange(n_samples, dtype=jnp.int32)[None, :]
    if cache_source is not None:  # upstream: s[:, :, :C] = cache_source
        c = cache_source.shape[1]
        cache = jnp.pad(cache_source.astype(jnp.float32), ((0, 0), (0, n_samples - c)))
        s = jnp.where(sample < c, cache, s)
    s_stft = stft(s, cfg.n_fft, cfg.hop_len, lengths * u)  # [B, F, 18]
    x = gen.apply(variables, mel, s_stft, lengths, method="decode")  # [B, F, 18]
    nb = cfg.n_bins
    magnitude = jnp.minimum(jnp.exp(x[..., :nb]), 100.0)
    phase_out = jnp.sin(x[..., nb:])  # upstream applies sin here, then cos/sin again in _istft
    wav = istft(magnitude * jnp.cos(phase_out), magnitude * jnp.sin(phase_out), cfg.n_fft, cfg.hop_len,
                lengths * cfg.upsample_total + 1)
    wav = jnp.clip(wav, -cfg.audio_limit, cfg.audio_limit)
    wav = jnp.where(sample < ((lengths - trims[0]) * u)[:, None], wav, 0.0)
    s = jnp.where(sample < ((lengths - trims[1]) * u)[:, None], s, 0.0)
    extras = {"source_stft": s_stft, "conv_post_out": x} if intermediates else {}
    return wav, s, extras


def _trims(cfg: HiFTConfig, finalize: bool):
    return np.array([0, 0] if finalize else [cfg.finalize_false_trim, cfg.f0_lookahead], np.int32)


def _wave_call(params, mel, lengths, f0, phase, noise, key, cache_source, trims, *, cfg: HiFTConfig,
               precision=None, dtype=None, intermediates: bool = False) -> StageCall:
    """Stage 2 (`_wave_jit`) as a `StageCall`: a runner runs it alone or with other streams' calls."""
    return StageCall(_wave_jit, (params,), (mel, lengths, f0, phase, noise, key, cache_source, trims),
                     static=(("cfg", cfg), ("dtype", dtype), ("intermediates", intermediates),
                             ("precision", precision)))


def _stage_wave(params, mel, lengths, f0, phase, noise, key, cache_source, trims=None, *, cfg: HiFTConfig,
                precision=None, dtype=None, intermediates: bool = False, finalize: bool = True):
    """Jitted stage 2 (`_wave_jit`); `finalize` is turned into traced trims, so it never recompiles."""
    if trims is None:
        trims = _trims(cfg, finalize)
    return run_alone(_wave_call(params, mel, lengths, f0, phase, noise, key, cache_source, trims, cfg=cfg,
                                precision=precision, dtype=dtype, intermediates=intermediates))


def f0_stage(params, cfg: HiFTConfig, mel, lengths):
    """The f0 stage alone, as `vocode_padded` runs it: (mel [B, T, 80], lengths [B]) -> (f0 [B, T] f32,
    phase [B, T*480, 9] f32).

    One jitted program (`_f0_jit`) entered under the local x64 context; with `device_params` params the
    CosyVoice3 predictor computes with its float64 weights, also when traced inside the caller's
    `jax.jit` / `jax.vmap` (placed float64 arrays keep their dtype there). params: the whole HiFT tree
    or its 'f0_predictor' subtree.
    """
    f0_params = params["f0_predictor"] if isinstance(params, dict) and "f0_predictor" in params else params
    with x64_enabled():
        return _stage_f0(f0_params, mel, jnp.asarray(lengths, jnp.int32), cfg=cfg)


def vocode_padded(params, cfg: HiFTConfig, mel, lengths, *, finalize: bool = True, key=None, noise=None,
                  cache_source=None, precision=None, dtype=None):
    """Both stages on an already padded batch, no host-side checks or trimming (device arrays in and out).

    mel [B, T, 80] (frames past `lengths` are ignored), lengths int [B] in [1, T] -> wav [B, T*480],
    source [B, T*480], zero past each example's output length ((len-8)*480 / (len-3)*480 for a CV3
    finalize=False call). noise: [B|1, T*480, 9] or None (then `key`, see `source.default_noise`;
    CosyVoice3 draws its fixed buffer from `key`, so pass key=None there for upstream's noise).
    Recompiles only when T, B or the config change.

    Traceable: usable inside `jax.jit` / `jax.vmap` (mel, lengths and key may be tracers). It is not
    jitted itself; while tracing, the f0 stage enters its own local x64 context (CosyVoice3's float64
    f0 predictor), as in an eager call.
    """
    if noise is None and key is None and not cfg.causal:
        key = jax.random.key(0)
    _, rest = _split(params)
    lengths = jnp.asarray(lengths, jnp.int32)
    f0, phase = f0_stage(params, cfg, mel, lengths)
    wav, source, _ = _stage_wave(rest, mel, lengths, f0, phase, noise, None if noise is not None else key,
                                 cache_source, _trims(cfg, finalize), cfg=cfg, precision=precision, dtype=dtype)
    return wav, source


def _as_array(x, name: str, dtype=np.float32):
    if isinstance(x, jax.Array):
        return x.astype(dtype)
    try:
        return np.asarray(x, dtype)
    except (TypeError, ValueError) as e:
        raise HiFTInputError(f"{name}: cannot convert to a {np.dtype(dtype).name} array: {e}") from None


def _pad_time(x, axis: int, total: int):
    pad = total - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)


def _check_mel(cfg: HiFTConfig, mel):
    shape = tuple(getattr(mel, "shape", ()))
    if len(shape) != 3:
        raise HiFTInputError(f"mel must be [B, T, {cfg.in_channels}] (batch, frames, mel bins); got shape {shape}")
    b, t, c = shape
    if c != cfg.in_channels:
        hint = (f" (looks like upstream's [B, {cfg.in_channels}, T] layout: transpose to [B, T, {cfg.in_channels}])"
                if t == cfg.in_channels else "")
        raise HiFTInputError(f"mel has {c} channels in its last axis, the vocoder expects {cfg.in_channels}; "
                             f"mel shape {shape}{hint}")
    if b == 0:
        raise HiFTInputError(f"mel batch is empty: shape {shape}")
    if t == 0:
        raise HiFTInputError(f"mel is empty: 0 frames (shape {shape}); the vocoder needs at least 1 frame")
    if not jnp.issubdtype(getattr(mel, "dtype", np.float32), jnp.floating):
        raise HiFTInputError(f"mel must be floating point, got dtype {mel.dtype}")
    return b, t


def _run(params, cfg: HiFTConfig, mel, *, bucket: int | None, finalize, key, noise, rand_ini, cache_source,
         lengths, precision, dtype, intermediates, f0=None, run=run_alone):
    if not isinstance(cfg, HiFTConfig):
        raise HiFTInputError(f"cfg must be a HiFTConfig, got {type(cfg).__name__}")
    b, t = _check_mel(cfg, mel)
    mel = _as_array(mel, "mel")
    u, h = cfg.upsample_scale, cfg.num_harmonics
    if lengths is None:
        lengths_np = np.full((b,), t, np.int32)
    else:
        lengths_np = np.asarray(lengths, np.int64).reshape(-1)
        if lengths_np.shape != (b,) or lengths_np.min() < 1 or lengths_np.max() > t:
            raise HiFTInputError(f"lengths must be {b} integers in [1, {t}], got {lengths_np.tolist()}")
        lengths_np = lengths_np.astype(np.int32)
    if not finalize:
        if not cfg.causal:
            raise HiFTInputError("finalize=False exists only for CosyVoice3's CausalHiFTGenerator; CosyVoice2 "
                                 "streams with cache_source instead")
        if lengths_np.min() <= cfg.finalize_false_trim:
            raise HiFTInputError(f"finalize=False needs more than {cfg.finalize_false_trim} mel frames "
                                 f"({cfg.f0_lookahead} f0 + {cfg.conv_pre_look_right} conv_pre look-ahead + 1 "
                                 f"dropped frame); got lengths {lengths_np.tolist()}")
    tb = t if bucket is None else max(bucket, t)
    need = t * u if finalize else (t - cfg.f0_lookahead) * u
    if noise is not None:
        noise = _as_array(noise, "noise")
        if noise.ndim != 3 or noise.shape[0] not in (1, b) or noise.shape[2] != h or noise.shape[1] < need:
            raise HiFTInputError(f"noise must be [{b} or 1, >= {need}, {h}] (samples x harmonics), got "
                                 f"{tuple(noise.shape)}")
        if not cfg.causal and noise.shape[0] != b:
            raise HiFTInputError(f"CosyVoice2 noise is drawn per example: need batch {b}, got {noise.shape[0]}")
        noise = _pad_time(noise[:, : min(noise.shape[1], t * u)], 1, tb * u)
        key = None
    elif key is None and not cfg.causal:
        key = jax.random.key(0)
    if rand_ini is not None:
        r = np.shape(rand_ini)
        if len(r) != 2 or r[0] not in (1, b) or r[1] != h:
            raise HiFTInputError(f"rand_ini must be [{b} or 1, {h}], got {r}")
    if cache_source is not None:
        if cfg.causal:
            raise HiFTInputError("cache_source is a CosyVoice2 HiFTGenerator input; CosyVoice3 re-runs the whole "
                                 "mel instead")
        cache_source = _as_array(cache_source, "cache_source")
        if cache_source.ndim == 3 and cache_source.shape[1] == 1:
            cache_source = cache_source[:, 0]
        if cache_source.ndim != 2 or cache_source.shape[0] != b or cache_source.shape[1] > t * u:
            raise HiFTInputError(f"cache_source must be [{b}, C] (or [{b}, 1, C]) with C <= {t * u}, got "
                                 f"{tuple(cache_source.shape)}")
        if cache_source.shape[1] == 0:
            cache_source = None
    if f0 is not None:
        f0 = _as_array(f0, "f0")
        if f0.shape != (b, t):
            raise HiFTInputError(f"f0 must be [{b}, {t}] (Hz per mel frame), got {tuple(f0.shape)}")
        f0 = _pad_time(f0, 1, tb)
    f0_params, rest = _split(params)
    # device arrays, as `vocode_padded` callers pass them: jit caches numpy and jax arguments separately
    mel_p, lengths_np = jnp.asarray(_pad_time(mel, 1, tb)), jnp.asarray(lengths_np)
    # the two jitted stages as `StageCall`s: `run` runs them alone, or with other streams' calls (CV2 streaming)
    f0, phase = run(StageCall(_f0_jit, (f0_params,), (mel_p, lengths_np, f0), static=(("cfg", cfg),),
                              context=x64_enabled))
    wav, source, extras = run(_wave_call(rest, mel_p, lengths_np, f0, phase, noise, key, cache_source,
                                         _trims(cfg, finalize), cfg=cfg, precision=precision, dtype=dtype,
                                         intermediates=intermediates))
    t_wav = t if finalize else t - cfg.finalize_false_trim
    t_src = t if finalize else t - cfg.f0_lookahead
    if bucket is not None:  # `vocode`: trim on the host (an eager device slice compiles once per length)
        wav, source = np.asarray(wav), np.asarray(source)
    wav, source = wav[:, : t_wav * u], source[:, : t_src * u]
    if not intermediates:
        return wav, source
    frames = t * cfg.upsample_total + 1
    extras = {"f0": f0[:, :t], "source_stft": extras["source_stft"][:, :frames],
              "conv_post_out": extras["conv_post_out"][:, :frames]}
    return wav, source, extras


def hift_inference(params, cfg: HiFTConfig, mel, *, finalize: bool = True, key=None, noise=None, rand_ini=None,
                   cache_source=None, lengths=None, precision=None, dtype=None, return_intermediates: bool = False,
                   f0=None):
    """Upstream `hift.inference(mel)` at exactly this length.

    mel [B, T, 80] -> wav [B, T*480] (finalize=False: [B, (T-8)*480]) and source [B, T*480]
    (finalize=False: [B, (T-3)*480]). `lengths` ([B], optional): valid frames per example; outputs are
    zero past each example's end. `cache_source` ([B, C], CV2): first C source samples replaced.
    `precision`/`dtype`: generator convs (None = the global default precision, float32).
    `return_intermediates`: also a dict with f0 [B, T], source_stft [B, 120T+1, 18] (real bins then
    imag bins) and conv_post_out [B, 120T+1, 18].
    `f0` ([B, T], optional): use this f0 instead of the predictor's (staged parity checks).
    """
    return _run(params, cfg, mel, bucket=None, finalize=finalize, key=key, noise=noise, rand_ini=rand_ini,
                cache_source=cache_source, lengths=lengths, precision=precision, dtype=dtype,
                intermediates=return_intermediates, f0=f0)


def vocode(params, cfg: HiFTConfig, mel, *, finalize: bool = True, key=None, noise=None, rand_ini=None,
           cache_source=None, lengths=None, precision=None, dtype=None, buckets=DEFAULT_BUCKETS, run=run_alone):
    """`hift_inference` with T padded to `bucket_length(T, buckets)`: same outputs, no recompilation for
    a new length inside a compiled bucket. Returns (wav, source) numpy float32, trimmed to the input length.
    `run`: the runner of the two jitted stages' `StageCall`s (`cosyjax.stage_batch`; a CosyVoice2 stream's
    chunks run with other streams' through a `StageGang`, warm-up through `CompileOnce`)."""
    b, t = _check_mel(cfg, mel)
    return _run(params, cfg, mel, bucket=bucket_length(t, buckets), finalize=finalize, key=key, noise=noise,
                rand_ini=rand_ini, cache_source=cache_source, lengths=lengths, precision=precision, dtype=dtype,
                intermediates=False, run=run)
