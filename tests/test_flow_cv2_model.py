"""CV2 flow model (cosyjax/flow/cv2): rel-pos attention vs a float64 reference, encoder/estimator/inference
golden parity, shapes/dtypes, bucket padding invariance, bfloat16, random lengths, bad input.

Streaming chunks, no recompilation and batching are checked for both flows in test_flow_shared.py."""
from __future__ import annotations

import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cosyjax.flow.cv2.model import FlowCV2, FlowInputError, cast_matmul_weights, flow_inference
from cosyjax.nn.attention import AttnSpec
from cosyjax.flow.cv2.rel_attention import RelPositionMultiHeadedAttention, rel_pos_table, rel_shift
from tests.conftest import GOLDEN
from tests.flow_helpers import channels_last as _t, flow_inputs as _inputs
from tests.flow_helpers import load_flow_model, load_flow_npz, rel_l2

FLOW = os.path.join(GOLDEN, "cosyvoice2", "flow")
needs_golden = pytest.mark.skipif(not os.path.exists(os.path.join(FLOW, "inference.npz")),
                                  reason="golden flow fixtures absent")


@pytest.fixture(scope="module")
def model():
    return load_flow_model("cosyvoice2")


@pytest.fixture(scope="module")
def golden():
    return load_flow_npz("cosyvoice2")


# ---- relative-position attention --------------------------------------------------------------

def test_rel_pos_table_and_shift():
    T, d = 5, 8
    table = np.asarray(rel_pos_table(T, d))
    chex.assert_shape(table, (2 * T - 1, d))
    for m in range(2 * T - 1):
        r = T - 1 - m
        w = np.exp(-np.arange(0, d, 2) * math.log(10000.0) / d)
        np.testing.assert_allclose(table[m, 0::2], np.sin(r * w), atol=1e-6)
        np.testing.assert_allclose(table[m, 1::2], np.cos(r * w), atol=1e-6)
    x = np.random.default_rng(0).normal(size=(2, 3, T, 2 * T - 1)).astype(np.float32)
    got = np.asarray(rel_shift(jnp.asarray(x)))
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    np.testing.assert_array_equal(got, x[..., i, T - 1 - i + j])


def _rel_attention_reference(p, x, key_mask, chunk: int = 0):
    """float64 NumPy: score[i,j] = ((q_i+u).k_j + (q_i+v).P(i-j)) / sqrt(dk), masked softmax
    (key_mask [B, T]; `chunk` > 0 adds the block-causal rule j < (i // chunk + 1) * chunk)."""
    B, T, D = x.shape
    H = p["pos_bias_u"].shape[0]
    dk = D // H
    lin = lambda n, a: a @ np.asarray(p[n]["kernel"], np.float64) + (np.asarray(p[n]["bias"], np.float64)  # noqa: E731
                                                                      if "bias" in p[n] else 0.0)
    x = np.asarray(x, np.float64)
    q, k, v = (lin(n, x).reshape(B, T, H, dk) for n in ("linear_q", "linear_k", "linear_v"))
    w = np.exp(-np.arange(0, D, 2) * math.log(10000.0) / D)
    rel = np.arange(T)[:, None] - np.arange(T)[None, :]  # i - j
    pe = np.zeros((T, T, D))
    pe[..., 0::2] = np.sin(rel[..., None] * w)
    pe[..., 1::2] = np.cos(rel[..., None] * w)
    pp = lin("linear_pos", pe).reshape(T, T, H, dk)
    u, vb = np.asarray(p["pos_bias_u"], np.float64), np.asarray(p["pos_bias_v"], np.float64)
    s = (np.einsum("bihd,bjhd->bhij", q + u, k) + np.einsum("bihd,ijhd->bhij", q + vb, pp)) / math.sqrt(dk)
    m = np.broadcast_to(key_mask[:, None, None, :], s.shape)
    if chunk:
        m = m & (np.arange(T)[None, :] < (np.arange(T) // chunk + 1)[:, None] * chunk)[None, None]
    s = np.where(m, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", a, v).reshape(B, T, D)
    return lin("linear_out", o)


def _rel_attention_case(chunk: int, T: int = 7):
    B, D, H = 2, 16, 2
    mod = RelPositionMultiHeadedAttention(H, D, chunk_size=chunk)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
    pos = rel_pos_table(T, D)
    params = mod.init(jax.random.PRNGKey(1), x, pos)["params"]
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    params = dict(params, pos_bias_u=jax.random.normal(keys[0], (H, D // H)),
                  pos_bias_v=jax.random.normal(keys[1], (H, D // H)))
    return mod, params, x, pos, np.arange(T)[None, :] < np.array([[T], [4]])


def test_rel_position_attention_matches_reference():
    mod, params, x, pos, key_mask = _rel_attention_case(0)
    spec = AttnSpec(jnp.asarray(key_mask)[:, None, None, :])
    got = jax.jit(mod.apply)({"params": params}, x, pos, spec)
    want = _rel_attention_reference(params, np.asarray(x), key_mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [7, 23])
def test_rel_position_attention_chunked_matches_reference(T):
    """Streaming: the position term goes to `attention` as a RelPos and is computed per tile."""
    chunk = 3
    mod, params, x, pos, key_mask = _rel_attention_case(chunk, T)
    spec = AttnSpec(kv_lengths=jnp.asarray(key_mask.sum(-1), jnp.int32))
    got = np.asarray(jax.jit(mod.apply)({"params": params}, x, pos, spec))
    want = _rel_attention_reference(params, np.asarray(x), key_mask, chunk)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1, :4], want[1, :4], rtol=1e-5, atol=1e-5)  # rows past length 4: padding


def test_rel_position_attention_cache_needs_the_chunk_mask():
    mod, params, x, pos, _ = _rel_attention_case(0)
    S = x.shape[1]
    cache = (jnp.zeros((2, S, 2, 8)), jnp.zeros((2, S, 2, 8)))
    with pytest.raises(ValueError, match="needs the streaming chunk mask"):
        mod.apply({"params": params}, x, pos, AttnSpec(q_offset=jnp.int32(0)), cache)


# ---- golden parity --------------------------------------------------------------------------

@needs_golden
def test_encoder_golden_and_bucket_padding_invariance(model):
    """mu equals upstream on the finalize=False (context) path, also when padded into a larger bucket
    with garbage past the valid length (the parity checker covers the other paths)."""
    cfg, params = model
    z = np.load(os.path.join(FLOW, "encoder.npz"))
    tok, n = z["token_concat"], z["token_len"]
    N = tok.shape[1]
    padded = np.full((1, N + 17), 77, np.int32)
    padded[:, :N] = tok
    encode = jax.jit(lambda p, t, n, ne: FlowCV2(cfg).apply({"params": p}, t, n, ne, True, method=FlowCV2.encode))
    want = z["stream_context__mu"]
    for t in (tok, padded):
        e, mu, mu_len = encode(params, t, n, n - cfg.pre_lookahead_len)
        chex.assert_shape(mu, (1, 2 * t.shape[1], cfg.output_size))
        chex.assert_type(mu, jnp.float32)
        assert int(mu_len[0]) == want.shape[1]
        assert rel_l2(np.asarray(mu)[:, :want.shape[1]], want) < 1e-4
        assert rel_l2(e[:, :N], z["token_embedding"]) < 1e-6
        np.testing.assert_array_equal(np.asarray(e)[:, N:], 0.0)


@needs_golden
def test_estimator_golden(model):
    cfg, params = model
    z = np.load(os.path.join(FLOW, "estimator.npz"))
    x, mu, cond = (jnp.asarray(_t(z[k])) for k in ("x", "mu", "cond"))
    mask = np.asarray(z["mask_padded"][:, 0] > 0)
    assert not mask.all()
    estimate = jax.jit(lambda p, *a: FlowCV2(cfg).apply({"params": p}, *a, True, method=FlowCV2.estimate))
    got = estimate(params, x, jnp.asarray(mask), mu, jnp.asarray(z["t"]), jnp.asarray(z["spks"]), cond)
    chex.assert_shape(got, x.shape)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)
    # key-padded row: its valid frames do not see the padded ones (row 1 is the unpadded CFG row)
    got_full = estimate(params, x, jnp.asarray(z["mask"][:, 0] > 0), mu, jnp.asarray(z["t"]),
                        jnp.asarray(z["spks"]), cond)
    assert rel_l2(got_full, _t(z["out_stream"])) < 1e-4
    np.testing.assert_allclose(np.asarray(got)[1], np.asarray(got_full)[1], atol=1e-6)


@needs_golden
def test_inference_golden_seed0_noise_shapes(model, golden):
    """Default (regenerated seed-0) noise, chunked streaming without finalize; shapes and dtypes."""
    cfg, params = model
    mel, mel_len = flow_inference(params, cfg, *_inputs(golden), streaming=True, finalize=False)
    want = _t(golden["stream_chunk__mel"])
    chex.assert_shape(mel, want.shape)
    chex.assert_type(mel, jnp.float32)
    chex.assert_type(mel_len, jnp.int32)
    assert int(mel_len[0]) == 2 * (int(golden["token_len"][0]) - cfg.pre_lookahead_len)
    assert rel_l2(mel, want) < 1e-4
    padded, n = flow_inference(params, cfg, *_inputs(golden), streaming=True, finalize=False, trim=False)
    assert padded.shape[1] >= want.shape[1]
    np.testing.assert_array_equal(np.asarray(padded)[:, int(n[0]):], 0.0)
    # finalize=True on the same bucket reuses the compilation; compare with upstream's stream_final
    mel, _ = flow_inference(params, cfg, *_inputs(golden), streaming=True, finalize=True)
    assert rel_l2(mel, _t(golden["stream_final__mel"])) < 1e-4


@needs_golden
def test_bfloat16_close_to_float32(model, golden):
    cfg, params = model
    bf16, _ = flow_inference(params, cfg, *_inputs(golden), streaming=False, finalize=True, dtype="bfloat16")
    assert bf16.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(bf16)))
    assert rel_l2(bf16, _t(golden["nonstream__mel"])) < 5e-2
    # pre-cast kernels give the same result (they are cast to bf16 inside anyway)
    cast = cast_matmul_weights(params, "bfloat16")
    assert cast["estimator"]["up_resnet"]["res_conv"]["kernel"].dtype == jnp.bfloat16
    assert cast["estimator"]["final_proj"]["kernel"].dtype == jnp.float32
    assert cast["encoder_proj"]["kernel"].dtype == jnp.float32
    tok = np.concatenate([golden["prompt_token"], golden["token"]], axis=1)
    n = np.array([tok.shape[1]], np.int32)
    encode = jax.jit(lambda p: FlowCV2(cfg, jnp.bfloat16).apply({"params": p}, tok, n, n, False,
                                                                 method=FlowCV2.encode)[1])
    np.testing.assert_array_equal(np.asarray(encode(cast)), np.asarray(encode(params)))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_new=st.integers(4, 30), n_prompt=st.integers(0, 12), streaming=st.booleans(), finalize=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_lengths_give_finite_outputs(model, n_new, n_prompt, streaming, finalize, seed):
    cfg, params = model
    rng = np.random.default_rng(seed)
    token = rng.integers(0, cfg.vocab_size, (1, 30)).astype(np.int32)
    ptoken = rng.integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
    pfeat = rng.normal(-5, 2, (1, 24, 80)).astype(np.float32)
    emb = rng.normal(size=(1, 192)).astype(np.float32)
    mel, mel_len = flow_inference(params, cfg, token, [n_new], ptoken, [n_prompt], pfeat, [2 * n_prompt], emb,
                                  streaming=streaming, finalize=finalize, trim=False)
    want_len = 2 * (n_new - (0 if finalize else cfg.pre_lookahead_len))
    assert int(mel_len[0]) == want_len
    m = np.asarray(mel)
    assert np.all(np.isfinite(m))
    assert np.all(m[:, want_len:] == 0) and np.any(m[:, :want_len] != 0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 40), min_size=2, max_size=2), streaming=st.booleans(),
       t=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_estimator_masks_give_finite_zero_padded_outputs(model, lengths, streaming, t, seed):
    """Any key-padding mask (even an empty row) gives finite outputs that are zero on padded frames
    and independent of what the padded frames hold."""
    cfg, params = model
    rng = np.random.default_rng(seed)
    T = 40
    x, mu, cond = (jnp.asarray(rng.normal(size=(2, T, 80)).astype(np.float32)) for _ in range(3))
    spks = jnp.asarray(rng.normal(size=(2, 80)).astype(np.float32))
    mask = np.arange(T)[None, :] < np.array(lengths)[:, None]
    got = _estimate(params, cfg, x, jnp.asarray(mask), mu, jnp.full((2,), t), spks, cond, streaming)
    g = np.asarray(got)
    assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)
    junk = jnp.where(jnp.asarray(mask)[..., None], x, 1e4)
    again = np.asarray(_estimate(params, cfg, junk, jnp.asarray(mask), mu, jnp.full((2,), t), spks, cond, streaming))
    np.testing.assert_allclose(again, g, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("cfg", "streaming"))
def _estimate(params, cfg, x, mask, mu, t, spks, cond, streaming):
    return FlowCV2(cfg).apply({"params": params}, x, mask, mu, t, spks, cond, streaming, method=FlowCV2.estimate)


@needs_golden
def test_bad_inputs_raise_clear_errors(model, golden):
    cfg, params = model
    inp = list(_inputs(golden))
    names = ("token", "token_len", "prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")

    def call(**kw):
        args = [kw.pop(k, inp[i]) for i, k in enumerate(names)]
        return flow_inference(params, cfg, *args, streaming=False, finalize=kw.pop("finalize", True), **kw)

    bad = golden["token"].copy()
    bad[0, 5] = cfg.vocab_size
    with pytest.raises(FlowInputError, match=r"token\[0, 5\] = 6561 is outside the speech-token vocabulary"):
        call(token=bad)
    bad = golden["prompt_token"].copy()
    bad[0, 0] = -1
    with pytest.raises(FlowInputError, match="prompt_token.*outside"):
        call(prompt_token=bad)
    with pytest.raises(FlowInputError, match="empty token sequence"):
        call(token_len=np.array([0], np.int32))
    with pytest.raises(FlowInputError, match="must be 2 x prompt_token_len"):
        call(prompt_feat_len=np.array([23], np.int32))
    with pytest.raises(FlowInputError, match="finalize=False needs more than"):
        call(token=golden["token"][:, :3], token_len=np.array([3], np.int32), finalize=False)
    with pytest.raises(FlowInputError, match="batch size"):
        call(embedding=np.zeros((2, 192), np.float32))
    with pytest.raises(FlowInputError, match=r"embedding must be \[B, 192\]"):
        call(embedding=np.zeros((1, 80), np.float32))
    with pytest.raises(FlowInputError, match="time-major"):
        call(prompt_feat=_t(golden["prompt_feat"]))
    with pytest.raises(FlowInputError, match="must be integer"):
        call(token=golden["token"].astype(np.float32))
    with pytest.raises(FlowInputError, match="noise has 100 frames"):
        call(noise=np.zeros((1, 100, 80), np.float32))
    with pytest.raises(FlowInputError, match="noise buffer"):
        call(token=np.zeros((1, 7600), np.int32), token_len=np.array([7600], np.int32))


def test_module_interface_matches_cv3():
    """The pipeline picks the flow module by version and uses the same names on both."""
    import cosyjax.flow.cv2.model as cv2
    import cosyjax.flow.cv3.model as cv3
    from cosyjax.flow.inputs import seed0_noise_np
    from cosyjax.flow.noise import cfm_noise

    for name in ("flow_inference", "flow_core", "pack_inputs", "bucket_for", "init_params", "cast_matmul_weights",
                 "DEFAULT_BUCKETS", "FlowInputError"):
        assert hasattr(cv2, name) and hasattr(cv3, name), name
    assert cv2.DEFAULT_BUCKETS == cv3.DEFAULT_BUCKETS
    np.testing.assert_array_equal(seed0_noise_np(37, 80), np.swapaxes(cfm_noise(37), 1, 2))
    assert cv2.bucket_for(65) == 128
    with pytest.raises(FlowInputError, match="largest bucket"):
        cv2.bucket_for(10 ** 6)
