"""The command line: argument errors, data errors, an end-to-end search as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from fmnist_search.cli import main


def _run(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FMNIST_DATA_DIR": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_search.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--trials", "0"],
        ["--trials", "-3"],
        ["--trials", "many"],
        ["--cv", "1"],
        ["--epochs", "0"],
        ["--timeout", "-1"],
        ["--sampler", "annealing"],
        ["--pruner", "sometimes"],
        ["--storage", "redis://localhost/0"],
        ["--storage", "sqlite://x.db"],
        ["--storage", "sqlite:///"],
        ["--study-name", "../escape"],
        ["--study-name", "a/b"],
        ["--seed", "-1"],
        ["--train-subset", "5"],
        ["leaderboard", "--format", "xml"],
    ],
)
def test_bad_arguments_exit_2_one_line_nothing_written(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as e:
        main([*args, "--results-dir", str(results)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not results.exists()


def test_final_fit_flags_with_no_export_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--no-export", "--ensemble", "3", "--augment", "--results-dir", str(tmp_path)])
    assert code == 2
    assert "--no-export skips the final fit: drop --augment, --ensemble" in capsys.readouterr().err
    # (--data-dir of nothing: without the check the run fails on the data, never trains.)
    assert main(["--no-export", "--no-scale-up", "--data-dir", str(tmp_path / "none"),
                 "--results-dir", str(tmp_path)]) == 2
    assert "drop --no-scale-up" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_optuna_pruners_with_several_objectives_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--objectives", "accuracy,params", "--pruner", "median",
                 "--results-dir", str(tmp_path)])
    assert code == 2
    assert "--pruner median does not apply with several objectives" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_val_size_over_half_the_training_set_exit_2(
    tmp_path: Path, synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default shrinks to fit a small data set (240 images here); a given size does not.
    code = main(["--val-size", "200", "--data-dir", str(synthetic_dir),
                 "--results-dir", str(tmp_path / "r")])
    assert code == 2
    assert "--val-size 200 is more than half of the 240 training images" in (
        capsys.readouterr().err)
    # With --cv the folds are the validation sets: a --val-size would be stored, not used.
    assert main(["--cv", "3", "--val-size", "50", "--data-dir", str(tmp_path / "none"),
                 "--results-dir", str(tmp_path / "r")]) == 2
    assert "which --cv replaces" in capsys.readouterr().err
    # baselines: the same check (it quietly shrank the split and stored the value given).
    assert main(["baselines", "--val-size", "200", "--data-dir", str(synthetic_dir),
                 "--results-dir", str(tmp_path / "r")]) == 2
    assert "--val-size 200 is more than half" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_space_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "space.yaml"
    f.write_text("pooling: [max, median]\n")
    assert main(["--space", str(f), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'pooling'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_missing_data_dir_exit_1(tmp_path: Path) -> None:
    r = _run("--data-dir", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "r"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "nowhere" in r.stderr
    assert not (tmp_path / "r").exists()


def test_truncated_data_exit_1_names_file(tmp_path: Path, synthetic_dir: Path) -> None:
    import shutil

    d = tmp_path / "data"
    shutil.copytree(synthetic_dir, d)
    f = d / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-20])
    r = _run("--data-dir", str(d), "--results-dir", str(tmp_path / "r"), "--trials", "1")
    assert r.returncode == 1
    assert "train-labels-idx1-ubyte.gz" in r.stderr and "Traceback" not in r.stderr


def test_end_to_end_search_resume_and_leaderboard(tmp_path: Path, synthetic_dir: Path) -> None:
    common = [
        "--data-dir",
        str(synthetic_dir),
        "--results-dir",
        str(tmp_path / "res"),
        "--study-name",
        "e2e",
        "--epochs",
        "2",
        "--seed",
        "3",
        "--no-progress",
    ]
    r = _run("--trials", "3", *common)
    assert r.returncode == 0, r.stderr
    assert "Leaderboard" in r.stdout and "complete" in r.stdout
    assert (tmp_path / "res" / "e2e" / "study.db").exists()

    r = _run("--trials", "4", *common)  # the same command with a larger budget continues
    assert r.returncode == 0, r.stderr
    assert "3 of 4 trials finished" in r.stderr

    import optuna

    study = optuna.load_study(
        study_name="e2e", storage=f"sqlite:///{tmp_path / 'res' / 'e2e' / 'study.db'}"
    )
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) == 4
    # The warm start (default) fills the new study's budget with the baselines' nearest
    # points; the resumed run samples.
    assert [bool(t.user_attrs.get("warm_start_from")) for t in finished] == [True] * 3 + [False]

    r = _run("--trials", "4", *common[:-1], "--epochs", "3")  # another protocol: refused
    assert r.returncode == 1 and "epochs" in r.stderr

    lb = ["leaderboard", "--study-name", "e2e", "--results-dir", str(tmp_path / "res")]
    r = _run(*lb, "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    trials = [row for row in rows if row["kind"] == "trial"]
    assert len(trials) == 4 and rows[0]["rank"] == 1
    assert {row["trial"] for row in rows if row["kind"] == "baseline"} >= {
        "lenet5_tanh"
    }  # documented
    assert (tmp_path / "res" / "e2e" / "leaderboard.csv").exists()
    assert (tmp_path / "res" / "e2e" / "best_model" / "model.keras").exists()  # the search exported
    r = _run(*lb, "--format", "csv")
    assert r.stdout.startswith("rank,trial,")
    r = _run("leaderboard", "--study-name", "nope", "--results-dir", str(tmp_path / "res"))
    assert r.returncode == 1 and "no study" in r.stderr


def test_no_warm_start_searches_from_the_sampler_alone(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    res = tmp_path / "res"
    flags = ["--epochs", "1", "--no-warm-start", "--no-export", "--no-progress",
             "--data-dir", str(synthetic_dir), "--results-dir", str(res), "--study-name", "cold"]
    r = _run("--trials", "1", *flags)
    assert r.returncode == 0, r.stderr
    assert "warm start" not in r.stdout + r.stderr

    import optuna

    study = optuna.load_study(study_name="cold", storage=f"sqlite:///{res / 'cold' / 'study.db'}")
    assert len(study.trials) == 1
    assert "warm_start_from" not in study.trials[0].user_attrs
    # Resumed, TPE is still in its random trials: a new stream, not trial 0's draws again.
    r = _run("--trials", "2", *flags)
    assert r.returncode == 0, r.stderr
    first, second = study.get_trials()
    assert second.params != first.params


def test_warm_start_is_for_the_optuna_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--engine", "keras-tuner", "--warm-start", "--results-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Optuna engine" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_multi_objective_search_with_limit_and_pareto_export(
    tmp_path: Path, synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna

    from fmnist_search import study as st

    common = [
        "--results-dir",
        str(tmp_path),
        "--study-name",
        "mo",
        "--data-dir",
        str(synthetic_dir),
    ]
    code = main(
        [
            "--trials",
            "8",
            "--epochs",
            "2",
            "--objectives",
            "accuracy,params",
            "--max-params",
            "150000",
            "--no-progress",
            "--no-export",
            *common,
        ]
    )
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="mo", storage=st.default_storage(tmp_path, "mo"))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 8
    big = [t for t in study.trials if t.user_attrs.get("params", 0) > 150_000]
    assert big and all(
        t.state.name == "PRUNED" and "infeasible_reason" in t.user_attrs for t in big
    )
    assert all(t.user_attrs["epochs_run"] == 0 for t in big)  # refused before training

    capsys.readouterr()
    assert main(["leaderboard", "--format", "json", *common[:4]]) == 0
    rows = json.loads(capsys.readouterr().out)
    ranked = [r for r in rows if r["rank"] is not None]
    assert ranked and ranked[0]["front"] == 0
    assert all(r["params"] <= 150_000 for r in ranked)
    assert any(r["reason"].startswith("infeasible") for r in rows)

    assert main(["export", "--pareto", "--final-epochs", "1", "--no-progress", *common]) == 0
    cards = sorted((tmp_path / "mo" / "pareto").glob("trial-*/model_card.json"))
    assert cards and all(json.loads(c.read_text())["params"] <= 150_000 for c in cards)
    front = json.loads((tmp_path / "mo" / "pareto" / "front.json").read_text())["trials"]
    assert sorted(f"trial-{n}" for n in front) == sorted(c.parent.name for c in cards)
    capsys.readouterr()
    assert main(["export", "--pareto", "--trial", "0", *common]) == 2  # before TensorFlow
    assert "--pareto exports the whole front; it takes no --trial" in capsys.readouterr().err


def test_bad_objectives_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("params", "accuracy,speed", "accuracy,accuracy"):
        with pytest.raises(SystemExit) as e:
            main(["--objectives", bad, "--results-dir", str(tmp_path / "r")])
        assert e.value.code == 2
    assert not (tmp_path / "r").exists()


def test_keras_tuner_engine_from_the_command_line(
    tmp_path: Path, synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna

    from fmnist_search import study as st

    common = [
        "--results-dir",
        str(tmp_path),
        "--study-name",
        "kt",
        "--data-dir",
        str(synthetic_dir),
    ]
    assert main(["--engine", "keras-tuner", "--workers", "2", *common]) == 2
    assert main(["--engine", "keras-tuner", "--cv", "3", *common]) == 2
    # KerasTuner validates every image after every epoch: no interim subset.
    assert main(["--engine", "keras-tuner", "--interim-val-size", "500", *common]) == 2
    assert "--interim-val-size applies to the optuna engine" in capsys.readouterr().err
    # Without --engine keras-tuner the Optuna engine would run under KerasTuner's name.
    assert main(["--kt-algorithm", "bayesian", *common]) == 2
    assert "--kt-algorithm needs --engine keras-tuner" in capsys.readouterr().err
    # KerasTuner samples and stops trials itself: Optuna's choices would be ignored.
    assert main(["--engine", "keras-tuner", "--pruner", "none", *common]) == 2
    assert "apply to the optuna engine" in capsys.readouterr().err
    assert not (tmp_path / "kt").exists()
    assert not (tmp_path / "kt").exists()
    code = main(
        [
            "--engine",
            "keras-tuner",
            "--kt-algorithm",
            "random",
            "--trials",
            "2",
            "--epochs",
            "1",
            "--no-progress",
            "--no-export",
            *common,
        ]
    )
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="kt", storage=st.default_storage(tmp_path, "kt"))
    assert len(study.trials) == 2
    assert all(t.user_attrs["engine"] == "keras-tuner/random" for t in study.trials)
    assert study.user_attrs["protocol"]["interim_val_size"] == 0
