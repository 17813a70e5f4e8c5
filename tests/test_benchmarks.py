"""The benchmark harness without measuring anything: doc sections, analysis, rendering.

The benchmarks themselves are run by hand (benchmarks/README.md), never by the test suite;
this checks, in a second or two, that their bookkeeping and reports hold together.
"""

from __future__ import annotations

import datetime
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import headline  # noqa: E402
import memory  # noqa: E402
import overhead  # noqa: E402
import pruning  # noqa: E402
import search_efficiency as se  # noqa: E402
import workers  # noqa: E402

ENV = {"cpu_count": 2, "load_average_at_start": [1.0, 1.0, 1.0],
       "versions": {"tensorflow": "2.21.0", "keras": "3", "optuna": "5", "keras-tuner": "1.4.8"}}


def _result(form: str = "quick", **payload: Any) -> dict[str, Any]:
    return {"benchmark": "x", "form": form, "created": "2026-01-01T10:00:00",
            "command": "python benchmarks/x.py --quick", "environment": ENV, **payload}


@pytest.fixture()
def docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Plots and the doc go to a temporary directory, never to docs/."""
    monkeypatch.setattr(common, "DOCS", tmp_path)
    return tmp_path


def test_doc_sections_are_replaced_one_at_a_time(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    common.update_doc("memory", True, "## memory quick\n\nA", doc)
    common.update_doc("headline", False, "## headline full\n\nB", doc)
    common.update_doc("memory", True, "## memory quick\n\nC", doc)
    common.update_doc("memory", False, "## memory full\n\nD", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    sections = common.read_sections(text)
    assert sections == {("memory", "quick"): "## memory quick\n\nC",
                        ("headline", "full"): "## headline full\n\nB",
                        ("memory", "full"): "## memory full\n\nD"}
    # Headline first (ORDER), and a benchmark's full section before its quick one.
    assert text.index("headline full") < text.index("memory full") < text.index("memory quick")
    assert common.render_doc(common.read_sections(text)) == text


def test_fresh_dir_refuses_paths_outside_the_results(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refusing"):
        common.fresh_dir(tmp_path / "x")


def test_md_table_escapes_pipes() -> None:
    table = common.md_table(["a", "b"], [["x|y", 1]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


# ----------------------------------------------------------------------------- search efficiency

class _Trial:
    def __init__(self, at: float, value: float | None, state: str = "COMPLETE") -> None:
        self.datetime_complete = T0 + datetime.timedelta(seconds=at)
        self.value = value
        self.state = type("S", (), {"name": state})()
        self.user_attrs = {"epochs_run": 3}


T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)


class _Study:
    def __init__(self, trials: list[_Trial]) -> None:
        self.user_attrs = {"bench_t0": T0.isoformat()}
        self.trials = trials

    def get_trials(self) -> list[_Trial]:
        return self.trials


def test_curve_counts_only_complete_trials_within_the_budget() -> None:
    study = _Study([_Trial(10, 0.80), _Trial(20, 0.90, "PRUNED"), _Trial(30, 0.85),
                    _Trial(40, 0.84), _Trial(70, 0.95)])
    c = se.curve(study, budget=60)
    assert c["points"] == [[10.0, 0.80], [30.0, 0.85]]
    assert c["final"] == 0.85 and c["finished"] == 4 and c["epochs"] == 12
    assert se.time_to(c["points"], 0.85) == 30.0 and se.time_to(c["points"], 0.9) == math.inf
    assert se.median_time([1.0, math.inf, 3.0]) == 3.0
    assert se.median_time([1.0, math.inf]) == math.inf


def test_summary_times_each_searcher_to_kerastuner_hyperbands_final(docs: Path) -> None:
    runs = []
    for seed, (hb, ours) in enumerate([(0.80, 0.86), (0.84, 0.87), (0.82, 0.85)]):
        runs.append({"method": "kt-hyperband", "seed": seed, "final": hb, "finished": 5,
                     "epochs": 15, "exit_code": 0, "points": [[5.0, hb - 0.1], [40.0, hb]]})
        runs.append({"method": "ours", "seed": seed, "final": ours, "finished": 9,
                     "epochs": 20, "exit_code": 0, "points": [[10.0, ours]]})
    summary = se.summarise(runs)
    assert summary["target"] == 0.82
    assert summary["methods"]["kt-hyperband"]["times_to_target"] == [math.inf, 40.0, 40.0]
    assert summary["methods"]["ours"]["median_time_to_target"] == 10.0
    assert summary["ratio"] == pytest.approx(0.25)
    r = _result(settings={"budget_s": 60.0, "seeds": 3, "epochs": 3, "train_subset": 1000,
                          "val_size": 1000, "methods": ["ours", "kt-hyperband"]},
                runs=runs, summary=summary)
    text = se.render(r)
    assert "quick form" in text and "**0.25×**" in text and "**met**" in text
    assert "one run at a time" in text
    r["settings"].update(parallel=2, threads_per_run=1)  # --parallel 2 says how runs shared
    assert "2 runs at a time, 1 CPU thread(s) each" in se.render(r)
    se.plot(r, quick=True)
    assert (docs / "benchmark-search_efficiency-quick.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- the others

def test_pruning_analysis_and_bound() -> None:
    trials = [{"state": "COMPLETE", "value": 0.8, "epochs_run": 3},
              {"state": "PRUNED", "value": None, "epochs_run": 1},
              {"state": "FAIL", "value": None, "epochs_run": 0}]
    assert pruning.summarise(trials) == {"epochs": 4, "complete": 1, "pruned": 1, "failed": 1,
                                         "best": 0.8}
    runs = [{"seed": 0, "pruner": "hyperband", "wall_s": 1.0,
             "summary": {"epochs": 40, "complete": 5, "pruned": 5, "failed": 0, "best": 0.88}},
            {"seed": 0, "pruner": "none", "wall_s": 2.0,
             "summary": {"epochs": 100, "complete": 10, "pruned": 0, "failed": 0, "best": 0.89}}]
    cmp = pruning.compare(runs)
    assert cmp["epochs_saved_pct"] == pytest.approx(60.0)
    assert cmp["accuracy_lost_pts"] == pytest.approx(1.0)
    assert pruning.max_saving(1)[1] == 0.0
    assert pruning.max_saving(3) == ([3, 2], pytest.approx(0.267, abs=1e-3))
    text = pruning.render(_result(settings={"trials": 10, "seeds": 1, "epochs": 3,
                                            "train_images": 1000, "val_images": 1000},
                                  runs=runs, **cmp))
    assert "60.0% fewer epochs" in text and "**not met**" in text and "27%" in text
    assert "Hyperband pruner" in text and pruning.result_name("hyperband") == "pruning"


def test_pruning_with_successive_halving() -> None:
    assert pruning.max_saving(9, pruner="sha") == ([9], pytest.approx(0.741, abs=1e-3))
    assert pruning.max_saving(3, pruner="sha")[1] == pytest.approx(0.444, abs=1e-3)
    runs = [{"seed": 0, "pruner": "sha", "wall_s": 1.0,
             "summary": {"epochs": 30, "complete": 3, "pruned": 7, "failed": 0, "best": 0.889}},
            {"seed": 0, "pruner": "none", "wall_s": 2.0,
             "summary": {"epochs": 90, "complete": 10, "pruned": 0, "failed": 0, "best": 0.89}}]
    cmp = pruning.compare(runs)
    assert cmp["epochs_saved_pct"] == pytest.approx(66.67, abs=0.01)
    assert cmp["accuracy_lost_pts"] == pytest.approx(0.1)
    text = pruning.render(_result(settings={"trials": 10, "seeds": 1, "epochs": 9,
                                            "train_images": 1000, "val_images": 1000,
                                            "pruner": "sha"}, runs=runs, **cmp))
    assert "(successive halving, 9 epochs per trial)" in text and "**met**" in text
    assert "74%" in text and pruning.result_name("sha") == "pruning-sha"


def test_pruning_with_the_same_trials_in_both_runs() -> None:
    def run(seed: int, pruner: str, *trials: tuple[str, float, int]) -> dict:
        ts = [{"number": i, "state": state, "value": value, "epochs_run": epochs}
              for i, (state, value, epochs) in enumerate(trials)]
        return {"seed": seed, "pruner": pruner, "wall_s": 1.0,
                "summary": pruning.summarise(ts), "trials": ts}

    done, cut = "COMPLETE", "PRUNED"
    runs = [run(0, "sha", (done, 0.80, 9), (cut, 0.50, 1), (cut, 0.70, 1)),
            run(0, "none", (done, 0.80, 9), (done, 0.60, 9), (done, 0.85, 9)),
            run(1, "sha", (done, 0.90, 9), (cut, 0.50, 1), (done, 0.88, 9)),
            run(1, "none", (done, 0.90, 9), (done, 0.55, 9), (done, 0.88, 9))]
    fates = pruning.best_fates(runs)
    assert [(f["seed"], f["number"], f["state"], f["epochs_run"]) for f in fates] == [
        (0, 2, "PRUNED", 1), (1, 0, "COMPLETE", 9)]
    assert pruning.result_name("sha", "random") == "pruning-sha-random"
    assert pruning.result_name("hyperband", "random") == "pruning-random"
    text = pruning.render(_result(settings={"trials": 3, "seeds": 2, "epochs": 9,
                                            "train_images": 1000, "val_images": 1000,
                                            "pruner": "sha", "sampler": "random"},
                                  runs=runs, **pruning.compare(runs)))
    assert "the same trials in both runs" in text and "Random search (seeded)" in text
    assert "trial 2 (0.8500), was pruned there after 1 epoch(s)" in text
    assert "trial 0 (0.9000), was complete there too" in text
    assert "**+2.50 points**" in text and "**not met**" in text


def test_overhead_memory_workers_and_headline_render(docs: Path) -> None:
    o = overhead.render(_result(
        settings={"train_images": 2000, "val_images": 1000, "epochs": 1, "repeats": 2,
                  "config": "[C32k3 max] F | adam", "params": 1000},
        runs_s={"tool": [2.0, 2.2], "bare": [2.0, 2.0], "bare_val": [1.9, 2.1]},
        median_s={"tool": 2.1, "bare": 2.0, "bare_val": 2.0}, overhead_pct=5.0,
        overhead_vs_bare_val_pct=5.0, per_epoch_validation_pct=0.0, fixed_cost_s=0.1,
        breakdown_s={"study": 0.05, "count_params": 0.03, "clear_session": 0.02}))
    assert "**met**" in o and "+5.0%" in o
    # A wandering machine: by medians the tool looks faster, by fastest runs 20% slower.
    noisy = overhead.render(_result(
        settings={"train_images": 2000, "val_images": 1000, "epochs": 3, "repeats": 3,
                  "config": "[C32k3 max] F | adam", "params": 1000, "interim_val_images": 500,
                  "interim_epochs": {"tool": [1], "tool_nop": []}},
        runs_s={"tool": [2.4, 2.6, 2.8], "tool_nop": [2.3, 2.5, 2.9], "bare": [2.0, 2.9, 3.0],
                "bare_val": [2.1, 2.9, 3.0]},
        median_s={"tool": 2.6, "tool_nop": 2.5, "bare": 2.9, "bare_val": 2.9},
        overhead_pct=-10.3, overhead_vs_bare_val_pct=-10.3, per_epoch_validation_pct=0.0,
        fixed_cost_s=-0.3, breakdown_s={"study": 0.05, "count_params": 0.03,
                                        "clear_session": 0.02}, interim_pass_s=0.1))
    assert "**not settled**" in noisy and "**met**" not in noisy and "+20.0%" in noisy
    assert "interim pass after epoch 1" in noisy and "`--pruner none`" in noisy
    assert "0.10 + 1 x 0.10 = **0.20 s per trial**: 6.9% of the bare trial's median" in noisy
    # Since 2026-12-05: CPU time beside wall time, and the training path alone as a side.
    cpu = overhead.render(_result(
        settings={"train_images": 2000, "val_images": 1000, "epochs": 3, "repeats": 3,
                  "config": "[C32k3 max] F | adam", "params": 1000,
                  "clear_session_timed": "after real trials"},
        runs_s={"tool": [2.1, 2.2, 2.3], "training_path": [1.9, 2.0, 2.1],
                "bare": [2.0, 2.0, 2.1], "bare_val": [2.1, 2.2, 2.2]},
        median_s={"tool": 2.2, "training_path": 2.0, "bare": 2.0, "bare_val": 2.2},
        median_cpu_s={"tool": 3.3, "training_path": 3.0, "bare": 3.0, "bare_val": 3.2},
        cpu_overhead_pct=10.0, bookkeeping_s=0.2, bookkeeping_cpu_s=0.3, overhead_pct=10.0,
        overhead_vs_bare_val_pct=0.0, per_epoch_validation_pct=10.0, fixed_cost_s=0.0,
        breakdown_s={"study": 0.05, "count_params": 0.0, "clear_session": 0.04}))
    assert "| CPU median (s) | CPU vs bare |" in cpu and "| 3.30 | +10.0% |" in cpu
    assert "training path alone: `fit_config` + cleanup, no study | 2.00" in cpu
    assert "came to +0.20 s of wall time and +0.30 s of CPU time per trial" in cpu
    assert "0.04 s (timed after real trials)" in cpu

    m = _result(settings={"trials": 3, "train_images": 500, "val_images": 500, "epochs": 1},
                states={"COMPLETE": 3, "PRUNED": 0, "FAIL": 0}, rss_mb_before_first_trial=900,
                rss_mb_after_each_trial=[1000, 1010, 1020], growth_mb=20, growth_after_5_mb=10,
                peak_mb=1020, slope_mb_per_trial=10, bare_rss_mb_after_each_model=[990, 1000, 1008],
                bare_growth_mb=18)
    text = memory.render(m)
    assert "**met**" in text and "TensorFlow/Keras's own" in text
    # Judged at the highest reading, not the last: this run went 120 MB over on the way.
    m["rss_mb_after_each_trial"] = [1000, 1120, 1020]
    text = memory.render(m)
    assert "**not met**" in text and "(after trial 2): **+120.0 MB**" in text
    memory.plot(m, quick=True)
    assert (docs / "benchmark-memory-quick.png").exists()

    w = workers.render(_result(
        settings={"trials": 4, "epochs": 1, "train_subset": 1000, "val_size": 1000},
        runs=[{"workers": 1, "threads": 2, "exit_code": 0, "complete": 4, "trials_per_hour": 100,
               "trials_per_hour_wall": 80, "mean_trial_s": 30.0},
              {"workers": 2, "threads": 1, "exit_code": 0, "complete": 4, "trials_per_hour": 150,
               "trials_per_hour_wall": 110, "mean_trial_s": 40.0}]))
    assert "1.50x" in w

    h = headline.render(_result(
        form="full",
        steps={"search": {"command": "run_search.py --trials 50", "exit_code": 0, "wall_s": 3000},
               "export": {"command": "run_search.py export", "exit_code": 0, "wall_s": 600}},
        search={"complete": 30, "pruned": 20, "failed": 0, "best_val_accuracy": 0.92,
                "protocol": {"epochs": 3, "train_subset": 20000, "val_size": 10000, "seed": 0}},
        model={"trial": 7, "architecture": "[C64k3 max] F H128", "params": 100000,
               "test_accuracy": 0.925, "val_accuracy": 0.921},
        baselines={"models": [{"name": "dense128", "source": "003", "documented_accuracy": 0.88,
                               "documented_metric": "test", "remeasured_val_accuracy": 0.87}]}))
    assert "**not met**" in h and "1.00 points short of 0.935" in h and "0.939" in h


def test_headline_quick_commands_are_small() -> None:
    args = type("A", (), {"quick": True, "trials": 3, "data_dir": None, "ensemble": None})()
    steps = headline.commands(args, Path("/tmp/x"))
    assert list(steps) == ["search", "baselines", "export"]
    assert "--train-subset" in steps["search"] and "--only" in steps["baselines"]
    # The final fit runs once: in the export step, not also at the end of the search.
    assert "--no-export" in steps["search"]
    assert steps["export"][-3:] == ["--results-dir", "/tmp/x", "--no-progress"]
    assert "--ensemble" not in steps["export"]
    assert "--seed" not in steps["search"]
    args.ensemble = 3  # type: ignore[attr-defined]
    args.seed = 1  # type: ignore[attr-defined]
    steps = headline.commands(args, Path("/tmp/x"))
    assert "--ensemble 3" in " ".join(steps["export"])
    # The seed goes to the search only: the baselines and the export read the study's.
    assert "--seed 1" in " ".join(steps["search"])
    assert "--seed" not in steps["baselines"] + steps["export"]
