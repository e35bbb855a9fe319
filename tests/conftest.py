"""Shared pytest fixtures: where the golden fixtures live, CPU-only float32 defaults.

Golden fixtures: `$COSYJAX_GOLDEN` if set, else the full set `../shared/golden/` beside the checkout when it
is there, else the tracked subset `tests/golden/` (a fresh clone). A test that opens a file the subset leaves
out (`ONLY_IN_FULL_SET`) is skipped with the file's name when only the subset exists; every other missing
file is a failure.
"""
from __future__ import annotations

import os

import jax
import pytest

jax.config.update("jax_platforms", "cpu") if os.environ.get("COSYJAX_TEST_DEVICE", "cpu") == "cpu" else None
jax.config.update("jax_default_matmul_precision", "highest")

HERE = os.path.dirname(os.path.abspath(__file__))
SUBSET = os.path.join(HERE, "golden")
FULL_SET = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "golden"))
# what tests/golden/ leaves out of the full set (tests/golden/README.md), relative to the golden root
ONLY_IN_FULL_SET = ("common", "cosyvoice2/e2e", "cosyvoice2/e2e_modes", "cosyvoice3/e2e_modes", "cosyvoice2/train",
                    "cosyvoice3/train", "cosyvoice3/e2e/stream.npz", "cosyvoice3/e2e/nonstream_forced_silence.npz")


def _golden_root() -> str:
    if os.environ.get("COSYJAX_GOLDEN"):
        return os.environ["COSYJAX_GOLDEN"]
    if os.path.isdir(os.path.join(FULL_SET, "cosyvoice3", "e2e_modes")):
        return FULL_SET
    return SUBSET


GOLDEN = _golden_root()
FULLSIZE = os.path.join(HERE, "fullsize")


def only_in_full_set(path) -> bool:
    """True for a path under the subset that the subset deliberately leaves out."""
    rel = os.path.relpath(os.path.abspath(os.fspath(path)), SUBSET).replace(os.sep, "/")
    return not rel.startswith("..") and any(rel == p or rel.startswith(p + "/") for p in ONLY_IN_FULL_SET)


def _skip_if_left_out(e: FileNotFoundError) -> None:
    if GOLDEN == SUBSET and e.filename and only_in_full_set(e.filename):
        rel = os.path.relpath(e.filename, SUBSET)
        pytest.skip(f"needs {rel}: only in the full fixture set ../shared/golden/ (tests/golden/ is the "
                    "tracked subset)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    except FileNotFoundError as e:
        _skip_if_left_out(e)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except FileNotFoundError as e:
        _skip_if_left_out(e)
        raise


@pytest.fixture(scope="session")
def golden_root() -> str:
    """Root of the golden fixtures (see the module docstring)."""
    return GOLDEN


@pytest.fixture(scope="session")
def fullsize_root() -> str:
    """Full-size yamls, Qwen2 config and key manifests (no weights) for shapes-only tests."""
    return FULLSIZE


def model_dir(version: str) -> str:
    return os.path.join(GOLDEN, version, "modeldir")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module: one long pytest process otherwise keeps
    every executable of ~400 tests alive, and late in the run XLA's CPU compiler segfaulted
    (`backend_compile_and_load`, twice, in the training tests) after the tiled attention made the flow
    programs larger. Each module still reuses its own compilations."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
