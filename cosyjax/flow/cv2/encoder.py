"""CosyVoice2 `UpsampleConformerEncoder` (upstream `transformer/upsample_encoder.py`).

tokens' embeddings x [B, T, D_in] (valid frames < `lengths`, including the look-ahead context when
not finalizing) ->
  embed (Linear -> LayerNorm 1e-5 -> x sqrt(d)) -> PreLookaheadLayer -> N conformer layers
  (block-causal chunk mask of `static_chunk_size` tokens when streaming; layers are `nn.scan`ned, so
  their parameters carry a leading layer axis)
  -> Upsample1D (nearest x2, left pad 4, Conv1d k=5) -> up_embed -> 4 conformer layers
  (chunk `static_chunk_size * stride` frames) -> after_norm
-> h [B, stride*T, D], valid frames < stride * encoded_lengths.

Bucketing: padded frames (>= length) never influence valid ones: every convolution is causal
except the look-ahead conv, whose input is zeroed past the row's valid length; attention keys
past the valid length are masked.
"""
from __future__ import annotations

import math

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.flow.cv2.config import EncoderCV2Config
from cosyjax.flow.cv2.rel_attention import RelPositionMultiHeadedAttention, rel_pos_table
from cosyjax.flow.masks import attention_mask, padding_mask
from cosyjax.nn.attention import AttnSpec
from cosyjax.flow.pre_lookahead import PreLookaheadLayer
from cosyjax.nn.layers import LayerNormF32, RowStableConv

__all__ = ["LinearEmbed", "ConformerLayer", "EncoderUpsample1D", "EncoderWindow", "UpsampleConformerEncoder"]


_layer_norm = LayerNormF32  # float32 two-pass statistics, whatever the compute dtype


class LinearEmbed(nn.Module):
    """`LinearNoSubsampling` + Espnet x-scale: x [B, T, D_in] -> LN(Linear(x)) * sqrt(d) [B, T, d]."""

    d_model: int
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.d_model, dtype=self.dtype, name="linear")(x)
        x = _layer_norm(self.eps, "norm")(x)
        return (x * jnp.float32(math.sqrt(self.d_model))).astype(self.dtype)


class ConformerLayer(nn.Module):
    """Pre-norm `ConformerEncoderLayer` without macaron/conv: x += MHA(LN(x)); x += FFN(LN(x)).

    (x [B, T, d], (pos_table [2T-1, d], spec: AttnSpec)) -> (x, None), the `nn.scan` calling convention.
    Cached: (x [B, T, d] new frames, (pos_table [2S-1, d], spec with q_offset), (k, v) [B, S, H, dk])
    -> (x, (k, v) with the new frames written at `spec.q_offset`), see `RelPositionMultiHeadedAttention`.
    """

    cfg: EncoderCV2Config
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    chunk_size: int = 0  # streaming: the block-causal chunk (this stack's rate); 0 = full attention

    @nn.compact
    def __call__(self, x, ctx, cache=None):
        pos_table, spec = ctx
        c = self.cfg
        h = _layer_norm(c.layer_ln_eps, "norm_mha")(x).astype(self.dtype)
        a = RelPositionMultiHeadedAttention(c.attention_heads, c.output_size, self.dtype, self.attention_impl,
                                            self.chunk_size, name="self_attn")(h, pos_table, spec, cache)
        a, new_cache = (a, None) if cache is None else a
        x = x + a
        h = _layer_norm(c.layer_ln_eps, "norm_ff")(x).astype(self.dtype)
        h = nn.Dense(c.linear_units, dtype=self.dtype, name="w_1")(h)
        h = nn.Dense(c.output_size, dtype=self.dtype, name="w_2")(nn.silu(h))
        return x + h, new_cache


def _conformer_stack(c: EncoderCV2Config, n: int, dtype, attention_impl: str, name: str,
                     cached: bool = False, chunk: int = 0) -> nn.Module:
    """`n` ConformerLayers scanned over one parameter stack (leading axis n): one traced layer.

    `cached`: the layers also scan over their (k, v) buffers [n, B, S, H, dk] and return the updated ones.
    """
    stack = nn.scan(ConformerLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, 0) if cached else nn.broadcast, length=n)
    return stack(c, dtype, attention_impl, chunk, name=name)


class EncoderUpsample1D(nn.Module):
    """Encoder `Upsample1D`: x [B, T, C] -> nearest x stride -> left pad 2*stride -> Conv1d(k=2*stride+1).

    The left pad is 2 input frames repeated; `left` [B, 2, C] replaces their zeros with the 2 frames
    before x (incremental streaming), giving the same output as running on the longer sequence.
    """

    out_channels: int
    stride: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, left=None):
        s = self.stride
        B, _, C = x.shape
        left = jnp.zeros((B, 2, C), x.dtype) if left is None else left.astype(x.dtype)
        if left.shape != (B, 2, C):
            raise ValueError(f"upsample left context must be [{B}, 2, {C}], got {left.shape}")
        x = jnp.repeat(jnp.concatenate([left, x], axis=1), s, axis=1)
        return RowStableConv(self.out_channels, 2 * s + 1, dtype=self.dtype, name="conv")(x)


class EncoderWindow(NamedTuple):
    """Where an incremental encoder call sits (traced scalars/arrays; see `cosyjax.flow.cv2.incremental`).

    The input window holds tokens from absolute position `offset - lead`; its rows `lead` .. `lead+Tq-1`
    are the Tq new tokens (window width Tq + 2 + pre_lookahead_len: 2 rows of left context for the
    look-ahead layer's causal conv, the look-ahead tokens after).
    """

    lead: jax.Array  # int32 scalar: 0 at the start of the sequence, else 2
    offset: jax.Array  # int32 scalar: absolute position of the first new token (a multiple of the chunk)
    commit: jax.Array  # int32 scalar: new tokens that become final (committed) after this call
    n_keys: jax.Array  # int32 scalar: valid tokens in the K/V buffers after this call (frames: x stride)


def _spec(lengths, T: int, chunk: int) -> AttnSpec:
    """Full-pass key masking: lengths for the chunk rule (streaming), else upstream's dense padding mask."""
    if chunk:
        return AttnSpec(None, lengths)
    return AttnSpec(attention_mask(padding_mask(lengths, T), 0))


class UpsampleConformerEncoder(nn.Module):
    """x [B, T, D_in], lengths [B] (incl. context), encoded_lengths [B] -> (h [B, s*T, d], h_lengths [B]).

    `encoded_lengths = lengths` when finalizing, else `lengths - pre_lookahead_len` (the last frames
    are only the look-ahead context). `streaming` (static) selects the chunk masks.

    Incremental (`cache` and `window` given; streaming chunk masks are the caller's `window` masks):
    x [B, Tq+2+L, D_in] is a window of token embeddings, `lengths` its valid rows; `cache` =
    {"encoders": (k, v) [num_blocks, B, S, H, dk], "up_left": [B, 2, d] (the 2 conformer outputs
    before the window, the upsample conv's left context), "up_encoders": (k, v) [4, B, s*S, H, dk]}
    -> (h [B, s*Tq, d] for the new tokens, updated cache with `up_left` at the commit point).
    """

    cfg: EncoderCV2Config
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, lengths, encoded_lengths, streaming: bool = False, cache=None, window=None):
        c = self.cfg
        B, T, _ = x.shape
        cached = cache is not None
        if cached != (window is not None):
            raise ValueError("incremental encoding needs both `cache` and `window`")
        lengths = jnp.asarray(lengths, jnp.int32)
        valid = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
        # streaming: the chunk rule goes to `attention` as such (see `RelPositionMultiHeadedAttention`)
        chunk = c.static_chunk_size if (streaming or cached) else 0

        x = LinearEmbed(c.output_size, c.embed_ln_eps, dtype=self.dtype, name="embed")(x)
        # frames past a row's length must be zero for the look-ahead conv (upstream pads with zeros)
        x = jnp.where(valid, x, jnp.zeros((), x.dtype))
        x = PreLookaheadLayer(c.pre_lookahead_channels, c.pre_lookahead_len, dtype=self.dtype,
                              name="pre_lookahead_layer")(x)
        s = c.upsample_stride
        if cached:
            Tq = T - 2 - c.pre_lookahead_len
            # rows before `lead` had no left context for the look-ahead's causal conv: drop them
            x = jax.lax.dynamic_slice_in_dim(x, window.lead, Tq, axis=1)
            S = cache["encoders"][0].shape[2]
            n_keys = jnp.broadcast_to(window.n_keys, (B,))
            ctx = (rel_pos_table(S, c.output_size), AttnSpec(None, n_keys, window.offset))
            up_ctx = (rel_pos_table(s * S, c.output_size), AttnSpec(None, s * n_keys, s * window.offset))
        else:
            encoded_lengths = jnp.asarray(encoded_lengths, jnp.int32)
            ctx = (rel_pos_table(T, c.output_size), _spec(encoded_lengths, T, chunk))
        enc = _conformer_stack(c, c.num_blocks, self.dtype, self.attention_impl, "encoders", cached, chunk)
        x, kv = enc(x, ctx, cache["encoders"]) if cached else enc(x, ctx)

        left = cache["up_left"] if cached else None
        if cached:
            # the 2 rows before the commit point (row 0 of [left, x] is absolute token offset - 2)
            new_left = jax.lax.dynamic_slice_in_dim(jnp.concatenate([left.astype(x.dtype), x], axis=1),
                                                    window.commit, 2, axis=1)
        x = EncoderUpsample1D(c.upsample_channels, s, dtype=self.dtype, name="up_layer")(x, left)
        Tu = x.shape[1]
        x = LinearEmbed(c.output_size, c.embed_ln_eps, dtype=self.dtype, name="up_embed")(x)
        if not cached:
            up_lengths = encoded_lengths * s
            up_ctx = (rel_pos_table(Tu, c.output_size), _spec(up_lengths, Tu, s * chunk))
        up = _conformer_stack(c, c.num_up_blocks, self.dtype, self.attention_impl, "up_encoders", cached, s * chunk)
        x, up_kv = up(x, up_ctx, cache["up_encoders"]) if cached else up(x, up_ctx)
        x = _layer_norm(c.after_norm_eps, "after_norm")(x).astype(self.dtype)
        if cached:
            return x, {"encoders": kv, "up_left": new_left.astype(left.dtype), "up_encoders": up_kv}
        return x, up_lengths
