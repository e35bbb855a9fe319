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

from cosyjax.nn.attention import AttnSpec, RelPos, attention, rel_shift

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


class RelPositionMultiHeadedAttention(nn.Module):
    """x [B, T, D], pos_table [2S-1, D] f32, spec: AttnSpec (key masking) -> [B, T, D].

    Full pass (`cache=None`): S = T, the queries are the keys. Cached pass: `cache` = (k, v) buffers
    [B, S, H, dk]; the T new frames sit at absolute positions `offset`..`offset+T-1` (traced int,
    offset + T <= S): their keys/values are written there and they attend the buffer's valid
    keys (`spec.kv_lengths`); returns (out, (k, v)). Scores depend on i - j only, so the position term
    of a new query against a cached key uses table row (S-1) - (i-j), exactly the row the full pass
    uses for that pair. With `chunk_size` (streaming) the position term goes to `attention` as a
    `RelPos` (its tiled path computes it per tile: the same bits with or without a cache). A cache
    needs the chunk mask (with full attention earlier frames see later ones: nothing can be kept).
    """

    n_head: int
    n_feat: int
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "auto"
    chunk_size: int = 0  # streaming: the block-causal chunk; 0 = full attention

    @nn.compact
    def __call__(self, x, pos_table, spec: AttnSpec = AttnSpec(), cache=None):
        B, T, D = x.shape
        H = self.n_head
        dk = self.n_feat // H
        if D != self.n_feat:
            raise ValueError(f"attention input width {D} != n_feat {self.n_feat}")
        S = T if cache is None else cache[0].shape[1]
        if pos_table.shape != (2 * S - 1, D):
            raise ValueError(f"pos_table must be [{2 * S - 1}, {D}], got {pos_table.shape}")
        dense = lambda name, bias=True: nn.Dense(self.n_feat, use_bias=bias, dtype=self.dtype, name=name)  # noqa: E731
        q = dense("linear_q")(x).reshape(B, T, H, dk)
        k = dense("linear_k")(x).reshape(B, T, H, dk)
        v = dense("linear_v")(x).reshape(B, T, H, dk)
        offset = spec.q_offset
        table = pos_table
        if cache is not None:
            if not self.chunk_size:  # full attention lets cached frames see the new ones: nothing to keep
                raise ValueError("a cached RelPositionMultiHeadedAttention call needs the streaming chunk "
                                 "mask (chunk_size > 0)")
            if cache[0].shape != (B, S, H, dk) or cache[1].shape != (B, S, H, dk):
                raise ValueError(f"cache must be two [{B}, S, {H}, {dk}] buffers, got {cache[0].shape}, "
                                 f"{cache[1].shape}")
            at = (0, offset, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        p = dense("linear_pos", bias=False)(table.astype(self.dtype)).reshape(table.shape[0], H, dk)
        pos_bias_u = self.param("pos_bias_u", nn.initializers.zeros, (H, dk), jnp.float32)
        pos_bias_v = self.param("pos_bias_v", nn.initializers.zeros, (H, dk), jnp.float32)
        q_u = (q.astype(jnp.float32) + pos_bias_u).astype(self.dtype)
        q_v = (q.astype(jnp.float32) + pos_bias_v).astype(self.dtype)
        scale = 1.0 / math.sqrt(dk)
        if self.chunk_size:  # pos_table row (S-1) is relative position 0 (S = T in the full pass)
            out = attention(q_u, k, v, **spec.kwargs(self.chunk_size), rel_pos=RelPos(q_v, p, S - 1),
                            scale=scale, implementation=self.attention_impl)
        else:
            matrix_bd = jnp.einsum("bthd,phd->bhtp", q_v, p, preferred_element_type=jnp.float32)
            bias = rel_shift(matrix_bd) * jnp.float32(scale)  # [B, H, T, S], added after q.k * scale
            out = attention(q_u, k, v, **spec.kwargs(0), bias=bias, scale=scale,
                            implementation=self.attention_impl)
        out = dense("linear_out")(out.reshape(B, T, D))
        return out if cache is None else (out, (k, v))
