"""Server slots (`cosyjax.llm.slots`): requests inserted at different times into a running pool decode
exactly the tokens of solo `generate` runs (tiny golden cosyvoice2 model, inputs from `llm/decode.npz`)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from cosyjax.llm import generate as G
from cosyjax.llm import slots as S
from cosyjax.llm.decode import loop_program
from cosyjax.llm.sampling import Greedy, TopKTopP

from .test_llm_generate import _model, _three_rows

CAPACITY = 64
MAX_LEN = (20, 30, 25)


def _solo(params, cfg, row, key, sampling, max_len):
    t, pt, ps = row
    toks, n = G.generate(params, cfg, t[None], prompt_text=pt[None], prompt_speech_token=ps[None], key=key,
                         sampling=sampling, max_len=max_len, cache_len=CAPACITY)
    return np.asarray(toks)[0, : int(n[0])].tolist()


def _run_pool(params, cfg, rows, keys, sampling):
    """2 slots, 3 requests: r0 at t=0, r1 after 5 steps, r2 into r0's slot once r0 is released."""
    state = S.init_slots(cfg, 2, CAPACITY, sampling=sampling)
    got = {0: [], 1: [], 2: []}
    owner = {}

    def put(state, slot, r):
        t, pt, ps = rows[r]
        state = S.insert(params, cfg, state, slot, t, pt, ps, key=keys[r], max_len=MAX_LEN[r])
        owner[slot] = r
        return state

    def advance(state, n):
        state, new = S.step(params, cfg, state, n)
        for slot, toks in enumerate(new):
            if slot in owner:
                got[owner[slot]].extend(toks.tolist())
        return state

    state = put(state, 0, 0)
    state = advance(state, 5)
    state = put(state, 1, 1)
    assert S.free_slots(state) == []
    with pytest.raises(G.LLMInputError, match="in use"):
        put(state, 1, 2)
    state = advance(state, 7)
    while not S.finished(state)[0]:
        state = advance(state, 4)
    assert not S.finished(state)[1]  # r1 (max_len 30) is still mid-generation when r2 arrives
    state = S.release(state, 0)
    del owner[0]
    state = put(state, 0, 2)
    while not S.finished(state).all():
        state = advance(state, 6)
    return got


@pytest.mark.parametrize("sampling", ["greedy", "ras"])
def test_inserted_requests_equal_solo_runs(sampling):
    params, cfg = _model("cosyvoice2")
    rows = _three_rows("cosyvoice2")
    keys = list(jax.random.split(jax.random.PRNGKey(11), 3))
    compiled = loop_program._cache_size()  # jit caches are shared by the whole test process
    got = _run_pool(params, cfg, rows, keys, sampling)
    for r in range(3):
        want = _solo(params, cfg, rows[r], keys[r], sampling, MAX_LEN[r])
        assert len(want) > 0
        assert got[r] == want, (r, got[r], want)
    # one loop program per pool whatever the step count (4, 5, 6, 7 above)
    assert loop_program._cache_size() - compiled <= 1


def test_sampler_objects_at_the_boundary():
    """TopKTopP(top_k=1) is greedy; an explicit Greedy() object equals the string."""
    params, cfg = _model("cosyvoice2")
    t, pt, ps = _three_rows("cosyvoice2")[0]
    key = jax.random.PRNGKey(3)
    want = _solo(params, cfg, (t, pt, ps), key, "greedy", 24)
    assert _solo(params, cfg, (t, pt, ps), key, Greedy(), 24) == want
    assert _solo(params, cfg, (t, pt, ps), key, TopKTopP(top_k=1, top_p=0.9, temperature=0.7), 24) == want
    hot = _solo(params, cfg, (t, pt, ps), key, TopKTopP(top_k=50, top_p=1.0, temperature=2.0), 24)
    assert hot != want  # a flat distribution over 50 ids does not follow the argmax path


def test_slot_errors():
    params, cfg = _model("cosyvoice2")
    t, pt, ps = _three_rows("cosyvoice2")[0]
    state = S.init_slots(cfg, 1, 32, sampling="greedy", max_new=8)
    with pytest.raises(G.LLMInputError, match="output slots"):
        S.insert(params, cfg, state, 0, t, pt, ps, max_len=12)
    with pytest.raises(G.LLMInputError, match="cache_len"):
        S.insert(params, cfg, state, 0, t, pt, ps, max_len=8 + 32)
    with pytest.raises(G.LLMInputError, match="out of range"):
        S.insert(params, cfg, state, 1, t, pt, ps)
    with pytest.raises(G.LLMInputError, match="key"):
        S.insert(params, cfg, S.init_slots(cfg, 1, 32), 0, t, pt, ps, max_len=8)
