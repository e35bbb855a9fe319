"""The parity runner (`python -m cosyjax.parity`) knows what a fixture set must contain: on a copy of the golden
set (symlinked files), a deleted file, a deleted npz key and a deleted listed e2e_modes case each give a FAIL
row naming it and a non-zero exit; a listed array no checker reads fails; folders without a checker are shown
as `not checked`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cosyjax.parity.__main__ import main, run
from cosyjax.parity.core import FixtureContext, listing, missing_rows, unread_rows
from tests.conftest import GOLDEN


def _linked_copy(src: str, dst) -> str:
    """Directory tree of `src` with every file symlinked (meta.json copied, so a test may edit it)."""
    for d, _, files in os.walk(src):
        out = os.path.join(dst, os.path.relpath(d, src))
        os.makedirs(out, exist_ok=True)
        for f in files:
            target = os.path.join(out, f)
            if f == "meta.json":
                with open(os.path.join(d, f), "rb") as a, open(target, "wb") as b:
                    b.write(a.read())
            else:
                os.symlink(os.path.join(d, f), target)
    return str(dst)


@pytest.fixture()
def golden_copy(tmp_path):
    if not os.path.isdir(os.path.join(GOLDEN, "cosyvoice2", "hift")):
        pytest.skip(f"golden fixtures absent: {GOLDEN}")
    return _linked_copy(GOLDEN, tmp_path / "golden")


def _fails(capsys, argv) -> list[str]:
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc != 0, out
    return [line for line in out.splitlines() if "  FAIL" in line]


def test_deleted_file_is_a_failed_row(golden_copy, capsys):
    os.remove(os.path.join(golden_copy, "cosyvoice2", "hift", "inference.npz"))
    fails = _fails(capsys, [golden_copy, "--only", "hift", "--versions", "cosyvoice2"])
    assert any("inference.npz (missing)" in f for f in fails), fails


def test_deleted_npz_key_is_a_failed_row(golden_copy, capsys):
    path = os.path.join(golden_copy, "cosyvoice3", "hift", "inference.npz")
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files if k != "wav_finalize_false"}
    os.remove(path)
    np.savez(path, **kept)
    fails = _fails(capsys, [golden_copy, "--only", "hift", "--versions", "cosyvoice3"])
    assert any("inference.npz:wav_finalize_false (missing)" in f for f in fails), fails


def test_deleted_listed_case_is_a_failed_row(golden_copy, capsys):
    folder = os.path.join(golden_copy, "cosyvoice2", "e2e_modes")
    if not os.path.isdir(folder):
        pytest.skip("e2e_modes fixtures only in ../shared/golden")
    os.remove(os.path.join(folder, "sft_stream.npz"))
    # select only the deleted case: nothing is synthesised, the listing alone must catch it
    fails = _fails(capsys, [golden_copy, "--only", "e2e_modes", "--versions", "cosyvoice2", "--cases", "sft_stream"])
    assert any("sft_stream.npz (missing)" in f for f in fails), fails


def test_case_missing_from_the_folder_but_listed_only_in_cases(tmp_path):
    folder = tmp_path / "cosyvoice2" / "e2e_modes"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"cases": [{"name": "x_nonstream.npz", "inputs": "inputs_x.npz"}]}))
    rows = missing_rows("cosyvoice2", "e2e_modes", listing(str(folder)))
    assert sorted(r.output for r in rows) == ["inputs_x.npz (missing)", "x_nonstream.npz (missing)"]
    assert not any(r.passed for r in rows)


def test_listed_array_no_checker_reads_fails(tmp_path):
    folder = tmp_path / "v" / "thing"
    folder.mkdir(parents=True)
    np.savez(folder / "a.npz", x=np.zeros(2), y=np.ones(2), noise=np.ones(1))
    (folder / "meta.json").write_text(json.dumps({"a.npz": {"arrays": {"x": {}, "y": {}, "noise": {}}}}))
    ctx = FixtureContext(str(tmp_path), "v")
    z = ctx.npz("thing", "a.npz")
    assert "y" in z and float(z["x"][0]) == 0.0  # `in` is no read; item access is
    lst = listing(str(folder))
    rows = unread_rows("v", "thing", lst, ctx.reads, {"a.npz": {"noise": "discarded upstream draw"}})
    assert len(rows) == 1 and not rows[0].passed and "y" in rows[0].note and "noise" not in rows[0].note
    z["y"]
    assert unread_rows("v", "thing", lst, ctx.reads, {"a.npz": {"noise": "discarded upstream draw"}}) == []


def test_folders_without_checker_are_not_checked_rows(tmp_path, capsys):
    (tmp_path / "cosyvoice2" / "mystery").mkdir(parents=True)
    (tmp_path / "extra").mkdir()
    rows = run(str(tmp_path))
    shown = {(r.version, r.component) for r in rows if not r.checked}
    assert ("cosyvoice2", "mystery") in shown and ("-", "extra") in shown
    assert all(r.passed for r in rows if not r.checked)
    assert main([str(tmp_path)]) == 1  # nothing was checked at all
    assert "not checked" in capsys.readouterr().out


def test_folder_without_meta_json_fails(tmp_path):
    (tmp_path / "cosyvoice2" / "hift").mkdir(parents=True)
    rows = run(str(tmp_path), only=["hift"])
    assert [r.output for r in rows] == ["meta.json (missing)"] and not rows[0].passed
