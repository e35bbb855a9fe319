"""Rotary position embeddings: tables built in float32 from integer positions (PITFALLS 5).

* Qwen2 (HF `Qwen2RotaryEmbedding`): rotate-half layout, `inv_freq = 1 / theta^(2i/D)` evaluated like HF.
* The CV3 DiT uses x-transformers' interleaved-pair rotary on head 0 only (`cosyjax.flow.cv3.dit.rope_tables`,
  `apply_rope_interleaved`), a different layout and float32 power, kept with the DiT.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope"]


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """`1 / theta^(2i/D)` `[D/2]` float32, evaluated like HF (f32 exponent, correctly rounded power)."""
    expo = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    denom = np.power(np.float64(theta), expo.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / denom).astype(np.float32)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """positions `[B, T]` int -> cos, sin `[B, T, D]` float32 (halves duplicated, HF layout)."""
    inv = jnp.asarray(rope_inv_freq(head_dim, theta))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """x `[B, T, N, D]` rotated by rotate-half RoPE (float32 math, result in x's dtype)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)
