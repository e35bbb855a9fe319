"""Without wetext the text normaliser falls back to rules only; that must be a WARNING saying what differs from
upstream and how to get upstream's behaviour (cosyjax/frontend/text_normalize.py `WETEXT_MISSING`)."""
from __future__ import annotations

import logging
import sys

from cosyjax.frontend.text_normalize import TextNormalizer


def _records(caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="cosyjax.frontend.text_normalize"):
        tn = TextNormalizer(lambda s: s.split(), **kw)
    return tn, [r for r in caplog.records if r.name == "cosyjax.frontend.text_normalize"]


def test_missing_wetext_is_a_warning_with_the_fix(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wetext", None)  # `import wetext` raises ImportError
    tn, recs = _records(caplog, engine="auto")
    assert tn.engine == ""
    warn = [r for r in recs if r.levelno == logging.WARNING]
    assert len(warn) == 1, [(r.levelname, r.getMessage()) for r in recs]
    msg = warn[0].getMessage()
    assert "differs from upstream" in msg and "numbers" in msg and 'pip install -e ".[text]"' in msg
    assert "wetext text normaliser unavailable (" in msg  # names the reason it did not load


def test_explicit_rule_only_engine_does_not_warn(caplog):
    tn, recs = _records(caplog, engine="none")
    assert tn.engine == "" and not [r for r in recs if r.levelno >= logging.WARNING]
