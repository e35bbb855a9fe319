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

from convert.common import ConversionError, StateDict
from cosyjax.config import ModelConfig
from cosyjax.errors import CosyJaxError
from cosyjax.io.torch_checkpoint import load_state_dict

__all__ = ["COMPONENTS", "ModelConversionError", "component_module", "convert_component", "convert_model",
           "convert_state", "load_params", "save_params"]

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


class ModelConversionError(ConversionError):
    """A model folder with problems in several places (yaml, checkpoints): `problems` lists them all."""

    def __init__(self, model_dir: str, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = [f"{model_dir}: {len(problems)} problem(s), nothing converted"]
        lines += [f"[{where}] " + msg.replace("\n", "\n    ") for where, msg in problems]
        super().__init__("\n".join(lines))


def convert_model(model_dir: str, names=COMPONENTS) -> tuple[ModelConfig, dict[str, Any]]:
    """Convert every named component of a model folder -> (config, {name: params}).

    Every problem is collected before failing: the yaml / folder (then each checkpoint is still read, so a
    broken one is reported too) and each component's checkpoint keys. Raises `ModelConversionError`."""
    mods = {name: component_module(name) for name in names}
    problems: list[tuple[str, str]] = []
    try:
        cfg = ModelConfig.from_dir(model_dir)
    except CosyJaxError as e:
        problems.append(("yaml / model folder", str(e)))
        cfg = None
    out: dict[str, Any] = {}
    for name, mod in mods.items():
        try:
            if cfg is None:  # no config to convert against: at least check that the checkpoint reads
                load_state_dict(os.path.join(model_dir, mod.CHECKPOINT))
            else:
                out[name] = convert_component(name, cfg)
        except CosyJaxError as e:
            problems.append((f"{name}: {mod.CHECKPOINT}", str(e)))
    if problems:
        raise ModelConversionError(model_dir, problems)
    return cfg, out


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
