"""The host training loop: batches from a `Batcher`, the jitted `train_step`, checkpoints, resume.

The loop holds no randomness of its own: batch order, layouts and per-step keys derive from
(seed, step), so a run resumed from its step-k checkpoint continues exactly as the uninterrupted run.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import numpy as np

from cosyjax.train import checkpoint as ckpt
from cosyjax.train.step import init_state, train_step

__all__ = ["fit"]


def fit(task, params, batcher, steps: int, *, out_dir: Optional[str] = None, save_every: int = 0,
        resume: bool = False, on_step: Optional[Callable[[int, dict], None]] = None):
    """Run optimizer steps until `steps` in total -> (state, base, losses list[float] of the steps run here).

    save_every > 0 writes the whole train state to out_dir every that many steps (and at the end);
    resume=True restores the latest checkpoint in out_dir first. on_step(step, metrics) after each step.
    """
    state, base = init_state(task, params)
    if resume:
        if out_dir is None:
            raise ckpt.CheckpointError("resume needs an output folder")
        state = ckpt.restore_state(out_dir, state)
    base = None if base is None else jax.device_put(base)
    losses = []
    start = int(state.step)
    t0 = time.perf_counter()
    for step in range(start, steps):
        batch, streaming = batcher(step)
        state, metrics = train_step(state, base, batch, task=task, streaming=streaming)
        m = {k: float(np.asarray(v)) for k, v in metrics.items()}
        m["steps_per_s"] = (step + 1 - start) / max(time.perf_counter() - t0, 1e-9)
        losses.append(m["loss"])
        if on_step is not None:
            on_step(step + 1, m)
        if out_dir and save_every and (step + 1) % save_every == 0:
            ckpt.save_state(out_dir, state)
    if out_dir and save_every and int(state.step) % save_every:
        ckpt.save_state(out_dir, state)
    return state, base, losses
