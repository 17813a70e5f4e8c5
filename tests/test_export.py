"""Export: final fit, one test evaluation, model card, checksums, atomic replace, the CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pytest
from idx_utils import make_synthetic_idx_dir
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from fmnist_search import export as ex
from fmnist_search import study as st
from fmnist_search.cli import main
from fmnist_search.data import Dataset
from fmnist_search.objective import Objective, SearchProtocol, make_folds
from fmnist_search.training import CollapsedError
from searchspace import space_from_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAME = "syn"
SPACE = space_from_dict(
    {"n_blocks": [1, 1], "filters": [8], "dense_layers": [0, 0], "batch_size": [32],
     "optimizer": ["adam"], "learning_rate": {"low": 0.003, "high": 0.01, "log": True}}
)
PROTOCOL = SearchProtocol(epochs=2, seed=0)
CARD_KEYS = {
    "test_accuracy", "val_accuracy", "val_accuracy_std", "params", "config", "architecture",
    "study", "trial", "seed", "command_line", "protocol", "final_fit", "final_epochs",
    "train_time_s", "per_class", "confusion_matrix", "class_names", "data_sha256",
    "library_versions", "baselines", "exported_at",
}


def _protocol_attr(data: Dataset) -> dict[str, Any]:
    # What cmd_search stores in the study.
    return {
        **PROTOCOL.to_dict(),
        "space": SPACE.to_dict(),
        "data_sha256": dict(sorted(data.sha256.items())),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
    }


def _open(results: Path, name: str, data: Dataset) -> optuna.Study:
    return st.open_study(
        st.default_storage(results, name), name, optuna.samplers.RandomSampler(seed=0),
        optuna.pruners.NopPruner(), _protocol_attr(data),
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Dataset) -> tuple[Path, Any]:
    """results/syn/study.db with one complete trial (0) and one pruned trial (1)."""
    results = tmp_path_factory.mktemp("export") / "results"
    study = _open(results, NAME, tiny_dataset)
    study.optimize(Objective(make_folds(tiny_dataset, PROTOCOL), SPACE, PROTOCOL), n_trials=1)
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.PRUNED, params={"lr": 0.01},
            distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
            user_attrs={"config": study.trials[0].user_attrs["config"]},
        )
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    return results, study


@pytest.fixture(scope="module")
def exported(searched: tuple[Path, Any], tiny_dataset: Dataset) -> tuple[Path, Any, Any]:
    """export_study with a 1-epoch final fit; returns (dir, in-process model, study)."""
    results, study = searched
    captured: dict[str, Any] = {}
    real_write = ex.write_export

    def capture(model: Any, card: dict[str, Any], out_dir: Path) -> Path:
        captured["model"] = model
        return real_write(model, card, out_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "write_export", capture)
        out = ex.export_study(study, tiny_dataset, results / "a" / "best_model", final_epochs=1,
                              command_line=["test"])
    return out, captured["model"], study


def _sha256sum_ok(d: Path) -> None:
    r = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=d, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_default_final_epochs_rule() -> None:
    def trial(best: int) -> Any:
        return optuna.trial.create_trial(value=0.9, user_attrs={"best_epoch": best})

    # Holdout 50k of 60k: x1.2; peaked before the end, no extension.
    assert ex.default_final_epochs(trial(5), 10, 50_000, 60_000)[0] == 6
    # Peaked at the last epoch: x2 more.
    n, why = ex.default_final_epochs(trial(3), 3, 50_000, 60_000)
    assert n == 8 and "still improving" in why
    # The default search (10,000 images, 3 epochs) still improving: 3 x 3 x 2.
    assert ex.default_final_epochs(trial(3), 3, 10_000, 60_000)[0] == 18
    assert ex.default_final_epochs(trial(2), 3, 10_000, 60_000)[0] == 6
    # A tiny --train-subset search: the data ratio is capped at 3, not x60.
    assert ex.default_final_epochs(trial(4), 10, 1_000, 60_000)[0] == 12
    # No best_epoch stored: taken from the mean validation curve.
    hist = json.dumps([{"val_accuracy": [0.5, 0.7, 0.6]}, {"val_accuracy": [0.5, 0.8, 0.7]}])
    t = optuna.trial.create_trial(value=0.9, user_attrs={"history": hist})
    assert ex.default_final_epochs(t, 3, 60_000, 60_000)[0] == 2


def test_final_epochs_time_budget() -> None:
    # 30 s for 3 epochs on 10,000 images: about 60 s per epoch on 60,000.
    t = optuna.trial.create_trial(
        value=0.9, user_attrs={"best_epoch": 3, "wall_time": 30.0, "epochs_run": 3})
    assert ex.estimated_epoch_seconds(t, 10_000, 60_000) == pytest.approx(60.0)
    full, _ = ex.default_final_epochs(t, 3, 10_000, 60_000)
    assert full == 18  # no budget: the epoch rule alone
    n, why = ex.default_final_epochs(t, 3, 10_000, 60_000, budget_s=5 * 60)
    assert n == 5 and "5 min budget" in why and "60 s per epoch" in why
    assert ex.default_final_epochs(t, 3, 10_000, 60_000, budget_s=3600)[0] == full
    assert ex.default_final_epochs(t, 3, 10_000, 60_000, budget_s=1)[0] == 1  # at least one
    # A speed measured before the fit (30 s per epoch) replaces the trial's estimate.
    n, why = ex.default_final_epochs(t, 3, 10_000, 60_000, budget_s=5 * 60, epoch_s=30.0)
    assert n == 10 and "30 s per epoch (measured on a few batches before the fit)" in why
    # No speed recorded (an old study, a KerasTuner trial): the budget can't apply.
    bare = optuna.trial.create_trial(value=0.9, user_attrs={"best_epoch": 3})
    assert ex.estimated_epoch_seconds(bare, 10_000, 60_000) is None
    assert ex.default_final_epochs(bare, 3, 10_000, 60_000, budget_s=60)[0] == full


def test_speed_probe_scales_timed_batches_to_an_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from fmnist_search import training
    from searchspace import CnnConfig, ConvBlock, ConvLayer

    cfg = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),), pool="max"),), batch_size=32)
    rng = np.random.default_rng(0)
    x = rng.random((960, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 960)
    # A clock that advances 1 s per reading, read once per batch: 1 s per batch, 30 batches.
    ticks = iter(range(100))
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert training.measure_epoch_seconds(cfg, x, y) == pytest.approx(30.0)
    ticks = iter(range(0, 1000, 2))  # 2 s per batch; only the batches after the warm-up count
    assert training.measure_epoch_seconds(cfg, x, y, warmup=10) == pytest.approx(60.0)
    monkeypatch.undo()
    real = training.measure_epoch_seconds(cfg, x[:40], y[:40])  # fewer images than 2 batches
    assert 0 < real < 60
    assert 0 < training.measure_epoch_seconds(cfg, x[:40], y[:40], augment=True) < 60
    assert 0 < training.measure_epoch_seconds(cfg, x[:20], y[:20]) < 60  # a single batch


def test_final_fit_budget_uses_the_probe_and_keeps_the_seeded_weights(
    searched: tuple[Path, Any], tiny_dataset: Dataset, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, study = searched
    from fmnist_search import training

    probed: list[Any] = []
    real_probe = training.measure_epoch_seconds

    def probe(*a: Any, **k: Any) -> float:
        probed.append(a[0])
        return real_probe(*a, **k)

    monkeypatch.setattr(training, "measure_epoch_seconds", probe)  # export imports it per call
    big = ex.export_study(study, tiny_dataset, tmp_path / "a", final_minutes=60.0,
                          ensemble=1, command_line=["test"])
    assert len(probed) == 1
    none = ex.export_study(study, tiny_dataset, tmp_path / "b", final_minutes=None,
                           ensemble=1, command_line=["test"])
    assert len(probed) == 1  # no budget, no probe
    cards = [json.loads((d / "model_card.json").read_text()) for d in (big, none)]
    assert cards[0]["final_epochs"] == cards[1]["final_epochs"]
    # The probe's throwaway model leaves the seeded fit as it was: the same test predictions.
    assert cards[0]["test_accuracy"] == cards[1]["test_accuracy"]
    assert cards[0]["confusion_matrix"] == cards[1]["confusion_matrix"]
    # A budget too small for the rule's epochs: cut to one, and the card says why.
    tiny = ex.export_study(study, tiny_dataset, tmp_path / "c", final_minutes=1e-6,
                           ensemble=1, command_line=["test"])
    card = json.loads((tiny / "model_card.json").read_text())
    assert card["final_epochs"] == 1
    assert "measured on a few batches before the fit" in card["final_epochs_rule"]
    # A probe far too optimistic plans the rule's epochs; the fit, slower than that, is cut
    # to what its share allows, and the card says so.
    monkeypatch.setattr(training, "measure_epoch_seconds", lambda *a, **k: 1e-9)
    started: list[tuple[int, int]] = []
    sink = SimpleNamespace(
        trial_started=lambda *a: None, batch_done=lambda *a: None, epoch_done=lambda *a: None,
        epoch_started=lambda number, step, total: started.append((step, total)),
    )
    cut = ex.export_study(study, tiny_dataset, tmp_path / "d", final_minutes=1e-6,
                          ensemble=1, command_line=["test"], progress=sink)
    card = json.loads((cut / "model_card.json").read_text())
    assert cards[0]["final_epochs"] > 1 and card["final_epochs"] == 1
    assert "cut to 1 during the fit" in card["final_epochs_rule"]
    # The progress display never announces an epoch the cut plan dropped.
    assert started == [(1, cards[0]["final_epochs"])]


def test_export_round_trip(exported: tuple[Path, Any, Any], tiny_dataset: Dataset,
                           tmp_path: Path) -> None:
    out, model, study = exported
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"model.keras", "model_card.json", "SHA256SUMS", "saved_model/saved_model.pb"} <= {
        *names
    }
    assert sorted(p.name for p in out.parent.iterdir()) == ["best_model"]  # no temporaries left
    _sha256sum_ok(out)

    card = json.loads((out / "model_card.json").read_text())
    assert CARD_KEYS <= set(card)
    trial = study.trials[0]
    assert card["trial"] == 0 and card["study"] == NAME and card["final_fit"] is True
    assert card["final_epochs"] == 1 and card["train_images"] == 240
    assert card["val_accuracy"] == pytest.approx(trial.value)
    assert card["config"] == json.loads(trial.user_attrs["config"])
    assert card["params"] == trial.user_attrs["params"] and card["command_line"] == ["test"]
    assert card["seed"] == 0 * 100_003 + 0  # the trial's own seed
    assert np.array(card["confusion_matrix"]).sum() == 60 and len(card["per_class"]) == 10
    assert set(card["per_class"]["0"]) == {"precision", "recall", "f1", "support"}
    assert set(card["library_versions"]) == {"python", "tensorflow", "keras", "optuna", "numpy",
                                             "sklearn"}
    assert {b["name"] for b in card["baselines"]["models"]} >= {"mlm_cnn_sgd", "lenet5_tanh"}
    assert card["protocol"]["data_sha256"] == card["data_sha256"] == tiny_dataset.sha256
    # The leaderboard's test column.
    stored = st.trials_with_annotations(study)[0].user_attrs
    assert stored["test_accuracy"] == pytest.approx(card["test_accuracy"])
    pred = np.argmax(model.predict(tiny_dataset.x_test, verbose=0), axis=1)
    assert card["test_accuracy"] == pytest.approx(float(np.mean(pred == tiny_dataset.y_test)))

    # A fresh process with plain Keras/TF only (no project code, clean cwd, no PYTHONPATH).
    x = tiny_dataset.x_test[:16]
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, keras, tensorflow as tf\n"
        "m = keras.saving.load_model(sys.argv[1] + '/model.keras', safe_mode=True)\n"
        "x = np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], m.predict(x, verbose=0))\n"
        "sm = tf.saved_model.load(sys.argv[1] + '/saved_model')  # keep a reference: TF needs it\n"
        "np.save(sys.argv[4], sm.serve(x).numpy())\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('fmnist_search', 'searchspace')]\n"
        "assert not bad, bad\n"
    )
    clean = tmp_path / "clean"
    clean.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    r = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "x.npy"), str(tmp_path / "k.npy"),
         str(tmp_path / "s.npy")], cwd=clean, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "k.npy"), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=0, atol=1e-5)


def test_export_cli_end_to_end_and_replace(
    searched: tuple[Path, Any], synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, study = searched
    base = ["export", "--study-name", NAME, "--results-dir", str(results),
            "--data-dir", str(synthetic_dir), "--no-progress"]
    assert main([*base, "--final-epochs", "1"]) == 0
    out_text = capsys.readouterr().out
    best = st.study_dir(results, NAME) / "best_model"
    assert str(best) in out_text and "test accuracy" in out_text
    assert str(best / "model_card.json") in out_text
    _sha256sum_ok(best)
    first = json.loads((best / "model_card.json").read_text())
    assert first["final_fit"] is True and first["final_epochs"] == 1
    assert first["command_line"][:2] == ["run_search.py", "export"]
    assert first["augmentation"] is None and "no augmentation" in first["final_fit_note"]

    # --augment: random flips and shifts, said in the card and its command line.
    assert main([*base, "--final-epochs", "1", "--augment"]) == 0
    aug = json.loads((best / "model_card.json").read_text())
    assert aug["augmentation"] == {"flip_left_right": True, "shift_pixels": 2}
    assert "flipped left-right at random" in aug["final_fit_note"]
    assert aug["command_line"][-1] == "--augment"

    # By default scaled up; --no-scale-up trains it as searched, said in the card and its
    # command line.
    # The trial is already as wide and deep as the tests' space allows: nothing to scale.
    assert first["scale_up"]["applied"] is False and "searched_config" not in first
    assert "already as wide and deep" in first["scale_up"]["note"]
    assert main([*base, "--final-epochs", "1", "--no-scale-up"]) == 0
    assert "scaled up from" not in capsys.readouterr().out
    kept = json.loads((best / "model_card.json").read_text())
    assert kept["scale_up"] == {"applied": False, "note": "not scaled up: --no-scale-up"}
    assert kept["config"] == json.loads(study.trials[0].user_attrs["config"])
    assert kept["command_line"][-1] == "--no-scale-up"

    # Again, with the trial's own protocol: the new export replaces the old one whole.
    assert main([*base, "--no-final-fit"]) == 0
    card = json.loads((best / "model_card.json").read_text())
    assert card["final_fit"] is False and card["final_epochs"] == PROTOCOL.epochs
    assert card["train_images"] == len(make_folds_train(synthetic_dir))
    assert "retrained with the trial's own protocol" in card["final_fit_note"]
    # Same split, epochs and seed as the trial: its validation score is reproduced.
    assert card["reproduced_val_accuracy"] == pytest.approx(study.trials[0].value, abs=0.051)
    _sha256sum_ok(best)
    assert sorted(p.name for p in best.parent.iterdir()) == ["best_model", "study.db"]
    reloaded = optuna.load_study(study_name=NAME, storage=st.default_storage(results, NAME))
    trial = st.trials_with_annotations(reloaded)[0]
    assert trial.user_attrs["test_accuracy"] == pytest.approx(card["test_accuracy"])
    assert trial.user_attrs["test_final_fit"] is False


def make_folds_train(synthetic_dir: Path) -> np.ndarray:
    from fmnist_search.data import load_dataset

    data = load_dataset(synthetic_dir, download=False, warn=lambda m: None)
    return make_folds(data, PROTOCOL).splits[0][0]


def test_interrupted_export_leaves_previous_intact(
    exported: tuple[Path, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, model, _ = exported
    out = tmp_path / "best_model"
    shutil.copytree(src, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(root: Path) -> Path:
        (root / "SHA256SUMS").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex, "write_sums", full_disk)
    with pytest.raises(ex.ExportError, match="^disk full while exporting to .*best_model$"):
        ex.write_export(model, {"trial": 99}, out)
    assert [p.name for p in tmp_path.iterdir()] == ["best_model"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    _sha256sum_ok(out)
    monkeypatch.undo()

    # Where the atomic exchange is unsupported: two renames, and still nothing left over.
    monkeypatch.setattr(ex, "_exchange", lambda a, b: False)
    ex.write_export(model, {"trial": 7}, out)
    assert json.loads((out / "model_card.json").read_text()) == {"trial": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["best_model"]
    _sha256sum_ok(out)

    # A crash between those two renames left only the moved-aside export: it is put back,
    # and a dead process's temporary directory is removed.
    dead = 2**22 + 12345  # above Linux's default pid_max: never a live process
    out.rename(tmp_path / f"best_model.old-{dead}")
    (tmp_path / f"best_model.tmp-{dead}").mkdir()
    ex._clean_leftovers(out)
    assert [p.name for p in tmp_path.iterdir()] == ["best_model"]
    _sha256sum_ok(out)


def test_trial_not_complete_or_missing_refused(
    searched: tuple[Path, Any], synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, _ = searched
    base = ["export", "--study-name", NAME, "--results-dir", str(results),
            "--data-dir", str(synthetic_dir)]
    assert main([*base, "--trial", "1"]) == 1
    assert "trial 1 is pruned, not complete" in _only_line(capsys.readouterr().err)
    assert main([*base, "--trial", "42"]) == 1
    assert "no trial 42" in _only_line(capsys.readouterr().err)


def test_no_complete_trial_refused(tiny_dataset: Dataset, synthetic_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    study = _open(tmp_path, "empty", tiny_dataset)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    code = main(["export", "--study-name", "empty", "--results-dir", str(tmp_path),
                 "--data-dir", str(synthetic_dir)])
    assert code == 1
    assert "no complete trial" in _only_line(capsys.readouterr().err)
    assert not (tmp_path / "empty" / "best_model").exists()


def test_other_data_or_missing_study_refused(
    searched: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, _ = searched
    other = make_synthetic_idx_dir(tmp_path / "other", n_train=240, n_test=60, seed=1)
    base = ["export", "--study-name", NAME, "--results-dir", str(results)]
    assert main([*base, "--data-dir", str(other)]) == 1
    assert "differ" in _only_line(capsys.readouterr().err)
    assert main([*base, "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert "no such directory" in _only_line(capsys.readouterr().err)
    assert main(["export", "--study-name", "nope", "--results-dir", str(tmp_path)]) == 1
    assert "no study 'nope'" in _only_line(capsys.readouterr().err)
    assert main([*base, "--final-epochs", "2", "--no-final-fit"]) == 2
    assert "exclude each other" in _only_line(capsys.readouterr().err)
    assert main([*base, "--augment", "--no-final-fit"]) == 2
    assert "--augment and --no-final-fit" in _only_line(capsys.readouterr().err)


def test_baseline_comparison_reads_baselines_study(searched: tuple[Path, Any]) -> None:
    results, study = searched
    assert ex.baseline_comparison(study)["remeasured_in"] is None
    b = optuna.create_study(study_name=f"{NAME}.baselines", storage=study._storage,
                            direction="maximize")
    for label, value in (("mlm_cnn_sgd", 0.8), ("mlm_cnn_sgd", 0.9), ("unknown", 0.5), (5, 0.7)):
        b.add_trial(optuna.trial.create_trial(value=value, user_attrs={"baseline": label}))
    failed = optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"baseline": "dense128"})
    b.add_trial(failed)
    cmp = ex.baseline_comparison(study, {"x": 1})
    assert cmp["remeasured_in"] == f"{NAME}.baselines" and cmp["same_protocol"] is None
    rows = {r["name"]: r for r in cmp["models"]}
    assert rows["mlm_cnn_sgd"]["remeasured_val_accuracy"] == pytest.approx(0.85)
    assert rows["mlm_cnn_sgd"]["remeasured_runs"] == 2
    assert rows["dense128"]["remeasured_val_accuracy"] is None
    assert rows["mlm_cnn_sgd"]["documented_metric"] == "test"
    # What only ranks the main study's trials (objectives, limits) is no protocol difference.
    b.set_user_attr("protocol", {"x": 1})
    mo = {"x": 1, "objectives": ["accuracy", "params"], "max_params": 9}
    assert ex.baseline_comparison(study, mo)["same_protocol"] is True
    assert ex.baseline_comparison(study, {"x": 2})["same_protocol"] is False


# --------------------------------------------------------------------------- --ensemble


def _add_complete(study: optuna.Study, cfg: Any, value: float) -> None:
    from fmnist_search.model import count_params

    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=value, params={}, distributions={},
            user_attrs={"config": cfg.to_json(), "params": count_params(cfg, 10)},
        )
    )


def test_ensemble_members_prefer_other_architectures(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    from dataclasses import replace

    from searchspace import CnnConfig, ConvBlock, ConvLayer

    a = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(8, 3),), dropout=0.1),), batch_size=32)
    a_other_training = replace(a, blocks=(replace(a.blocks[0], dropout=0.3),), learning_rate=0.01)
    b = replace(a, blocks=(ConvBlock(convs=(ConvLayer(16, 3),)),))
    study = _open(tmp_path, "m", tiny_dataset)
    for cfg, value in ((a, 0.9), (a_other_training, 0.8), (b, 0.7)):
        _add_complete(study, cfg, value)
    lead = ex.pick_trial(study)
    assert ex.architecture_key(a) == ex.architecture_key(a_other_training)
    assert ex.architecture_key(a) != ex.architecture_key(b)
    assert [t.number for t in ex.ensemble_members(study, lead, 2)] == [0, 2]  # 1 is a's twin
    assert [t.number for t in ex.ensemble_members(study, lead, 3)] == [0, 2, 1]  # fills up
    assert [t.number for t in ex.ensemble_members(study, lead, 5)] == [0, 2, 1]  # all there is
    other = study.trials[2]
    assert [t.number for t in ex.ensemble_members(study, other, 2)] == [2, 0]  # --trial 2 leads
    # A study searched under --max-params keeps its limit for the ensemble as a whole.
    members = ex.ensemble_members(study, lead, 2)
    size = sum(t.user_attrs["params"] for t in members)
    ex._check_ensemble_size(members, {"max_params": size})
    with pytest.raises(ex.ExportError, match="over the study's --max-params"):
        ex._check_ensemble_size(members, {"max_params": size - 1})


def test_ensemble_export_averages_its_members(
    tiny_dataset: Dataset, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import keras

    from searchspace import CnnConfig, ConvBlock, ConvLayer

    study = _open(tmp_path, "e", tiny_dataset)
    study.optimize(Objective(make_folds(tiny_dataset, PROTOCOL), SPACE, PROTOCOL), n_trials=1)
    lead = CnnConfig.from_json(study.trials[0].user_attrs["config"])
    _add_complete(study, lead, -1.0)  # the same model again, ranked last: not a member
    other = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 5),), pool="avg"),), batch_size=32)
    _add_complete(study, other, -0.5)
    out = ex.export_study(study, tiny_dataset, tmp_path / "best_model", final_epochs=1,
                          ensemble=2, command_line=["test"])
    card = json.loads((out / "model_card.json").read_text())
    assert [m["trial"] for m in card["ensemble"]] == [0, 2] and card["trial"] == 0
    assert [m["seed"] for m in card["ensemble"]] == [0, 2]  # each member its trial's own seed
    assert "average of the softmax outputs of 2 models" in card["ensemble_note"]
    total = sum(m["train_time_s"] for m in card["ensemble"])
    assert card["train_time_s"] == pytest.approx(total, abs=0.01)  # each rounded to 1 ms
    _sha256sum_ok(out)

    # The file alone (safe mode) holds both members, and its output is their mean.
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    x, y = tiny_dataset.x_test, tiny_dataset.y_test
    parts = [model.get_layer(f"trial_{n}").predict(x, verbose=0) for n in (0, 2)]
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs, np.mean(parts, axis=0), atol=1e-6)
    assert card["test_accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    for m, p in zip(card["ensemble"], parts, strict=True):
        assert m["test_accuracy"] == pytest.approx(float(np.mean(p.argmax(1) == y)))
    assert card["params"] == sum(m["params"] for m in card["ensemble"])
    # Each member's own test accuracy goes to the leaderboard's test column.
    stored = {t.number: t.user_attrs for t in st.trials_with_annotations(study)}
    assert stored[2]["test_accuracy"] == pytest.approx(card["ensemble"][1]["test_accuracy"])
    assert "test_accuracy" not in stored[1]
    # `predict` uses it as any other export.
    np.save(tmp_path / "x.npy", x[:3])
    assert main(["predict", "--model", str(out), str(tmp_path / "x.npy")]) == 0
    assert capsys.readouterr().out.count("x.npy[") == 3


def test_extra_members_only_for_the_default_ensemble_with_a_budget() -> None:
    kw: dict[str, Any] = {"final_fit": True, "final_epochs": None, "final_minutes": 40.0}
    assert ex.extra_members(None, **kw) == ex.MAX_ENSEMBLE - ex.DEFAULT_ENSEMBLE
    assert ex.extra_members(2, **kw) == 0  # --ensemble given: exactly that many
    assert ex.extra_members(None, **{**kw, "final_epochs": 5}) == 0
    assert ex.extra_members(None, **{**kw, "final_minutes": None}) == 0
    assert ex.extra_members(None, **{**kw, "final_fit": False}) == 0


@pytest.mark.parametrize("case", ["room", "no room", "repeats"])
def test_the_default_ensemble_grows_only_while_the_budget_holds_whole_members(
    tiny_dataset: Dataset, tmp_path: Path, case: str
) -> None:
    from searchspace import CnnConfig, ConvBlock, ConvLayer, DenseLayer

    study = _open(tmp_path, "g", tiny_dataset)
    study.optimize(Objective(make_folds(tiny_dataset, PROTOCOL), SPACE, PROTOCOL), n_trials=1)
    lead = CnnConfig.from_json(study.trials[0].user_attrs["config"])
    others = [  # kernel 7 is not in SPACE: none of them is the lead's architecture
        CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 7),), pool=pool),), dense=dense,
                  batch_size=32)
        for pool, dense in (("avg", ()), ("max", ()), ("avg", (DenseLayer(16),)))
    ]
    if case == "repeats":  # one other architecture, then the lead's again, twice
        others = [others[0], lead, lead]
    for i, cfg in enumerate(others):
        _add_complete(study, cfg, -0.5 - i / 10)
    out = ex.export_study(study, tiny_dataset, tmp_path / "best_model",
                          final_minutes=1e-4 if case == "no room" else 60.0,
                          ensemble=2, extra=2, command_line=["test"])
    card = json.loads((out / "model_card.json").read_text())
    trained = [m["trial"] for m in card["ensemble"]]
    if case == "room":  # the two asked for, then two more, each with its planned epochs
        assert trained == [0, 1, 2, 3]
        assert card["ensemble_extra"]["added"] == 2
        assert not any("cut to" in m["final_epochs_rule"] for m in card["ensemble"])
    elif case == "no room":  # the two asked for are cut to what fits; no extra one starts
        assert trained == [0, 1]
        assert card["ensemble_extra"]["added"] == 0
        assert card["ensemble_extra"]["note"].startswith("no further member: trial 2's")
    else:  # a repeat of an architecture already in is no extra member
        assert trained == [0, 1]
        assert card["ensemble_extra"] == {
            "allowed": 2, "added": 0,
            "note": "the study had no more trials of other architectures",
        }
    assert f"average of the softmax outputs of {len(trained)}" in card["ensemble_note"]
    _sha256sum_ok(out)


def test_a_member_whose_final_fit_collapses_is_left_out(
    tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from searchspace import CnnConfig, ConvBlock, ConvLayer

    study = _open(tmp_path, "c", tiny_dataset)
    study.optimize(Objective(make_folds(tiny_dataset, PROTOCOL), SPACE, PROTOCOL), n_trials=1)
    other = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 5),), pool="avg"),), batch_size=32,
                      learning_rate=0.009)
    _add_complete(study, other, -0.5)
    real_fit, calls = ex._fit, []

    def fit(cfg: Any, *args: Any, number: int, **kw: Any) -> Any:
        calls.append(number)
        if number == 1:
            raise CollapsedError("training accuracy 0.1000 after epoch 2, about chance")
        return real_fit(cfg, *args, number=number, **kw)

    monkeypatch.setattr(ex, "_fit", fit)
    out = ex.export_study(study, tiny_dataset, tmp_path / "best_model", final_epochs=1,
                          ensemble=2, command_line=["test"])
    card = json.loads((out / "model_card.json").read_text())
    assert calls == [0, 1]  # no second try for a member: it is left out at once
    assert "ensemble" not in card and card["trial"] == 0  # the lead alone
    assert [d["trial"] for d in card["ensemble_dropped"]] == [1]
    assert "after epoch 2" in card["ensemble_dropped"][0]["why"]
    _sha256sum_ok(out)


@pytest.mark.parametrize("failures", [1, 2])
def test_the_lead_model_collapsing_is_retried_once_then_fails_the_export(
    searched: tuple[Path, Any], tiny_dataset: Dataset, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, failures: int,
) -> None:
    _, study = searched
    real_fit, rates = ex._fit, []

    def fit(cfg: Any, *args: Any, **kw: Any) -> Any:
        rates.append(cfg.learning_rate)
        if len(rates) <= failures:
            raise CollapsedError("training accuracy 0.1000 after epoch 2, about chance")
        return real_fit(cfg, *args, **kw)

    monkeypatch.setattr(ex, "_fit", fit)
    searched_rate = json.loads(study.trials[0].user_attrs["config"])["learning_rate"]
    if failures == 2:
        with pytest.raises(ex.ExportError, match="final fit diverged.*a third of the rate"):
            ex.export_study(study, tiny_dataset, tmp_path / "m", final_epochs=1,
                            command_line=["test"])
        assert not (tmp_path / "m").exists()
    else:
        out = ex.export_study(study, tiny_dataset, tmp_path / "m", final_epochs=1,
                              command_line=["test"])
        card = json.loads((out / "model_card.json").read_text())
        assert card["config"]["learning_rate"] == pytest.approx(searched_rate / 3)
        assert "retrained at a third of the learning rate" in card["final_epochs_rule"]
    assert rates == pytest.approx([searched_rate, searched_rate / 3])


def test_a_final_fit_ending_on_one_class_counts_as_collapsed(
    tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    from fmnist_search.training import FitResult

    # A model that answers class 0 for everything, as a collapsed fit's does.
    one_class = keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Flatten(),
        keras.layers.Dense(10, kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant([5.0] + [0.0] * 9)),
    ])
    monkeypatch.setattr(ex, "_fit", lambda *a, **k: FitResult(model=one_class, epochs_run=2))
    share = float(np.mean(tiny_dataset.y_train[:2000] == 0))
    kw: dict[str, Any] = {"epochs": 1, "seed": 0, "number": 0, "progress": None,
                          "augment": False, "deadline_s": None}
    with pytest.raises(CollapsedError, match="training images after the fit"):
        ex._final_member_fit(None, tiny_dataset, collapse_below=share + 0.01, **kw)
    assert ex._final_member_fit(None, tiny_dataset, collapse_below=share - 0.01, **kw).model
    monkeypatch.setattr(ex, "_fit", lambda *a, **k: FitResult(model=one_class, epochs_run=1))
    assert ex._final_member_fit(None, tiny_dataset, collapse_below=1.0, **kw).model  # 1 epoch
    done = TrialState.COMPLETE
    assert ex.collapse_threshold(SimpleNamespace(state=done, values=[0.9]), 10) == 0.2
    assert ex.collapse_threshold(SimpleNamespace(state=done, values=[0.12]), 10) == 0.06


def test_ensemble_needs_the_final_fit(
    searched: tuple[Path, Any], synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, _ = searched
    where = ["--study-name", NAME, "--results-dir", str(results), "--data-dir", str(synthetic_dir)]
    for argv in (["export", *where, "--ensemble", "2", "--no-final-fit"],
                 ["export", *where, "--ensemble", "2", "--pareto"],
                 ["export", *where, "--ensemble", "0"],
                 [*where, "--trials", "1", "--ensemble", "2", "--no-final-fit"]):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals (a count below 1)
            code = e.code
        assert code == 2, argv
        assert "--ensemble" in _only_line(capsys.readouterr().err), argv


def test_final_fit_scales_up_unless_told_or_limited(tiny_dataset: Dataset, tmp_path: Path) -> None:
    from fmnist_search.model import count_params
    from searchspace import CnnConfig, ConvBlock, ConvLayer, scaled_up

    study = _open(tmp_path, "s", tiny_dataset)
    searched = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),), pool="max"),),
                         batch_size=32)
    _add_complete(study, searched, 0.5)
    trained = scaled_up(searched, SPACE)
    assert trained != searched  # 1 conv of 4 filters -> 2 of 8 in the tests' space
    out = ex.export_study(study, tiny_dataset, tmp_path / "a", final_epochs=1,
                          command_line=["test"])  # the default
    card = json.loads((out / "model_card.json").read_text())
    assert card["scale_up"]["applied"] is True
    assert card["config"] == trained.to_dict() and card["architecture"] == trained.summary()
    assert card["searched_config"] == searched.to_dict()
    assert card["searched_architecture"] == searched.summary()
    assert card["params"] == count_params(trained, 10)
    ann = {t.number: t.user_attrs for t in st.trials_with_annotations(study)}[0]
    assert ann["test_scaled_up"] is True

    out = ex.export_study(study, tiny_dataset, tmp_path / "b", final_epochs=1,
                          command_line=["test"], scale_up=False)
    card = json.loads((out / "model_card.json").read_text())
    assert card["scale_up"] == {"applied": False, "note": "not scaled up: --no-scale-up"}
    assert card["config"] == searched.to_dict() and "searched_config" not in card

    # A space stored before filter_growth existed had the same choices in every block.
    old = {k: v for k, v in SPACE.to_dict().items() if k != "filter_growth"}
    old_space, why = ex._stored_space({"space": old})
    assert why is None and old_space.block_filters(2) == old_space.block_filters(0)
    assert ex._stored_space({"space": {"filters": "wide"}})[0] is None

    # A study that asked for small or fast models is not scaled up.
    base = {"epochs": 3, "space": SPACE.to_dict()}
    assert ex.scale_up_applies(base) is None
    assert "more than accuracy" in str(ex.scale_up_applies({**base, "objectives": ["accuracy",
                                                                                   "params"]}))
    assert "limits" in str(ex.scale_up_applies({**base, "max_params": 10_000}))
    assert "limits" in str(ex.scale_up_applies({**base, "max_latency_ms": 1.0}))
    assert "no search space" in str(ex.scale_up_applies({"epochs": 3}))


def _card(**extra: Any) -> dict[str, Any]:
    return {"trial": 28,
            "architecture": "[C32k3-C32k3 max] F | adam lr0.005 b64 + 1 more (ensemble)",
            "test_accuracy": 0.9423, "test_images": 10000, "val_accuracy": 0.8827,
            "final_fit": True, "final_epochs": 18, **extra}


def test_summary_of_an_ensemble_whose_lead_was_not_scaled_but_a_member_was(tmp_path: Path) -> None:
    # A real run's card: scale-up applied to trial 46 only, the lead trained as searched.
    card = _card(scale_up={"applied": True, "note": "..."}, ensemble=[
        {"trial": 28, "architecture": "[C32k3-C32k3 max] F | adam lr0.005 b64",
         "test_accuracy": 0.922, "final_epochs": 18},
        {"trial": 46, "architecture": "[C32k3-C32k3 max] F H64 | adam lr0.0043 b64",
         "searched_architecture": "[C16k3-C16k3 max] F H64 | adam lr0.0043 b64",
         "test_accuracy": 0.9326, "final_epochs": 18},
    ])
    lines = ex.summary_lines(card, tmp_path)
    assert lines[0] == f"exported trial 28 ({card['architecture']}) to {tmp_path}"
    assert not any(line.startswith("searched as") for line in lines)
    assert lines[2] == ("  member trial 28 ([C32k3-C32k3 max] F | adam lr0.005 b64): test "
                        "accuracy 0.9220, 18 epoch(s)")
    assert "scaled up from [C16k3-C16k3 max] F H64 | adam lr0.0043 b64)" in lines[3]
    assert lines[-1] == f"model card: {tmp_path / ex.CARD_FILE}"


def test_summary_names_the_leads_searched_architecture_when_it_was_scaled(tmp_path: Path) -> None:
    card = _card(scale_up={"applied": True}, searched_architecture="[C16k3 max] F | adam")
    assert "searched as [C16k3 max] F | adam (--no-scale-up: train it as searched)" in (
        ex.summary_lines(card, tmp_path))
    retrained = _card(scale_up={"applied": False}, searched_architecture="[C16k3 max] F | adam")
    assert "searched as [C16k3 max] F | adam" in ex.summary_lines(retrained, tmp_path)
