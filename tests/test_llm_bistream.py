"""Bi-streaming text input vs a literal transcription of upstream `Qwen2LM.inference_bistream` that re-runs
the full sequence (no KV cache) at every step (tiny golden models, greedy and recorded-uniform RAS)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.registry import convert_component
from cosyjax.config import ModelConfig
from cosyjax.llm.bistream import generate_bistream
from cosyjax.llm.config import LLMConfig
from cosyjax.llm.speech_lm import KIND_SPECIAL, KIND_SPEECH, KIND_TEXT, LLMInputError, SpeechLM, backbone_forward

from .conftest import model_dir
from .test_llm_sampling import ref_ras

T_MAX = 192


@functools.lru_cache(maxsize=None)
def _model(version):
    mc = ModelConfig.from_dir(model_dir(version))
    return convert_component("llm", mc), LLMConfig.from_model_config(mc)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_logp(params, cfg, ids, kind, n):
    x = SpeechLM(cfg).apply({"params": params}, ids, kind, method=SpeechLM.embed_prompt)
    _, logits = backbone_forward(params, cfg, x, n[None])
    return jax.nn.log_softmax(logits[0, n - 1])


def reference(params, cfg, text_ids, pt, ps, sample, max_final):
    """upstream inference_bistream, step by step, every forward over the whole fed sequence."""
    S, fill, eos = cfg.speech_token_size, cfg.fill_id, cfg.eos_id
    special = KIND_SPECIAL if cfg.has_llm_embedding else KIND_SPEECH
    fed = []

    def forward(items):
        fed.extend(items)
        assert len(fed) <= T_MAX
        ids = np.zeros((1, T_MAX), np.int32)
        kind = np.zeros((1, T_MAX), np.int32)
        for j, (i, k) in enumerate(fed):
            ids[0, j], kind[0, j] = i, k
        return np.array(_last_logp(params, cfg, jnp.asarray(ids), jnp.asarray(kind), jnp.asarray(len(fed))))

    lm_input = [(cfg.sos_id, special)]
    pt = list(pt)
    if cfg.version == "cosyvoice3":
        e = pt.index(151646)
        lm_input += [(t, KIND_TEXT) for t in pt[: e + 1]]
        pt = pt[e + 1:]
    text_cache, speech, out, yielded = list(pt), list(ps), [], []
    next_fill = (len(ps) // 15 + 1) * 15 - len(ps)
    for tok in text_ids:
        text_cache.append(tok)
        while speech:
            if len(text_cache) >= 5:
                lm_input = lm_input + [(t, KIND_TEXT) for t in text_cache[:5]] + [(t, KIND_SPEECH) for t in speech[:15]]
                text_cache, speech = text_cache[5:], speech[15:]
            else:
                break
        if not speech:
            if (out and out[-1] == fill) or (not out and len(lm_input) == 1):
                if len(text_cache) >= 5:
                    five = [(t, KIND_TEXT) for t in text_cache[:5]]
                    lm_input = five if (out and out[-1] == fill) else lm_input + five
                    text_cache = text_cache[5:]
                else:
                    continue
            while True:
                logp = forward(lm_input)
                if len(out) == next_fill:
                    top = fill
                    next_fill += 16
                else:
                    logp[S] = -np.inf
                    top = sample(logp, out)
                if top == fill:
                    next_fill = len(out) + 16
                out.append(top)
                if top >= S:
                    assert top == fill, top
                    break
                yielded.append(top)
                lm_input = [(top, KIND_SPEECH)]
    lm_input = lm_input + [(t, KIND_TEXT) for t in text_cache] + [(cfg.task_id, special)]
    n = 0
    while n < max_final:
        top = sample(forward(lm_input), out)
        out.append(top)
        if top >= S:
            assert top == eos
            break
        yielded.append(top)
        n += 1
        lm_input = [(top, KIND_SPEECH)]
    return yielded


def _chunks(ids, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(ids[i:i + s])
        i += s
    return out


def test_cv2_greedy_matches_reference_with_prompt_speech():
    params, cfg = _model("cosyvoice2")
    rng = np.random.default_rng(0)
    text = rng.integers(0, cfg.vocab_size, 17).tolist()  # ends 2 tokens after the last 5-group: stale re-feed
    pt = rng.integers(0, cfg.vocab_size, 6).tolist()
    ps = rng.integers(0, cfg.speech_token_size, 20).tolist()
    greedy = lambda logp, out: int(np.argmax(logp))
    want = reference(params, cfg, text, pt, ps, greedy, max_final=25)
    got = list(generate_bistream(params, cfg, _chunks(text, [3, 4, 1, 6, 3]), pt, ps, sampling="greedy",
                                 cache_len=256, max_final_len=25))
    assert len(want) > 40
    assert got == want


def test_cv2_recorded_uniform_ras_matches_reference():
    params, cfg = _model("cosyvoice2")
    rng = np.random.default_rng(1)
    text = rng.integers(0, cfg.vocab_size, 11).tolist()
    ps = rng.integers(0, cfg.speech_token_size, 7).tolist()
    u = rng.uniform(size=(400, 2))
    calls = [0]

    def ras(logp, out):
        i = calls[0]
        calls[0] += 1
        return ref_ras(logp, out, u[i])[0]

    want = reference(params, cfg, text, [], ps, ras, max_final=20)
    got = list(generate_bistream(params, cfg, [[t] for t in text], None, ps, sampling="ras", uniforms=u,
                                 cache_len=256, max_final_len=20))
    assert got == want


def test_cv3_without_prompt_speech_matches_reference():
    params, cfg = _model("cosyvoice3")
    rng = np.random.default_rng(2)
    pt = [101, 102, 151646, 7, 8]  # instruction prefix up to <|endofprompt|> goes straight into lm_input
    text = rng.integers(0, 150000, 13).tolist()
    greedy = lambda logp, out: int(np.argmax(logp))
    want = reference(params, cfg, text, pt, [], greedy, max_final=15)
    got = list(generate_bistream(params, cfg, iter([text[:2], text[2:9], text[9:]]), np.array([pt]), None,
                                 sampling="greedy", cache_len=256, max_final_len=15))
    assert got == want


def test_bistream_errors():
    params, cfg = _model("cosyvoice3")
    with pytest.raises(LLMInputError, match="endofprompt"):
        generate_bistream(params, cfg, [[1, 2]], [5, 6], None, sampling="greedy")
    with pytest.raises(LLMInputError, match="key"):
        generate_bistream(params, cfg, [[1, 2]], [151646], None)
    params2, cfg2 = _model("cosyvoice2")
    with pytest.raises(LLMInputError, match="cache_len"):
        list(generate_bistream(params2, cfg2, [list(range(12))], None, list(range(40)), sampling="greedy",
                               cache_len=48))
    with pytest.raises(LLMInputError, match="out of range"):
        list(generate_bistream(params2, cfg2, [[1, 99999]], None, None, sampling="greedy"))
