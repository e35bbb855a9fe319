"""Static, preallocated KV cache for the Qwen2 backbone (an explicit pytree).

`KVCache.k[i]` / `KVCache.v[i]`: layer i's keys/values `[B, C, K, D]` (C = capacity slots,
K = KV heads, D = head dim). Each row has its own write position `index[b]` (slots `[0, index[b])`
are written), so rows can advance independently: a row that did not emit a token does not move,
and a server slot can be refilled with a new request while the other rows are mid-generation
(`cosyjax.llm.slots`). Prompts may be *left*-padded: row b's first real slot is `start[b]`, its
token positions (RoPE) are `slot - start[b]`, and its keys before `start[b]` are masked out.
Writes are one `dynamic_update_slice` per row (a scatter over the batch), done in place inside the
jitted decode loop (the cache is loop carry / a donated argument, never copied per step).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

__all__ = ["KVCache", "init_cache", "attention_mask", "positions", "write", "slots"]


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values `[B, C, K, D]`, per-row write index `[B]`, row starts `[B]`."""

    k: tuple
    v: tuple
    index: jax.Array  # int32 [B]: number of slots written in each row
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
    return KVCache(k=zeros, v=zeros_v, index=jnp.zeros((batch,), jnp.int32), start=start)


def write(buf: jax.Array, new: jax.Array, index) -> jax.Array:
    """buf `[B, C, K, D]` <- new `[B, T, K, D]` at slots `[index[b], index[b]+T)` per row (caller keeps it in range)."""
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), buf.shape[:1])
    row = lambda b, n, i: jax.lax.dynamic_update_slice(b, n, (i, 0, 0))  # noqa: E731
    return jax.vmap(row)(buf, new.astype(buf.dtype), index)


def slots(cache: KVCache, t: int) -> jax.Array:
    """Slots `[B, T]` of `t` new entries written at each row's `cache.index`."""
    return cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def positions(cache: KVCache, t: int) -> jax.Array:
    """RoPE positions `[B, T]` of `t` new entries: slot - start (0 inside the left padding)."""
    return jnp.maximum(slots(cache, t) - cache.start[:, None], 0)


def attention_mask(cache: KVCache, t: int, kv_lengths=None) -> jax.Array:
    """Boolean `[B, 1, T, C]`: query slot q attends key slot s iff start <= s <= q (and s < kv_lengths)."""
    q = slots(cache, t)[:, :, None]  # [B, T, 1]
    s = jnp.arange(cache.capacity, dtype=jnp.int32)[None, None, :]  # [1, 1, C]
    m = (s <= q) & (s >= cache.start[:, None, None])  # [B, T, C]
    if kv_lengths is not None:
        m = m & (s < jnp.asarray(kv_lengths, jnp.int32).reshape(-1, 1, 1))
    return m[:, None]
