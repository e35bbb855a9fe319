"""CosyVoice2 CFM estimator: `CausalConditionalDecoder` (upstream `flow/decoder.py`, blocks from
Matcha-TTS `models/components/decoder.py` and `transformer.py`).

(x, mu, cond [B, T, 80], mask [B, T] bool, t [B], spks [B, 80]) -> v [B, T, 80] (zero on padded frames).

Single resolution level (CosyVoice2 has `channels = [C]`):
  temb = time_mlp(sinusoid_320(1000 t))
  h = [x, mu, spks, cond] (channel concat)
  down:  CausalResnetBlock1D(in -> C), n x BasicTransformerBlock(C), CausalConv1d(C, k=3) (skip kept before it)
  mid:   num_mid x (CausalResnetBlock1D(C -> C), n x BasicTransformerBlock(C))
  up:    [h, skip] -> CausalResnetBlock1D(2C -> C), n x BasicTransformerBlock(C), CausalConv1d(C, k=3)
  final: CausalBlock1D(C -> C) -> Conv1d(C -> 80, k=1) -> x mask
Repeated blocks are `nn.scan`ned (one traced copy; parameters carry leading block axes:
`down_transformers` / `up_transformers` [n_blocks, ...], `mid_blocks` [num_mid, ...] with its
`transformers` [num_mid, n_blocks, ...]).
Attention masks: key padding, AND the block-causal chunk mask (50 frames) when streaming. Upstream
adds a -1e10 bias for masked keys; here the same mask goes to `attention` as a boolean, which
gives identical weights on every row that has a valid key and stays finite in any dtype.
"""
from __future__ import annotations


from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.flow.cv2.config import UNetConfig
from cosyjax.flow.masks import attention_mask
from cosyjax.nn.attention import AttnSpec, attention
from cosyjax.nn.layers import LayerNormF32, causal_pad, mish, sinusoidal_embedding, valid_conv

__all__ = ["sinusoidal_time_embedding", "mish", "CausalBlock1D", "CausalResnetBlock1D", "BasicTransformerBlock",
           "MidBlock", "CausalConditionalDecoder", "UNetWindow"]


sinusoidal_time_embedding = sinusoidal_embedding  # Matcha `SinusoidalPosEmb` (320-d, scale 1000): the shared layer
_layer_norm = LayerNormF32


def _causal_conv(x, features: int, k: int, dtype, name: str, left=None, commit=None, *, row_stable: bool = True):
    """Left-pad k-1 zeros, Conv1d(k): x [B, T, C] -> [B, T, features].

    Incremental: `left` [B, k-1, C] (the k-1 input frames before x) replaces the zeros; returns
    (out, the k-1 input frames before row `commit` of x, the next call's `left`).
    """
    if left is None:
        xp = causal_pad(x, k)
    else:
        if left.shape != (x.shape[0], k - 1, x.shape[2]):
            raise ValueError(f"causal conv {name}: left context must be {(x.shape[0], k - 1, x.shape[2])}, "
                             f"got {left.shape}")
        xp = jnp.concatenate([left.astype(x.dtype), x], axis=1)
    out = valid_conv(features, k, dtype=dtype, row_stable=row_stable, name=name)(xp)
    if left is None:
        return out
    return out, jax.lax.dynamic_slice_in_dim(xp, commit, k - 1, axis=1).astype(left.dtype)


class UNetWindow(NamedTuple):
    """Where an incremental estimator call sits (traced; see `cosyjax.flow.cv2.incremental`)."""

    offset: jax.Array  # int32 scalar: absolute frame of the first new frame (K/V write position)
    commit: jax.Array  # int32 scalar: new frames that become final after this call (conv contexts kept there)
    n_keys: jax.Array  # int32 scalar: valid frames in the K/V buffers after this call's writes (chunk rule on top)


class CausalBlock1D(nn.Module):
    """x [B, T, C], m [B, T, 1] -> mish(LN(CausalConv_k3(x * m))) * m [B, T, dim_out].

    Incremental: `cache` = left context [B, 2, C] -> (out, new context at row `commit`)."""

    dim_out: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    row_stable: bool = True  # streaming chunks (see `valid_conv`)

    @nn.compact
    def __call__(self, x, m, cache=None, commit=None):
        h = _causal_conv(x * m, self.dim_out, 3, self.dtype, "conv", cache, commit, row_stable=self.row_stable)
        h, new_cache = (h, None) if cache is None else h
        h = _layer_norm(self.eps, "norm")(h)
        h = (mish(h) * m).astype(self.dtype)
        return h if cache is None else (h, new_cache)


class CausalResnetBlock1D(nn.Module):
    """x [B, T, C_in], m [B, T, 1], temb [B, E] -> [B, T, dim_out].

    Incremental: `cache` = (block1, block2) conv contexts -> (out, updated contexts)."""

    dim_out: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    row_stable: bool = True  # streaming chunks (see `valid_conv`)

    @nn.compact
    def __call__(self, x, m, temb, cache=None, commit=None):
        cached = cache is not None
        ctx1, ctx2 = ((cache[0], commit), (cache[1], commit)) if cached else ((), ())
        h = CausalBlock1D(self.dim_out, self.eps, self.dtype, self.row_stable, name="block1")(x, m, *ctx1)
        h, c1 = h if cached else (h, None)
        h = h + nn.Dense(self.dim_out, dtype=self.dtype, name="mlp")(mish(temb))[:, None, :]
        h = CausalBlock1D(self.dim_out, self.eps, self.dtype, self.row_stable, name="block2")(h, m, *ctx2)
        h, c2 = h if cached else (h, None)
        h = h + valid_conv(self.dim_out, 1, dtype=self.dtype, row_stable=self.row_stable, name="res_conv")(x * m)
        return (h, (c1, c2)) if cached else h


class BasicTransformerBlock(nn.Module):
    """Matcha block (self-attention only): x += Attn(LN1(x)); x += FF(LN3(x)).

    (x [B, T, C], spec: AttnSpec) -> (x, None), the `nn.scan` calling convention.
    Incremental: (x [B, T, C] new frames, spec with q_offset, (k, v) [B, S, H, D]) -> (x, (k, v)) with the
    new frames' keys/values written at `spec.q_offset`.
    """

    dim: int
    num_heads: int
    head_dim: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    chunk_size: int = 0  # streaming: the block-causal chunk (frames); 0 = full attention

    @nn.compact
    def __call__(self, x, spec, cache=None):
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        h = _layer_norm(self.eps, "norm1")(x).astype(self.dtype)
        q = nn.Dense(H * D, use_bias=False, dtype=self.dtype, name="to_q")(h).reshape(B, T, H, D)
        k = nn.Dense(H * D, use_bias=False, dtype=self.dtype, name="to_k")(h).reshape(B, T, H, D)
        v = nn.Dense(H * D, use_bias=False, dtype=self.dtype, name="to_v")(h).reshape(B, T, H, D)
        if cache is not None:
            at = (0, spec.q_offset, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        a = attention(q, k, v, **spec.kwargs(self.chunk_size), scale=D ** -0.5,
                      implementation=self.attention_impl).reshape(B, T, H * D)
        x = x + nn.Dense(self.dim, dtype=self.dtype, name="to_out")(a)
        h = _layer_norm(self.eps, "norm3")(x).astype(self.dtype)
        h = nn.Dense(4 * self.dim, dtype=self.dtype, name="ff_proj")(h)
        h = jax.nn.gelu(h, approximate=False)
        return x + nn.Dense(self.dim, dtype=self.dtype, name="ff_out")(h), (None if cache is None else (k, v))


def _transformer_stack(c: UNetConfig, dtype, attention_impl: str, name: str, cached: bool = False,
                       chunk: int = 0) -> nn.Module:
    """`c.n_blocks` BasicTransformerBlocks scanned over one parameter stack (leading axis n_blocks);
    `cached`: also scanned over their (k, v) buffers [n_blocks, B, S, H, D]."""
    stack = nn.scan(BasicTransformerBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, 0) if cached else nn.broadcast, length=c.n_blocks)
    return stack(c.channels[0], c.num_heads, c.attention_head_dim, c.ln_eps, dtype, attention_impl, chunk,
                 name=name)


class MidBlock(nn.Module):
    """CausalResnetBlock1D(C -> C) + n_blocks transformer blocks: (h, (m, temb, spec)) -> (h, None).

    Incremental: (h, (m, temb, spec, commit), {"resnet": contexts, "transformers": (k, v)})
    -> (h, updated cache)."""

    cfg: UNetConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    chunk_size: int = 0
    row_stable: bool = True  # streaming chunks (see `valid_conv`)

    @nn.compact
    def __call__(self, h, ctx, cache=None):
        c = self.cfg
        resnet = CausalResnetBlock1D(c.channels[0], c.ln_eps, self.dtype, self.row_stable, name="resnet")
        stack = _transformer_stack(c, self.dtype, self.attention_impl, "transformers", cache is not None,
                                   self.chunk_size)
        if cache is None:
            m, temb, spec = ctx
            h = resnet(h, m, temb)
            h, _ = stack(h, spec)
            return h, None
        m, temb, spec, commit = ctx
        h, res_cache = resnet(h, m, temb, cache["resnet"], commit)
        h, kv = stack(h, spec, cache["transformers"])
        return h, {"resnet": res_cache, "transformers": kv}


class CausalConditionalDecoder(nn.Module):
    """x, mu, cond [B, T, 80]; mask [B, T] bool; t [B]; spks [B, S] -> v [B, T, 80] (x mask).

    Incremental (`cache` and `window` given): x, mu, cond, mask are the T new frames (mask = valid
    new frames; `window` says where they sit and how many buffered keys are valid; chunk rule on top);
    `cache` = {"down_resnet", "down_conv", "up_resnet", "up_conv", "final_block": causal-conv left
    contexts [B, 2, C_in] (pairs for resnets), "down_transformers", "up_transformers": (k, v)
    [n_blocks, B, S, H, D], "mid_blocks": {"resnet", "transformers"} with a leading num_mid axis}
    -> (v [B, T, 80], updated cache).
    """

    cfg: UNetConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask, mu, t, spks, cond, streaming: bool = False, cache=None, window=None):
        c = self.cfg
        B, T, _ = x.shape
        if len(c.channels) != 1:
            raise ValueError(f"only single-level U-Nets are supported, got channels {c.channels}")
        cached = cache is not None
        if cached != (window is not None):
            raise ValueError("incremental estimation needs both `cache` and `window`")
        C = c.channels[0]
        mask = jnp.asarray(mask, jnp.bool_)
        if mask.shape != (B, T):
            raise ValueError(f"mask must be [B, T] = {(B, T)}, got {mask.shape}")

        temb = sinusoidal_time_embedding(t, c.in_channels, c.time_scale)
        temb = nn.Dense(c.time_embed_dim, dtype=jnp.float32, name="time_mlp_linear_1")(temb)
        temb = nn.Dense(c.time_embed_dim, dtype=jnp.float32, name="time_mlp_linear_2")(nn.silu(temb))

        spks_t = jnp.broadcast_to(spks[:, None, :], (B, T, spks.shape[-1]))
        h = jnp.concatenate([x, mu, spks_t, cond], axis=-1).astype(self.dtype)
        if h.shape[-1] != c.in_channels:
            raise ValueError(f"x+mu+spks+cond has {h.shape[-1]} channels, estimator expects {c.in_channels}")
        m = mask[..., None].astype(self.dtype)
        new = {}
        # Streaming: the chunk rule and key lengths go to `attention` as such (its tiled path gives the same
        # bits with or without a cache and skips keys past the valid prefix); `mask` is a length mask.
        rs = streaming or cached  # row-stable convolutions where incremental chunks must equal recomputed ones
        chunk = c.static_chunk_size if rs else 0
        if cached:
            commit = window.commit
            attn_ctx = AttnSpec(None, jnp.broadcast_to(window.n_keys, (B,)), window.offset)

            def conv_args(key):
                return cache[key], commit
        else:
            attn_ctx = (AttnSpec(None, jnp.sum(mask, axis=-1, dtype=jnp.int32)) if chunk
                        else AttnSpec(attention_mask(mask, 0)))  # [B, 1, 1, T]

            def conv_args(key):
                return ()

        def keep(key, out):
            # split a cached layer's (out, new cache); pass a full-pass output through
            if not cached:
                return out
            new[key] = out[1]
            return out[0]

        def stack(name, h):
            st = _transformer_stack(c, self.dtype, self.attention_impl, name, cached, chunk)
            h, kv = st(h, attn_ctx, cache[name]) if cached else st(h, attn_ctx)
            if cached:
                new[name] = kv
            return h

        h = keep("down_resnet", CausalResnetBlock1D(C, c.ln_eps, self.dtype, rs, name="down_resnet")(
            h, m, temb, *conv_args("down_resnet")))
        h = stack("down_transformers", h)
        skip = h
        h = keep("down_conv", _causal_conv(h * m, C, 3, self.dtype, "down_conv", *conv_args("down_conv"),
                                        row_stable=rs))

        if c.num_mid_blocks:
            mids = nn.scan(MidBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(nn.broadcast, 0) if cached else nn.broadcast, length=c.num_mid_blocks)
            mids = mids(c, self.dtype, self.attention_impl, chunk, rs, name="mid_blocks")
            if cached:
                h = keep("mid_blocks", mids(h, (m, temb, attn_ctx, commit), cache["mid_blocks"]))
            else:
                h, _ = mids(h, (m, temb, attn_ctx))

        h = jnp.concatenate([h, skip], axis=-1)
        h = keep("up_resnet", CausalResnetBlock1D(C, c.ln_eps, self.dtype, rs, name="up_resnet")(
            h, m, temb, *conv_args("up_resnet")))
        h = stack("up_transformers", h)
        h = keep("up_conv", _causal_conv(h * m, C, 3, self.dtype, "up_conv", *conv_args("up_conv"),
                                        row_stable=rs))

        h = keep("final_block", CausalBlock1D(C, c.ln_eps, self.dtype, rs, name="final_block")(
            h, m, *conv_args("final_block")))
        out = valid_conv(c.out_channels, 1, dtype=jnp.float32, row_stable=rs, name="final_proj")(h * m)
        out = out * mask[..., None].astype(out.dtype)
        return (out, new) if cached else out
