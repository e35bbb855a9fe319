"""Training-loss parity (`cosyjax.parity.train`) on `<v>/train/` of the golden fixtures: loss, layout,
intermediates and every parameter's gradient against upstream's recorded `loss.backward()`."""
from __future__ import annotations

import os

import pytest

from tests.conftest import GOLDEN

SHARED = "/work/shared/golden"


def _root(version):
    for root in (GOLDEN, SHARED):
        if os.path.isdir(os.path.join(root, version, "train")):
            return root
    pytest.skip(f"no {version}/train fixtures")


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_train_parity(version):
    from cosyjax.parity.core import FixtureContext
    from cosyjax.parity.train import check

    rows = check(FixtureContext(_root(version), version))
    outputs = {r.output for r in rows}
    for case in ("llm", "flow_nonstream", "flow_stream"):
        assert f"{case}/loss" in outputs
        assert any(o.startswith(f"{case}/grad(worst") for o in outputs)
    bad = [r for r in rows if not r.passed]
    assert not bad, "\n".join(f"{r.output}: rel {r.rel_l2:.3e} ({r.note})" for r in bad)


def test_missing_fixture_is_a_failed_row(tmp_path):
    from cosyjax.parity.core import FixtureContext
    from cosyjax.parity.train import check

    (tmp_path / "cosyvoice3" / "train").mkdir(parents=True)
    rows = check(FixtureContext(str(tmp_path), "cosyvoice3"))
    assert len(rows) == 3 and not any(r.passed for r in rows)
    assert all("missing fixture" in r.note for r in rows)
