"""Exact incremental streaming through the engine: every chunk's audio equals the recompute path's.

`Engine.generate(stream=True, incremental=True)` keeps the flow's per-step K/V / conv state and (CV3) the
causal vocoder's state, so a chunk costs what it emits; `incremental=False` is upstream's algorithm (each
chunk re-solves and, for CV3, re-vocodes the whole prefix). Tiny golden models, fixed random tokens (the
LLM is not part of this), both versions, 30 s and 60 s of audio (750 / 1500 tokens at 25 Hz).
The `work` each chunk reports is summed over the non-final chunks: incremental <= 1.25 x the frames those
chunks emit; the recompute sums grow quadratically (asserted > 3x at 60 s).
"""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from tests.conftest import GOLDEN


# Audio tolerance. The flow stages agree to float32 rounding (mel rel-L2 ~1e-7, asserted <= 1e-5); the vocoders
# amplify that rounding through the harmonic phase sum (f0 error x 2*pi*480 accumulated over the utterance), as in
# the e2e parity rows (mel 1e-7..1e-6 -> CV3 audio 1e-5, CV2 audio 5.7e-4). Measured here (tiny models, 30/60 s):
# worst chunk at 30 s: CV3 5.1e-5, CV2 6.6e-5; at 60 s: CV3 1.4e-4, CV2 1.0e-4 (mel 8.5e-8 / 4.6e-7). Issue 9
# asked for 1e-5 on the audio: met on the mel, not on the audio, for that reason. The bound below is 2e-4.
AUDIO_TOL = {"cosyvoice3": 2e-4, "cosyvoice2": 2e-4}


def _engine(version):
    from cosyjax.config import ModelConfig
    from cosyjax.model_cache import load_or_convert_params
    from cosyjax.pipeline import Engine, PipelineConfig

    mdir = os.path.join(GOLDEN, version, "modeldir")
    if not os.path.isdir(mdir):
        pytest.skip(f"{mdir} absent")
    mc = ModelConfig.from_dir(mdir)
    params, _ = load_or_convert_params(mc, use_cache=False)
    return Engine(params, PipelineConfig.from_model_config(mc, sampling="greedy"))


def _input(version):
    with np.load(os.path.join(GOLDEN, version, "e2e", "inputs.npz")) as z:
        return {k: z[k] for k in z.files}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["cosyvoice3", "cosyvoice2"])
@pytest.mark.parametrize("seconds", [30, pytest.param(60, marks=pytest.mark.long)])
def test_incremental_equals_recompute(version, seconds):
    engine = _engine(version)
    mi = _input(version)
    n = seconds * 25
    tokens = np.random.default_rng(seconds).integers(0, 6561, n).astype(np.int32)
    key = jax.random.PRNGKey(7)  # CV2: the same vocoder noise per call index in both runs
    mels = {True: [], False: []}
    stage = engine.flow_stage

    def recording_stage(m, incremental):  # keep each chunk's mel to compare the flow alone too
        inner = stage(m, incremental)

        class Rec:
            def chunk(self, *a):
                mel, f = inner.chunk(*a)
                mels[incremental].append(mel)
                return mel, f

            def final(self, *a):
                mel, f = inner.final(*a)
                mels[incremental].append(mel)
                return mel, f
        return Rec()

    engine.flow_stage = recording_stage
    try:
        inc = list(engine.generate(mi, stream=True, tokens=[tokens], key=key, incremental=True))
        ref = list(engine.generate(mi, stream=True, tokens=[tokens], key=key, incremental=False))
    finally:
        del engine.flow_stage
    assert len(inc) == len(ref) >= 8
    mel_err = [_rel(a, b) for a, b in zip(mels[True], mels[False])]
    audio_err = []
    for i, (a, b) in enumerate(zip(inc, ref)):
        assert a["tts_speech"].shape == b["tts_speech"].shape, i
        audio_err.append(_rel(a["tts_speech"], b["tts_speech"]))
    print(f"{version} {seconds} s: mel rel-L2 per chunk max {max(mel_err):.2e}; audio max {max(audio_err):.2e}: "
          + " ".join(f"{e:.1e}" for e in audio_err))
    assert max(mel_err) <= 1e-5, mel_err
    assert max(audio_err) <= AUDIO_TOL[version], audio_err
    emitted = sum(o["tts_speech"].shape[1] for o in inc[:-1]) // 480  # mel frames the non-final chunks emit
    if version == "cosyvoice2":
        emitted += 8  # CV2 holds back its 8-frame cache until the next chunk
    flow_inc = sum(o["work"]["flow_frames"] for o in inc[:-1])
    flow_ref = sum(o["work"]["flow_frames"] for o in ref[:-1])
    voc_inc = sum(o["work"]["vocoder_frames"] for o in inc[:-1])
    voc_ref = sum(o["work"]["vocoder_frames"] for o in ref[:-1])
    msg = (f"{version} {seconds} s: non-final chunks emit {emitted} frames; flow frames incremental {flow_inc} / "
           f"recompute {flow_ref}; vocoder frames incremental {voc_inc} / recompute {voc_ref}")
    print(msg)
    assert flow_inc <= 1.25 * emitted, msg
    assert voc_inc <= 1.25 * emitted, msg
    if seconds == 60:
        assert flow_ref > 3 * emitted, msg
        if version == "cosyvoice3":
            assert voc_ref > 3 * emitted, msg
