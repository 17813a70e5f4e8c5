"""fmnist-search: CNN architecture and hyperparameter search for 28x28 grayscale images."""

from __future__ import annotations

import os
from typing import Any

# TensorFlow's C++ start-up chatter would bury the progress display; users can override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from . import allocator as _allocator  # noqa: E402  (before TensorFlow starts: see the module)

_allocator.configure()

__version__ = "0.1.0"

_LAZY = {
    "build_cnn": "fmnist_search.model",
    "load_dataset": "fmnist_search.data",
    "leaderboard": "fmnist_search.leaderboard",
    "load_model": "fmnist_search.predictor",
    "predict": "fmnist_search.predictor",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    # Lazy, so `run_search.py --help` and argument errors answer without loading TensorFlow.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
