"""Which converter handles which checkpoint, and orbax save/load of the converted trees.

Each component module `convert/<name>.py` provides:
  CHECKPOINT: str                          # file name in the model folder, e.g. 'hift.pt'
  PREFIX_ALIASES: tuple[str, ...] = ()     # key prefixes stripped before conversion
  config_from(model_cfg) -> component config (frozen dataclass)
  convert(sd: StateDict, cfg) -> params    # plain nested dict of arrays; takes every key it needs
  constants(model_cfg, cfg) -> dict        # optional: non-checkpoint arrays (noise buffers, ...)
"""
from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from convert.common import StateDict
from cosyjax.config import ModelConfig
from cosyjax.io.torch_checkpoint import load_state_dict

__all__ = ["COMPONENTS", "component_module", "convert_component", "convert_state", "load_params", "save_params"]

COMPONENTS = ("llm", "flow", "hift")


def component_module(name: str):
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")
    return importlib.import_module(f"convert.{name}")


def convert_state(name: str, state: dict[str, Any], model_cfg: ModelConfig, source: str = "") -> Any:
    """Convert an in-memory state dict (numpy or ShapeDtypeStruct leaves) for component `name`."""
    mod = component_module(name)
    cfg = mod.config_from(model_cfg)
    sd = StateDict(state, source=source or mod.CHECKPOINT, prefix_aliases=getattr(mod, "PREFIX_ALIASES", ()))
    params = mod.convert(sd, cfg)
    sd.finish(f"{model_cfg.version} {name} model")
    return params


def convert_component(name: str, model_cfg: ModelConfig) -> Any:
    """Read `<model_dir>/<component>.pt` and convert it (errors name every bad key)."""
    mod = component_module(name)
    path = model_cfg.path(mod.CHECKPOINT)
    return convert_state(name, load_state_dict(path), model_cfg, source=path)


def save_params(path: str, tree: Any) -> None:
    """Write a parameter tree with orbax (overwrites)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    tree = _to_numpy(tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=True)


def load_params(path: str) -> Any:
    """Read a parameter tree written by `save_params` (as numpy arrays)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.abspath(path))
    return _to_numpy(tree)


def _to_numpy(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)
