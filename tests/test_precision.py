"""The training precision: chosen from the CPU's flags, kept across cleared sessions,
recorded per trial and in the model card, and never exported (models ship in float32)."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from fmnist_search import precision
from fmnist_search.cli import main
from fmnist_search.model import build_cnn
from searchspace.config import CnnConfig, ConvBlock, ConvLayer, DenseLayer

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
flags\t\t: fpu sse2
"""

CFG = CnnConfig(
    blocks=(ConvBlock(convs=(ConvLayer(8, batch_norm=True),), pool="max", dropout=0.1),),
    dense=(DenseLayer(16, batch_norm=True),),
)


def test_cpu_flags_are_the_first_processors() -> None:
    flags = precision.cpu_flags(CPUINFO)
    assert "amx_bf16" in flags and "avx2" in flags
    assert precision.cpu_flags("processor : 0\n") == frozenset()


def test_auto_is_bfloat16_only_with_amx_under_tensorflow() -> None:
    amx = precision.cpu_flags(CPUINFO)
    assert precision.resolve("auto", amx) == "bfloat16"
    # avx512_bf16 without AMX tiles: not measured faster, so float32.
    assert precision.resolve("auto", frozenset({"avx512_bf16", "avx2"})) == "float32"
    assert precision.resolve("auto", amx, backend="jax") == "float32"
    assert precision.resolve("float32", amx) == "float32"
    assert precision.resolve("bfloat16", frozenset()) == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        precision.resolve("fp16")


def test_bfloat16_builds_mixed_layers_with_a_float32_output_even_after_clear_session() -> None:
    assert precision.use("bfloat16") == "bfloat16"
    for _ in range(2):  # the second build follows a cleared session, which resets Keras'
        # policy to float32: the layers' own policies show that `ensure` set it again
        model = build_cnn(CFG)
        policies = [layer.dtype_policy.name for layer in model.layers]
        assert policies[0] == "mixed_bfloat16"
        assert policies[-1] == "float32"  # the softmax
        assert all(w.dtype == "float32" for w in model.weights)
        keras.backend.clear_session()
    assert precision.current() == "bfloat16"
    precision.use("float32")
    assert {layer.dtype_policy.name for layer in build_cnn(CFG).layers} == {"float32"}
    assert precision.current() == "float32"


def test_as_float32_copies_the_weights_into_float32_layers() -> None:
    precision.use("bfloat16")
    model = build_cnn(CFG)
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    model.fit(x, np.arange(64) % 10, epochs=1, verbose=0)
    copy = precision.as_float32(model)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    _float32_throughout(copy)
    for a, b in zip(model.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    p_mixed = model.predict(x, verbose=0)
    p_copy = copy.predict(x, verbose=0)
    assert p_copy.dtype == np.float32
    np.testing.assert_allclose(p_mixed, p_copy, atol=0.02)  # bfloat16 keeps ~3 digits
    precision.use("float32")
    plain = build_cnn(CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(8),)),)))
    assert precision.as_float32(plain) is plain  # float32 and built-in layers only


def test_search_and_export_record_bfloat16_and_ship_float32(
    tmp_path: Path, synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna

    from fmnist_search import study as st

    code = main(["--trials", "3", "--epochs", "1", "--precision", "bfloat16", "--pruner",
                 "none", "--no-progress", "--final-epochs", "1", "--ensemble", "2",
                 "--results-dir", str(tmp_path), "--data-dir", str(synthetic_dir)])
    assert code == 0, capsys.readouterr().err
    assert "bfloat16 arithmetic" in capsys.readouterr().err
    study = optuna.load_study(study_name="fmnist", storage=st.default_storage(tmp_path, "fmnist"))
    # Every trial, not only the first: the session cleared after each one resets the policy.
    assert [t.user_attrs.get("precision") for t in study.trials] == ["bfloat16"] * 3
    out = tmp_path / "fmnist" / "best_model"
    card = json.loads((out / "model_card.json").read_text())
    assert card["train_precision"] == "bfloat16"
    _float32_throughout(_load(out / "model.keras"))
    # The export's other path, a retrain on the trial's own split, ships float32 too.
    assert main(["export", "--no-final-fit", "--precision", "bfloat16", "--no-progress",
                 "--results-dir", str(tmp_path), "--data-dir", str(synthetic_dir)]) == 0
    _float32_throughout(_load(out / "model.keras"))


def _load(path: Path) -> keras.Model:
    """Load as a user's fresh process does: this one chose bfloat16, and Keras gives a loaded
    Sequential (the ensemble's member wrappers) the global policy, not the saved one."""
    with precision.float32_policy():
        return keras.models.load_model(path)


def _float32_throughout(model: keras.Model) -> None:
    """No layer at any depth, nor any input, computes or rounds in bfloat16."""
    assert "bfloat16" not in json.dumps(model.get_config())
    x = np.zeros((2, 28, 28, 1), dtype=np.float32)
    assert model.predict(x, verbose=0).dtype == np.float32


def test_a_wrong_precision_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ([], ["baselines"], ["export"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--precision", "fp16", "--results-dir", str(tmp_path / "r")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "invalid choice: 'fp16'" in err[0]
    assert not (tmp_path / "r").exists()


def test_latency_is_measured_on_the_float32_model_that_ships(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fmnist_search import multiobjective

    seen: list[set[str]] = []

    def measure(model: keras.Model, *args: object) -> dict[str, float]:
        seen.append({layer.dtype_policy.name for layer in model.layers})
        return {"latency_ms_b1": 1.0}

    monkeypatch.setattr(multiobjective, "measure_latency", measure)
    precision.use("bfloat16")
    assert multiobjective.config_latency(CFG) == {"latency_ms_b1": 1.0}
    assert seen == [{"float32"}]
