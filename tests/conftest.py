"""Shared fixtures: tiny synthetic IDX data, seeded Keras, isolated environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

from idx_utils import make_synthetic_idx_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    import keras

    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 training and 60 test images of 10 learnable synthetic classes."""
    return make_synthetic_idx_dir(tmp_path_factory.mktemp("syn"), n_train=240, n_test=60, seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(synthetic_dir: Path):  # type: ignore[no-untyped-def]
    from fmnist_search.data import load_dataset

    return load_dataset(synthetic_dir, download=False, warn=lambda m: None)
