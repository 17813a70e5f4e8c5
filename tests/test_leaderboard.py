"""The leaderboard: ranking, baselines and margins, Pareto flags, files, the sub-command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import FrozenTrial, TrialState, create_trial
from rich.console import Console

from fmnist_search import study as st
from fmnist_search.cli import main
from fmnist_search.leaderboard import (
    COLUMNS,
    baseline_study_name,
    leaderboard,
    load_baseline_trials,
    render_table,
    write_leaderboard_files,
)
from searchspace.baselines import BASELINES, BY_NAME

optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial(value: float | None, state: TrialState = TrialState.COMPLETE, **ua: Any) -> FrozenTrial:
    """A finished trial with the user attributes the objective stores."""
    ua.setdefault("summary", f"[C32k3 max] F | adam lr0.001 b128 ({value})")
    ua.setdefault("epochs_run", 3)
    ua.setdefault("wall_time", 12.5)
    steps = {1: 0.5, 2: value or 0.6} if state == TrialState.PRUNED else None
    return create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        user_attrs=ua,
        intermediate_values=steps,
    )


def study_of(*trials: FrozenTrial) -> optuna.Study:
    s = optuna.create_study(direction="maximize")
    for t in trials:
        s.add_trial(t)
    return s


def by_trial(df: pd.DataFrame) -> dict[Any, pd.Series]:
    return {r["trial"]: r for _, r in df.iterrows()}


def test_complete_ranked_first_ties_to_smaller_pruned_and_failed_apart() -> None:
    s = study_of(
        trial(0.80, params=1000),
        trial(0.90, params=5000),
        trial(0.90, params=2000),  # same accuracy, smaller: ranks above trial 1
        trial(0.99, TrialState.PRUNED, params=10, pruned_at_step=2),  # high, but pruned
        trial(None, TrialState.FAIL, fail_reason="diverged: loss became nan"),
    )
    df = leaderboard(s.trials)
    assert list(df.columns) == COLUMNS
    assert list(df["trial"]) == [2, 1, 0, 3, 4]
    assert list(df["rank"].astype(object)) == [1, 2, 3, pd.NA, pd.NA]
    assert list(df["state"]) == ["complete", "complete", "complete", "pruned", "fail"]
    rows = by_trial(df)
    assert rows[3]["reason"] == "pruned at step 2" and rows[3]["val_accuracy"] == 0.99
    assert rows[4]["reason"].startswith("diverged") and pd.isna(rows[4]["val_accuracy"])
    assert not rows[3]["pareto"] and not rows[4]["pareto"]  # never on the front
    assert set(df["kind"]) == {"trial"}


def test_kfold_mean_and_std_are_separate_columns_and_test_accuracy_shown() -> None:
    s = study_of(
        trial(0.875, val_accuracy_std=0.0125, fold_scores=[0.8625, 0.8875], test_accuracy=0.86),
        trial(0.85, val_accuracy_std=0.0),
    )
    df = leaderboard(s.trials)
    top = df.iloc[0]
    assert top["val_accuracy"] == 0.875 and top["val_std"] == 0.0125
    assert top["test_accuracy"] == 0.86 and pd.isna(df.iloc[1]["test_accuracy"])
    assert "↑" not in _text(render_table(df, top=2, title="t"))


def _text(table: Any) -> str:
    console = Console(width=200, record=True)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def test_test_accuracy_of_a_scaled_up_final_fit_is_marked() -> None:
    s = study_of(trial(0.875, test_accuracy=0.93, test_scaled_up=True), trial(0.85))
    df = leaderboard(s.trials)
    assert df.iloc[0]["test_scaled_up"] is True
    out = _text(render_table(df, top=2, title="t"))
    assert "0.9300 ↑" in out and "↑ = test accuracy of the architecture scaled up" in out


def test_baselines_rank_with_trials_and_margins_name_the_best_beaten() -> None:
    s = study_of(
        trial(0.9123, params=50_000),  # beats both baselines; best beaten: coursera
        trial(0.88, params=60_000),  # beats only mit_model1
        trial(0.80, params=10_000),  # beats none
    )
    measured = [
        trial(0.90, baseline="coursera_2conv64", params=243_786),
        trial(0.85, baseline="mit_model1", params=201_578),
        trial(None, TrialState.FAIL, baseline="lenet5_tanh", fail_reason="diverged: nan"),
    ]
    df = leaderboard(s.trials, baselines=measured)
    assert list(df["trial"][:5]) == [0, "coursera_2conv64", 1, "mit_model1", 2]
    assert list(df["rank"][:5]) == [1, 2, 3, 4, 5]
    rows = by_trial(df)
    assert rows[0]["beats"] == "coursera_2conv64" and rows[0]["margin_pts"] == pytest.approx(1.23)
    assert rows[1]["beats"] == "mit_model1" and rows[1]["margin_pts"] == pytest.approx(3.0)
    assert pd.isna(rows[2]["beats"]) and pd.isna(rows[2]["margin_pts"])
    base = rows["coursera_2conv64"]
    assert base["kind"] == "baseline" and pd.isna(base["beats"])
    # The document's own number rides along, clearly apart from the measured one.
    doc = BY_NAME["coursera_2conv64"]
    assert base["documented_acc"] == doc.documented_accuracy
    assert base["documented_protocol"] == doc.documented_protocol
    assert base["val_accuracy"] == 0.90
    failed = rows["lenet5_tanh"]
    assert failed["state"] == "fail" and pd.isna(failed["rank"])
    assert pd.isna(rows[0]["documented_acc"])  # trials have no documented number


def test_a_complete_rerun_of_a_baseline_replaces_its_failed_attempt() -> None:
    measured = [
        trial(None, TrialState.FAIL, baseline="dense128", fail_reason="OOM"),
        trial(0.8, baseline="dense128", params=101_770),
    ]
    df = leaderboard([], baselines=measured)
    assert len(df) == 1 and df.iloc[0]["state"] == "complete"


def test_documented_only_baselines_are_shown_unranked() -> None:
    s = study_of(trial(0.9, params=1000))
    df = leaderboard(s.trials, baselines=[trial(0.85, baseline="mit_model1")], documented=BASELINES)
    not_run = df[df["state"] == "not run"]
    assert len(not_run) == len(BASELINES) - 1 and not_run["rank"].isna().all()
    assert not_run["documented_acc"].notna().all() and not_run["val_accuracy"].isna().all()
    assert list(df["state"][:2]) == ["complete", "complete"]


def test_pareto_front_on_accuracy_and_parameters() -> None:
    s = study_of(
        trial(0.90, params=100),  # 0: front (smallest at its accuracy)
        trial(0.95, params=1000),  # 1: front (most accurate)
        trial(0.89, params=500),  # 2: beaten by 0 on both
        trial(0.95, params=2000),  # 3: as accurate as 1 but larger: dominated
        trial(0.92, params=1000),  # 4: same size as 1, less accurate: dominated
    )
    measured = [trial(0.91, baseline="mit_model1", params=200)]  # baseline on the front too
    rows = by_trial(leaderboard(s.trials, baselines=measured))
    assert {k for k, r in rows.items() if r["pareto"]} == {0, 1, "mit_model1"}


def test_serialises_to_json_csv_markdown_and_files(tmp_path: Path) -> None:
    s = study_of(
        trial(0.9, params=1000, val_accuracy_std=0.01),
        trial(0.5, TrialState.PRUNED),
        trial(None, TrialState.FAIL, fail_reason="boom"),
    )
    df = leaderboard(s.trials, baselines=[trial(0.8, baseline="dense128")], documented=BASELINES)
    records = json.loads(df.to_json(orient="records"))
    assert records[0]["rank"] == 1 and records[0]["trial"] == 0 and records[0]["pareto"] is True
    assert {r["trial"] for r in records if r["kind"] == "baseline"} == set(BY_NAME)
    assert df.to_csv(index=False).startswith("rank,trial,kind,architecture,")
    assert "| rank" in df.to_markdown(index=False)
    paths = write_leaderboard_files(df, tmp_path / "out")
    assert [p.name for p in paths] == ["leaderboard.csv", "leaderboard.md", "leaderboard.json"]
    assert len(json.loads(paths[2].read_text())) == len(df)
    assert pd.read_csv(paths[0]).shape == df.shape
    assert "documented_acc" in paths[1].read_text()
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("width", [80, 140])
def test_render_table_fits_the_terminal_and_counts_the_rest(width: int) -> None:
    s = study_of(
        trial(
            0.9123,
            params=120_000,
            val_accuracy_std=0.01,
            test_accuracy=0.9,
            summary="[C32k3-C32k3 BN max D0.25] [C64k3 max] F D0.3 H128 | adam lr0.0012 b128",
        ),
        trial(0.85, params=50_000),
        trial(0.5, TrialState.PRUNED),
        trial(None, TrialState.FAIL, fail_reason="diverged: loss became nan"),
    )
    measured = [trial(0.87, baseline="mit_model1", params=201_578)]
    df = leaderboard(s.trials, baselines=measured, documented=BASELINES)
    console = Console(width=width, record=True)
    with console.capture() as cap:
        console.print(render_table(df, top=1, title="Leaderboard: t", width=width))
    out = cap.get()
    lines = out.splitlines()
    table_lines = [ln for ln in lines if ln[:1] in "┏┃┡│├└"]
    # Not cropped: every table line is closed by its right border.
    assert table_lines and all(ln.rstrip()[-1] in "┓┃┩│┤┘" for ln in table_lines)
    assert max(len(ln) for ln in lines) <= width
    # The top row plus every baseline, measured or not, and a caption counting the rest.
    for name in BY_NAME:
        assert name in out
    flat = "".join(out.split())
    assert "1pruned" in flat and "1failed(divergedx1)" in flat


def test_render_table_of_an_empty_study() -> None:
    console = Console(width=80, record=True)
    with console.capture() as cap:
        console.print(render_table(leaderboard([]), top=10))
    assert "0 complete and ranked" in cap.get()


def _stored(
    tmp_path: Path, name: str, protocol: dict[str, Any], url: str | None = None
) -> tuple[str, optuna.Study]:
    url = url or st.default_storage(tmp_path / "res", name)
    s = st.open_study(
        url, name, optuna.samplers.RandomSampler(seed=0), optuna.pruners.NopPruner(), protocol
    )
    return url, s


def test_load_baseline_trials_checks_the_protocol(tmp_path: Path) -> None:
    url, main_study = _stored(tmp_path, "lb", {"epochs": 1})
    assert load_baseline_trials(url, "lb") == []  # none measured yet
    _, b = _stored(tmp_path, baseline_study_name("lb"), {"epochs": 1}, url)
    b.add_trial(trial(0.8, baseline="dense128"))
    b.add_trial(trial(0.7))  # not a baseline trial: ignored
    got = load_baseline_trials(url, "lb")
    assert [t.user_attrs["baseline"] for t in got] == ["dense128"]
    main_study.set_user_attr("protocol", {"epochs": 2})
    warnings: list[str] = []
    assert load_baseline_trials(url, "lb", warn=warnings.append) == []
    assert len(warnings) == 1 and "epochs" in warnings[0] and "--replace" in warnings[0]


@pytest.mark.parametrize("fmt", ["table", "csv", "markdown", "json"])
def test_leaderboard_subcommand_each_format(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, s = _stored(tmp_path, "lb", {"epochs": 1})
    for t in (
        trial(0.9, params=10),
        trial(0.8, params=20),
        trial(0.5, TrialState.PRUNED),
        trial(None, TrialState.FAIL, fail_reason="boom"),
    ):
        s.add_trial(t)
    args = ["leaderboard", "--study-name", "lb", "--results-dir", str(tmp_path / "res")]
    assert main([*args, "--format", fmt, "--top", "1"]) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        rows = json.loads(out)
        # --top limits ranked rows; pruned, failed and unmeasured baselines are always listed.
        assert [r["rank"] for r in rows if r["rank"] is not None] == [1]
        assert {r["state"] for r in rows if r["kind"] == "trial"} == {"complete", "pruned", "fail"}
        assert sum(r["kind"] == "baseline" for r in rows) == 8  # documented, not measured yet
    elif fmt == "csv":
        assert out.startswith("rank,trial,") and len(out.strip().splitlines()) == 1 + 1 + 2 + 8
    elif fmt == "markdown":
        assert out.splitlines()[0].startswith("|") and "pruned" in out
    else:
        assert "Leaderboard: lb" in out and "2 complete and ranked" in out


def test_smallest_trial_beating_each_baseline() -> None:
    study = optuna.create_study(direction="maximize")
    for value, params in ((0.90, 100_000), (0.92, 50_000), (0.85, 10_000)):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"params": params}))
    base = [
        optuna.trial.create_trial(value=0.88, user_attrs={"params": 9, "baseline": "mit_model1"}),
        optuna.trial.create_trial(value=0.95, user_attrs={"params": 9, "baseline": "dense128"}),
    ]
    df = leaderboard(study.get_trials(), baselines=base).set_index("trial")
    assert df.loc["mit_model1", "smallest_beating"] == 1  # 0.92 with 50k beats it, 0.90 is bigger
    assert pd.isna(df.loc["dense128", "smallest_beating"])  # nothing beats 0.95
