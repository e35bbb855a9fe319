"""Audio in: soundfile read, mono mix, torchaudio-compatible resampling, and every prompt rejection."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyjax.frontend import (
    Audio,
    AudioReadError,
    AudioTooLongError,
    AudioTooShortError,
    EmptyAudioError,
    SampleRateError,
    SilentAudioError,
    load_audio,
    load_wav,
    resample,
)
from cosyjax.frontend import resampling as resample_mod
from cosyjax.frontend.resampling import resampled_length, sinc_resample_kernel
from cosyjax.parity.core import rel_l2
from tests.conftest import GOLDEN
from tests.test_frontend_support import speech_like, write_wav

FRONT = os.path.join(GOLDEN, "frontend")


@pytest.fixture(scope="module")
def features():
    with np.load(os.path.join(FRONT, "features.npz")) as z:
        return {k: z[k] for k in z.files}


def test_kernel_layout_matches_torchaudio_formula():
    kernel, width = sinc_resample_kernel(22050, 16000)  # gcd 50 -> 441 -> 320
    assert width == math.ceil(6 * 441 / (320 * 0.99)) == 9
    assert kernel.shape == (320, 441 + 2 * width) and kernel.dtype == np.float32
    # phase 0 is a centred windowed sinc: peak base/orig at tap `width`
    assert kernel[0, width] == np.float32(320 * 0.99 / 441)
    assert np.argmax(kernel[0]) == width
    k2, w2 = sinc_resample_kernel(24000, 16000)  # 3 -> 2
    assert k2.shape == (2, 3 + 2 * w2) and w2 == math.ceil(6 * 3 / (2 * 0.99))


def test_resample_matches_torchaudio_on_upstream_assets(features):
    for tag in ("zero_shot_prompt", "cross_lingual_prompt"):
        audio = load_audio(os.path.join(FRONT, f"{tag}.wav"))
        got = audio.at(16000)
        want = features[f"{tag}__speech_16k"]
        assert got.shape == want.shape and got.dtype == np.float32
        assert rel_l2(got, want) < 1e-6 and np.max(np.abs(got - want)) <= 2.5e-7
    got24 = load_wav(os.path.join(FRONT, "cross_lingual_prompt.wav"), 24000)
    want24 = features["cross_lingual_prompt__speech_24k"]
    assert got24.shape == want24.shape == (1, 329992) and rel_l2(got24, want24) < 1e-6
    # native rate: no resampling, raw samples
    raw = load_wav(os.path.join(FRONT, "zero_shot_prompt.wav"), 24000)
    assert raw.shape == (1, 83520)


def test_resample_shapes_batches_and_identity():
    x = np.random.RandomState(0).randn(2, 3, 1001).astype(np.float32)
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 3, resampled_length(1001, 44100, 16000)) == (2, 3, math.ceil(1001 * 160 / 441))
    assert np.allclose(y[1, 2], resample(x[1, 2], 44100, 16000), atol=0)
    assert resample(x, 16000, 16000) is x or np.array_equal(resample(x, 16000, 16000), x)
    with pytest.raises(TypeError, match="floating-point"):
        resample(np.zeros(10, np.int16), 22050, 16000)
    with pytest.raises(ValueError, match="positive integers"):
        resample(x, 0, 16000)


def test_sparse_phase_path_equals_dense(monkeypatch):
    x = np.random.RandomState(1).randn(3000).astype(np.float32)
    dense = resample(x, 22050, 16000)
    monkeypatch.setattr(resample_mod, "_DENSE_LIMIT", 0)
    assert np.array_equal(resample_mod.resample(x, 22050, 16000), dense)


@settings(max_examples=25, deadline=None)
@given(st.integers(8000, 48000), st.integers(8000, 48000), st.integers(1, 400))
def test_resampled_length_is_ceil(orig, new, n):
    if (orig // math.gcd(orig, new)) * (new // math.gcd(orig, new)) > 4_000_000:
        return
    y = resample(np.ones(n, np.float32), orig, new)
    assert y.shape == (resampled_length(n, orig, new),)
    assert y.shape[0] == (n if orig == new else math.ceil(n * new / orig))


def test_resampled_sine_keeps_amplitude():
    t = np.arange(22050) / 22050
    y = resample(np.sin(2 * np.pi * 440 * t).astype(np.float32), 22050, 16000)
    ref = np.sin(2 * np.pi * 440 * np.arange(y.shape[0]) / 16000)
    assert np.max(np.abs(y[200:-200] - ref[200:-200])) < 2e-3


def test_stereo_is_mixed_to_mono(tmp_path):
    st_ = speech_like(0.5, 22050, channels=2)
    path = write_wav(str(tmp_path / "st.wav"), st_, 22050, subtype="FLOAT")
    a = load_audio(path)
    assert a.samples.shape == (1, st_.shape[0]) and a.sample_rate == 22050
    assert np.allclose(a.samples[0], st_.mean(axis=1), atol=1e-7)
    arr = Audio.from_source((st_.T, 22050))  # in-memory [channels, N]
    assert np.array_equal(arr.samples, a.samples)


def test_pcm16_is_scaled_like_torchaudio_soundfile(tmp_path):
    x = (np.arange(-8, 8) * 2048).astype(np.int16)
    path = str(tmp_path / "p.wav")
    import soundfile as sf

    sf.write(path, np.tile(x, 200), 16000, subtype="PCM_16")
    a = load_audio(path)
    assert np.array_equal(a.samples[0, :16], x.astype(np.float32) / 32768)


# ------------------------------------------------------------------------------------------ rejections
def test_reject_unreadable_and_missing(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....not really a wav file")
    with pytest.raises(AudioReadError, match=r"cannot read audio .*bad\.wav"):
        load_audio(str(bad))
    with pytest.raises(AudioReadError, match=r"audio file not found: .*missing\.wav"):
        load_audio(str(tmp_path / "missing.wav"))
    with pytest.raises(AudioReadError, match="must be floating point"):
        load_audio((np.zeros(16000, np.int16), 16000))
    with pytest.raises(AudioReadError, match="contains NaN"):
        load_audio((np.full(16000, np.nan, np.float32), 16000))


def test_reject_empty(tmp_path):
    path = write_wav(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(EmptyAudioError, match=r"prompt audio .*empty\.wav is empty \(0 samples\)"):
        load_audio(path)


def test_reject_silent(tmp_path):
    path = write_wav(str(tmp_path / "silent.wav"), np.zeros(16000, np.float32), 16000)
    with pytest.raises(SilentAudioError, match=r"is silent \(peak amplitude 0 < 0.0001\)"):
        load_audio(path)


def test_reject_low_sample_rate(tmp_path):
    path = write_wav(str(tmp_path / "nb.wav"), speech_like(1.0, 8000), 8000)
    with pytest.raises(SampleRateError, match="sample rate 8000 Hz is too low; at least 16000 Hz"):
        load_audio(path)
    # upstream load_wav's own assert (no validation)
    with pytest.raises(SampleRateError, match="below 16000 Hz"):
        load_wav(path, 16000)


def test_reject_over_long(tmp_path):
    path = write_wav(str(tmp_path / "long.wav"), speech_like(30.5, 16000), 16000)
    with pytest.raises(AudioTooLongError, match=r"30\.50 s long; the speech tokenizer accepts at most 30 s"):
        load_audio(path)
    ok = load_audio((speech_like(30.0, 16000), 16000))  # exactly 30 s is accepted
    assert ok.duration == 30.0
    with pytest.raises(AudioTooLongError, match="source audio"):
        load_audio((speech_like(31.0, 22050), 22050), what="source")


def test_reject_too_short():
    with pytest.raises(AudioTooShortError, match="50 ms long; at least 100 ms"):
        load_audio((speech_like(0.05, 16000), 16000))


def test_validation_can_be_skipped():
    a = load_audio((np.zeros(10, np.float32), 16000), validate=False)
    assert a.num_samples == 10
