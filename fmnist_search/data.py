"""Locate, validate and load Fashion-MNIST (or any 28x28 IDX data set), and split it.

The loader accepts the four standard IDX files (gzip-compressed or not). Fashion-MNIST is
recognised by the checksums of the decompressed IDX content; other IDX data sets (MNIST,
KMNIST, a user's own) load with a warning. Every problem with the files raises `DataError`,
whose message is a single line naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# MD5 of the .gz files as published in the Fashion-MNIST README.
FASHION_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

# MD5 of the decompressed IDX files (as listed by common loaders, e.g. for "raw" data).
FASHION_IDX_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}

# SHA-256 of the decompressed IDX content, keyed by the .gz file name. We hash the content,
# not the .gz container, because repackagers recompress: Debian's dataset-fashion-mnist .gz
# files differ from the published ones (FASHION_MD5) while their content matches
# FASHION_IDX_MD5 exactly; these digests were computed from that verified content.
FASHION_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IMAGE_SIZE = 28
DEFAULT_MAX_CLASSES = 10
CLASSES_FILE = "classes.txt"

# Installed by the Debian/Ubuntu package dataset-fashion-mnist; a constant so tests can patch it.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FMNIST_DATA_DIR"

_HOW_TO_GET = (
    "apt-get install dataset-fashion-mnist, or pass --data-dir DIR holding the four IDX .gz "
    f"files, or set {ENV_VAR}"
)


class DataError(Exception):
    """Bad, missing or unreadable data; str() is one line meant for the user."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class Dataset:
    """A loaded train/test data set, pixels already scaled to [0, 1].

    Attributes:
        x_train: (N, 28, 28, 1) float32 images in [0, 1].
        y_train: (N,) int32 labels.
        x_test: (M, 28, 28, 1) float32 images in [0, 1].
        y_test: (M,) int32 labels.
        class_names: One name per class; its length is the number of classes.
        source_dir: Resolved directory the files were read from.
        sha256: File name (as in FILES) -> SHA-256 of its decompressed IDX content.
        is_fashion_mnist: True when all four digests equal FASHION_SHA256.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source_dir: str
    sha256: dict[str, str]
    is_fashion_mnist: bool

    @property
    def num_classes(self) -> int:
        """Number of classes (length of class_names)."""
        return len(self.class_names)


# --------------------------------------------------------------------------- locating files


def _keras_dir() -> Path:
    """Return where keras.datasets.fashion_mnist caches its files (honours KERAS_HOME)."""
    base = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    return Path(base).expanduser() / "datasets" / "fashion-mnist"


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """List the directories to search, in priority order.

    Args:
        data_dir: Directory given with --data-dir, if any.

    Returns:
        (label, path) pairs: --data-dir, $FMNIST_DATA_DIR, the Keras cache, the Debian dir.
    """
    found: list[tuple[str, Path]] = []
    if data_dir is not None and str(data_dir) != "":
        found.append(("--data-dir", Path(data_dir).expanduser()))
    env = os.environ.get(ENV_VAR)
    if env:
        found.append((f"${ENV_VAR}", Path(env).expanduser()))
    found.append(("Keras cache", _keras_dir()))
    found.append(("Debian package dataset-fashion-mnist", Path(DEBIAN_DIR)))
    return found


def _locate(directory: Path, filename: str) -> Path | None:
    """Return the file in directory, accepting the .gz name or its decompressed twin."""
    for name in (filename, filename.removesuffix(".gz")):
        path = directory / name
        if path.is_file():
            return path
    return None


def _missing(directory: Path) -> list[str]:
    """Return the FILES names that directory lacks."""
    return [name for name in FILES.values() if _locate(directory, name) is None]


def _download_with_keras() -> None:
    """Let Keras fetch Fashion-MNIST into its cache; raises whatever Keras raises."""
    # Imported lazily: importing keras starts TensorFlow, which is slow and noisy.
    from keras.datasets import fashion_mnist

    fashion_mnist.load_data()


def _one_line(exc: BaseException) -> str:
    """Summarise an exception on one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def find_data_dir(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Find the directory holding the four IDX files.

    Args:
        data_dir: Explicit directory (--data-dir); if given it must hold the files, as must
            $FMNIST_DATA_DIR when set and no --data-dir is given.
        download: Whether to let Keras download Fashion-MNIST when nothing is found.

    Returns:
        The first candidate directory that holds all four files.

    Raises:
        DataError: The explicit directory lacks files, or no data could be found or fetched.
    """
    candidates = candidate_dirs(data_dir)
    label, path = candidates[0]
    if label in ("--data-dir", f"${ENV_VAR}"):
        # An explicit choice (the flag, else the variable) must not be silently replaced by
        # some other data set.
        unset = f" (unset {ENV_VAR} to search the usual places)" if label != "--data-dir" else ""
        if not path.is_dir():
            raise DataError(f"{label} {path}: no such directory{unset}")
        missing = _missing(path)
        if missing:
            raise DataError(
                f"{label} {path} lacks {', '.join(missing)} "
                f"(it needs all four IDX files, gzip-compressed or not){unset}"
            )
        return path

    for _label, path in candidates:
        if path.is_dir() and not _missing(path):
            return path

    failure = ""
    if download:
        try:
            _download_with_keras()
        except Exception as exc:  # any failure (offline, proxy, disk) just means "not found"
            failure = f"; Keras download failed ({_one_line(exc)})"
        # Keras falls back to /tmp/.keras when the home directory is not writable.
        for path in (_keras_dir(), Path("/tmp/.keras/datasets/fashion-mnist")):
            if path.is_dir() and not _missing(path):
                return path
    looked = ", ".join(f"{path} ({label})" for label, path in candidates)
    tried = failure if download else "; download disabled"
    raise DataError(f"Fashion-MNIST not found; looked in {looked}{tried}. To fix: {_HOW_TO_GET}")


# --------------------------------------------------------------------------- reading IDX


def _read_idx_bytes(path: Path) -> bytes:
    """Return the IDX bytes of path, decompressing gzip (detected by content, not name)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or _one_line(exc)})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({_one_line(exc)})") from None


def _format_count(value: float) -> str:
    """Format a possibly fractional item count, truncating to one decimal place."""
    if value == int(value):
        return str(int(value))
    return f"{math.floor(value * 10) / 10:.1f}"


def _parse_idx(data: bytes, path: Path, expect_magic: int) -> np.ndarray:
    """Parse and validate IDX bytes; see read_idx."""
    kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(expect_magic)
    if kind is None:
        raise ValueError(f"expect_magic must be {IMAGES_MAGIC} or {LABELS_MAGIC}")
    ndim = expect_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes; too short to be an IDX file")
    magic = int.from_bytes(data[:4], "big")
    if magic != expect_magic:
        hint = {IMAGES_MAGIC: " (an images file?)", LABELS_MAGIC: " (a labels file?)"}
        raise DataError(
            f"{path}: bad magic number {magic}{hint.get(magic, '')}; "
            f"expected {expect_magic} for IDX {kind}"
        )
    if len(data) < header:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than its IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = dims[0]
    if count == 0:
        raise DataError(f"{path}: header says the file holds no {kind}")
    if kind == "images" and (dims[1], dims[2]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    item = int(np.prod(dims[1:], dtype=np.int64))  # bytes per item; 1 for labels
    payload = len(data) - header
    expected = count * item
    desc = f"{count} images of {dims[1]}x{dims[2]}" if kind == "images" else f"{count} labels"
    if payload < expected:
        held = _format_count(payload / item)
        raise DataError(f"{path}: truncated: header says {desc} but file holds {held}")
    if payload > expected:
        raise DataError(
            f"{path}: {payload - expected} unexpected bytes after the {desc} its header declares"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: Path, *, expect_magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed or not).

    Args:
        path: The file.
        expect_magic: 2051 for images, 2049 for labels.

    Returns:
        uint8 array: (N, 28, 28) for images, (N,) for labels.

    Raises:
        DataError: Unreadable, corrupt gzip, wrong magic, not 28x28, truncated or oversized.
    """
    path = Path(path)
    return _parse_idx(_read_idx_bytes(path), path, expect_magic)


# --------------------------------------------------------------------------- loading


def _default_warn(message: str) -> None:
    """Emit a UserWarning pointing at the caller of load_dataset."""
    warnings.warn(message, UserWarning, stacklevel=3)


def _read_class_names(path: Path) -> tuple[str, ...]:
    """Read one class name per line from classes.txt, ignoring blank lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({_one_line(exc)})") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) < 2:
        raise DataError(f"{path}: needs at least 2 class names, one per line; has {len(names)}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: duplicate class names: {', '.join(dupes)}")
    return names


def _class_names(
    directory: Path, is_fashion: bool, labels: dict[str, np.ndarray], paths: dict[str, Path]
) -> tuple[str, ...]:
    """Choose class names and check every label falls within them."""
    classes_path = directory / CLASSES_FILE
    if classes_path.is_file():
        names = _read_class_names(classes_path)
        limit, source = len(names), f"the {len(names)} names in {classes_path}"
    elif is_fashion:
        names = FASHION_CLASS_NAMES
        limit, source = len(names), "Fashion-MNIST's 10 classes"
    else:
        names = ()
        limit = DEFAULT_MAX_CLASSES
        source = f"0..{limit - 1} (add {CLASSES_FILE}, one name per line, for more classes)"
    for role, y in labels.items():
        top = int(y.max())
        if top >= limit:
            raise DataError(f"{paths[role]}: label {top} out of range; allowed: {source}")
    if not names:
        top = max(int(y.max()) for y in labels.values())
        names = tuple(str(i) for i in range(max(top + 1, 2)))
    return names


def _to_float_images(x: np.ndarray) -> np.ndarray:
    """Convert uint8 (N, 28, 28) to float32 (N, 28, 28, 1) in [0, 1]."""
    out = x.astype(np.float32)
    out /= 255.0  # in place: avoids a second full-size temporary
    return out[..., np.newaxis]


def load_dataset(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Dataset:
    """Find, validate and load the data set.

    Args:
        data_dir: Explicit directory (--data-dir); otherwise the usual places are searched.
        download: Whether to let Keras download Fashion-MNIST when nothing is found.
        warn: Receives a one-line warning when the data are not Fashion-MNIST;
            defaults to warnings.warn.

    Returns:
        The loaded Dataset.

    Raises:
        DataError: Missing, corrupt or inconsistent files.
    """
    directory = find_data_dir(data_dir, download=download)
    paths: dict[str, Path] = {}
    arrays: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    for role, name in FILES.items():
        path = _locate(directory, name)
        if path is None:  # removed between finding and reading
            raise DataError(f"{directory / name}: file not found")
        magic = IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC
        data = _read_idx_bytes(path)
        arrays[role] = _parse_idx(data, path, magic)
        digests[name] = hashlib.sha256(data).hexdigest()
        paths[role] = path

    for split in ("train", "test"):
        n_img = len(arrays[f"{split}_images"])
        n_lab = len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"{paths[f'{split}_labels']}: {n_lab} labels but "
                f"{paths[f'{split}_images'].name} has {n_img} images"
            )

    is_fashion = all(digests[name] == FASHION_SHA256[name] for name in FILES.values())
    if not is_fashion:
        differ = [name for name in FILES.values() if digests[name] != FASHION_SHA256[name]]
        (warn or _default_warn)(
            f"{directory}: checksums are not Fashion-MNIST's ({', '.join(differ)} differ); "
            "loading it as another 28x28 IDX data set"
        )

    labels = {role: arrays[role] for role in ("train_labels", "test_labels")}
    names = _class_names(directory, is_fashion, labels, paths)
    return Dataset(
        x_train=_to_float_images(arrays["train_images"]),
        y_train=arrays["train_labels"].astype(np.int32),
        x_test=_to_float_images(arrays["test_images"]),
        y_test=arrays["test_labels"].astype(np.int32),
        class_names=names,
        source_dir=str(directory.resolve()),
        sha256=digests,
        is_fashion_mnist=is_fashion,
    )


# --------------------------------------------------------------------------- splitting


def _can_stratify(y: np.ndarray, n_a: int, n_b: int) -> bool:
    """Whether sklearn can split y into parts of n_a and n_b items, stratified."""
    _, counts = np.unique(y, return_counts=True)
    return bool(counts.min() >= 2 and min(n_a, n_b) >= len(counts))


def _split_indices(y: np.ndarray, n_first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(len(y)) into sorted parts of n_first and the rest, stratified if possible."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    # Tiny or very unbalanced sets cannot be stratified; a seeded random split still works.
    stratify = y if _can_stratify(y, n_first, len(y) - n_first) else None
    first, second = train_test_split(
        idx, train_size=n_first, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(first), np.sort(second)


def holdout_split(
    y: np.ndarray, val_size: int | float = 10000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into a training part and a stratified validation part.

    Args:
        y: Labels.
        val_size: Validation size, as a count or as a fraction in (0, 1). A count that is
            not smaller than len(y) falls back to one sixth of the data.
        seed: Random seed; the same seed gives the same split.

    Returns:
        (train_idx, val_idx), sorted index arrays.
    """
    y = np.asarray(y)
    n = len(y)
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    if isinstance(val_size, float) and not isinstance(val_size, bool):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"fractional val_size must be in (0, 1), got {val_size}")
        n_val = round(val_size * n)
    else:
        if int(val_size) <= 0:
            raise ValueError(f"val_size must be positive, got {val_size}")
        n_val = int(val_size) if int(val_size) < n else n // 6
    n_val = min(max(n_val, 1), n - 1)
    val_idx, train_idx = _split_indices(y, n_val, seed)
    return train_idx, val_idx


def kfold_splits(y: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled k-fold splits.

    Args:
        y: Labels.
        k: Number of folds (at least 2, at most len(y)).
        seed: Random seed for the shuffle.

    Returns:
        k (train_idx, val_idx) pairs; every index is in exactly one val_idx.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    y = np.asarray(y)
    if k < 2 or k > len(y):
        raise ValueError(f"k must be between 2 and {len(y)} (the number of samples), got {k}")
    _, counts = np.unique(y, return_counts=True)
    # With a class smaller than k, sklearn only warns and stratification is moot: use KFold.
    splitter = (
        StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        if counts.min() >= k
        else KFold(n_splits=k, shuffle=True, random_state=seed)
    )
    return [(train, val) for train, val in splitter.split(np.zeros(len(y)), y)]


def stratified_subset(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Pick n indices keeping class proportions.

    Args:
        y: Labels.
        n: Subset size; n >= len(y) returns all indices.
        seed: Random seed.

    Returns:
        Sorted index array of length min(n, len(y)).
    """
    y = np.asarray(y)
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    if n >= len(y):
        return np.arange(len(y))
    subset, _ = _split_indices(y, n, seed)
    return subset
