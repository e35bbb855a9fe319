"""CosyVoice3 flow estimator: DiT (upstream `cosyvoice/flow/DiT/dit.py:DiT`, `DiT/modules.py`).

`DiT(cfg)(x, mask, mu, t, spks, cond, streaming=...) -> v [B, T, mel_dim]` (float32), with x, mu,
cond `[B, T, 80]`, mask `[B, T]` bool (True = valid frame) or None (no masking at all), t `[B]`
flow time in [0, 1], spks `[B, 80]`.

Layout (time-major, `D = dim`):
1. temb = Linear(D) . SiLU . Linear(D) (sinusoid_256(1000 t))                       [B, D]
2. e = Linear(D)([x, cond, mu, spks])  (this concat order; PITFALLS 7); e += convpos(e), where
   convpos = 2 x (left-pad k-1, grouped Conv1d(k=31, groups=16), Mish)              [B, T, D]
3. depth x DiTBlock (AdaLN-zero; shift/scale/gate x 2 from Linear(6D)(SiLU(temb))):
   x += gate_msa * Attn(LN(x)(1 + scale_msa) + shift_msa)
   x += gate_mlp * FF(LN(x)(1 + scale_mlp) + shift_mlp),  FF = Linear . tanh-GELU . Linear
   Attn: q/k/v Linear (bias), RoPE on the first `dim_head` channels of the flattened q/k only,
   i.e. head 0 (x-transformers partial rotary, interleaved pairs), softmax(qk^T / sqrt(dh)),
   Linear out; rows of padded frames are zeroed after the output projection.
4. final AdaLN with (scale, shift) order, LN eps 1e-6 without affine, Linear(D -> 80).
   The output is NOT multiplied by the mask (upstream does not).

Incremental (cached) calls: `DiT(cfg)(x, None, mu, t, spks, cond, streaming=True, cache=DiTCache(...))`
runs only the new frames x [B, F, 80] at absolute positions `cache.start + [0, F)` against the
keys/values of the earlier frames and the conv-pos left context; it returns `(v [B, F, 80],
DiTCacheUpdate)`. The keys are read in place from the whole cache buffer (`cache.k/v [n_steps, depth,
B, S, inner]` at ODE step `cache.step`, `attention(..., kv_cache=...)`): nothing proportional to the
cache capacity is copied. With the block-causal mask and `start` on a chunk boundary this equals the
full pass on the valid frames.

Precision: `dtype` is the matmul/conv compute dtype (float32 or bfloat16); the residual stream,
LayerNorms, AdaLN modulation, time embedding, RoPE tables, softmax and the output projection
stay float32. Blocks are stacked with `nn.scan` (parameters carry a leading `depth` axis).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.inputs import FlowInputError
from cosyjax.flow.masks import attention_mask, fix_empty_rows
from cosyjax.nn.attention import AttnSpec, KVCache, attention
from cosyjax.nn.layers import layer_norm as _layer_norm
from cosyjax.nn.layers import mish, sinusoidal_embedding, valid_conv

__all__ = ["DiT", "DiTBlock", "DiTCache", "DiTCacheUpdate", "rope_inv_freq", "rope_tables",
           "apply_rope_interleaved", "timestep_sinusoid",
           "layer_norm", "mish"]

LN_EPS = 1e-6


def layer_norm(x, eps: float = LN_EPS):
    """LayerNorm over the last axis without affine, float32 statistics (`cosyjax.nn.layers.layer_norm`, eps 1e-6)."""
    return _layer_norm(x, eps)


timestep_sinusoid = sinusoidal_embedding  # `SinusPositionEmbedding` (256-d, scale 1000): the shared layer


def rope_inv_freq(dim_head: int, base: float = 10000.0) -> np.ndarray:
    """x-transformers `RotaryEmbedding.inv_freq` = 1 / base^(arange(0, d, 2) / d) -> float32 [d/2]."""
    exps = (np.arange(0, dim_head, 2, dtype=np.float32) / np.float32(dim_head)).astype(np.float32)
    return (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)


def rope_tables(T: int, dim_head: int, base: float = 10000.0, start=0):
    """(cos, sin) float32 [T, dim_head] for positions start + [0, T) (start: int, may be traced), with
    interleaved duplicated angles [n w0, n w0, n w1, n w1, ...]."""
    inv = jnp.asarray(rope_inv_freq(dim_head, base))
    pos = jnp.arange(T, dtype=jnp.int32) + jnp.asarray(start, jnp.int32)
    ang = pos.astype(jnp.float32)[:, None] * inv[None, :]
    ang = jnp.repeat(ang, 2, axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope_interleaved(x, cos, sin):
    """x [B, T, d] rotated in GPT-J pairs (2m, 2m+1) in float32; cos/sin [T, d]; returns x's dtype."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(xf.shape[:-1] + (-1, 2))
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos + rot * sin).astype(x.dtype)


class DiTCache(NamedTuple):
    """What an incremental DiT call needs about the earlier frames (one ODE step, all CFG rows)."""

    k: jax.Array  # [n_steps, depth, B, S, inner] keys after RoPE of frames < start (S = capacity; rest ignored)
    v: jax.Array  # [n_steps, depth, B, S, inner] values
    step: jax.Array  # int32 scalar: the ODE step whose keys/values this call reads
    conv_in: jax.Array  # [B, K-1, D] float32: the last K-1 inputs of conv_pos_1 before start (zeros at 0)
    conv_mid: jax.Array  # [B, K-1, D] float32: the last K-1 inputs of conv_pos_2 before start
    start: jax.Array  # int32 scalar: absolute frame index of x[:, 0]
    n_valid: jax.Array  # int32 scalar: x[:, :n_valid] are real frames, the rest bucket padding


class DiTCacheUpdate(NamedTuple):
    """The new frames' contribution: k/v [depth, B, F, inner] and the conv contexts after the valid frames."""

    k: jax.Array
    v: jax.Array
    conv_in: jax.Array  # [B, K-1, D]
    conv_mid: jax.Array  # [B, K-1, D]


class DiTBlock(nn.Module):
    """One AdaLN-zero transformer block for `nn.scan`: (x [B,T,D] f32, ctx, layer) -> (x, new kv).

    layer = None (full pass: keys are the T frames themselves; returns None) or this block's index in
    the stack (a cached call: ctx carries the `DiTCache`; the T new frames attend to the cached keys
    below `start` and to themselves, and their k/v [B, T, inner] are returned for the cache).
    """

    dim: int
    heads: int
    dim_head: int
    ff_mult: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    chunk_size: int = 0  # streaming: the block-causal chunk (frames); 0 = full attention

    @nn.compact
    def __call__(self, x, ctx, layer=None):
        temb, cos, sin, attn, row_keep, cache = ctx
        B, T, _ = x.shape
        H, dh = self.heads, self.dim_head
        inner = H * dh
        mod = nn.Dense(6 * self.dim, name="attn_norm")(nn.silu(temb))  # f32, [B, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 6, axis=-1)

        h = layer_norm(x) * (1 + scale_msa) + shift_msa
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        q = dense(inner, "to_q")(h)
        k = dense(inner, "to_k")(h)
        v = dense(inner, "to_v")(h)
        # x-transformers rotates only the first rot_dim = dim_head channels of the flattened
        # projection, i.e. head 0 (upstream `DiT/modules.py:AttnProcessor`; PITFALLS 5).
        q = jnp.concatenate([apply_rope_interleaved(q[..., :dh], cos, sin), q[..., dh:]], axis=-1)
        k = jnp.concatenate([apply_rope_interleaved(k[..., :dh], cos, sin), k[..., dh:]], axis=-1)
        kv_cache = None
        if layer is not None:
            k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
            kv_cache = KVCache(cache.k, cache.v, (cache.step, layer))
        a = attention(q.reshape(B, T, H, dh), k.reshape(B, T, H, dh), v.reshape(B, T, H, dh),
                      **attn.kwargs(self.chunk_size), kv_cache=kv_cache, implementation=self.attention_impl)
        a = dense(self.dim, "to_out")(a.reshape(B, T, inner)).astype(jnp.float32)
        if row_keep is not None:
            a = jnp.where(row_keep[:, :, None], a, 0.0)  # upstream masked_fill(~mask[:, 0, -1], 0)
        x = x + gate_msa * a

        h = layer_norm(x) * (1 + scale_mlp) + shift_mlp
        f = dense(self.dim * self.ff_mult, "ff_in")(h)
        f = jax.nn.gelu(f.astype(jnp.float32), approximate=True).astype(self.dtype)
        f = dense(self.dim, "ff_out")(f).astype(jnp.float32)
        return x + gate_mlp * f, (None if layer is None else (k, v))


class DiT(nn.Module):
    """DiT velocity estimator; see the module docstring for shapes."""

    cfg: FlowCV3Config
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask, mu, t, spks, cond, streaming: bool = False, cache: Optional[DiTCache] = None):
        c = self.cfg
        B, T, _ = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (B,))
        temb = timestep_sinusoid(t, c.time_freq_dim)
        temb = nn.Dense(c.dim, name="time_mlp_0")(temb)
        temb = nn.Dense(c.dim, name="time_mlp_2")(nn.silu(temb))

        feats = [x, cond, mu]
        if c.spk_dim > 0:
            feats.append(jnp.broadcast_to(spks[:, None, :], (B, T, spks.shape[-1])))
        feats = [f.astype(jnp.float32) for f in feats]
        e = nn.Dense(c.dim, dtype=self.dtype, name="input_proj")(jnp.concatenate(feats, axis=-1))
        e = e.astype(jnp.float32)
        k = c.conv_pos_kernel
        p = e
        contexts = (None, None) if cache is None else (cache.conv_in, cache.conv_mid)
        new_contexts = []
        for name, left in zip(("conv_pos_1", "conv_pos_2"), contexts):
            if left is None:
                p = jnp.pad(p, ((0, 0), (k - 1, 0), (0, 0)))
            else:
                p = jnp.concatenate([left.astype(p.dtype), p], axis=1)
                # the last k-1 inputs up to the last valid frame: the next call's left context
                new_contexts.append(jax.lax.dynamic_slice_in_dim(p, cache.n_valid, k - 1, axis=1))
            # chunks that exact incremental streaming compares: length-independent bits
            p = valid_conv(c.dim, k, c.conv_pos_groups, self.dtype, row_stable=streaming, name=name)(p)
            p = mish(p.astype(jnp.float32))
        h = e + p

        start = 0 if cache is None else jnp.asarray(cache.start, jnp.int32)
        cos, sin = rope_tables(T, c.dim_head, c.rope_base, start)
        layers = None
        chunk = c.static_chunk_size if streaming else 0
        # Streaming: the chunk rule and key lengths go to `attention` as such (not a dense [T, S] mask):
        # its tiled path gives bit-identical rows with or without a cache, and skips keys past the valid
        # prefix. `mask` is a length (prefix) mask, as every caller builds it (`padding_mask`).
        if cache is not None:
            if mask is not None:
                raise FlowInputError("DiT: pass mask=None with a cache (key validity comes from cache.start/n_valid)")
            if not chunk:  # full attention would let earlier frames see the new ones: nothing to keep
                raise FlowInputError("DiT: a cache needs the streaming chunk mask (streaming=True, "
                                     "static_chunk_size > 0)")
            row_keep = jnp.broadcast_to(jnp.arange(T)[None, :] < cache.n_valid, (B, T))
            layers = jnp.arange(c.depth, dtype=jnp.int32)
            attn = AttnSpec(None, jnp.broadcast_to(start + cache.n_valid, (B,)), start)
        elif mask is None:
            row_keep = None
            attn = AttnSpec(None, None, None)
        else:
            mask = jnp.asarray(mask, jnp.bool_)
            row_keep = fix_empty_rows(mask)  # = upstream's mask[:, 0, -1] (last query row)
            if chunk:
                attn = AttnSpec(None, jnp.sum(mask, axis=-1, dtype=jnp.int32), None)
            else:
                attn = AttnSpec(attention_mask(mask, 0), None, None)

        blocks = nn.scan(DiTBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, 0), length=c.depth)
        h, new_kv = blocks(c.dim, c.heads, c.dim_head, c.ff_mult, self.dtype, self.attention_impl, chunk,
                           name="blocks")(h, (temb, cos, sin, attn, row_keep, cache), layers)

        mod = nn.Dense(2 * c.dim, name="norm_out")(nn.silu(temb))
        scale, shift = jnp.split(mod[:, None, :], 2, axis=-1)  # (scale, shift) order (PITFALLS 6)
        h = layer_norm(h) * (1 + scale) + shift
        out = nn.Dense(c.mel_dim, name="proj_out")(h).astype(jnp.float32)
        if cache is None:
            return out
        return out, DiTCacheUpdate(new_kv[0], new_kv[1], new_contexts[0], new_contexts[1])
