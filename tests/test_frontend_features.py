"""Prompt features vs upstream (torch/librosa/whisper) fixtures, shapes, config from the yaml, parity runner."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cosyjax.config import ModelConfig
from cosyjax.frontend import AudioTooShortError, MelConfig, kaldi_fbank, load_audio, prompt_mel, speaker_fbank
from cosyjax.frontend import whisper_log_mel
from cosyjax.frontend.features import kaldi_mel_banks, slaney_mel_filters
from cosyjax.parity.core import FixtureContext, rel_l2
from tests.conftest import GOLDEN
from tests.test_frontend_support import speech_like

FRONT = os.path.join(GOLDEN, "frontend")


@pytest.fixture(scope="module")
def fx():
    with np.load(os.path.join(FRONT, "features.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def zero_shot():
    return load_audio(os.path.join(FRONT, "zero_shot_prompt.wav"))


def test_mel_bases_equal_librosa_and_whisper(fx):
    assert np.array_equal(slaney_mel_filters(24000, 1920, 80, 0, 8000), fx["mel_basis_cosyvoice2"])
    np.testing.assert_allclose(slaney_mel_filters(24000, 1920, 80, 0, None), fx["mel_basis_cosyvoice3"],
                               rtol=0, atol=1e-16)  # one Nyquist entry: 0 vs 7e-18 (libm ulp)
    assert np.array_equal(slaney_mel_filters(16000, 400, 128), fx["whisper_mel_filters_128"])


def test_mel_config_from_yaml():
    cv2 = MelConfig.from_model_config(ModelConfig.from_dir(os.path.join(GOLDEN, "cosyvoice2", "modeldir")))
    cv3 = MelConfig.from_model_config(ModelConfig.from_dir(os.path.join(GOLDEN, "cosyvoice3", "modeldir")))
    assert (cv2.n_fft, cv2.hop_size, cv2.win_size, cv2.num_mels, cv2.fmin, cv2.fmax, cv2.center) == \
        (1920, 480, 1920, 80, 0, 8000, False)
    assert cv3.fmax is None and cv3.sampling_rate == 24000
    with pytest.raises(ValueError, match="unsupported arguments"):
        MelConfig.from_yaml_node({"n_fft": 1024, "power": 2})


@pytest.mark.parametrize("version,fmax", [("cosyvoice2", 8000), ("cosyvoice3", None)])
def test_prompt_mel_matches_matcha(fx, zero_shot, version, fmax):
    got = prompt_mel(zero_shot.at(24000), MelConfig(fmax=fmax))
    want = fx[f"zero_shot_prompt__prompt_mel_{version}"]
    assert got.shape == want.shape == (1, 83520 // 480, 80) and got.dtype == np.float32
    assert rel_l2(got, want) < 1e-5


def test_fbank_and_whisper_match_torchaudio_and_whisper(fx, zero_shot):
    s16 = zero_shot.at(16000)
    n = s16.shape[1]
    raw = kaldi_fbank(s16)
    assert raw.shape == (1 + (n - 400) // 160, 80) == fx["zero_shot_prompt__fbank_raw"].shape
    assert rel_l2(raw, fx["zero_shot_prompt__fbank_raw"]) < 1e-5
    cmn = speaker_fbank(s16)
    assert rel_l2(cmn, fx["zero_shot_prompt__fbank_cmn"]) < 1e-5
    np.testing.assert_allclose(cmn.mean(0), 0, atol=1e-5)
    mel = whisper_log_mel(s16, n_mels=128)
    assert mel.shape == (1, 128, n // 160) and rel_l2(mel, fx["zero_shot_prompt__whisper_logmel128"]) < 1e-5
    assert (mel.max() - mel.min()) * 4 <= 8 + 1e-5  # floor at max - 8 (in log10 units)


def test_kaldi_mel_banks_layout():
    banks = kaldi_mel_banks()
    assert banks.shape == (80, 257) and np.all(banks[:, -1] == 0) and np.all(banks >= 0)
    assert banks[:, 0].sum() == 0  # 0 Hz is below low_freq 20 Hz


def test_features_reject_too_short_audio():
    with pytest.raises(AudioTooShortError, match="kaldi fbank needs at least 400 samples"):
        kaldi_fbank(np.ones(399, np.float32))
    with pytest.raises(AudioTooShortError, match="prompt mel needs more than 720 samples"):
        prompt_mel(np.ones(700, np.float32))
    with pytest.raises(AudioTooShortError, match="whisper log-mel needs more than 200 samples"):
        whisper_log_mel(np.ones(150, np.float32))
    with pytest.raises(ValueError, match=r"mono waveform \[N\] or \[1, N\]"):
        kaldi_fbank(np.ones((2, 1000), np.float32))


def test_frame_counts_for_odd_lengths():
    x = speech_like(0.2, 24000)[:4801]
    assert prompt_mel(x).shape == (1, 4801 // 480, 80)
    y = speech_like(0.2, 16000)[:3199]
    assert whisper_log_mel(y).shape == (1, 128, 3199 // 160)
    assert kaldi_fbank(y).shape == (1 + (3199 - 400) // 160, 80)


def test_parity_checker_passes_on_golden():
    from cosyjax.parity import frontend

    assert frontend.PER_VERSION is False
    rows = frontend.check(FixtureContext(GOLDEN, "-"))
    assert len(rows) >= 20
    failed = [(r.output, r.rel_l2, r.note) for r in rows if not r.passed]
    assert not failed, failed
    assert frontend.check(FixtureContext(os.path.join(GOLDEN, "cosyvoice2"), "-")) == []  # no fixtures -> no rows
