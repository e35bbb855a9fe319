"""The llm parity checker on the golden fixtures (`<v>/llm/backbone.npz`, `<v>/llm/decode.npz`): every row passes."""
from __future__ import annotations

import pytest

from cosyjax.parity import llm as llm_parity
from cosyjax.parity.core import FixtureContext

from .conftest import GOLDEN


@pytest.mark.parametrize("version", ["cosyvoice2", "cosyvoice3"])
def test_llm_parity_rows_pass(version):
    rows = llm_parity.check(FixtureContext(GOLDEN, version))
    names = {r.output for r in rows}
    assert {"backbone.hidden", "backbone.logits", "decode.greedy_tokens", "decode.greedy_logp_top32_values",
            "decode.greedy_logp_first8", "decode.ras_tokens"} <= names
    failed = [(r.output, r.rel_l2, r.note) for r in rows if not r.passed]
    assert not failed, failed
