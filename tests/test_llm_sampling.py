"""RAS / nucleus / greedy sampling against a NumPy transcription of upstream `ras_sampling` (inverse-CDF draws)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cosyjax.llm import sampling as smp
from cosyjax.llm.config import LLMConfig

CFG = LLMConfig(version="cosyvoice2", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                max_position_embeddings=128, speech_token_size=61, num_special=3, llm_input_size=8,
                llm_output_size=8)
V = CFG.speech_vocab_size


def _icdf(w, u):
    c = np.cumsum(np.asarray(w, np.float64))
    j = int(np.sum(c / c[-1] <= u))
    nz = np.nonzero(np.asarray(w) > 0)[0]
    return min(j, int(nz[-1]))


def ref_ras(logp, history, u, top_p=0.8, top_k=25, win=10, tau_r=0.1):
    """upstream ras_sampling / nucleus_sampling / random_sampling with multinomial -> inverse CDF."""
    logp = np.array(logp, np.float32)
    p = np.exp(logp - logp.max())
    p = (p / p.sum()).astype(np.float32)
    order = np.argsort(-p, kind="stable")
    probs, ids, cum = [], [], np.float32(0)
    for i in order:
        if cum < np.float32(top_p) and len(probs) < top_k:
            cum = np.float32(cum + p[i])
            probs.append(p[i])
            ids.append(int(i))
        else:
            break
    top = ids[_icdf(probs, u[0])]
    rep = sum(1 for t in list(history)[-win:] if t == top)
    if rep >= win * tau_r:
        logp[top] = -np.inf
        q = np.exp(logp - logp[np.isfinite(logp)].max())
        q = q / q.sum()
        return _icdf(q, u[1]), True, len(ids)
    return top, False, len(ids)


_ras_jit = jax.jit(lambda a, b, c: smp.ras_sample(CFG, a, b, c))


def _run(logp, history, u):
    hist = np.full((1, CFG.win_size), -1, np.int32)
    h = list(history)[-CFG.win_size:]
    hist[0, : len(h)] = h
    tok, fb, n = _ras_jit(
        jnp.asarray(logp[None], jnp.float32), jnp.asarray(hist), jnp.asarray(np.asarray(u, np.float32)[None]))
    return int(tok[0]), bool(fb[0]), int(n[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temp=st.sampled_from([0.3, 1.0, 4.0]), n_hist=st.integers(0, 14))
def test_ras_matches_upstream_reference(seed, temp, n_hist):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=V) * temp
    logp = (logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()).astype(np.float32)
    likely = np.argsort(-logp)[:6]  # history made of likely ids so that the fallback path runs often
    history = np.where(rng.uniform(size=n_hist) < 0.7, rng.choice(likely, size=n_hist), rng.integers(0, V, n_hist))
    u = rng.uniform(size=2)
    assert _run(logp, history, u) == ref_ras(logp, history, u)


def test_nucleus_stable_ties_crossing_item_and_top_k_cap():
    # 10 equal probs of 0.09 (+ tail): mass before item 8 is 0.72 < 0.8 -> item 8 kept; before item 9 0.81 -> stop
    p = np.full(V, 0.1 / (V - 10), np.float32)
    p[[3, 7, 11, 15, 19, 23, 27, 31, 35, 39]] = 0.09
    nucleus = jax.jit(lambda a, b: smp.nucleus(CFG, a, b))
    ids, n = nucleus(jnp.asarray(p[None]), jnp.asarray([0.999], jnp.float32))
    assert int(n[0]) == 9 and int(ids[0]) == 35  # ties keep lower ids first; last kept = 9th lowest id
    ids, _ = nucleus(jnp.asarray(p[None]), jnp.asarray([0.0], jnp.float32))
    assert int(ids[0]) == 3
    flat = np.full((1, V), 1.0 / V, np.float32)  # uniform: capped by top_k = 25
    _, n = nucleus(jnp.asarray(flat), jnp.asarray([0.5], jnp.float32))
    assert int(n[0]) == 25


def test_fallback_masks_repeated_id_and_draws_full_vocab():
    logp = np.full(V, -30.0, np.float32)
    logp[5] = 0.0  # nucleus is just {5}
    logp[40] = -3.0
    tok, fb, n = _run(logp, [1, 5, 2], [0.3, 0.5])
    assert fb and n == 1 and tok == 40  # 5 repeated -> masked -> next most likely
    tok, fb, _ = _run(logp, [1, 2] + [9] * 10, [0.3, 0.5])  # 5 outside the 10-token window
    assert not fb and tok == 5


def test_suppress_stop_modes_and_greedy():
    logp = np.zeros((2, V), np.float32)
    logp[:, CFG.speech_token_size:] = 5.0
    sup = jnp.array([True, False])
    up = np.asarray(smp.suppress_stop(CFG, jnp.asarray(logp), sup))
    assert np.isneginf(up[0, 61]) and up[0, 62] == 5.0 and up[1, 61] == 5.0
    assert int(smp.greedy_sample(jnp.asarray(up))[0]) == 62
    full = np.asarray(smp.suppress_stop(CFG.replace(min_len_mask="stop_set"), jnp.asarray(logp), sup))
    assert np.all(np.isneginf(full[0, 61:])) and np.all(full[1, 61:] == 5.0)
    keep_fill = np.asarray(smp.suppress_stop(CFG.replace(min_len_mask="stop_set"), jnp.asarray(logp), sup, True))
    assert keep_fill[0, CFG.fill_id] == 5.0 and np.isneginf(keep_fill[0, CFG.eos_id])


def test_key_uniforms_are_prefix_stable_and_per_row():
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    a = np.asarray(smp.uniforms_from_keys(keys, 8))
    b = np.asarray(smp.uniforms_from_keys(keys, 32))
    np.testing.assert_array_equal(a, b[:, :8])
    assert not np.array_equal(a[0], a[1]) and a.min() >= 0 and a.max() < 1


def test_inverse_cdf_never_picks_zero_weight():
    w = jnp.asarray([[0.2, 0.0, 0.8, 0.0]], jnp.float32)
    assert int(smp.inverse_cdf(w, jnp.asarray([0.9999999], jnp.float32))[0]) == 2
    assert int(smp.inverse_cdf(w, jnp.asarray([0.1], jnp.float32))[0]) == 0
    assert int(smp.inverse_cdf(w, jnp.asarray([0.2], jnp.float32))[0]) == 2


def test_unknown_method():
    with pytest.raises(ValueError, match="sampling method"):
        smp.sample(CFG, "top_k", jnp.zeros((1, V)), jnp.zeros((1, 10), jnp.int32), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="temperature"):
        smp.TopKTopP(temperature=0.0)


def test_sampler_objects():
    """'ras' maps to RAS.from_config (the yaml values); objects are hashable (static jit args); RAS with
    other parameters follows the reference with those parameters; TopKTopP is a tempered nucleus draw."""
    ras = smp.resolve(CFG, "ras")
    assert ras == smp.RAS(CFG.top_p, CFG.top_k, CFG.win_size, CFG.tau_r) and hash(ras) == hash(smp.RAS())
    assert isinstance(smp.resolve(CFG, "greedy"), smp.Greedy)
    rng = np.random.default_rng(5)
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, V)) * 2.0, jnp.float32))
    hist = jnp.asarray(np.argsort(-np.asarray(logp), axis=1)[:, :5].repeat(2, axis=1).astype(np.int32))
    u = jnp.asarray(rng.uniform(size=(4, 2)), jnp.float32)
    odd = smp.RAS(top_p=0.5, top_k=7, win_size=6, tau_r=0.5)
    tok, fb, n = jax.jit(lambda a, b, c: odd.sample(a, b, c))(logp, hist[:, -6:], u)
    for b in range(4):
        want = ref_ras(np.asarray(logp[b]), np.asarray(hist[b]), np.asarray(u[b]), top_p=0.5, top_k=7, win=6,
                       tau_r=0.5)
        assert (int(tok[b]), bool(fb[b]), int(n[b])) == want
    g, _, _ = smp.Greedy().sample(logp, hist, u)
    np.testing.assert_array_equal(g, jnp.argmax(logp, axis=-1))
    t1, _, n1 = smp.TopKTopP(top_k=1, top_p=1.0, temperature=0.5).sample(logp, hist, u)
    np.testing.assert_array_equal(t1, g)
    assert np.all(np.asarray(n1) == 1)
    # temperature 2: the nucleus draw of softmax(logp / 2) equals the RAS nucleus of those scaled log-probs
    tt, _, nt = smp.TopKTopP(top_k=9, top_p=0.7, temperature=2.0).sample(logp, hist, u)
    top, n_keep = smp.nucleus(smp.TopKTopP(top_k=9, top_p=0.7), jax.nn.softmax(logp / 2.0, axis=-1), u[:, 0])
    np.testing.assert_array_equal(tt, top)
    np.testing.assert_array_equal(nt, n_keep)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 30), st.booleans())
def test_top_k_rows_equals_lax_top_k_under_vmap(seed, rows, k, ties):
    """The rank-2 top-k gives lax.top_k's values and indices (ties: lower index first) however it is vmapped."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, rows, 40)).astype(np.float32)
    if ties:
        x[..., 5:25] = x[..., 4:5]
    x = jnp.asarray(x)
    ref_v, ref_i = jax.lax.top_k(x, k)
    for f in (jax.vmap(lambda r: smp.top_k_rows(r, k)), jax.jit(jax.vmap(lambda r: smp.top_k_rows(r, k))),
              jax.vmap(lambda r: smp.top_k_rows(r, k), in_axes=1, out_axes=1)):
        v, i = f(x)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_v))
        np.testing.assert_array_equal(np.asarray(i), np.asarray(ref_i))
    v, i = jax.vmap(jax.vmap(lambda r: smp.top_k_rows(r[None], k)))(x)  # nested: [2, rows, 1, k]
    np.testing.assert_array_equal(np.asarray(i)[:, :, 0], np.asarray(ref_i))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's top-k kernel rewrite")
def test_nucleus_in_a_vmapped_loop_compiles_without_a_full_sort():
    """Inside a loop and under vmap over batch-1 rows, XLA CPU lowered lax.top_k over the speech vocabulary to
    a full stable sort (most of a tiny model's decode step); the rank-2 top-k keeps its fast kernel."""
    cfg = smp.RAS()

    def draw(p, u):  # p [1, V], u [1]: a decode step's nucleus draw, repeated in a loop
        def body(i, c):
            ids, n = smp.nucleus(cfg, p + 1e-6 * i, u)
            return c + ids[0] + n[0]
        return jax.lax.fori_loop(0, 3, body, jnp.int32(0))

    p = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).standard_normal((4, 1, 6761)), jnp.float32), -1)
    u = jnp.full((4, 1), 0.5, jnp.float32)
    hlo = jax.jit(jax.vmap(draw)).lower(p, u).compile().as_text()
    assert " sort(" not in hlo
