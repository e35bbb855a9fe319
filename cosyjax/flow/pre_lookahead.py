"""PreLookaheadLayer (upstream `transformer/upsample_encoder.py:PreLookaheadLayer`), shared by both flows.

x [B, T, C_in] -> [B, T, C_in]:
  right-pad L frames (zeros, or the L `context` frames when streaming without finalize)
  -> Conv1d(C_in -> C_h, k = L+1, no padding)      (frame t sees frames t..t+L)
  -> LeakyReLU(0.01)
  -> left-pad 2 -> Conv1d(C_h -> C_in, k = 3)      (causal)
  -> + x

Parameters: `conv1 {kernel [L+1, C_in, C_h], bias [C_h]}`, `conv2 {kernel [3, C_h, C_in], bias [C_in]}`.

Bucketed callers do not need `context`: frames after a row's valid length must be zero (as
upstream's length mask makes them), and when not finalizing, the last L valid frames of a row act
as its context: the output for frames < len - L equals upstream's `context=` path exactly.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cosyjax.nn.layers import RowStableConv

__all__ = ["PreLookaheadLayer"]


class PreLookaheadLayer(nn.Module):
    """x [B, T, C_in] (context [B, L, C_in] or None) -> [B, T, C_in], dtype of x."""

    channels: int  # hidden width C_h (CV2 512, CV3 1024)
    lookahead: int = 3  # L (`pre_lookahead_len`)
    dtype: jnp.dtype = jnp.float32  # compute dtype of the convolutions

    @nn.compact
    def __call__(self, x, context=None):
        if x.ndim != 3:
            raise ValueError(f"PreLookaheadLayer expects [B, T, C], got {x.shape}")
        B, T, C = x.shape
        L = self.lookahead
        if context is None:
            right = jnp.zeros((B, L, C), x.dtype)
        else:
            if context.shape != (B, L, C):
                raise ValueError(f"context must be [B, {L}, {C}], got {context.shape}")
            right = context.astype(x.dtype)
        h = jnp.concatenate([x, right], axis=1)
        h = RowStableConv(self.channels, L + 1, dtype=self.dtype, name="conv1")(h)
        h = nn.leaky_relu(h, negative_slope=0.01)
        h = jnp.pad(h, ((0, 0), (2, 0), (0, 0)))
        h = RowStableConv(C, 3, dtype=self.dtype, name="conv2")(h)
        return h.astype(x.dtype) + x
