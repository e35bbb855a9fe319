"""`cosyjax demo`: the README's main job, end to end on the tiny bundled model folder."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from cosyjax.cli import main


@pytest.mark.parametrize("version", ["cosyvoice3"])
def test_demo_writes_a_finite_24khz_wav(version, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COSYJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.wav"
    assert main(["demo", "--version", version, "--text", "Hi there.", "--out", str(out), "--quiet"]) == 0
    wav, sr = sf.read(out, dtype="float32")
    assert sr == 24000
    assert wav.ndim == 1 and wav.size > 0 and wav.size % 960 == 0  # whole speech tokens (960 samples each)
    assert np.all(np.isfinite(wav)) and np.abs(wav).max() <= 0.99
    assert (tmp_path / "cache" / "demo" / version).is_dir()
