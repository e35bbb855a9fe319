"""Training data: parquet data lists / JSONL manifests, bucketing, and clear errors naming the bad row."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from tests.conftest import model_dir

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def wav_bytes(seconds=1.0, sr=24000, f0=220.0):
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def make_rows(n=4, seed=0, seconds=1.0):
    """Upstream parquet rows: 1 s of audio = 50 mel frames = 25 speech tokens."""
    rng = np.random.default_rng(seed)
    n_tok = int(round(seconds * 25))
    return [{"utt": f"utt{i}", "text": "hello world", "speech_token": rng.integers(0, 64, n_tok).tolist(),
             "utt_embedding": rng.normal(size=192).astype(np.float32).tolist(),
             "spk_embedding": rng.normal(size=192).astype(np.float32).tolist(),
             "audio_data": wav_bytes(seconds, f0=180.0 + 40 * i)} for i in range(n)]


def write_list(tmp_path, rows, name="data"):
    """rows -> one parquet file + a data.list naming it; returns the list path."""
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    lst = tmp_path / f"{name}.list"
    lst.write_text(str(path) + "\n")
    return str(lst)


def write_manifest(tmp_path, n=4, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        wav = tmp_path / f"m{i}.wav"
        wav.write_bytes(wav_bytes(1.0, f0=200.0 + 30 * i))
        lines.append(json.dumps({"wav": wav.name, "text": "hello world", "utt": f"m{i}",
                                 "speech_token": rng.integers(0, 64, 25).tolist(),
                                 "embedding": rng.normal(size=192).tolist()}))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _mc():
    from cosyjax.config import ModelConfig

    return ModelConfig.from_dir(model_dir("cosyvoice3"))


def test_parquet_list_gives_aligned_flow_batches(tmp_path):
    from cosyjax.train.data import Batcher, read_dataset
    from cosyjax.train.step import make_task

    mc = _mc()
    utts = read_dataset(write_list(tmp_path, make_rows()), "flow", mc)
    assert len(utts) == 4
    for u in utts:
        assert u.speech_feat.shape == (2 * len(u.speech_token), 80) and u.embedding.shape == (192,)
    task = make_task("flow", mc)
    b = Batcher(utts, task, 2, seed=1)
    batch, streaming = b(0)
    assert batch["speech_feat"].shape[1] == 2 * batch["speech_token"].shape[1]
    assert batch["speech_token"].shape[1] % 16 == 0  # bucketed
    assert b(0)[1] == streaming and [u.utt for u in b.rows(3)] == [u.utt for u in Batcher(utts, task, 2, 1).rows(3)]


def test_manifest_uses_the_frontend_mel(tmp_path):
    from cosyjax.frontend.model_inputs import Frontend
    from cosyjax.train.data import read_dataset

    mc = _mc()
    fe = Frontend.from_model_dir(mc.model_dir, text_frontend="none")
    utts = read_dataset(write_manifest(tmp_path), "flow", mc, fe)
    feat, _ = fe.extract_speech_feat(str(tmp_path / "m0.wav"))
    np.testing.assert_array_equal(utts[0].speech_feat, feat[0][:50])


@pytest.mark.parametrize("case,match", [
    ("missing_column", "missing column.*speech_token"),
    ("empty_list", "names no parquet"),
    ("empty_table", "no rows"),
    ("token_range", r"utterance 2 \(utt2\): speech_token ids \[99999\] out of range"),
    ("length_mismatch", r"utterance 1 \(utt1\): 50 mel frames do not match 40 speech tokens"),
])
def test_bad_data_names_the_row(tmp_path, case, match):
    from cosyjax.train.data import TrainDataError, read_dataset

    rows = make_rows()
    if case == "missing_column":
        rows = [{k: v for k, v in r.items() if k != "speech_token"} for r in rows]
    elif case == "token_range":
        rows[2]["speech_token"][3] = 99999
    elif case == "length_mismatch":
        rows[1]["speech_token"] = rows[1]["speech_token"] + [1] * 15
    if case == "empty_list":
        path = tmp_path / "empty.list"
        path.write_text("\n")
        path = str(path)
    elif case == "empty_table":
        path = str(tmp_path / "e.parquet")
        pq.write_table(pa.Table.from_pylist(rows)[:0], path)
    else:
        path = write_list(tmp_path, rows)
    with pytest.raises(TrainDataError, match=match):
        read_dataset(path, "flow", _mc())


def test_manifest_without_tokens_needs_the_onnx(tmp_path):
    from cosyjax.frontend.model_inputs import Frontend
    from cosyjax.train.data import TrainDataError, read_dataset

    (tmp_path / "a.wav").write_bytes(wav_bytes())
    (tmp_path / "m.jsonl").write_text(json.dumps({"wav": "a.wav", "text": "hi"}) + "\n")
    mc = _mc()
    with pytest.raises(TrainDataError, match="line 1: no speech_token"):
        read_dataset(str(tmp_path / "m.jsonl"), "flow", mc, Frontend.from_model_dir(mc.model_dir, text_frontend="none"))
    assert os.path.isfile(str(tmp_path / "a.wav"))
