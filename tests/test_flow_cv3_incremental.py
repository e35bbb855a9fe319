"""Incremental CV3 flow streaming (cosyjax/flow/cv3/incremental.py) against the recompute path.

Tiny golden CV3 model, fixed random tokens, upstream's schedule (`streaming.plan_schedule`). The ODE
runs 3 Euler steps here instead of 10 to keep the suite fast on 2 CPU cores: the per-step caches are
indexed by step, so 3 steps exercise the same code as 10 (the 10-step run is in the closing report).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cosyjax.errors import CosyJaxError
from cosyjax.flow.cv3 import model as cv3_model
from cosyjax.flow.cv3.incremental import IncrementalFlowCV3, IncrementalFlowError, grow_state, incremental_chunk
from cosyjax.flow.inputs import pack_inputs
from cosyjax.streaming import plan_schedule
from tests.flow_helpers import has_flow_golden, load_flow_model, rel_l2

pytestmark = pytest.mark.skipif(not has_flow_golden("cosyvoice3"), reason="golden flow fixtures absent")

STEPS = 3


@pytest.fixture(scope="module")
def model():
    return load_flow_model("cosyvoice3")


def utterance(cfg, seed: int, P: int, N: int):
    rng = np.random.default_rng(seed)
    return dict(tokens=rng.integers(0, cfg.vocab_size, N), prompt_token=rng.integers(0, cfg.vocab_size, P),
                prompt_feat=rng.standard_normal((2 * P, cfg.output_size)).astype(np.float32),
                embedding=rng.standard_normal(cfg.spk_embed_dim).astype(np.float32))


def new_stream(model, u, **kw):
    cfg, params = model
    return IncrementalFlowCV3(params, cfg, u["prompt_token"], u["prompt_feat"], u["embedding"], n_timesteps=STEPS,
                              **kw)


def run_stream(inc, u):
    """[(chunk, mel, flow_frames)] over upstream's schedule."""
    out = []
    for ch in plan_schedule(len(u["tokens"]), len(u["prompt_token"])):
        call = inc.final if ch.finalize else inc.chunk
        mel, frames = call(u["tokens"], ch.token_offset, ch.n_tokens)
        out.append((ch, mel, frames))
    return out


def recompute(model, u, ch):
    cfg, params = model
    P = len(u["prompt_token"])
    mel, _ = cv3_model.flow_inference(params, cfg, u["tokens"][None, :ch.n_tokens], [ch.n_tokens],
                                      u["prompt_token"][None], [P], u["prompt_feat"][None], [2 * P],
                                      u["embedding"][None], streaming=ch.streaming, finalize=ch.finalize,
                                      n_timesteps=STEPS)
    return np.asarray(mel)[:, 2 * ch.token_offset:]


def test_every_chunk_equals_recompute_30s(model):
    cfg, _ = model
    u = utterance(cfg, 0, P=20, N=750)
    inc = new_stream(model, u)
    results = run_stream(inc, u)
    assert len(results) >= 8 and results[-1][0].finalize
    for ch, mel, _ in results:
        want = recompute(model, u, ch)
        assert mel.shape == want.shape == (1, 2 * (ch.n_tokens - (0 if ch.finalize else 3) - ch.token_offset), 80)
        assert mel.dtype == np.float32
        err = rel_l2(mel, want)
        assert err <= 1e-5, f"{ch}: rel-L2 {err:.3g}"
    assert sum(m.shape[1] for _, m, _ in results) == 2 * 750
    assert inc.state is None  # final() drops the cache
    with pytest.raises(IncrementalFlowError, match="finished"):
        inc.chunk(u["tokens"], 0, 33)


def test_work_grows_with_the_chunk_not_the_prefix_60s(model):
    cfg, _ = model
    u = utterance(cfg, 1, P=20, N=1500)
    results = run_stream(new_stream(model, u), u)
    P = len(u["prompt_token"])
    emitted = computed = recomputed = 0
    for ch, mel, frames in results[:-1]:
        emitted += mel.shape[1]
        computed += frames
        packed = pack_inputs(cfg, u["tokens"][None, :ch.n_tokens], [ch.n_tokens], u["prompt_token"][None], [P],
                             u["prompt_feat"][None], [2 * P], u["embedding"][None], finalize=False)
        recomputed += packed["cond"].shape[1]  # frames the recompute path's estimator runs per step
    msg = (f"non-final chunks emit {emitted} frames; incremental computes {computed} per ODE step, "
           f"the recompute path {recomputed}")
    assert computed <= 1.25 * emitted, msg
    assert recomputed > 4 * emitted, msg  # quadratic: every chunk re-runs the whole prefix
    print(msg)


def test_second_utterance_in_the_same_buckets_does_not_recompile(model):
    cfg, _ = model
    first, second = utterance(cfg, 2, P=20, N=460), utterance(cfg, 3, P=22, N=430)
    run_stream(new_stream(model, first), first)
    counts = (incremental_chunk._cache_size(), grow_state._cache_size(), cv3_model.flow_core._cache_size())
    results = run_stream(new_stream(model, second), second)
    assert len(results) >= 5
    assert (incremental_chunk._cache_size(), grow_state._cache_size(), cv3_model.flow_core._cache_size()) == counts


def test_bad_calls(model):
    cfg, params = model
    u = utterance(cfg, 4, P=20, N=120)
    toks = u["tokens"]
    with pytest.raises(IncrementalFlowError, match="prompt_feat"):
        IncrementalFlowCV3(params, cfg, u["prompt_token"], u["prompt_feat"][:-1], u["embedding"])
    with pytest.raises(IncrementalFlowError, match="chunk mask"):
        IncrementalFlowCV3(params, dataclasses.replace(cfg, static_chunk_size=0), u["prompt_token"],
                           u["prompt_feat"], u["embedding"])
    inc = new_stream(model, u)
    with pytest.raises(IncrementalFlowError, match="token_offset 5"):
        inc.chunk(toks, 5, 38)
    with pytest.raises(IncrementalFlowError, match="chunk boundary"):
        inc.chunk(toks, 0, 34)  # prompt 20 + 31 tokens = 102 frames
    with pytest.raises(IncrementalFlowError, match="n_tokens"):
        inc.chunk(toks[:20], 0, 33)
    bad = toks.copy()
    bad[3] = cfg.vocab_size
    with pytest.raises(IncrementalFlowError, match="vocabulary"):
        inc.chunk(bad, 0, 33)
    with pytest.raises(IncrementalFlowError, match="1-D integer"):
        inc.chunk(toks.astype(np.float32), 0, 33)
    mel, _ = inc.chunk(toks, 0, 33)
    assert mel.shape == (1, 60, 80)
    changed = toks.copy()
    changed[31] = (changed[31] + 1) % cfg.vocab_size  # a look-ahead token the cached frames depend on
    with pytest.raises(IncrementalFlowError, match="tokens changed"):
        inc.chunk(changed, 30, 83)
    with pytest.raises(IncrementalFlowError, match="token_offset 0"):
        inc.chunk(toks, 0, 83)
    assert issubclass(IncrementalFlowError, CosyJaxError)


def test_chunk_copies_nothing_the_size_of_the_cache(model):
    """The cache is read in place (attention's KVCache) and written in place (donated): the compiled
    chunk's temporaries do not grow with the cache capacity (before, they were ~1.2x the k cache)."""
    from cosyjax.flow.cv3.incremental import init_state

    cfg, params = model
    F = 50
    temps = {}
    for S in (800, 6400):
        state = init_state(cfg, S, STEPS)
        args = (params, state, np.zeros(F // 2 + 5, np.int32), np.int32(F // 2 + 5), np.int32(2),
                np.zeros((F, 80), np.float32), np.zeros((F, 80), np.float32),
                np.zeros(cfg.spk_embed_dim, np.float32), np.int32(400), np.int32(F))
        mem = incremental_chunk.lower(*args, cfg=cfg, n_timesteps=STEPS).compile().memory_analysis()
        if mem is None:
            pytest.skip("this backend reports no memory analysis")
        temps[S] = mem.temp_size_in_bytes
        assert mem.alias_size_in_bytes >= state["k"].nbytes + state["v"].nbytes  # updated in place
    growth = temps[6400] - temps[800]
    assert growth < 0.1 * init_state(cfg, 6400, STEPS)["k"].nbytes, temps
    u = utterance(cfg, 4, P=20, N=120)
    with pytest.raises(IncrementalFlowError, match="multiples of 200"):
        IncrementalFlowCV3(params, cfg, u["prompt_token"], u["prompt_feat"], u["embedding"], cache_buckets=(256,))
