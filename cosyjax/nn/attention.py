"""The one attention function used by every attention layer (DiT, U-Net, Conformer, Qwen2).

`attention(q, k, v, mask=None, *, bias=None, q_lengths=None, kv_lengths=None, chunk_size=0, q_offset=None,
rel_pos=None, kv_cache=None, scale=None, implementation='auto') -> [B, T, H, D]`

* q: `[B, T, H, D]`; k, v: `[B, S, K, D]` with K dividing H (grouped-query attention: query head h
  uses key/value head h // (H // K)).
* mask: boolean, broadcastable to `[B, H, T, S]`, True = attend (`jax.nn.dot_product_attention`
  convention). `q_lengths` / `kv_lengths` (`[B]` int) add padding masks; `chunk_size` C > 0 adds the
  flows' streaming chunk mask (block-causal, full left context: query i sees key j iff
  j < (i // C + 1) * C) without the caller materialising `[T, S]`; `bias` is an additive float bias
  broadcastable to `[B, H, T, S]` (e.g. relative-position scores). All given masks are AND-ed.
* `q_offset` (traced int): the queries sit at absolute positions q_offset + [0, T) for the chunk rule
  (new frames against a key cache). `rel_pos` (`RelPos`): a relative-position score term
  q_r[i] . table[zero - (i_abs - j)] (the CV2 Conformer's `matrix_bd`) instead of a dense bias.
* `kv_cache` (`KVCache`): keys/values of positions [0, q_offset) read in place from a larger buffer
  (an incremental flow's per-step, per-layer cache); k, v are then only the new keys at q_offset +
  [0, S_new). The tiled path reads its key tiles straight from the buffer, so a call costs what the
  valid prefix costs, never a copy of the buffer; the other paths assemble the dense keys first.
* A query row whose keys are all masked (or a padded query row) returns exactly zeros, on every
  implementation — never NaN, never a uniform average of V.

`implementation` is `'<impl>'` or `'<impl>@<platform>'`; the platform part ('cpu' | 'gpu', 'cuda' is
an alias of 'gpu') names the target the decision is made for instead of `jax.default_backend()` —
needed when lowering for CUDA on a machine without a GPU (`bench/gpu_lowering.py` uses 'auto@gpu').
* `xla` — reference and CPU path: logits and softmax in float32 whatever the input dtype, masks
  applied with `where` and a finite minimum, denominators guarded. Never yields NaN/Inf. With a chunk
  rule (and no dense mask / bias) it runs in fixed-shape [C, C*4] tiles with an online softmax
  (`_xla_chunked_attention`): bit-identical rows with or without a cache, and with `q_offset` only the
  key blocks below the valid prefix are visited — what the flows' exact incremental streaming needs.
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

__all__ = ["attention", "AttnSpec", "KVCache", "KEY_BLOCKS_PER_TILE", "RelPos", "rel_shift", "attention_reference_mask", "block_causal_mask", "choose_implementation",
           "parse_implementation", "AttentionCall", "IMPLEMENTATIONS", "PLATFORMS", "XLA_SCOPE"]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "pallas_interpret")
PLATFORMS = ("cpu", "gpu", "tpu")
XLA_SCOPE = "cosyjax_xla_attention"  # jax.named_scope of the XLA path
CUDNN_MAX_HEAD_DIM = 128  # jax's cuDNN check allows 256 only on Hopper, which needs a device to ask
KEY_BLOCKS_PER_TILE = 4  # the tiled path's key tile = this many chunks (a KVCache capacity is a multiple)
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


class AttnSpec(NamedTuple):
    """Masking for a layer's `attention` calls, as a pytree that can ride through `nn.scan` (the chunk size
    stays a static module attribute): a dense boolean `mask`, and/or key lengths [B] and the absolute
    position of query 0 (a cache) for the chunk rule. `attention(..., **spec.kwargs(chunk))`."""

    mask: jax.Array | None = None
    kv_lengths: jax.Array | None = None
    q_offset: jax.Array | None = None

    def kwargs(self, chunk_size: int) -> dict:
        return {"mask": self.mask, "kv_lengths": self.kv_lengths, "q_offset": self.q_offset,
                "chunk_size": chunk_size}


class KVCache(NamedTuple):
    """Cached keys/values read in place: k, v [*lead, B, S, K*D]; `index` = len(lead) traced ints picking
    this call's [B, S, K*D] (e.g. (ODE step, layer)). S must be a multiple of the tiled path's key tile."""

    k: jax.Array
    v: jax.Array
    index: tuple

    def select(self, name: str, K: int, D: int) -> jax.Array:
        """The dense [B, S, K, D] slice (a copy: only for the paths that need dense keys)."""
        buf = getattr(self, name)
        n = len(self.index)
        z = jnp.int32(0)
        a = jax.lax.dynamic_slice(buf, tuple(jnp.asarray(i, jnp.int32) for i in self.index) + (z,) * (buf.ndim - n),
                                  (1,) * n + buf.shape[n:])
        return a.reshape(buf.shape[n:-1] + (K, D))


class RelPos(NamedTuple):
    """A relative-position score term (Espnet/Transformer-XL `matrix_bd`): score[i, j] gets
    q[b, i, h] . table[zero - (i_abs - j), h] (times `scale`, like q.k), i_abs = q_offset + i.
    q [B, T, H, D] (the query plus its position bias), table [R, H, D] (row `zero` = relative position 0,
    rows below it positive i - j); `zero` is a static int."""

    q: jax.Array
    table: jax.Array
    zero: int


def rel_shift(x: jax.Array) -> jax.Array:
    """[..., T, T+S-1] scores against consecutive relative-position rows -> [..., T, S], out[i, j] = x[i, T-1-i+j].

    Pure pads, reshapes and slices (upstream's zero-pad trick), no gather.
    """
    *lead, T, P = x.shape
    S = P - T + 1
    if S < 1:
        raise ValueError(f"rel_shift expects [..., T, T+S-1] with S >= 1, got {x.shape}")
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., T, P+1]
    x = x.reshape(*lead, T * (P + 1))[..., T:]  # dropping T entries shifts row i left by T-1-i
    return x.reshape(*lead, T, P)[..., :S]


def _rel_pos_dense_bias(rel: RelPos, S: int, q_offset, scale: float):
    """The RelPos term as a dense additive bias [B, H, T, S] (paths other than the tiled one)."""
    T = rel.q.shape[1]
    e = jnp.einsum("bthd,rhd->bhtr", rel.q, rel.table, preferred_element_type=jnp.float32)
    off = jnp.int32(0) if q_offset is None else jnp.asarray(q_offset, jnp.int32)
    idx = rel.zero - (off + jnp.arange(T, dtype=jnp.int32))[:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
    idx = jnp.clip(idx, 0, rel.table.shape[0] - 1)  # out-of-table pairs are masked by the caller
    e = jnp.take_along_axis(e, jnp.broadcast_to(idx, e.shape[:2] + idx.shape), axis=-1)
    return e * jnp.float32(scale)


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


def attention_reference_mask(B, H, T, S, mask=None, q_lengths=None, kv_lengths=None, chunk_size: int = 0,
                             q_offset=None):
    """The combined boolean mask `[B|1, H|1, T|1, S]` (or None) that `attention` applies."""
    m = None if mask is None else _check_mask(mask, B, H, T, S)
    if chunk_size:
        if q_offset is None:
            cm = block_causal_mask(T, S, chunk_size)[None, None]
        else:  # queries at absolute positions q_offset + [0, T)
            block_end = ((jnp.arange(T) + jnp.asarray(q_offset, jnp.int32)) // chunk_size + 1) * chunk_size
            cm = (jnp.arange(S)[None, :] < block_end[:, None])[None, None]
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


def _xla_chunked_attention(q, k, v, chunk, q_offset, q_lengths, kv_lengths, scale, rel=None,
                           key_blocks_per_tile=KEY_BLOCKS_PER_TILE, cache: KVCache | None = None):
    """Chunk-masked attention in [C, C] tiles: per query block, key blocks in order with an online softmax.

    q [B,T,H,D] at absolute positions q_offset + [0, T); k/v [B,S,K,D] at [0, S) -> [B,T,H,D] float32.
    Two properties the flows' streaming needs (`flow/cv3/incremental.py`):
    * Exact under padding and prefix caching: every tile op has the same shape whatever T and S are
      (query blocks are a loop, not a batch dim: merged rows change the CPU dot's blocking), tiles sit
      on the absolute C-grid, and a key block fully masked for a row leaves that row's (max, sum, acc)
      bit-identical (alpha = exp(0) = 1, additions of +0). So a query row gets the same bits whether it
      is computed among all frames (recompute) or among the new frames against a cache of any capacity.
    * With `q_offset` (a cache), a query block visits only key blocks below min(its chunk end, max kv
      length): a dynamic trip count, so cost follows the valid prefix, not the cache capacity. Without
      it every key block is visited (static loops, so training can differentiate through them).
    * With `cache` (needs `q_offset`): k/v hold only the new keys at q_offset + [0, S_new); a tile's keys
      below q_offset are sliced from the cache buffer itself and the rest from the new keys (a select
      per tile: the same values as the dense keys, so the same bits), so no copy of the buffer is made.
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    G, C = H // K, chunk
    CK = C * key_blocks_per_tile  # key tile: wider than the chunk, for fewer loop steps
    off = jnp.int32(0) if q_offset is None else jnp.asarray(q_offset, jnp.int32)
    if cache is None:
        S = k.shape[1]
        nK = -(-S // CK)
        kp = jnp.pad(k, ((0, 0), (0, nK * CK - S), (0, 0), (0, 0)))
        vp = jnp.pad(v, ((0, 0), (0, nK * CK - S), (0, 0), (0, 0)))

        def tile(j, name):
            return jax.lax.dynamic_slice_in_dim(kp if name == "k" else vp, j * CK, CK, axis=1)
    else:
        S = cache.k.shape[-2]
        if S % CK:
            raise CosyJaxError(f"a KVCache's capacity ({S}) must be a multiple of the {CK}-key tile")
        nK = S // CK
        n_lead = len(cache.index)
        lead = tuple(jnp.asarray(i, jnp.int32) for i in cache.index)
        # the new keys padded by a tile each side: a tile's window into them never clamps
        new = {n: jnp.pad(a.astype(cache.k.dtype), ((0, 0), (CK, CK), (0, 0), (0, 0))) for n, a in (("k", k), ("v", v))}
        below = (jnp.arange(CK, dtype=jnp.int32)[None, :, None, None])

        def tile(j, name):
            buf = cache.k if name == "k" else cache.v
            old = jax.lax.dynamic_slice(buf, lead + (jnp.int32(0), j * CK, jnp.int32(0)),
                                        (1,) * n_lead + (B, CK, K * D)).reshape(B, CK, K, D)
            fresh = jax.lax.dynamic_slice_in_dim(new[name], j * CK - off + CK, CK, axis=1)
            return jnp.where(j * CK + below < off, old, fresh)
    nQ = -(-T // C)
    qp = jnp.pad(q, ((0, 0), (0, nQ * C - T), (0, 0), (0, 0))).reshape(B, nQ, C, K, G, D)
    kv_len = jnp.full((B,), S, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32).reshape(B)
    kv_len = jnp.minimum(kv_len, S)
    q_len = jnp.full((B,), T, jnp.int32) if q_lengths is None else jnp.asarray(q_lengths, jnp.int32).reshape(B)
    arange_c, arange_k = jnp.arange(C, dtype=jnp.int32), jnp.arange(CK, dtype=jnp.int32)
    lowp = v.dtype != jnp.float32
    if rel is not None:  # per tile: its own C + CK - 1 table rows (fixed shapes: exact, like the rest)
        pad_r = C + CK  # the table padded so a tile's row window never leaves it (no clamped slices)
        table = jnp.pad(rel.table, ((pad_r, pad_r), (0, 0), (0, 0)))
        qr_all = jnp.pad(rel.q, ((0, 0), (0, nQ * C - T), (0, 0), (0, 0))).reshape(B, nQ, C, H, D)

    def q_block(i, qb, qr):  # qb [B, C, K, G, D], qr [B, C, H, D] | None -> [B, K, G, C, D]
        q_pos = off + i * C + arange_c  # absolute positions of this block's queries
        q_end = (q_pos // C + 1) * C  # keys below this are in the rows' chunks
        q_ok = (i * C + arange_c)[None, :] < q_len[:, None]  # [B, C]
        qb = jnp.transpose(qb, (0, 2, 3, 1, 4))  # [B, K, G, C, D]

        def k_block(j, carry):
            m, l, acc = carry  # [B,K,G,C], same, [B,K,G,C,D] float32
            kb = jnp.transpose(tile(j, "k"), (0, 2, 3, 1))  # [B,K,D,CK]
            vb = jnp.transpose(tile(j, "v"), (0, 2, 1, 3))  # [B,K,CK,D]
            s = jnp.einsum("bkgcd,bkds->bkgcs", qb, kb, preferred_element_type=jnp.float32) * jnp.float32(scale)
            if rel is not None:  # rows zero - (q_abs - k_abs) for this tile: a window of C + CK - 1
                first = rel.zero - (off + i * C + C - 1) + j * CK + pad_r
                rows = jax.lax.dynamic_slice_in_dim(table, first, C + CK - 1, axis=0)
                e = jnp.einsum("bchd,rhd->bhcr", qr, rows, preferred_element_type=jnp.float32)
                s = s + (rel_shift(e) * jnp.float32(scale)).reshape(B, K, G, C, CK)
            k_pos = j * CK + arange_k
            ok = (k_pos[None, None, :] < q_end[None, :, None]) & (k_pos[None, None, :] < kv_len[:, None, None])
            ok = (ok & q_ok[:, :, None])[:, None, None]  # [B,1,1,C,CK]
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
            alpha = jnp.exp(m - m_safe)  # 1 exactly when the block adds nothing; 0 while m = -inf
            pv = jnp.einsum("bkgcs,bksd->bkgcd", p.astype(v.dtype) if lowp else p, vb,
                            preferred_element_type=jnp.float32)
            return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

        shape = (B, K, G, C)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (D,), jnp.float32))
        n_needed = jnp.clip((jnp.minimum(jnp.max(kv_len), q_end[-1]) + CK - 1) // CK, 0, nK)
        if q_offset is not None:  # a dynamic trip count: no work past the valid prefix
            _, l, acc = jax.lax.fori_loop(0, n_needed, k_block, init)
        else:  # static (differentiable); blocks past the chunk end are skipped by a cond (an exact identity)
            _, l, acc = jax.lax.fori_loop(
                0, nK, lambda j, c: jax.lax.cond(j < n_needed, k_block, lambda _, c: c, j, c), init)
        return acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows with no key: acc = 0 -> zeros

    def scan_body(_, xs):
        i, qb, qr = xs
        return None, q_block(i, qb, qr)

    xs = (jnp.arange(nQ, dtype=jnp.int32), jnp.moveaxis(qp, 1, 0),
          None if rel is None else jnp.moveaxis(qr_all, 1, 0))
    _, out = jax.lax.scan(scan_body, None, xs)
    # out [nQ, B, K, G, C, D] -> [B, nQ*C, H, D]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(B, nQ * C, H, D)
    return out[:, :T]


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
              q_offset=None, rel_pos: RelPos | None = None, kv_cache: KVCache | None = None, scale=None,
              implementation: str = "auto"):
    """Scaled dot-product attention; q `[B,T,H,D]`, k/v `[B,S,K,D]` -> `[B,T,H,D]` (q's dtype)."""
    B, T, H, D, S, K = _check_shapes(q, k, v)
    if kv_cache is not None:
        n = len(kv_cache.index)
        want = (B, None, K * D)
        got = kv_cache.k.shape[n:]
        if q_offset is None or kv_cache.k.shape != kv_cache.v.shape or len(got) != 3 or \
                (got[0], got[2]) != (want[0], want[2]):
            raise CosyJaxError(f"kv_cache needs q_offset and k/v buffers [*lead, {B}, S, {K * D}] for "
                               f"{n} lead indices, got {kv_cache.k.shape} / {kv_cache.v.shape}")
        S = got[1]  # the key positions span the buffer
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
    tiled = impl == "xla" and chunk_size and mask is None and bias is None
    if kv_cache is not None and not tiled:  # dense keys: the cache slice with the new keys written in
        at = (jnp.int32(0), jnp.asarray(q_offset, jnp.int32), jnp.int32(0), jnp.int32(0))
        k = jax.lax.dynamic_update_slice(kv_cache.select("k", K, D), k.astype(kv_cache.k.dtype), at)
        v = jax.lax.dynamic_update_slice(kv_cache.select("v", K, D), v.astype(kv_cache.v.dtype), at)
        kv_cache = None
    if rel_pos is not None and not tiled:  # the other paths take the position term as a dense bias
        rb = _rel_pos_dense_bias(rel_pos, S, q_offset, scale)
        bias = rb if bias is None else bias + rb
        rel_pos = None
    if q_offset is not None and chunk_size and impl != "xla":  # the kernels' chunk rule starts at query 0
        mask = attention_reference_mask(B, H, T, S, mask, None, None, chunk_size, q_offset)
        chunk_size = 0
    if impl in ("pallas", "pallas_interpret"):
        return pa.flash_attention(q, k, v, mask=mask, bias=bias, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                  chunk_size=chunk_size, scale=scale, interpret=impl == "pallas_interpret")
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask, bias, q_lengths, kv_lengths, chunk_size, scale).astype(q.dtype)
    # The scope names the XLA path in lowered HLO, so bench/gpu_lowering.py can count unfused attentions.
    with jax.named_scope(XLA_SCOPE):
        if tiled:
            return _xla_chunked_attention(q, k, v, chunk_size, q_offset, q_lengths, kv_lengths, scale,
                                          rel_pos, cache=kv_cache).astype(q.dtype)
        m = attention_reference_mask(B, H, T, S, mask, q_lengths, kv_lengths, chunk_size, q_offset)
        out = _xla_attention(q, k, v, m, bias, scale)
        if m is not None:
            out = jnp.where(_row_has_key(m, B, H, T), out, 0.0)
    return out.astype(q.dtype)
