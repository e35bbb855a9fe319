"""Parity bookkeeping shared by the per-component checkers.

A checker module `cosyjax/parity/<name>.py` exposes `check(ctx: FixtureContext) -> list[Result]`.
It looks for its own fixture files under `ctx.version_dir` and returns no rows when they are
absent, so the runner works on any fixture set laid out like `../shared/golden/`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

__all__ = ["FixtureContext", "Result", "compare", "exact", "rel_l2"]


@dataclasses.dataclass
class Result:
    version: str
    component: str
    output: str
    rel_l2: float
    max_abs: float
    tol: float
    passed: bool
    note: str = ""


def rel_l2(got, want) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    den = np.linalg.norm(want.ravel())
    num = np.linalg.norm((got - want).ravel())
    return float(num / den) if den > 0 else float(num)


def compare(version: str, component: str, output: str, got, want, tol: float, note: str = "") -> Result:
    """rel-L2 / max-abs comparison; a shape mismatch is a failure, never a broadcast."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return Result(version, component, output, float("inf"), float("inf"), tol, False,
                      f"shape {got.shape} != expected {want.shape}")
    if not np.all(np.isfinite(got)):
        return Result(version, component, output, float("nan"), float("nan"), tol, False, "non-finite output")
    err = rel_l2(got, want)
    max_abs = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    return Result(version, component, output, err, max_abs, tol, err <= tol, note)


def exact(version: str, component: str, output: str, got, want, note: str = "") -> Result:
    """Exact equality (token ids): rel_l2 column holds the number of mismatching positions."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return Result(version, component, output, float("inf"), float("inf"), 0.0, False,
                      f"shape {got.shape} != expected {want.shape}")
    n_bad = int(np.sum(got != want))
    return Result(version, component, output, float(n_bad), float(n_bad), 0.0, n_bad == 0,
                  note or "mismatching positions")


@dataclasses.dataclass(eq=False)  # hashable by identity: `params` below is lru-cached per context
class FixtureContext:
    """One version's fixtures: `root/<version>/{modeldir,hift,flow,llm,e2e}` plus `root/common`."""

    root: str
    version: str

    @property
    def version_dir(self) -> str:
        return os.path.join(self.root, self.version)

    @property
    def model_dir(self) -> str:
        return os.path.join(self.version_dir, "modeldir")

    def fixture(self, *parts: str) -> str:
        return os.path.join(self.version_dir, *parts)

    def has(self, *parts: str) -> bool:
        return os.path.exists(self.fixture(*parts))

    def npz(self, *parts: str) -> dict[str, np.ndarray]:
        with np.load(self.fixture(*parts)) as z:
            return {k: z[k] for k in z.files}

    def json(self, *parts: str) -> Any:
        with open(self.fixture(*parts), encoding="utf-8") as f:
            return json.load(f)

    @functools.cached_property
    def model_config(self):
        from cosyjax.config import ModelConfig

        return ModelConfig.from_dir(self.model_dir)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one context per version, lives for one run
    def params(self, component: str):
        """The component's parameters through the normal converter path."""
        from convert.registry import convert_component

        return convert_component(component, self.model_config)
