"""Multi-objective search: dominance, constraints, curve pruning, Pareto leaderboard, latency."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from fmnist_search.data import Dataset
from fmnist_search.leaderboard import leaderboard
from fmnist_search.model import build_cnn, count_params
from fmnist_search.multiobjective import (
    MultiObjectivePruning,
    accuracy_of,
    config_latency,
    constraints_of,
    curve_of,
    directions,
    is_feasible,
    make_constraints_func,
    make_mo_sampler,
    measure_latency,
    non_dominated_sort,
    objective_values,
    pareto_rank_frame,
    parse_objectives,
    protocol_entries,
    set_constraints,
    smallest_beating,
    violates_before_training,
)
from fmnist_search.objective import SearchProtocol, make_folds
from fmnist_search.training import fit_config
from searchspace import CnnConfig, ConvBlock, ConvLayer, DenseLayer

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY_CFG = CnnConfig(
    blocks=(ConvBlock(convs=(ConvLayer(8, 3),)),),
    dense=(DenseLayer(16),),
    batch_size=32,
    learning_rate=0.005,
)
MO = ("accuracy", "params")


# --- objectives ----------------------------------------------------------------------------


def test_parse_objectives_canonical_order_and_errors() -> None:
    assert parse_objectives("accuracy,params") == ("accuracy", "params")
    assert parse_objectives(" Params , latency,accuracy") == ("accuracy", "params", "latency")
    assert parse_objectives("accuracy") == ("accuracy",)
    for bad, msg in [
        ("accuracy,flops", "unknown objective 'flops'"),
        ("params,latency", "must include accuracy"),
        ("accuracy,params,params", "twice"),
        ("accuracy,,params", "empty"),
    ]:
        with pytest.raises(ValueError, match=msg) as e:
            parse_objectives(bad)
        assert "\n" not in str(e.value)


def test_directions_and_values() -> None:
    objs = ("accuracy", "params", "latency")
    assert directions(objs) == ["maximize", "minimize", "minimize"]
    assert objective_values(0.9, 1234, 0.5, objs) == (0.9, 1234.0, 0.5)
    assert objective_values(0.9, 1234, {"latency_ms_b1": 0.7, "latency_ms_b256": 0.1}, objs)[
        2
    ] == pytest.approx(0.7)
    assert objective_values(0.9, 1234, None, MO) == (0.9, 1234.0)
    with pytest.raises(ValueError, match="latency"):
        objective_values(0.9, 1234, None, objs)


def test_protocol_entries_empty_for_plain_search() -> None:
    assert protocol_entries(("accuracy",)) == {}
    assert protocol_entries(MO, 5000, None) == {"objectives": list(MO), "max_params": 5000}


# --- dominance -----------------------------------------------------------------------------


def test_non_dominated_sort_two_objectives_with_ties() -> None:
    # (accuracy max, params min)
    pts = [
        (0.90, 1000),  # 0: front
        (0.80, 200),  # 1: front
        (0.80, 200),  # 2: equal to 1: same front, neither dominates
        (0.85, 1000),  # 3: dominated by 0 only -> depth 1
        (0.70, 2000),  # 4: dominated by 0, 1, 3 -> depth 2
        (0.90, 1000),  # 5: equal to 0
        (0.95, 5000),  # 6: most accurate -> front
        (0.80, 300),  # 7: dominated by 1 (same acc, bigger) -> depth 1
    ]
    assert non_dominated_sort(pts, ["maximize", "minimize"]) == [0, 0, 0, 1, 2, 0, 0, 1]
    assert non_dominated_sort([], ["maximize", "minimize"]) == []
    # All equal: one front.
    assert non_dominated_sort([(1, 1)] * 3, ["minimize", "minimize"]) == [0, 0, 0]


def test_non_dominated_sort_three_objectives_and_nan() -> None:
    dirs = directions(("accuracy", "params", "latency"))
    pts = [
        (0.9, 1000, 2.0),  # 0: front
        (0.9, 1000, 1.0),  # 1: dominates 0 (faster, rest equal)
        (0.8, 500, 3.0),  # 2: front (smallest)
        (0.8, 600, 3.0),  # 3: dominated by 2
        (0.95, 9000, 9.0),  # 4: front (most accurate)
        (0.85, 800, 0.5),  # 5: front (fastest)
        (math.nan, 100, 0.1),  # 6: NaN accuracy is the worst, but nothing is smaller/faster
    ]
    depth = non_dominated_sort(pts, dirs)
    assert depth == [1, 0, 0, 1, 0, 0, 0]
    # The same in Optuna's enum form, and a pure minimisation check.
    assert non_dominated_sort(pts, [optuna.study.StudyDirection.MAXIMIZE] + dirs[1:]) == depth
    assert non_dominated_sort([(1, 2, 3), (2, 3, 4), (3, 4, 5)], ["minimize"] * 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        non_dominated_sort([(1, 2)], ["maximize"])
    with pytest.raises(ValueError, match="direction"):
        non_dominated_sort([(1, 2)], ["up", "down"])


# --- constraints ---------------------------------------------------------------------------


def _frozen(**user_attrs: Any) -> FrozenTrial:
    return optuna.trial.create_trial(value=0.5, user_attrs=user_attrs)


def test_constraints_func_values() -> None:
    f = make_constraints_func(1000, 2.0)
    assert f is not None
    assert f(_frozen(params=500, latency_ms_b1=3.0)) == pytest.approx([-0.5, 0.5])
    assert f(_frozen(params=1000, latency_ms_b1=2.0)) == pytest.approx([0.0, 0.0])
    # Not measured yet (a trial stopped early): unknown is not a breach.
    assert f(_frozen()) == [0.0, 0.0]
    only_params = make_constraints_func(1000, None)
    assert only_params is not None and only_params(_frozen(params=1500)) == pytest.approx([0.5])
    assert make_constraints_func(None, None) is None
    with pytest.raises(ValueError, match="max-params"):
        make_constraints_func(0, None)
    with pytest.raises(ValueError, match="max-latency-ms"):
        make_constraints_func(None, -1.0)


def test_violates_before_training() -> None:
    assert violates_before_training(900, 1000) is None
    assert violates_before_training(900, None) is None
    assert violates_before_training(1001, 1000) == "params 1,001 > --max-params 1,000"
    why = violates_before_training(10, 1000, latency_ms_b1=2.5, max_latency_ms=2.0)
    assert why is not None and "latency 2.5 ms/image" in why
    assert violates_before_training(10, None, latency_ms_b1=1.5, max_latency_ms=2.0) is None


def test_is_feasible_reads_both_constraint_formats() -> None:
    old = optuna.trial.create_trial(value=1.0, system_attrs={"constraints": [-1.0, 0.5]})
    new = optuna.trial.create_trial(value=1.0, system_attrs={"constraints:params": -0.2})
    assert constraints_of(old) == {"0": -1.0, "1": 0.5} and not is_feasible(old)
    assert constraints_of(new) == {"params": -0.2} and is_feasible(new)
    assert is_feasible(optuna.trial.create_trial(value=1.0))


def _trivial(mode: str, max_params: int) -> Any:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_int("x", 1, 100)
        trial.set_user_attr("params", x * 100)
        if mode == "set_constraint":
            set_constraints(trial, max_params, None)
        if trial.number == 3:
            raise optuna.TrialPruned()
        return x / 100, x * 100

    return objective


@pytest.mark.parametrize("mode", ["set_constraint", "constraints_func"])
def test_nsga2_study_records_infeasible_trials(mode: str) -> None:
    limit = 5000
    func = make_constraints_func(limit, None) if mode == "constraints_func" else None
    sampler = make_mo_sampler("nsga2", seed=0, population_size=4, constraints_func=func)
    study = optuna.create_study(directions=directions(MO), sampler=sampler)
    study.optimize(_trivial(mode, limit), n_trials=12)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == 1 and states.count(TrialState.COMPLETE) == 11
    for t in study.trials:
        # Pruned trials carry their constraints too (Optuna 5).
        assert constraints_of(t), t.number
        assert is_feasible(t) == (t.user_attrs["params"] <= limit)
    assert any(not is_feasible(t) for t in study.trials)
    assert any(is_feasible(t) for t in study.trials)
    # Optuna's own front leaves the infeasible trials out.
    assert all(is_feasible(t) for t in study.best_trials)


def test_mo_sampler_names() -> None:
    assert isinstance(make_mo_sampler("tpe", 0), optuna.samplers.TPESampler)
    # The warm start's points come before TPE's 10 random trials, not instead of them.
    assert make_mo_sampler("tpe", 0, enqueued=8)._n_startup_trials == 18  # type: ignore[attr-defined]
    assert isinstance(make_mo_sampler("random", 0), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match="cmaes"):
        make_mo_sampler("cmaes", 0)
    with pytest.raises(ValueError, match="constraints_func"):
        make_mo_sampler("random", 0, constraints_func=make_constraints_func(10, None))


# --- pruning rule on synthetic curves ------------------------------------------------------


def _add(
    study: optuna.Study,
    curve: dict[int, float],
    values: tuple[float, float] | None = None,
    constraints: list[float] | None = None,
) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE if values else TrialState.PRUNED,
            values=list(values) if values else None,
            user_attrs={"curve": {str(k): v for k, v in curve.items()}},
            system_attrs={"constraints": constraints} if constraints else None,
        )
    )


def _synthetic_study() -> optuna.Study:
    study = optuna.create_study(directions=directions(MO))
    _add(study, {1: 0.60, 2: 0.80, 3: 0.90}, (0.90, 1000))  # front
    _add(study, {1: 0.50, 2: 0.70, 3: 0.80}, (0.80, 200))  # front
    _add(study, {1: 0.30, 2: 0.60, 3: 0.70}, (0.70, 2000))  # dominated
    _add(study, {1: 0.20})  # pruned at step 1
    return study


def _running(study: optuna.Study, params: int = 500) -> optuna.Trial:
    trial = study.ask()
    trial.set_user_attr("params", params)
    return trial


def test_pruning_rule_median_of_front() -> None:
    study = _synthetic_study()
    pruning = MultiObjectivePruning(study, study.directions, n_startup=4, max_steps=3)
    # Step 1: 4 finished trials reported it; the front's step-1 median is (0.6 + 0.5) / 2.
    assert pruning.report_and_should_prune(_running(study), 1, 0.54)
    keep = _running(study)
    assert not pruning.report_and_should_prune(keep, 1, 0.56)
    # Step 2: only 3 finished trials reached it (< n_startup): no pruning however bad.
    assert not pruning.report_and_should_prune(keep, 2, 0.0)
    # The final step: never.
    assert not pruning.report_and_should_prune(keep, 3, 0.0)
    assert curve_of(keep) == {1: 0.56, 2: 0.0, 3: 0.0}
    assert keep.user_attrs["curve"] == {"1": 0.56, "2": 0.0, "3": 0.0}
    # With n_startup 3, step 2 now prunes below median(0.8, 0.7).
    loose = MultiObjectivePruning(study, study.directions, n_startup=3, max_steps=3)
    assert loose.report_and_should_prune(_running(study), 2, 0.74)
    assert not loose.report_and_should_prune(_running(study), 2, 0.76)


def test_pruning_rule_falls_back_to_all_finished_trials() -> None:
    # One trial dominates every other: the front has 1 member, fewer than 2.
    study = optuna.create_study(directions=directions(MO))
    _add(study, {1: 0.9}, (0.95, 100))
    _add(study, {1: 0.5}, (0.60, 900))
    _add(study, {1: 0.4}, (0.50, 900))
    _add(study, {1: 0.1})
    pruning = MultiObjectivePruning(study, study.directions, n_startup=4, max_steps=2)
    # median(0.9, 0.5, 0.4, 0.1) = 0.45
    assert pruning.report_and_should_prune(_running(study, 1000), 1, 0.44)
    assert not pruning.report_and_should_prune(_running(study, 1000), 1, 0.46)


def test_pruning_size_guard_and_infeasible_front() -> None:
    study = _synthetic_study()
    guarded = MultiObjectivePruning(
        study, study.directions, n_startup=4, max_steps=3, objectives=MO
    )
    # Smaller than every front member (200): on the front whatever its accuracy.
    assert not guarded.report_and_should_prune(_running(study, params=150), 1, 0.0)
    assert guarded.report_and_should_prune(_running(study, params=200), 1, 0.0)
    unguarded = MultiObjectivePruning(study, study.directions, n_startup=4, max_steps=3)
    assert unguarded.report_and_should_prune(_running(study, params=150), 1, 0.0)
    # An infeasible trial is not on the front: here it would have been its top member.
    _add(study, {1: 0.99, 2: 0.99, 3: 0.99}, (0.99, 100), constraints=[1.0])
    # Front still {0.6, 0.5} at step 1 (the infeasible one counts as a peer only).
    assert guarded.report_and_should_prune(_running(study, 500), 1, 0.54)
    assert not guarded.report_and_should_prune(_running(study, 500), 1, 0.56)


def test_pruning_reads_trials_through_a_storage() -> None:
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="mo", directions=directions(MO))
    for t in _synthetic_study().trials:
        study.add_trial(t)
    pruning = MultiObjectivePruning(storage, study.directions, n_startup=4, max_steps=3)
    assert pruning.report_and_should_prune(_running(study), 1, 0.54)
    assert not pruning.report_and_should_prune(_running(study), 1, 0.56)


def test_accuracy_of_single_and_multi_objective() -> None:
    mo = optuna.trial.create_trial(values=[0.8, 100])
    so = optuna.trial.create_trial(value=0.7)
    pruned = optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"curve": {"2": 0.4}})
    failed = optuna.trial.create_trial(state=TrialState.FAIL)
    assert [accuracy_of(t) for t in (mo, so, pruned, failed)] == [0.8, 0.7, 0.4, None]


# --- end to end on tiny data ---------------------------------------------------------------


def test_multiobjective_study_end_to_end_prunes(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=2, seed=0)
    folds = make_folds(tiny_dataset, protocol)
    tr, va = folds.splits[0]
    # A TPE past its start-up trials, so its next proposal has to digest a pruned trial.
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True)
    study = optuna.create_study(directions=directions(MO), sampler=sampler)
    pruning = MultiObjectivePruning(
        study, study.directions, n_startup=3, max_steps=protocol.steps, objectives=MO
    )
    # n_startup 3: the first three trials can't be pruned at all; the fourth can.
    for lr in (0.01, 0.01, 0.01, 1e-6):  # the last one cannot learn in one epoch
        study.enqueue_trial({"lr": lr})

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        cfg = dataclasses.replace(
            TINY_CFG, learning_rate=trial.suggest_float("lr", 1e-6, 1e-2, log=True)
        )
        params = count_params(cfg, folds.num_classes)
        trial.set_user_attr("params", params)
        set_constraints(trial, 10**6, None)

        def on_epoch(e: int, logs: dict[str, float]) -> None:
            if pruning.report_and_should_prune(trial, e + 1, logs["val_accuracy"]):
                trial.set_user_attr("pruned_at_step", e + 1)
                raise optuna.TrialPruned(f"pruned at step {e + 1}")

        res = fit_config(
            cfg,
            folds.x[tr],
            folds.y[tr],
            folds.x[va],
            folds.y[va],
            epochs=protocol.epochs,
            seed=trial.number,
            num_classes=folds.num_classes,
            on_epoch=on_epoch,
        )
        return objective_values(res.best_val_accuracy, params, None, MO)

    study.optimize(objective, n_trials=4)
    states = [t.state for t in study.trials]
    assert states[:3] == [TrialState.COMPLETE] * 3, [t.user_attrs for t in study.trials]
    bad = study.trials[3]
    assert bad.state == TrialState.PRUNED and bad.values is None
    assert bad.user_attrs["pruned_at_step"] == 1 and list(curve_of(bad)) == [1]
    assert not bad.intermediate_values and is_feasible(bad) and constraints_of(bad)
    assert accuracy_of(bad) == pytest.approx(curve_of(bad)[1])
    # Optuna accepts the outcome: the sampler proposes again with the pruned trial in view.
    nxt = study.ask()
    assert 1e-6 <= nxt.suggest_float("lr", 1e-6, 1e-2, log=True) <= 1e-2
    study.tell(nxt, [0.5, 1000.0])
    assert len(study.best_trials) >= 1


def test_pruned_curve_must_not_be_intermediate_values() -> None:
    # Why the curve is a user attribute: MO-TPE cannot score a pruned trial's intermediate
    # values (it asks for study.direction). Guards the module docstring's claim.
    study = optuna.create_study(
        directions=directions(MO), sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=1)
    )
    dist = {"x": FloatDistribution(0, 1)}
    for i in range(3):
        study.add_trial(
            optuna.trial.create_trial(params={"x": i / 3}, distributions=dist, values=[i / 3, i])
        )
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.9},
            distributions=dist,
            state=TrialState.PRUNED,
            intermediate_values={1: 0.5},
        )
    )
    with pytest.raises(RuntimeError, match="direction"):
        study.ask().suggest_float("x", 0, 1)


# --- leaderboard ---------------------------------------------------------------------------


def _board() -> pd.DataFrame:
    rows = [
        # trial, kind, state, acc, params, latency, feasible
        (0, "trial", "complete", 0.90, 1000, 1.0, True),
        (1, "trial", "complete", 0.80, 200, 0.5, True),
        (2, "trial", "complete", 0.85, 1000, 1.0, True),  # behind 0
        (3, "trial", "complete", 0.95, 150, 0.1, False),  # infeasible
        ("base_a", "baseline", "complete", 0.88, 3000, math.nan, True),  # behind 0
        ("base_b", "baseline", "complete", 0.70, 100, math.nan, True),  # smallest: front
        (4, "trial", "pruned", 0.40, 100, math.nan, True),
        (5, "trial", "fail", math.nan, math.nan, math.nan, True),
    ]
    df = pd.DataFrame(
        rows,
        columns=["trial", "kind", "state", "val_accuracy", "params", "latency_ms", "feasible"],
    )
    df.insert(0, "rank", pd.array([1, 4, 3, None, 2, 5, None, None], dtype="Int64"))
    return df


def test_pareto_rank_frame_orders_by_front_then_accuracy() -> None:
    out = pareto_rank_frame(_board(), MO)
    assert list(out.columns[:2]) == ["rank", "front"]
    assert list(out["trial"]) == [0, 1, "base_b", "base_a", 2, 3, 4, 5]
    assert list(out["front"].astype(object).where(out["front"].notna(), None)) == [
        0,
        0,
        0,
        1,
        1,
        None,
        None,
        None,
    ]
    assert list(out["rank"].astype(object).where(out["rank"].notna(), None)) == [
        1,
        2,
        3,
        4,
        5,
        None,
        None,
        None,
    ]
    # Without the feasible column trial 3 dominates everything but the smallest baseline.
    loose = pareto_rank_frame(_board().drop(columns="feasible"), MO)
    assert list(loose["trial"][:3]) == [3, "base_b", 0]
    assert list(loose["front"][:3]) == [0, 0, 1]


def test_pareto_rank_frame_with_latency_and_real_leaderboard() -> None:
    lat = pareto_rank_frame(_board(), ("accuracy", "params", "latency"))
    # Baselines without a latency count as slowest; base_b stays on the front (smallest).
    assert int(lat.loc[lat["trial"] == "base_b", "front"].iloc[0]) == 0
    # A real leaderboard frame (single-objective trials) goes through unchanged in shape.
    trials = [
        optuna.trial.create_trial(value=v, user_attrs={"params": p, "summary": f"m{i}"})
        for i, (v, p) in enumerate([(0.9, 1000), (0.8, 100), (0.85, 2000)])
    ]
    for i, t in enumerate(trials):
        t.number = i
    board = leaderboard(trials)
    out = pareto_rank_frame(board, MO)
    assert len(out) == len(board) and set(board.columns) < set(out.columns)
    assert list(out["trial"]) == [0, 1, 2] and list(out["front"]) == [0, 0, 1]


def test_smallest_beating() -> None:
    df = _board()
    got = smallest_beating(df)
    # base_a (0.88): trials 0 (1000) beat it; 3 is infeasible; 2 (0.85) does not.
    # base_b (0.70): 0, 1, 2 beat it; 1 is the smallest.
    assert got == {"base_a": 0, "base_b": 1}
    df.loc[df["trial"] == 0, "val_accuracy"] = 0.87
    assert smallest_beating(df)["base_a"] is None


# --- latency -------------------------------------------------------------------------------


def test_latency_is_measured_on_a_tiny_model() -> None:
    model = build_cnn(TINY_CFG, compile_model=False)
    lat = measure_latency(model, batch_sizes=(1, 8), repeats=3)
    assert set(lat) == {"latency_ms_b1", "latency_ms_b8"}
    assert all(v > 0 and math.isfinite(v) for v in lat.values())
    untrained = config_latency(TINY_CFG, batch_sizes=(1,), repeats=2)
    assert untrained["latency_ms_b1"] > 0
    with pytest.raises(ValueError):
        measure_latency(model, repeats=0)


def test_no_future_warning_on_recommended_path() -> None:
    # set_constraints + a sampler without constraints_func: nothing deprecated in Optuna 5.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        study = optuna.create_study(
            directions=directions(MO), sampler=make_mo_sampler("nsga2", 0, population_size=4)
        )
        study.optimize(_trivial("set_constraint", 10**6), n_trials=2)
    assert np.all([is_feasible(t) for t in study.trials])
