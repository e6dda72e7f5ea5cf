"""Shared fixtures: the embedded models; the process helpers of launch/harness.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.harness import Proc, make_config, wait_for  # noqa: F401  (tests import them here)
from launch.ports import free_ports  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "models"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from launch.embedded_model import ensure_embedded_model

    return ensure_embedded_model(MODEL_CACHE, steps=600, seed=0, progress=False)


@pytest.fixture(scope="session")
def math_model() -> Path:
    """The math rehearsal's embedded model (configs/math-rehearsal.toml builds the same)."""
    from launch.rehearsal_model import ensure_rehearsal_model

    return ensure_rehearsal_model(MODEL_CACHE, progress=False)
