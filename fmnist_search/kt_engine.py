"""A second search engine: KerasTuner (Hyperband, Bayesian optimisation, random search).

KerasTuner draws and schedules the trials; each one trains on the study's own holdout split
for the study's epochs, and is then written into the same Optuna study as an ordinary trial
(`optuna.trial.create_trial` + `study.add_trial`) with the parameters, distributions and
user attributes the Optuna engine's `Objective` stores. `leaderboard`, `report` and `export`
therefore read both engines' trials alike; `engine` and `kt_trial_id` tell them apart, and
`kt_run` names the KerasTuner project a trial came from (a project started afresh numbers
its trials from the start again).

KerasTuner's own state (oracle, trial files, checkpoints) lives in
`results/<study>/keras_tuner/<algorithm>/<study>/` and is resumed (overwrite=False) when the
same search is run again, as the Optuna engine resumes its study.

Hyperband: a trial given fewer epochs than the protocol's is the counterpart of a trial the
Optuna engine's pruner stops, and is recorded PRUNED (`pruned_at_step`). When KerasTuner
promotes it, the continuation is a new trial (`kt_resumed_from`) that starts from its
checkpoint; its history and intermediate values include the parent's epochs, while
`epochs_run` counts only the epochs it trained itself. (KerasTuner reloads the parent's
best-epoch weights into a fresh optimizer: the optimizer's state restarts, as in any
KerasTuner Hyperband.)

Scores follow the study's protocol: every validation image after the last epoch, which is
also what each trial hands back to KerasTuner's oracle (by default it would rank a trial by
its best epoch). Every epoch is validated on every image, as KerasTuner does: the trials
record `interim_val_size` 0.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import optuna
from optuna.trial import FrozenTrial, TrialState

from searchspace.config import CnnConfig, InvalidConfigError
from searchspace.keras_tuner import config_from_hp, optuna_point
from searchspace.space import SearchSpace

from . import session, stop
from . import study as st
from .model import build_cnn, count_params
from .objective import Folds, ProgressSink, SearchProtocol
from .precision import current as current_precision
from .training import (
    DivergedError,
    _Hooks,
    peak_epoch,
    precise_batchnorm,
    validation_batch_size,
)

ALGORITHMS = ("hyperband", "bayesian", "random")
TENSORBOARD_HINT = "keras-tuner needs the tensorboard package: pip install tensorboard"
# Failed trials in a row that stop the search: the CLI's --max-failures default.
MAX_CONSECUTIVE_FAILURES = 10
# Random trials before the Gaussian process takes over: as the TPE sampler's n_startup_trials.
# KerasTuner's default (3 x the number of hyperparameters, about 60 here) would make a
# 50-trial search pure random search.
BAYESIAN_INITIAL_POINTS = 10
# As the Optuna engine's HyperbandPruner(reduction_factor=3).
HYPERBAND_FACTOR = 3
# Hyperband iterations are unbounded here: the search stops on --trials or --timeout.
HYPERBAND_ITERATIONS = 1_000_000
_TUNERS: dict[str, Any] = {
    "hyperband": kt.Hyperband,
    "bayesian": kt.BayesianOptimization,
    "random": kt.RandomSearch,
}


class KerasTunerError(st.StudyError):
    """A KerasTuner search that cannot run or did not produce trials (one-line message)."""


class _Stop(Exception):
    """Raised before a new trial when --trials or --timeout is reached: ends `search`."""


def engine_name(algorithm: str) -> str:
    """The `engine` user attribute of the trials an algorithm records."""
    return f"keras-tuner/{algorithm}"


def _import_tensorboard() -> None:
    # Exactly what KerasTuner imports at the start of every trial on the TensorFlow backend.
    import tensorboard  # noqa: F401
    from tensorboard.plugins.hparams import api  # noqa: F401


def check_tensorboard() -> None:
    """Fail fast when tensorboard can't be imported: KerasTuner would fail every trial.

    Raises:
        KerasTunerError: with the one-line fix.
    """
    try:
        _import_tensorboard()
    except ImportError as e:
        if (e.name or "tensorboard").split(".")[0] == "tensorboard":
            raise KerasTunerError(TENSORBOARD_HINT) from None
        raise KerasTunerError(
            f"keras-tuner needs the tensorboard package, which fails to import: {_first_line(e)}"
        ) from None


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def _last_line(text: str | None) -> str:
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _reason(e: BaseException) -> str:
    """A failed trial's `fail_reason`, worded as the Optuna engine's Objective words it."""
    if isinstance(e, DivergedError):
        return f"diverged: {e}"
    if isinstance(e, InvalidConfigError):
        return f"invalid config: {e}"
    return f"{type(e).__name__}: {_first_line(e)}"


@dataclass
class _Record:
    """What one KerasTuner trial did, gathered while it runs."""

    trial: Any  # keras_tuner.engine.trial.Trial
    number: int  # the Optuna trial number it will get
    seed: int
    start: float = field(default_factory=time.perf_counter)
    started_at: datetime.datetime = field(default_factory=datetime.datetime.now)
    cfg: CnnConfig | None = None
    budget: int = 0  # the epoch it trains up to
    initial_epoch: int = 0  # > 0 for a Hyperband continuation
    parent: str | None = None  # the KerasTuner trial it continues
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs_run: int = 0
    fail_reason: str | None = None


class _Engine:
    """Shared state of one run: the study, the data, the running trial's record."""

    def __init__(
        self,
        study: optuna.Study,
        folds: Folds,
        space: SearchSpace,
        protocol: SearchProtocol,
        algorithm: str,
        total_trials: int,
        timeout: float | None,
        progress: ProgressSink | None,
    ) -> None:
        self.study = study
        self.space = space
        self.protocol = protocol
        self.algorithm = algorithm
        self.engine = engine_name(algorithm)
        self.total_trials = total_trials
        self.deadline = time.monotonic() + timeout if timeout else None
        self.progress = progress
        self.num_classes = folds.num_classes
        tr, va = folds.splits[0]
        self.x_train, self.y_train = folds.x[tr], folds.y[tr]
        self.x_val, self.y_val = folds.x[va], folds.y[va]
        self.current: _Record | None = None
        self.states: list[TrialState] = []  # of the trials this run recorded
        self.reasons: list[str] = []  # their fail reasons, in order
        # This KerasTuner project's finished trials by KerasTuner id (see `attach`).
        self.run_id: str | None = None
        self.finished: dict[str, FrozenTrial] = {}

    def attach(self, run_id: str | None) -> None:
        """Take the KerasTuner project `run_id` (None: one saved before projects had ids).

        Its finished trials, by KerasTuner id, are the parents of continuations and a guard
        against recording a trial twice when KerasTuner re-runs one after a crash. Only that
        project's: a project started afresh (its folder gone, another --results-dir) numbers
        its trials from 0000 again, and they must not be taken for the old ones.
        """
        self.run_id = run_id
        self.finished = {
            str(t.user_attrs.get("kt_trial_id")): t
            for t in self.study.get_trials(deepcopy=False, states=st.FINISHED)
            if t.user_attrs.get("engine") == self.engine
            and t.user_attrs.get("kt_run") == run_id
        }

    # ------------------------------------------------------------------ trial life cycle
    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        return st.count_finished(self.study) >= self.total_trials

    def begin(self, trial: Any) -> _Record:
        """Called when a trial starts training: its record, config and progress line."""
        number = len(self.study.get_trials(deepcopy=False))
        values = trial.hyperparameters.values
        rec = _Record(
            trial=trial,
            number=number,
            # As the Objective: reproducible initial weights per trial.
            seed=self.protocol.seed * 100_003 + number,
            budget=int(values.get("tuner/epochs", self.protocol.epochs)),
            initial_epoch=int(values.get("tuner/initial_epoch", 0)),
            parent=values.get("tuner/trial_id"),
        )
        self.current = rec
        rec.cfg = config_from_hp(trial.hyperparameters.copy(), self.space)
        if self.progress:
            self.progress.trial_started(number, rec.cfg)
            self.progress.epoch_started(number, rec.initial_epoch + 1, self.protocol.steps)
        return rec

    def on_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        rec = self.current
        if rec is None:
            return
        rec.epochs_run += 1
        for k, v in logs.items():
            rec.history.setdefault(k, []).append(float(v))
        if self.progress:
            self.progress.epoch_done(rec.number, epoch + 1, logs.get("val_accuracy", math.nan))
            if epoch + 1 < rec.budget:
                self.progress.epoch_started(rec.number, epoch + 2, self.protocol.steps)

    def on_batch(self, done: int, total: int) -> None:
        if self.progress:
            self.progress.batch_done(done, total)

    def record(self, trial: Any, interrupted: bool = False) -> None:
        """Write the finished KerasTuner trial into the Optuna study."""
        rec = self.current if self.current is not None and self.current.trial is trial else None
        self.current = None
        if rec is None:  # it failed before training started (in KerasTuner's own code)
            rec = _Record(trial=trial, number=-1, seed=0)
        kt_id = str(trial.trial_id)
        if kt_id in self.finished:
            return
        frozen = self._frozen(trial, rec, interrupted)
        self.study.add_trial(frozen)
        added = self._find_added(kt_id, frozen)
        self.states.append(frozen.state)
        if frozen.state == TrialState.FAIL:
            self.reasons.append(str(frozen.user_attrs.get("fail_reason")))
        else:
            self.finished[kt_id] = added or frozen
        if added is not None and callable(self.progress):
            self.progress(self.study, added)

    def _find_added(self, kt_id: str, frozen: FrozenTrial) -> FrozenTrial | None:
        for t in reversed(self.study.get_trials(deepcopy=False)):
            ua = t.user_attrs
            if (ua.get("engine") == self.engine and str(ua.get("kt_trial_id")) == kt_id
                    and ua.get("kt_run") == self.run_id
                    and t.datetime_complete == frozen.datetime_complete):
                return t
        return None

    def _frozen(self, trial: Any, rec: _Record, interrupted: bool) -> FrozenTrial:
        ua: dict[str, Any] = {"engine": self.engine, "kt_trial_id": str(trial.trial_id),
                              "interim_val_size": 0, "precision": current_precision()}
        if self.run_id is not None:
            ua["kt_run"] = self.run_id
        params: dict[str, Any] = {}
        dists: dict[str, optuna.distributions.BaseDistribution] = {}
        cfg = rec.cfg
        try:
            cfg, params, dists = optuna_point(trial.hyperparameters.copy(), self.space)
        except Exception as e:  # a space mismatch: still recorded, as a failure
            rec.fail_reason = rec.fail_reason or _reason(e)
        if cfg is not None:
            ua["config"] = cfg.to_json()
            ua["summary"] = cfg.summary()
            with contextlib.suppress(Exception):  # an unbuildable config has no size
                ua["params"] = count_params(cfg, self.num_classes)
        if self.algorithm == "hyperband":
            ua["kt_epochs"] = rec.budget
            ua["kt_initial_epoch"] = rec.initial_epoch
            ua["kt_resumed_from"] = rec.parent
        history, offset = self._full_history(rec)
        ua["epochs_run"] = rec.epochs_run
        ua["wall_time"] = round(time.perf_counter() - rec.start, 3) if rec.number >= 0 else 0.0
        ua["history"] = json.dumps(
            [{k: [round(v, 6) for v in vs] for k, vs in history.items()}]
        )
        val = history.get("val_accuracy", [])
        intermediate = {offset + i + 1: v for i, v in enumerate(val) if math.isfinite(v)}
        if interrupted:
            rec.fail_reason = "interrupted (Ctrl-C)"
        elif rec.fail_reason is None and trial.status not in ("COMPLETED", "RUNNING"):
            rec.fail_reason = _last_line(trial.message) or f"KerasTuner marked it {trial.status}"
        elif rec.fail_reason is None and (not intermediate or not math.isfinite(val[-1])):
            rec.fail_reason = "no validation score"
        if rec.fail_reason is not None:
            if rec.fail_reason.startswith("diverged"):
                ua["end"] = "diverged"
            ua["fail_reason"] = rec.fail_reason
            frozen = optuna.trial.create_trial(
                state=TrialState.FAIL, params=params, distributions=dists, user_attrs=ua,
                intermediate_values=intermediate,
            )
        else:
            ua["best_epoch"] = offset + peak_epoch(val, len(self.y_val))
            if rec.budget < self.protocol.epochs:
                # Stopped before the protocol's epochs: what the Optuna engine calls pruned.
                ua["end"] = "pruned"
                ua["pruned_at_step"] = rec.budget
                frozen = optuna.trial.create_trial(
                    state=TrialState.PRUNED, params=params, distributions=dists,
                    user_attrs=ua, intermediate_values=intermediate,
                )
            else:
                # The protocol's score: every validation image after the last epoch.
                ua["end"] = "complete"
                ua["fold_scores"] = [round(val[-1], 6)]
                ua["val_accuracy_std"] = 0.0
                frozen = optuna.trial.create_trial(
                    state=TrialState.COMPLETE, value=float(val[-1]), params=params,
                    distributions=dists, user_attrs=ua, intermediate_values=intermediate,
                )
        if rec.number >= 0:
            frozen.datetime_start = rec.started_at
        return frozen

    def _full_history(self, rec: _Record) -> tuple[dict[str, list[float]], int]:
        """The trial's per-epoch logs, preceded by its parent's for a continuation.

        Returns the history and the epochs before it that are not in it (0 unless the
        parent's record is missing).
        """
        if not rec.initial_epoch:
            return rec.history, 0
        parent = self.finished.get(str(rec.parent))
        try:
            before = json.loads(parent.user_attrs["history"])[0] if parent else {}
        except (KeyError, ValueError, IndexError, TypeError):
            before = {}
        n = min((len(v) for v in before.values()), default=0)
        n = min(n, rec.initial_epoch)
        if not n or not rec.history:
            return rec.history, rec.initial_epoch
        full = {
            k: [float(x) for x in before[k][:n]] + rec.history[k]
            for k in set(before) & set(rec.history)
        }
        return full, rec.initial_epoch - n


class CnnHyperModel(kt.HyperModel):
    """build(hp) = build_cnn(config_from_hp(hp, space)); fit on the study's holdout split."""

    def __init__(self, engine: _Engine) -> None:
        super().__init__(name="fmnist_cnn")
        self.engine = engine

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        cfg = config_from_hp(hp, self.engine.space)
        rec = self.engine.current
        if rec is not None:  # None while KerasTuner explores the space at start-up
            keras.utils.set_random_seed(rec.seed)
        return build_cnn(cfg, num_classes=self.engine.num_classes,
                         input_shape=tuple(self.engine.x_train.shape[1:]))

    def fit(
        self, hp: kt.HyperParameters, model: keras.Model, *args: Any,
        epochs: int = 1, initial_epoch: int = 0, callbacks: Any = (), **kwargs: Any,
    ) -> Any:
        e = self.engine
        rec = e.current
        if rec is None or rec.cfg is None:
            raise RuntimeError("fit called outside a trial")
        steps = math.ceil(len(e.x_train) / rec.cfg.batch_size)
        # The Optuna engine's NaN guard and progress hooks, before KerasTuner's callbacks.
        hooks = _Hooks(e.on_epoch, e.on_batch, steps)
        # Scored as the Optuna engine scores: BatchNorm's statistics re-estimated first.
        precise = precise_batchnorm(model, e.x_train, rec.cfg)
        hist = model.fit(
            e.x_train, e.y_train, batch_size=rec.cfg.batch_size, epochs=epochs,
            initial_epoch=initial_epoch, validation_data=(e.x_val, e.y_val),
            validation_batch_size=validation_batch_size(rec.cfg),
            callbacks=[*([precise] if precise else []), hooks, *callbacks], verbose=0,
            shuffle=True,
        )
        # The last epoch's metrics: the protocol's score is the model as trained.
        return {k: float(v[-1]) for k, v in hist.history.items() if v}


def _tuner_class(base: Any) -> Any:
    """`base` (a KerasTuner tuner class) that stops on our budget and records each trial."""

    class RecordingTuner(base):  # type: ignore[misc]
        engine: _Engine

        def pre_create_trial(self) -> None:
            # A Ctrl-C that library code swallowed (between trials, in KerasTuner's own
            # bookkeeping or ours) still ends the search before another trial begins.
            stop.raise_if_asked()
            if self.engine.should_stop():
                raise _Stop

        def _run_and_update_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
            # The whole trial as KerasTuner runs it (set-up, fit, the oracle's update): a
            # Ctrl-C that C code turned into a SystemError would count as a failed trial in
            # KerasTuner's loop (it catches every Exception) and the next would start.
            try:
                return super()._run_and_update_trial(trial, *args, **kwargs)
            except Exception as e:
                if stop.interrupt_within(e):
                    raise KeyboardInterrupt from e
                raise

        def _build_and_fit_model(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
            rec = self.engine.begin(trial)
            try:
                # The model is done training when this returns: its traced graphs can go.
                with session.gradients_released():
                    return super()._build_and_fit_model(trial, *args, **kwargs)
            except Exception as e:
                rec.fail_reason = _reason(e)
                raise

        def on_trial_end(self, trial: Any) -> None:
            try:
                self.engine.record(trial)
                super().on_trial_end(trial)
            finally:
                # As the Objective: Keras keeps every graph it built otherwise (free_memory
                # runs the garbage collector).
                session.clear()

    return RecordingTuner


@contextlib.contextmanager
def _kt_quiet() -> Iterator[None]:
    """Silence what the trials' records already say, or what is expected.

    KerasTuner prints each failed trial's traceback (its config.DEBUG); the reason is
    recorded instead. A Hyperband continuation loads its parent's weights into a fresh
    optimizer, so Keras warns that the optimizer's saved variables are skipped: that is
    how KerasTuner continues a trial (the optimizer state restarts), not an error.
    """
    from keras_tuner.src import config as kt_config

    old = kt_config.DEBUG
    kt_config.DEBUG = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            yield
    finally:
        kt_config.DEBUG = old


def _project_state(study: optuna.Study, kt_dir: Path, engine: str) -> bool:
    """Whether KerasTuner's saved state belongs to this study (else it starts afresh).

    State left by a deleted and recreated study (same name, maybe another protocol) would
    resume brackets scored under other settings, so it is only kept when the study holds
    this engine's trials and was made under the same protocol.
    """
    marker = kt_dir / "protocol.json"
    ours = any(t.user_attrs.get("engine") == engine for t in study.get_trials(deepcopy=False))
    if not ours or not marker.exists():
        return False
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(saved == json.loads(json.dumps(study.user_attrs.get("protocol"))))


def run_keras_tuner(
    study: optuna.Study,
    folds: Folds,
    space: SearchSpace,
    protocol: SearchProtocol,
    *,
    algorithm: str,
    total_trials: int,
    seed: int,
    results_dir: Path,
    timeout: float | None,
    progress: ProgressSink | None = None,
    max_failures: int | None = None,
) -> None:
    """Search with KerasTuner until the study holds `total_trials` finished trials.

    Args:
        study: The opened study (its stored protocol is the one `folds` were made with).
        folds: The study's split; KerasTuner supports the holdout split only.
        space: The search space (the same one the study stores).
        protocol: Epochs (Hyperband's max_epochs), seed of the initial weights.
        algorithm: "hyperband", "bayesian" or "random".
        total_trials: Finished (complete + pruned) trials wanted in the study, in total.
        seed: Seeds KerasTuner's oracle.
        results_dir: The results root (--results-dir); KerasTuner's state goes to
            `<results_dir>/<study>/keras_tuner/<algorithm>/`.
        timeout: Stop starting new trials after this many seconds.
        progress: The CLI's `SearchProgress` (a ProgressSink, called with (study, trial) as
            an Optuna callback after each recorded trial), or None.
        max_failures: Failed trials in a row that stop the search (`--max-failures`;
            default MAX_CONSECUTIVE_FAILURES).

    Raises:
        KerasTunerError: tensorboard missing, K-fold, an unknown algorithm, a run of
            failed trials, or every trial of the run failed (a one-line message).
        KeyboardInterrupt: after recording the running trial as failed.
    """
    if algorithm not in ALGORITHMS:
        raise KerasTunerError(f"unknown KerasTuner algorithm {algorithm!r} "
                              f"(choose from {', '.join(ALGORITHMS)})")
    if protocol.cv >= 2 or len(folds.splits) != 1:
        raise KerasTunerError(
            "--engine keras-tuner supports the holdout split only (KerasTuner scores one fit "
            "per trial); drop --cv or use --engine optuna"
        )
    check_tensorboard()
    engine = _Engine(study, folds, space, protocol, algorithm, total_trials, timeout, progress)
    if engine.should_stop():
        return
    max_failures = max_failures or MAX_CONSECUTIVE_FAILURES
    kt_dir = st.study_dir(results_dir, study.study_name) / "keras_tuner" / algorithm
    resume = _project_state(study, kt_dir, engine.engine)
    run_file = kt_dir / "run_id"
    if resume:
        engine.attach(run_file.read_text(encoding="utf-8").strip() or None
                      if run_file.exists() else None)
    else:
        engine.attach(uuid.uuid4().hex[:12])
    kwargs: dict[str, Any] = {
        "hypermodel": CnnHyperModel(engine),
        "objective": kt.Objective("val_accuracy", direction="max"),
        # KerasTuner takes seed 0 as "no seed" and draws a random one.
        "seed": seed + 1,
        "directory": str(kt_dir),
        "project_name": study.study_name,
        "overwrite": not resume,
        "max_retries_per_trial": 0,
        "max_consecutive_failed_trials": max_failures,
    }
    if algorithm == "hyperband":
        kwargs.update(max_epochs=protocol.epochs, factor=HYPERBAND_FACTOR,
                      hyperband_iterations=HYPERBAND_ITERATIONS)
    elif algorithm == "bayesian":
        kwargs.update(max_trials=None, num_initial_points=BAYESIAN_INITIAL_POINTS)
    else:
        kwargs.update(max_trials=None)
    kt_dir.mkdir(parents=True, exist_ok=True)
    # KerasTuner prints "Reloading Tuner from ..." on stdout, where the leaderboard goes.
    with contextlib.redirect_stdout(io.StringIO()):
        tuner = _tuner_class(_TUNERS[algorithm])(**kwargs)
    tuner.engine = engine
    if algorithm == "hyperband":
        tuner.oracle.hyperband_iterations = HYPERBAND_ITERATIONS  # a reload restores the old
    (kt_dir / "protocol.json").write_text(
        json.dumps(study.user_attrs.get("protocol"), sort_keys=True), encoding="utf-8"
    )
    if engine.run_id is not None:
        run_file.write_text(engine.run_id + "\n", encoding="utf-8")
    try:
        try:
            with _kt_quiet(), st.settled_heap():  # as our engine's trials: cheap collections
                tuner.search(epochs=protocol.epochs, verbose=0)
        except Exception as e:
            # Between trials too (KerasTuner's bookkeeping, our recording), a Ctrl-C that C
            # code turned into a SystemError is Ctrl-C, not a crash with a traceback.
            if stop.interrupt_within(e):
                raise KeyboardInterrupt from e
            raise
    except _Stop:
        pass
    except KeyboardInterrupt:
        if engine.current is not None:
            engine.record(engine.current.trial, interrupted=True)
        session.clear()  # as after any trial: the interrupted model's graphs can go
        raise
    except RuntimeError as e:
        _raise_if_all_failed(engine)
        if "consecutive failures" in str(e):
            last = engine.reasons[-1] if engine.reasons else _last_line(str(e))
            raise KerasTunerError(
                f"stopped after {max_failures} failed KerasTuner trials in a row; "
                f"last: {last}"
            ) from None
        raise KerasTunerError(f"KerasTuner stopped: {_first_line(e)}") from None
    except kt.errors.FatalError as e:
        raise KerasTunerError(f"KerasTuner stopped: {_first_line(e)}") from None
    _raise_if_all_failed(engine)


def _raise_if_all_failed(engine: _Engine) -> None:
    if engine.states and all(s == TrialState.FAIL for s in engine.states):
        first = engine.reasons[0] if engine.reasons else "unknown error"
        n = len(engine.states)
        raise KerasTunerError(
            f"every KerasTuner trial failed ({n} trial{'s' if n > 1 else ''}); first error: {first}"
        )


__all__ = [
    "ALGORITHMS",
    "CnnHyperModel",
    "KerasTunerError",
    "TENSORBOARD_HINT",
    "check_tensorboard",
    "engine_name",
    "run_keras_tuner",
]
