"""The Optuna objective: one trial = one config trained on a holdout split or K folds."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import optuna

from searchspace.config import CnnConfig, InvalidConfigError, validate
from searchspace.space import SearchSpace
from searchspace.suggest import suggest_config

from .data import Dataset, holdout_split, kfold_splits, stratified_subset
from .model import count_params
from .multiobjective import (
    MultiObjectivePruning,
    config_latency,
    objective_values,
    set_constraints,
    violates_before_training,
)
from .precision import current as current_precision
from .session import released_session
from .stop import interrupt_within
from .study import pruner_read_steps
from .training import DivergedError, fit_config


class TrialFailedError(RuntimeError):
    """A trial that could not produce a score; its reason is stored as `fail_reason`."""


# Stored with every study's protocol: studies made before trials were scored this way (at
# their best epoch) lack it and are not continued, and those scored before BatchNorm's
# statistics were re-estimated for validation (`training.recalibrate_batchnorm`) differ in it.
SCORE = "last epoch, every validation image, BatchNorm statistics re-estimated"


@dataclass(frozen=True)
class SearchProtocol:
    """What makes two scores comparable: same data split, folds, epochs and seed.

    A trial's score is its accuracy on every validation image after its last epoch. The
    epochs before the last are validated on `interim_val_size` of them (a stratified
    subset, fixed per split), which is what the pruner and the learning curves read:
    validating all 10,000 after every epoch made a default trial 15% slower than a bare
    `fit` + `evaluate`. 0 = every image after every epoch. And only the epochs whose
    score the study's pruner can act on are validated (`study.pruner_read_steps`): the
    default Hyperband reads epoch 1 of 3 on a holdout split in its first bracket's trials
    and none in its second's, no pruner none.
    """

    epochs: int = 3
    cv: int = 0  # 0 = holdout; K >= 2 = stratified K-fold
    val_size: int = 10_000
    train_subset: int | None = None
    seed: int = 0
    interim_val_size: int = 2_000

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "cv": self.cv,
            "val_size": self.val_size,
            "train_subset": self.train_subset,
            "seed": self.seed,
            "interim_val_size": self.interim_val_size,
            "score": SCORE,
        }

    @property
    def steps(self) -> int:
        """Number of pruning steps a full trial reports."""
        return self.epochs * max(1, self.cv)


@dataclass
class Folds:
    """The search's view of the training images: (train, validation) index pairs.

    The test images are not here: the search never sees them.
    """

    x: np.ndarray
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]
    num_classes: int


def make_folds(data: Dataset, protocol: SearchProtocol) -> Folds:
    """The holdout split or the K folds (stratified, seeded), then --train-subset.

    `train_subset` shrinks only the training part of each split (a stratified subset of
    it); validation images are never reduced, so scores stay comparable across fidelities.
    """
    x, y = data.x_train, data.y_train
    if protocol.cv >= 2:
        splits = kfold_splits(y, protocol.cv, seed=protocol.seed)
    else:
        val_size: int | float = protocol.val_size
        if val_size > len(y) // 2:
            # A small data set: keep the default 1:5 validation share.
            val_size = max(1, len(y) // 6)
        splits = [holdout_split(y, val_size, seed=protocol.seed)]
    n = protocol.train_subset
    if n:
        splits = [
            (tr[stratified_subset(y[tr], n, seed=protocol.seed + f)] if n < len(tr) else tr, va)
            for f, (tr, va) in enumerate(splits)
        ]
    return Folds(x=x, y=y, splits=splits, num_classes=data.num_classes)


class ProgressSink(Protocol):
    """Where an objective sends live progress (the CLI's rich display, or nothing)."""

    def trial_started(self, number: int, cfg: CnnConfig) -> None: ...
    def epoch_started(self, number: int, step: int, total_steps: int) -> None: ...
    def batch_done(self, done: int, total: int) -> None: ...
    def epoch_done(self, number: int, step: int, value: float) -> None: ...


class Objective:
    """Callable for `study.optimize`; returns the accuracy on every validation image after
    the last epoch (mean over folds)."""

    def __init__(
        self,
        folds: Folds,
        space: SearchSpace,
        protocol: SearchProtocol,
        progress: ProgressSink | None = None,
        config_fn: Callable[[optuna.trial.BaseTrial], CnnConfig] | None = None,
        *,
        objectives: Sequence[str] = ("accuracy",),
        max_params: int | None = None,
        max_latency_ms: float | None = None,
        mo_pruning: MultiObjectivePruning | None = None,
        every_epoch: bool = False,
    ) -> None:
        self.folds = folds
        self.space = space
        self.protocol = protocol
        self.progress = progress
        self.config_fn = config_fn or (lambda t: suggest_config(t, space))
        self.objectives = tuple(objectives)
        self.max_params = max_params
        self.max_latency_ms = max_latency_ms
        self.mo_pruning = mo_pruning
        # Validate (the interim subset) after every epoch, not just those the pruner reads:
        # for runs whose curves are the point, such as the baselines.
        self.every_epoch = every_epoch
        self._interim_cache: dict[int, np.ndarray | None] = {}

    def _limits(self, trial: optuna.Trial, cfg: CnnConfig) -> dict[str, float] | None:
        """Latency (when asked for), constraint values, and a fast stop for a broken limit."""
        latency = None
        if "latency" in self.objectives or self.max_latency_ms is not None:
            latency = config_latency(cfg, self.folds.num_classes)
            for k, v in latency.items():
                trial.set_user_attr(k, v)
        if self.max_params is not None or self.max_latency_ms is not None:
            set_constraints(trial, self.max_params, self.max_latency_ms)
            why = violates_before_training(
                trial.user_attrs["params"],
                self.max_params,
                (latency or {}).get("latency_ms_b1"),
                self.max_latency_ms,
            )
            if why:
                # Pruned, not failed: the sampler sees the constraint values and learns the
                # limit (failed trials are invisible to it), and no training time is spent.
                trial.set_user_attr("infeasible_reason", why)
                trial.set_user_attr("epochs_run", 0)
                raise optuna.TrialPruned(f"infeasible: {why}")
        return latency

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        # A trial leaves its traced graphs, Keras' global session and freed heap pages
        # behind; without giving them back, memory grows trial after trial.
        with released_session():
            return self._trial(trial)

    def _trial(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        start = time.perf_counter()
        try:
            cfg = self.config_fn(trial)
            trial.set_user_attr("config", cfg.to_json())
            trial.set_user_attr("summary", cfg.summary())
            try:
                validate(cfg)
            except InvalidConfigError as e:
                trial.set_user_attr("fail_reason", f"invalid config: {e}")
                raise TrialFailedError(f"invalid config: {e}") from None
            trial.set_user_attr("params", count_params(cfg, self.folds.num_classes))
            # bfloat16 or float32 (precision.py): scores differ slightly between the two.
            trial.set_user_attr("precision", current_precision())
            if self.progress:
                self.progress.trial_started(trial.number, cfg)
            latency = self._limits(trial, cfg)
            mean = self._run(trial, cfg, start)
            if len(self.objectives) == 1:
                return mean
            return objective_values(mean, trial.user_attrs["params"], latency, self.objectives)
        except (optuna.TrialPruned, TrialFailedError):
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
            raise
        except Exception as e:  # OOM, a Keras error...: recorded, and the search goes on
            if interrupt_within(e):  # a Ctrl-C that C code turned into SystemError
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
                raise KeyboardInterrupt from e
            first = (str(e).strip().splitlines() or [""])[0][:300]
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {first}")
            raise

    def _interim(self, y_val: np.ndarray, fold: int) -> np.ndarray | None:
        """Indices of the validation images scored after the epochs before the last.

        The same for every trial: computed once per fold (a stratified split of 10,000
        labels takes about 50 ms, a trial's hot path)."""
        if fold not in self._interim_cache:
            n = self.protocol.interim_val_size
            self._interim_cache[fold] = (
                None if n <= 0 or n >= len(y_val)
                else stratified_subset(y_val, n, seed=self.protocol.seed + fold)
            )
        return self._interim_cache[fold]

    def _run(self, trial: optuna.Trial, cfg: CnnConfig, start: float) -> float:
        p = self.protocol
        epochs = p.epochs
        fold_scores: list[float] = []
        fold_ends: list[float] = []  # each finished fold's last interim score
        history: list[dict[str, list[float]]] = []
        epochs_run = 0
        best_epochs: list[int] = []

        def store(state: str) -> None:
            trial.set_user_attr("epochs_run", epochs_run)
            trial.set_user_attr("wall_time", round(time.perf_counter() - start, 3))
            trial.set_user_attr("history", json.dumps(history))
            trial.set_user_attr("end", state)

        # The steps whose score the pruner reads: the epochs worth validating. (A trial
        # without a study, e.g. a FixedTrial, validates every epoch.)
        study = getattr(trial, "study", None)
        pruner = getattr(study, "pruner", None)
        read = None if self.every_epoch or self.mo_pruning is not None or pruner is None \
            else pruner_read_steps(pruner, p.steps, study, trial.number)
        for f, (tr, va) in enumerate(self.folds.splits):
            x_tr, y_tr = self.folds.x[tr], self.folds.y[tr]
            x_va, y_va = self.folds.x[va], self.folds.y[va]
            fold_hist: dict[str, list[float]] = {}
            history.append(fold_hist)

            def on_epoch(
                e: int,
                logs: dict[str, float],
                f: int = f,
                fold_hist: dict[str, list[float]] = fold_hist,
            ) -> None:
                nonlocal epochs_run
                epochs_run += 1
                for k, v in logs.items():
                    fold_hist.setdefault(k, []).append(round(v, 6))
                acc = logs.get("val_accuracy", float("nan"))
                step = f * epochs + e + 1
                if self.progress:
                    self.progress.epoch_done(trial.number, step, acc)
                if not math.isfinite(acc):  # not validated: nothing the pruner reads
                    if self.progress and e + 1 < epochs:
                        self.progress.epoch_started(trial.number, step + 1, p.steps)
                    return
                # Running cross-fold score: finished folds' last plus this fold's current,
                # so every step reports a value on the same scale (optuna #4373, #3203).
                value = (sum(fold_ends) + acc) / (len(fold_ends) + 1)
                if self.mo_pruning is not None:
                    # Multi-objective studies can't report: prune on the accuracy curve.
                    prune = self.mo_pruning.report_and_should_prune(trial, step, value)
                else:
                    trial.report(value, step)
                    # Never at the last step: the trial has already paid for all its epochs.
                    prune = step < p.steps and trial.should_prune()
                if prune:
                    store("pruned")
                    trial.set_user_attr("pruned_at_step", step)
                    raise optuna.TrialPruned(f"pruned at step {step} with {value:.4f}")
                if self.progress and e + 1 < epochs:
                    self.progress.epoch_started(trial.number, step + 1, p.steps)

            if self.progress:
                self.progress.epoch_started(trial.number, f * epochs + 1, p.steps)
            interim = self._interim(y_va, f)
            if f == 0:  # how this trial's epochs before the last were validated
                trial.set_user_attr("interim_val_size", 0 if interim is None else len(interim))
            try:
                res = fit_config(
                    cfg,
                    x_tr,
                    y_tr,
                    x_va,
                    y_va,
                    epochs=epochs,
                    # Each trial gets its own, reproducible initial weights.
                    seed=p.seed * 100_003 + trial.number,
                    num_classes=self.folds.num_classes,
                    on_epoch=on_epoch,
                    on_batch=self.progress.batch_done if self.progress else None,
                    interim_val=interim,
                    # This fold's epochs the pruner reads; the rest go unvalidated.
                    interim_epochs=None if read is None else
                    {s - f * epochs for s in read if f * epochs < s <= (f + 1) * epochs},
                )
            except DivergedError as e:
                store("diverged")
                trial.set_user_attr("fail_reason", f"diverged: {e}")
                raise TrialFailedError(f"diverged: {e}") from None
            fold_scores.append(res.final_val_accuracy)
            fold_ends.append(res.history.get("val_accuracy", [float("nan")])[-1])
            # A fold whose epochs before the last went unvalidated says nothing about its
            # peak (it would always say "the last"): only the others count.
            if any(math.isfinite(v) for v in res.history.get("val_accuracy", [])[:-1]):
                best_epochs.append(res.best_epoch)
            del x_tr, y_tr, x_va, y_va
        store("complete")
        mean = float(np.mean(fold_scores))
        trial.set_user_attr("fold_scores", [round(s, 6) for s in fold_scores])
        trial.set_user_attr(
            "val_accuracy_std", float(np.std(fold_scores)) if len(fold_scores) > 1 else 0.0
        )
        # No fold validated an earlier epoch: nothing says it peaked before the last.
        trial.set_user_attr("best_epoch",
                            int(round(float(np.mean(best_epochs)))) if best_epochs else epochs)
        if not math.isfinite(mean):
            trial.set_user_attr("fail_reason", "no validation score")
            raise TrialFailedError("no validation score")
        return mean
