"""The HTML report: written, self-contained, every figure embedded; graceful when thin."""

from __future__ import annotations

import base64
import html
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from fmnist_search import study as st
from fmnist_search.cli import main
from fmnist_search.leaderboard import baseline_study_name

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTS = {
    "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
    "n_blocks": IntDistribution(1, 3),
    "optimizer": CategoricalDistribution(["adam", "sgd"]),
}
PNG = "data:image/png;base64,"


def _open(results: Path, name: str, protocol: dict[str, Any]) -> optuna.Study:
    return st.open_study(
        st.default_storage(results, "r"),
        name,
        optuna.samplers.RandomSampler(seed=0),
        optuna.pruners.NopPruner(),
        protocol,
    )


def _history(curve: list[float]) -> str:
    return json.dumps([{"val_accuracy": curve, "accuracy": curve}])


def make_study(results: Path, data: Any, n: int) -> optuna.Study:
    """A stored study of `n` trials (complete, pruned, failed) and two measured baselines."""
    protocol = {
        "epochs": 3,
        "cv": 0,
        "val_size": 40,
        "train_subset": None,
        "seed": 0,
        "data_sha256": dict(sorted(data.sha256.items())),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
    }
    study = _open(results, "r", protocol)
    rng = random.Random(0)
    for i in range(n):
        nb, lr, opt = rng.randint(1, 3), 10 ** rng.uniform(-4, -2), rng.choice(["adam", "sgd"])
        final = 0.8 + 0.03 * nb + rng.uniform(-0.01, 0.01)
        curve = [round(final - 0.1 / (e + 1), 4) for e in range(3)]
        state = [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL][
            i % 4
        ]
        if state == TrialState.PRUNED:
            curve = curve[:1]
        ua: dict[str, Any] = {
            "summary": f"[C16k3 max] F | {opt} lr{lr:.2g}",
            "params": 1000 * nb,
            "epochs_run": len(curve),
            "wall_time": 3.0,
            "history": _history(curve),
        }
        if state == TrialState.FAIL:
            ua["fail_reason"] = "diverged: loss became nan"
        study.add_trial(
            create_trial(
                state=state,
                value=max(curve) if state == TrialState.COMPLETE else None,
                params={"learning_rate": lr, "n_blocks": nb, "optimizer": opt},
                distributions=DISTS,
                user_attrs=ua,
                intermediate_values={} if state == TrialState.FAIL else dict(enumerate(curve, 1)),
            )
        )
    base = _open(results, baseline_study_name("r"), protocol)
    for name, acc, params in [("mit_model1", 0.83, 201_578), ("conv8_dense28", 0.81, 38_254)]:
        base.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=acc,
                user_attrs={
                    "baseline": name,
                    "summary": name,
                    "params": params,
                    "epochs_run": 3,
                    "wall_time": 2.0,
                    "history": _history([acc - 0.05, acc - 0.01, acc]),
                },
            )
        )
    return study


def write_card(results: Path, data: Any, **extra: Any) -> None:
    k = data.num_classes
    card = {
        "trial": 0,
        "test_accuracy": 0.85,
        "class_names": list(data.class_names),
        "confusion_matrix": (np.eye(k, dtype=int) * 5 + 1).tolist(),
        "data_sha256": dict(sorted(data.sha256.items())),
        **extra,
    }
    (results / "r" / "best_model").mkdir(parents=True, exist_ok=True)
    (results / "r" / "best_model" / "model_card.json").write_text(json.dumps(card))


def report(results: Path, *extra: str) -> int:
    return main(["report", "--study-name", "r", "--results-dir", str(results), *extra])


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_self_contained_with_every_figure(
    tmp_path: Path, synthetic_dir: Path, tiny_dataset: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "res"
    make_study(results, tiny_dataset, 12)
    least = [
        {"index": i, "true": int(tiny_dataset.y_test[i]), "pred": 0, "prob": 0.3} for i in range(6)
    ]
    members = [
        {"trial": 3, "architecture": "[C32k3-C32k3 avg] F | adam lr0.001 b64",
         "searched_architecture": "[C16k3 avg] F | adam lr0.001 b64", "final_epochs": 12,
         "test_accuracy": 0.84},
        {"trial": 5, "architecture": "[C32k5 max] F | sgd lr0.01 b32", "final_epochs": 9,
         "test_accuracy": 0.83},
    ]
    write_card(results, tiny_dataset, least_confident=least, ensemble=members)
    assert report(results, "--data-dir", str(synthetic_dir)) == 0
    page = (results / "r" / "report.html").read_text()
    assert str(results / "r" / "report.html") in capsys.readouterr().out
    # Nothing fetched from anywhere: no remote sources, no scripts, no stylesheets to load.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    # History, importances, curves, accuracy vs params, confusion matrix, test images.
    pngs = images(page)
    assert len(pngs) == 6 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    for text in (
        "Optimisation history",
        "Hyperparameter importances",
        "Learning curves",
        "Accuracy vs parameter count",
        "confusion matrix",
        "least-confident",
        "mit_model1",
        "conv8_dense28",
        "Pruned and failed",
        "diverged",
    ):
        assert text in page, text
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.json"):
        assert (results / "r" / name).exists()
    # What each model of the export is, as trained, and what the search found when scaled up.
    assert ("Trial 3 trained as [C32k3-C32k3 avg] F | adam lr0.001 b64 (scaled up from the "
            "searched [C16k3 avg] F | adam lr0.001 b64), 12 epochs, test accuracy alone "
            "0.8400.") in html.unescape(page)
    assert ("Trial 5 trained as [C32k5 max] F | sgd lr0.01 b32, 9 epochs, test accuracy alone "
            "0.8300.") in html.unescape(page)


def test_report_with_few_trials_and_no_export_explains_what_is_missing(
    tmp_path: Path, tiny_dataset: Any
) -> None:
    results = tmp_path / "res"
    make_study(results, tiny_dataset, 2)
    assert report(results) == 0
    page = (results / "r" / "report.html").read_text()
    assert "Not enough complete trials" in page and "No model exported yet" in page
    assert len(images(page)) == 3  # history, curves, accuracy vs params


def test_report_skips_the_test_images_when_the_data_are_not_there(
    tmp_path: Path, tiny_dataset: Any
) -> None:
    results = tmp_path / "res"
    make_study(results, tiny_dataset, 4)
    write_card(results, tiny_dataset, least_confident=[{"index": 0, "true": 1, "pred": 2}])
    assert report(results, "--data-dir", str(tmp_path / "nowhere")) == 0
    page = (results / "r" / "report.html").read_text()
    assert "Test images not shown" in page and "confusion matrix" in page


def test_report_of_a_missing_study_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report(tmp_path / "res") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no study" in err and "Traceback" not in err


def test_report_writes_the_leaderboards_test_accuracies(
    tmp_path: Path, tiny_dataset: Any
) -> None:
    results = tmp_path / "res"
    study = make_study(results, tiny_dataset, 4)
    study.set_user_attr("test:0", {"test_accuracy": 0.8512, "test_final_fit": True})
    assert report(results) == 0
    rows = json.loads((results / "r" / "leaderboard.json").read_text())
    rows = rows if isinstance(rows, list) else rows["rows"]
    trial0 = next(r for r in rows if r.get("kind") == "trial" and r.get("trial") == 0)
    assert trial0["test_accuracy"] == pytest.approx(0.8512)
    assert "0.8512" in (results / "r" / "report.html").read_text()


def test_report_leaves_out_another_studys_exported_model(
    tmp_path: Path, tiny_dataset: Any
) -> None:
    results = tmp_path / "res"
    study = make_study(results, tiny_dataset, 4)
    protocol = study.user_attrs["protocol"]
    val0 = study.trials[0].value
    # A card from a study of the same name under another seed, and one of this very study.
    write_card(results, tiny_dataset, study="r", protocol={**protocol, "seed": 7},
               val_accuracy=val0)
    assert report(results) == 0
    page = html.unescape((results / "r" / "report.html").read_text())
    assert "belongs to another study (its search protocol differs in seed)" in page
    assert "confusion matrix" not in page
    write_card(results, tiny_dataset, study="r", protocol=protocol, val_accuracy=val0 - 0.01)
    assert report(results) == 0
    page = html.unescape((results / "r" / "report.html").read_text())
    assert "belongs to another study (its trial 0 is not this study's)" in page
    write_card(results, tiny_dataset, study="r", protocol=protocol, val_accuracy=val0)
    assert report(results) == 0
    page = html.unescape((results / "r" / "report.html").read_text())
    assert "belongs to another study" not in page and "confusion matrix" in page


@pytest.mark.parametrize("command", ["report", "leaderboard", "export"])
def test_a_mistyped_sqlite_storage_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    db = tmp_path / "nope" / "sub" / "x.db"
    assert main([command, "--storage", f"sqlite:///{db}", "--study-name", "r",
                 "--results-dir", str(tmp_path / "res")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no database file at {db}" in err
    assert not (tmp_path / "nope").exists()
