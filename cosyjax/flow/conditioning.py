"""Flow conditioning shared by CV2 and CV3: speaker x-vector normalisation, masked token embedding, and the
`FlowModule` base both flow modules derive from (their common fields and conditioning layers)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cosyjax.flow.masks import padding_mask

__all__ = ["FlowModule", "l2_normalize_speaker", "masked_token_embedding"]


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


class FlowModule(nn.Module):
    """Base of `FlowCV2` / `FlowCV3`: config, compute dtype, attention path, and the conditioning layers
    (`input_embedding`, `spk_embed_affine_layer`) with `speaker` / `token_embedding`. Subclasses call
    `setup_conditioning()` in their `setup` and add their own encoder and estimator."""

    cfg: Any
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def setup_conditioning(self):
        c = self.cfg
        self.input_embedding = nn.Embed(c.vocab_size, c.input_size, name="input_embedding")
        self.spk_embed_affine_layer = nn.Dense(c.output_size, name="spk_embed_affine_layer")

    def speaker(self, embedding):
        """embedding [B, 192] -> spks [B, 80] float32 (`F.normalize`, eps 1e-12, then the affine layer)."""
        return self.spk_embed_affine_layer(l2_normalize_speaker(embedding))

    def token_embedding(self, tokens, n_tokens):
        """tokens [B, N] int, n_tokens [B] -> [B, N, D] float32, zero after each row's length."""
        return masked_token_embedding(self.input_embedding, tokens, n_tokens, self.cfg.vocab_size)
