"""The project's Pallas flash-attention kernel (forward only): online softmax in float32 over key blocks.

`flash_attention(q, k, v, *, mask=None, bias=None, q_lengths=None, kv_lengths=None, chunk_size=0,
scale, blocks=FlashBlocks(), interpret=False, precision=None) -> [B, T, H, D]`

* q `[B, T, H, D]`, k/v `[B, S, K, D]`, K | H (grouped-query: query head h reads key head h // (H // K)).
* `kv_lengths` / `q_lengths` `[B]` int: keys >= kv_length are masked, query rows >= q_length return 0.
* `chunk_size` C > 0: the flows' streaming chunk mask (block-causal, full left context): query i sees
  key j iff j < (i // C + 1) * C. Key blocks beyond a query block's last visible key (chunk end or
  key length) are never loaded: the key loop's trip count is computed per query block.
* `mask`: a dense boolean mask broadcastable to `[B, H, T, S]` (B, H and T axes may be 1), the general
  fallback; `bias`: additive, broadcastable to `[B, H, T, S]` (B, H, T axes may be 1), added in float32.
* A query row with no visible key returns exactly zeros (its softmax denominator stays 0).

Backend: `pl.pallas_call` with Triton compiler parameters, so on CUDA it lowers to one Triton
custom call per call site. Mosaic GPU is not used: in jax 0.10 `pallas_call` on Mosaic GPU is
deprecated in favour of `plgpu.kernel` (a different, Hopper-only programming model with explicit
warpgroup/TMA pipelining), and it has no CPU interpret mode for this kernel. On CPU the kernel runs
with `interpret=True` (tests); `interpret=False` on CPU raises inside jax's lowering.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from cosyjax.errors import CapabilityError

__all__ = ["FlashBlocks", "flash_attention", "flash_unsupported_reason", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256  # one [block, D] tile per operand must fit in registers/shared memory
_NEG = float(jnp.finfo(jnp.float32).min)  # finite: exp(NEG - NEG) never makes NaN


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tile sizes (powers of two, >= 16 for Triton's dot) and Triton launch parameters."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if b < 1 or b & (b - 1):
                raise CapabilityError(f"FlashBlocks.{name} must be a power of two, got {b}")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def flash_unsupported_reason(q_shape, k_shape, dtype, *, mask_shape=None, bias_shape=None) -> str | None:
    """Why the kernel cannot serve these operands (None when it can); shapes as in `flash_attention`."""
    B, T, H, D = q_shape
    K = k_shape[2]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (needs float32/bfloat16/float16)"
    if D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    if K == 0 or H % K:
        return f"query heads {H} not a multiple of key/value heads {K}"
    for name, shape in (("mask", mask_shape), ("bias", bias_shape)):
        if shape is not None and len(shape) != 4:
            return f"{name} must have 4 dims, got {tuple(shape)}"
    return None


def _dense_operand(x, B, H, T, S, Tp, Sp, fill, dtype):
    """x broadcastable to [B,H,T,S] -> padded [B|1, H|1, Tp|1, Sp] (the size-1 B/H/T axes stay 1)."""
    x = jnp.asarray(x)
    b, h, t, _ = x.shape
    x = jnp.broadcast_to(x, (b, h, t, S)).astype(dtype)
    pad_t = 0 if t == 1 else Tp - T
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad_t), (0, Sp - S)), constant_values=fill)


def _dense_spec(x, bq, G, Sp):
    """BlockSpec for a padded dense operand: one [bq|1, Sp] row band per (batch, query head, q block)."""
    b1, h1, t1 = x.shape[0] == 1, x.shape[1] == 1, x.shape[2] == 1

    def index(b, h, i):
        return (0 if b1 else b, 0 if h1 else h, 0 if t1 else i, 0)

    return pl.BlockSpec((None, None, 1 if t1 else bq, Sp), index)


def _kernel(qlen_ref, kvlen_ref, q_ref, k_ref, v_ref, *rest, has_mask, has_bias, chunk, scale, bq, bk,
            precision):
    """One (batch, query head, query block): q [bq, Dp] against key blocks [bk, Dp] -> o [bq, Dp]."""
    rest = list(rest)
    mask_ref = rest.pop(0) if has_mask else None
    bias_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    i = pl.program_id(2)
    q_len = qlen_ref[...]
    kv_len = kvlen_ref[...]
    q0 = i * bq
    rows = q0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    # Last visible key + 1 for this block's last real query row: bounds the key loop.
    kv_end = kv_len
    if chunk:
        last_row = jnp.minimum(q0 + bq, q_len) - 1
        kv_end = jnp.minimum(kv_end, (lax.div(jnp.maximum(last_row, 0), chunk) + 1) * chunk)
    n_blocks = jnp.where(q_len > q0, lax.div(kv_end + (bk - 1), bk), 0)
    row_limit = kv_len if not chunk else jnp.minimum(kv_len, (lax.div(rows, chunk) + 1) * chunk)  # [bq,1]
    row_ok = rows < q_len
    q = q_ref[...]
    Dp = q.shape[-1]

    def body(j, carry):
        acc, m, l = carry
        k0 = j * bk
        kb = k_ref[pl.ds(k0, bk), :]
        vb = v_ref[pl.ds(k0, bk), :]
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * jnp.float32(scale)
        cols = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        valid = (cols < row_limit) & row_ok
        if has_bias:
            s = s + bias_ref[:, pl.ds(k0, bk)].astype(jnp.float32)
        if has_mask:
            valid = valid & (mask_ref[:, pl.ds(k0, bk)] != 0)
        s = jnp.where(valid, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        return alpha * acc + pv, m_new, l

    init = (jnp.zeros((bq, Dp), jnp.float32), jnp.full((bq, 1), _NEG, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, _, l = lax.fori_loop(0, n_blocks, body, init)
    out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def flash_attention(q, k, v, *, mask=None, bias=None, q_lengths=None, kv_lengths=None, chunk_size: int = 0,
                    scale: float | None = None, blocks: FlashBlocks = FlashBlocks(), interpret: bool = False,
                    precision=None):
    """q `[B,T,H,D]`, k/v `[B,S,K,D]` -> `[B,T,H,D]` (q's dtype); see the module docstring.

    `precision` is the kernel's dot precision; None means `HIGHEST` (IEEE fp32 on Triton, not TF32)
    for float32 operands and `DEFAULT` for bf16/fp16.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    why = flash_unsupported_reason(q.shape, k.shape, q.dtype, mask_shape=None if mask is None else jnp.shape(mask),
                                   bias_shape=None if bias is None else jnp.shape(bias))
    if why:
        raise CapabilityError(f"pallas flash attention: {why}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise CapabilityError(f"pallas flash attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
    if chunk_size < 0:
        raise CapabilityError(f"chunk_size must be >= 0, got {chunk_size}")
    G = H // K
    scale = D ** -0.5 if scale is None else float(scale)
    if precision is None:
        precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    bq = min(blocks.block_q, _pow2_at_least(T, 16))
    bk = min(blocks.block_k, _pow2_at_least(S, 16))
    Tp, Sp, Dp = _round_up(T, bq), _round_up(S, bk), _pow2_at_least(D, 16)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D)))
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    full = lambda n, x: jnp.full((B,), n, jnp.int32) if x is None else jnp.clip(  # noqa: E731
        jnp.asarray(x, jnp.int32).reshape(B), 0, n)
    qlen, kvlen = full(T, q_lengths), full(S, kv_lengths)

    scalar = pl.BlockSpec((None,), lambda b, h, i: (b,))
    in_specs = [scalar, scalar,
                pl.BlockSpec((None, bq, None, Dp), lambda b, h, i: (b, i, h, 0)),
                pl.BlockSpec((None, Sp, None, Dp), lambda b, h, i: (b, 0, h // G, 0)),
                pl.BlockSpec((None, Sp, None, Dp), lambda b, h, i: (b, 0, h // G, 0))]
    operands = [qlen, kvlen, q, k, v]
    if mask is not None:
        if jnp.asarray(mask).dtype != jnp.bool_:
            raise CapabilityError(f"pallas flash attention: mask must be boolean, got {jnp.asarray(mask).dtype}")
        # int8, not bool: Triton stores i1 tensors as bytes anyway, and int8 loads lower everywhere.
        mk = _dense_operand(mask, B, H, T, S, Tp, Sp, 0, jnp.int8)
        operands.append(mk)
        in_specs.append(_dense_spec(mk, bq, G, Sp))
    if bias is not None:
        bdt = jnp.float32 if jnp.asarray(bias).dtype == jnp.float32 else q.dtype
        bs = _dense_operand(bias, B, H, T, S, Tp, Sp, 0, bdt)
        operands.append(bs)
        in_specs.append(_dense_spec(bs, bq, G, Sp))

    kernel = lambda *refs: _kernel(  # noqa: E731
        *refs, has_mask=mask is not None, has_bias=bias is not None, chunk=int(chunk_size), scale=scale,
        bq=bq, bk=bk, precision=precision)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, Dp), q.dtype),
        grid=(B, H, Tp // bq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, Dp), lambda b, h, i: (b, i, h, 0)),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="cosyjax_flash_attention",
    )(*operands)
    return out[:, :T, :, :D]

