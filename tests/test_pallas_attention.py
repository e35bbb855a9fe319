"""The Pallas flash kernel (interpret mode on CPU) against the XLA reference path of `attention`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cosyjax.errors import CapabilityError
from cosyjax.nn.attention import attention, attention_reference_mask
from cosyjax.nn.pallas_attention import FlashBlocks, flash_attention

BLOCKS = FlashBlocks(block_q=16, block_k=16)  # small tiles: several q/k blocks even at T, S <= 40
REL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _kernel(q, k, v, mask, bias, q_lengths, kv_lengths, chunk_size):
    return flash_attention(q, k, v, mask=mask, bias=bias, q_lengths=q_lengths, kv_lengths=kv_lengths,
                           chunk_size=chunk_size, blocks=BLOCKS, interpret=True,
                           precision=jax.lax.Precision.HIGHEST)


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    denom = np.abs(ref).max()
    return np.abs(out - ref).max() / denom if denom > 0 else np.abs(out).max()


@settings(max_examples=24, deadline=None)
@given(
    B=st.integers(1, 2), T=st.integers(1, 40), S=st.integers(1, 40), K=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2]), D=st.sampled_from([32, 64]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    lengths=st.sampled_from(["none", "kv", "both"]), chunk=st.sampled_from([0, 0, 1, 5, 16]),
    mask_kind=st.sampled_from(["none", "dense", "keys"]), bias_kind=st.sampled_from(["none", "full", "heads"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_xla_path(B, T, S, K, G, D, dtype, lengths, chunk, mask_kind, bias_kind, seed):
    rng = np.random.default_rng(seed)
    H = K * G
    q = jnp.asarray(rng.normal(size=(B, T, H, D)) * 2, dtype)
    k = jnp.asarray(rng.normal(size=(B, S, K, D)) * 2, dtype)
    v = jnp.asarray(rng.normal(size=(B, S, K, D)), dtype)
    kvl = ql = None
    if lengths != "none":  # zero-length rows included
        kvl = jnp.asarray(rng.integers(0, S + 1, size=B), jnp.int32)
    if lengths == "both":
        ql = jnp.asarray(rng.integers(0, T + 1, size=B), jnp.int32)
    mask = None
    if mask_kind == "dense":
        m = rng.random((B, 1, T, S)) < 0.6
        m[:, :, rng.integers(0, T)] = False  # a fully masked query row
        mask = jnp.asarray(m)
    elif mask_kind == "keys":
        mask = jnp.asarray(rng.random((B, 1, 1, S)) < 0.7)
    bias = None
    if bias_kind == "full":
        bias = jnp.asarray(rng.normal(size=(B, H, T, S)), jnp.float32)
    elif bias_kind == "heads":
        bias = jnp.asarray(rng.normal(size=(1, H, T, S)), jnp.float32)

    out = _kernel(q, k, v, mask, bias, ql, kvl, chunk)
    ref = attention(q, k, v, mask, bias=bias, q_lengths=ql, kv_lengths=kvl, chunk_size=chunk, implementation="xla")
    assert out.dtype == dtype and out.shape == (B, T, H, D)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _rel(out, ref) <= REL[dtype]
    keep = attention_reference_mask(B, H, T, S, mask, ql, kvl, chunk)
    if keep is not None:  # rows with no visible key are exactly zero
        dead = ~np.broadcast_to(np.asarray(keep), (B, H, T, S)).any(-1)  # [B, H, T]
        assert np.all(np.asarray(out, np.float32).transpose(0, 2, 1, 3)[dead] == 0)


def test_masked_key_blocks_are_never_read():
    """NaN in whole key blocks past the key length / chunk end cannot reach the output unless loaded."""
    B, T, H, D, C = 1, 64, 2, 32, 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    k = rng.normal(size=(B, T, H, D)).astype(np.float32)
    v = rng.normal(size=(B, T, H, D)).astype(np.float32)
    v[:, 48:] = np.nan  # key block 3 (block_k 16)
    k, v = jnp.asarray(k), jnp.asarray(v)
    out = np.asarray(_kernel(q, k, v, None, None, None, jnp.array([48], jnp.int32), 0))
    assert np.all(np.isfinite(out))  # key length 48: block 3 skipped for every query block
    out = np.asarray(_kernel(q, k, v, None, None, None, None, C))
    assert np.all(np.isfinite(out[:, :48]))  # chunk 16: query rows < 48 never load keys >= 48
    assert np.all(np.isnan(out[:, 48:]))


def test_new_lengths_reuse_the_compiled_kernel():
    q = jnp.ones((2, 24, 2, 32), jnp.float32)
    k = jnp.ones((2, 24, 1, 32), jnp.float32)
    _kernel(q, k, k, None, None, jnp.array([24, 3]), jnp.array([24, 10]), 8).block_until_ready()
    before = _kernel._cache_size()
    _kernel(q, k, k, None, None, jnp.array([5, 0]), jnp.array([1, 24]), 8).block_until_ready()
    assert _kernel._cache_size() == before


def test_attention_dispatches_interpret_kernel():
    rng = np.random.default_rng(3)
    B, T, S, H, K, D = 2, 20, 30, 4, 2, 64
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(B, S, K, D)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, S, K, D)), jnp.bfloat16)
    kvl = jnp.array([30, 7])
    out = attention(q, k, v, kv_lengths=kvl, chunk_size=10, implementation="pallas_interpret")
    ref = attention(q, k, v, kv_lengths=kvl, chunk_size=10, implementation="xla")
    assert _rel(out, ref) <= REL[jnp.bfloat16]


def test_explicit_kernel_requests_that_cannot_run_raise():
    q = jnp.zeros((1, 8, 2, 32), jnp.float32)
    with pytest.raises(CapabilityError, match="compiles only for GPU"):
        attention(q, q, q, implementation="pallas@cpu")
    with pytest.raises(CapabilityError, match="head dim 512"):
        z = jnp.zeros((1, 8, 1, 512))
        attention(z, z, z, implementation="pallas_interpret")
    with pytest.raises(CapabilityError, match="power of two"):
        FlashBlocks(block_q=24)
