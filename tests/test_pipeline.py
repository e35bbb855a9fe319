"""The jittable batched core (`pipeline.synthesize`) vs the per-request host engine, on the tiny CV3 model.

Streaming orchestration is tested in test_streaming.py (replays) and by the e2e parity checker.

Checks: every row of a padded batch gets what it gets alone (jit + vmap over 4 rows), a plain batched
call agrees with the vmapped one, lengths/masks are consistent, and the silent-token compaction and
linear resize used inside the core match their host references.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyjax.pipeline_ops import filter_silent_batch, resize_linear
from cosyjax.streaming import CV3_SILENT_TOKENS, filter_silent_tokens, resize_mel_linear
from tests.conftest import GOLDEN

EOP = 151646


@pytest.fixture(scope="module")
def engine():
    from cosyjax.config import ModelConfig
    from cosyjax.model_cache import load_or_convert_params
    from cosyjax.pipeline import Engine, PipelineConfig

    mdir = os.path.join(GOLDEN, "cosyvoice3", "modeldir")
    if not os.path.isdir(mdir):
        pytest.skip("tiny CV3 model folder absent")
    mc = ModelConfig.from_dir(mdir)
    params, _ = load_or_convert_params(mc, use_cache=False)
    return Engine(params, PipelineConfig.from_model_config(mc, sampling="greedy"))


def _inputs(n: int):
    """n zero-shot model inputs of different text / prompt lengths (tiny CV3 ids)."""
    with np.load(os.path.join(GOLDEN, "cosyvoice3", "e2e", "inputs.npz")) as z:
        base = {k: z[k] for k in z.files}
    out = []
    for i in range(n):
        P = 20 - 3 * i
        text = base["text"][:, : 3 + (i % 3)]
        out.append({
            "text": text,
            "prompt_text": base["prompt_text"],  # holds <|endofprompt|>
            "llm_prompt_speech_token": base["llm_prompt_speech_token"][:, :P],
            "flow_prompt_speech_token": base["flow_prompt_speech_token"][:, :P],
            "prompt_speech_feat": base["prompt_speech_feat"][:, : 2 * P],
            "flow_embedding": base["flow_embedding"] * (1.0 + 0.1 * i),
        })
    assert np.any(out[0]["prompt_text"] == EOP)
    return out


def test_synthesize_rows_match_engine(engine):
    from cosyjax.pipeline import prepare_inputs, synthesize_rows

    mis = _inputs(4)
    keys = jnp.stack([jax.random.PRNGKey(i) for i in range(4)])
    inputs, cfg = prepare_inputs(engine.config, mis)
    wav, wav_len = synthesize_rows(engine.params, inputs, keys, cfg)  # jit(vmap(synthesize)), batch of 4
    wav, wav_len = np.asarray(wav), np.asarray(wav_len)
    assert wav.shape[0] == 4 and wav.dtype == np.float32
    for b, mi in enumerate(mis):
        if b not in (0, 3):  # two rows against the engine keep the test fast; all 4 rows are checked below
            continue
        ref = np.concatenate(list(engine.tts(mi, stream=False, key=keys[b])), axis=1)[0]
        assert int(wav_len[b]) == ref.shape[0], b
        got = wav[b, : wav_len[b]]
        err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)
        assert err < 1e-4, (b, err)
        assert np.all(wav[b, wav_len[b]:] == 0)


def test_synthesize_batched_equals_vmapped(engine):
    """Greedy LLM + fixed CV3 vocoder noise: one padded batch == the vmapped per-row call."""
    from cosyjax.pipeline import prepare_inputs, synthesize, synthesize_rows

    mis = _inputs(4)
    inputs, cfg = prepare_inputs(engine.config, mis)
    key = jax.random.PRNGKey(3)
    wav_b, len_b = jax.jit(synthesize, static_argnames="config")(engine.params, inputs, key, cfg)
    wav_v, len_v = synthesize_rows(engine.params, inputs, jnp.stack([key] * 4), cfg)
    np.testing.assert_array_equal(np.asarray(len_b), np.asarray(len_v))
    np.testing.assert_allclose(np.asarray(wav_b), np.asarray(wav_v), atol=2e-5)


def test_prepare_inputs_rejects_bad_input(engine):
    from cosyjax.pipeline import PipelineInputError, prepare_inputs

    mi = dict(_inputs(1)[0])
    bad = dict(mi, prompt_speech_feat=mi["prompt_speech_feat"][:, :-1])
    with pytest.raises(PipelineInputError, match="2 frames per token"):
        prepare_inputs(engine.config, [bad])
    with pytest.raises(PipelineInputError, match="flow_embedding"):
        prepare_inputs(engine.config, [{k: v for k, v in mi.items() if k != "flow_embedding"}])
    with pytest.raises(PipelineInputError, match="no inputs"):
        prepare_inputs(engine.config, [])


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_filter_silent_batch_matches_host(data):
    B, T = 4, 32  # one shape: one compilation
    alphabet = [1, 2, 28, 7, 9, 6000]
    toks = np.array([[data.draw(st.sampled_from(alphabet)) for _ in range(T)] for _ in range(B)], np.int32)
    lens = np.array([data.draw(st.integers(0, T)) for _ in range(B)], np.int32)
    out, n = _filter_jit(jnp.asarray(toks), jnp.asarray(lens))
    out, n = np.asarray(out), np.asarray(n)
    for b in range(B):
        ref = filter_silent_tokens(toks[b, : lens[b]].tolist())
        assert n[b] == len(ref) and out[b, : n[b]].tolist() == ref
        assert np.all(out[b, n[b]:] == 0)


_filter_jit = jax.jit(lambda t, n: filter_silent_batch(t, n, CV3_SILENT_TOKENS))


def test_resize_linear_matches_host():
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((2, 30, 4)).astype(np.float32)
    y = np.asarray(resize_linear(jnp.asarray(mel), jnp.array([30, 20]), jnp.array([15, 40]), 50))
    np.testing.assert_allclose(y[0, :15], resize_mel_linear(mel[:1], 15)[0], atol=1e-6)
    np.testing.assert_allclose(y[1, :40], resize_mel_linear(mel[1:2, :20], 40)[0], atol=1e-6)
    assert np.all(y[0, 15:] == 0) and np.all(y[1, 40:] == 0)


def test_new_text_length_in_the_same_bucket_does_not_recompile(engine):
    """Two requests with different text / prompt lengths share one compiled `synthesize` program."""
    from cosyjax.pipeline import prepare_inputs, synthesize

    f = jax.jit(synthesize, static_argnames="config")
    mis = _inputs(3)
    in_a, cfg_a = prepare_inputs(engine.config, [mis[1]])  # text 4 tokens, prompt 17
    in_b, cfg_b = prepare_inputs(engine.config, [mis[2]])  # text 5 tokens, prompt 14
    assert mis[1]["text"].shape != mis[2]["text"].shape
    assert cfg_a == cfg_b, "same bucket must give the same static config"
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)), in_a, in_b)
    key = jax.random.PRNGKey(0)
    wav_a, len_a = f(engine.params, in_a, key, cfg_a)
    n_compiled = f._cache_size()  # jit caches are shared per function: count what the second call adds
    wav_b, len_b = f(engine.params, in_b, key, cfg_b)
    assert f._cache_size() == n_compiled
    assert np.all(np.isfinite(np.asarray(wav_a))) and np.all(np.isfinite(np.asarray(wav_b)))
    assert int(len_a[0]) > 0 and int(len_b[0]) > 0
