"""The one attention function used by every attention layer (DiT, U-Net, Conformer, Qwen2).

`attention(q, k, v, mask=None, *, bias=None, q_lengths=None, kv_lengths=None, scale=None,
implementation='auto') -> [B, T, H, D]`

* q: `[B, T, H, D]`; k, v: `[B, S, K, D]` with K dividing H (grouped-query attention: query head h
  uses key/value head h // (H // K)).
* mask: boolean, broadcastable to `[B, H, T, S]`, True = attend (`jax.nn.dot_product_attention`
  convention). `q_lengths` / `kv_lengths` (`[B]` int) add padding masks; `bias` is an additive
  float bias broadcastable to `[B, H, T, S]` (e.g. relative-position scores).
* A query row whose keys are all masked (or a padded query row) returns exactly zeros, on every
  implementation — never NaN, never a uniform average of V.

Implementations:
* `xla` — reference and CPU path: logits and softmax in float32 whatever the input dtype, masks
  applied with `where` and a finite minimum, denominators guarded. Never yields NaN/Inf.
* `cudnn` — `jax.nn.dot_product_attention(implementation='cudnn')` for bf16/fp16 on NVIDIA GPUs
  (full `[B, 1|H, T, S]` masks; cuDNN rejects `[B, 1, 1, S]`, so masks are broadcast over T).
* `pallas` — the Pallas GPU flash kernel (`jax.experimental.pallas.ops.gpu.attention.mha`),
  only without mask/bias/lengths and with T, S multiples of 128.
* `auto` — cudnn where supported (GPU, bf16/fp16, T > 1), else xla. The path taken is logged
  once per distinct reason (`logging` logger `cosyjax.attention`).
"""
from __future__ import annotations

import logging
from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["attention", "attention_reference_mask", "AttentionImpl"]

AttentionImpl = Literal["auto", "xla", "cudnn", "pallas"]
_LOG = logging.getLogger("cosyjax.attention")
_LOGGED: set[str] = set()  # once-per-message logging, not model state


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        _LOG.info(msg)


def attention_reference_mask(B, H, T, S, mask=None, q_lengths=None, kv_lengths=None):
    """The combined boolean mask `[B, H|1, T, S]` (or None) that `attention` applies."""
    m = None
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
        if mask.ndim != 4:
            raise ValueError(f"attention mask must have 4 dims broadcastable to [B,H,T,S], got {mask.shape}")
        for got, want, name in zip(mask.shape, (B, H, T, S), "BHTS"):
            if got not in (1, want):
                raise ValueError(f"attention mask shape {mask.shape} does not broadcast to {(B, H, T, S)} "
                                 f"(axis {name})")
        m = mask
    if kv_lengths is not None:
        kv = jnp.arange(S)[None, :] < jnp.asarray(kv_lengths).reshape(-1, 1)
        kv = kv[:, None, None, :]
        m = kv if m is None else m & kv
    if q_lengths is not None:
        ql = jnp.arange(T)[None, :] < jnp.asarray(q_lengths).reshape(-1, 1)
        ql = ql[:, None, :, None]
        m = ql if m is None else m & ql
    return m


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B,T,H,D], k/v [B,S,K,D]; got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} disagree on [B, S, K]")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {k.shape} does not match q {q.shape} on batch or head dim")
    K = k.shape[2]
    if K == 0 or H % K:
        raise ValueError(f"query heads {H} must be a multiple of key/value heads {K}")
    return B, T, H, D, k.shape[1], K


def _xla_attention(q, k, v, mask, bias, scale):
    """Float32 logits/softmax; normalises after the PV product (cheaper: [B,T,H,D] not [B,H,T,S])."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    qg = q.reshape(B, T, K, G, D)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * jnp.float32(scale)
    if bias is not None:
        bias = jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (B, H, T, S)).reshape(B, K, G, T, S)
        logits = logits + bias
    neg = jnp.finfo(jnp.float32).min
    if mask is not None:
        m = jnp.broadcast_to(mask, (B, H, T, S)).reshape(B, K, G, T, S)
        logits = jnp.where(m, logits, neg)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    e = jnp.exp(logits - row_max)
    if mask is not None:
        e = jnp.where(m, e, 0.0)
    denom = jnp.sum(e, axis=-1)  # [B,K,G,T]
    out = jnp.einsum("bkgts,bskd->btkgd", e.astype(v.dtype) if v.dtype != jnp.float32 else e, v,
                     preferred_element_type=jnp.float32)
    denom = jnp.transpose(denom, (0, 3, 1, 2))[..., None]  # [B,T,K,G,1]
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(B, T, H, D)


def _row_has_key(mask, B, H, T):
    """[B, T, H, 1] bool: False where a query row attends to nothing."""
    any_s = jnp.any(jnp.broadcast_to(mask, (mask.shape[0], mask.shape[1], mask.shape[2], mask.shape[3])), axis=-1)
    any_s = jnp.broadcast_to(any_s, (B, H, T))
    return jnp.transpose(any_s, (0, 2, 1))[..., None]


def _backend() -> str:
    try:
        return jax.default_backend()
    except Exception:  # pragma: no cover
        return "cpu"


def attention(q, k, v, mask=None, *, bias=None, q_lengths=None, kv_lengths=None, scale=None,
              implementation: AttentionImpl = "auto"):
    """Scaled dot-product attention; q `[B,T,H,D]`, k/v `[B,S,K,D]` -> `[B,T,H,D]` (q's dtype)."""
    B, T, H, D, S, K = _check_shapes(q, k, v)
    if implementation not in ("auto", "xla", "cudnn", "pallas"):
        raise ValueError(f"unknown attention implementation {implementation!r}")
    scale = float(D) ** -0.5 if scale is None else float(scale)
    m = attention_reference_mask(B, H, T, S, mask, q_lengths, kv_lengths)
    impl = implementation
    low_precision = q.dtype in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        if _backend() == "gpu" and low_precision and T > 1:
            impl = "cudnn"
        else:
            impl = "xla"
            _log_once(f"attention: xla path (backend={_backend()}, dtype={q.dtype})")
    if impl == "pallas":
        if m is not None or bias is not None or T % 128 or S % 128 or K != H:
            _log_once("attention: pallas needs no mask/bias, T,S % 128 == 0 and K == H; using xla")
            impl = "xla"
        else:
            try:
                from jax.experimental.pallas.ops.gpu import attention as pallas_attention

                _log_once("attention: pallas flash kernel")
                return pallas_attention.mha(q, k, v, segment_ids=None, sm_scale=scale).astype(q.dtype)
            except Exception as e:  # unsupported backend / jax version
                _log_once(f"attention: pallas unavailable ({type(e).__name__}); using xla")
                impl = "xla"
    if impl == "cudnn":
        if not low_precision or _backend() != "gpu":
            _log_once(f"attention: cudnn needs bf16/fp16 on GPU (dtype={q.dtype}, backend={_backend()}); using xla")
            impl = "xla"
        else:
            _log_once("attention: cudnn fused kernel")
            full_mask = None if m is None else jnp.broadcast_to(m, (B, m.shape[1], T, S))
            cb = None if bias is None else jnp.broadcast_to(jnp.asarray(bias, q.dtype), (B, H, T, S))
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias=cb, mask=full_mask,
                                               scale=scale, implementation="cudnn")
            if m is not None:
                out = jnp.where(_row_has_key(m, B, H, T), out, jnp.zeros((), out.dtype))
            return out.astype(q.dtype)
    out = _xla_attention(q, k, v, m, bias, scale)
    if m is not None:
        out = jnp.where(_row_has_key(m, B, H, T), out, 0.0)
    return out.astype(q.dtype)
