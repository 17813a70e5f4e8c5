"""Tests for fmnist_search.data: finding, validating, loading and splitting IDX data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

# pytest puts tests/ (no __init__.py) on sys.path, so sibling helpers import directly.
from idx_utils import make_synthetic_idx_dir, write_idx_images, write_idx_labels

from fmnist_search import data
from fmnist_search.data import (
    FASHION_CLASS_NAMES,
    FILES,
    DataError,
    find_data_dir,
    holdout_split,
    kfold_splits,
    load_dataset,
    read_idx,
    stratified_subset,
)


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests away from the real HOME, $FMNIST_DATA_DIR, $KERAS_HOME and the network."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)

    def no_download() -> None:
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(data, "_download_with_keras", no_download)


def _synthetic(tmp_path: Path, **kwargs: int) -> Path:
    """Write a synthetic IDX set under tmp_path/syn and return its directory."""
    return make_synthetic_idx_dir(tmp_path / "syn", **kwargs)


def _load_quiet(directory: Path) -> data.Dataset:
    """Load a non-Fashion directory, swallowing the expected checksum warning."""
    return load_dataset(directory, download=False, warn=lambda _msg: None)


def _error(directory: Path) -> str:
    """Load directory expecting DataError; return its message, checked to be one line."""
    with pytest.raises(DataError) as info:
        _load_quiet(directory)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- loading


def test_load_synthetic_warns_and_scales(tmp_path: Path) -> None:
    """A non-Fashion IDX set loads with a warning, right shapes, dtypes and scaling."""
    directory = _synthetic(tmp_path)
    with pytest.warns(UserWarning, match="not Fashion-MNIST's"):
        ds = load_dataset(directory, download=False)
    assert ds.x_train.shape == (64, 28, 28, 1) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (32, 28, 28, 1) and ds.x_test.dtype == np.float32
    assert ds.y_train.shape == (64,) and ds.y_train.dtype == np.int32
    assert ds.y_test.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.x_train.max() > 0.5  # scaled once, not twice
    assert ds.class_names == tuple(str(i) for i in range(10))
    assert ds.num_classes == 10
    assert not ds.is_fashion_mnist
    assert ds.source_dir == str(directory.resolve())
    assert set(ds.sha256) == set(FILES.values())


def test_warn_callback_receives_one_line(tmp_path: Path) -> None:
    """The warn callback gets exactly one single-line message."""
    messages: list[str] = []
    load_dataset(_synthetic(tmp_path), download=False, warn=messages.append)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "checksums are not Fashion-MNIST's" in messages[0]


def test_uncompressed_files_and_classes_txt(tmp_path: Path) -> None:
    """Uncompressed IDX files load and classes.txt supplies the names."""
    directory = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx_images(directory / f"{prefix}-images-idx3-ubyte", images, gz=False)
        write_idx_labels(directory / f"{prefix}-labels-idx1-ubyte", labels, gz=False)
    (directory / "classes.txt").write_text("cat\ndog\nbird\n\n")
    ds = _load_quiet(directory)
    assert ds.class_names == ("cat", "dog", "bird")
    assert ds.num_classes == 3


def test_few_classes_get_numeric_names(tmp_path: Path) -> None:
    """Without classes.txt, names are '0'..str(max label)."""
    ds = _load_quiet(_synthetic(tmp_path, num_classes=2))
    assert ds.class_names == ("0", "1")


def test_truncated_images(tmp_path: Path) -> None:
    """A short image payload is reported with the fractional count it holds."""
    directory = _synthetic(tmp_path)
    path = directory / FILES["train_images"]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-550]))  # 550 of 784 bytes: 63.2 images remain
    message = _error(directory)
    assert FILES["train_images"] in message
    assert "truncated: header says 64 images of 28x28 but file holds 63.2" in message


def test_wrong_magic(tmp_path: Path) -> None:
    """A labels file in place of an images file fails on the magic number."""
    directory = _synthetic(tmp_path)
    # A labels file where the images should be: the magic number tells them apart.
    labels = directory / FILES["train_labels"]
    (directory / FILES["train_images"]).write_bytes(labels.read_bytes())
    message = _error(directory)
    assert FILES["train_images"] in message
    assert "bad magic number 2049" in message and "expected 2051" in message


def test_read_idx_checks_image_size(tmp_path: Path) -> None:
    """Images other than 28x28 are rejected."""
    path = write_idx_images(tmp_path / "img.gz", np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match="images are 32x32, expected 28x28"):
        read_idx(path, expect_magic=2051)


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    """Bytes beyond what the header declares are rejected."""
    path = write_idx_labels(tmp_path / "lab", np.arange(5), gz=False)
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DataError, match="2 unexpected bytes"):
        read_idx(path, expect_magic=2049)


def test_label_count_mismatch(tmp_path: Path) -> None:
    """Images and labels of one split must have equal counts."""
    directory = _synthetic(tmp_path)
    write_idx_labels(directory / FILES["train_labels"], np.arange(60) % 10)
    message = _error(directory)
    assert f"{FILES['train_labels']}: 60 labels but {FILES['train_images']} has 64 images" in (
        message
    )


def test_label_out_of_range(tmp_path: Path) -> None:
    """Without classes.txt, labels above 9 are rejected."""
    directory = _synthetic(tmp_path)
    labels = np.arange(32) % 10
    labels[5] = 12
    write_idx_labels(directory / FILES["test_labels"], labels)
    message = _error(directory)
    assert FILES["test_labels"] in message and "label 12 out of range" in message


def test_label_beyond_classes_txt(tmp_path: Path) -> None:
    """Labels must index into the names of classes.txt."""
    directory = _synthetic(tmp_path)
    (directory / "classes.txt").write_text("a\nb\nc\n")
    message = _error(directory)
    assert "out of range" in message and "classes.txt" in message


def test_corrupt_gzip(tmp_path: Path) -> None:
    """Damaged deflate data is reported as corrupt gzip."""
    directory = _synthetic(tmp_path)
    path = directory / FILES["test_images"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
    message = _error(directory)
    assert FILES["test_images"] in message and "corrupt gzip" in message


def test_cut_off_gzip(tmp_path: Path) -> None:
    """A gzip stream cut short is reported as corrupt gzip."""
    directory = _synthetic(tmp_path)
    path = directory / FILES["test_labels"]
    path.write_bytes(path.read_bytes()[:-12])
    message = _error(directory)
    assert FILES["test_labels"] in message and "corrupt gzip" in message


# --------------------------------------------------------------------------- finding


def test_explicit_dir_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit --data-dir lacking files fails, listing them."""
    directory = _synthetic(tmp_path)
    (directory / FILES["test_images"]).unlink()
    (directory / FILES["test_labels"]).unlink()
    # Even with valid data elsewhere, an explicit --data-dir must not silently fall back.
    monkeypatch.setenv("FMNIST_DATA_DIR", str(make_synthetic_idx_dir(tmp_path / "other")))
    with pytest.raises(DataError) as info:
        find_data_dir(directory)
    message = str(info.value)
    assert str(directory) in message
    assert FILES["test_images"] in message and FILES["test_labels"] in message
    assert FILES["train_images"] not in message


def test_explicit_dir_does_not_exist(tmp_path: Path) -> None:
    """A nonexistent --data-dir fails clearly."""
    with pytest.raises(DataError, match="no such directory"):
        find_data_dir(tmp_path / "nope")


def test_nothing_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no data anywhere, the error lists every place searched and the fix."""
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(DataError) as info:
        load_dataset(download=False)
    message = str(info.value)
    assert "\n" not in message
    for where in (tmp_path / "home" / ".keras", tmp_path / "debian"):
        assert str(where) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_env_dir_is_an_explicit_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$FMNIST_DATA_DIR lacking files fails like --data-dir: the Debian data are not used."""
    monkeypatch.setattr(data, "DEBIAN_DIR", make_synthetic_idx_dir(tmp_path / "debian"))
    mine = _synthetic(tmp_path)
    (mine / FILES["test_labels"]).rename(mine / "labels-misnamed.gz")
    monkeypatch.setenv("FMNIST_DATA_DIR", str(mine))
    with pytest.raises(DataError, match=r"\$FMNIST_DATA_DIR .* lacks .*unset FMNIST_DATA_DIR"):
        find_data_dir(download=False)
    monkeypatch.setenv("FMNIST_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no such directory"):
        find_data_dir(download=False)
    assert find_data_dir(mine.parent / "debian", download=False) == tmp_path / "debian"


def test_download_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed Keras download is mentioned in the error."""
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(DataError, match="Keras download failed .*network disabled"):
        find_data_dir(download=True)


def test_download_success_uses_keras_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a Keras download the Keras cache directory is used."""
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    cache = tmp_path / "home" / ".keras" / "datasets" / "fashion-mnist"
    monkeypatch.setattr(data, "_download_with_keras", lambda: make_synthetic_idx_dir(cache))
    assert find_data_dir() == cache


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$FMNIST_DATA_DIR beats the Debian dir; --data-dir comes first."""
    env_dir = make_synthetic_idx_dir(tmp_path / "env")
    debian = make_synthetic_idx_dir(tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    assert find_data_dir(download=False) == debian
    monkeypatch.setenv("FMNIST_DATA_DIR", str(env_dir))
    assert find_data_dir(download=False) == env_dir
    labels = [label for label, _ in data.candidate_dirs(tmp_path)]
    assert labels[0] == "--data-dir" and labels[1] == "$FMNIST_DATA_DIR" and len(labels) == 4


def test_real_fashion_mnist() -> None:
    """The Debian package's files are recognised as Fashion-MNIST."""
    # CI installs dataset-fashion-mnist, so a missing directory is a failure, not a skip.
    assert data.DEBIAN_DIR.is_dir(), f"{data.DEBIAN_DIR} missing: apt-get install it"
    messages: list[str] = []
    ds = load_dataset(data.DEBIAN_DIR, download=False, warn=messages.append)
    assert messages == []
    assert ds.is_fashion_mnist
    assert ds.class_names == FASHION_CLASS_NAMES and ds.num_classes == 10
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0


# --------------------------------------------------------------------------- splitting


def _labels(n: int = 600, classes: int = 10, seed: int = 1) -> np.ndarray:
    """Balanced, shuffled labels."""
    return np.random.default_rng(seed).permutation(np.arange(n) % classes)


def test_holdout_stratified_and_reproducible() -> None:
    """Holdout is stratified, seeded and seed-dependent."""
    y = _labels()
    train, val = holdout_split(y, val_size=100, seed=0)
    assert len(val) == 100 and len(train) == 500
    assert np.intersect1d(train, val).size == 0
    assert np.bincount(y[val]).tolist() == [10] * 10
    again_train, again_val = holdout_split(y, val_size=100, seed=0)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    _, other_val = holdout_split(y, val_size=100, seed=1)
    assert not np.array_equal(val, other_val)


def test_holdout_fraction_and_clamping() -> None:
    """Fractional sizes work and oversized counts are clamped."""
    y = _labels()
    _, val = holdout_split(y, val_size=0.2)
    assert len(val) == 120
    tiny = _labels(64)
    train, val = holdout_split(tiny, val_size=10000)  # too big: one sixth instead
    assert len(val) == 10 and len(train) == 54
    train, val = holdout_split(_labels(12), val_size=3)  # too few to stratify: still splits
    assert len(val) == 3 and len(train) == 9


def test_kfold_covers_every_index_once() -> None:
    """Folds partition the indices and are stratified and seeded."""
    y = _labels(100)
    folds = kfold_splits(y, k=5, seed=3)
    assert len(folds) == 5
    val_all = np.concatenate([val for _, val in folds])
    assert np.array_equal(np.sort(val_all), np.arange(100))
    for train, val in folds:
        assert np.intersect1d(train, val).size == 0 and len(train) + len(val) == 100
        assert np.bincount(y[val], minlength=10).tolist() == [2] * 10
    assert all(
        np.array_equal(a[1], b[1]) for a, b in zip(folds, kfold_splits(y, 5, seed=3), strict=True)
    )


def test_kfold_tiny_set() -> None:
    """k-fold still works when classes are smaller than k."""
    folds = kfold_splits(_labels(12), k=3)  # 1-2 per class: falls back to plain KFold
    assert np.array_equal(np.sort(np.concatenate([v for _, v in folds])), np.arange(12))


def test_stratified_subset_sizes() -> None:
    """Subsets have the requested size, proportions and order."""
    y = _labels()
    sub = stratified_subset(y, 200, seed=0)
    assert len(sub) == 200 and np.array_equal(sub, np.sort(sub))
    assert np.bincount(y[sub]).tolist() == [20] * 10
    assert np.array_equal(sub, stratified_subset(y, 200, seed=0))
    assert np.array_equal(stratified_subset(y, 600), np.arange(600))
    assert np.array_equal(stratified_subset(y, 10**6), np.arange(600))
    assert len(stratified_subset(_labels(64), 5)) == 5  # fewer than the classes: still works
