"""Small jittable helpers of the batched pipeline (static shapes, length masks).

* `silent_keep_mask` / `compact_tokens`: CosyVoice3's silent-token filter (`llm_job`: at most 5
  consecutive silent tokens reach the flow) on padded token batches, without host loops.
* `resize_linear`: `F.interpolate(mode='linear', align_corners=False)` along time with a traced
  output length (for `speed` in the batched path).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from cosyjax.nn.layers import length_mask

__all__ = ["length_mask", "silent_keep_mask", "compact_tokens", "filter_silent_batch", "resize_linear"]





def silent_keep_mask(tokens, lengths, silent_tokens: Sequence[int], max_run: int = 5):
    """tokens [B, T] int, lengths [B] -> keep [B, T] bool.

    A silent token is kept while the run of consecutive silent tokens it ends has length <= max_run;
    positions past `lengths` are never kept.
    """
    T = tokens.shape[-1]
    idx = jnp.arange(T, dtype=jnp.int32)
    valid = length_mask(lengths, T)
    if not silent_tokens:
        return valid
    silent = jnp.isin(tokens, jnp.asarray(tuple(silent_tokens), tokens.dtype))
    last_loud = jax.lax.cummax(jnp.where(silent, -1, idx[None, :]), axis=1)  # last non-silent index
    run = idx - last_loud
    return valid & (~silent | (run <= max_run))


def compact_tokens(tokens, keep):
    """Move kept tokens to the front: tokens [B, T], keep [B, T] -> (tokens [B, T] (0-padded), lengths [B])."""
    T = tokens.shape[-1]
    target = jnp.where(keep, jnp.cumsum(keep, axis=-1) - 1, T)  # T = out of range -> dropped

    def one(tok, tgt):
        return jnp.zeros_like(tok).at[tgt].set(tok, mode="drop")

    return jax.vmap(one)(tokens, target), jnp.sum(keep, axis=-1).astype(jnp.int32)


def filter_silent_batch(tokens, lengths, silent_tokens: Sequence[int], max_run: int = 5):
    """`llm_job`'s filter on a padded batch: tokens [B, T], lengths [B] -> (tokens [B, T], lengths [B])."""
    if not silent_tokens:
        return tokens, jnp.asarray(lengths, jnp.int32)
    return compact_tokens(tokens, silent_keep_mask(tokens, lengths, silent_tokens, max_run))


def resize_linear(x, in_len, out_len, T_out: int):
    """Linear resize along time of each row: x [B, T, C], in_len/out_len [B] -> [B, T_out, C].

    Row b maps its first `in_len[b]` frames to `out_len[b]` frames (torch `F.interpolate(size=out_len,
    mode='linear', align_corners=False)`); frames past `out_len[b]` are zero.
    """
    in_len = jnp.asarray(in_len, jnp.float32)
    out_len = jnp.asarray(out_len)
    scale = in_len / jnp.maximum(out_len, 1).astype(jnp.float32)
    i = jnp.arange(T_out, dtype=jnp.float32)[None, :]
    src = jnp.maximum((i + 0.5) * scale[:, None] - 0.5, 0.0)
    last = (in_len - 1).astype(jnp.int32)[:, None]
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
    i1 = jnp.minimum(i0 + 1, last)
    lam = (src - i0.astype(jnp.float32))[..., None]
    g0 = jnp.take_along_axis(x, i0[..., None], axis=1)
    g1 = jnp.take_along_axis(x, i1[..., None], axis=1)
    y = (1.0 - lam) * g0 + lam * g1
    return jnp.where(length_mask(out_len, T_out)[..., None], y, 0.0).astype(x.dtype)
