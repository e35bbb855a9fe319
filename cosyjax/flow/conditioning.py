"""Flow conditioning shared by CV2 and CV3: speaker x-vector normalisation and masked token embedding."""
from __future__ import annotations

import jax.numpy as jnp

from cosyjax.flow.masks import padding_mask

__all__ = ["l2_normalize_speaker", "masked_token_embedding"]


def l2_normalize_speaker(embedding):
    """embedding [B, 192] -> [B, 192] float32, `F.normalize(dim=1)` (eps 1e-12) as upstream's flow.inference."""
    e = embedding.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))
    return e / jnp.maximum(norm, 1e-12)


def masked_token_embedding(embed, tokens, n_tokens, vocab_size: int):
    """tokens [B, N] int, n_tokens [B] -> embed(tokens) [B, N, D] float32, zero after each row's length.

    Ids are clipped into the table (upstream clamps at 0; padded positions are masked anyway).
    """
    e = embed(jnp.clip(tokens, 0, vocab_size - 1)).astype(jnp.float32)
    return jnp.where(padding_mask(n_tokens, tokens.shape[1])[:, :, None], e, 0.0)
