"""Predict: verified, safe-mode loading of an export, image inputs, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from idx_utils import write_idx_images, write_idx_labels
from PIL import Image

from fmnist_search import export as ex
from fmnist_search.cli import main
from fmnist_search.data import FASHION_CLASS_NAMES, Dataset
from fmnist_search.predictor import (
    ExportError,
    ImageError,
    load_export,
    load_images,
    load_model,
    predict,
    verify_export,
)
from searchspace import CnnConfig, ConvBlock, ConvLayer

CFG = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(8, 3),)),), batch_size=32, learning_rate=0.01)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Dataset) -> tuple[Path, Any]:
    """A small trained model written by write_export; returns (dir, model)."""
    from fmnist_search.training import fit_config

    d = tiny_dataset
    res = fit_config(CFG, d.x_train, d.y_train, None, None, epochs=3, seed=0, keep_model=True)
    card = {"study": "t", "trial": 0, "class_names": list(FASHION_CLASS_NAMES)}
    out = ex.write_export(res.model, card, tmp_path_factory.mktemp("pred") / "best_model")
    return out, res.model


def _centred(data: Dataset) -> int:
    """A test image whose item is in the centre (synthetic classes 5 and 6), like a photo's.

    The polarity check compares the border with the centre, so it needs a centred item.
    """
    return int(np.flatnonzero(np.isin(data.y_test, (5, 6)))[0])


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.round(x[..., 0] * 255).astype(np.uint8)


def _only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_predict_cli_on_png_npy_and_idx(
    export_dir: tuple[Path, Any], tiny_dataset: Dataset, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d, model = export_dir
    i = _centred(tiny_dataset)
    imgs = _uint8(tiny_dataset.x_test[[i, *range(5)]])
    # A photo-like input: dark item on a light background, RGB, 2x larger.
    png = tmp_path / "shirt.png"
    big = Image.fromarray(255 - imgs[0]).resize((56, 56), Image.Resampling.NEAREST)
    big.convert("RGB").save(png)
    npy = tmp_path / "three.npy"
    np.save(npy, imgs[1:4])
    idx = tmp_path / "two-idx3-ubyte.gz"
    write_idx_images(idx, imgs[4:6])

    assert main(["predict", "--model", str(d), str(png), str(npy), str(idx),
                 "--top-k", "3", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    preds = doc["predictions"]
    assert [p["input"] for p in preds] == [
        str(png), f"{npy}[0]", f"{npy}[1]", f"{npy}[2]", f"{idx}[0]", f"{idx}[1]"
    ]
    expected = predict(model, imgs)
    for p in preds:
        probs = [c["probability"] for c in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert all(c["class"] == FASHION_CLASS_NAMES[c["index"]] for c in p["top"])
    for p, row in zip(preds[1:], expected[1:], strict=True):  # npy and IDX: exactly the pixels
        assert p["top"][0]["index"] == int(np.argmax(row))
        assert p["top"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-5)
    # The inverted, upscaled PNG comes back as the original image: same prediction.
    assert preds[0]["top"][0]["index"] == int(np.argmax(expected[0]))

    assert main(["predict", "--model", str(d), str(npy), "--top-k", "99"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.count("%") == 10 for line in lines)


def test_load_images_polarity_aspect_and_scaling(tiny_dataset: Dataset, tmp_path: Path) -> None:
    original = _uint8(tiny_dataset.x_test[[_centred(tiny_dataset)]])[0]
    big = Image.fromarray(original).resize((84, 84), Image.Resampling.NEAREST)
    Image.fromarray(255 - np.asarray(big)).convert("RGB").save(tmp_path / "dark_on_light.png")
    big.save(tmp_path / "light_on_dark.jpg", quality=95)
    x, names = load_images([tmp_path / "dark_on_light.png", tmp_path / "light_on_dark.jpg"])
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32 and names[0].endswith(".png")
    for img in x:
        assert np.abs(img[..., 0] - original / 255).mean() < 0.06  # inverted back, not left dark

    # Any size and colour: a wide RGBA with a transparent background keeps its aspect ratio.
    rgba = np.zeros((30, 90, 4), np.uint8)
    rgba[10:20, 10:80] = (20, 20, 20, 255)  # a dark bar on transparent (white) paper
    Image.fromarray(rgba).save(tmp_path / "bar.png")
    (bar,), _ = load_images([tmp_path / "bar.png"])
    assert bar.shape == (28, 28, 1) and 0 <= bar.min() and bar.max() <= 1
    assert bar[14, 14, 0] > 0.5 and bar[2, 14, 0] < 0.1  # light bar, dark padding, centred

    # float (28, 28, 1) in [0, 1], and uint8 (28, 28): the same image.
    np.save(tmp_path / "one.npy", tiny_dataset.x_test[_centred(tiny_dataset)])
    np.save(tmp_path / "u8.npy", original)
    x, names = load_images([tmp_path / "one.npy", tmp_path / "u8.npy"])
    assert names == [str(tmp_path / "one.npy"), str(tmp_path / "u8.npy")]
    np.testing.assert_allclose(x[0], x[1], atol=1 / 255)


def test_16_bit_and_float_pictures_read_as_their_8_bit_copy(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    original = _uint8(tiny_dataset.x_test[[_centred(tiny_dataset)]])[0]
    Image.fromarray(original).save(tmp_path / "u8.png")
    Image.fromarray(original.astype(np.uint16) * 257).save(tmp_path / "u16.png")
    Image.fromarray(original.astype(np.float32) / 255).save(tmp_path / "f32.tiff")
    x, _ = load_images([tmp_path / "u8.png", tmp_path / "u16.png", tmp_path / "f32.tiff"])
    assert Image.open(tmp_path / "u16.png").mode.startswith("I")  # really 16-bit on disk
    np.testing.assert_allclose(x[1], x[0], atol=1 / 255)  # not clipped to white at 255
    np.testing.assert_allclose(x[2], x[0], atol=1 / 255)


def test_predict_accepts_uint8_and_float(
    export_dir: tuple[Path, Any], tiny_dataset: Dataset
) -> None:
    _, model = export_dir
    x = tiny_dataset.x_test[:5]
    p_float = predict(model, x)
    p_u8 = predict(model, _uint8(x))
    assert p_float.shape == (5, 10)
    np.testing.assert_allclose(p_float.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p_float, p_u8, atol=1e-2)
    with pytest.raises(ValueError, match=r"shape \(5, 28, 27\)"):
        predict(model, np.zeros((5, 28, 27), np.uint8))


def test_load_model_and_lazy_reexports(export_dir: tuple[Path, Any], tiny_dataset: Dataset) -> None:
    import fmnist_search

    d, model = export_dir
    loaded, card = load_export(d)
    assert card["class_names"] == list(FASHION_CLASS_NAMES)
    assert fmnist_search.load_model is load_model
    x = tiny_dataset.x_test[:4]
    expected = predict(model, x)
    # The package re-exports the function (the module is fmnist_search.predictor).
    np.testing.assert_allclose(fmnist_search.predict(loaded, x), expected, atol=1e-6)
    np.testing.assert_allclose(predict(fmnist_search.load_model(d), x), expected, atol=1e-6)


def test_flipped_byte_or_missing_file_refused(
    export_dir: tuple[Path, Any], tiny_dataset: Dataset, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = _copy(export_dir[0], tmp_path)
    npy = tmp_path / "x.npy"
    np.save(npy, _uint8(tiny_dataset.x_test[:1]))
    blob = bytearray((d / "model.keras").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (d / "model.keras").write_bytes(bytes(blob))
    with pytest.raises(ExportError, match=r"model\.keras: checksum mismatch"):
        verify_export(d)
    assert main(["predict", "--model", str(d), str(npy)]) == 1
    assert "model.keras: checksum mismatch" in _only_line(capsys.readouterr().err)

    (d / "model.keras").unlink()
    assert main(["predict", "--model", str(d), str(npy)]) == 1
    assert "model.keras: missing" in _only_line(capsys.readouterr().err)

    # Dropping the model's line from SHA256SUMS doesn't skip its check.
    sums = d / "SHA256SUMS"
    sums.write_text("".join(x for x in sums.read_text().splitlines(True) if "model.keras" not in x))
    with pytest.raises(ExportError, match="does not list model.keras"):
        verify_export(d)
    sums.unlink()
    assert main(["predict", "--model", str(d), str(npy)]) == 1
    assert "SHA256SUMS: missing" in _only_line(capsys.readouterr().err)
    assert main(["predict", "--model", str(tmp_path / "nothing"), str(npy)]) == 1
    assert "no such export directory" in _only_line(capsys.readouterr().err)


def test_lambda_layer_refused_by_safe_mode(
    tiny_dataset: Dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import keras

    evil = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Lambda(lambda z: z * 1.0),  # arbitrary Python code in the file
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    d = tmp_path / "evil"
    d.mkdir()
    evil.save(d / "model.keras")
    (d / "model_card.json").write_text(json.dumps({"class_names": list(FASHION_CLASS_NAMES)}))
    ex.write_sums(d)
    verify_export(d)  # the checksums are fine: only safe mode stands in the way
    with pytest.raises(ExportError, match="refused to load in safe mode.*Lambda"):
        load_model(d)
    npy = tmp_path / "x.npy"
    np.save(npy, _uint8(tiny_dataset.x_test[:1]))
    assert main(["predict", "--model", str(d), str(npy)]) == 1
    assert "safe mode" in _only_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("gone.png", None, "no such file"),
        ("fake.png", b"not an image at all", "not an image"),
        ("bad.npy", np.zeros((5, 27, 28), np.uint8), r"shape (5, 27, 28) is not 28x28"),
        ("negative.npy", -np.ones((28, 28), np.float32), "values in [-1, -1]"),
        ("obj.npy", np.array([{"a": 1}], dtype=object), "not a readable .npy"),
        ("labels-idx1-ubyte.gz", "labels", "IDX labels file"),
        ("short-idx3-ubyte", "truncated", "truncated"),
        # A gzip header, then bytes that do not inflate.
        ("broken-idx3-ubyte.gz", b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff" * 40, "corrupt gzip"),
    ],
)
def test_bad_inputs_one_line_exit_1(
    export_dir: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    name: str, content: Any, message: str,
) -> None:
    f = tmp_path / name
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif isinstance(content, np.ndarray):
        np.save(f, content, allow_pickle=True)
    elif content == "labels":
        write_idx_labels(f, np.arange(3))
    elif content == "truncated":
        write_idx_images(f, np.zeros((4, 28, 28), np.uint8), gz=False)
        f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ImageError):
        load_images([f])
    assert main(["predict", "--model", str(export_dir[0]), str(f)]) == 1
    line = _only_line(capsys.readouterr().err)
    assert line.startswith("error: ") and str(f) in line and message in line


def test_predict_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["predict", "x.png"], ["predict", "--model", "m"],
                 ["predict", "--model", "m", "x.png", "--top-k", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "error" in _only_line(capsys.readouterr().err)
