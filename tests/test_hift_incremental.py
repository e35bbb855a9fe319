"""Incremental CosyVoice3 vocoder (`cosyjax.hift.incremental`) against the recompute path.

The recompute path is upstream `CosyVoice3Model.token2wav(stream=True)`: keep the whole mel, re-run
`hift.inference(all_mel, finalize)` every chunk, yield the samples past those already yielded
(here `vocode` on the accumulated mel). Tiny CV3 HiFT from the golden model dir; fixed noise =
`e2e/cv3_hift_fixed_noise.npz` `sine_waves_q / 256` (tiled to 60 s); mel ~ N(-5, 2^2); pushes follow
the streaming schedule (`streaming.plan_schedule`, prompt length 0): a non-final chunk delivers the
mel of its hop tokens (the flow drops the 3 look-ahead tokens' frames), the final chunk the rest.
The 30 s run is the first half of the 60 s mel, so its non-final recompute calls are shared.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

from convert.registry import convert_component
from cosyjax.config import ModelConfig
from cosyjax.hift.config import HiFTConfig
from cosyjax.hift.incremental import (IncrementalInputError, IncrementalVocoderCV3, cv2_vocoder_frames,
                                      earliest_inputs, f0_left_context, left_context_frames)
from cosyjax.hift.vocoder import device_params, hift_inference, vocode
from cosyjax.parity.core import rel_l2
from cosyjax.streaming import plan_schedule
from tests.conftest import GOLDEN, model_dir

NOISE = os.path.join(GOLDEN, "cosyvoice3", "e2e", "cv3_hift_fixed_noise.npz")
pytestmark = pytest.mark.skipif(not os.path.exists(NOISE), reason="golden CV3 e2e fixtures absent")

MEL_RATIO = 2
LOOKAHEAD = 3
MAX_FRAMES = 3000  # 60 s
TEST_BUCKETS = (64, 256)  # two window programs for every push here (compilation dominates on CPU)


@pytest.fixture(scope="module")
def setup():
    mc = ModelConfig.from_dir(model_dir("cosyvoice3"))
    cfg = HiFTConfig.from_model_config(mc)
    params = device_params(convert_component("hift", mc), cfg)
    with np.load(NOISE) as z:
        q = z["sine_waves_q"].astype(np.float32) / 256
    reps = -(-MAX_FRAMES * cfg.upsample_scale // q.shape[1])
    noise = np.tile(q, (1, reps, 1))[:, :MAX_FRAMES * cfg.upsample_scale]
    mel = (np.random.RandomState(0).randn(1, MAX_FRAMES, 80) * 2 - 5).astype(np.float32)

    @functools.lru_cache(maxsize=None)
    def recompute(t: int, finalize: bool):  # one bucket: one program for every call
        return np.asarray(vocode(params, cfg, mel[:, :t], finalize=finalize, noise=noise, buckets=(3072,))[0])

    return cfg, params, noise, mel, recompute


def _pushes(n_tokens: int):
    """(mel frame range, finalize) per streaming chunk."""
    out = []
    for c in plan_schedule(n_tokens, 0):
        stop = c.n_tokens if c.finalize else c.n_tokens - LOOKAHEAD
        out.append((MEL_RATIO * c.token_offset, MEL_RATIO * stop, c.finalize))
    return out


@pytest.fixture(scope="module")
def runs(setup):
    cfg, params, noise, mel, recompute = setup
    out = {}
    for seconds in (30, 60):
        inc = IncrementalVocoderCV3(params, cfg, noise=noise, buckets=TEST_BUCKETS)
        rows, emitted = [], 0
        for lo, hi, fin in _pushes(seconds * 25):
            audio, frames = inc.push(mel[:, lo:hi], fin)
            ref = recompute(hi, fin)[:, emitted:]
            emitted += ref.shape[1]
            rows.append(dict(audio=audio, ref=ref, frames=frames, recompute_frames=hi, finalize=fin))
        out[seconds] = rows
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [30, 60])
def test_every_push_equals_the_recompute_chunk(runs, seconds):
    rows = runs[seconds]
    assert rows[-1]["finalize"] and not any(r["finalize"] for r in rows[:-1])
    errs = []
    for i, r in enumerate(rows):
        assert r["audio"].shape == r["ref"].shape, f"push {i}"
        assert r["audio"].dtype == np.float32
        errs.append(rel_l2(r["audio"], r["ref"]))
    print(f"{seconds} s: {len(rows)} pushes, max rel-L2 {max(errs):.2e}")
    assert max(errs) <= 1e-5, errs
    total = sum(r["audio"].shape[1] for r in rows)
    assert total == seconds * 25 * MEL_RATIO * 480  # the whole utterance, each sample once


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [30, 60])
def test_work_is_linear_in_the_emitted_frames(setup, runs, seconds):
    cfg = setup[0]
    rows = runs[seconds][:-1]  # non-final pushes
    emitted = sum(r["audio"].shape[1] for r in rows) // 480
    inc = sum(r["frames"] for r in rows)
    rec = sum(r["recompute_frames"] for r in rows)
    print(f"{seconds} s non-final pushes: emitted {emitted} frames, incremental {inc} ({inc / emitted:.3f}x), "
          f"recompute {rec} ({rec / emitted:.2f}x)")
    assert inc <= 1.25 * emitted
    assert rec > 0.1 * seconds * emitted  # the recompute path re-vocodes the growing prefix (quadratic)
    # each push's window is the new frames + constants, independent of how long the stream already is
    later = [r["frames"] for r in rows[2:]]
    assert max(later) == min(later) == 200 + cfg.finalize_false_trim + left_context_frames(cfg)


def test_receptive_field_map_matches_measured_dependencies(setup):
    """With f0 held fixed (the phase sum is the one unbounded dependency, carried separately), the last
    output sample that depends on one mel frame / one noise sample is the last one whose computed
    earliest input (`earliest_inputs`) is at or before that input (within a frame)."""
    cfg, params, noise, mel, _ = setup
    t, p, q = 120, 40, 40 * 480 + 123
    u = cfg.upsample_scale
    x, nz = mel[:, :t], noise[:, :t * u]
    base, _, extra = hift_inference(params, cfg, x, noise=nz, return_intermediates=True)
    f0 = np.asarray(extra["f0"])
    base = np.asarray(base)[0]
    # Dependence is measured with forward-mode derivatives: a tangent on one input is exactly nonzero
    # wherever the output depends on it, however small (~1e-26 at the receptive field's edge here), while a
    # finite bump of the input rounds away there (float32) -- by a CPU-dependent margin (600 samples on an
    # AMD EPYC). The finite bump still checks the other direction: nothing past the prediction changes.
    one_mel = np.zeros_like(x)
    one_mel[:, p] = 1.0
    one_noise = np.zeros_like(nz)
    one_noise[:, q] = 1.0
    _, d_mel = jax.jvp(lambda m: hift_inference(params, cfg, m, noise=nz, f0=f0)[0], (x,), (one_mel,))
    _, d_noise = jax.jvp(lambda n: hift_inference(params, cfg, x, noise=n, f0=f0)[0], (nz,), (one_noise,))
    bumped = x.copy()
    bumped[:, p] += 3.0
    by_mel = np.asarray(hift_inference(params, cfg, bumped, noise=nz, f0=f0)[0])[0]
    nz2 = nz.copy()
    nz2[:, q] += 10.0
    by_noise = np.asarray(hift_inference(params, cfg, x, noise=nz2, f0=f0)[0])[0]
    first = np.array([earliest_inputs(cfg, n) for n in range(0, t * u, 4)])  # every 4th sample
    for tangent, changed, col, where in ((d_mel, by_mel != base, 0, p), (d_noise, by_noise != base, 1, q)):
        last = int(np.nonzero(np.asarray(tangent)[0])[0].max())
        predicted = 4 * int(np.nonzero(first[:, col] <= where)[0].max())
        print(f"path {col}: last dependent sample {last}, predicted {predicted}")
        assert predicted - u <= last <= predicted + 3, (col, last, predicted)
        assert int(np.nonzero(changed)[0].max()) <= predicted + 3, col
    # the window context covers both paths for every sample offset within a frame
    c = left_context_frames(cfg)
    assert all(min(m, s // u) >= n // u - c for n, (m, s) in zip(range(0, t * u, 4), first))
    assert f0_left_context(cfg) == 8


def test_default_noise_matches_vocode_and_state_is_bounded(setup):
    cfg, params, _, mel, _ = setup
    inc = IncrementalVocoderCV3(params, cfg, buckets=TEST_BUCKETS)  # noise from key None (CV3 default seed)
    got, emitted = [], 0
    for lo, hi, fin in [(0, 60, False), (60, 180, False), (180, 190, True)]:
        audio, _ = inc.push(mel[:, lo:hi], fin)
        ref = np.asarray(vocode(params, cfg, mel[:, :hi], finalize=fin, buckets=(256,))[0])[:, emitted:]
        emitted += ref.shape[1]
        assert rel_l2(audio, ref) <= 1e-5
        got.append(audio)
        if not fin:  # bounded mel state: context + f0 context + the 8 frames not yet vocoded
            assert inc._mel.shape[1] <= left_context_frames(cfg) + f0_left_context(cfg) + 8
    with pytest.raises(IncrementalInputError, match="after the final push"):
        inc.push(mel[:, :10], False)


def test_bad_pushes_are_named(setup):
    cfg, params, noise, mel, _ = setup
    inc = IncrementalVocoderCV3(params, cfg, noise=noise)
    with pytest.raises(IncrementalInputError, match=r"\[1, F, 80\].*transpose"):
        inc.push(np.zeros((1, 80, 20), np.float32), False)
    with pytest.raises(IncrementalInputError, match=r"\[1, F, 80\]"):
        inc.push(np.zeros((1, 20, 81), np.float32), False)
    with pytest.raises(IncrementalInputError, match=r"\[1, F, 80\]"):
        inc.push(np.zeros((2, 20, 80), np.float32), False)
    with pytest.raises(IncrementalInputError, match="floating point"):
        inc.push(np.zeros((1, 20, 80), np.int32), False)
    with pytest.raises(IncrementalInputError, match="NaN"):
        inc.push(np.full((1, 20, 80), np.nan, np.float32), False)
    with pytest.raises(IncrementalInputError, match="more than 8 mel frames"):
        inc.push(mel[:, :8], False)
    assert inc.total_frames == 0 and not inc.finalized  # rejected pushes leave the state alone
    empty = IncrementalVocoderCV3(params, cfg, noise=noise)
    audio, frames = empty.push(mel[:, :0], True)  # an empty utterance, as the recompute path: no audio
    assert audio.shape == (1, 0) and frames == 0 and empty.finalized
    short = IncrementalVocoderCV3(params, cfg, noise=noise[:, :480 * 20])
    with pytest.raises(IncrementalInputError, match="noise buffer has 9600 samples"):
        short.push(mel[:, :40], True)
    with pytest.raises(IncrementalInputError, match=r"fixed buffer \[1, L, 9\]"):
        IncrementalVocoderCV3(params, cfg, noise=np.zeros((1, 100, 8), np.float32))
    with pytest.raises(IncrementalInputError, match="either noise or key"):
        IncrementalVocoderCV3(params, cfg, noise=noise, key=jax.random.key(0))
    cv2 = HiFTConfig.from_model_config(ModelConfig.from_dir(model_dir("cosyvoice2")))
    with pytest.raises(IncrementalInputError, match="CV2Token2Wav"):
        IncrementalVocoderCV3(params, cv2)


def test_cv2_vocoder_frames_formula():
    assert cv2_vocoder_frames(50, False) == 50 and cv2_vocoder_frames(200, True) == 208
