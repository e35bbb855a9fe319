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

import flax.linen as nn
import jax.numpy as jnp

from cosyjax.flow.cv2.config import EncoderCV2Config
from cosyjax.flow.cv2.rel_attention import RelPositionMultiHeadedAttention, rel_pos_table
from cosyjax.flow.masks import attention_mask, padding_mask
from cosyjax.flow.pre_lookahead import PreLookaheadLayer

__all__ = ["LinearEmbed", "ConformerLayer", "EncoderUpsample1D", "UpsampleConformerEncoder"]


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # statistics in float32 (two-pass variance, like torch), whatever the compute dtype
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name)


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

    (x [B, T, d], (pos_table [2T-1, d], mask)) -> (x, None), the `nn.scan` calling convention.
    """

    cfg: EncoderCV2Config
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, ctx):
        pos_table, mask = ctx
        c = self.cfg
        h = _layer_norm(c.layer_ln_eps, "norm_mha")(x).astype(self.dtype)
        x = x + RelPositionMultiHeadedAttention(c.attention_heads, c.output_size, self.dtype, self.attention_impl,
                                               name="self_attn")(h, pos_table, mask)
        h = _layer_norm(c.layer_ln_eps, "norm_ff")(x).astype(self.dtype)
        h = nn.Dense(c.linear_units, dtype=self.dtype, name="w_1")(h)
        h = nn.Dense(c.output_size, dtype=self.dtype, name="w_2")(nn.silu(h))
        return x + h, None


def _conformer_stack(c: EncoderCV2Config, n: int, dtype, attention_impl: str, name: str) -> nn.Module:
    """`n` ConformerLayers scanned over one parameter stack (leading axis n): one traced layer."""
    stack = nn.scan(ConformerLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=n)
    return stack(c, dtype, attention_impl, name=name)


class EncoderUpsample1D(nn.Module):
    """Encoder `Upsample1D`: x [B, T, C] -> nearest x stride -> left pad 2*stride -> Conv1d(k=2*stride+1)."""

    out_channels: int
    stride: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = self.stride
        x = jnp.repeat(x, s, axis=1)
        x = jnp.pad(x, ((0, 0), (2 * s, 0), (0, 0)))
        return nn.Conv(self.out_channels, (2 * s + 1,), padding="VALID", dtype=self.dtype, name="conv")(x)


class UpsampleConformerEncoder(nn.Module):
    """x [B, T, D_in], lengths [B] (incl. context), encoded_lengths [B] -> (h [B, s*T, d], h_lengths [B]).

    `encoded_lengths = lengths` when finalizing, else `lengths - pre_lookahead_len` (the last frames
    are only the look-ahead context). `streaming` (static) selects the chunk masks.
    """

    cfg: EncoderCV2Config
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, lengths, encoded_lengths, streaming: bool = False):
        c = self.cfg
        B, T, _ = x.shape
        lengths = jnp.asarray(lengths, jnp.int32)
        encoded_lengths = jnp.asarray(encoded_lengths, jnp.int32)
        valid = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]

        x = LinearEmbed(c.output_size, c.embed_ln_eps, dtype=self.dtype, name="embed")(x)
        # frames past a row's length must be zero for the look-ahead conv (upstream pads with zeros)
        x = jnp.where(valid, x, jnp.zeros((), x.dtype))
        x = PreLookaheadLayer(c.pre_lookahead_channels, c.pre_lookahead_len, dtype=self.dtype,
                              name="pre_lookahead_layer")(x)
        pos = rel_pos_table(T, c.output_size)
        mask = attention_mask(padding_mask(encoded_lengths, T), c.static_chunk_size if streaming else 0)
        x, _ = _conformer_stack(c, c.num_blocks, self.dtype, self.attention_impl, "encoders")(x, (pos, mask))

        s = c.upsample_stride
        x = EncoderUpsample1D(c.upsample_channels, s, dtype=self.dtype, name="up_layer")(x)
        Tu = s * T
        up_lengths = encoded_lengths * s
        x = LinearEmbed(c.output_size, c.embed_ln_eps, dtype=self.dtype, name="up_embed")(x)
        pos = rel_pos_table(Tu, c.output_size)
        mask = attention_mask(padding_mask(up_lengths, Tu), c.static_chunk_size * s if streaming else 0)
        x, _ = _conformer_stack(c, c.num_up_blocks, self.dtype, self.attention_impl, "up_encoders")(x, (pos, mask))
        x = _layer_norm(c.after_norm_eps, "after_norm")(x)
        return x.astype(self.dtype), up_lengths
