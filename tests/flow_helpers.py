"""Helpers shared by the CV2 and CV3 flow tests: tiny golden model, fixtures, layout."""
from __future__ import annotations

import importlib
import os

import jax
import numpy as np

from convert.registry import component_module, convert_component
from cosyjax.config import ModelConfig
from cosyjax.parity.core import rel_l2  # noqa: F401  (re-exported for the flow tests)
from tests.conftest import GOLDEN, model_dir

FLOW_MODULES = {"cosyvoice2": "cosyjax.flow.cv2.model", "cosyvoice3": "cosyjax.flow.cv3.model"}


def flow_dir(version: str) -> str:
    return os.path.join(GOLDEN, version, "flow")


def has_flow_golden(version: str) -> bool:
    return os.path.exists(os.path.join(flow_dir(version), "inference.npz"))


def flow_module(version: str):
    return importlib.import_module(FLOW_MODULES[version])


def channels_last(a):
    """Upstream `[..., C, T]` -> ours `[..., T, C]`."""
    return np.swapaxes(np.asarray(a), -1, -2)


def load_flow_model(version: str):
    """(config, params on device) of the tiny golden model folder, through the normal converter."""
    mc = ModelConfig.from_dir(model_dir(version))
    cfg = component_module("flow").config_from(mc)
    return cfg, jax.device_put(convert_component("flow", mc))


def load_flow_npz(version: str, name: str = "inference.npz") -> dict:
    with np.load(os.path.join(flow_dir(version), name)) as z:
        return {k: z[k] for k in z.files}


def flow_inputs(z):
    """The positional `flow_inference` inputs stored in a golden `inference.npz`."""
    return (z["token"], z["token_len"], z["prompt_token"], z["prompt_token_len"], z["prompt_feat"],
            z["prompt_feat_len"], z["embedding"])


def stream_chunk_frames(cfg) -> int:
    """Mel frames per streaming chunk of the estimator (CV3: its own field; CV2: the U-Net's)."""
    return cfg.unet.static_chunk_size if hasattr(cfg, "unet") else cfg.static_chunk_size
