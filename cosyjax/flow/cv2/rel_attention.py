"""Espnet relative-position self-attention (upstream `transformer/attention.py:RelPositionMultiHeadedAttention`
with `transformer/embedding.py:EspnetRelPositionalEncoding`).

score[i, j] = ((q_i + u) . k_j + (q_i + v) . p_{i-j}) / sqrt(d_k), with p = linear_pos(pos_table).
The content term goes through `cosyjax.nn.attention.attention` as (q + u) against k; the position
term (upstream `matrix_bd` after `rel_shift`) goes in as its additive `bias`, pre-scaled.

Padding-safe: scores depend on i - j only, so padding a sequence to a longer bucket leaves the
valid rows unchanged as long as padded keys are masked.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cosyjax.nn.attention import attention

__all__ = ["rel_pos_table", "rel_shift", "RelPositionMultiHeadedAttention"]


def rel_pos_table(length: int, d_model: int) -> jax.Array:
    """Espnet relative sinusoid table -> float32 [2*length - 1, d_model].

    Row m holds relative position r = (length - 1) - m (from +(length-1) down to -(length-1));
    entry [2c] = sin(r * w_c), [2c+1] = cos(r * w_c), w_c = exp(-2c * ln(10000) / d_model),
    computed in float32 like upstream's `extend_pe`.
    """
    if d_model % 2:
        raise ValueError(f"rel_pos_table needs an even d_model, got {d_model}")
    div = jnp.exp(jnp.arange(0, d_model, 2, dtype=jnp.float32) * jnp.float32(-(math.log(10000.0) / d_model)))
    r = jnp.arange(length - 1, -length, -1, dtype=jnp.float32)  # +(L-1) ... -(L-1)
    ang = r[:, None] * div[None, :]
    table = jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1)  # [2L-1, d/2, 2]: interleave sin, cos
    return table.reshape(2 * length - 1, d_model)


def rel_shift(x: jax.Array) -> jax.Array:
    """[..., T, 2T-1] scores against the rel-pos table -> [..., T, T] with out[i, j] = x[i, T-1-i+j].

    The zero-pad / reshape trick of upstream's `rel_shift` (pure reshapes and slices, no gather).
    """
    *lead, T, P = x.shape
    if P != 2 * T - 1:
        raise ValueError(f"rel_shift expects [..., T, 2T-1], got {x.shape}")
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., T, 2T]
    x = x.reshape(*lead, 2 * T, T)[..., 1:, :]  # [..., 2T-1, T]
    return x.reshape(*lead, T, 2 * T - 1)[..., :T]


class RelPositionMultiHeadedAttention(nn.Module):
    """x [B, T, D], pos_table [2T-1, D] f32, mask bool (broadcastable to [B, H, T, T]) -> [B, T, D]."""

    n_head: int
    n_feat: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, pos_table, mask=None):
        B, T, D = x.shape
        H = self.n_head
        dk = self.n_feat // H
        if D != self.n_feat:
            raise ValueError(f"attention input width {D} != n_feat {self.n_feat}")
        if pos_table.shape != (2 * T - 1, D):
            raise ValueError(f"pos_table must be [{2 * T - 1}, {D}], got {pos_table.shape}")
        dense = lambda name, bias=True: nn.Dense(self.n_feat, use_bias=bias, dtype=self.dtype, name=name)  # noqa: E731
        q = dense("linear_q")(x).reshape(B, T, H, dk)
        k = dense("linear_k")(x).reshape(B, T, H, dk)
        v = dense("linear_v")(x).reshape(B, T, H, dk)
        p = dense("linear_pos", bias=False)(pos_table.astype(self.dtype)).reshape(2 * T - 1, H, dk)
        pos_bias_u = self.param("pos_bias_u", nn.initializers.zeros, (H, dk), jnp.float32)
        pos_bias_v = self.param("pos_bias_v", nn.initializers.zeros, (H, dk), jnp.float32)
        q_u = (q.astype(jnp.float32) + pos_bias_u).astype(self.dtype)
        q_v = (q.astype(jnp.float32) + pos_bias_v).astype(self.dtype)
        scale = 1.0 / math.sqrt(dk)
        matrix_bd = jnp.einsum("bthd,phd->bhtp", q_v, p, preferred_element_type=jnp.float32)
        bias = rel_shift(matrix_bd) * jnp.float32(scale)  # [B, H, T, T], added after q.k * scale
        out = attention(q_u, k, v, mask, bias=bias, scale=scale, implementation=self.attention_impl)
        return dense("linear_out")(out.reshape(B, T, D))
