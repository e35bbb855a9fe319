"""The decode loop: one jitted `while` over a `DecodeState`, shared by every way of generating.

* `generate` / `generate_traced`: prefill + `decode_loop(..., n_steps=max_new)` in one program; the
  loop ends when every row stopped (stop id or max_len) or after n_steps sampling calls.
* `generate_stream` and the server slots (`cosyjax.llm.slots`): the jitted `loop_program` with the
  state donated, called repeatedly with a step budget (`n_steps` is a traced scalar: another budget
  does not recompile); the host reads the new tokens from `state.tokens` between calls.
* bistream (`cosyjax.llm.bistream`): the same `loop_program` per segment; a segment ends on a
  sampled special id (never fed back) or a fill budget (`max_len`), with `allow_fill` keeping the
  fill id samplable while `min_len` suppresses the other stop ids.

Everything the loop changes lives in the state (KV cache, log-probs, per-row counters, the output
buffer, optional per-step records), so the loop is `state -> state`, like gemma's `SamplingState`.
Each row has its own sampling-call counter `step`, draws, min/max length and KV write index, so rows
that start at different times (server slots) decode exactly as they would alone.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.llm import kv_cache as kvc
from cosyjax.llm import sampling as smp
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.speech_lm import SpeechLM, new_cache

__all__ = ["DecodeState", "init_records", "init_state", "feed", "prefill", "decode_step", "decode_loop",
           "loop_program", "new_tokens"]


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries (arrays with fixed shapes per compiled program; the sampler
    and `allow_fill` are static). B rows, C cache slots, W output slots, N sampling calls."""

    cache: kvc.KVCache
    logp: jax.Array  # [B, V] float32: log-probs for the next sampling call
    step: jax.Array  # [B] int32: sampling calls made by each row (index into draws / forced / records)
    n_out: jax.Array  # [B] int32: tokens emitted per row
    active: jax.Array  # [B] bool
    history: jax.Array  # [B, H] int32: the last H emitted tokens, newest last (-1 = empty)
    min_len: jax.Array  # [B] int32: stop ids are suppressed while step < min_len
    max_len: jax.Array  # [B] int32: a row stops once n_out reaches it
    draws: jax.Array  # [B, N, 2] float32 uniforms of sampling calls 0..N-1 (from keys or injected)
    tokens: jax.Array  # [B, W] int32 output buffer: tokens[b, :n_out[b]] are the emitted ids, -1 after
    stop: jax.Array  # [B] int32: the stop id that ended the row, -1 if none (max_len, budget, not started)
    forced: jax.Array | None = None  # [B, N] int32: >= 0 replaces the sampled id of that call
    records: dict | None = None  # per-call log-prob records (`init_records`)
    sampler: Any = flax.struct.field(pytree_node=False, default=None)  # sampling.RAS | Greedy | TopKTopP
    allow_fill: bool = flax.struct.field(pytree_node=False, default=False)  # bistream: fill id never suppressed


def _apply(cfg: LLMConfig, params, method, *args):
    return SpeechLM(cfg).apply({"params": params}, *args, method=method)


def init_records(batch: int, width: int, vocab: int, record_topk: int = 0, record_full: int = 0) -> dict | None:
    """Empty per-call records: top-k log-probs + RAS trace `[B, W, .]`, full rows `[B, record_full, V]`."""
    rec = {}
    if record_topk:
        rec["topk_values"] = jnp.zeros((batch, width, record_topk), jnp.float32)
        rec["topk_indices"] = jnp.zeros((batch, width, record_topk), jnp.int32)
        rec["trace"] = jnp.full((batch, width, 3), -1, jnp.int32)
    if record_full:
        rec["full"] = jnp.zeros((batch, record_full, vocab), jnp.float32)
    return rec or None


def init_state(cfg: LLMConfig, sampler, batch: int, capacity: int, width: int, draws, min_len, max_len, *,
               start=None, forced=None, records=None, allow_fill: bool = False) -> DecodeState:
    """An empty cache of `capacity` slots and counters at zero; rows are active iff max_len > 0."""
    sampler = smp.resolve(cfg, sampler)
    max_len = jnp.asarray(max_len, jnp.int32)
    return DecodeState(
        cache=new_cache(cfg, batch, capacity, start),
        logp=jnp.zeros((batch, cfg.speech_vocab_size), jnp.float32),
        step=jnp.zeros((batch,), jnp.int32), n_out=jnp.zeros((batch,), jnp.int32), active=max_len > 0,
        history=jnp.full((batch, sampler.history_size), -1, jnp.int32),
        min_len=jnp.asarray(min_len, jnp.int32), max_len=max_len, draws=jnp.asarray(draws, jnp.float32),
        tokens=jnp.full((batch, width), -1, jnp.int32), stop=jnp.full((batch,), -1, jnp.int32),
        forced=forced, records=records, sampler=sampler, allow_fill=allow_fill)


def feed(params, cfg: LLMConfig, state: DecodeState, ids, kind, n_new=None) -> DecodeState:
    """Run inputs ids / kind `[B, T]` (`speech_lm.build_prompt` kinds) through the cache at each row's
    write index -> state with the cache advanced by `n_new` `[B]` (default T: left-padded prompts) and
    `logp` taken after each row's last real input (rows with n_new = 0 keep theirs)."""
    T = ids.shape[1]
    x = _apply(cfg, params, SpeechLM.embed_prompt, ids, kind)
    n = jnp.broadcast_to(jnp.asarray(T if n_new is None else n_new, jnp.int32), ids.shape[:1])
    h, cache = _apply(cfg, params, SpeechLM.forward, x, state.cache, n)
    last = jnp.take_along_axis(h, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
    logp = jnp.where((n > 0)[:, None], _apply(cfg, params, SpeechLM.logp, last), state.logp)
    return state.replace(cache=cache, logp=logp)


def prefill(params, cfg: LLMConfig, ids, kind, start, min_len, max_len, draws, capacity: int, *, sampler="ras",
            width: int | None = None, forced=None, records=None) -> DecodeState:
    """Embed the left-padded prompt ids / kind `[B, L]`, run it through an empty cache of `capacity`
    slots -> the decode state (output buffer of `width` slots, default capacity - L)."""
    B, L = ids.shape
    width = capacity - L if width is None else int(width)
    state = init_state(cfg, sampler, B, capacity, width, draws, min_len, max_len, start=start, forced=forced,
                       records=records)
    return feed(params, cfg, state, ids, kind)


def decode_step(params, cfg: LLMConfig, method, state: DecodeState, forced=None):
    """Sample each active row's next call, feed emitted tokens back -> (state, emitted `[B]` (-1 = none), info).

    method: None (the state's sampler), 'ras' | 'greedy' or a sampler object. forced: None (the
    state's) or int32 `[B, N]`: where `forced[b, step[b]] >= 0` row b takes that id instead of the
    sampled one. info = (unmasked logp `[B, V]`, fallback `[B]`, nucleus size `[B]`, was-active `[B]`)."""
    sampler = state.sampler if method is None else smp.resolve(cfg, method)
    forced = state.forced if forced is None else forced
    was_active = state.active
    masked = smp.suppress_stop(cfg, state.logp, state.step < state.min_len, allow_fill=state.allow_fill)
    u = smp.draw_uniforms(state.draws, state.step)
    tok, fallback, n_keep = sampler.sample(masked, state.history, u)
    if forced is not None:
        i = jnp.minimum(state.step, forced.shape[1] - 1)
        f = jnp.take_along_axis(forced, i[:, None], axis=1)[:, 0]
        tok = jnp.where((f >= 0) & (state.step < forced.shape[1]), f, tok)
    lo, hi = cfg.stop_ids
    is_stop = (tok >= lo) & (tok < hi)
    emit = was_active & ~is_stop
    rows = jnp.arange(tok.shape[0])
    # out-of-range index = no write (mode='drop'): only emitting rows touch the buffer
    tokens = state.tokens.at[rows, jnp.where(emit, state.n_out, state.tokens.shape[1])].set(tok, mode="drop")
    n_out = state.n_out + emit.astype(jnp.int32)
    shifted = jnp.concatenate([state.history[:, 1:], tok[:, None]], axis=1)
    history = jnp.where(emit[:, None], shifted, state.history)
    feed_tok = jnp.where(emit, tok, 0)[:, None]
    x = _apply(cfg, params, SpeechLM.embed_speech, feed_tok)
    h, cache = _apply(cfg, params, SpeechLM.forward, x, state.cache, emit.astype(jnp.int32))
    logp = jnp.where(emit[:, None], _apply(cfg, params, SpeechLM.logp, h[:, 0]), state.logp)
    new = state.replace(cache=cache, logp=logp, step=state.step + was_active.astype(jnp.int32), n_out=n_out,
                        active=emit & (n_out < state.max_len), history=history, tokens=tokens,
                        stop=jnp.where(was_active & is_stop, tok, state.stop))
    return new, jnp.where(emit, tok, -1), (state.logp, fallback, n_keep, was_active)


def _record(rec: dict, step, emitted, info) -> dict:
    """Write call `step` `[B]` of each row that was active into the records."""
    logp, fallback, n_keep, was = info
    B = logp.shape[0]
    rows = jnp.arange(B)
    rec = dict(rec)
    if "topk_values" in rec:
        W = rec["topk_values"].shape[1]
        at = jnp.where(was, step, W)  # inactive rows: dropped write
        v, ix = jax.lax.top_k(logp, rec["topk_values"].shape[2])
        rec["topk_values"] = rec["topk_values"].at[rows, at].set(v, mode="drop")
        rec["topk_indices"] = rec["topk_indices"].at[rows, at].set(ix.astype(jnp.int32), mode="drop")
        tr = jnp.stack([emitted, fallback.astype(jnp.int32), n_keep], axis=-1)
        rec["trace"] = rec["trace"].at[rows, at].set(tr, mode="drop")
    if "full" in rec:
        n = rec["full"].shape[1]
        rec["full"] = rec["full"].at[rows, jnp.where(was, step, n)].set(logp, mode="drop")
    return rec


def decode_loop(params, cfg: LLMConfig, state: DecodeState, n_steps) -> DecodeState:
    """Up to `n_steps` decode steps (fewer once no row is active) -> state. Traceable."""

    def cond(carry):
        k, st = carry
        return (k < n_steps) & jnp.any(st.active)

    def body(carry):
        k, st = carry
        step = st.step
        st, emitted, info = decode_step(params, cfg, None, st)
        if st.records is not None:
            st = st.replace(records=_record(st.records, step, emitted, info))
        return k + 1, st

    _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    return state


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def loop_program(params, state: DecodeState, n_steps, *, cfg: LLMConfig) -> DecodeState:
    """`decode_loop` jitted with the state donated (the KV cache is updated in place)."""
    return decode_loop(params, cfg, state, jnp.asarray(n_steps, jnp.int32))


def new_tokens(state: DecodeState, before) -> list[np.ndarray]:
    """Host side: per row, the ids emitted since `before` `[B]` (n_out of an earlier state) -> B int32 arrays."""
    n = np.asarray(state.n_out)
    toks = np.asarray(state.tokens)
    before = np.broadcast_to(np.asarray(before), n.shape)
    return [toks[b, int(before[b]):int(n[b])].astype(np.int32) for b in range(n.shape[0])]
