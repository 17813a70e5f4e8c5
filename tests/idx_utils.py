"""Helpers for tests: write IDX files and small synthetic, learnable IDX data sets."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
# Each class lights one 7x7 cell of a 4x4 grid, so at most 16 distinct classes.
_CELL = 7
_GRID = 4
MAX_SYNTHETIC_CLASSES = _GRID * _GRID


def _write(path: str | os.PathLike[str], data: bytes, gz: bool) -> Path:
    """Write bytes, gzip-compressed with a fixed mtime so the output is reproducible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_idx_images(path: str | os.PathLike[str], images: np.ndarray, gz: bool = True) -> Path:
    """Write uint8 images of shape (N, rows, cols) as an IDX3 file.

    Args:
        path: Destination file.
        images: uint8 array (N, rows, cols), usually (N, 28, 28).
        gz: Gzip-compress the file.

    Returns:
        The path written.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, rows, cols), got {images.dtype} {images.shape}")
    n, rows, cols = images.shape
    header = b"".join(v.to_bytes(4, "big") for v in (IMAGES_MAGIC, n, rows, cols))
    return _write(path, header + images.tobytes(), gz)


def write_idx_labels(path: str | os.PathLike[str], labels: np.ndarray, gz: bool = True) -> Path:
    """Write uint8 labels of shape (N,) as an IDX1 file.

    Args:
        path: Destination file.
        labels: Integer labels in 0..255, shape (N,).
        gz: Gzip-compress the file.

    Returns:
        The path written.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError("labels must be a 1-D array of values in 0..255")
    header = b"".join(v.to_bytes(4, "big") for v in (LABELS_MAGIC, len(labels)))
    return _write(path, header + labels.astype(np.uint8).tobytes(), gz)


def make_synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one noisy 28x28 image per label: a bright square in a class-specific cell.

    Args:
        labels: Class of each image (0..15).
        rng: Random generator.

    Returns:
        uint8 array (N, 28, 28).
    """
    n = len(labels)
    images = rng.integers(0, 50, size=(n, 28, 28))  # dim background noise
    for i, label in enumerate(labels):
        row, col = divmod(int(label), _GRID)
        # A 5x5 square jittered inside its 7x7 cell: learnable, but not pixel-identical.
        dr, dc = rng.integers(0, _CELL - 5 + 1, size=2)
        top, left = row * _CELL + dr, col * _CELL + dc
        images[i, top : top + 5, left : left + 5] = rng.integers(180, 256)
    return images.astype(np.uint8)


def make_synthetic_idx_dir(
    directory: str | os.PathLike[str],
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    num_classes: int = 10,
) -> Path:
    """Write the four Fashion-MNIST-named IDX .gz files with a synthetic, learnable data set.

    Labels are balanced (every class appears once before any repeats) and shuffled.

    Args:
        directory: Destination directory (created if needed).
        n_train: Number of training images.
        n_test: Number of test images.
        seed: Random seed; the same seed writes identical files.
        num_classes: Number of classes, 2..16.

    Returns:
        The directory as a Path.
    """
    if not 2 <= num_classes <= MAX_SYNTHETIC_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_SYNTHETIC_CLASSES}, got {num_classes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.uint8)
        images = make_synthetic_images(labels, rng)
        write_idx_images(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory
