"""Execute `notebooks/finetune.ipynb` (flow fine-tuning on the tiny CosyVoice3 demo folder) with nbclient."""
from __future__ import annotations

import os

import pytest

from tests.conftest import GOLDEN

NB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "finetune.ipynb")


def test_finetune_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipykernel")
    if not os.path.isdir(os.path.join(GOLDEN, "cosyvoice3", "modeldir")):
        pytest.skip("tiny model folders absent")
    repo = os.path.dirname(os.path.dirname(NB))
    monkeypatch.setenv("COSYJAX_GOLDEN", GOLDEN)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NB, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NB)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    first, last = (float(x) for x in text.split("loss ")[1].split("\n")[0].split(" -> "))
    assert last < first
