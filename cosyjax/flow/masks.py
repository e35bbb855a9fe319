"""Boolean masks for the flows (upstream `cosyvoice/utils/mask.py`), True = valid / attend.

* `padding_mask(lengths, T)` -> [B, T]: `~make_pad_mask(lengths, T)`.
* `chunk_mask(T, chunk)` -> [T, T]: `subsequent_chunk_mask` with full left context
  (query i attends key j iff j < (i // chunk + 1) * chunk); upstream ignores `num_left_chunks`.
* `add_optional_chunk_mask(key_mask, static_chunk_size)` -> [B, T, T]: key mask AND (streaming)
  chunk mask, with upstream's rule that a query row whose keys are all masked attends to every
  key instead (`chunk_masks[chunk_masks.sum(-1) == 0] = True`).
* `attention_mask(key_mask, static_chunk_size)` -> [B, 1, T|1, T]: the same mask in the layout
  `cosyjax.nn.attention.attention` takes, without materialising [T, T] when not streaming.
"""
from __future__ import annotations

import jax.numpy as jnp

from cosyjax.nn.layers import length_mask

__all__ = ["padding_mask", "chunk_mask", "add_optional_chunk_mask", "attention_mask", "fix_empty_rows"]


padding_mask = length_mask  # `~make_pad_mask(lengths, T)`: the one padding mask (cosyjax.nn.layers)


def chunk_mask(T: int, chunk: int):
    """[T, T] bool block-causal mask, full left context (upstream `subsequent_chunk_mask`)."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    pos = jnp.arange(T)
    block_end = (pos // chunk + 1) * chunk
    return pos[None, :] < block_end[:, None]


def fix_empty_rows(mask):
    """Rows (last axis) with no True entry become all True (upstream `add_optional_chunk_mask`)."""
    return mask | ~jnp.any(mask, axis=-1, keepdims=True)


def add_optional_chunk_mask(key_mask, static_chunk_size: int = 0):
    """key_mask [B, T] bool -> [B, T, T] bool (chunked when `static_chunk_size` > 0)."""
    key_mask = jnp.asarray(key_mask, jnp.bool_)
    B, T = key_mask.shape
    m = key_mask[:, None, :]
    if static_chunk_size > 0:
        m = m & chunk_mask(T, static_chunk_size)[None]
    else:
        m = jnp.broadcast_to(m, (B, T, T))
    return fix_empty_rows(m)


def attention_mask(key_mask, static_chunk_size: int = 0):
    """key_mask [B, T] -> [B, 1, T, T] (streaming) or [B, 1, 1, T] (not streaming); empty rows fixed.

    Without chunking every query row of a batch row has the same keys, so one row suffices.
    """
    key_mask = jnp.asarray(key_mask, jnp.bool_)
    if static_chunk_size > 0:
        return add_optional_chunk_mask(key_mask, static_chunk_size)[:, None]
    return fix_empty_rows(key_mask)[:, None, None, :]
