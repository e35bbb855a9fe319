"""Incremental CV2 streaming flow (`cosyjax/flow/cv2/incremental.py`) against the recompute path
(`flow_inference` over all tokens so far, upstream's streaming), on the tiny golden CV2 model."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cosyjax.errors import CosyJaxError
import jax
import jax.numpy as jnp

from cosyjax.flow.cv2.incremental import (IncrementalFlowCV2, IncrementalFlowError, grow_cache, incremental_step,
                                          init_cache)
from cosyjax.flow.cv2.model import flow_inference
from cosyjax.streaming import plan_schedule
from tests.conftest import model_dir
from tests.flow_helpers import load_flow_model, rel_l2

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(model_dir("cosyvoice2"), "flow.pt")),
                                reason="tiny CosyVoice2 model folder absent")

# one recompute bucket (768 tokens) covers every test here: one compilation per streaming flag
REF_BUCKETS = (768,)
MAX_TOKENS = 750  # preallocated capacity (1024 tokens) shared by the tests: compilations are reused


@pytest.fixture(scope="module")
def model():
    return load_flow_model("cosyvoice2")


def _request(cfg, P, N, seed):
    rng = np.random.default_rng(seed)
    prompt_token = rng.integers(0, cfg.vocab_size, P)
    prompt_feat = rng.normal(size=(2 * P, cfg.output_size)).astype(np.float32)
    embedding = rng.normal(size=cfg.spk_embed_dim).astype(np.float32)
    return prompt_token, prompt_feat, embedding, rng.integers(0, cfg.vocab_size, N)


def _recompute(params, cfg, req, token_offset, n_tokens, finalize):
    pt, pf, emb, tokens = req
    P = len(pt)
    mel, _ = flow_inference(params, cfg, tokens[None, :n_tokens], np.array([n_tokens]), pt[None], np.array([P]),
                            pf[None], np.array([2 * P]), emb[None], streaming=not finalize, finalize=finalize,
                            buckets=REF_BUCKETS)
    return np.asarray(mel)[:, 2 * token_offset:]


def _run(inc, tokens, chunk):
    f = inc.final if chunk.finalize else inc.chunk
    return f(tokens, chunk.token_offset, chunk.n_tokens)


@pytest.mark.slow
def test_every_chunk_equals_recompute_30s(model):
    cfg, params = model
    req = _request(cfg, 14, 750, seed=0)
    inc = IncrementalFlowCV2(params, cfg, *req[:3], max_tokens=MAX_TOKENS)
    chunks = plan_schedule(750, 14)
    assert len(chunks) > 5
    for c in chunks:
        mel, frames = _run(inc, req[3], c)
        ref = _recompute(params, cfg, req, c.token_offset, c.n_tokens, c.finalize)
        assert mel.shape == ref.shape == (1, 2 * (c.n_tokens - (0 if c.finalize else 3) - c.token_offset), 80)
        assert mel.dtype == np.float32
        err = rel_l2(mel, ref)
        assert err <= 1e-5, f"chunk {c}: rel-L2 {err:.2e}"
        assert frames >= mel.shape[1]


@pytest.mark.slow
def test_work_is_linear_60s(model):
    cfg, params = model
    P, N = 14, 1500
    req = _request(cfg, P, N, seed=1)
    inc = IncrementalFlowCV2(params, cfg, *req[:3], max_tokens=N)
    computed = emitted = quadratic = 0
    for c in plan_schedule(N, P)[:-1]:
        mel, frames = inc.chunk(req[3], c.token_offset, c.n_tokens)
        assert np.all(np.isfinite(mel))
        computed += frames
        emitted += mel.shape[1]
        quadratic += 2 * (P + c.n_tokens)  # the recompute path's valid frames (bucket padding not counted)
    msg = (f"incremental computed {computed} estimator frames for {emitted} emitted; "
           f"the recompute path computes {quadratic}")
    print(msg)
    assert emitted == 2 * (plan_schedule(N, P)[-1].token_offset)
    assert computed <= 1.25 * emitted, msg
    assert quadratic > 4 * computed, msg


@pytest.mark.slow
def test_calls_off_the_chunk_grid_stay_exact(model):
    """Chunks ending inside a 25-token block: that block's frames are recomputed by the next call."""
    cfg, params = model
    req = _request(cfg, 14, 80, seed=2)
    inc = IncrementalFlowCV2(params, cfg, *req[:3], max_tokens=MAX_TOKENS)
    offset = 0
    for n_tokens in (30, 70):
        mel, frames = inc.chunk(req[3], offset, n_tokens)
        ref = _recompute(params, cfg, req, offset, n_tokens, finalize=False)
        assert rel_l2(mel, ref) <= 1e-5
        offset = n_tokens - 3
    assert frames > mel.shape[1]  # the partial block before this call was recomputed


@pytest.mark.slow
def test_full_attention_chunk_is_not_prefix_stable(model):
    """Why the final chunk is a full recompute: without chunk masks, appending tokens changes early
    frames; with them (streaming), early frames are unchanged, which is what the caches rely on."""
    cfg, params = model
    req = _request(cfg, 14, 200, seed=3)
    full_a = _recompute(params, cfg, req, 0, 100, finalize=True)[:, :100]
    full_b = _recompute(params, cfg, req, 0, 200, finalize=True)[:, :100]
    assert rel_l2(full_a, full_b) > 1e-3  # (the streaming case: test_every_chunk_equals_recompute_30s)


def test_no_recompilation_inside_the_buckets(model):
    cfg, params = model

    def stream(P, N, seed):
        req = _request(cfg, P, N, seed)
        inc = IncrementalFlowCV2(params, cfg, *req[:3], max_tokens=MAX_TOKENS)
        for c in plan_schedule(N, P)[:-1]:
            inc.chunk(req[3], c.token_offset, c.n_tokens)

    stream(14, 200, seed=4)
    before = incremental_step._cache_size()
    stream(13, 180, seed=5)  # other prompt / token lengths, same (capacity, new-token) buckets
    assert incremental_step._cache_size() == before


def test_bad_calls_raise_clear_errors(model):
    cfg, params = model
    pt, pf, emb, tokens = _request(cfg, 14, 700, seed=6)
    assert issubclass(IncrementalFlowError, CosyJaxError)
    with pytest.raises(IncrementalFlowError, match="prompt_feat"):
        IncrementalFlowCV2(params, cfg, pt, pf[:-1], emb)
    with pytest.raises(IncrementalFlowError, match="embedding"):
        IncrementalFlowCV2(params, cfg, pt, pf, emb[:10])
    inc = IncrementalFlowCV2(params, cfg, pt, pf, emb, max_tokens=MAX_TOKENS)
    with pytest.raises(IncrementalFlowError, match="token_offset"):
        inc.chunk(tokens, 5, 40)
    with pytest.raises(IncrementalFlowError, match="look-ahead"):
        inc.chunk(tokens, 0, 3)
    with pytest.raises(IncrementalFlowError, match="tokens given"):
        inc.chunk(tokens[:30], 0, 40)
    bad = tokens.copy()
    bad[0] = cfg.vocab_size
    with pytest.raises(IncrementalFlowError, match="vocabulary"):
        inc.chunk(bad, 0, 40)
    inc.chunk(tokens, 0, 39)
    changed = tokens.copy()
    changed[10] = (changed[10] + 1) % cfg.vocab_size
    with pytest.raises(IncrementalFlowError, match="changed"):
        inc.chunk(changed, 36, 89)
    with pytest.raises(IncrementalFlowError, match="token_offset"):
        inc.chunk(tokens, 0, 89)
    mel, _ = inc.final(tokens, 36, 700)  # 714 tokens: the 768 bucket the other tests compiled
    assert mel.shape == (1, 2 * (700 - 36), 80)
    with pytest.raises(IncrementalFlowError, match="final"):
        inc.chunk(tokens, 700, 710)


def test_grow_cache_keeps_every_buffer_prefix(model):
    """Reallocation to a larger capacity: K/V buffers are zero-padded along their key axis (tokens for the
    encoder, 2x frames for the up-encoder and U-Net), causal-conv contexts are kept as they are."""
    cfg, _ = model
    state = init_cache(cfg, 128, 2, "float32")
    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    state = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    grown = grow_cache(state, 128, 256)
    enc, genc = state["enc"], grown["enc"]
    assert genc["encoders"][0].shape[2] == 256 and genc["up_encoders"][1].shape[2] == 512
    np.testing.assert_array_equal(genc["encoders"][0][:, :, :128], enc["encoders"][0])
    assert not np.any(genc["encoders"][0][:, :, 128:])
    np.testing.assert_array_equal(genc["up_left"], enc["up_left"])
    u, gu = state["unet"], grown["unet"]
    assert gu["mid_blocks"]["transformers"][0].shape[-3] == 512
    mid, gmid = u["mid_blocks"]["transformers"][0], gu["mid_blocks"]["transformers"][0]
    np.testing.assert_array_equal(gmid[..., :256, :, :], mid)
    np.testing.assert_array_equal(gu["down_resnet"][0], u["down_resnet"][0])
    assert jnp.asarray(gu["down_transformers"][1]).shape[-3] == 512


@pytest.mark.slow
def test_concurrent_streams_run_their_calls_batched(model):
    """Two streams stepping together in a `StageGang`: every chunk's call (and the final full-attention
    pass) runs as one vmapped group of 2, and each stream's mel equals its solo run."""
    import threading

    from cosyjax.stage_batch import StageGang

    cfg, params = model
    reqs = [_request(cfg, 14, 120, seed=s) for s in (21, 22)]
    chunks = plan_schedule(120, 14)
    solo = []
    for req in reqs:
        inc = IncrementalFlowCV2(params, cfg, *req[:3], max_tokens=MAX_TOKENS)
        solo.append([_run(inc, req[3], c)[0] for c in chunks])
    gang = StageGang()
    incs = [IncrementalFlowCV2(params, cfg, *req[:3], max_tokens=MAX_TOKENS, run=gang) for req in reqs]
    got = [[], []]
    for c in chunks:
        gang.enter(2)

        def step(i, c=c):
            with gang.member(entered=True):
                got[i].append(_run(incs[i], reqs[i][3], c)[0])

        threads = [threading.Thread(target=step, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    assert gang.stage_groups == {("incremental_step", 2): len(chunks) - 1, ("flow_core", 2): 1}, gang.stage_groups
    for i in range(2):
        assert len(got[i]) == len(chunks)
        for c, a, b in zip(chunks, got[i], solo[i]):
            assert a.shape == b.shape and rel_l2(a, b) <= 1e-5, f"stream {i} chunk {c}: {rel_l2(a, b):.2e}"
