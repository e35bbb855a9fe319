"""Server slots: a fixed batch of B requests decoding side by side, refilled while others run.

```
state = init_slots(cfg, num_slots=4, capacity=512, sampling='ras')
state = insert(params, cfg, state, slot=0, text=ids, prompt_text=..., prompt_speech_token=..., key=k)
state, new = step(params, cfg, state, 16)       # new[b]: int32 ids slot b emitted in these <= 16 steps
done = finished(state)                          # [B] bool: used and no longer decoding
state = release(state, 0)                       # the slot is free for the next insert
```
* The state is one `DecodeState` of B rows with static capacity C (KV slots per row) and W output
  slots, plus which slots are in use. `step` is the shared jitted decode loop
  (`cosyjax.llm.decode.loop_program`, state donated): up to n steps for every active slot; free and
  finished slots ride along masked (static shapes), their write index does not move.
* `insert` prefills one request into a free slot while the other slots keep their caches: the KV
  cache has a write index per row, so the new row simply restarts at slot 0 of its own cache row.
  (The alternative - a shared write index with the new prompt placed to end at it - would tie every
  row to the oldest one and run out of capacity on a long-lived server.) The prompt is laid out
  exactly as `generate(..., cache_len=C)` lays out a batch of one (left-padded to its bucket), and each
  slot has its own key-derived draws, min/max length and stop, so a request's tokens equal a solo
  `generate(..., cache_len=C)` run with the same key.
* `insert` and `step` donate the state's device buffers: always continue with the state they return.
* The sampler ('ras' | 'greedy' | a sampler object) is fixed per pool (it is static in the program);
  keys, uniforms and lengths are per request.
* Compilation: one insert program per prompt bucket, one loop program per pool (any n).
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.llm.config import LLMConfig
from cosyjax.llm.decode import DecodeState, init_state, loop_program, new_tokens, prefill
from cosyjax.llm.generate import _check_params, prepare, resolve_sampling
from cosyjax.llm.speech_lm import LLMInputError

__all__ = ["SlotState", "init_slots", "insert", "step", "release", "free_slots", "finished"]


@flax.struct.dataclass
class SlotState:
    """`decode`: the `DecodeState` of all B slots; `used` `[B]` bool: slot holds a request (not released)."""

    decode: DecodeState
    used: jax.Array

    @property
    def num_slots(self) -> int:
        return self.used.shape[0]

    @property
    def capacity(self) -> int:
        return self.decode.cache.capacity


def init_slots(cfg: LLMConfig, num_slots: int, capacity: int, *, sampling="ras", max_new: int | None = None
               ) -> SlotState:
    """B = `num_slots` empty slots of `capacity` KV slots each; `max_new` output slots per request
    (default capacity; also the number of per-request sampling draws kept)."""
    sampler = resolve_sampling(cfg, sampling)
    B, C = int(num_slots), int(capacity)
    if B < 1 or C < 2:
        raise LLMInputError(f"need num_slots >= 1 and capacity >= 2, got {num_slots}, {capacity}")
    W = C if max_new is None else int(max_new)
    if W < 1:
        raise LLMInputError(f"max_new must be >= 1, got {max_new}")
    N = W if sampler.needs_uniforms else 1
    zeros = np.zeros((B,), np.int32)
    dec = init_state(cfg, sampler, B, C, W, jnp.zeros((B, N, 2), jnp.float32), zeros, zeros)
    return SlotState(decode=dec, used=jnp.zeros((B,), bool))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def _insert_program(params, state: DecodeState, slot, ids, kind, start, min_len, max_len, draws, *, cfg):
    """Prefill one request (ids / kind `[1, L]`) in a fresh one-row state and write it into row `slot`."""
    row = prefill(params, cfg, ids, kind, start, min_len, max_len, draws, state.cache.capacity,
                  sampler=state.sampler, width=state.tokens.shape[1])
    put = lambda big, one: jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, axis=0)  # noqa: E731
    return jax.tree_util.tree_map(put, state, row)


def insert(params, cfg: LLMConfig, state: SlotState, slot: int, text, prompt_text=None, prompt_speech_token=None,
           *, key=None, min_len=None, max_len=None, uniforms=None) -> SlotState:
    """Prefill one request into free slot `slot` -> state (the other slots are untouched).

    text / prompt_text / prompt_speech_token: `[n]` or `[1, n]` ids as for `generate`; key: one
    `jax.random` key (same tokens as `generate(..., key=key, cache_len=capacity)`) or `uniforms` `[N, 2]`;
    min_len / max_len: ints (default: upstream's 2x / 20x the text length)."""
    B = state.num_slots
    slot = int(slot)
    if not 0 <= slot < B:
        raise LLMInputError(f"slot {slot} out of range [0, {B})")
    if bool(state.used[slot]):
        raise LLMInputError(f"slot {slot} is in use; release it first")
    _check_params(params, cfg)
    dec = state.decode
    two_d = lambda a: None if a is None else np.asarray(a).reshape(1, -1)  # noqa: E731
    p = prepare(cfg, two_d(text), None, two_d(prompt_text), None, two_d(prompt_speech_token), None, key=key,
                sampling=dec.sampler, max_len=max_len, min_len=min_len, uniforms=uniforms, cache_len=state.capacity)
    W, N = dec.tokens.shape[1], dec.draws.shape[1]
    if int(p.max_len[0]) > W:
        raise LLMInputError(f"max_len {int(p.max_len[0])} exceeds the pool's {W} output slots (init_slots max_new)")
    draws = np.full((1, N, 2), 0.5, np.float32)  # calls past max_len never happen: placeholders
    m = min(N, p.draws.shape[1])
    draws[:, :m] = np.asarray(p.draws)[:, :m]
    new = _insert_program(params, dec, jnp.asarray(slot, jnp.int32), jnp.asarray(p.ids), jnp.asarray(p.kind),
                          jnp.asarray(p.start), jnp.asarray(p.min_len), jnp.asarray(p.max_len), jnp.asarray(draws),
                          cfg=cfg)
    return SlotState(decode=new, used=state.used.at[slot].set(True))


def step(params, cfg: LLMConfig, state: SlotState, n: int) -> tuple[SlotState, list[np.ndarray]]:
    """Up to `n` decode steps for every active slot -> (state, per slot the int32 ids emitted now)."""
    if int(n) < 1:
        raise LLMInputError(f"n must be >= 1, got {n}")
    before = np.asarray(state.decode.n_out)
    dec = loop_program(params, state.decode, jnp.asarray(int(n), jnp.int32), cfg=cfg)
    return state.replace(decode=dec), new_tokens(dec, before)


def release(state: SlotState, slot: int) -> SlotState:
    """Free `slot` (its request stops decoding if it had not finished)."""
    slot = int(slot)
    if not 0 <= slot < state.num_slots:
        raise LLMInputError(f"slot {slot} out of range [0, {state.num_slots})")
    dec = state.decode.replace(active=state.decode.active.at[slot].set(False))
    return SlotState(decode=dec, used=state.used.at[slot].set(False))


def free_slots(state: SlotState) -> list[int]:
    """Indices of slots available to `insert`."""
    return [int(i) for i in np.flatnonzero(~np.asarray(state.used))]


def finished(state: SlotState) -> np.ndarray:
    """`[B]` bool: slots holding a request that has stopped (stop id or max_len)."""
    return np.asarray(state.used) & ~np.asarray(state.decode.active)
