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


def test_demo_folder_builds_atomically_when_two_build_at_once(tmp_path, monkeypatch):
    """Two builders of one demo folder at once (two test workers, two servers): both return the finished
    folder, no scratch folder is left behind, and a rebuild with overwrite replaces it whole."""
    import os
    import threading

    import time

    import cosyjax.demo as demo
    from cosyjax.demo import _MARKER, build_demo_model_dir

    write_prompt = demo._write_demo_prompt

    def slow_prompt(*a, **k):  # widen the window in which a half-built folder exists
        time.sleep(0.3)
        write_prompt(*a, **k)

    monkeypatch.setattr(demo, "_write_demo_prompt", slow_prompt)
    out = tmp_path / "demo" / "cosyvoice3"
    results, errors = [], []
    start = threading.Barrier(4)

    def build():
        start.wait()
        try:
            results.append(build_demo_model_dir("cosyvoice3", str(out)))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [str(out)] * 4
    assert (out / _MARKER).is_file() and (out / "CosyVoice-BlankEN" / "config.json").is_file()
    assert sorted(os.listdir(out.parent)) == ["cosyvoice3"]  # no scratch folders left
    before = sorted(os.listdir(out))
    assert build_demo_model_dir("cosyvoice3", str(out), overwrite=True) == str(out)
    assert sorted(os.listdir(out)) == before and sorted(os.listdir(out.parent)) == ["cosyvoice3"]
    (out.parent / "other").mkdir()
    (out.parent / "other" / "x.txt").write_text("not a demo")
    with pytest.raises(FileExistsError, match="not a cosyjax demo folder"):
        build_demo_model_dir("cosyvoice3", str(out.parent / "other"))
