"""`flow.pt` converter: dispatches to the CosyVoice2 (Conformer + U-Net) or CosyVoice3 (DiT) converter."""
from __future__ import annotations

import importlib

CHECKPOINT = "flow.pt"
_IMPL = {"cosyvoice2": "convert.flow_cv2", "cosyvoice3": "convert.flow_cv3"}


def _impl(version: str):
    return importlib.import_module(_IMPL[version])


def config_from(model_cfg):
    return _impl(model_cfg.version).config_from(model_cfg)


def convert(sd, cfg):
    return _impl(cfg.version).convert(sd, cfg)
