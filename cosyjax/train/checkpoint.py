"""Orbax checkpoints of the whole train state, and the fine-tuned output the synthesis path loads.

Layout of a run folder OUT:
```
OUT/finetune.json              component, version, model_dir, steps, lora {rank, alpha} or null, train config
OUT/params/                    orbax tree: the full component tree, or only the LoRA adapters
OUT/checkpoints/step_<n>/      orbax: every leaf of TrainState (step, trainable, opt_state) as leaf_<i>
```
`load_params(OUT, base_params)` returns the plain inference tree of the fine-tuned component (LoRA merged
into `base_params`), structured exactly like the converter's output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np

from cosyjax.errors import CosyJaxError

__all__ = ["CheckpointError", "save_state", "latest_step", "restore_state", "save_output", "read_meta",
           "load_params"]

META = "finetune.json"


class CheckpointError(CosyJaxError):
    """A fine-tuning output or checkpoint that does not fit the model."""


def _ckpt_dir(out_dir, step):
    return os.path.join(os.path.abspath(out_dir), "checkpoints", f"step_{int(step):08d}")


def save_state(out_dir: str, state) -> str:
    """Write every leaf of `state` (a TrainState) to OUT/checkpoints/step_<n>."""
    import orbax.checkpoint as ocp

    leaves = jax.tree_util.tree_leaves(state)
    path = _ckpt_dir(out_dir, int(state.step))
    with ocp.StandardCheckpointer() as ck:
        ck.save(path, {f"leaf_{i:05d}": np.asarray(a) for i, a in enumerate(leaves)}, force=True)
    return path


def latest_step(out_dir: str) -> int | None:
    d = os.path.join(out_dir, "checkpoints")
    steps = [int(m.group(1)) for n in (os.listdir(d) if os.path.isdir(d) else ())
             if (m := re.fullmatch(r"step_(\d+)", n))]
    return max(steps) if steps else None


def restore_state(out_dir: str, like, step: int | None = None):
    """The state saved at `step` (default: the latest), with the tree structure of `like`."""
    import orbax.checkpoint as ocp

    step = latest_step(out_dir) if step is None else step
    if step is None:
        raise CheckpointError(f"{out_dir}: no checkpoint to resume from (checkpoints/step_*)")
    leaves, treedef = jax.tree_util.tree_flatten(like)
    with ocp.StandardCheckpointer() as ck:
        got = ck.restore(_ckpt_dir(out_dir, step))
    if len(got) != len(leaves):
        raise CheckpointError(f"{out_dir} step {step}: {len(got)} saved leaves, the current run has {len(leaves)} "
                              "(different component, LoRA or optimizer settings?)")
    new = []
    for i, ref in enumerate(leaves):
        a = np.asarray(got[f"leaf_{i:05d}"])
        if a.shape != np.shape(ref):
            raise CheckpointError(f"{out_dir} step {step}: leaf {i} has shape {a.shape}, expected {np.shape(ref)}")
        new.append(jax.numpy.asarray(a, dtype=np.asarray(ref).dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


def save_output(out_dir: str, task, trainable, *, model_dir: str, steps: int) -> str:
    """Write OUT/params (full tree, or adapters under LoRA) and OUT/finetune.json."""
    from convert.registry import save_params

    tc = task.train
    save_params(os.path.join(os.path.abspath(out_dir), "params"), trainable)
    meta = {"component": task.component, "version": task.version, "model_dir": os.path.abspath(model_dir),
            "steps": int(steps), "lora": {"rank": tc.lora_rank, "alpha": tc.lora_alpha} if tc.lora_rank else None,
            "train": dataclasses.asdict(tc)}
    with open(os.path.join(out_dir, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return out_dir


def read_meta(out_dir: str) -> dict:
    path = os.path.join(out_dir, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{out_dir} is not a fine-tuning output (no {META})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_params(out_dir: str, base_params):
    """Fine-tuned inference tree of the output's component (numpy leaves, the converter's structure).

    base_params: that component's converted tree, or a dict of components ({'llm': ..., 'flow': ...,
    'hift': ...}); then the whole dict is returned with the fine-tuned component replaced.
    """
    from convert.registry import load_params as load_tree
    from cosyjax.train import lora as lora_lib

    meta = read_meta(out_dir)
    comp = meta["component"]
    if isinstance(base_params, dict) and {"llm", "flow"} <= set(base_params):  # a whole-model dict
        return dict(base_params, **{comp: load_params(out_dir, base_params[comp])})
    tree = load_tree(os.path.join(out_dir, "params"))
    if meta.get("lora"):
        tree = lora_lib.merge(base_params, tree, float(meta["lora"]["alpha"]), int(meta["lora"]["rank"]))
        tree = jax.tree_util.tree_map(np.asarray, tree)
    want = jax.tree_util.tree_map(np.shape, base_params)
    got = jax.tree_util.tree_map(np.shape, tree)
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
        raise CheckpointError(f"{out_dir}: the fine-tuned {comp} tree does not match the base model's "
                              f"structure/shapes (was it trained from another model folder?)")
    return tree
