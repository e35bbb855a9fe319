"""The one attention function used by every attention layer (DiT, U-Net, Conformer, Qwen2).

`attention(q, k, v, mask=None, *, bias=None, q_lengths=None, kv_lengths=None, chunk_size=0, scale=None,
implementation='auto') -> [B, T, H, D]`

* q: `[B, T, H, D]`; k, v: `[B, S, K, D]` with K dividing H (grouped-query attention: query head h
  uses key/value head h // (H // K)).
* mask: boolean, broadcastable to `[B, H, T, S]`, True = attend (`jax.nn.dot_product_attention`
  convention). `q_lengths` / `kv_lengths` (`[B]` int) add padding masks; `chunk_size` C > 0 adds the
  flows' streaming chunk mask (block-causal, full left context: query i sees key j iff
  j < (i // C + 1) * C) without the caller materialising `[T, S]`; `bias` is an additive float bias
  broadcastable to `[B, H, T, S]` (e.g. relative-position scores). All given masks are AND-ed.
* A query row whose keys are all masked (or a padded query row) returns exactly zeros, on every
  implementation — never NaN, never a uniform average of V.

`implementation` is `'<impl>'` or `'<impl>@<platform>'`; the platform part ('cpu' | 'gpu', 'cuda' is
an alias of 'gpu') names the target the decision is made for instead of `jax.default_backend()` —
needed when lowering for CUDA on a machine without a GPU (`bench/gpu_lowering.py` uses 'auto@gpu').
* `xla` — reference and CPU path: logits and softmax in float32 whatever the input dtype, masks
  applied with `where` and a finite minimum, denominators guarded. Never yields NaN/Inf.
* `cudnn` — `jax.nn.dot_product_attention(implementation='cudnn')`: GPU, bf16/fp16, head dim a
  multiple of 8 and <= 128. Lengths alone go to cuDNN's padding mask; any other mask is broadcast to
  a full `[B, 1|H, T, S]` mask (cuDNN rejects `[B, 1, 1, S]`) and added as a bias.
* `pallas` — the project's Pallas flash kernel (`cosyjax.nn.pallas_attention`, Triton backend): GPU,
  any float dtype, GQA, lengths, chunk masks with key-block skipping, dense masks, bias.
  `pallas_interpret` runs the same kernel in Pallas interpret mode (any backend; slow; for tests).
* `auto` — on a GPU: the Pallas kernel for chunk masks (it skips fully masked key blocks), else cuDNN
  where its rules allow, else the Pallas kernel, else xla; one-row queries (decode steps) and every
  non-GPU target use xla. The path taken is logged once per distinct reason (logger
  `cosyjax.attention`).
An explicit `cudnn` / `pallas` that cannot serve the call raises `CapabilityError` with the reason.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cosyjax.errors import CapabilityError, CosyJaxError
from cosyjax.nn import pallas_attention as pa

__all__ = ["attention", "attention_reference_mask", "block_causal_mask", "choose_implementation",
           "parse_implementation", "AttentionCall", "IMPLEMENTATIONS", "PLATFORMS", "XLA_SCOPE"]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "pallas_interpret")
PLATFORMS = ("cpu", "gpu", "tpu")
XLA_SCOPE = "cosyjax_xla_attention"  # jax.named_scope of the XLA path
CUDNN_MAX_HEAD_DIM = 128  # jax's cuDNN check allows 256 only on Hopper, which needs a device to ask
_LOG = logging.getLogger("cosyjax.attention")
_LOGGED: set[str] = set()  # once-per-message de-dup of trace-time logging; never holds traced values


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        _LOG.info(msg)


class AttentionCall(NamedTuple):
    """The static facts a path choice depends on (all Python values; nothing traced)."""

    platform: str
    dtype: str
    T: int
    S: int
    H: int
    K: int
    D: int
    mask_shape: tuple | None
    has_bias: bool
    has_lengths: bool
    chunk_size: int


def parse_implementation(implementation: str) -> tuple[str, str | None]:
    """'pallas@gpu' -> ('pallas', 'gpu'); 'auto' -> ('auto', None). Raises on unknown names."""
    if not isinstance(implementation, str):
        raise CosyJaxError(f"attention implementation must be a string, got {implementation!r}")
    impl, _, platform = implementation.partition("@")
    if impl not in IMPLEMENTATIONS:
        raise CosyJaxError(f"unknown attention implementation {implementation!r} (one of {IMPLEMENTATIONS}, "
                           f"optionally '@cpu' / '@gpu')")
    if not platform:
        return impl, None
    platform = "gpu" if platform == "cuda" else platform
    if platform not in PLATFORMS:
        raise CosyJaxError(f"unknown attention target platform {platform!r} in {implementation!r} "
                           f"(one of {PLATFORMS} or 'cuda')")
    return impl, platform


def cudnn_unsupported_reason(c: AttentionCall) -> str | None:
    """Why cuDNN flash attention cannot serve `c` (None when it can)."""
    if c.platform != "gpu":
        return f"cudnn needs a GPU (target platform {c.platform})"
    if c.dtype not in ("bfloat16", "float16"):
        return f"cudnn needs bf16/fp16 (dtype {c.dtype})"
    if c.D % 8 or c.D > CUDNN_MAX_HEAD_DIM:
        return f"cudnn needs a head dim that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM} (got {c.D})"
    return None


def pallas_unsupported_reason(c: AttentionCall, interpret: bool) -> str | None:
    """Why the project's Pallas kernel cannot serve `c` (None when it can)."""
    if not interpret and c.platform != "gpu":
        return (f"the pallas kernel compiles only for GPU (target platform {c.platform}); "
                "'pallas_interpret' runs it in interpret mode")
    return pa.flash_unsupported_reason((1, c.T, c.H, c.D), (1, c.S, c.K, c.D), c.dtype, mask_shape=c.mask_shape)


def choose_implementation(implementation: str, c: AttentionCall) -> tuple[str, str]:
    """(path, reason) for a request; explicit cudnn/pallas that cannot serve `c` raise CapabilityError."""
    impl, _ = parse_implementation(implementation)
    if impl == "xla":
        return "xla", "requested"
    if impl in ("pallas", "pallas_interpret"):
        why = pallas_unsupported_reason(c, impl == "pallas_interpret")
        if why:
            raise CapabilityError(f"attention implementation {implementation!r} cannot run: {why}")
        return impl, "requested"
    if impl == "cudnn":
        why = cudnn_unsupported_reason(c)
        if why:
            raise CapabilityError(f"attention implementation {implementation!r} cannot run: {why}")
        return "cudnn", "requested"
    if c.platform != "gpu":
        return "xla", f"target platform {c.platform}"
    if c.T == 1:
        return "xla", "single query row (decode step): a matrix-vector product, no fused kernel needed"
    pallas_why = pallas_unsupported_reason(c, False)
    if c.chunk_size and not pallas_why:
        return "pallas", f"chunk mask (chunk {c.chunk_size}): pallas skips fully masked key blocks"
    cudnn_why = cudnn_unsupported_reason(c)
    if not cudnn_why:
        return "cudnn", f"{c.dtype}, head dim {c.D}"
    if not pallas_why:
        return "pallas", cudnn_why
    return "xla", f"{cudnn_why}; {pallas_why}"


def block_causal_mask(T: int, S: int, chunk: int):
    """[T, S] bool: query i sees key j iff j < (i // chunk + 1) * chunk (upstream `subsequent_chunk_mask`)."""
    if chunk <= 0:
        raise CosyJaxError(f"chunk size must be positive, got {chunk}")
    block_end = (jnp.arange(T) // chunk + 1) * chunk
    return jnp.arange(S)[None, :] < block_end[:, None]


def _check_mask(mask, B, H, T, S):
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    if mask.ndim != 4:
        raise ValueError(f"attention mask must have 4 dims broadcastable to [B,H,T,S], got {mask.shape}")
    for got, want, name in zip(mask.shape, (B, H, T, S), "BHTS"):
        if got not in (1, want):
            raise ValueError(f"attention mask shape {mask.shape} does not broadcast to {(B, H, T, S)} "
                             f"(axis {name})")
    return mask


def _check_bias(bias, B, H, T, S):
    bias = jnp.asarray(bias)
    if bias.ndim != 4 or any(got not in (1, want) for got, want in zip(bias.shape, (B, H, T, S))):
        raise ValueError(f"attention bias shape {bias.shape} does not broadcast to {(B, H, T, S)}")
    return bias


def attention_reference_mask(B, H, T, S, mask=None, q_lengths=None, kv_lengths=None, chunk_size: int = 0):
    """The combined boolean mask `[B|1, H|1, T|1, S]` (or None) that `attention` applies."""
    m = None if mask is None else _check_mask(mask, B, H, T, S)
    if chunk_size:
        cm = block_causal_mask(T, S, chunk_size)[None, None]
        m = cm if m is None else m & cm
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
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} disagree on [B, S, K]")
    if k.shape[0] != B or k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"k {k.shape} / v {v.shape} do not match q {q.shape} on batch or head dim")
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
    """mask [B|1, H|1, T|1, S] -> [B, T, H, 1] bool: False where a query row attends to nothing."""
    any_s = jnp.broadcast_to(jnp.any(mask, axis=-1), (B, H, T))
    return jnp.transpose(any_s, (0, 2, 1))[..., None]


def _cudnn_attention(q, k, v, mask, bias, q_lengths, kv_lengths, chunk_size, scale):
    B, T, H, D = q.shape
    S = k.shape[1]
    lengths_only = mask is None and not chunk_size
    m = attention_reference_mask(B, H, T, S, mask, None if lengths_only else q_lengths,
                                 None if lengths_only else kv_lengths, chunk_size)
    full_mask = None if m is None else jnp.broadcast_to(m, (B, m.shape[1], T, S))
    cb = None if bias is None else jnp.broadcast_to(jnp.asarray(bias, q.dtype),
                                                    (bias.shape[0], bias.shape[1], T, S))
    ql = kvl = None
    if lengths_only and (q_lengths is not None or kv_lengths is not None):
        ql = None if q_lengths is None else jnp.asarray(q_lengths, jnp.int32).reshape(B)
        kvl = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32).reshape(B)
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias=cb, mask=full_mask,
                                       scale=scale, query_seq_lengths=ql, key_value_seq_lengths=kvl,
                                       implementation="cudnn")
    keep = attention_reference_mask(B, H, T, S, mask, q_lengths, kv_lengths, chunk_size)
    if keep is not None:  # cuDNN averages V over fully masked rows; the contract says zeros
        out = jnp.where(_row_has_key(keep, B, H, T), out, jnp.zeros((), out.dtype))
    return out


def attention(q, k, v, mask=None, *, bias=None, q_lengths=None, kv_lengths=None, chunk_size: int = 0,
              scale=None, implementation: str = "auto"):
    """Scaled dot-product attention; q `[B,T,H,D]`, k/v `[B,S,K,D]` -> `[B,T,H,D]` (q's dtype)."""
    B, T, H, D, S, K = _check_shapes(q, k, v)
    impl_name, platform = parse_implementation(implementation)
    chunk_size = int(chunk_size)
    if chunk_size < 0:
        raise CosyJaxError(f"chunk_size must be >= 0, got {chunk_size}")
    if mask is not None:
        mask = _check_mask(mask, B, H, T, S)
    if bias is not None:
        bias = _check_bias(bias, B, H, T, S)
    scale = float(D) ** -0.5 if scale is None else float(scale)
    call = AttentionCall(platform or jax.default_backend(), str(jnp.dtype(q.dtype)), T, S, H, K, D,
                         None if mask is None else tuple(mask.shape), bias is not None,
                         q_lengths is not None or kv_lengths is not None, chunk_size)
    impl, reason = choose_implementation(implementation, call)
    _log_once(f"attention: {impl} ({reason}; requested {implementation!r}, {call.dtype}, H={H} K={K} D={D})")
    if impl in ("pallas", "pallas_interpret"):
        return pa.flash_attention(q, k, v, mask=mask, bias=bias, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                  chunk_size=chunk_size, scale=scale, interpret=impl == "pallas_interpret")
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask, bias, q_lengths, kv_lengths, chunk_size, scale).astype(q.dtype)
    # The scope names the XLA path in lowered HLO, so bench/gpu_lowering.py can count unfused attentions.
    with jax.named_scope(XLA_SCOPE):
        m = attention_reference_mask(B, H, T, S, mask, q_lengths, kv_lengths, chunk_size)
        out = _xla_attention(q, k, v, m, bias, scale)
        if m is not None:
            out = jnp.where(_row_has_key(m, B, H, T), out, 0.0)
    return out.astype(q.dtype)
