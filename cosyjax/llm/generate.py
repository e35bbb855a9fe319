"""Speech-token generation: prefill + the whole decode loop in one jitted `lax.while_loop`.

Public API
----------
```
tokens, lengths = generate(params, cfg, text, text_len=None, prompt_text=None, prompt_text_len=None,
                           prompt_speech_token=None, prompt_speech_token_len=None, embedding=None, *,
                           key=None, sampling='ras', max_len=None, min_len=None, uniforms=None,
                           cache_len=None)
```
* `params`: the `convert/llm.py` tree (optionally `speech_lm.cast_params(params, 'bfloat16')` with
  `cfg.replace(dtype='bfloat16')`); `cfg`: `LLMConfig.from_model_config(model_cfg)`.
* `text` `[B, Lt]` text ids (the tts text; for cosyvoice3 an instruction prefix ending in
  `<|endofprompt|>` may sit here or in `prompt_text`), `prompt_text` `[B, Lp]`,
  `prompt_speech_token` `[B, P]` (each optional except text; `*_len` `[B]` default to the full
  width). 1-D arrays mean B = 1. `embedding` (speaker x-vector) is accepted and ignored, as in
  upstream `Qwen2LM`/`CosyVoice3LM`.
* `key`: a `jax.random` key (split into one key per row) or `[B]` keys; required for 'ras' unless
  `uniforms` `[B, N, 2]` (or `[N, 2]`, shared) is given: row `i` holds the two uniforms of the i-th
  sampling call (nucleus draw, RAS fallback draw), replayed by inverse CDF.
* `sampling`: 'ras' (upstream ras_sampling: top_p/top_k/win/tau_r from the yaml) or 'greedy'.
* `max_len` / `min_len`: int or `[B]`; default `int(20 * len(text))` / `int(2 * len(text))` per row.
  Set `min_len = max_len = n` with `cfg.replace(min_len_mask='stop_set')` for a fixed length.
* `cache_len`: fixed KV-cache capacity (prompt + generated slots); default = bucketed
  prompt length + bucketed max_len.
* Returns `tokens` `[B, W]` int32 (W = bucketed max_len; `tokens[b, :lengths[b]]` are the speech
  tokens, the rest -1; stop tokens are never included) and `lengths` `[B]` int32, as jax arrays.

`generate_detailed(...)` takes the same arguments plus `record_topk` / `record_full_steps` and returns a
`Generation` with per-step log-prob records and the RAS trace (parity/debugging); `forced_tokens`
(`{step: token}` or an int array, -1 = not forced) makes sampling call `step` emit `token` instead of
the sampled id (everything else unchanged: stop handling, feed-back, records).

`generate_traced(params, cfg, ids, kind, start, min_len, max_len, draws, *, method, max_new, capacity)`
is the same decode program on already prepared arrays (`prepare(...)` fields), traceable: use it inside
`jax.jit` / `jax.vmap` (e.g. `cosyjax.pipeline.synthesize`).

`generate_stream(..., hop=25)` is a Python generator over the same state: each `next()` runs one
jitted chunk of up to `hop` decode steps (the KV cache stays on device) and yields a list of B
numpy int32 arrays with the tokens each row produced in that chunk (empty once a row has stopped).

The flow gets upstream `llm_job`'s silent-token-filtered tokens: apply
`speech_lm.filter_silent_tokens(cfg, tokens[b, :lengths[b]])` (cosyvoice3; a no-op for cosyvoice2).
Text arriving as a stream: `cosyjax.llm.bistream.generate_bistream`.

Batching and compilation: rows of different lengths are left-padded into one call; every row gets
exactly the tokens it would get alone (per-row keys, per-row min/max length and stop). Prompt
length and max_len are rounded up to buckets (`bucket_length`), so prompts of another length in the
same bucket reuse the compiled program.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.llm import kv_cache as kvc
from cosyjax.llm import sampling as smp
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.speech_lm import (
    LLMInputError, SpeechLM, build_prompt, length_limits, new_cache, prompt_rows,
)

__all__ = ["DecodeState", "Generation", "bucket_length", "generate", "generate_detailed", "generate_stream",
           "generate_traced", "prepare"]


def bucket_length(n: int, minimum: int = 16) -> int:
    """Round a length up: powers of two up to 1024, then multiples of 512."""
    n = max(int(n), 1)
    if n <= minimum:
        return minimum
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 512) * 512


# ---------------------------------------------------------------------------------------------
# device state and one decode step

@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries (all arrays; shapes fixed for a compiled program)."""

    cache: kvc.KVCache
    logp: jax.Array  # [B, V] float32: log-probs for the next sampling call
    step: jax.Array  # [] int32: sampling calls made so far
    n_out: jax.Array  # [B] int32: tokens emitted per row
    active: jax.Array  # [B] bool
    history: jax.Array  # [B, win_size] int32 ring buffer of emitted tokens (-1 = empty)
    min_len: jax.Array  # [B] int32
    max_len: jax.Array  # [B] int32
    draws: jax.Array  # [B, N, 2] float32 uniforms of sampling calls 0..N-1 (from keys or injected)


def _apply(cfg: LLMConfig, params, method, *args):
    return SpeechLM(cfg).apply({"params": params}, *args, method=method)


def prefill(params, cfg: LLMConfig, ids, kind, start, min_len, max_len, draws, capacity: int) -> DecodeState:
    """Embed the left-padded prompt, run it through an empty cache and return the decode state."""
    B, L = ids.shape
    cache = new_cache(cfg, B, capacity, start)
    x = _apply(cfg, params, SpeechLM.embed_prompt, ids, kind)
    h, cache = _apply(cfg, params, SpeechLM.forward, x, cache)
    logp = _apply(cfg, params, SpeechLM.logp, h[:, -1])
    return DecodeState(
        cache=cache, logp=logp, step=jnp.zeros((), jnp.int32), n_out=jnp.zeros((B,), jnp.int32),
        active=max_len > 0, history=jnp.full((B, cfg.win_size), -1, jnp.int32),
        min_len=min_len, max_len=max_len, draws=draws)


def decode_step(params, cfg: LLMConfig, method: str, state: DecodeState, forced=None):
    """Sample at `state.step`, record, feed the token back -> (state, emitted `[B]` (-1 = none), info).

    forced: None or int32 `[B, N]`: where `forced[b, step] >= 0` row b takes that id instead of the
    sampled one. info = (unmasked logp `[B, V]`, fallback `[B]`, nucleus size `[B]`, was-active `[B]`)."""
    was_active = state.active
    masked = smp.suppress_stop(cfg, state.logp, state.step < state.min_len)
    u = smp.draw_uniforms(state.draws, state.step)
    tok, fallback, n_keep = smp.sample(cfg, method, masked, state.history, u)
    if forced is not None:
        f = jax.lax.dynamic_index_in_dim(forced, state.step, axis=1, keepdims=False)
        tok = jnp.where(f >= 0, f, tok)
    lo, hi = cfg.stop_ids
    emit = was_active & ~((tok >= lo) & (tok < hi))
    n_out = state.n_out + emit.astype(jnp.int32)
    active = emit & (n_out < state.max_len)
    W = state.history.shape[1]
    slot = (jnp.arange(W) == state.step % W)[None, :] & emit[:, None]
    history = jnp.where(slot, tok[:, None], state.history)
    feed = jnp.where(emit, tok, 0)[:, None]
    x = _apply(cfg, params, SpeechLM.embed_speech, feed)
    h, cache = _apply(cfg, params, SpeechLM.forward, x, state.cache)
    logp = _apply(cfg, params, SpeechLM.logp, h[:, 0])
    new = state.replace(cache=cache, logp=logp, step=state.step + 1, n_out=n_out, active=active, history=history)
    return new, jnp.where(emit, tok, -1), (state.logp, fallback, n_keep, was_active)


# ---------------------------------------------------------------------------------------------
# jitted programs

@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new", "capacity", "record_topk", "record_full"))
def _generate_program(params, ids, kind, start, min_len, max_len, draws, forced=None, *, cfg, method, max_new,
                      capacity, record_topk=0, record_full=0):
    B = ids.shape[0]
    V = cfg.speech_vocab_size
    state = prefill(params, cfg, ids, kind, start, min_len, max_len, draws, capacity)
    out = jnp.full((B, max_new), -1, jnp.int32)
    rec = {}
    if record_topk:
        rec["topk_values"] = jnp.zeros((B, max_new, record_topk), jnp.float32)
        rec["topk_indices"] = jnp.zeros((B, max_new, record_topk), jnp.int32)
        rec["trace"] = jnp.full((B, max_new, 3), -1, jnp.int32)
    if record_full:
        rec["full"] = jnp.zeros((B, record_full, V), jnp.float32)

    def cond(carry):
        st = carry[0]
        return (st.step < max_new) & jnp.any(st.active)

    def body(carry):
        st, out, rec = carry
        i = st.step
        st, tok, (logp, fb, nk, was) = decode_step(params, cfg, method, st, forced)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        rec = dict(rec)
        if record_topk:
            v, ix = jax.lax.top_k(logp, record_topk)
            keep = was[:, None, None]
            old_v = jax.lax.dynamic_slice_in_dim(rec["topk_values"], i, 1, axis=1)
            old_i = jax.lax.dynamic_slice_in_dim(rec["topk_indices"], i, 1, axis=1)
            rec["topk_values"] = jax.lax.dynamic_update_slice_in_dim(
                rec["topk_values"], jnp.where(keep, v[:, None], old_v), i, axis=1)
            rec["topk_indices"] = jax.lax.dynamic_update_slice_in_dim(
                rec["topk_indices"], jnp.where(keep, ix[:, None].astype(jnp.int32), old_i), i, axis=1)
            tr = jnp.stack([jnp.where(was, tok, -1), fb.astype(jnp.int32), nk], axis=-1)[:, None]
            rec["trace"] = jax.lax.dynamic_update_slice_in_dim(
                rec["trace"], jnp.where(was[:, None, None], tr, -1), i, axis=1)
        if record_full:
            j = jnp.minimum(i, record_full - 1)
            old = jax.lax.dynamic_slice_in_dim(rec["full"], j, 1, axis=1)
            new = jnp.where((was & (i < record_full))[:, None, None], logp[:, None], old)
            rec["full"] = jax.lax.dynamic_update_slice_in_dim(rec["full"], new, j, axis=1)
        return st, out, rec

    state, out, rec = jax.lax.while_loop(cond, body, (state, out, rec))
    return out, state.n_out, rec


def generate_traced(params, cfg: LLMConfig, ids, kind, start, min_len, max_len, draws, *, method: str, max_new: int,
                    capacity: int, forced_tokens=None):
    """Prefill + the whole decode loop on prepared arrays -> (tokens `[B, max_new]` int32 (-1 = none), lengths `[B]`).

    Traceable: usable inside `jax.jit` / `jax.vmap` (every array argument may be a tracer; `cfg`,
    `method`, `max_new`, `capacity` are static). Inputs as `prepare(...)` builds them: ids / kind
    `[B, L]` int32 left-padded prompt layout, start / min_len / max_len `[B]` int32, draws `[B, N, 2]`
    float32 sampling uniforms (`sampling.uniforms_from_keys`; any `[B, 1, 2]` for 'greedy'), method
    'ras' | 'greedy', max_new output slots, capacity KV-cache slots (prompt + max_new).
    forced_tokens: None or int32 `[B, max_new]` (-1 = sample; >= 0 = emit this id at that sampling call).
    No input validation: use `generate` for checked host inputs.
    """
    out, lengths, _ = _generate_program(params, ids, kind, start, min_len, max_len, draws, forced_tokens, cfg=cfg,
                                        method=method, max_new=max_new, capacity=capacity)
    return out, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "capacity"))
def _prefill_program(params, ids, kind, start, min_len, max_len, draws, *, cfg, capacity):
    return prefill(params, cfg, ids, kind, start, min_len, max_len, draws, capacity)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "hop"), donate_argnums=(1,))
def _chunk_program(params, state, *, cfg, method, hop):
    """Up to `hop` decode steps (fewer if every row stops) -> (state, tokens `[B, hop]` (-1 = none))."""
    B = state.n_out.shape[0]

    def cond(carry):
        k, st, _ = carry
        return (k < hop) & jnp.any(st.active)

    def body(carry):
        k, st, out = carry
        st, tok, _ = decode_step(params, cfg, method, st)
        return k + 1, st, jax.lax.dynamic_update_slice(out, tok[:, None], (0, k))

    _, state, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, jnp.full((B, hop), -1, jnp.int32)))
    return state, out


# ---------------------------------------------------------------------------------------------
# host side: validation, layout, buckets, randomness

@dataclasses.dataclass(frozen=True)
class Prepared:
    """Device-ready inputs of one `generate` call and the static sizes of its program."""

    ids: np.ndarray
    kind: np.ndarray
    start: np.ndarray
    min_len: np.ndarray
    max_len: np.ndarray
    draws: jax.Array  # [B, N, 2] float32 uniforms per sampling call
    max_new: int
    capacity: int
    method: str


def _row_keys(key, B: int):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.shape == () if typed else key.shape == (2,)
    if single:
        return jax.random.split(key, B)
    if key.shape[0] != B:
        raise LLMInputError(f"key has {key.shape[0]} rows, expected 1 key or {B} (one per row)")
    return key


def prepare(cfg: LLMConfig, text, text_len=None, prompt_text=None, prompt_text_len=None, prompt_speech_token=None,
            prompt_speech_token_len=None, *, key=None, sampling="ras", max_len=None, min_len=None, uniforms=None,
            cache_len=None) -> Prepared:
    """Validate inputs (clear `LLMInputError`s) and build the padded, bucketed program inputs."""
    if sampling not in smp.SAMPLERS:
        raise LLMInputError(f"sampling must be one of {smp.SAMPLERS}, got {sampling!r}")
    text_rows, pt_rows, ps_rows = prompt_rows(cfg, text, text_len, prompt_text, prompt_text_len,
                                              prompt_speech_token, prompt_speech_token_len)
    B = len(text_rows)
    mins, maxs = length_limits(cfg, text_rows, min_len, max_len)
    n = np.array([2 + len(a) + len(b) + len(c) for a, b, c in zip(text_rows, pt_rows, ps_rows)])
    over = n + maxs > cfg.max_position_embeddings
    if np.any(over):
        b = int(np.argmax(over))
        raise LLMInputError(f"row {b}: prompt of {n[b]} positions + max_len {maxs[b]} exceeds "
                            f"max_position_embeddings {cfg.max_position_embeddings}")
    L = bucket_length(int(n.max()))
    need = int(max(int(maxs.max()), 1))
    if cache_len is None:
        max_new = bucket_length(need)
        capacity = L + max_new
    else:
        capacity = int(cache_len)
        if int(n.max()) + need > capacity:
            raise LLMInputError(f"prompt of {int(n.max())} positions + max_len {need} does not fit in "
                                f"cache_len {capacity}")
        L = min(L, capacity - need)
        max_new = capacity - L
    layout = build_prompt(cfg, text_rows, pt_rows, ps_rows, L)
    if uniforms is not None:
        u = np.asarray(uniforms, np.float32)
        if u.ndim == 2:
            u = np.broadcast_to(u[None], (B,) + u.shape)
        if u.ndim != 3 or u.shape[0] != B or u.shape[2] != 2:
            raise LLMInputError(f"uniforms must be [B, N, 2] or [N, 2], got {np.shape(uniforms)}")
        if u.shape[1] < need:
            raise LLMInputError(f"uniforms cover {u.shape[1]} sampling calls, max_len needs {need}")
        if np.any((u < 0) | (u >= 1)):
            raise LLMInputError("uniforms must lie in [0, 1)")
        draws = np.full((B, max_new, 2), 0.5, np.float32)
        m = min(max_new, u.shape[1])
        draws[:, :m] = u[:, :m]
        draws = jnp.asarray(draws)
    elif sampling == "greedy":
        draws = jnp.zeros((B, 1, 2), jnp.float32)
    else:
        if key is None:
            raise LLMInputError("sampling='ras' needs a jax.random key (key=...) or injected uniforms")
        draws = smp.uniforms_from_keys(_row_keys(key, B), max_new)
    return Prepared(ids=layout.ids, kind=layout.kind, start=layout.start, min_len=mins, max_len=maxs, draws=draws,
                    max_new=max_new, capacity=capacity, method=sampling)


def _check_params(params, cfg: LLMConfig):
    try:
        emb = params["speech_embedding"]["embedding"]
    except (KeyError, TypeError) as e:
        raise LLMInputError("params must be the convert/llm.py tree (no speech_embedding found)") from e
    if tuple(emb.shape) != (cfg.speech_vocab_size, cfg.hidden_size):
        raise LLMInputError(f"params speech_embedding {tuple(emb.shape)} does not match cfg "
                            f"({cfg.speech_vocab_size}, {cfg.hidden_size}) - wrong version or model?")


@dataclasses.dataclass(frozen=True)
class Generation:
    """`generate_detailed` result (jax arrays). Records are per row and per sampling call."""

    tokens: jax.Array  # [B, W] int32, -1 after lengths
    lengths: jax.Array  # [B] int32
    logp_topk_values: jax.Array | None = None  # [B, W, k] unmasked log-probs, descending
    logp_topk_indices: jax.Array | None = None  # [B, W, k]
    logp_full: jax.Array | None = None  # [B, n, V] first n steps, unmasked
    trace: jax.Array | None = None  # [B, W, 3]: (sampled id incl. stop ids, fallback?, nucleus size), -1 unused


def generate_detailed(params, cfg: LLMConfig, text, text_len=None, prompt_text=None, prompt_text_len=None,
                      prompt_speech_token=None, prompt_speech_token_len=None, embedding=None, *, key=None,
                      sampling="ras", max_len=None, min_len=None, uniforms=None, cache_len=None,
                      record_topk: int = 0, record_full_steps: int = 0, forced_tokens=None) -> Generation:
    """`generate` plus optional per-step log-prob records (`record_topk` values/ids, full rows of the
    first `record_full_steps` calls) and the RAS trace.

    forced_tokens: `{step: token}` (every row) or an int array `[B, N]` / `[N]` (-1 = not forced):
    sampling call `step` emits `token` instead of the sampled id (a stop id ends the row); stop-id
    masking before min_len, feed-back and records are unchanged. Steps past the program's output
    slots are never reached. The records hold the model's log-probs, not the forced choice."""
    del embedding  # Qwen2LM / CosyVoice3LM do not use the speaker embedding
    _check_params(params, cfg)
    p = prepare(cfg, text, text_len, prompt_text, prompt_text_len, prompt_speech_token, prompt_speech_token_len,
                key=key, sampling=sampling, max_len=max_len, min_len=min_len, uniforms=uniforms,
                cache_len=cache_len)
    forced = None if forced_tokens is None else _forced_array(cfg, forced_tokens, len(p.max_len), p.max_new)
    out, lengths, rec = _generate_program(
        params, jnp.asarray(p.ids), jnp.asarray(p.kind), jnp.asarray(p.start), jnp.asarray(p.min_len),
        jnp.asarray(p.max_len), p.draws, forced, cfg=cfg, method=p.method, max_new=p.max_new, capacity=p.capacity,
        record_topk=int(record_topk), record_full=int(record_full_steps))
    return Generation(tokens=out, lengths=lengths, logp_topk_values=rec.get("topk_values"),
                      logp_topk_indices=rec.get("topk_indices"), logp_full=rec.get("full"), trace=rec.get("trace"))


def _forced_array(cfg: LLMConfig, forced_tokens, B: int, max_new: int) -> jax.Array:
    """`{step: token}` or int `[B, N]` / `[N]` (-1 = not forced) -> int32 `[B, max_new]`."""
    out = np.full((B, max_new), -1, np.int32)
    if isinstance(forced_tokens, dict):
        for step, tok in forced_tokens.items():
            step, tok = int(step), int(tok)
            if step < 0:
                raise LLMInputError(f"forced_tokens: step {step} is negative")
            if not 0 <= tok < cfg.speech_vocab_size:
                raise LLMInputError(f"forced_tokens: token {tok} at step {step} is not a speech id "
                                    f"[0, {cfg.speech_vocab_size})")
            if step < max_new:
                out[:, step] = tok
        return jnp.asarray(out)
    a = np.asarray(forced_tokens)
    if a.ndim == 1:
        a = np.broadcast_to(a[None], (B, a.shape[0]))
    if a.ndim != 2 or a.shape[0] != B or not np.issubdtype(a.dtype, np.integer):
        raise LLMInputError(f"forced_tokens must be a {{step: token}} dict or an int array [{B}, N] / [N], "
                            f"got {a.dtype} {np.shape(forced_tokens)}")
    if np.any((a < -1) | (a >= cfg.speech_vocab_size)):
        raise LLMInputError(f"forced_tokens entries must be -1 (not forced) or speech ids [0, {cfg.speech_vocab_size})")
    m = min(max_new, a.shape[1])
    out[:, :m] = a[:, :m]
    return jnp.asarray(out)


def generate(params, cfg: LLMConfig, text, text_len=None, prompt_text=None, prompt_text_len=None,
             prompt_speech_token=None, prompt_speech_token_len=None, embedding=None, *, key=None, sampling="ras",
             max_len=None, min_len=None, uniforms=None, cache_len=None):
    """Generate speech tokens -> (tokens `[B, W]` int32 (-1 padded), lengths `[B]`). See the module doc."""
    g = generate_detailed(params, cfg, text, text_len, prompt_text, prompt_text_len, prompt_speech_token,
                          prompt_speech_token_len, embedding, key=key, sampling=sampling, max_len=max_len,
                          min_len=min_len, uniforms=uniforms, cache_len=cache_len)
    return g.tokens, g.lengths


def generate_stream(params, cfg: LLMConfig, text, text_len=None, prompt_text=None, prompt_text_len=None,
                    prompt_speech_token=None, prompt_speech_token_len=None, embedding=None, *, key=None,
                    sampling="ras", max_len=None, min_len=None, uniforms=None, cache_len=None,
                    hop: int = 25) -> Iterator[list[np.ndarray]]:
    """Yield the tokens of each row in chunks of up to `hop` decode steps (same tokens as `generate`)."""
    del embedding
    if int(hop) < 1:
        raise LLMInputError(f"hop must be >= 1, got {hop}")
    _check_params(params, cfg)
    p = prepare(cfg, text, text_len, prompt_text, prompt_text_len, prompt_speech_token, prompt_speech_token_len,
                key=key, sampling=sampling, max_len=max_len, min_len=min_len, uniforms=uniforms,
                cache_len=cache_len)
    state = _prefill_program(params, jnp.asarray(p.ids), jnp.asarray(p.kind), jnp.asarray(p.start),
                             jnp.asarray(p.min_len), jnp.asarray(p.max_len), p.draws, cfg=cfg, capacity=p.capacity)
    while bool(jnp.any(state.active)):
        state, out = _chunk_program(params, state, cfg=cfg, method=p.method, hop=int(hop))
        out = np.asarray(out)
        rows = [out[b][out[b] >= 0] for b in range(out.shape[0])]
        if any(r.size for r in rows):
            yield rows
