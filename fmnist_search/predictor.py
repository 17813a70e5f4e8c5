"""Load an exported model safely and classify images with it.

`load_export` checks every file against SHA256SUMS before Keras opens anything, then loads
model.keras in Keras' safe mode (no Lambda layers or other arbitrary code). `load_images`
turns PNG/JPEG photos, .npy arrays and IDX files into the 28x28 light-on-dark images the
model was trained on. Keras is imported lazily: `run_search.py predict --help` and image
errors answer without TensorFlow.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .export import CARD_FILE, MODEL_FILE, SUMS_FILE, ExportError, sha256_file

if TYPE_CHECKING:
    import keras

__all__ = [
    "ExportError",
    "ImageError",
    "load_card",
    "load_export",
    "load_images",
    "load_model",
    "predict",
    "verify_export",
]

IMAGE_SIZE = 28
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_IDX_IMAGES = (2051).to_bytes(4, "big")
_IDX_LABELS = (2049).to_bytes(4, "big")


class ImageError(Exception):
    """An input that can't be read as 28x28 images; str() is one line naming the file."""


# --------------------------------------------------------------------------- the export


def verify_export(path: str | Path) -> None:
    """Check every file listed in path/SHA256SUMS against its digest.

    model.keras and model_card.json must be listed: dropping a line must not skip a check.

    Raises:
        ExportError: One line naming the directory or file that is missing or differs.
    """
    root = Path(path)
    if not root.is_dir():
        raise ExportError(f"{root}: no such export directory")
    sums = root / SUMS_FILE
    try:
        text = sums.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExportError(f"{sums}: missing; not an export, or an incomplete one") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{sums}: cannot read ({e})") from None
    listed: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUM_LINE.match(line)
        rel = m.group(2) if m else ""
        parts = Path(rel).parts
        if not m or Path(rel).is_absolute() or ".." in parts:
            raise ExportError(f"{sums}: line {n} is not '<sha256>  <relative path>'")
        listed[rel] = m.group(1).lower()
    for required in (MODEL_FILE, CARD_FILE):
        if required not in listed:
            raise ExportError(f"{sums}: does not list {required}; the export was altered")
    for rel, digest in listed.items():
        f = root / rel
        if not f.is_file():
            raise ExportError(f"{f}: missing (listed in {SUMS_FILE})")
        try:
            actual = sha256_file(f)
        except OSError as e:
            raise ExportError(f"{f}: cannot read ({e.strerror or e})") from None
        if actual != digest:
            raise ExportError(f"{f}: checksum mismatch; the export was modified or corrupted")


def load_card(path: str | Path) -> dict[str, Any]:
    """The export's model card (verified first).

    Raises:
        ExportError: Checksums fail or the card is not a JSON object.
    """
    verify_export(path)
    return _read_card(Path(path))


def _read_card(root: Path) -> dict[str, Any]:
    try:
        card = json.loads((root / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{root / CARD_FILE}: not a readable model card ({e})") from None
    if not isinstance(card, dict):
        raise ExportError(f"{root / CARD_FILE}: not a model card (expected a JSON object)")
    return card


def load_export(path: str | Path) -> tuple[keras.Model, dict[str, Any]]:
    """Verify an export directory, then load its model in Keras' safe mode, and its card.

    Raises:
        ExportError: Bad checksums, a missing file, or a model safe mode refuses to load.
    """
    root = Path(path)
    verify_export(root)
    card = _read_card(root)
    import keras

    try:
        model = keras.saving.load_model(root / MODEL_FILE, safe_mode=True)
    except Exception as e:  # Keras raises ValueError/TypeError/OSError...; one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{root / MODEL_FILE}: refused to load in safe mode: {first}") from None
    return model, card


def load_model(path: str | Path) -> keras.Model:
    """The verified, safely loaded model of an export directory (see `load_export`)."""
    return load_export(path)[0]


# --------------------------------------------------------------------------- inference


def _as_model_input(images: np.ndarray, what: str = "images") -> np.ndarray:
    """(N, 28, 28, 1) float32 in [0, 1] from (N, 28, 28[, 1]) or (28, 28[, 1]), uint8 or float."""
    x = np.asarray(images)
    shape = x.shape
    if x.ndim >= 1 and x.shape[-1] == 1 and x.ndim in (3, 4):
        x = x[..., 0]
    if x.ndim == 2:
        x = x[np.newaxis]
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{what}: shape {shape} is not 28x28 images; expected (N, 28, 28) or (28, 28), "
            "optionally with a trailing 1"
        )
    if len(x) == 0:
        raise ValueError(f"{what}: no images (shape {shape})")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{what}: dtype {x.dtype} is not numeric")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{what}: values in [{lo:g}, {hi:g}]; expected 0..255 or 0..1")
    # uint8 pixels, or any values above 1, are 0..255 pixels; the model wants [0, 1].
    if np.asarray(images).dtype == np.uint8 or hi > 1.0:
        x /= 255.0
    return x[..., np.newaxis]


def predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, classes) for images (N, 28, 28[, 1]) of uint8 0..255 or float 0..1.

    Raises:
        ValueError: Wrong shape, non-numeric, non-finite or out-of-range values.
    """
    x = _as_model_input(images)
    return np.asarray(model.predict(x, batch_size=256, verbose=0), dtype=np.float32)


# --------------------------------------------------------------------------- reading inputs


def _from_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)  # a pickle in an .npy could run code
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ImageError(f"{path}: not a readable .npy array ({first})") from None
    try:
        return _as_model_input(arr, what=str(path))
    except ValueError as e:
        raise ImageError(str(e)) from None


def _idx_magic(path: Path) -> bytes:
    """The first 4 bytes of the (possibly gzip-compressed) file."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                return g.read(4)
        except (OSError, EOFError, zlib.error) as e:  # a gzip file, but not a readable one
            raise ImageError(f"{path}: corrupt gzip data ({e})") from None
    return head


def _from_idx(path: Path) -> np.ndarray:
    from .data import IMAGES_MAGIC, DataError, read_idx

    try:
        raw = read_idx(path, expect_magic=IMAGES_MAGIC)
    except DataError as e:
        raise ImageError(str(e)) from None
    return _as_model_input(raw, what=str(path))


def _gray_0_255(im: Any) -> np.ndarray:
    """A Pillow image as grey levels in [0, 255], float32.

    Pillow's `convert("L")` clips 16-bit ("I;16", "I") and float ("F") pixels at 255, which
    turns every non-black pixel of a 16-bit PNG white: those are rescaled instead.
    """
    if im.mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / 257.0
    if im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if top > 255:  # 16-bit values (what 16-bit PNGs open as), or wider: to 0..255
            a = a * (255.0 / (65535.0 if top <= 65535 else top))
        elif im.mode == "F" and top <= 1.0:  # floats in [0, 1]
            a = a * 255.0
        return a.clip(0, 255).astype(np.float32)
    return np.asarray(im.convert("L"), dtype=np.float32)


def _from_picture(path: Path) -> np.ndarray:
    """A photo of any size and colour -> one light-on-dark 28x28 image in [0, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            f.load()
            im: Image.Image = ImageOps.exif_transpose(f)  # phone photos: apply the rotation
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Transparent means background: flatten onto white (paper), then let the
                # polarity check below decide whether to invert.
                rgba = im.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(flat, rgba)
            a = _gray_0_255(im)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can decode, nor .npy or IDX") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ImageError(f"{path}: cannot decode image ({first})") from None
    if a.size == 0:
        raise ImageError(f"{path}: empty image")
    # Pad to a square with the border colour so resizing keeps the item's aspect ratio.
    h, w = a.shape
    side = max(h, w)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    square = np.full((side, side), float(np.median(border)), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = a
    img = Image.fromarray(square.clip(0, 255).astype(np.uint8))  # 2-D uint8: mode "L"
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    small = np.asarray(img, dtype=np.float32)
    # Fashion-MNIST items are light on a dark background: invert photos of dark-on-light.
    ring = np.concatenate([small[:2].ravel(), small[-2:].ravel(), small[2:-2, :2].ravel(),
                           small[2:-2, -2:].ravel()])
    centre = small[7:21, 7:21]
    if ring.mean() > centre.mean():
        small = 255.0 - small
    return (small / 255.0)[np.newaxis, ..., np.newaxis].astype(np.float32)


def load_images(paths: Iterable[str | Path]) -> tuple[np.ndarray, list[str]]:
    """Read images for the model from PNG/JPEG (any size/colour), .npy and IDX files.

    Args:
        paths: Files. A .npy holds (N, 28, 28) or (28, 28) (optionally with a trailing 1),
            uint8 0..255 or float 0..1; an IDX images file may be gzip-compressed.

    Returns:
        (images, names): float32 (N, 28, 28, 1) in [0, 1], light items on dark, and one name
        per image (the path, with [i] for the i-th image of a multi-image file).

    Raises:
        ImageError: One line naming the file: missing, undecodable, or a wrong shape.
    """
    batches: list[np.ndarray] = []
    names: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ImageError(f"{p}: no such file")
        if not p.is_file():
            raise ImageError(f"{p}: not a file")
        try:
            if p.suffix.lower() == ".npy":
                x = _from_npy(p)
            else:
                magic = _idx_magic(p)
                if magic == _IDX_LABELS:
                    raise ImageError(f"{p}: an IDX labels file, not images")
                x = _from_idx(p) if magic == _IDX_IMAGES else _from_picture(p)
        except OSError as e:
            raise ImageError(f"{p}: cannot read ({e.strerror or e})") from None
        batches.append(x)
        names += [str(p)] if len(x) == 1 else [f"{p}[{i}]" for i in range(len(x))]
    if not batches:
        raise ImageError("no input files given")
    return np.concatenate(batches), names


# --------------------------------------------------------------------------- command line


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Parser of `run_search.py predict`."""
    from .cli import Parser, int_at_least

    p = Parser(
        prog=prog,
        description="Classify images with an exported model (checksums verified, Keras safe "
        "mode). Inputs: PNG/JPEG of any size and colour, .npy arrays of 28x28 images, IDX "
        "image files (.gz or raw).",
    )
    p.add_argument("--model", required=True, metavar="DIR",
                   help="export directory, e.g. results/<study>/best_model")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image, .npy or IDX files")
    p.add_argument("--top-k", type=int_at_least(1), default=1,
                   help="classes to show per image (default: 1)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    return p


def _class_names(card: dict[str, Any], n: int) -> list[str]:
    names = card.get("class_names")
    if isinstance(names, list) and len(names) == n and all(isinstance(s, str) for s in names):
        return names
    return [str(i) for i in range(n)]  # a card without matching names: indices still mean something


def top_k(probs: np.ndarray, names: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """The k most probable classes per row, as {class, index, probability}."""
    k = min(k, probs.shape[1])
    out = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        out.append(
            [{"class": names[i], "index": int(i), "probability": float(row[i])} for i in order]
        )
    return out


def run(args: argparse.Namespace) -> int:
    """`run_search.py predict`: returns the exit code; user errors are one line on stderr."""
    from .cli import EXIT_RUNTIME, err, import_tensorflow_quietly

    try:
        verify_export(args.model)  # cheap checks first: no TensorFlow start-up for a typo
        x, names = load_images(args.images)
    except (ExportError, ImageError) as e:
        err(str(e))
        return EXIT_RUNTIME
    import_tensorflow_quietly()
    try:
        model, card = load_export(args.model)
        probs = predict(model, x)
    except ExportError as e:
        err(str(e))
        return EXIT_RUNTIME
    except ValueError as e:  # a model whose input isn't 28x28x1
        err(f"{args.model}: cannot run the model on 28x28 images ({str(e).splitlines()[0]})")
        return EXIT_RUNTIME
    classes = _class_names(card, probs.shape[1])
    tops = top_k(probs, classes, args.top_k)
    if args.format == "json":
        doc = {
            "model": str(args.model),
            "study": card.get("study"),
            "trial": card.get("trial"),
            "predictions": [{"input": n, "top": t} for n, t in zip(names, tops, strict=True)],
        }
        print(json.dumps(doc, indent=2))
        return 0
    width = max(len(n) for n in names)
    for n, t in zip(names, tops, strict=True):
        shown = ", ".join(f"{c['class']} {_pct(c['probability'])}" for c in t)
        print(f"{n:<{width}}  {shown}")
    return 0


def _pct(p: float) -> str:
    return "nan" if not math.isfinite(p) else f"{100 * p:.1f}%"
