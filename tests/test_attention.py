"""Attention: float64 NumPy reference, masks incl. fully masked rows/batches, dtypes, no NaN/Inf."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cosyjax.errors import CapabilityError
from cosyjax.nn.attention import AttentionCall, attention, block_causal_mask, choose_implementation


def reference(q, k, v, mask, bias=None, scale=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    k = np.repeat(k, G, axis=2)
    v = np.repeat(v, G, axis=2)
    scale = D ** -0.5 if scale is None else scale
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    mask = np.broadcast_to(mask, logits.shape) if mask is not None else np.ones(logits.shape, bool)
    logits = np.where(mask, logits, -np.inf)
    out = np.zeros((B, H, T, D))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = logits[b, h, t]
                if not mask[b, h, t].any():
                    continue
                p = np.exp(row - row.max())
                p /= p.sum()
                out[b, h, t] = p @ v[b, :, h]
    return out.transpose(0, 2, 1, 3)


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2, jnp.float16: 5e-3}


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 40), S=st.one_of(st.integers(1, 40), st.integers(41, 2048)),
    K=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 3]), D=st.sampled_from([4, 8]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    mask_kind=st.sampled_from(["none", "random", "key_pad", "row_dead", "batch_dead"]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(B, T, S, K, G, D, dtype, mask_kind, seed):
    rng = np.random.default_rng(seed)
    H = K * G
    q = rng.normal(size=(B, T, H, D)) * 2
    k = rng.normal(size=(B, S, K, D)) * 2
    v = rng.normal(size=(B, S, K, D))
    mask = None
    if mask_kind == "random":
        mask = rng.random((B, 1, T, S)) < 0.6
    elif mask_kind == "key_pad":
        lens = rng.integers(0, S + 1, size=B)
        mask = (np.arange(S)[None, :] < lens[:, None])[:, None, None, :]
    elif mask_kind == "row_dead":
        mask = rng.random((B, H, T, S)) < 0.7
        mask[:, :, rng.integers(0, T)] = False
    elif mask_kind == "batch_dead":
        mask = np.ones((B, 1, T, S), bool)
        mask[rng.integers(0, B)] = False
    qd, kd, vd = (jnp.asarray(a, dtype) for a in (q, k, v))
    out = attention(qd, kd, vd, None if mask is None else jnp.asarray(mask), implementation="xla")
    assert out.dtype == dtype and out.shape == (B, T, H, D)
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    ref = reference(*(np.asarray(a, np.float64) for a in (qd, kd, vd)), mask)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out, ref, atol=TOL[dtype] * scale, rtol=0)
    if mask is not None:  # fully masked rows are exactly zero
        dead = ~np.broadcast_to(mask, (B, H, T, S)).any(-1)  # [B,H,T]
        assert np.all(out.transpose(0, 2, 1, 3)[dead] == 0)


def test_lengths_and_bias():
    rng = np.random.default_rng(0)
    B, T, S, H, D = 2, 5, 7, 2, 4
    q, k, v = rng.normal(size=(B, T, H, D)), rng.normal(size=(B, S, H, D)), rng.normal(size=(B, S, H, D))
    bias = rng.normal(size=(B, H, T, S))
    kvl, ql = np.array([7, 3]), np.array([5, 2])
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias),
                    kv_lengths=jnp.asarray(kvl), q_lengths=jnp.asarray(ql))
    mask = (np.arange(S)[None, :] < kvl[:, None])[:, None, None, :] & (np.arange(T)[None, :] < ql[:, None])[:, None, :, None]
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask, bias), atol=2e-5)
    assert np.all(np.asarray(out)[1, 2:] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_long_inputs_and_extreme_logits_stay_finite(dtype):
    B, T, S, H, D = 1, 4, 2048, 2, 16
    key = jax.random.PRNGKey(0)
    q = (jax.random.normal(key, (B, T, H, D)) * 30).astype(dtype)
    k = (jax.random.normal(jax.random.fold_in(key, 1), (B, S, H, D)) * 30).astype(dtype)
    v = jax.random.normal(jax.random.fold_in(key, 2), (B, S, H, D)).astype(dtype)
    mask = jnp.arange(S)[None, None, None, :] < jnp.array([1500])[:, None, None, None]
    out = attention(q, k, v, mask)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_decode_shape_query_length_one_over_cache():
    B, S, H, K, D = 2, 64, 4, 2, 8
    rng = np.random.default_rng(1)
    q = rng.normal(size=(B, 1, H, D))
    k, v = rng.normal(size=(B, S, K, D)), rng.normal(size=(B, S, K, D))
    kvl = np.array([10, 64])
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_lengths=jnp.asarray(kvl))
    mask = (np.arange(S)[None, :] < kvl[:, None])[:, None, None, :]
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), atol=2e-5)


def test_bad_inputs():
    q = jnp.zeros((1, 3, 3, 4))
    k = jnp.zeros((1, 5, 2, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, k)
    with pytest.raises(TypeError, match="boolean"):
        attention(q, jnp.zeros((1, 5, 3, 4)), jnp.zeros((1, 5, 3, 4)), jnp.ones((1, 1, 3, 5)))
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, jnp.zeros((1, 5, 3, 4)), jnp.zeros((1, 5, 3, 4)), jnp.ones((1, 1, 4, 5), bool))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, jnp.zeros((1, 5, 3, 4)), jnp.zeros((1, 5, 3, 4)), implementation="flash")


def test_jit_and_grad_are_finite_with_dead_rows():
    q = jnp.ones((1, 2, 1, 4))
    k = jnp.ones((1, 3, 1, 4))
    mask = jnp.zeros((1, 1, 2, 3), bool)
    f = jax.jit(lambda q: attention(q, k, k, mask).sum())
    g = jax.grad(f)(q)
    assert bool(jnp.all(jnp.isfinite(g)))


def _call(platform="gpu", dtype="bfloat16", T=100, D=64, mask_shape=(2, 1, 100, 100), bias=False, chunk=0, H=4, K=2):
    return AttentionCall(platform, dtype, T, 100, H, K, D, mask_shape, bias, False, chunk)


@pytest.mark.parametrize("request_, call, want", [
    ("auto", _call(platform="cpu"), "xla"),
    ("auto", _call(), "cudnn"),  # dense [B,1,T,S] mask, bf16, GQA
    ("auto", _call(mask_shape=(2, 1, 1, 100), bias=True), "cudnn"),
    ("auto", _call(chunk=50, mask_shape=None), "pallas"),  # structured chunk mask: block skipping
    ("auto", _call(dtype="float32"), "pallas"),  # cuDNN needs bf16/fp16
    ("auto", _call(D=100), "pallas"),  # cuDNN head dim must be a multiple of 8
    ("auto", _call(D=512), "xla"),  # neither kernel
    ("auto", _call(T=1), "xla"),  # decode step
    ("auto@cpu", _call(), "xla"),  # the @platform part overrides the call's platform
    ("pallas_interpret", _call(platform="cpu"), "pallas_interpret"),
    ("xla", _call(), "xla"),
])
def test_path_choice_is_a_function_of_the_call(request_, call, want):
    if "@" in request_:
        call = call._replace(platform=request_.split("@")[1])
    path, reason = choose_implementation(request_, call)
    assert path == want and reason


@pytest.mark.parametrize("request_, call, match", [
    ("cudnn", _call(platform="cpu"), "needs a GPU"),
    ("cudnn", _call(dtype="float32"), "bf16/fp16"),
    ("cudnn", _call(D=100), "multiple of 8"),
    ("pallas", _call(platform="cpu"), "compiles only for GPU"),
    ("pallas", _call(D=512), "head dim 512"),
])
def test_explicit_kernel_that_cannot_run_raises(request_, call, match):
    with pytest.raises(CapabilityError, match=match):
        choose_implementation(request_, call)


def test_explicit_cudnn_on_this_cpu_raises_instead_of_falling_back():
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(CapabilityError, match="cudnn needs a GPU"):
        attention(q, q, q, implementation="cudnn@cpu")
    with pytest.raises(ValueError, match="unknown attention target platform"):
        attention(q, q, q, implementation="auto@mars")


def test_chunk_size_equals_the_dense_chunk_mask():
    rng = np.random.default_rng(2)
    B, T, H, D, C = 2, 23, 2, 8, 5
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))
    kvl = jnp.array([23, 11])
    out = attention(q, k, v, kv_lengths=kvl, chunk_size=C, implementation="xla")
    mask = np.asarray(block_causal_mask(T, T, C))[None, None] & (np.arange(T) < np.asarray(kvl)[:, None])[:, None, None]
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, mask), atol=2e-5)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    assert np.array_equal(np.asarray(block_causal_mask(T, T, C)), j < (i // C + 1) * C)


# ---- the tiled chunk-mask path (xla, chunk_size > 0): exact under caching, cost by valid keys -----------

@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 60), S_extra=st.integers(0, 40), K=st.sampled_from([1, 2]), G=st.sampled_from([1, 2]),
       C=st.sampled_from([3, 5, 8]), offset_blocks=st.integers(0, 4), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       with_q_lengths=st.booleans(), seed=st.integers(0, 2**16))
def test_tiled_chunk_attention_matches_float64_reference(T, S_extra, K, G, C, offset_blocks, dtype, with_q_lengths,
                                                         seed):
    """Queries at q_offset + [0, T) (a cache), keys [0, S) of which kv_lengths valid, GQA, padded rows."""
    rng = np.random.default_rng(seed)
    B, H, D = 2, K * G, 8
    off = offset_blocks * C
    S = off + T + S_extra
    q = jnp.asarray(rng.normal(size=(B, T, H, D)) * 2, dtype)
    k = jnp.asarray(rng.normal(size=(B, S, K, D)) * 2, dtype)
    v = jnp.asarray(rng.normal(size=(B, S, K, D)), dtype)
    kvl = np.array([off + T, max(1, off + T // 2)])
    ql = np.array([T, max(1, T // 3)]) if with_q_lengths else None
    out = jax.jit(lambda q, k, v, o: attention(q, k, v, kv_lengths=kvl, q_lengths=ql, chunk_size=C, q_offset=o,
                                               implementation="xla"))(q, k, v, jnp.int32(off))
    qpos = off + np.arange(T)
    mask = (np.arange(S)[None, :] < ((qpos // C + 1) * C)[:, None])[None, None] \
        & (np.arange(S) < kvl[:, None])[:, None, None]
    if ql is not None:
        mask = mask & (np.arange(T)[None, :] < ql[:, None])[:, None, :, None]
    want = reference(np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32), mask)
    got = np.asarray(out, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@settings(max_examples=10, deadline=None)
@given(n_blocks=st.integers(2, 12), start_block=st.integers(0, 6), new_blocks=st.integers(1, 5),
       spare=st.integers(0, 300), heads=st.sampled_from([(2, 32), (16, 64)]), seed=st.integers(0, 2**16))
def test_tiled_chunk_attention_rows_are_bit_identical_with_a_cache(n_blocks, start_block, new_blocks, spare, heads,
                                                                  seed):
    """The property exact incremental streaming rests on: a query row's output has the same bits whether
    it is computed among all N frames (recompute) or as one of F new frames against a zero-padded cache of
    any capacity (incremental)."""
    C = 50
    H, D = heads
    start_block = min(start_block, n_blocks - 1)
    new_blocks = min(new_blocks, n_blocks - start_block)
    N, start, F = n_blocks * C, start_block * C, new_blocks * C
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(2, N, H, D)).astype(np.float32) for _ in range(3))
    full = jax.jit(lambda q, k, v: attention(q, k, v, chunk_size=C, implementation="xla"))(q, k, v)
    cap = start + F + spare
    kc, vc = np.zeros((2, cap, H, D), np.float32), np.zeros((2, cap, H, D), np.float32)
    kc[:, :start + F], vc[:, :start + F] = k[:, :start + F], v[:, :start + F]
    inc = jax.jit(lambda q, k, v, s: attention(q, k, v, chunk_size=C, q_offset=s, kv_lengths=jnp.full((2,), s + F),
                                               implementation="xla"))(q[:, start:start + F], kc, vc, jnp.int32(start))
    assert np.array_equal(np.asarray(inc), np.asarray(full)[:, start:start + F])


def test_tiled_rel_pos_equals_the_dense_bias_path():
    """A RelPos term computed per tile equals the same term applied as a dense bias (the kernels' path)."""
    from cosyjax.nn.attention import RelPos, _rel_pos_dense_bias
    rng = np.random.default_rng(5)
    B, T, H, D, C, off = 2, 13, 2, 8, 4, 8
    S = off + T + 3
    q, qr = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, S, H, D)), jnp.float32) for _ in range(2))
    table = jnp.asarray(rng.normal(size=(2 * S - 1, H, D)), jnp.float32)
    rel = RelPos(qr, table, S - 1)
    kvl = jnp.array([off + T, off + 5])
    tiled = attention(q, k, v, kv_lengths=kvl, chunk_size=C, q_offset=off, rel_pos=rel, implementation="xla")
    bias = _rel_pos_dense_bias(rel, S, off, D ** -0.5)
    qpos = off + np.arange(T)
    mask = (np.arange(S)[None, :] < ((qpos // C + 1) * C)[:, None])[None, None] \
        & (np.arange(S) < np.asarray(kvl)[:, None])[:, None, None]
    dense = attention(q, k, v, jnp.asarray(mask), bias=bias, implementation="xla")
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(dense), atol=2e-5, rtol=2e-5)
    want = reference(q, k, v, mask, bias=bias)
    np.testing.assert_allclose(np.asarray(tiled), want, atol=2e-5, rtol=2e-5)


def test_tiled_chunk_attention_has_gradients():
    """Training differentiates through the streaming masks (no q_offset: static loops)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 17, 2, 8)), jnp.float32) for _ in range(3))
    mask = np.asarray(block_causal_mask(17, 17, 5))[None, None] & (np.arange(17) < 12)[None, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v)[:, :12] ** 2)

    tiled = jax.grad(loss(lambda q, k, v: attention(q, k, v, kv_lengths=jnp.array([12]), chunk_size=5,
                                                    implementation="xla")), argnums=(0, 1, 2))(q, k, v)
    dense = jax.grad(loss(lambda q, k, v: attention(q, k, v, jnp.asarray(mask), implementation="xla")),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(tiled, dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(start_chunks=st.integers(0, 9), new_chunks=st.integers(1, 4), n_valid=st.integers(1, 40),
       lead=st.integers(0, 2), impl=st.sampled_from(["xla", "xla_dense", "pallas_interpret"]))
def test_kv_cache_read_in_place_equals_the_dense_keys(start_chunks, new_chunks, n_valid, lead, impl):
    """attention(k_new, kv_cache=buffer) = attention(buffer slice with k_new written at q_offset): bit for bit
    on the tiled XLA path (the same key values per tile), to rounding on the paths that assemble keys."""
    from cosyjax.nn.attention import KVCache

    C, B, H, K, D, S, n_lead = 10, 2, 4, 2, 8, 200, 3
    start, F = start_chunks * C, new_chunks * C
    rng = np.random.default_rng(start_chunks * 100 + new_chunks)
    q = jnp.asarray(rng.standard_normal((B, F, H, D)), jnp.float32)
    kn, vn = (jnp.asarray(rng.standard_normal((B, F, K, D)), jnp.float32) for _ in range(2))
    kb, vb = (jnp.asarray(rng.standard_normal((n_lead, B, S, K * D)), jnp.float32) for _ in range(2))
    kv_len = jnp.full((B,), start + min(n_valid, F), jnp.int32)
    chunk = 0 if impl == "xla_dense" else C
    name = "xla" if impl == "xla_dense" else impl
    got = attention(q, kn, vn, kv_lengths=kv_len, chunk_size=chunk, q_offset=jnp.int32(start),
                    kv_cache=KVCache(kb, vb, (jnp.int32(lead),)), implementation=name)
    put = lambda buf, new: jax.lax.dynamic_update_slice(buf[lead].reshape(B, S, K, D), new, (0, start, 0, 0))  # noqa: E731
    want = attention(q, put(kb, kn), put(vb, vn), kv_lengths=kv_len, chunk_size=chunk, q_offset=jnp.int32(start),
                     implementation=name)
    if impl == "xla":
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kv_cache_bad_buffers_raise():
    from cosyjax.errors import CosyJaxError
    from cosyjax.nn.attention import KVCache

    q = jnp.zeros((1, 10, 2, 4))
    k = jnp.zeros((1, 10, 2, 4))
    with pytest.raises(CosyJaxError, match="kv_cache needs q_offset"):
        attention(q, k, k, chunk_size=10, kv_cache=KVCache(jnp.zeros((1, 1, 40, 8)), jnp.zeros((1, 1, 40, 8)), (0,)))
    with pytest.raises(CosyJaxError, match="multiple of the 40-key tile"):
        attention(q, k, k, chunk_size=10, q_offset=jnp.int32(0), implementation="xla",
                  kv_cache=KVCache(jnp.zeros((1, 1, 50, 8)), jnp.zeros((1, 1, 50, 8)), (0,)))
