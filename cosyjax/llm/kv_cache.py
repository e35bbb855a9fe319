"""Static, preallocated KV cache for the Qwen2 backbone (an explicit pytree).

`KVCache.k[i]` / `KVCache.v[i]`: layer i's keys/values `[B, C, K, D]` (C = capacity slots,
K = KV heads, D = head dim). Every row shares the write position `index` (slots `[0, index)` are
written), so one `lax.dynamic_update_slice` per layer writes a step for the whole batch. Rows of
different prompt lengths are *left*-padded: row b's first real slot is `start[b]`, its token
positions (RoPE) are `slot - start[b]`, and its keys before `start[b]` are masked out.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

__all__ = ["KVCache", "init_cache", "attention_mask", "positions"]


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values `[B, C, K, D]`, shared write index `[]`, row starts `[B]`."""

    k: tuple
    v: tuple
    index: jax.Array  # int32 []: number of slots written
    start: jax.Array  # int32 [B]: first valid slot of each row (left padding)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def init_cache(num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32, start=None) -> KVCache:
    """A zero cache with `capacity` slots; `start` `[B]` (default 0) marks left padding."""
    shape = (batch, capacity, num_kv_heads, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    zeros_v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32).reshape(batch)
    return KVCache(k=zeros, v=zeros_v, index=jnp.zeros((), jnp.int32), start=start)


def write(buf: jax.Array, new: jax.Array, index) -> jax.Array:
    """buf `[B, C, K, D]` <- new `[B, T, K, D]` at slots `[index, index+T)` (caller keeps it in range)."""
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, index, 0, 0))


def slots(cache: KVCache, t: int) -> jax.Array:
    """Slots `[T]` of `t` new entries written at `cache.index`."""
    return cache.index + jnp.arange(t, dtype=jnp.int32)


def positions(cache: KVCache, t: int) -> jax.Array:
    """RoPE positions `[B, T]` of `t` new entries: slot - start (0 inside the left padding)."""
    return jnp.maximum(slots(cache, t)[None, :] - cache.start[:, None], 0)


def attention_mask(cache: KVCache, t: int, kv_lengths=None) -> jax.Array:
    """Boolean `[B, 1, T, C]`: query slot q attends key slot s iff start <= s <= q (and s < kv_lengths)."""
    q = slots(cache, t)[None, :, None]  # [1, T, 1]
    s = jnp.arange(cache.capacity, dtype=jnp.int32)[None, None, :]  # [1, 1, C]
    m = (s <= q) & (s >= cache.start[:, None, None])  # [B, T, C]
    if kv_lengths is not None:
        m = m & (s < jnp.asarray(kv_lengths, jnp.int32).reshape(-1, 1, 1))
    return m[:, None]
