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
sampling calls) is one call of the shared decode loop (`cosyjax.llm.decode.loop_program`) on a
donated `DecodeState`; the static KV cache of `cache_len` slots stays on device.

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
from cosyjax.llm.decode import DecodeState, feed, init_state, loop_program
from cosyjax.llm.generate import _check_params, _row_keys, resolve_sampling
from cosyjax.llm.speech_lm import KIND_SPECIAL, KIND_SPEECH, KIND_TEXT, LLMInputError, prompt_rows

__all__ = ["LLMDecodeError", "generate_bistream"]

_STEPS = 16  # sampling calls per jitted loop call (>= mix_ratio[1] + 1: one call covers a fill period)
_NEVER = 1 << 30  # min_len of the text phase: stop ids stay suppressed (ignore_eos=True)


class LLMDecodeError(CosyJaxError):
    """The model produced a token upstream treats as an error (e.g. eos in the bistream text phase)."""


def _chunk_bucket(n: int) -> int:
    """Input slots of a segment: powers of two >= 8 (few compiled variants; padding is masked)."""
    return max(8, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def _feed(params, state: DecodeState, ids, kind, n_in, *, cfg):
    """Feed the first `n_in` of the right-padded inputs ids/kind `[1, T]` -> state (cache advanced,
    logp after the last one)."""
    return feed(params, cfg, state, ids, kind, jnp.reshape(n_in, (1,)))


@jax.jit
def _arm(state: DecodeState, push_fill, fill_id, budget, final):
    """Start a segment: push a fill id into the RAS history (it is part of upstream's out_tokens), allow
    `budget` more tokens (forced fill after them), suppress stop ids while the text still arrives."""
    pushed = jnp.concatenate([state.history[:, 1:], jnp.full((1, 1), fill_id, jnp.int32)], axis=1)
    history = jnp.where(push_fill, pushed, state.history)
    budget = jnp.reshape(budget, (1,)).astype(jnp.int32)
    return state.replace(history=history, max_len=state.n_out + budget, active=budget > 0,
                         stop=jnp.full((1,), -1, jnp.int32),
                         min_len=jnp.where(final, 0, _NEVER).astype(jnp.int32).reshape(1))


class _Decoder:
    """Device-side state of one bistream request (`DecodeState`, batch 1) and its host-side counters."""

    def __init__(self, params, cfg: LLMConfig, sampler, capacity: int, key, uniforms):
        self.params, self.cfg = params, cfg
        self.capacity = capacity
        self.index = 0  # cache slots written (host mirror of cache.index)
        self.n_out = 0  # tokens emitted (host mirror of state.n_out)
        self.uniforms, self.sampler = uniforms, sampler
        if not sampler.needs_uniforms:
            draws = jnp.zeros((1, 1, 2), jnp.float32)
        elif uniforms is not None:
            # past the recorded draws: placeholders, and `segment` raises before yielding their tokens
            draws = np.full((1, len(uniforms) + _STEPS, 2), 0.5, np.float32)
            draws[0, : len(uniforms)] = uniforms
        else:
            # every sampling call either emits a token (<= capacity) or ends a segment after >= 1 fed input
            draws = smp.uniforms_from_keys(key[None], 2 * capacity + _STEPS)
        self.n_draws = int(np.shape(draws)[1])
        self.state = init_state(cfg, sampler, 1, capacity, capacity, draws, [_NEVER], [0], allow_fill=True)
        self.push_fill = False

    def segment(self, items, budget: int, final: bool):
        """Feed `items` ([(id, kind)], may be empty) and decode -> (emitted ids, stop id or -1).

        Stop id: the special id sampled (not fed back), or the fill id once `budget` tokens were emitted."""
        cfg = self.cfg
        n_in = len(items)
        T = _chunk_bucket(n_in)
        steps = _STEPS
        if self.index + max(T, n_in + steps) > self.capacity:
            raise LLMInputError(f"bistream needs more than cache_len={self.capacity} KV-cache slots "
                                f"({self.index} used); pass a larger cache_len")
        if n_in:
            ids = np.zeros((1, T), np.int32)
            kind = np.zeros((1, T), np.int32)
            for j, (i, k) in enumerate(items):
                ids[0, j], kind[0, j] = i, k
            self.state = _feed(self.params, self.state, jnp.asarray(ids), jnp.asarray(kind),
                               jnp.asarray(n_in, jnp.int32), cfg=cfg)
        n0 = self.n_out
        self.state = _arm(self.state, jnp.asarray(self.push_fill), jnp.asarray(cfg.fill_id, jnp.int32),
                          jnp.asarray(min(budget, 1 << 30), jnp.int32), jnp.asarray(final))
        self.push_fill = False
        self.index += n_in
        if budget <= 0:
            return [], cfg.fill_id
        self.state = loop_program(self.params, self.state, jnp.asarray(steps, jnp.int32), cfg=cfg)
        toks, n_out, stop, calls = jax.device_get((self.state.tokens, self.state.n_out, self.state.stop,
                                                   self.state.step))
        if self.uniforms is not None and int(calls[0]) > len(self.uniforms):
            raise LLMInputError(f"uniforms cover {len(self.uniforms)} sampling calls; bistream needs more")
        if self.sampler.needs_uniforms and int(calls[0]) >= self.n_draws:
            raise LLMInputError(f"bistream made {int(calls[0])} sampling calls, more than the {self.n_draws} "
                                "drawn uniforms")
        new = toks[0, n0:int(n_out[0])].tolist()
        self.index += len(new)
        self.n_out += len(new)
        stop = int(stop[0])
        if stop == -1 and int(n_out[0]) >= n0 + budget:
            stop = cfg.fill_id  # budget reached: upstream forces the fill token
        return new, stop

    def note_fill(self):
        """The fill id joins upstream's out_tokens: the next segment pushes it into the RAS history."""
        self.push_fill = True


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
    sampler = resolve_sampling(cfg, sampling)
    _check_params(params, cfg)
    pt = np.zeros((1, 0), np.int64) if prompt_text is None else np.asarray(prompt_text).reshape(1, -1)
    ps = np.zeros((1, 0), np.int64) if prompt_speech_token is None else np.asarray(prompt_speech_token).reshape(1, -1)
    # validate the prompt parts (a dummy 1-token text keeps prompt_rows' checks applicable)
    dummy = np.array([[cfg.endofprompt_id or 0]])
    _, (pt_row,), (ps_row,) = prompt_rows(cfg, dummy, None, pt, None, ps, None)
    pt_ids, ps_ids = [int(t) for t in pt_row], [int(t) for t in ps_row]
    if cfg.version == CV3 and cfg.endofprompt_id not in pt_ids:
        raise LLMInputError(f"CosyVoice3 bistream needs <|endofprompt|> (id {cfg.endofprompt_id}) in prompt_text")
    if key is None and uniforms is None and sampler.needs_uniforms:
        raise LLMInputError(f"sampling={sampling!r} needs a jax.random key (key=...) or injected uniforms")
    if key is not None:
        key = _row_keys(key, 1)[0]
    if uniforms is not None:
        uniforms = np.asarray(uniforms, np.float32).reshape(-1, 2)
        if np.any((uniforms < 0) | (uniforms >= 1)):
            raise LLMInputError("uniforms must lie in [0, 1)")
    return _run(params, cfg, _flatten(text), pt_ids, ps_ids, sampler, int(cache_len), key, uniforms,
                max_final_len, refeed_stale_input)


def _run(params, cfg, text_ids, pt_ids, ps_ids, sampler, cache_len, key, uniforms, max_final_len, refeed):
    S, fill, eos = cfg.speech_token_size, cfg.fill_id, cfg.eos_id
    m_text, m_speech = cfg.mix_ratio
    special = KIND_SPECIAL if cfg.has_llm_embedding else KIND_SPEECH
    dec = _Decoder(params, cfg, sampler, cache_len, key, uniforms)

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
            toks, stop = dec.segment(pending, next_fill_index - len(out_tokens), final=False)
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
                dec.note_fill()
                break
            raise LLMDecodeError(f"bistream sampled special token {stop} while text was still arriving "
                                 f"(upstream raises 'should not get token'); min_len_mask='stop_set' masks it")

    # text finished: [lm_input (stale if already fed: upstream quirk), remaining text, task_id] -> decode to eos
    pending = (lm_input if (refeed or not lm_input_in_cache) else []) + [(t, KIND_TEXT) for t in text_cache] + \
        [(cfg.task_id, special)]
    n_final = 0
    while True:
        toks, stop = dec.segment(pending, 1 << 30, final=True)
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
