"""Accuracy vs size (and latency): multi-objective search, constraints, Pareto ranking.

Objectives are named `accuracy` (maximize), `params` (minimize) and `latency` (minimize: CPU
milliseconds per image at batch 1). They are always kept in that canonical order, so a
trial's `values[0]` is its validation accuracy in single- and multi-objective studies alike.

Pruning. Optuna refuses `Trial.report` and `Trial.should_prune` in multi-objective studies
(NotImplementedError), so `MultiObjectivePruning` keeps each trial's learning curve in the user
attribute "curve" ({"step": accuracy}) and decides itself. At step s a trial is pruned when
all of these hold:

1. s is not the final step (a trial that reached its last epoch is always scored);
2. at least `n_startup` other finished (complete or pruned) trials have reported step s;
3. the trial is not smaller than every trial on the current Pareto front (when `params` is an
   objective): such a trial is on the front whatever its accuracy, as anything dominating it
   would need fewer parameters than every front member;
4. its accuracy at step s is below the median of the step-s accuracies of the front trials,
   i.e. the complete (and feasible) trials that no other complete feasible trial dominates;
   when fewer than 2 front trials reported step s, of all the finished trials that did.

The objective then raises `optuna.TrialPruned`, which Optuna 5 records as PRUNED with no values
in a multi-objective study too. Never store such a curve as intermediate values: multi-objective
TPE scores pruned trials by their last intermediate value through `study.direction`, which
raises RuntimeError in a multi-objective study.

Constraints. `--max-params` and `--max-latency-ms` are hard constraints: each trial's value is
its relative excess (params / max_params - 1, latency / max_latency_ms - 1), <= 0 feasible.
Optuna 5 deprecates samplers' `constraints_func` (FutureWarning; removal planned for 7.0) in
favour of `Trial.set_constraint`; both are provided (`set_constraints`, `make_constraints_func`)
and samplers read either from the trial's system attributes.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from searchspace.config import CnnConfig

OBJECTIVES = ("accuracy", "params", "latency")  # canonical order: accuracy is values[0]
_DIRECTIONS = {"accuracy": "maximize", "params": "minimize", "latency": "minimize"}
# The leaderboard column holding each objective.
COLUMNS = {"accuracy": "val_accuracy", "params": "params", "latency": "latency_ms"}
CURVE_ATTR = "curve"
PARAMS_ATTR = "params"
LATENCY_ATTR = "latency_ms_b1"  # the latency objective and constraint: ms per image, batch 1
MO_SAMPLERS = ("tpe", "nsga2", "random", "qmc")
ConstraintsFunc = Callable[[FrozenTrial], Sequence[float]]
_CONSTRAINTS_KEY = "constraints"  # Optuna's system attribute (list, or "constraints:<name>")


def parse_objectives(text: str) -> tuple[str, ...]:
    """Parse `--objectives`, e.g. "accuracy,params", into the canonical order.

    Raises:
        ValueError: One line, for an unknown or repeated name or when accuracy is missing.
    """
    names = [n.strip().lower() for n in text.split(",")]
    if any(not n for n in names):
        raise ValueError(f"empty objective name in {text!r} (use e.g. accuracy,params)")
    for n in names:
        if n not in OBJECTIVES:
            raise ValueError(f"unknown objective {n!r} (choose from {', '.join(OBJECTIVES)})")
    if len(set(names)) != len(names):
        raise ValueError(f"objective listed twice in {text!r}")
    if "accuracy" not in names:
        raise ValueError("--objectives must include accuracy")
    return tuple(o for o in OBJECTIVES if o in names)


def directions(objectives: Sequence[str]) -> list[str]:
    """Optuna study directions for `objectives` ("maximize" / "minimize")."""
    return [_DIRECTIONS[o] for o in objectives]


def objective_values(
    accuracy: float,
    params: int | float,
    latency_ms: float | Mapping[str, float] | None,
    objectives: Sequence[str],
) -> tuple[float, ...]:
    """The values a trial returns to Optuna, in the order of `objectives`.

    Args:
        accuracy: Validation accuracy (mean over folds).
        params: Parameter count.
        latency_ms: Milliseconds per image at batch 1, or `measure_latency`'s dict; needed
            only when "latency" is an objective.
        objectives: Objective names (from `parse_objectives`).
    """
    if isinstance(latency_ms, Mapping):
        latency_ms = latency_ms.get(LATENCY_ATTR)
    out = []
    for o in objectives:
        if o == "accuracy":
            out.append(float(accuracy))
        elif o == "params":
            out.append(float(params))
        elif o == "latency":
            if latency_ms is None:
                raise ValueError("the latency objective needs a measured latency")
            out.append(float(latency_ms))
        else:
            raise ValueError(f"unknown objective {o!r} (choose from {', '.join(OBJECTIVES)})")
    return tuple(out)


def protocol_entries(
    objectives: Sequence[str], max_params: int | None = None, max_latency_ms: float | None = None
) -> dict[str, Any]:
    """Entries to add to a study's stored protocol; empty for a plain accuracy search.

    Empty in the default case so that existing single-objective studies still match their
    stored protocol and can be resumed.
    """
    out: dict[str, Any] = {}
    if tuple(objectives) != ("accuracy",):
        out["objectives"] = list(objectives)
    if max_params is not None:
        out["max_params"] = int(max_params)
    if max_latency_ms is not None:
        out["max_latency_ms"] = float(max_latency_ms)
    return out


# --- latency -------------------------------------------------------------------------------


def measure_latency(
    model: Any, batch_sizes: Sequence[int] = (1, 256), repeats: int = 10, *, seed: int = 0
) -> dict[str, float]:
    """CPU inference time per image, in ms, at each batch size.

    Each batch size is warmed up first (tracing the predict function), then timed `repeats`
    times with `predict_on_batch`; the median is kept, as other processes share the CPU.
    Weights do not change the time, so an untrained model measures the same.

    Returns:
        {"latency_ms_b1": ..., "latency_ms_b256": ...} for the default batch sizes.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    shape = tuple(int(d) for d in model.input_shape[1:])
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    for b in batch_sizes:
        x = rng.random((int(b), *shape), dtype=np.float32)
        for _ in range(2):
            model.predict_on_batch(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.predict_on_batch(x)
            times.append(time.perf_counter() - t0)
        out[f"latency_ms_b{int(b)}"] = statistics.median(times) * 1000.0 / int(b)
    return out


def config_latency(
    cfg: CnnConfig,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (28, 28, 1),
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 10,
) -> dict[str, float]:
    """`measure_latency` of the (untrained) model `cfg` describes: usable before training.

    Measured in float32, as the model would be exported, whatever precision trains it.
    """
    from .model import build_cnn
    from .precision import as_float32

    model = as_float32(
        build_cnn(cfg, num_classes=num_classes, input_shape=input_shape, compile_model=False)
    )
    try:
        return measure_latency(model, batch_sizes, repeats)
    finally:
        del model


# --- constraints ---------------------------------------------------------------------------


def _check_limits(max_params: int | None, max_latency_ms: float | None) -> None:
    if max_params is not None and max_params < 1:
        raise ValueError(f"--max-params must be >= 1, got {max_params}")
    if max_latency_ms is not None and not (max_latency_ms > 0 and math.isfinite(max_latency_ms)):
        raise ValueError(f"--max-latency-ms must be > 0, got {max_latency_ms}")


def constraint_values(
    user_attrs: Mapping[str, Any], max_params: int | None, max_latency_ms: float | None
) -> dict[str, float]:
    """Relative excess per active limit, read from user attrs "params" and "latency_ms_b1".

    Relative, so the two limits weigh alike in Optuna's summed violation. A missing attribute
    (a trial stopped before it was measured) counts as feasible (0.0): unknown is not a breach.
    """
    out: dict[str, float] = {}
    if max_params is not None:
        p = user_attrs.get(PARAMS_ATTR)
        out[PARAMS_ATTR] = float(p) / max_params - 1.0 if p is not None else 0.0
    if max_latency_ms is not None:
        lat = user_attrs.get(LATENCY_ATTR)
        out[LATENCY_ATTR] = float(lat) / max_latency_ms - 1.0 if lat is not None else 0.0
    return out


def make_constraints_func(
    max_params: int | None, max_latency_ms: float | None
) -> ConstraintsFunc | None:
    """A sampler `constraints_func` for the limits, or None when there is none.

    Optuna 5 calls it after each complete or pruned trial. Deprecated there in favour of
    `Trial.set_constraint` (see `set_constraints`); use one of the two, not both.
    """
    _check_limits(max_params, max_latency_ms)
    if max_params is None and max_latency_ms is None:
        return None

    def constraints(trial: FrozenTrial) -> Sequence[float]:
        return list(constraint_values(trial.user_attrs, max_params, max_latency_ms).values())

    return constraints


def set_constraints(
    trial: optuna.Trial, max_params: int | None, max_latency_ms: float | None
) -> dict[str, float]:
    """Record the limits' values on a running trial (Optuna 5's `Trial.set_constraint`).

    Call it once the user attrs "params" (and "latency_ms_b1") are set, before training, so a
    trial pruned or failed later still carries them.

    Returns:
        The values set ({} when there is no limit).
    """
    _check_limits(max_params, max_latency_ms)
    values = constraint_values(trial.user_attrs, max_params, max_latency_ms)
    for key, v in values.items():
        trial.set_constraint(key, v)
    return values


def constraints_of(trial: FrozenTrial) -> dict[str, float]:
    """A trial's stored constraint values (Optuna's list or per-name format); {} when none."""
    attrs = trial.system_attrs
    out = {str(i): float(v) for i, v in enumerate(attrs.get(_CONSTRAINTS_KEY) or ())}
    prefix = _CONSTRAINTS_KEY + ":"
    out.update({k[len(prefix) :]: float(v) for k, v in attrs.items() if k.startswith(prefix)})
    return out


def is_feasible(trial: FrozenTrial) -> bool:
    """True unless a stored constraint value is > 0 (a trial without constraints is feasible)."""
    return all(v <= 0 for v in constraints_of(trial).values())


def violates_before_training(
    params: int,
    max_params: int | None,
    latency_ms_b1: float | None = None,
    max_latency_ms: float | None = None,
) -> str | None:
    """Why a trial breaks a limit before any training (None when it does not).

    Params come from `count_params`; latency from `config_latency`, as it does not depend on
    the weights.
    """
    if max_params is not None and params > max_params:
        return f"params {params:,} > --max-params {max_params:,}"
    if max_latency_ms is not None and latency_ms_b1 is not None and latency_ms_b1 > max_latency_ms:
        return (
            f"latency {latency_ms_b1:.3g} ms/image at batch 1 > --max-latency-ms {max_latency_ms:g}"
        )
    return None


def make_mo_sampler(
    name: str,
    seed: int,
    *,
    population_size: int = 10,
    constraints_func: ConstraintsFunc | None = None,
    enqueued: int = 0,
) -> optuna.samplers.BaseSampler:
    """A seeded sampler for a multi-objective study.

    Args:
        name: "tpe" (multi-objective TPE), "nsga2", "random" or "qmc" (CMA-ES is
            single-objective only).
        seed: The sampler's seed.
        population_size: NSGA-II generation size; Optuna's 50 would make a 50-trial search
            one random generation.
        constraints_func: Deprecated in Optuna 5 (prefer `set_constraints`); tpe/nsga2 only.
        enqueued: Trials the search queues itself (the warm start); TPE draws its 10
            random trials after them, as `study.make_sampler` does.
    """
    with warnings.catch_warnings():
        # multivariate/group TPE and QMC are experimental; constraints_func is deprecated
        # (FutureWarning), which the caller chose knowingly.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed,
                multivariate=True,
                group=True,
                n_startup_trials=10 + enqueued,
                constraints_func=constraints_func,
            )
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(
                seed=seed, population_size=population_size, constraints_func=constraints_func
            )
        if constraints_func is not None and name in MO_SAMPLERS:
            raise ValueError(f"sampler {name!r} takes no constraints_func (use set_constraints)")
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(
        f"sampler {name!r} can't run a multi-objective study (choose from {', '.join(MO_SAMPLERS)})"
    )


# --- dominance -----------------------------------------------------------------------------


def _minimize_signs(dirs: Sequence[str | StudyDirection]) -> np.ndarray:
    signs = []
    for d in dirs:
        if d in ("maximize", StudyDirection.MAXIMIZE):
            signs.append(-1.0)
        elif d in ("minimize", StudyDirection.MINIMIZE):
            signs.append(1.0)
        else:
            raise ValueError(f"unknown direction {d!r} (maximize or minimize)")
    return np.asarray(signs)


def non_dominated_sort(
    points: Sequence[Sequence[float]], directions: Sequence[str | StudyDirection]
) -> list[int]:
    """Dominance depth of each point: 0 = Pareto front, 1 = front once 0 is removed, ...

    A point dominates another when it is at least as good in every objective and better in
    one; equal points do not dominate each other (same depth). NaN counts as the worst value.
    """
    if len(points) == 0:
        return []
    signs = _minimize_signs(directions)
    m = np.asarray(points, dtype=float)
    if m.ndim != 2 or m.shape[1] != len(signs):
        raise ValueError(f"each point needs {len(signs)} values, one per direction")
    m = m * signs
    m[np.isnan(m)] = np.inf
    # dom[i, j]: point j dominates point i.
    dom = (m[None, :, :] <= m[:, None, :]).all(-1) & (m[None, :, :] < m[:, None, :]).any(-1)
    depth = np.full(len(m), -1)
    left = np.ones(len(m), dtype=bool)
    d = 0
    while left.any():
        front = left & ~dom[:, left].any(axis=1)
        depth[front] = d
        left &= ~front
        d += 1
    return [int(x) for x in depth]


# --- pruning -------------------------------------------------------------------------------


def curve_of(trial: FrozenTrial | optuna.Trial) -> dict[int, float]:
    """The learning curve stored by `MultiObjectivePruning`: {step: accuracy}."""
    raw = trial.user_attrs.get(CURVE_ATTR) or {}
    return {int(k): float(v) for k, v in raw.items()}


def accuracy_of(trial: FrozenTrial) -> float | None:
    """Validation accuracy of a complete trial (values[0]); a pruned one's last curve value.

    Works for single- and multi-objective trials (`FrozenTrial.value` raises for the latter).
    """
    if trial.state == TrialState.COMPLETE:
        return float(trial.values[0]) if trial.values else None
    if trial.state == TrialState.PRUNED:
        curve = curve_of(trial) or dict(trial.intermediate_values)
        if curve:
            return float(curve[max(curve)])
    return None


class MultiObjectivePruning:
    """Pruning on the accuracy curve for multi-objective studies (the rule: module docstring).

    Args:
        study_or_storage: The study, or its storage (trials are then read from the study of
            the trial being decided, by name).
        directions: The study's directions; values[0] must be the accuracy.
        n_startup: Finished trials that must have reported a step before it can prune.
        max_steps: The final step (epochs x folds), at which nothing is pruned.
        objectives: The objective names; enables the size guard (rule 3) when they include
            "params".
    """

    def __init__(
        self,
        study_or_storage: optuna.Study | optuna.storages.BaseStorage,
        directions: Sequence[str | StudyDirection],
        n_startup: int = 4,
        *,
        max_steps: int,
        objectives: Sequence[str] | None = None,
    ) -> None:
        if n_startup < 1 or max_steps < 1:
            raise ValueError("n_startup and max_steps must be >= 1")
        self._source = study_or_storage
        self.directions = list(directions)
        _minimize_signs(self.directions)  # validates
        self.n_startup = n_startup
        self.max_steps = max_steps
        objectives = list(objectives or ())
        self._params_index = objectives.index("params") if "params" in objectives else None

    def _finished(self, trial: optuna.Trial) -> list[FrozenTrial]:
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        if isinstance(self._source, optuna.Study):
            return self._source.get_trials(deepcopy=False, states=states)
        storage = self._source
        study_id = storage.get_study_id_from_name(trial.study.study_name)
        return storage.get_all_trials(study_id, deepcopy=False, states=states)

    def report_and_should_prune(self, trial: optuna.Trial, step: int, value: float) -> bool:
        """Store `value` in the trial's "curve" at `step`, then decide by the rule."""
        curve = curve_of(trial)
        curve[int(step)] = float(value)
        trial.set_user_attr(CURVE_ATTR, {str(k): v for k, v in sorted(curve.items())})
        others = [t for t in self._finished(trial) if t.number != trial.number]
        return self.decide(int(step), float(value), trial.user_attrs.get(PARAMS_ATTR), others)

    def decide(
        self, step: int, value: float, params: float | None, others: Iterable[FrozenTrial]
    ) -> bool:
        """The rule on given finished trials (pure: reads nothing else)."""
        if step >= self.max_steps:
            return False
        others = list(others)
        peers = [(t, c[step]) for t in others if step in (c := curve_of(t))]
        if len(peers) < self.n_startup:
            return False
        front = self._front(others)
        if self._params_index is not None and params is not None and front:
            smallest = min(t.values[self._params_index] for t in front)
            if float(params) < smallest:
                return False
        front_numbers = {t.number for t in front}
        ref = [v for t, v in peers if t.number in front_numbers]
        if len(ref) < 2:
            ref = [v for _, v in peers]
        return value < statistics.median(ref)

    def _front(self, trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
        done = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and t.values is not None
            and len(t.values) == len(self.directions)
            and is_feasible(t)
        ]
        depth = non_dominated_sort([t.values for t in done], self.directions)
        return [t for t, d in zip(done, depth, strict=True) if d == 0]


# --- leaderboard ---------------------------------------------------------------------------


def _ranked_mask(df: pd.DataFrame) -> pd.Series:
    return (df["state"] == "complete") & df["kind"].isin(("trial", "baseline"))


def _feasible(df: pd.DataFrame) -> pd.Series:
    if "feasible" not in df:
        return pd.Series(True, index=df.index)
    return df["feasible"].fillna(True).astype(bool)


def pareto_rank_frame(df: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """Order a leaderboard by Pareto front, then accuracy; adds the `front` column.

    Ranked rows are complete trials and baselines. With a boolean `feasible` column,
    infeasible ones get no front and follow the feasible ones; every other row keeps its
    place after them. An objective whose column is absent (`latency_ms`) is left out; a
    missing value counts as the worst. `rank`, when present, is renumbered in the new order.

    Returns:
        A new frame (index reset); `front` is Int64, NA for rows not ranked.
    """
    cols = [COLUMNS[o] for o in objectives if COLUMNS[o] in df]
    dirs = [_DIRECTIONS[o] for o in objectives if COLUMNS[o] in df]
    out = df.copy().reset_index(drop=True)
    ranked = _ranked_mask(out)
    feasible = _feasible(out)
    on = (ranked & feasible).to_numpy()
    points = out.loc[on, cols].apply(pd.to_numeric, errors="coerce").astype(float).to_numpy()
    front = pd.array([pd.NA] * len(out), dtype="Int64")
    front[on] = non_dominated_sort(points, dirs)
    pos = 1 + list(out.columns).index("rank") if "rank" in out else len(out.columns)
    out.insert(pos, "front", front)
    acc = pd.to_numeric(out["val_accuracy"], errors="coerce").astype(float)
    size = pd.to_numeric(out["params"], errors="coerce").astype(float)
    keys = pd.DataFrame(
        {
            "_g": np.where(on, 0, np.where(ranked & ~feasible, 1, 2)),
            "_f": out["front"].astype(float).fillna(np.inf),
            # Only ranked rows are reordered; the rest keep their order.
            "_a": np.where(ranked, -acc.fillna(-np.inf), 0.0),
            "_p": np.where(ranked, size.fillna(np.inf), 0.0),
            "_i": np.arange(len(out)),
        }
    )
    out = out.loc[keys.sort_values(list(keys.columns), kind="stable").index].reset_index(drop=True)
    if "rank" in out:
        n = int(on.sum())
        out["rank"] = pd.array(list(range(1, n + 1)) + [pd.NA] * (len(out) - n), dtype="Int64")
    return out


def smallest_beating(df: pd.DataFrame) -> dict[str, int | None]:
    """For each measured baseline: the feasible complete trial with the fewest params beating it.

    Ties in size go to the more accurate trial, then the lower number. None when no trial
    is more accurate.
    """
    acc = pd.to_numeric(df["val_accuracy"], errors="coerce").astype(float)
    size = pd.to_numeric(df["params"], errors="coerce").astype(float)
    complete = df["state"] == "complete"
    trials = df[complete & (df["kind"] == "trial") & acc.notna() & size.notna() & _feasible(df)]
    base = df[complete & (df["kind"] == "baseline") & acc.notna()]
    out: dict[str, int | None] = {}
    for i in base.index:
        better = trials[acc[trials.index] > acc[i]]
        if better.empty:
            out[str(df.at[i, "trial"])] = None
            continue
        order = sorted(better.index, key=lambda j: (size[j], -acc[j], int(df.at[j, "trial"])))
        out[str(df.at[i, "trial"])] = int(df.at[order[0], "trial"])
    return out
