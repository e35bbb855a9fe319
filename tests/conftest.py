"""Shared pytest fixtures: where the golden fixtures live, CPU-only float32 defaults."""
from __future__ import annotations

import os

import jax
import pytest

jax.config.update("jax_platforms", "cpu") if os.environ.get("COSYJAX_TEST_DEVICE", "cpu") == "cpu" else None
jax.config.update("jax_default_matmul_precision", "highest")

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.environ.get("COSYJAX_GOLDEN", os.path.join(HERE, "golden"))
FULLSIZE = os.path.join(HERE, "fullsize")


@pytest.fixture(scope="session")
def golden_root() -> str:
    """Root of the golden fixtures (copied from ../shared/golden; the seed-0 noise is regenerated)."""
    return GOLDEN


@pytest.fixture(scope="session")
def fullsize_root() -> str:
    """Full-size yamls, Qwen2 config and key manifests (no weights) for shapes-only tests."""
    return FULLSIZE


def model_dir(version: str) -> str:
    return os.path.join(GOLDEN, version, "modeldir")
