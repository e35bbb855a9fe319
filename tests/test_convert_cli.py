"""`python -m convert MODEL_DIR OUT_DIR` (convert/__main__.py, convert.registry.convert_model): the problems of the
yaml and of every checkpoint in one message, and nothing written when any component fails."""
from __future__ import annotations

import os
import shutil

import pytest

from convert.__main__ import main
from convert.registry import ModelConversionError, convert_model
from tests.conftest import model_dir

VERSION = "cosyvoice2"


def _copy_model(tmp_path) -> str:
    src = model_dir(VERSION)
    if not os.path.isdir(src):
        pytest.skip(f"tiny model folder absent: {src}")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    os.chmod(dst, 0o755)
    for name in os.listdir(dst):
        if os.path.isfile(dst / name):
            os.chmod(dst / name, 0o644)
    return str(dst)


def _break(d: str, name: str, content: bytes | None = None, source: str | None = None) -> None:
    path = os.path.join(d, name)
    os.remove(path)
    if source is not None:
        shutil.copy(source, path)
    else:
        with open(path, "wb") as f:
            f.write(content)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # zero placeholders of mis-shaped weight-norm keys
def test_broken_llm_and_hift_are_both_listed(tmp_path, capsys):
    d = _copy_model(tmp_path)
    _break(d, "llm.pt", b"not a checkpoint")  # unreadable
    _break(d, "hift.pt", source=os.path.join(model_dir("cosyvoice3"), "hift.pt"))  # readable, wrong model's keys
    out = tmp_path / "out"
    assert main([d, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "2 problem(s)" in err
    assert "[llm: llm.pt]" in err and "[hift: hift.pt]" in err and "flow" not in err.split("problem(s)")[1][:200]
    assert "checkpoint keys do not match" in err  # the hift key report, not only a file name
    assert not out.exists()  # nothing half-written


def test_broken_yaml_and_llm_are_both_listed(tmp_path):
    d = _copy_model(tmp_path)
    _break(d, f"{VERSION}.yaml", b"llm: !new:nope.Nope [\n")
    _break(d, "llm.pt", b"garbage")
    with pytest.raises(ModelConversionError) as e:
        convert_model(d)
    where = [w for w, _ in e.value.problems]
    assert where[0] == "yaml / model folder" and "llm: llm.pt" in where and len(where) == 2, where


def test_good_folder_converts_and_writes_every_component(tmp_path, capsys):
    d = _copy_model(tmp_path)
    out = tmp_path / "out"
    assert main([d, str(out), "--components", "hift"]) == 0
    assert os.path.isdir(out / "hift") and not os.path.exists(out / "llm")
    assert "converted 1 component(s)" in capsys.readouterr().out
