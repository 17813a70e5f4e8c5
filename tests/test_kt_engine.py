"""The KerasTuner engine on tiny synthetic data, and its parameters' equivalence with Optuna's."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import keras_tuner as kt
import numpy as np
import optuna
import pytest
from optuna.trial import FixedTrial, TrialState
from rich.console import Console

from fmnist_search import kt_engine, stop
from fmnist_search import study as st
from fmnist_search.data import Dataset
from fmnist_search.export import pick_trial
from fmnist_search.kt_engine import TENSORBOARD_HINT, KerasTunerError, run_keras_tuner
from fmnist_search.leaderboard import leaderboard
from fmnist_search.objective import Folds, Objective, SearchProtocol, make_folds
from fmnist_search.progress import SearchProgress
from fmnist_search.training import peak_epoch
from searchspace import CnnConfig, SearchSpace, space_from_dict, suggest_config
from searchspace.keras_tuner import config_from_hp, draw_params

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY = space_from_dict(
    {"n_blocks": [1, 2], "convs_per_block": [1, 1], "filters": [8, 16], "kernel_size": [3],
     "dense_layers": [0, 1], "dense_units": [16], "optimizer": ["adam", "sgd"],
     "learning_rate": {"low": 0.003, "high": 0.03, "log": True}, "batch_size": [32]}
)
# Objective's user attributes for a complete holdout trial: the KerasTuner engine writes them too.
OBJECTIVE_ATTRS = {"config", "summary", "params", "epochs_run", "wall_time", "history", "end",
                   "fold_scores", "val_accuracy_std", "best_epoch", "interim_val_size",
                   "precision"}


def _open(
    tmp_path: Path, name: str, protocol: SearchProtocol, space: SearchSpace = TINY
) -> optuna.Study:
    stored = {**protocol.to_dict(), "space": space.to_dict()}
    storage = st.make_storage(st.default_storage(tmp_path, name))
    return st.open_study(storage, name, st.make_sampler("tpe", 0),
                         st.make_pruner("hyperband", protocol.steps), stored)


def _run(study: optuna.Study, folds: Folds, protocol: SearchProtocol, tmp_path: Path,
         algorithm: str, total: int, **kw: Any) -> None:
    run_keras_tuner(study, folds, kw.pop("space", TINY), protocol, algorithm=algorithm,
                    total_trials=total, seed=0, results_dir=tmp_path, timeout=None, **kw)


# ---------------------------------------------------------------- config_from_hp == suggest_config

def _random_draws(space: SearchSpace, n: int, tmp_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """KerasTuner's own random draws over the space (its RandomSearch oracle), no training."""
    tuner = kt.RandomSearch(lambda hp: draw_params(hp, space), objective="val_accuracy",
                            max_trials=n, seed=3, directory=str(tmp_path), project_name="draws")
    oracle = tuner.oracle
    draws = []
    for i in range(n):
        out = oracle.populate_space(str(i))
        assert out["status"] == "RUNNING"
        draws.append(out["values"])
    return oracle, draws


@pytest.mark.parametrize(
    "space",
    [
        SearchSpace(),
        space_from_dict({"n_blocks": [0, 2], "dense_layers": [0, 0], "optimizer": ["sgd"],
                         "batch_norm": [False], "conv_dropout": [0.0, 0.0],
                         "learning_rate": {"low": 0.01, "high": 0.01, "log": True}}),
        space_from_dict({"n_blocks": [3, 3], "convs_per_block": [2, 2], "dense_layers": [2, 3],
                         "optimizer": ["rmsprop", "adam"], "pooling": ["avg"]}),
    ],
    ids=["default", "degenerate", "fixed-depth"],
)
def test_config_from_hp_equals_suggest_config(space: SearchSpace, tmp_path: Path) -> None:
    oracle, draws = _random_draws(space, 300, tmp_path)
    optuna_names: set[str] = set()
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    for _ in range(300):  # the names Optuna's own engine can draw from this space
        t = study.ask()
        suggest_config(t, space)
        optuna_names |= set(t.params)
        study.tell(t, 0.0)
    assert {h.name for h in oracle.hyperparameters.space} == optuna_names
    n_blocks_seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FixedTrial warns about a value outside its range
        for values in draws:
            hp = oracle.get_space()
            hp.values = dict(values)
            drawn = draw_params(hp, space)
            fixed = FixedTrial(dict(drawn))
            expected = suggest_config(fixed, space)
            assert config_from_hp(hp, space) == expected
            # The active KerasTuner values are exactly the parameters suggest_config asks for.
            assert set(drawn) == set(fixed.params) == set(values)
            assert ("momentum" in drawn) == (drawn["optimizer"] == "sgd")
            for name, v in drawn.items():
                dist = fixed.distributions[name]
                assert dist._contains(dist.to_internal_repr(v)), (name, v, dist)
                if isinstance(dist, optuna.distributions.CategoricalDistribution):
                    assert type(v) is type(dist.choices[0]), (name, v)
            n_blocks_seen.add(drawn["n_blocks"])
    assert n_blocks_seen == set(range(space.n_blocks.low, space.n_blocks.high + 1))


# ---------------------------------------------------------------- the engine

def _hide_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every import of tensorboard fail, as when it is not installed.

    A None entry in sys.modules stops an import; each already-imported submodule needs one,
    since `from tensorboard.plugins.hparams import api` does not re-check the parents.
    """
    names = [m for m in list(sys.modules) if m == "tensorboard" or m.startswith("tensorboard.")]
    for name in {*names, "tensorboard", "tensorboard.plugins", "tensorboard.plugins.hparams",
                 "tensorboard.plugins.hparams.api"}:
        monkeypatch.setitem(sys.modules, name, None)


def test_random_search_trials_land_in_the_study_like_objective_trials(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    protocol = SearchProtocol(epochs=2, seed=0)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, "kt-random", protocol)
    out = io.StringIO()
    sink = SearchProgress(3, 0, protocol.steps, console=Console(file=out, width=200))
    sink.progress.disable = True
    _run(study, folds, protocol, tmp_path, "random", 3, progress=sink)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert "trial 2 complete val acc" in out.getvalue()

    # The Optuna engine's own trial, for comparison.
    ref = optuna.create_study(direction="maximize")
    ref.optimize(Objective(folds, TINY, protocol), n_trials=1)
    assert set(ref.trials[0].user_attrs) == OBJECTIVE_ATTRS
    for t in trials:
        ua = t.user_attrs
        assert OBJECTIVE_ATTRS <= set(ua)
        assert ua["engine"] == "keras-tuner/random" and ua["kt_trial_id"]
        assert ua["interim_val_size"] == 0  # KerasTuner validates every image every epoch
        assert ua["epochs_run"] == 2 and ua["end"] == "complete" and ua["params"] > 0
        hist = json.loads(ua["history"])
        ref_hist = json.loads(ref.trials[0].user_attrs["history"])
        assert len(hist) == 1 and set(hist[0]) == set(ref_hist[0])
        assert len(hist[0]["val_accuracy"]) == 2 and sorted(t.intermediate_values) == [1, 2]
        # The protocol's score: the last epoch's, on every validation image.
        assert t.value == pytest.approx(hist[0]["val_accuracy"][-1], abs=1e-5)
        # As the Optuna engine: the last epoch unless an earlier one is clearly better.
        n_val = len(folds.splits[0][1])
        assert ua["best_epoch"] == peak_epoch(hist[0]["val_accuracy"], n_val)
        # Params and distributions are exactly those of suggest_config on the same values.
        fixed = FixedTrial(t.params)
        assert suggest_config(fixed, TINY) == CnnConfig.from_json(ua["config"])
        assert fixed.distributions == t.distributions
        assert t.datetime_start and t.datetime_complete
        assert t.datetime_start < t.datetime_complete

    df = leaderboard(study.get_trials())
    assert list(df["rank"]) == [1, 2, 3]
    values = [float(t.value or 0.0) for t in trials]
    assert list(df["val_accuracy"]) == sorted(values, reverse=True)
    assert pick_trial(study).value == max(values)

    # "--trials N" is N in the study: rerunning with 3 does nothing; the Optuna engine's TPE
    # then continues the same study with the KerasTuner trials as its history.
    _run(study, folds, protocol, tmp_path, "random", 3)
    assert len(study.get_trials()) == 3
    # KerasTuner's folder gone (or another --results-dir): a fresh project numbers its trials
    # from 0000 again; they are recorded, not taken for the old ones of the same id.
    shutil.rmtree(tmp_path / "kt-random" / "keras_tuner")
    _run(study, folds, protocol, tmp_path, "random", 5)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    runs = [t.user_attrs["kt_run"] for t in trials]
    assert len(set(runs[:3])) == 1 and len(set(runs[3:])) == 1 and runs[0] != runs[3]
    assert trials[3].user_attrs["kt_trial_id"] == trials[0].user_attrs["kt_trial_id"]
    st.run_trials(study, Objective(folds, TINY, protocol), 6)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 6


def test_hyperband_prunes_low_budgets_continues_the_best_and_resumes(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    protocol = SearchProtocol(epochs=3, seed=0)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, "kt-hb", protocol)
    # max_epochs=3, factor 3: three 1-epoch trials, then the best continues to 3 epochs.
    _run(study, folds, protocol, tmp_path, "hyperband", 4)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3 + [TrialState.COMPLETE]
    for t in trials[:3]:
        assert t.user_attrs["pruned_at_step"] == 1 and t.user_attrs["epochs_run"] == 1
        assert sorted(t.intermediate_values) == [1]
    cont = trials[3]
    by_id = {t.user_attrs["kt_trial_id"]: t for t in trials}
    parent = by_id[cont.user_attrs["kt_resumed_from"]]
    assert parent.params == cont.params
    assert cont.user_attrs["epochs_run"] == 2 and cont.user_attrs["kt_initial_epoch"] == 1
    assert sorted(cont.intermediate_values) == [1, 2, 3]
    assert cont.intermediate_values[1] == pytest.approx(parent.intermediate_values[1], abs=1e-5)
    df = leaderboard(study.get_trials())
    assert df.loc[df["state"] == "complete", "rank"].tolist() == [1]
    assert set(df.loc[df["state"] == "pruned", "reason"]) == {"pruned at step 1"}

    # Resume: KerasTuner reloads its brackets and goes on; nothing is recorded twice.
    _run(study, folds, protocol, tmp_path, "hyperband", 5)
    trials = study.get_trials()
    assert len(trials) == 5 and trials[4].state == TrialState.COMPLETE
    assert trials[4].user_attrs["epochs_run"] == 3
    assert trials[4].user_attrs["kt_resumed_from"] is None
    ids = [t.user_attrs["kt_trial_id"] for t in trials]
    assert len(set(ids)) == 5


def test_bayesian_optimisation_runs_its_gaussian_process(
    tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kt_engine, "BAYESIAN_INITIAL_POINTS", 2)  # the third trial is the GP's
    protocol = SearchProtocol(epochs=1, seed=0)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, "kt-bo", protocol)
    _run(study, folds, protocol, tmp_path, "bayesian", 3)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert {t.user_attrs["engine"] for t in trials} == {"keras-tuner/bayesian"}
    assert leaderboard(trials)["rank"].tolist() == [1, 2, 3]


def test_missing_tensorboard_is_one_clear_error(
    tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_tensorboard(monkeypatch)
    protocol = SearchProtocol(epochs=1)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, "kt-notb", protocol)
    with pytest.raises(KerasTunerError) as e:
        _run(study, folds, protocol, tmp_path, "random", 2)
    assert str(e.value) == TENSORBOARD_HINT
    assert study.get_trials() == [] and not (tmp_path / "kt-notb" / "keras_tuner").exists()


def test_all_failed_trials_surface_keras_tuners_error(
    tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the up-front check, KerasTuner itself fails every trial: the error still surfaces.
    monkeypatch.setattr(kt_engine, "check_tensorboard", lambda: None)
    _hide_tensorboard(monkeypatch)
    monkeypatch.setattr(kt_engine, "MAX_CONSECUTIVE_FAILURES", 3)
    protocol = SearchProtocol(epochs=1)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, "kt-fail", protocol)
    with pytest.raises(KerasTunerError, match=r"every KerasTuner trial failed \(3 trials\); "
                       r"first error: .*tensorboard"):
        _run(study, folds, protocol, tmp_path, "random", 2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("tensorboard" in t.user_attrs["fail_reason"] for t in trials)
    assert set(leaderboard(trials)["state"]) == {"fail"}


def test_diverging_trials_are_recorded_failed_with_the_reason(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    protocol = SearchProtocol(epochs=2)
    folds = make_folds(tiny_dataset, protocol)
    nan_folds = Folds(x=np.full_like(folds.x, np.nan), y=folds.y, splits=folds.splits,
                      num_classes=folds.num_classes)
    # ReLU and max pooling would turn NaN into numbers; tanh and average pooling keep it.
    space = space_from_dict({"activation": ["tanh"], "pooling": ["avg"]}, base=TINY)
    study = _open(tmp_path, "kt-nan", protocol, space)
    with pytest.raises(KerasTunerError, match="first error: diverged: loss became nan"):
        # --max-failures 2: the search stops after the second failure in a row.
        _run(study, nan_folds, protocol, tmp_path, "random", 5, space=space, max_failures=2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    for t in trials:
        assert t.user_attrs["fail_reason"].startswith("diverged: loss became nan at epoch 1")
        assert t.user_attrs["end"] == "diverged" and t.params and "config" in t.user_attrs


def test_k_fold_and_unknown_algorithms_are_refused(tiny_dataset: Dataset, tmp_path: Path) -> None:
    protocol = SearchProtocol(epochs=1, cv=2)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, "kt-cv", protocol)
    with pytest.raises(KerasTunerError, match="holdout split only"):
        _run(study, folds, protocol, tmp_path, "random", 2)
    holdout = SearchProtocol(epochs=1)
    with pytest.raises(KerasTunerError, match="unknown KerasTuner algorithm 'grid'"):
        _run(study, make_folds(tiny_dataset, holdout), holdout, tmp_path, "grid", 2)
    assert study.get_trials() == []


def test_timeout_stops_starting_trials(tiny_dataset: Dataset, tmp_path: Path) -> None:
    protocol = SearchProtocol(epochs=1)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, "kt-timeout", protocol)
    run_keras_tuner(study, folds, TINY, protocol, algorithm="random", total_trials=50, seed=0,
                    results_dir=tmp_path, timeout=1e-3)
    assert len(study.get_trials()) <= 1
    assert all(t.value is not None and math.isfinite(t.value) for t in study.get_trials())


def test_batchnorm_trials_are_scored_after_re_estimating_the_statistics(
    tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fmnist_search.training as training

    calls: list[int] = []
    real = training.recalibrate_batchnorm

    def spy(model: Any, x: Any, batch_size: int) -> bool:
        calls.append(len(x))
        return real(model, x, batch_size)

    monkeypatch.setattr(training, "recalibrate_batchnorm", spy)
    protocol = SearchProtocol(epochs=2, seed=0)
    folds = make_folds(tiny_dataset, protocol)
    space = space_from_dict({"batch_norm": [True]}, base=TINY)
    study = _open(tmp_path, "kt-bn", protocol, space)
    _run(study, folds, protocol, tmp_path, "random", 1, space=space)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
    # Before each epoch's validation pass, as the Optuna engine does.
    assert len(calls) == 2 and all(n > 0 for n in calls)


# ---------------------------------------------------------------- a stop request inside KerasTuner

class _Sink:
    """A progress sink that runs `on_batch` after each training batch and `on_recorded`
    after each trial is written to the study; it notes which trials started."""

    def __init__(self, on_batch: Any = None, on_recorded: Any = None) -> None:
        self.on_batch, self.on_recorded = on_batch, on_recorded
        self.started: list[int] = []

    def trial_started(self, number: int, cfg: CnnConfig) -> None:
        self.started.append(number)

    def epoch_started(self, number: int, step: int, total_steps: int) -> None:
        pass

    def batch_done(self, done: int, total: int) -> None:
        if self.on_batch:
            self.on_batch()

    def epoch_done(self, number: int, step: int, value: float) -> None:
        pass

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.on_recorded:
            self.on_recorded()


def _swallowed_sigterm() -> None:
    """A SIGTERM whose KeyboardInterrupt library code caught and dropped (SIGTERM: a test run
    started in the background has SIGINT ignored)."""
    try:
        signal.raise_signal(signal.SIGTERM)
    except KeyboardInterrupt:
        pass


def _interrupted(tiny_dataset: Dataset, tmp_path: Path, name: str, sink: _Sink,
                 handled: bool = False) -> optuna.Study:
    """A random search of 4 one-epoch trials that must end in KeyboardInterrupt; its study.

    `handled`: within the CLI's signal handling (`stop.handled_here`)."""
    protocol = SearchProtocol(epochs=1)
    folds = make_folds(tiny_dataset, protocol)
    study = _open(tmp_path, name, protocol)
    with stop.handled_here() if handled else contextlib.nullcontext():
        with pytest.raises(KeyboardInterrupt):
            _run(study, folds, protocol, tmp_path, "random", 4, progress=sink)
    return study


def test_a_swallowed_interrupt_starts_no_other_keras_tuner_trial(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    """Lost between two trials (here in our recording of one), a stop request still ends the
    search before KerasTuner creates the next trial."""
    sink = _Sink(on_recorded=_swallowed_sigterm)
    study = _interrupted(tiny_dataset, tmp_path, "kt-stop", sink, handled=True)
    assert sink.started == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def _system_error() -> None:
    """A Ctrl-C as C code can hand it on: a SystemError caused by the KeyboardInterrupt."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:  # what CPython's C-call result check does
        raise SystemError("<built-in method> returned a result with an exception set") from e


def test_ctrl_c_turned_into_system_error_in_a_fit_stops_the_keras_tuner_search(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    """KerasTuner counts any Exception as a failed trial and goes on: a Ctrl-C that C code
    turned into a SystemError must stop the search, its trial recorded as interrupted; the
    next run retries that trial."""
    sink = _Sink(on_batch=_system_error)
    study = _interrupted(tiny_dataset, tmp_path, "kt-system-error", sink)
    assert sink.started == [0]
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "interrupted (Ctrl-C)"

    protocol = SearchProtocol(epochs=1)
    _run(study, make_folds(tiny_dataset, protocol), protocol, tmp_path, "random", 2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    # KerasTuner re-runs the trial it had in flight; the study keeps the interrupted attempt.
    assert trials[1].user_attrs["kt_trial_id"] == trials[0].user_attrs["kt_trial_id"]
    assert trials[1].params == trials[0].params


def test_ctrl_c_turned_into_system_error_between_trials_is_ctrl_c(
    tiny_dataset: Dataset, tmp_path: Path
) -> None:
    """Raised after a trial was recorded (our bookkeeping, KerasTuner's), it would otherwise
    leave the search as a bare SystemError: a traceback, not Ctrl-C's exit."""
    sink = _Sink(on_recorded=_system_error)
    study = _interrupted(tiny_dataset, tmp_path, "kt-system-error-between", sink)
    assert sink.started == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
