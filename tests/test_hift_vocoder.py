"""HiFT vocoder API: golden parity through `vocode`, bucketing without recompilation, exact padding,
CV2 cache_source, CV3 finalize=False, any length 1..300, and input errors.

Compilation dominates on CPU: every `vocode` call here uses the single bucket in BUCKETS, the golden
runs use the exact length (48), and CV2 adds one B=2 batch (with and without cache_source).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convert.registry import convert_component
from cosyjax.config import ModelConfig
from cosyjax.hift.config import HiFTConfig
from cosyjax.hift.vocoder import (HiFTInputError, _f0_jit, _wave_jit, bucket_length, device_params, f0_stage,
                                  hift_inference, vocode, vocode_padded)
from cosyjax.parity.core import rel_l2
from tests.conftest import GOLDEN, model_dir

VERSIONS = ("cosyvoice2", "cosyvoice3")
BUCKETS = (320,)


@pytest.fixture(scope="module")
def models():
    out = {}
    for v in VERSIONS:
        cfg = HiFTConfig.from_model_config(ModelConfig.from_dir(model_dir(v)))
        host = convert_component("hift", ModelConfig.from_dir(model_dir(v)))
        out[v] = (cfg, device_params(host, cfg), host)
    return out


def _golden(v):
    with np.load(f"{GOLDEN}/{v}/hift/inference.npz") as z:
        return {k: z[k] for k in z.files}


def _noise(z):
    return z["sinegen_uniform_noise"] if "sinegen_uniform_noise" in z else z["sinegen_noise"]


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_wav(models, version):
    """fixture: <v>/hift/inference.npz (mel (1,80,48) -> wav, source; CV3 also finalize=False)."""
    cfg, params, _ = models[version]
    z = _golden(version)
    mel = z["mel"].transpose(0, 2, 1)
    wav, source = hift_inference(params, cfg, mel, noise=_noise(z), rand_ini=z["sinegen_rand_ini"])
    chex.assert_shape(wav, (1, mel.shape[1] * 480))
    chex.assert_type([wav, source], jnp.float32)
    assert rel_l2(wav, z["wav"]) < 1e-4
    assert rel_l2(source, z["source"][:, 0]) < 1e-4
    if cfg.causal:
        wav_ff, src_ff = hift_inference(params, cfg, mel, noise=_noise(z), finalize=False)
        chex.assert_shape([wav_ff, src_ff], [z["wav_finalize_false"].shape, (1, (mel.shape[1] - 3) * 480)])
        assert rel_l2(wav_ff, z["wav_finalize_false"]) < 1e-4
        assert rel_l2(src_ff, z["source_finalize_false"][:, 0]) < 1e-4


@pytest.mark.parametrize("version", VERSIONS)
def test_new_length_in_a_bucket_does_not_recompile_and_padding_is_exact(models, version):
    cfg, params, _ = models[version]
    rng = np.random.RandomState(0)
    mel = (rng.randn(1, 63, 80) * 2 - 5).astype(np.float32)
    key = jax.random.key(1)
    vocode(params, cfg, mel[:, :40], key=key, buckets=BUCKETS)
    def compiled():
        return _f0_jit._cache_size(), _wave_jit._cache_size()

    before = compiled()
    wav, _ = vocode(params, cfg, mel[:, :50], key=key, buckets=BUCKETS)
    wav2, _ = vocode(params, cfg, mel, key=key, buckets=BUCKETS)
    if cfg.causal:
        vocode(params, cfg, mel, key=key, finalize=False, buckets=BUCKETS)  # finalize is traced, not static
    assert compiled() == before
    # the device-side entry point on the same padded shapes reuses the traced programs
    padded_mel = jnp.pad(jnp.asarray(mel), ((0, 0), (0, BUCKETS[0] - 63), (0, 0)))
    wav3, _ = vocode_padded(params, cfg, padded_mel, jnp.array([63]), key=key)
    assert wav3.shape == (1, BUCKETS[0] * 480) and not np.any(np.asarray(wav3)[:, 63 * 480:])
    np.testing.assert_array_equal(wav3[:, :63 * 480], wav2)
    assert compiled() == before
    assert wav.shape == (1, 50 * 480) and wav2.shape == (1, 63 * 480)
    # the padded (bucket 320) call equals the exact-length call, masks and reflections included
    z = _golden(version)
    exact, _ = hift_inference(params, cfg, z["mel"].transpose(0, 2, 1), noise=_noise(z))
    padded, _ = vocode(params, cfg, z["mel"].transpose(0, 2, 1), noise=_noise(z), buckets=BUCKETS)
    np.testing.assert_allclose(padded, exact, atol=2e-5)


def test_cv2_batch_lengths_and_cache_source(models):
    cfg, params, _ = models["cosyvoice2"]
    rng = np.random.RandomState(2)
    mel = (rng.randn(2, 30, 80) * 2 - 5).astype(np.float32)
    noise = rng.randn(2, 30 * 480, 9).astype(np.float32)
    wav, src = vocode(params, cfg, mel, noise=noise, lengths=[30, 17], buckets=BUCKETS)
    one, one_src = vocode(params, cfg, mel[1:, :17], noise=noise[1:, :17 * 480], buckets=BUCKETS)
    np.testing.assert_allclose(wav[1, :17 * 480], one[0], atol=2e-5)
    np.testing.assert_allclose(src[1, :17 * 480], one_src[0], atol=1e-5)
    assert not np.any(np.asarray(wav)[1, 17 * 480:])
    cache = (rng.rand(2, 1, 3840).astype(np.float32) - 0.5) * 0.2  # upstream layout [B, 1, C]
    wav_c, src_c = vocode(params, cfg, mel, noise=noise, cache_source=cache, buckets=BUCKETS)
    wav_n, src_n = vocode(params, cfg, mel, noise=noise, buckets=BUCKETS)
    np.testing.assert_array_equal(src_c[:, :3840], cache[:, 0])  # upstream: s[:, :, :C] = cache_source
    np.testing.assert_array_equal(src_c[:, 3840:], src_n[:, 3840:])
    assert rel_l2(wav_c[:, :3000], wav_n[:, :3000]) > 1e-3


@settings(max_examples=5, deadline=None, derandomize=True)  # each example compiles one exact-length program
@given(t=st.integers(1, 300), version=st.sampled_from(VERSIONS), finalize=st.booleans(), seed=st.integers(0, 99))
def test_any_length_bucketed_equals_exact_length_and_streaming_is_a_prefix(models, t, version, finalize, seed):
    """Any length: t*480 samples; the bucketed `vocode` equals the exact-length `hift_inference` (padding and
    masks change nothing); CV3 finalize=False is the prefix of the finalize=True output (causal vocoder)."""
    cfg, params, _ = models[version]
    finalize = finalize or not cfg.causal or t <= cfg.finalize_false_trim
    mel = (np.random.RandomState(seed).randn(1, t, 80) * 2 - 5).astype(np.float32)
    key = jax.random.key(seed)
    wav, source = vocode(params, cfg, mel, finalize=finalize, key=key, buckets=BUCKETS)
    n = t if finalize else t - cfg.finalize_false_trim
    chex.assert_shape(wav, (1, n * 480))
    chex.assert_shape(source, (1, (t if finalize else t - cfg.f0_lookahead) * 480))
    chex.assert_tree_all_finite((wav, source))
    wav_x, source_x = hift_inference(params, cfg, mel, finalize=finalize, key=key)
    assert rel_l2(wav, wav_x) < 1e-5 and rel_l2(source, source_x) < 1e-5, (rel_l2(wav, wav_x), rel_l2(source, source_x))
    assert float(np.std(np.asarray(wav))) > 0  # a real signal, not a constant
    if not finalize:
        wav_f, source_f = vocode(params, cfg, mel, finalize=True, key=key, buckets=BUCKETS)
        np.testing.assert_allclose(wav, np.asarray(wav_f)[:, :n * 480], atol=1e-6)
        np.testing.assert_allclose(source, np.asarray(source_f)[:, :source.shape[1]], atol=1e-6)


def test_bucket_length():
    assert bucket_length(1) == 16 and bucket_length(16) == 16 and bucket_length(17) == 32
    assert bucket_length(5000) == 8192 and bucket_length(100, (64, 320)) == 320 and bucket_length(700, (320,)) == 960


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_inputs_are_named(models, version):
    cfg, params, _ = models[version]
    mel = np.zeros((1, 20, 80), np.float32)
    with pytest.raises(HiFTInputError, match="transpose to"):
        vocode(params, cfg, np.zeros((1, 80, 20), np.float32))
    with pytest.raises(HiFTInputError, match="last axis.*expects 80"):
        vocode(params, cfg, np.zeros((1, 20, 100), np.float32))
    with pytest.raises(HiFTInputError, match="mel is empty"):
        vocode(params, cfg, np.zeros((1, 0, 80), np.float32))
    with pytest.raises(HiFTInputError, match=r"must be \[B, T, 80\]"):
        vocode(params, cfg, np.zeros((20, 80), np.float32))
    with pytest.raises(HiFTInputError, match="floating point"):
        vocode(params, cfg, np.zeros((1, 20, 80), np.int32))
    with pytest.raises(HiFTInputError, match="noise must be"):
        vocode(params, cfg, mel, noise=np.zeros((1, 100, 9), np.float32))
    with pytest.raises(HiFTInputError, match="lengths must be"):
        vocode(params, cfg, mel, lengths=[21])
    with pytest.raises(HiFTInputError, match="rand_ini must be"):
        vocode(params, cfg, mel, rand_ini=np.zeros((1, 8)))
    with pytest.raises(HiFTInputError, match="params must be the HiFT tree"):
        vocode({"conv_pre": {}}, cfg, mel)
    if cfg.causal:
        with pytest.raises(HiFTInputError, match="more than 8 mel frames"):
            vocode(params, cfg, mel[:, :8], finalize=False)
        with pytest.raises(HiFTInputError, match="cache_source is a CosyVoice2"):
            vocode(params, cfg, mel, cache_source=np.zeros((1, 3840), np.float32))
    else:
        with pytest.raises(HiFTInputError, match="finalize=False exists only for CosyVoice3"):
            vocode(params, cfg, mel, finalize=False)
        with pytest.raises(HiFTInputError, match="cache_source must be"):
            vocode(params, cfg, mel, cache_source=np.zeros((1, 20 * 480 + 1), np.float32))


def _f0_reference_cv3(f0_params, mel):
    """Upstream CausalConvRNNF0Predictor in float64 numpy: mel [B, T, 80] -> f0 [B, T] (float32-rounded)."""
    x = mel.astype(np.float64)
    for i in range(5):
        p = f0_params[f"condnet_{i}"]
        w, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
        k = w.shape[0]
        x = np.pad(x, ((0, 0), (0, k - 1) if i == 0 else (k - 1, 0), (0, 0)))
        t = x.shape[1] - k + 1
        x = sum(np.einsum("btc,co->bto", x[:, j:j + t], w[j]) for j in range(k)) + b
        x = np.where(x > 0, x, np.expm1(x))  # ELU
    c = f0_params["classifier"]
    y = x @ np.asarray(c["kernel"], np.float64) + np.asarray(c["bias"], np.float64)
    return np.abs(y[..., 0]).astype(np.float32)


def test_cv3_f0_island_stays_float64_inside_jit_and_vmap(models):
    """The traced batched path (jit of vmap) runs the CV3 f0 predictor on the float64 weights that
    `device_params` placed: f0 equals a float64 numpy reference, and differs from what the same code
    gives with the weights rounded to float32 (what a plain x64-off `device_put` would do)."""
    cfg, params, host = models["cosyvoice3"]
    f0_host = host["f0_predictor"]
    assert jax.tree_util.tree_leaves(params["f0_predictor"])[0].dtype == jnp.float64
    assert any(np.any(np.asarray(a) != np.asarray(a).astype(np.float32)) for a in jax.tree_util.tree_leaves(f0_host))
    mel = (np.random.RandomState(3).randn(3, 1, 40, 80) * 2 - 5).astype(np.float32)
    lengths = np.full((3, 1), 40, np.int32)

    @jax.jit
    def traced(p, m, n):
        f0 = jax.vmap(lambda mm, nn: f0_stage(p, cfg, mm, nn)[0])(m, n)
        wav = jax.vmap(lambda mm, nn: vocode_padded(p, cfg, mm, nn)[0])(m, n)
        return f0, wav

    f0, wav = traced(params, mel, lengths)
    ref = _f0_reference_cv3(f0_host, mel[:, 0])
    np.testing.assert_array_equal(np.asarray(f0)[:, 0], ref)
    rounded = jax.device_put(params)  # x64 off here: float64 leaves keep float64 (placed arrays)
    rounded = {**rounded, "f0_predictor": jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32)),
                                                                   params["f0_predictor"])}
    f0_r, _ = traced(rounded, mel, lengths)
    assert np.any(np.asarray(f0_r) != np.asarray(f0))  # the test can tell float32 weights apart
    eager_wav, _ = hift_inference(params, cfg, mel[0], key=None)
    assert rel_l2(np.asarray(wav)[0], eager_wav) < 1e-5  # batched convs round differently, f0 is identical
