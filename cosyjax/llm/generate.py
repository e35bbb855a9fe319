"""Speech-token generation: prefill + the whole decode loop (`cosyjax.llm.decode`) in one jitted program.

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
* `sampling`: 'ras' (upstream ras_sampling: top_p/top_k/win/tau_r from the yaml), 'greedy', or a
  sampler object (`sampling.RAS(...)`, `Greedy()`, `TopKTopP(top_k, top_p, temperature)`).
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

`generate_stream(..., hop=25)` is a Python generator over the same loop: each `next()` runs the jitted
loop program for up to `hop` decode steps on the donated state (the KV cache stays on device) and
reads the new tokens from the state's output buffer; it yields a list of B
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

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.llm import sampling as smp
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.decode import (  # noqa: F401  (DecodeState, decode_step, prefill, _apply: public here too)
    DecodeState, _apply, decode_loop, decode_step, init_records, loop_program, new_tokens, prefill,
)
from cosyjax.llm.speech_lm import LLMInputError, build_prompt, length_limits, prompt_rows

__all__ = ["DecodeState", "Generation", "Prepared", "bucket_length", "decode_step", "generate", "generate_detailed",
           "generate_stream", "generate_traced", "prefill", "prepare"]


def bucket_length(n: int, minimum: int = 16) -> int:
    """Round a length up: powers of two up to 1024, then multiples of 512."""
    n = max(int(n), 1)
    if n <= minimum:
        return minimum
    if n <= 1024:
        return 1 << (n - 1).bit_length()
    return -(-n // 512) * 512


# ---------------------------------------------------------------------------------------------
# jitted programs (the loop itself: `cosyjax.llm.decode.decode_loop`)

@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new", "capacity", "record_topk", "record_full"))
def _generate_program(params, ids, kind, start, min_len, max_len, draws, forced=None, *, cfg, method, max_new,
                      capacity, record_topk=0, record_full=0):
    B = ids.shape[0]
    records = init_records(B, max_new, cfg.speech_vocab_size, record_topk, record_full)
    state = prefill(params, cfg, ids, kind, start, min_len, max_len, draws, capacity, sampler=method, width=max_new,
                    forced=forced, records=records)
    state = decode_loop(params, cfg, state, max_new)
    return state.tokens, state.n_out, state.records or {}


def generate_traced(params, cfg: LLMConfig, ids, kind, start, min_len, max_len, draws, *, method, max_new: int,
                    capacity: int, forced_tokens=None):
    """Prefill + the whole decode loop on prepared arrays -> (tokens `[B, max_new]` int32 (-1 = none), lengths `[B]`).

    Traceable: usable inside `jax.jit` / `jax.vmap` (every array argument may be a tracer; `cfg`,
    `method`, `max_new`, `capacity` are static). Inputs as `prepare(...)` builds them: ids / kind
    `[B, L]` int32 left-padded prompt layout, start / min_len / max_len `[B]` int32, draws `[B, N, 2]`
    float32 sampling uniforms (`sampling.uniforms_from_keys`; any `[B, 1, 2]` for 'greedy'), method
    'ras' | 'greedy' or a sampler object (`sampling.RAS`, `Greedy`, `TopKTopP`), max_new output
    slots, capacity KV-cache slots (prompt + max_new).
    forced_tokens: None or int32 `[B, max_new]` (-1 = sample; >= 0 = emit this id at that sampling call).
    No input validation: use `generate` for checked host inputs.
    """
    out, lengths, _ = _generate_program(params, ids, kind, start, min_len, max_len, draws, forced_tokens, cfg=cfg,
                                        method=smp.resolve(cfg, method), max_new=max_new, capacity=capacity)
    return out, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "method", "capacity", "max_new"))
def _prefill_program(params, ids, kind, start, min_len, max_len, draws, *, cfg, capacity, method="ras", max_new=None):
    return prefill(params, cfg, ids, kind, start, min_len, max_len, draws, capacity, sampler=method, width=max_new)


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
    method: object  # the `sampling` argument as given ('ras' | 'greedy' | a sampler object)
    sampler: object = None  # the resolved sampler (`sampling.RAS` / `Greedy` / `TopKTopP`), static


def resolve_sampling(cfg: LLMConfig, sampling):
    """The public `sampling` argument ('ras' | 'greedy' | a sampler object) -> sampler, or `LLMInputError`."""
    if isinstance(sampling, str) and sampling not in smp.SAMPLERS:
        raise LLMInputError(f"sampling must be one of {smp.SAMPLERS} or a sampler object, got {sampling!r}")
    try:
        return smp.resolve(cfg, sampling)
    except ValueError as e:
        raise LLMInputError(str(e)) from e


def row_keys(key, B: int, sampling="ras"):
    """One key -> `split(key, B)`; `[B]` keys pass through -> `[B]` keys (`LLMInputError` if missing or wrong count)."""
    if key is None:
        raise LLMInputError(f"sampling={sampling!r} needs a jax.random key (key=...) or injected uniforms")
    return _row_keys(key, B)


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
    sampler = resolve_sampling(cfg, sampling)
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
    elif not sampler.needs_uniforms:
        draws = jnp.zeros((B, 1, 2), jnp.float32)
    else:
        draws = smp.uniforms_from_keys(row_keys(key, B, sampling), max_new)
    return Prepared(ids=layout.ids, kind=layout.kind, start=layout.start, min_len=mins, max_len=maxs, draws=draws,
                    max_new=max_new, capacity=capacity, method=sampling, sampler=sampler)


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
        jnp.asarray(p.max_len), p.draws, forced, cfg=cfg, method=p.sampler, max_new=p.max_new, capacity=p.capacity,
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
    # the same loop as `generate`, one jitted call per chunk of `hop` steps, state donated (stays on device)
    state = _prefill_program(params, jnp.asarray(p.ids), jnp.asarray(p.kind), jnp.asarray(p.start),
                             jnp.asarray(p.min_len), jnp.asarray(p.max_len), p.draws, cfg=cfg, capacity=p.capacity,
                             method=p.sampler, max_new=p.max_new)
    n_out = np.zeros(len(p.max_len), np.int64)
    hop = jnp.asarray(int(hop), jnp.int32)
    while bool(jnp.any(state.active)):
        state = loop_program(params, state, hop, cfg=cfg)
        rows = new_tokens(state, n_out)
        n_out = n_out + np.array([r.size for r in rows])
        if any(r.size for r in rows):
            yield rows
