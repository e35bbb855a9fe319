"""Execute the notebooks (quickstart, parity walk-through, fine-tuning) with nbclient."""
from __future__ import annotations

import os

import pytest

from tests.conftest import GOLDEN

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "parity.ipynb", "finetune.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipykernel")
    if not os.path.isdir(os.path.join(GOLDEN, "cosyvoice3", "modeldir")):
        pytest.skip("tiny model folders absent")
    repo = os.path.dirname(NB_DIR)
    monkeypatch.setenv("COSYJAX_GOLDEN", GOLDEN)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": NB_DIR}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # every code cell ran
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    if name == "finetune.ipynb":  # the notebook prints "loss A -> B" over its fine-tuning run
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        first, last = (float(x) for x in text.split("loss ")[1].split("\n")[0].split(" -> "))
        assert last < first
