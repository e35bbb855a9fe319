"""Behaviour both flows share (CV2 Conformer + U-Net, CV3 DiT), run per version on the tiny golden models:
streaming chunks reproduce earlier frames, no recompilation within a bucket, batch rows equal batch-1 calls."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.flow_helpers import flow_inputs, flow_module, has_flow_golden, load_flow_model, load_flow_npz, \
    stream_chunk_frames

VERSIONS = [pytest.param(v, marks=pytest.mark.skipif(not has_flow_golden(v), reason="golden flow fixtures absent"))
            for v in ("cosyvoice2", "cosyvoice3")]


@pytest.fixture(scope="module", params=VERSIONS)
def flow(request):
    version = request.param
    cfg, params = load_flow_model(version)
    return version, flow_module(version), cfg, params, load_flow_npz(version)


def test_streaming_chunks_reproduce_earlier_frames(flow):
    """Chunk masks + causal convs + position-fixed noise: frames in complete chunks that the look-ahead
    context cannot reach agree between a finalize=False call and the final call."""
    _, mod, cfg, params, golden = flow
    a, _ = mod.flow_inference(params, cfg, *flow_inputs(golden), streaming=True, finalize=False)
    b, _ = mod.flow_inference(params, cfg, *flow_inputs(golden), streaming=True, finalize=True)
    P = 2 * int(golden["prompt_token_len"][0])
    chunk = stream_chunk_frames(cfg)
    full = (P + a.shape[1]) // chunk * chunk - P  # new frames inside complete 50-frame chunks
    assert full > 0
    np.testing.assert_allclose(np.asarray(a)[:, :full], np.asarray(b)[:, :full], atol=1e-5)
    assert not np.allclose(np.asarray(a)[:, full:], np.asarray(b)[:, full:a.shape[1]], atol=1e-3)


def test_no_recompilation_within_bucket(flow):
    _, mod, cfg, params, golden = flow
    inp = list(flow_inputs(golden))
    mod.flow_inference(params, cfg, *inp, streaming=False, finalize=True)
    n_compiled = mod.flow_core._cache_size()
    for n_new in (40, 29, 30, 45):  # prompt 12 + n_new stays inside the 64-token bucket
        inp[0], inp[1] = golden["token"][:, :n_new], np.array([n_new], np.int32)
        mel, mel_len = mod.flow_inference(params, cfg, *inp, streaming=False, finalize=True)
        assert mel.shape == (1, 2 * n_new, 80) and int(mel_len[0]) == 2 * n_new
    assert mod.flow_core._cache_size() == n_compiled


# one attention mode per version keeps the suite fast: CV2 full attention, CV3 chunk masks
BATCH_STREAMING = {"cosyvoice2": False, "cosyvoice3": True}


def test_batch_rows_match_single_calls(flow):
    """Two rows with different prompt/new lengths, packed and padded, equal their batch-1 results."""
    version, mod, cfg, params, golden = flow
    streaming = BATCH_STREAMING[version]
    rng = np.random.default_rng(1)
    tok, ptok, pfeat, emb = golden["token"], golden["prompt_token"], golden["prompt_feat"], golden["embedding"]
    emb2 = np.concatenate([emb, rng.normal(size=emb.shape).astype(np.float32)])
    token = np.concatenate([tok, np.roll(tok, 5, axis=1)])
    token_len = np.array([48, 31], np.int32)
    prompt_token = np.concatenate([ptok, ptok])
    prompt_token_len = np.array([12, 7], np.int32)
    prompt_feat = np.concatenate([pfeat, pfeat])
    mel, mel_len = mod.flow_inference(params, cfg, token, token_len, prompt_token, prompt_token_len, prompt_feat,
                                      2 * prompt_token_len, emb2, streaming=streaming, finalize=True)
    for b in range(2):
        p, n = int(prompt_token_len[b]), int(token_len[b])
        row = slice(b, b + 1)
        one, one_len = mod.flow_inference(params, cfg, token[row, :n], token_len[row], prompt_token[row, :p],
                                          prompt_token_len[row], prompt_feat[row, :2 * p], 2 * prompt_token_len[row],
                                          emb2[row], streaming=streaming, finalize=True)
        assert int(mel_len[b]) == int(one_len[0]) == 2 * n
        np.testing.assert_allclose(np.asarray(mel)[b, :2 * n], np.asarray(one)[0], atol=2e-5)
        np.testing.assert_array_equal(np.asarray(mel)[b, 2 * n:], 0.0)


@pytest.mark.parametrize("C", [64, 80, 192, 1024])
def test_feature_mean_does_not_depend_on_the_row_count(C):
    """XLA's CPU row reductions change their order with the number of rows; `feature_mean` must not (exact
    incremental streaming computes the same frames among different numbers of rows)."""
    from cosyjax.nn.layers import feature_mean, layer_norm
    x = np.random.default_rng(C).normal(size=(2, 96, C)).astype(np.float32) * 3 + 1
    f = jax.jit(feature_mean)
    g = jax.jit(layer_norm)
    full_f, full_g = np.asarray(f(x)), np.asarray(g(x))
    for M in (1, 8, 9, 24, 50, 55, 64, 95):
        assert np.array_equal(np.asarray(f(x[:, :M])), full_f[:, :M]), M
        assert np.array_equal(np.asarray(g(x[:, :M])), full_g[:, :M]), M
    np.testing.assert_allclose(full_f[..., 0], x.astype(np.float64).mean(-1), rtol=1e-6, atol=1e-6)
