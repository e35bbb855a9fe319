"""Parity bookkeeping shared by the per-component checkers.

A checker module `cosyjax/parity/<name>.py` exposes `check(ctx: FixtureContext) -> list[Result]`
and reads its fixtures through `ctx.npz` (which records every array it reads). What a folder must
contain comes from the folder's own `meta.json` (`listing`): the runner turns a listed file or array
that is absent (`missing_rows`) and a listed array no checker read (`unread_rows`) into failing rows,
so the runner works on any fixture set laid out like `../shared/golden/` and never passes silently.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
from typing import Any

import numpy as np

__all__ = ["FixtureContext", "Listing", "Result", "compare", "exact", "listing", "missing_rows", "not_checked",
           "rel_l2", "unread_rows"]


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
    checked: bool = True  # False: a fixture folder no checker reads (printed, neither passed nor failed)


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


def failure(version: str, component: str, output: str, note: str) -> Result:
    """A failing row that carries no measurement (missing fixture, wrong call, crash)."""
    return Result(version, component, output, float("nan"), float("nan"), 0.0, False, note)


def not_checked(version: str, component: str, note: str) -> Result:
    return Result(version, component, "(not checked)", float("nan"), float("nan"), 0.0, True, note, checked=False)


class TrackedArrays(dict):
    """The arrays of one npz; `read` collects the keys a checker looked up (`in` does not count)."""

    def __init__(self, arrays: dict, read: set):
        super().__init__(arrays)
        self.read = read

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            return self[key]
        return default


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a fixture folder's meta.json promises: file name -> listed array names (None: not an npz)."""

    folder: str
    files: dict

    def arrays(self, name: str) -> tuple:
        return tuple(self.files.get(name) or ())


_FILE_SUFFIXES = (".npz", ".npy", ".wav", ".json", ".pt")


def listing(folder: str, default_npz: str | None = None) -> Listing:
    """Parse `folder/meta.json`: every key that names a file (`x.npz: {"arrays": {...}}`, `x.wav: {...}`).

    A top-level `"arrays"` table (the frontend's layout) belongs to `default_npz`. Raises
    FileNotFoundError when the folder has no meta.json.
    """
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    files: dict = {}

    def add(name, entry):
        arrays = entry.get("arrays") if isinstance(entry, dict) else None
        files[name] = list(arrays) if isinstance(arrays, dict) else (None if not name.endswith(".npz") else [])

    for key, entry in meta.items():
        if key.endswith(_FILE_SUFFIXES):
            add(key, entry)
        elif isinstance(entry, dict) and key in ("wavs", "files"):
            for name, sub in entry.items():
                add(name, sub)
    for case in meta.get("cases") or ():  # e2e_modes: every listed case's output and input file
        for name in (case.get("name"), case.get("inputs")):
            if name and name not in files:
                files[name] = []
    if isinstance(meta.get("arrays"), dict):
        if default_npz is None:
            raise ValueError(f"{folder}/meta.json has a top-level 'arrays' table but no file is named for it")
        files[default_npz] = list(meta["arrays"])
    return Listing(folder, files)


def missing_rows(version: str, component: str, lst: Listing) -> list[Result]:
    """One failing row per listed file / array that the folder lacks."""
    rows = []
    for name, arrays in lst.files.items():
        path = os.path.join(lst.folder, name)
        if not os.path.exists(path):
            rows.append(failure(version, component, f"{name} (missing)", f"listed in {component}/meta.json, file absent"))
            continue
        if arrays:
            with np.load(path) as z:
                have = set(z.files)
            for key in arrays:
                if key not in have:
                    rows.append(failure(version, component, f"{name}:{key} (missing)",
                                        f"listed in {component}/meta.json, array absent"))
    return rows


def unread_rows(version: str, component: str, lst: Listing, reads: dict, unused: dict | None = None) -> list[Result]:
    """One failing row per listed, present npz array that the checker never read (no row compares it).

    reads: absolute npz path -> keys read (`FixtureContext.reads`); unused: {file: {key: why}} arrays
    that are deliberately not compared (upstream outputs it discards).
    """
    unused = unused or {}
    rows = []
    for name, arrays in lst.files.items():
        path = os.path.abspath(os.path.join(lst.folder, name))
        if not arrays or not os.path.exists(path):
            continue
        with np.load(path) as z:
            have = set(z.files)
        seen = reads.get(path)
        skip = [*unused.get("*", {}), *unused.get(name, {})]
        left = [k for k in arrays if k in have and not any(fnmatch.fnmatchcase(k, pat) for pat in skip)
                and (seen is None or k not in seen)]
        if seen is None and left:
            rows.append(failure(version, component, f"{name} (not compared)", "listed in meta.json; no row reads it"))
        elif left:
            shown = ", ".join(left[:6]) + (f", ... ({len(left)} arrays)" if len(left) > 6 else "")
            rows.append(failure(version, component, f"{name} (not compared)", f"arrays no row reads: {shown}"))
    return rows


@dataclasses.dataclass(eq=False)  # hashable by identity: `params` below is lru-cached per context
class FixtureContext:
    """One version's fixtures: `root/<version>/{modeldir,hift,flow,llm,e2e}` plus `root/common`."""

    root: str
    version: str
    cases: tuple | None = None  # e2e_modes case names to run (None: every listed case)
    reads: dict = dataclasses.field(default_factory=dict)  # absolute npz path -> keys read (`npz`)

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

    def npz(self, *parts: str) -> TrackedArrays:
        """`version_dir/<parts>` as a dict of arrays; the keys read are recorded in `reads`."""
        return self.load_npz(self.fixture(*parts))

    def load_npz(self, path: str) -> TrackedArrays:
        path = os.path.abspath(path)
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        return TrackedArrays(arrays, self.reads.setdefault(path, set()))

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
