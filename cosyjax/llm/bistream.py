"""Bi-streaming text input (upstream `Qwen2LM.inference_bistream`, SPEC §3.10), batch 1.

```
for tok in generate_bistream(params, cfg, text_chunks, prompt_text, prompt_speech_token, *,
                             key=..., sampling='ras', cache_len=2048):
    ...   # speech token ids (ints), as soon as they are decoded
```
`text_chunks` is any iterable of text token ids: ints or sequences of ints (e.g. the tokenisation
of each arriving string); like upstream, the ids are processed one at a time. Python orchestrates
the mixing schedule on the host; pending inputs are fed by one jitted call (bucketed widths), and
each decode segment (sample and feed back tokens until a fill/stop token, the fill budget or 16
tokens) is one jitted `lax.while_loop`; the static KV cache of `cache_len` slots stays on device.

Schedule (mix_ratio 5:15 from the yaml): the prompt speech tokens are interleaved as
`[5 text, 15 prompt speech]` groups as text arrives; afterwards every 5 text tokens let the model
decode up to a *fill* token (forced after 15 speech tokens, `next_fill_index` bookkeeping as
upstream; the fill id is never fed back); when the text ends, `[remaining text, task_id]` is fed
and decoding runs to eos. During the text phase `ignore_eos=True` masking applies (`min_len_mask`);
a sampled special id other than fill (text phase) / eos (final phase) raises `LLMDecodeError`, as
upstream raises ValueError. With `min_len_mask='stop_set'` such ids are masked in the text phase
and any stop id ends the final phase.

Upstream quirks kept by default (SPEC §3.10): (a) after a fill, if the text ends before 5 new
text tokens arrived, the last fed input (already in the cache) is fed again before the remaining
text (`refeed_stale_input=False` skips that); (b) prompt speech tokens not yet interleaved when
the text ends are dropped; CV3 starts decoding right after its instruction prefix when there is
no prompt speech (quirk Q16).
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cosyjax.llm import sampling as smp
from cosyjax.llm.config import CV3, LLMConfig
from cosyjax.llm.generate import _apply, _check_params, _row_keys
from cosyjax.llm.speech_lm import (
    KIND_SPECIAL, KIND_SPEECH, KIND_TEXT, LLMInputError, SpeechLM, new_cache, prompt_rows,
)

__all__ = ["LLMDecodeError", "generate_bistream"]

_STEPS = 16  # tokens per jitted segment (>= mix_ratio[1] + 1: one segment covers a fill period)


class LLMDecodeError(CosyJaxError):
    """The model produced a token upstream treats as an error (e.g. eos in the bistream text phase)."""


def _chunk_bucket(n: int) -> int:
    """Input slots of a segment: powers of two >= 8 (few compiled variants; padding is masked)."""
    return max(8, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def _feed(params, cache, ids, kind, n_in, logp_in, *, cfg):
    """Feed the first `n_in` of the right-padded inputs ids/kind `[1, T]` -> (cache, logp `[1, V]` after
    the last one; `logp_in` when n_in = 0)."""
    x = _apply(cfg, params, SpeechLM.embed_prompt, ids, kind)
    h, cache = _apply(cfg, params, SpeechLM.forward, x, cache, n_in)
    last = jax.lax.dynamic_index_in_dim(h, jnp.maximum(n_in - 1, 0), axis=1, keepdims=False)
    return cache, jnp.where(n_in > 0, _apply(cfg, params, SpeechLM.logp, last), logp_in)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_steps"), donate_argnums=(1,))
def _decode(params, cache, logp, history, n_out0, budget, final, draws, *, cfg, method, max_steps):
    """Sample and feed back up to `max_steps` tokens, starting from `logp` `[1, V]`.

    `final` (bool []): text finished, so no `ignore_eos` masking. Stops before sampling once `budget`
    tokens were emitted (forced fill), or on a sampled id >= speech_token_size (not fed). Returns
    (cache, logp, tokens `[max_steps]`, emitted count, stop id (-1: none, fill id: forced or sampled,
    other: sampled special), sampling calls made)."""
    S = cfg.speech_token_size
    W = history.shape[1]

    def cond(c):
        return ~c[1]

    def body(c):
        k, _, stop, logp, cache, history, out, calls = c
        forced = k >= budget
        masked = smp.suppress_stop(cfg, logp, jnp.reshape(~final, (1,)), allow_fill=True)
        u = jax.lax.dynamic_index_in_dim(draws, calls, axis=1, keepdims=False)
        tok = smp.sample(cfg, method, masked, history, u)[0][0]
        special = tok >= S
        emit = ~forced & ~special
        stop = jnp.where(forced, cfg.fill_id, jnp.where(special, tok, -1))
        calls = calls + (~forced).astype(jnp.int32)
        out = jnp.where(emit & (jnp.arange(max_steps) == k), tok, out)
        slot = (jnp.arange(W) == (n_out0 + k) % W)[None, :] & emit
        history = jnp.where(slot, tok, history)
        feed = jnp.where(emit, tok, 0).reshape(1, 1)
        hh, cache = _apply(cfg, params, SpeechLM.forward, _apply(cfg, params, SpeechLM.embed_speech, feed), cache,
                           emit.astype(jnp.int32))
        logp = jnp.where(emit, _apply(cfg, params, SpeechLM.logp, hh[:, 0]), logp)
        k = k + emit.astype(jnp.int32)
        done = ~emit | (k >= max_steps)
        return k, done, stop, logp, cache, history, out, calls

    init = (jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.full((), -1, jnp.int32), logp, cache, history,
            jnp.full((max_steps,), -1, jnp.int32), jnp.zeros((), jnp.int32))
    k, _, stop, logp, cache, _, out, calls = jax.lax.while_loop(cond, body, init)
    return cache, logp, out, k, stop, calls


@functools.partial(jax.jit, static_argnums=2)
def _key_block(key, offset, n):
    steps = offset.astype(jnp.uint32) + jnp.arange(n, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (2,), jnp.float32))(steps)[None]


class _Decoder:
    """Device-side state of one bistream request: cache, last log-probs, counters."""

    def __init__(self, params, cfg: LLMConfig, method: str, capacity: int, key, uniforms):
        self.params, self.cfg, self.method = params, cfg, method
        self.cache = new_cache(cfg, 1, capacity)
        self.capacity = capacity
        self.index = 0  # cache slots written (host mirror of cache.index)
        self.logp = jnp.zeros((1, cfg.speech_vocab_size), jnp.float32)
        self.calls = 0  # sampling calls made: index into the uniform stream
        self.key, self.uniforms = key, uniforms

    def _draws(self, n: int):
        if self.method == "greedy":
            return jnp.zeros((1, n, 2), jnp.float32)
        if self.uniforms is not None:
            block = np.full((n, 2), 0.5, np.float32)
            avail = self.uniforms[self.calls: self.calls + n]
            block[: len(avail)] = avail
            self._avail = len(avail)
            return jnp.asarray(block[None])
        return _key_block(self.key, jnp.asarray(self.calls, jnp.int32), n)

    def segment(self, items, out_tokens, budget: int, final: bool):
        """Feed `items` ([(id, kind)], may be empty) and decode -> (emitted ids, stop id or -1)."""
        cfg = self.cfg
        n_in = len(items)
        T = _chunk_bucket(n_in)
        steps = _STEPS
        if self.index + max(T, n_in + steps) > self.capacity:
            raise LLMInputError(f"bistream needs more than cache_len={self.capacity} KV-cache slots "
                                f"({self.index} used); pass a larger cache_len")
        ids = np.zeros((1, T), np.int32)
        kind = np.zeros((1, T), np.int32)
        for j, (i, k) in enumerate(items):
            ids[0, j], kind[0, j] = i, k
        W = cfg.win_size
        hist = np.full((1, W), -1, np.int32)
        n0 = len(out_tokens)
        for j in range(max(0, n0 - W), n0):
            hist[0, j % W] = out_tokens[j]
        draws = self._draws(steps)
        if n_in:
            self.cache, self.logp = _feed(self.params, self.cache, jnp.asarray(ids), jnp.asarray(kind),
                                          jnp.asarray(n_in, jnp.int32), self.logp, cfg=cfg)
        self.cache, self.logp, out, k, stop, calls = _decode(
            self.params, self.cache, self.logp, jnp.asarray(hist), jnp.asarray(n0, jnp.int32),
            jnp.asarray(budget, jnp.int32), jnp.asarray(final), draws, cfg=cfg, method=self.method, max_steps=steps)
        k, calls = int(k), int(calls)
        if self.uniforms is not None and calls > self._avail:
            raise LLMInputError(f"uniforms cover {len(self.uniforms)} sampling calls; bistream needs more")
        self.calls += calls
        self.index += n_in + k
        return np.asarray(out[:k]).tolist(), int(stop)


def _flatten(text: Iterable) -> Iterator[int]:
    for chunk in text:
        a = np.asarray(chunk)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise LLMInputError(f"bistream text must yield integer token ids, got dtype {a.dtype}")
        for t in a.reshape(-1).tolist():
            yield int(t)


def generate_bistream(params, cfg: LLMConfig, text: Iterable, prompt_text=None, prompt_speech_token=None,
                      embedding=None, *, key=None, sampling: str = "ras", uniforms=None, cache_len: int = 2048,
                      max_final_len: int | None = None, refeed_stale_input: bool = True) -> Iterator[int]:
    """Yield speech token ids while text token ids arrive (see the module doc). Batch 1.

    `prompt_text` / `prompt_speech_token`: `[T]` or `[1, T]` ids. `uniforms` `[N, 2]` replays recorded
    draws (one row per sampling call; forced fills draw nothing). `max_final_len` caps the tokens
    decoded after the text ends (upstream has no cap; default: until eos or the cache is full)."""
    del embedding  # unused by Qwen2LM / CosyVoice3LM
    if sampling not in smp.SAMPLERS:
        raise LLMInputError(f"sampling must be one of {smp.SAMPLERS}, got {sampling!r}")
    _check_params(params, cfg)
    pt = np.zeros((1, 0), np.int64) if prompt_text is None else np.asarray(prompt_text).reshape(1, -1)
    ps = np.zeros((1, 0), np.int64) if prompt_speech_token is None else np.asarray(prompt_speech_token).reshape(1, -1)
    # validate the prompt parts (a dummy 1-token text keeps prompt_rows' checks applicable)
    dummy = np.array([[cfg.endofprompt_id or 0]])
    _, (pt_row,), (ps_row,) = prompt_rows(cfg, dummy, None, pt, None, ps, None)
    pt_ids, ps_ids = [int(t) for t in pt_row], [int(t) for t in ps_row]
    if cfg.version == CV3 and cfg.endofprompt_id not in pt_ids:
        raise LLMInputError(f"CosyVoice3 bistream needs <|endofprompt|> (id {cfg.endofprompt_id}) in prompt_text")
    if key is None and uniforms is None and sampling == "ras":
        raise LLMInputError("sampling='ras' needs a jax.random key (key=...) or injected uniforms")
    if key is not None:
        key = _row_keys(key, 1)[0]
    if uniforms is not None:
        uniforms = np.asarray(uniforms, np.float32).reshape(-1, 2)
        if np.any((uniforms < 0) | (uniforms >= 1)):
            raise LLMInputError("uniforms must lie in [0, 1)")
    return _run(params, cfg, _flatten(text), pt_ids, ps_ids, sampling, int(cache_len), key, uniforms,
                max_final_len, refeed_stale_input)


def _run(params, cfg, text_ids, pt_ids, ps_ids, method, cache_len, key, uniforms, max_final_len, refeed):
    S, fill, eos = cfg.speech_token_size, cfg.fill_id, cfg.eos_id
    m_text, m_speech = cfg.mix_ratio
    special = KIND_SPECIAL if cfg.has_llm_embedding else KIND_SPEECH
    dec = _Decoder(params, cfg, method, cache_len, key, uniforms)

    lm_input = [(cfg.sos_id, special)]
    lm_input_in_cache = False
    if cfg.version == CV3:
        eop = pt_ids.index(cfg.endofprompt_id)
        lm_input += [(t, KIND_TEXT) for t in pt_ids[: eop + 1]]
        pt_ids = pt_ids[eop + 1:]
    text_cache = list(pt_ids)
    speech = list(ps_ids)
    P = len(ps_ids)
    next_fill_index = (P // m_speech + 1) * m_speech - P
    out_tokens: list[int] = []

    for tok in text_ids:
        if not 0 <= tok < cfg.vocab_size:
            raise LLMInputError(f"bistream text id {tok} out of range [0, {cfg.vocab_size})")
        text_cache.append(tok)
        while speech:  # interleave [5 text, 15 prompt speech] groups
            if len(text_cache) < m_text:
                break
            lm_input += [(t, KIND_TEXT) for t in text_cache[:m_text]] + [(t, KIND_SPEECH) for t in speech[:m_speech]]
            text_cache, speech = text_cache[m_text:], speech[m_speech:]
        if speech:
            continue
        after_fill = bool(out_tokens) and out_tokens[-1] == fill
        if after_fill or (not out_tokens and len(lm_input) == 1):
            if len(text_cache) < m_text:
                continue  # wait for more text
            five = [(t, KIND_TEXT) for t in text_cache[:m_text]]
            lm_input = five if after_fill else lm_input + five
            lm_input_in_cache = False
            text_cache = text_cache[m_text:]
        # decode until a fill token (cosyvoice/llm/llm.py inference_bistream inner `while True`)
        pending = lm_input
        while True:
            toks, stop = dec.segment(pending, out_tokens, next_fill_index - len(out_tokens), final=False)
            pending = []
            for t in toks:
                out_tokens.append(t)
                yield t
            if toks:
                lm_input = [(toks[-1], KIND_SPEECH)]
            lm_input_in_cache = True
            if stop == -1:
                continue  # segment buffer full: keep decoding
            if stop == fill:  # forced (len == next_fill_index) or sampled: both give the same next index
                next_fill_index = len(out_tokens) + m_speech + 1
                out_tokens.append(fill)
                break
            raise LLMDecodeError(f"bistream sampled special token {stop} while text was still arriving "
                                 f"(upstream raises 'should not get token'); min_len_mask='stop_set' masks it")

    # text finished: [lm_input (stale if already fed: upstream quirk), remaining text, task_id] -> decode to eos
    pending = (lm_input if (refeed or not lm_input_in_cache) else []) + [(t, KIND_TEXT) for t in text_cache] + \
        [(cfg.task_id, special)]
    n_final = 0
    while True:
        toks, stop = dec.segment(pending, out_tokens, 1 << 30, final=True)
        pending = []
        for t in toks:
            if max_final_len is not None and n_final >= max_final_len:
                return
            out_tokens.append(t)
            n_final += 1
            yield t
        if max_final_len is not None and n_final >= max_final_len:
            return
        if stop == -1:
            continue
        if stop == eos or cfg.min_len_mask == "stop_set":
            return
        raise LLMDecodeError(f"bistream sampled special token {stop} instead of eos {eos} "
                             "(upstream raises 'should not get token')")
