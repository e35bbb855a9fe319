"""CV3 flow model (cosyjax/flow/cv3): golden parity, shapes/dtypes, bf16, lengths, bad input.

Streaming chunks, bucketing and batching are checked for both flows in test_flow_shared.py."""
from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cosyjax.flow.cv3.model import FlowCV3, FlowInputError, cast_matmul_weights, flow_inference
from tests.conftest import GOLDEN
from tests.flow_helpers import channels_last as _t, flow_inputs as _inputs
from tests.flow_helpers import load_flow_model, load_flow_npz, rel_l2

FLOW = os.path.join(GOLDEN, "cosyvoice3", "flow")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(FLOW, "inference.npz")),
                                reason="golden flow fixtures absent")


@pytest.fixture(scope="module")
def model():
    return load_flow_model("cosyvoice3")


@pytest.fixture(scope="module")
def golden():
    return load_flow_npz("cosyvoice3")


def test_estimator_golden(model):
    cfg, params = model
    with np.load(os.path.join(FLOW, "estimator.npz")) as z:
        x, mu, cond = (jnp.asarray(_t(z[k])) for k in ("x", "mu", "cond"))
        for out_key, mask_key, streaming in (("out_stream", "mask", True),
                                             ("out_nonstream_padded", "mask_padded", False)):
            est = jax.jit(lambda *a, s=streaming: FlowCV3(cfg).apply({"params": params}, *a, s,
                                                                      method=FlowCV3.estimate))
            got = est(x, jnp.asarray(z[mask_key][:, 0] > 0), mu, jnp.asarray(z["t"]), jnp.asarray(z["spks"]), cond)
            assert rel_l2(got, _t(z[out_key])) < 1e-4, out_key


def test_inference_golden_seed0_noise_shapes(model, golden):
    """Default (regenerated seed-0) noise; chunked streaming without finalize; output shapes/dtypes."""
    cfg, params = model
    mel, mel_len = flow_inference(params, cfg, *_inputs(golden), streaming=True, finalize=False)
    want = _t(golden["stream_chunk__mel"])
    chex.assert_shape(mel, want.shape)
    chex.assert_type(mel, jnp.float32)
    chex.assert_type(mel_len, jnp.int32)
    assert int(mel_len[0]) == 2 * (int(golden["token_len"][0]) - cfg.pre_lookahead_len)
    assert rel_l2(mel, want) < 1e-4
    padded, n = flow_inference(params, cfg, *_inputs(golden), streaming=True, finalize=False, trim=False)
    assert padded.shape[1] >= want.shape[1] and padded.shape[1] % 2 == 0
    np.testing.assert_array_equal(np.asarray(padded)[:, int(n[0]):], 0.0)


def test_bfloat16_close_to_float32(model, golden):
    cfg, params = model
    f32, _ = flow_inference(params, cfg, *_inputs(golden), streaming=False, finalize=True)
    bf16, _ = flow_inference(params, cfg, *_inputs(golden), streaming=False, finalize=True, dtype="bfloat16")
    assert bf16.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(bf16)))
    assert rel_l2(bf16, f32) < 5e-2
    # storing the bf16-computed kernels in bf16 changes nothing but memory traffic
    cast = cast_matmul_weights(params, "bfloat16")
    assert cast["estimator"]["blocks"]["to_q"]["kernel"].dtype == jnp.bfloat16
    assert cast["estimator"]["proj_out"]["kernel"].dtype == jnp.float32
    same, _ = flow_inference(cast, cfg, *_inputs(golden), streaming=False, finalize=True, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(same), np.asarray(bf16))


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
                                  streaming=streaming, finalize=finalize, n_timesteps=3, trim=False)
    want_len = 2 * (n_new - (0 if finalize else cfg.pre_lookahead_len))
    assert int(mel_len[0]) == want_len
    m = np.asarray(mel)
    assert np.all(np.isfinite(m))
    assert np.all(m[:, want_len:] == 0) and np.any(m[:, :want_len] != 0)


def test_bad_inputs_raise_clear_errors(model, golden):
    cfg, params = model
    inp = list(_inputs(golden))

    def call(**kw):
        args = list(inp)
        for i, k in enumerate(("token", "token_len", "prompt_token", "prompt_token_len", "prompt_feat",
                               "prompt_feat_len", "embedding")):
            args[i] = kw.pop(k, args[i])
        return flow_inference(params, cfg, *args, streaming=False, finalize=kw.pop("finalize", True))

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
    with pytest.raises(FlowInputError, match="noise buffer"):
        call(token=np.zeros((1, 7600), np.int32), token_len=np.array([7600], np.int32))
