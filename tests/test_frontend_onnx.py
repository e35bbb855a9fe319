"""ONNX plumbing: campplus / speech tokenizer fed like upstream (positional inputs, dtypes, shapes)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from cosyjax.frontend import MissingDependencyError, OnnxModelError, SpeakerEncoder, SpeechTokenizer, load_audio
from cosyjax.frontend.features import speaker_fbank, whisper_log_mel
from cosyjax.frontend.onnx_models import import_onnxruntime, speech_tokenizer_file
from tests.test_frontend_support import (
    CAMPPLUS_DIM,
    expected_campplus,
    expected_speech_tokens,
    onnx_available,  # noqa: F401 - fixture
    speech_like,
    write_campplus,
    write_speech_tokenizer,
)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory, onnx_available):  # noqa: F811
    d = tmp_path_factory.mktemp("onnx")
    return {"campplus": write_campplus(str(d / "campplus.onnx")),
            "tokenizer": write_speech_tokenizer(str(d / "speech_tokenizer_v2.onnx")),
            "campplus2": write_campplus(str(d / "campplus_2in.onnx"), n_inputs=2)}


def test_speaker_encoder_gets_batched_fbank(onnx_files):
    enc = SpeakerEncoder(onnx_files["campplus"])
    assert enc.input_names == ["input"]
    fb = speaker_fbank(speech_like(1.0, 16000))
    emb = enc(fb)
    assert emb.shape == (1, CAMPPLUS_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, expected_campplus(fb), rtol=1e-5, atol=1e-6)
    audio = load_audio((speech_like(1.0, 22050), 22050))
    np.testing.assert_allclose(enc(audio), enc(speaker_fbank(audio.at(16000))), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expects a fbank \[frames, bins\]"):
        enc(fb[None])


def test_speech_tokenizer_gets_logmel_and_int32_length(onnx_files):
    tok = SpeechTokenizer(onnx_files["tokenizer"])
    assert tok.input_names == ["feats", "feats_length"]
    mel = whisper_log_mel(speech_like(1.3, 16000))
    assert mel.shape == (1, 128, 130)
    tokens = tok(mel)
    assert tokens.dtype == np.int32 and tokens.shape == (1, 33)  # ceil(130 / 4) at 25 Hz
    np.testing.assert_array_equal(tokens, expected_speech_tokens(mel))  # includes the length input
    audio = load_audio((speech_like(1.3, 16000), 16000))
    np.testing.assert_array_equal(tok(audio), tokens)
    with pytest.raises(ValueError, match=r"expects a log-mel \[1, n_mels, T\]"):
        tok(mel[0])


def test_bad_model_files_are_reported(onnx_files, tmp_path):
    with pytest.raises(OnnxModelError, match=r"speaker encoder \(campplus.onnx\) not found: .*nope.onnx"):
        SpeakerEncoder(str(tmp_path / "nope.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx model")
    with pytest.raises(OnnxModelError, match="cannot load speech tokenizer"):
        SpeechTokenizer(str(junk))
    with pytest.raises(OnnxModelError, match=r"takes 2 input\(s\), this model has 1 \(input\)"):
        SpeechTokenizer(onnx_files["campplus"])
    with pytest.raises(OnnxModelError, match=r"takes 1 input\(s\), this model has 2 \(input, extra\)"):
        SpeakerEncoder(onnx_files["campplus2"])
    enc = SpeakerEncoder(onnx_files["campplus"])
    with pytest.raises(OnnxModelError, match="failed on inputs"):
        enc(np.zeros((10, 40), np.float32))  # 40 bins instead of 80


def test_missing_onnxruntime_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'cosyjax\[onnx\]'"):
        import_onnxruntime()
    model = tmp_path / "campplus.onnx"
    model.write_bytes(b"x")
    with pytest.raises(MissingDependencyError, match="onnxruntime is required"):
        SpeakerEncoder(str(model))


def test_speech_tokenizer_file_names():
    assert speech_tokenizer_file("cosyvoice2") == "speech_tokenizer_v2.onnx"
    assert speech_tokenizer_file("cosyvoice3") == "speech_tokenizer_v3.onnx"
    with pytest.raises(ValueError):
        speech_tokenizer_file("cosyvoice")
