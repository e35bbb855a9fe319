"""Flow building blocks: masks, PreLookaheadLayer, DiT RoPE (head 0 only), DiT causality/padding invariance."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cosyjax.flow.cv3.config import FlowCV3Config
from cosyjax.flow.cv3.dit import DiT, apply_rope_interleaved, rope_inv_freq, rope_tables
from cosyjax.flow.masks import add_optional_chunk_mask, attention_mask, chunk_mask, padding_mask
from cosyjax.flow.pre_lookahead import PreLookaheadLayer

SMALL = FlowCV3Config(dim=32, depth=2, heads=2, dim_head=16, ff_mult=2, pre_lookahead_channels=16, conv_pos_groups=4,
                      static_chunk_size=8)


def _chunk_reference(T, chunk):
    m = np.zeros((T, T), bool)
    for i in range(T):
        m[i, : min((i // chunk + 1) * chunk, T)] = True
    return m


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 40), chunk=st.integers(1, 12))
def test_chunk_mask_matches_loop_reference(T, chunk):
    np.testing.assert_array_equal(np.asarray(chunk_mask(T, chunk)), _chunk_reference(T, chunk))


def test_masks_empty_rows_and_layouts():
    key = np.array([[True, True, False, False], [False, False, False, False]])
    m = np.asarray(add_optional_chunk_mask(key, 2))
    assert m.shape == (2, 4, 4)
    np.testing.assert_array_equal(m[0], [[1, 1, 0, 0]] * 4)
    np.testing.assert_array_equal(m[1], np.ones((4, 4), bool))  # all-False rows -> all True (upstream)
    key2 = np.array([[False, False, True, True]])
    m2 = np.asarray(add_optional_chunk_mask(key2, 2))
    np.testing.assert_array_equal(m2[0, :2], np.ones((2, 4), bool))  # chunk 0 sees no valid key -> all True
    np.testing.assert_array_equal(m2[0, 2:], [[0, 0, 1, 1]] * 2)
    a = attention_mask(key, 0)
    assert a.shape == (2, 1, 1, 4)
    np.testing.assert_array_equal(np.asarray(a)[:, 0, 0], [[1, 1, 0, 0], [1, 1, 1, 1]])
    assert attention_mask(key, 2).shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(np.asarray(padding_mask(np.array([0, 2]), 3)), [[0, 0, 0], [1, 1, 0]])
    with pytest.raises(ValueError):
        chunk_mask(4, 0)


_PRE = PreLookaheadLayer(channels=12, lookahead=3)
_PRE_INIT = jax.jit(_PRE.init)
_PRE_APPLY = jax.jit(_PRE.apply)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000))
def test_pre_lookahead_context_equals_lookahead_in_sequence(seed):
    """Upstream's `context=` path == running on the full sequence and dropping the last L outputs."""
    T = 12
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, T, 6))
    params = _PRE_INIT(jax.random.PRNGKey(seed), x)
    apply = _PRE_APPLY
    full = apply(params, x)
    ctx = apply(params, x[:, :-3], x[:, -3:])
    np.testing.assert_allclose(np.asarray(ctx), np.asarray(full)[:, :-3], atol=1e-5)
    # frame t only depends on frames <= t + 3
    x2 = x.at[:, T - 1].add(1.0)
    np.testing.assert_allclose(np.asarray(apply(params, x2))[:, : T - 4], np.asarray(full)[:, : T - 4], atol=1e-6)
    with pytest.raises(ValueError, match="context"):
        _PRE.apply(params, x, x[:, :2])


def test_rope_interleaved_pairs_and_inv_freq():
    inv = rope_inv_freq(8)
    np.testing.assert_allclose(inv, 1.0 / 10000 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
    cos, sin = rope_tables(5, 8)
    x = np.random.default_rng(0).normal(size=(1, 5, 8)).astype(np.float32)
    got = np.asarray(apply_rope_interleaved(jnp.asarray(x), cos, sin))
    want = np.empty_like(x)
    for n in range(5):
        for m in range(4):
            a = n * inv[m]
            c, s = np.cos(a), np.sin(a)
            want[0, n, 2 * m] = x[0, n, 2 * m] * c - x[0, n, 2 * m + 1] * s
            want[0, n, 2 * m + 1] = x[0, n, 2 * m + 1] * c + x[0, n, 2 * m] * s
    np.testing.assert_allclose(got, want, atol=1e-5)


@functools.lru_cache(maxsize=1)
def _dit():
    dit = DiT(SMALL)
    B, T = 1, 24
    args = [jnp.zeros((B, T, 80)), jnp.ones((B, T), bool), jnp.zeros((B, T, 80)), jnp.zeros((B,)),
            jnp.zeros((B, 80)), jnp.zeros((B, T, 80))]
    params = jax.jit(lambda k: dit.init(k, *args)["params"])(jax.random.PRNGKey(0))
    # AdaLN-zero init is not zero here (flax default init), so every path is exercised
    fn = jax.jit(lambda p, x, m, mu, t, s, c, streaming: dit.apply({"params": p}, x, m, mu, t, s, c, streaming),
                 static_argnames="streaming")
    return params, fn


def _rand_inputs(seed, B=1, T=24):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(k[0], (B, T, 80)), jax.random.normal(k[1], (B, T, 80)), jnp.full((B,), 0.3),
            jax.random.normal(k[2], (B, 80)), jax.random.normal(k[3], (B, T, 80)))


@pytest.mark.parametrize("streaming", [False, True])
def test_dit_padding_invariance(streaming):
    """Frames after a row's length (keys masked, causal convs) never change the valid frames."""
    params, fn = _dit()
    x, mu, t, s, c = _rand_inputs(0)
    n = 13
    mask = jnp.arange(24)[None] < n
    out = fn(params, x, mask, mu, t, s, c, streaming=streaming)
    x2, mu2, c2 = (a.at[:, n:].set(7.0) for a in (x, mu, c))
    out2 = fn(params, x2, mask, mu2, t, s, c2, streaming=streaming)
    np.testing.assert_allclose(np.asarray(out2)[:, :n], np.asarray(out)[:, :n], atol=1e-5)
    assert np.all(np.isfinite(np.asarray(out2)))
    # ... and the no-mask path equals the mask path on a full-length row
    full = fn(params, x, jnp.ones((1, 24), bool), mu, t, s, c, streaming=streaming)
    none = fn(params, x, None, mu, t, s, c, streaming=streaming)
    np.testing.assert_allclose(np.asarray(none), np.asarray(full), atol=1e-5)


def test_dit_streaming_is_block_causal_and_rope_only_on_head0():
    params, fn = _dit()
    x, mu, t, s, c = _rand_inputs(1)
    out = fn(params, x, None, mu, t, s, c, streaming=True)
    x2 = x.at[:, 16:].add(1.0)  # third chunk of 8 frames
    out2 = fn(params, x2, None, mu, t, s, c, streaming=True)
    np.testing.assert_allclose(np.asarray(out2)[:, :16], np.asarray(out)[:, :16], atol=1e-5)
    assert not np.allclose(np.asarray(out2)[:, 16:], np.asarray(out)[:, 16:])
    # RoPE only on head 0: with head 0's q/k weights zeroed, the model becomes position-agnostic up to
    # the causal conv positional embedding; zeroing that too makes the non-streaming output
    # permutation-equivariant in time.
    p = jax.tree_util.tree_map(lambda a: a, params)
    for name in ("to_q", "to_k"):
        p["blocks"][name]["kernel"] = p["blocks"][name]["kernel"].at[:, :, : SMALL.dim_head].set(0.0)
        p["blocks"][name]["bias"] = p["blocks"][name]["bias"].at[:, : SMALL.dim_head].set(0.0)
    for name in ("conv_pos_1", "conv_pos_2"):
        p[name] = jax.tree_util.tree_map(jnp.zeros_like, p[name])
    perm = np.random.default_rng(0).permutation(24)
    a = fn(p, x, None, mu, t, s, c, streaming=False)
    b = fn(p, x[:, perm], None, mu[:, perm], t, s, c[:, perm], streaming=False)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a)[:, perm], atol=1e-4)
    # whereas with head 0 intact, the output is not permutation-equivariant (RoPE is active there)
    p2 = dict(params)
    for name in ("conv_pos_1", "conv_pos_2"):
        p2[name] = jax.tree_util.tree_map(jnp.zeros_like, params[name])
    a = fn(p2, x, None, mu, t, s, c, streaming=False)
    b = fn(p2, x[:, perm], None, mu[:, perm], t, s, c[:, perm], streaming=False)
    assert not np.allclose(np.asarray(b), np.asarray(a)[:, perm], atol=1e-4)
