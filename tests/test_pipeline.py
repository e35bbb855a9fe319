"""The one engine's jittable core (`pipeline.synthesize`) on the tiny CV3 model.

Streaming orchestration is tested in test_streaming.py (replays) and test_stream_incremental.py, and
end to end by the e2e parity checkers.

Checks: every row of a padded batch gets what it gets alone (jit + vmap over 4 rows), a plain batched
call agrees with the vmapped one, lengths/masks are consistent, speed is a traced input (no recompile),
voice conversion skips the LLM, and the silent-token compaction and linear resize used inside the core
match their host references (numpy re-statements of the upstream formulas, kept here as test oracles).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyjax.errors import CosyJaxError
from cosyjax.pipeline_ops import filter_silent_batch, resize_linear
from cosyjax.streaming import CV3_SILENT_TOKENS, filter_silent_tokens
from tests.conftest import GOLDEN

EOP = 151646


def resize_mel_linear(mel: np.ndarray, n_out: int) -> np.ndarray:
    """Oracle: torch `F.interpolate(mel, size=n_out, mode='linear')` (align_corners=False) along time, [B, T, C]."""
    t_in = mel.shape[1]
    scale = np.float32(t_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), t_in - 1)
    i1 = np.minimum(i0 + 1, t_in - 1)
    lam = (src - i0.astype(np.float32))[None, :, None]
    return ((np.float32(1) - lam) * mel[:, i0] + lam * mel[:, i1]).astype(mel.dtype)


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
    inputs, shapes = prepare_inputs(engine.config, mis)
    wav, wav_len = synthesize_rows(engine.params, inputs, keys, engine.config, shapes)  # jit(vmap), batch of 4
    wav, wav_len = np.asarray(wav), np.asarray(wav_len)
    assert wav.shape[0] == 4 and wav.dtype == np.float32
    for b, mi in enumerate(mis):
        if b not in (0, 3):  # two rows alone keep the test fast; all 4 rows are checked below
            continue
        ref = np.concatenate(list(engine.tts(mi, stream=False, key=keys[b])), axis=1)[0]  # its own (smaller) buckets
        assert int(wav_len[b]) == ref.shape[0], b
        got = wav[b, : wav_len[b]]
        err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)
        assert err < 1e-4, (b, err)
        assert np.all(wav[b, wav_len[b]:] == 0)


def test_synthesize_batched_equals_vmapped(engine):
    """Greedy LLM + fixed CV3 vocoder noise: one padded batch == the vmapped per-row call."""
    from cosyjax.pipeline import prepare_inputs, synthesize, synthesize_rows

    mis = _inputs(4)
    inputs, shapes = prepare_inputs(engine.config, mis)
    key = jax.random.PRNGKey(3)
    wav_b, len_b = jax.jit(synthesize, static_argnames=("config", "shapes"))(engine.params, inputs, key,
                                                                               engine.config, shapes)
    wav_v, len_v = synthesize_rows(engine.params, inputs, jnp.stack([key] * 4), engine.config, shapes)
    np.testing.assert_array_equal(np.asarray(len_b), np.asarray(len_v))
    np.testing.assert_allclose(np.asarray(wav_b), np.asarray(wav_v), atol=2e-5)


def test_engine_two_stages_equal_one_program_and_fit_buckets(engine):
    """`Engine.synthesize_batch` runs the LLM, then flow + vocoder on the tokens it generated: the same
    audio as the one-program `synthesize_rows`, with flow / vocoder buckets sized by the generated tokens
    (not by the LLM's output slots, nor, for the vocoder, by the prompt)."""
    from cosyjax.flow.inputs import bucket_for
    from cosyjax.hift.vocoder import bucket_length as hift_bucket
    from cosyjax.pipeline import prepare_inputs, speech_token_rows, synthesize_rows

    mis = _inputs(2)
    keys = jnp.stack([jax.random.PRNGKey(10 + i) for i in range(2)])
    kw = dict(max_len=40, min_len=10)
    inputs, shapes = prepare_inputs(engine.config, mis, **kw)
    wav1, len1 = synthesize_rows(engine.params, inputs, keys, engine.config, shapes)  # one program
    got = engine.synthesize_batch(mis, list(keys), **kw)  # two device calls
    for b in range(2):
        ref = np.asarray(wav1)[b, :int(len1[b])]
        assert got[b].shape == (1, ref.shape[0]), b
        assert np.linalg.norm(got[b][0] - ref) / np.linalg.norm(ref) < 1e-4, b
    toks, n_tok = speech_token_rows(engine.params, inputs, keys, engine.config, shapes)
    n_tok = np.asarray(n_tok)
    assert shapes.max_new == 64 and n_tok.max() < shapes.max_new  # the LLM stopped before its last slot
    given = [np.asarray(toks)[b, :n_tok[b]] for b in range(2)]
    _, sh2 = prepare_inputs(engine.config, mis, tokens=given)
    P = np.array([m["flow_prompt_speech_token"].shape[1] for m in mis])
    assert sh2.flow_tokens == bucket_for(int((P + n_tok).max())) < shapes.flow_tokens
    assert sh2.mel_frames == hift_bucket(2 * int(n_tok.max())) < shapes.mel_frames


def test_prepare_inputs_rejects_bad_input(engine):
    from cosyjax.pipeline import PipelineInputError, prepare_inputs

    mi = dict(_inputs(1)[0])
    bad = dict(mi, prompt_speech_feat=mi["prompt_speech_feat"][:, :-1])
    with pytest.raises(CosyJaxError, match="2 frames per token"):
        prepare_inputs(engine.config, [bad])
    with pytest.raises(CosyJaxError, match="flow_embedding"):
        prepare_inputs(engine.config, [{k: v for k, v in mi.items() if k != "flow_embedding"}])
    with pytest.raises(PipelineInputError, match="no model inputs"):
        prepare_inputs(engine.config, [])
    with pytest.raises(PipelineInputError, match="speed must be > 0"):
        prepare_inputs(engine.config, [mi], speed=0.0)
    with pytest.raises(PipelineInputError, match="cannot be batched"):
        prepare_inputs(engine.config, [dict(mi, text=iter([np.array([[5]])]))])
    vc = {k: mi[k] for k in ("flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding")}
    vc["source_speech_token"] = np.array([[1, 2, 3]])
    with pytest.raises(PipelineInputError, match="cannot mix voice conversion"):
        prepare_inputs(engine.config, [mi, vc])
    with pytest.raises(CosyJaxError, match="text is empty"):
        prepare_inputs(engine.config, [dict(mi, text=np.zeros((1, 0), np.int32))])


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

    f = jax.jit(synthesize, static_argnames=("config", "shapes"))
    mis = _inputs(3)
    in_a, cfg_a = prepare_inputs(engine.config, [mis[1]])  # text 4 tokens, prompt 17
    in_b, cfg_b = prepare_inputs(engine.config, [mis[2]], speed=1.7)  # text 5 tokens, prompt 14, faster
    assert mis[1]["text"].shape != mis[2]["text"].shape
    assert cfg_a == cfg_b, "same bucket (and any speed >= 1) must give the same static shapes"
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)), in_a, in_b)
    key = jax.random.PRNGKey(0)
    wav_a, len_a = f(engine.params, in_a, key, engine.config, cfg_a)
    n_compiled = f._cache_size()  # jit caches are shared per function: count what the second call adds
    wav_b, len_b = f(engine.params, in_b, key, engine.config, cfg_b)
    assert f._cache_size() == n_compiled
    assert np.all(np.isfinite(np.asarray(wav_a))) and np.all(np.isfinite(np.asarray(wav_b)))
    assert int(len_a[0]) > 0 and int(len_b[0]) > 0


def test_speed_resizes_the_mel_before_the_vocoder(engine):
    """speed 1.5: the vocoder gets int(T / 1.5) frames resized linearly (upstream `F.interpolate`)."""
    mi = _inputs(1)[0]
    key = jax.random.PRNGKey(1)
    normal = np.concatenate(list(engine.tts(mi, key=key)), axis=1)
    fast = np.concatenate(list(engine.tts(mi, key=key, speed=1.5)), axis=1)
    frames = normal.shape[1] // 480
    assert fast.shape[1] == int(frames / 1.5) * 480
    with pytest.raises(CosyJaxError, match="non-streaming"):
        next(engine.generate(mi, stream=True, speed=1.5))


def test_voice_conversion_skips_the_llm(engine):
    """A source_speech_token input runs flow + vocoder on exactly those tokens (no silent filter)."""
    from cosyjax.pipeline import prepare_inputs

    mi = _inputs(1)[0]
    src = np.array([[1, 1, 1, 1, 1, 1, 1, 5, 9, 1]], np.int32)  # 7 silent tokens in a row: kept for VC
    vc = {k: mi[k] for k in ("flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding")}
    vc["source_speech_token"] = src
    inputs, shapes = prepare_inputs(engine.config, [vc])
    assert shapes.tokens == "given" and not shapes.filter_silent and shapes.capacity == 0
    assert "llm_ids" not in inputs
    out = np.concatenate(list(engine.tts(vc)), axis=1)
    assert out.shape == (1, src.shape[1] * 2 * 480)
    # the same tokens replayed as LLM tokens are silent-filtered: 7 -> 5 silent tokens
    replay = np.concatenate(list(engine.tts(mi, tokens=src[0])), axis=1)
    assert replay.shape == (1, (src.shape[1] - 2) * 2 * 480)
