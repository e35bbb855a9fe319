"""`cosyjax synth | convert | info` on the tiny demo folder (golden tiny weights + demo tokenizer)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from cosyjax.cli import main
from tests.conftest import GOLDEN


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cosyjax.demo import build_demo_model_dir

    if not os.path.isdir(os.path.join(GOLDEN, "cosyvoice3", "modeldir")):
        pytest.skip("tiny model folders absent")
    root = tmp_path_factory.mktemp("cli")
    return {"dir": build_demo_model_dir("cosyvoice3", str(root / "cv3"), source_root=GOLDEN),
            "cache": str(root / "cache"), "root": root}


def _synth(demo, *extra):
    d = demo["dir"]
    return main(["synth", "--model-dir", d, "--prompt-wav", os.path.join(d, "demo_prompt.npz"),
                 "--prompt-text", "You are a helpful assistant.<|endofprompt|>Hello prompt.",
                 "--cache-dir", demo["cache"], "--sampling", "greedy", "--quiet", *extra])


def test_synth_writes_wav_and_caches_checkpoint(demo, capsys):
    out = str(demo["root"] / "a.wav")
    assert _synth(demo, "--text", "Hi.", "--out", out, "--seed", "1") == 0
    audio, sr = sf.read(out)
    assert sr == 24000 and audio.ndim == 1 and audio.size % 480 == 0 and audio.size > 0
    assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) <= 1.0
    cached = os.listdir(os.path.join(demo["cache"], "params"))
    assert len(cached) == 1 and os.path.isfile(os.path.join(demo["cache"], "params", cached[0], "meta.json"))
    # second run: same checkpoint reused, greedy -> identical audio
    out2 = str(demo["root"] / "b.wav")
    assert _synth(demo, "--text", "Hi.", "--out", out2, "--seed", "1") == 0
    np.testing.assert_array_equal(sf.read(out2)[0], audio)
    assert os.listdir(os.path.join(demo["cache"], "params")) == cached


def test_synth_text_file_and_speed(demo):
    """--text-file reads the text; --speed 2 (greedy: the same tokens) halves the mel frames of the same request."""
    tf = demo["root"] / "t.txt"
    tf.write_text("Hi.\n", encoding="utf-8")
    normal, fast = str(demo["root"] / "speed1.wav"), str(demo["root"] / "speed2.wav")
    assert _synth(demo, "--text-file", str(tf), "--out", normal, "--seed", "3") == 0
    assert _synth(demo, "--text", "Hi.", "--out", fast, "--seed", "3", "--speed", "2.0") == 0
    slow, quick = sf.read(normal)[0], sf.read(fast)[0]
    assert slow.size > 2 * 480 and slow.size % 480 == 0
    assert quick.size == (slow.size // 480 // 2) * 480
    assert np.all(np.isfinite(quick)) and np.max(np.abs(quick)) > 0


@pytest.mark.parametrize("args, msg", [
    (["synth"], "--model-dir"),
    (["synth", "--model-dir", "/nonexistent/folder", "--text", "x"], "folder not found"),
    (["nope"], "invalid choice"),
    ([], "missing command"),
])
def test_bad_input_is_one_line_exit_2(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]


def test_bad_synth_requests(demo, capsys):
    d = demo["dir"]
    cases = [
        (["--text", "Hi.", "--stream", "--speed", "1.5"], "--speed only works without --stream"),
        (["--text", "Hi.", "--speed", "0"], "--speed must be > 0"),
        (["--text", "Hi.", "--mode", "vc"], "needs --source-wav"),
        (["--text", "Hi.", "--mode", "sft"], "needs --spk-id"),
        (["--text", "Hi.", "--prompt-speech-tokens", "/nonexistent.npy"], "file not found"),
    ]
    for extra, msg in cases:
        assert _synth(demo, *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (extra, err)
    # audio prompt on a folder without the ONNX models: a clear message naming the missing file
    wav = os.path.join(GOLDEN, "frontend", "zero_shot_prompt.wav")
    rc = main(["synth", "--model-dir", d, "--text", "Hi.", "--prompt-wav", wav, "--out", str(demo["root"] / "x.wav"),
               "--cache-dir", demo["cache"], "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "speech_tokenizer_v3.onnx" in err[0]
    # CosyVoice3 needs <|endofprompt|> somewhere
    rc = main(["synth", "--model-dir", d, "--text", "Hi.", "--prompt-wav", os.path.join(d, "demo_prompt.npz"),
               "--prompt-text", "no marker", "--out", str(demo["root"] / "x.wav"), "--cache-dir", demo["cache"],
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "endofprompt" in err[0]


def test_batch_file(demo):
    jobs = demo["root"] / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Hi.", "out": "j1.wav", "seed": 1},
        {"text": "Hello there.", "out": "j2.wav", "seed": 2},
    ]) + "\n", encoding="utf-8")
    assert _synth(demo, "--batch-file", str(jobs)) == 0
    for name in ("j1.wav", "j2.wav"):
        audio, sr = sf.read(str(demo["root"] / name))
        assert sr == 24000 and audio.size > 0 and audio.size % 480 == 0


def test_info_and_convert(demo, capsys):
    assert main(["info", "--model-dir", demo["dir"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "cosyvoice3" and "campplus.onnx (missing)" in info["files"]
    out = demo["root"] / "ckpt"
    assert main(["convert", "--model-dir", demo["dir"], "--out", str(out)]) == 0
    assert all(os.path.isdir(out / c) for c in ("llm", "flow", "hift"))


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "cosyjax", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "synth" in r.stdout and "convert" in r.stdout


def test_cache_key_follows_files(demo):
    from cosyjax.config import ModelConfig
    from cosyjax.model_cache import cache_key

    mc = ModelConfig.from_dir(demo["dir"])
    k1 = cache_key(mc)
    assert cache_key(mc) == k1
    p = os.path.join(demo["dir"], "hift.pt")
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache_key(mc) != k1
