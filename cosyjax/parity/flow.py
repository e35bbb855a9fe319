"""Flow parity: dispatches to the per-version checker (`flow_cv2` / `flow_cv3`)."""
from __future__ import annotations

import importlib

_IMPL = {"cosyvoice2": "cosyjax.parity.flow_cv2", "cosyvoice3": "cosyjax.parity.flow_cv3"}


def check(ctx):
    if ctx.version not in _IMPL or not ctx.has("flow"):
        return []
    return importlib.import_module(_IMPL[ctx.version]).check(ctx)
