"""Export a study's best model: final fit, one test evaluation, model card, atomic write.

`export_study` picks a trial, retrains it (on all training images by default), measures it
once on the test set and hands the model and its card to `write_export`, which writes
`model.keras`, `saved_model/`, `model_card.json` and `SHA256SUMS` into a temporary sibling
directory and swaps it into place, so a reader sees the old export or the new one, never
half of one. TensorFlow, Keras and Optuna are imported lazily: `run_search.py export --help`
answers without them.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .multiobjective import accuracy_of, is_feasible

if TYPE_CHECKING:
    import keras
    import optuna
    from optuna.trial import FrozenTrial

    from .data import Dataset
    from .objective import ProgressSink

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
CARD_FILE = "model_card.json"
SUMS_FILE = "SHA256SUMS"
EXPORT_DIR = "best_model"
LEAST_CONFIDENT = 12  # test images listed in the card (and shown by the report)
CARD_VERSION = 1

# Final-epoch rule (README, "Export and predict"). The peak epoch is scaled by the data
# ratio, capped: the default search trains on 10,000 images (x3, not x6, for 60,000); a tiny
# --train-subset search would otherwise ask for dozens of epochs it says nothing about.
SCALE_CAP = 3.0
# A trial that peaked at its last epoch was still improving: give it twice as many.
STILL_IMPROVING_FACTOR = 2.0
# So at most 6x the trial's epochs: 18 with the defaults (the cap was 12 until run 4's
# winner gained 0.2 points of test accuracy from 12 to 24 epochs).
# And at most the epochs that fit this budget (--final-minutes) at the speed measured on a
# few batches just before the fit: a slow winner must not turn an hour-long run into three.
# 40 min: scaled-up models need the time, and with the 15-20 min search the default run
# stays within about an hour (run 7: 61 min).
FINAL_FIT_MINUTES = 40.0
# A final fit whose training accuracy after an epoch is under COLLAPSE_FACTOR x chance (and
# under half its trial's validation score, for data where little can be learnt) has
# collapsed: it answers (nearly) one class. A healthy model is far above that after one
# epoch on 60,000 images; run 13's member fell to 0.10 test accuracy and was averaged in.
COLLAPSE_FACTOR = 2.0


def collapse_threshold(trial: FrozenTrial, num_classes: int) -> float:
    """The training accuracy under which a member's final fit counts as collapsed."""
    return min(COLLAPSE_FACTOR / num_classes, 0.5 * (accuracy_of(trial) or 0.0))

# Models the final fit averages unless told otherwise (--ensemble): the best trial and the
# next best of another architecture, both scaled up. Two, not three: scaled up, each needs
# about 20 min for 11-12 epochs. Run 7's study: 0.9233 for two scaled models in 41 min,
# 0.9131 for three as searched in 18 min (README, "Scale-up").
DEFAULT_ENSEMBLE = 2


# With the default ensemble the final fit adds further members (the next best trials of
# other architectures) while its time budget still holds each one's full planned epochs, up
# to this many in all. On a fast machine two members used 17 of the 40 minutes (run 21,
# README): the rest of the budget went unused while more members average out more error.
MAX_ENSEMBLE = 4


def extra_members(
    given: int | None, *, final_fit: bool, final_epochs: int | None,
    final_minutes: float | None,
) -> int:
    """Members the final fit may add beyond DEFAULT_ENSEMBLE when its budget has room: none
    when --ensemble or --final-epochs is given, without a final fit or without a budget."""
    if given is not None or not final_fit or final_epochs is not None or final_minutes is None:
        return 0
    return MAX_ENSEMBLE - DEFAULT_ENSEMBLE


def resolve_ensemble(given: int | None, *, single: bool) -> int:
    """--ensemble as given, else 1 when one model is meant (--trial, --pareto,
    --no-final-fit), else DEFAULT_ENSEMBLE."""
    if given is not None:
        return given
    return 1 if single else DEFAULT_ENSEMBLE


class ExportError(Exception):
    """An export that can't be made or read; str() is one line meant for the user."""


# --------------------------------------------------------------------------- choosing a trial


def pick_trial(study: optuna.Study, trial_number: int | None = None) -> FrozenTrial:
    """The best COMPLETE trial, or trial `trial_number`, which must be COMPLETE.

    Raises:
        ExportError: No complete trial, no such trial, or the trial is not complete.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if trial_number is not None:
        match = [t for t in trials if t.number == trial_number]
        if not match:
            have = f"trials 0..{len(trials) - 1}" if trials else "no trials yet"
            raise ExportError(f"study {study.study_name!r} has no trial {trial_number} ({have})")
        t = match[0]
        if t.state != TrialState.COMPLETE:
            why = t.user_attrs.get("fail_reason")
            raise ExportError(
                f"trial {trial_number} is {t.state.name.lower()}, not complete"
                + (f" ({why})" if why else "")
                + "; only a complete trial can be exported"
            )
        return t
    ranked = ranked_trials(study)
    if not ranked:
        raise ExportError(
            f"study {study.study_name!r} has no complete trial to export "
            f"({len(trials)} trial(s), none complete); run or continue the search first"
        )
    return ranked[0]


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete, feasible trials with a score, in the leaderboard's order.

    Best accuracy first, then the smaller model, then the earlier trial. A trial breaking
    --max-params/--max-latency-ms is left out: it is never exported.
    """
    from optuna.trial import TrialState

    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if (v := accuracy_of(t)) is not None and math.isfinite(v) and is_feasible(t)
    ]

    def key(t: FrozenTrial) -> tuple[float, float, int]:
        params = t.user_attrs.get("params")
        size = float(params) if isinstance(params, int) else math.inf
        return (-float(accuracy_of(t) or 0.0), size, t.number)

    return sorted(complete, key=key)


def architecture_key(cfg: Any) -> str:
    """The layer structure alone: dropout rates, optimiser and batch size set to nothing.

    Two trials with the same key differ only in how they were trained; an ensemble gains
    little from both (measured: three such models 0.9302 together, the best alone 0.9292).
    """
    from dataclasses import replace

    bare = replace(
        cfg,
        blocks=tuple(replace(b, dropout=0.0) for b in cfg.blocks),
        flatten_dropout=0.0,
        dense=tuple(replace(d, dropout=0.0) for d in cfg.dense),
        optimizer="",
        learning_rate=0.0,
        momentum=0.0,
        batch_size=0,
    )
    return str(bare.to_json())


def _trained_key(t: FrozenTrial, as_trained: Callable[[Any], Any]) -> str | None:
    """`architecture_key` of trial `t`'s config as the final fit trains it (None: unusable)."""
    from searchspace.config import CnnConfig

    try:
        return architecture_key(as_trained(CnnConfig.from_json(t.user_attrs["config"])))
    except (KeyError, TypeError, ValueError):
        return None


def ensemble_members(
    study: optuna.Study, lead: FrozenTrial, k: int,
    as_trained: Callable[[Any], Any] = lambda c: c,
) -> list[FrozenTrial]:
    """`lead` and the next best trials, up to `k` in all, each of another architecture.

    Walks the leaderboard and skips a trial whose `architecture_key` (of the config as the
    final fit will train it: `as_trained`) is already taken; when the study has fewer
    distinct architectures than `k`, the best skipped ones fill up.
    """
    def key(t: FrozenTrial) -> str | None:
        return _trained_key(t, as_trained)  # None: unusable config, never a member

    ranked = [t for t in ranked_trials(study) if t.number != lead.number and key(t) is not None]
    chosen, taken = [lead], {key(lead)}
    for t in ranked:
        if len(chosen) < k and key(t) not in taken:
            chosen.append(t)
            taken.add(key(t))
    for t in ranked:
        if len(chosen) < k and t.number not in {c.number for c in chosen}:
            chosen.append(t)
    return chosen


def stored_protocol(study: optuna.Study) -> dict[str, Any]:
    """The protocol the search stored in the study's user attributes.

    Raises:
        ExportError: The study has none (it was not made by run_search.py).
    """
    protocol = study.user_attrs.get("protocol")
    if not isinstance(protocol, dict) or "epochs" not in protocol:
        raise ExportError(
            f"study {study.study_name!r} has no stored search protocol; "
            "only studies made by run_search.py can be exported"
        )
    return protocol


def check_data(study: optuna.Study, data: Dataset) -> None:
    """Refuse data whose checksums differ from those the study was searched on.

    Raises:
        ExportError: naming the differing files.
    """
    expected = stored_protocol(study).get("data_sha256") or {}
    names = set(expected) | set(data.sha256)
    differ = sorted(k for k in names if expected.get(k) != data.sha256.get(k))
    if differ:
        raise ExportError(
            f"the data in {data.source_dir} are not the data study {study.study_name!r} was "
            f"searched on ({', '.join(differ)} differ); pass --data-dir with the same files"
        )


def _search_protocol(protocol: dict[str, Any]) -> Any:
    from .objective import SearchProtocol

    keys = {f.name for f in dataclasses.fields(SearchProtocol)}
    return SearchProtocol(**{k: protocol[k] for k in keys if k in protocol})


def _peak_epoch(trial: FrozenTrial, epochs: int) -> int:
    """The trial's 1-based peak epoch (mean over folds); from its history if not stored."""
    best = trial.user_attrs.get("best_epoch")
    if isinstance(best, int) and best >= 1:
        return min(best, epochs)
    try:
        folds = json.loads(trial.user_attrs.get("history", "[]"))
        curves = [f["val_accuracy"] for f in folds if f.get("val_accuracy")]
        n = min(len(c) for c in curves)
        mean = np.nanmean(np.array([c[:n] for c in curves], dtype=float), axis=0)
        return int(np.nanargmax(mean)) + 1  # NaN: an epoch not validated
    except (TypeError, ValueError, KeyError, AttributeError):
        return epochs  # nothing recorded: assume it peaked at the end


def estimated_epoch_seconds(
    trial: FrozenTrial, trial_train_size: int, full_train_size: int
) -> float | None:
    """Seconds one epoch on all training images should take, from the trial's own speed.

    Errs long: the trial's time includes its validation passes and it often ran in a
    single-threaded worker next to another one (run 4's winner: 61 s estimated, 41 s
    measured).
    """
    wall, epochs = trial.user_attrs.get("wall_time"), trial.user_attrs.get("epochs_run")
    if not isinstance(wall, int | float) or not isinstance(epochs, int) or epochs < 1:
        return None
    return float(wall) / epochs * full_train_size / max(1, trial_train_size)


def default_final_epochs(
    trial: FrozenTrial,
    trial_epochs: int,
    trial_train_size: int,
    full_train_size: int,
    budget_s: float | None = None,
    epoch_s: float | None = None,
) -> tuple[int, str]:
    """Epochs for the final fit on all training images, and the rule applied, in words.

    peak x min(full / trial's training images, SCALE_CAP), x STILL_IMPROVING_FACTOR when
    the peak is the last epoch, rounded up, and at most what fits `budget_s` at `epoch_s`
    seconds per epoch (`training.measure_epoch_seconds`), else at the trial's own speed.
    """
    peak = _peak_epoch(trial, trial_epochs)
    scale = min(full_train_size / max(1, trial_train_size), SCALE_CAP)
    value = peak * scale
    why = (
        f"peak epoch {peak} of {trial_epochs} x min({full_train_size}/{trial_train_size}, "
        f"{SCALE_CAP}) = {value:.2f}"
    )
    if peak >= trial_epochs:
        value *= STILL_IMPROVING_FACTOR
        why += f", x{STILL_IMPROVING_FACTOR} (still improving at its last epoch) = {value:.2f}"
    n = max(1, math.ceil(value - 1e-9))
    why += f", rounded up: {n}"
    source = "measured on a few batches before the fit"
    if epoch_s is None:
        epoch_s = estimated_epoch_seconds(trial, trial_train_size, full_train_size)
        source = "the trial's speed"
    if budget_s is not None and epoch_s:
        fits = max(1, int(budget_s // epoch_s))
        if fits < n:
            n = fits
            why += (f"; {fits} at about {epoch_s:.0f} s per epoch ({source}) "
                    f"fit the {budget_s / 60:.3g} min budget of the final fit")
    return n, why


# --------------------------------------------------------------------------- the card


def _library_versions() -> dict[str, str]:
    import keras
    import optuna
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "optuna": optuna.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
    }


def baseline_comparison(
    study: optuna.Study, protocol: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The seed documents' baselines, with re-measured scores from `<study>.baselines` if any.

    The baselines study is written by another command; anything unexpected in it is skipped
    rather than allowed to break an export.
    """
    from searchspace.baselines import BASELINES

    from .study import RANKING_ONLY, protocol_differences

    name = f"{study.study_name}.baselines"
    measured: dict[str, list[float]] = {}
    other_protocol: Any = None
    found = False
    try:
        import optuna
        from optuna.trial import TrialState

        bstudy = optuna.load_study(study_name=name, storage=study._storage)
        found = True
        other_protocol = bstudy.user_attrs.get("protocol")
        for t in bstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            label = t.user_attrs.get("baseline")
            value = accuracy_of(t)
            if isinstance(label, str) and isinstance(value, (int, float)) and math.isfinite(value):
                measured.setdefault(label, []).append(float(value))
    except Exception:  # no such study, or one we can't read: documented numbers only
        pass
    rows = []
    for b in BASELINES:
        vals = measured.get(b.name, [])
        rows.append(
            {
                "name": b.name,
                "source": b.source,
                "documented_accuracy": b.documented_accuracy,
                "documented_metric": b.documented_metric,
                "documented_protocol": b.documented_protocol,
                "remeasured_val_accuracy": float(np.mean(vals)) if vals else None,
                "remeasured_runs": len(vals),
            }
        )
    return {
        "remeasured_in": name if found else None,
        "remeasured_protocol": other_protocol,
        "same_protocol": None if other_protocol is None or protocol is None else not (
            protocol_differences(other_protocol, protocol, ignore=RANKING_ONLY)),
        "models": rows,
    }


def _evaluate(model: keras.Model, data: Dataset) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix on the test images."""
    from sklearn.metrics import classification_report, confusion_matrix

    probs = model.predict(data.x_test, batch_size=1024, verbose=0)
    pred = np.argmax(probs, axis=1)
    labels = list(range(data.num_classes))
    report = classification_report(
        data.y_test, pred, labels=labels, target_names=list(data.class_names),
        output_dict=True, zero_division=0,
    )

    def snake(d: dict[str, float]) -> dict[str, float]:
        return {k.replace("-score", "").replace("-", "_"): float(v) for k, v in d.items()}

    return {
        "test_accuracy": float(np.mean(pred == data.y_test)),
        "test_images": int(len(data.y_test)),
        "per_class": {n: snake(report[n]) for n in data.class_names},
        "macro_avg": snake(report["macro avg"]),
        "weighted_avg": snake(report["weighted avg"]),
        "confusion_matrix": confusion_matrix(data.y_test, pred, labels=labels).tolist(),
        # The test images the model is least sure of (lowest top probability), as the seed
        # documents show: where it hesitates says more than the accuracy does.
        "least_confident": [
            {"index": int(i), "true": int(data.y_test[i]), "pred": int(pred[i]),
             "prob": round(float(probs[i, pred[i]]), 4)}
            for i in np.argsort(probs.max(axis=1))[:LEAST_CONFIDENT]
        ],
    }


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN/inf as null (strict JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------- training


class FitProgress:
    """A rich `ProgressSink` for one final fit: an epochs bar and the running epoch's batches."""

    def __init__(self, disable: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=disable,
        )
        self._epochs = self.progress.add_task("final fit epochs", total=None)
        self._batches = self.progress.add_task("epoch 1", total=1)

    def __enter__(self) -> FitProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def trial_started(self, number: int, cfg: Any) -> None:
        self.console.print(f"[dim]trial {number}: {cfg.summary()}[/dim]", highlight=False)

    def epoch_started(self, number: int, step: int, total_steps: int) -> None:
        self.progress.update(self._epochs, total=total_steps)
        self.progress.update(self._batches, description=f"epoch {step}/{total_steps}", completed=0)

    def batch_done(self, done: int, total: int) -> None:
        self.progress.update(self._batches, completed=done, total=total)

    def epoch_done(self, number: int, step: int, value: float) -> None:
        self.progress.update(self._epochs, completed=step)


def _fit(
    cfg: Any,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    epochs: int,
    seed: int,
    num_classes: int,
    number: int,
    progress: ProgressSink | None,
    augment: bool = False,
    deadline_s: float | None = None,
    collapse_below: float | None = None,
) -> Any:
    """fit_config with progress reporting.

    With validation data (the trial's own protocol) the model is the last epoch's, whose
    accuracy on every validation image is the trial's score. Without (the final fit), the
    learning rate follows a cosine to 0 and, with `deadline_s`, the fit plans fewer epochs
    if they run too slow for it."""
    from .precision import as_float32
    from .training import fit_config

    def on_epoch(e: int, logs: dict[str, float]) -> None:
        if progress:
            acc = logs.get("val_accuracy", logs.get("accuracy", math.nan))
            progress.epoch_done(number, e + 1, acc)
            planned = int(logs.get("epochs_planned", epochs))  # fewer if the deadline cut
            if e + 1 < planned:
                progress.epoch_started(number, e + 2, planned)

    if progress:
        progress.trial_started(number, cfg)
        progress.epoch_started(number, 1, epochs)
    res = fit_config(
        cfg, x, y, x_val, y_val, epochs=epochs, seed=seed, num_classes=num_classes,
        on_epoch=on_epoch, on_batch=progress.batch_done if progress else None,
        keep_model=True,
        # The final fit (no validation data) anneals the trial's learning rate to 0 with a
        # cosine: the usual last step of training, worth a few tenths of a point here.
        cosine_decay=x_val is None,
        deadline_s=deadline_s,
        augment=augment,
        collapse_below=collapse_below,
    )
    if res.model is not None:
        # Trained under mixed bfloat16 (precision.py), exported in float32: the same
        # weights, runs on any CPU; test accuracy is measured on this copy, the model shipped.
        res.model = as_float32(res.model)
    return res


def _final_member_fit(
    cfg: Any,
    data: Dataset,
    *,
    epochs: int,
    seed: int,
    number: int,
    progress: ProgressSink | None,
    augment: bool,
    deadline_s: float | None,
    collapse_below: float,
) -> Any:
    """One member's final fit on all training images.

    Raises CollapsedError when an epoch after the first ends under `collapse_below`
    training accuracy, or when a fit of two epochs or more ends with a model scoring under
    it on the first 2,000 training images (the per-epoch check averages over the epoch, so
    it misses a collapse late in the last one). A one-epoch fit is not judged (on small
    data a healthy model can be near chance after one pass).
    """
    from .training import CollapsedError

    res = _fit(
        cfg, data.x_train, data.y_train, None, None, epochs=epochs, seed=seed,
        num_classes=data.num_classes, number=number, progress=progress, augment=augment,
        deadline_s=deadline_s, collapse_below=collapse_below,
    )
    if res.model is not None and res.epochs_run >= 2:
        n = min(len(data.y_train), 2_000)
        probs = res.model.predict(data.x_train[:n], batch_size=1024, verbose=0)
        acc = float(np.mean(np.argmax(probs, axis=1) == data.y_train[:n]))
        if acc < collapse_below:
            raise CollapsedError(f"accuracy {acc:.4f} on {n} training images after the fit, "
                                 "about chance")
    return res


def export_study(
    study: optuna.Study,
    data: Dataset,
    out_dir: Path,
    *,
    trial_number: int | None = None,
    final_epochs: int | None = None,
    final_fit: bool = True,
    augment: bool = False,
    final_minutes: float | None = FINAL_FIT_MINUTES,
    seed: int | None = None,
    command_line: Sequence[str] | None = None,
    progress: ProgressSink | None = None,
    ensemble: int = 1,
    extra: int = 0,
    scale_up: bool = True,
    no_scale_up_reason: str = "--no-scale-up",
) -> Path:
    """Retrain a trial's architecture, test it once, and export it to `out_dir`.

    Args:
        study: A study made by the search (it holds the protocol and the trials' configs).
        data: The data the study was searched on (checked against the stored checksums).
        out_dir: Destination, usually results/<study>/best_model; replaced atomically.
        trial_number: Export this trial (must be COMPLETE) instead of the best one.
        final_epochs: Epochs of the final fit; default from the trial's peak epoch (README).
        final_fit: False retrains with the trial's own protocol (its training split, its
            epochs, its seed) and keeps the last epoch's weights, instead of all images.
        final_minutes: Time budget of the default final epochs (None: no budget).
        augment: Final fit only: flip and shift the training images at random each epoch
            (`training.augmented_batches`); the search itself never augments.
        seed: Initial-weights seed; default the trial's own (protocol seed x 100003 + trial).
        command_line: Recorded in the card (default sys.argv).
        progress: Receives epoch/batch progress (e.g. `FitProgress`); None = silent.
        ensemble: Final fit only: also retrain the next best trials of other architectures
            (`ensemble_members`), `ensemble` models in all, and export one model that
            averages their softmax outputs. The time budget is shared among them.
        extra: Final fit with a budget only: up to this many further members (`extra_members`),
            each only if what is left of the budget holds its full planned epochs.
        scale_up: Final fit only: train each architecture as wide and deep as the study's
            space allows (`searchspace.scaled_up`), unless the study limits size or latency
            or optimises more than accuracy (`scale_up_applies`).
        no_scale_up_reason: What the card says when `scale_up` is False.

    Returns:
        `out_dir`.

    Raises:
        ExportError: One line: no suitable trial, other data, a bad config, or a failed write.
    """
    from searchspace import scaled_up
    from searchspace.config import CnnConfig, InvalidConfigError

    from .objective import make_folds
    from .precision import current as current_precision
    from .training import SHIFT_PIXELS, DivergedError, measure_epoch_seconds

    trial = pick_trial(study, trial_number)
    protocol = stored_protocol(study)
    check_data(study, data)
    try:
        cfg = CnnConfig.from_json(trial.user_attrs["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"trial {trial.number} has no usable stored config ({e})") from None
    sp = _search_protocol(protocol)
    folds = make_folds(data, sp)
    tr, va = folds.splits[0]
    given_seed = seed
    trial_seed = sp.seed * 100_003 + trial.number  # as fmnist_search.objective seeds the trial
    seed = trial_seed if seed is None else seed
    card: dict[str, Any] = {}
    scale_why = scale_up_applies(protocol) if final_fit and scale_up else no_scale_up_reason
    if not final_fit:
        scale_why = "no final fit"
    space, bad_space = _stored_space(protocol) if scale_why is None else (None, None)
    scale_why = scale_why or bad_space
    scaled: dict[int, bool] = {}  # member -> did scale-up change its architecture

    def as_trained(c: CnnConfig) -> CnnConfig:
        return c if space is None else scaled_up(c, space)

    if not final_fit or final_epochs is not None or final_minutes is None or (
        (protocol.get("objectives") or ["accuracy"]) != ["accuracy"]
        or protocol.get("max_params") is not None or protocol.get("max_latency_ms") is not None
    ):
        # Extras need a budget to fit within; a study after small or fast models gets no
        # more of them than it asked for (each member adds its size and latency).
        extra = 0
    members = (
        ensemble_members(study, trial, ensemble + extra, as_trained=as_trained)
        if ensemble + extra > 1 else [trial]
    )
    required = min(ensemble, len(members))  # the rest are extras, fitted while time allows
    _check_ensemble_size(members[:required], protocol)
    # An extra member must bring another architecture (ensemble_members fills up with
    # repeats when the study has too few): a repeat adds little and costs a whole fit.
    taken = {_trained_key(m, as_trained) for m in members[:required]}
    extras: list[FrozenTrial] = []
    for m in members[required:]:
        if (key := _trained_key(m, as_trained)) not in taken:
            extras.append(m)
            taken.add(key)
    members = members[:required] + extras
    extra_note, extras_fitted = None, 0
    current = trial  # the trial being fitted, for the error messages
    fits: list[tuple[FrozenTrial, Any, int, str, int, Any]] = []
    dropped: list[dict[str, Any]] = []  # ensemble members whose final fit failed
    try:
        if final_fit:
            # The budget is the whole final fit's: each member gets an equal share of what is
            # left, at its speed measured on a few batches just before its fit; an extra
            # member may take all that is left, but only if its planned epochs fit in it.
            spent = 0.0
            for i, m in enumerate(members):
                current = m
                optional = i >= required
                left_s = None if final_minutes is None else max(0.0, 60 * final_minutes - spent)
                budget_s = (
                    None if left_s is None else left_s if optional else left_s / (required - i)
                )
                m_searched = cfg if m.number == trial.number else CnnConfig.from_json(
                    m.user_attrs["config"]
                )
                m_cfg = as_trained(m_searched)
                scaled[m.number] = m_cfg != m_searched
                m_seed = sp.seed * 100_003 + m.number if given_seed is None else given_seed
                deadline_s = None  # the fit's own: its share, less the probe's time
                if final_epochs is None:
                    probe_start = time.perf_counter()
                    epoch_s = None if budget_s is None else measure_epoch_seconds(
                        m_cfg, data.x_train, data.y_train, num_classes=data.num_classes,
                        augment=augment,
                    )
                    probe_s = time.perf_counter() - probe_start
                    spent += probe_s
                    if budget_s is not None:
                        deadline_s = max(0.0, budget_s - probe_s)
                    # Planned against what the fit itself has: the share less the probe.
                    m_epochs, m_rule = default_final_epochs(
                        m, sp.epochs, len(tr), len(data.y_train), budget_s=deadline_s,
                        epoch_s=epoch_s,
                    )
                    if optional:
                        wanted, _ = default_final_epochs(m, sp.epochs, len(tr),
                                                         len(data.y_train))
                        room_s = deadline_s or 0.0
                        if m_epochs < wanted or wanted * (epoch_s or 0.0) > room_s:
                            extra_note = (
                                f"no further member: trial {m.number}'s {wanted} epochs at "
                                f"about {epoch_s or 0:.0f} s each did not fit the "
                                f"{room_s / 60:.3g} min left of the budget"
                            )
                            del scaled[m.number]  # never trained
                            break
                else:
                    m_epochs, m_rule = final_epochs, "given on the command line (--final-epochs)"
                fit_start = time.perf_counter()
                try:
                    m_res = _final_member_fit(
                        m_cfg, data, epochs=m_epochs, seed=m_seed, number=m.number,
                        progress=progress, augment=augment, deadline_s=deadline_s,
                        collapse_below=collapse_threshold(m, data.num_classes),
                    )
                except DivergedError as e:
                    failed_s = time.perf_counter() - fit_start
                    spent += failed_s
                    if i > 0:
                        # Averaging in a weak model costs more than it adds: run 13b retried
                        # such a member at a third of its rate; it scored 0.8692 alone and
                        # took the ensemble from the lead's 0.9323 down to 0.9279.
                        dropped.append({"trial": m.number, "why": f"its final fit stopped "
                                        f"after {failed_s:.0f} s ({e}); left out"})
                        continue
                    # The chosen trial itself (nothing else to export in its name): the
                    # searched rate suited the searched model, while the one trained here is
                    # often deeper (scale-up) and sees 6x the images. One retry at a third
                    # of the rate, in what is left of its share.
                    m_cfg = dataclasses.replace(m_cfg, learning_rate=m_cfg.learning_rate / 3)
                    m_rule += (f"; the first final fit stopped after {failed_s:.0f} s ({e}); "
                               f"retrained at a third of the learning rate "
                               f"({m_cfg.learning_rate:.2g})")
                    try:
                        m_res = _final_member_fit(
                            m_cfg, data, epochs=m_epochs, seed=m_seed, number=m.number,
                            progress=progress, augment=augment,
                            deadline_s=None if deadline_s is None
                            else max(0.0, deadline_s - failed_s),
                            collapse_below=collapse_threshold(m, data.num_classes),
                        )
                    except DivergedError as e2:
                        raise DivergedError(f"{e}; at a third of the rate: {e2}") from None
                _check_fitted(m, m_res)
                if deadline_s is not None and m_res.epochs_run < m_epochs:  # cut in the fit
                    m_rule += (
                        f"; cut to {m_res.epochs_run} during the fit, whose epochs took "
                        f"{m_res.wall_time / m_res.epochs_run:.0f} s each, to end within "
                        f"its {deadline_s / 60:.3g} min"
                    )
                    m_epochs = m_res.epochs_run
                fits.append((m, m_cfg, m_epochs, m_rule, m_seed, m_res))
                extras_fitted += optional
                spent += m_res.wall_time
            _, trained_cfg, final_epochs, rule, seed, res = fits[0]
            card["final_fit"] = True
            card["scale_up"] = (
                {
                    "applied": True,
                    "note": "each architecture was trained as wide and as deep as the study's "
                    "space allows (the most convolutions per block, the widest filter choice "
                    "of each block); kernels, activation, BatchNorm, pooling, dropout, dense "
                    "head and optimiser are the trial's. config is the model as trained, "
                    "searched_config the trial's",
                }
                if any(scaled.values())
                else {"applied": False, "note": f"not scaled up: {scale_why}" if scale_why
                      else "the architectures were already as wide and deep as the space allows"}
            )
            if trained_cfg != cfg:  # scaled up, or retrained at a lower rate
                card["searched_architecture"] = cfg.summary()
                card["searched_config"] = cfg.to_dict()
                cfg = trained_cfg
            card["final_fit_note"] = (
                f"retrained from scratch on all {len(data.y_train)} training images for "
                f"{final_epochs} epoch(s), the learning rate annealed from the trial's to 0 "
                "with a cosine"
                + (", each epoch's images flipped left-right at random and shifted by up to "
                   f"{SHIFT_PIXELS} pixels" if augment else ", no augmentation")
                + "; no validation data was held out, so val_accuracy is the "
                "search's estimate for the searched architecture, not a measurement of this model"
            )
            card["augmentation"] = (
                {"flip_left_right": True, "shift_pixels": SHIFT_PIXELS} if augment else None
            )
            card["lr_schedule"] = "cosine decay to 0 over the final fit"
            train_images = len(data.y_train)
        else:
            if final_epochs is not None:
                raise ExportError(
                    "--final-epochs applies to the final fit; drop it or --no-final-fit"
                )
            if augment:
                raise ExportError("--augment applies to the final fit; drop it or --no-final-fit")
            if ensemble > 1:
                raise ExportError("--ensemble applies to the final fit; drop it or --no-final-fit")
            final_epochs, rule = sp.epochs, "the trial's own epochs (--no-final-fit)"
            res = _fit(
                cfg, folds.x[tr], folds.y[tr], folds.x[va], folds.y[va], epochs=sp.epochs,
                seed=seed, num_classes=data.num_classes, number=trial.number, progress=progress,
            )
            card["final_fit"] = False
            card["final_fit_note"] = (
                "the search does not store weights, so this model was retrained with the trial's "
                f"own protocol: the same {len(tr)} training images"
                + (" (fold 1 of the K folds)" if sp.cv >= 2 else "")
                + f", {sp.epochs} epoch(s), seed {seed}; the weights are those after the last "
                f"epoch, as the trial was scored ({res.final_val_accuracy:.4f} on the "
                f"validation images vs the search's {accuracy_of(trial) or 0:.4f})"
            )
            card["reproduced_val_accuracy"] = res.final_val_accuracy
            train_images = len(tr)
    except InvalidConfigError as e:
        raise ExportError(f"trial {current.number}: cannot build its config: {e}") from None
    except DivergedError as e:
        raise ExportError(f"trial {current.number}: the final fit diverged ({e}); "
                          "try --seed or --final-epochs") from None
    _check_fitted(trial, res)
    model = res.model
    if len(fits) > 1:
        model = average_models([(m.number, f.model) for m, _, _, _, _, f in fits])
        card["ensemble"] = [
            {
                "trial": m.number,
                "architecture": m_cfg.summary(),
                "scaled_up": scaled[m.number],
                **({"searched_architecture": CnnConfig.from_json(m.user_attrs["config"]).summary(),
                    "searched_config": json.loads(m.user_attrs["config"])}
                   if scaled[m.number] else {}),
                "params": int(f.model.count_params()),
                "val_accuracy": accuracy_of(m),
                "final_epochs": m_epochs,
                "final_epochs_rule": m_rule,
                "seed": m_seed,
                "train_time_s": round(f.wall_time, 3),
                # Measured for the record only: nothing is chosen on it.
                "test_accuracy": _accuracy(f.model, data),
                "config": m_cfg.to_dict(),
            }
            for m, m_cfg, m_epochs, m_rule, m_seed, f in fits
        ]
        card["ensemble_note"] = (
            f"the average of the softmax outputs of {len(fits)} models, each retrained on all "
            f"training images: trial {trial.number} and the next best trials of other "
            "architectures (dropout, optimiser and batch size aside); the top-level "
            "final_epochs, seed and config are trial "
            f"{trial.number}'s, params and train_time_s the whole ensemble's"
            + ("" if len(fits) + len(dropped) >= ensemble else f"; {ensemble} were asked, the "
               f"study had {len(fits) + len(dropped)} complete, feasible trials with a usable "
               "config")
            + (f"; {len(dropped)} more left out, their final fit failed (ensemble_dropped)"
               if dropped else "")
        )
    if extra:
        card["ensemble_extra"] = {
            "allowed": extra,
            "added": extras_fitted,
            "note": extra_note or (
                "every allowed member fitted the budget" if len(members) == required + extra
                else "the study had no more trials of other architectures"
            ) + ("" if extras_fitted == len(members) - required
                 else "; a further member's final fit failed (ensemble_dropped)"),
        }
    if dropped:
        card["ensemble_dropped"] = dropped
    metrics = _evaluate(model, data)  # the one and only look at the test images
    ua = trial.user_attrs
    card = {
        "format_version": CARD_VERSION,
        "study": study.study_name,
        "trial": trial.number,
        "architecture": cfg.summary()
        + (f" + {len(fits) - 1} more (ensemble)" if len(fits) > 1 else ""),
        "params": int(model.count_params()),
        "test_accuracy": metrics["test_accuracy"],
        "val_accuracy": accuracy_of(trial),
        "val_accuracy_std": ua.get("val_accuracy_std"),
        **card,
        "final_epochs": final_epochs,
        "final_epochs_rule": rule,
        "train_images": train_images,
        "train_time_s": round(sum(f.wall_time for *_, f in fits) if fits else res.wall_time, 3),
        # The arithmetic of the fit; the exported model is float32 either way (precision.py).
        "train_precision": current_precision(),
        "seed": seed,
        "test_images": metrics["test_images"],
        "per_class": metrics["per_class"],
        "macro_avg": metrics["macro_avg"],
        "weighted_avg": metrics["weighted_avg"],
        "confusion_matrix": metrics["confusion_matrix"],
        "confusion_matrix_axes": "rows: true class, columns: predicted class (class_names order)",
        "least_confident": metrics["least_confident"],
        "class_names": list(data.class_names),
        "input": {
            "shape": [28, 28, 1],
            "dtype": "float32",
            "scaling": "pixel / 255, so values in [0, 1]",
            "polarity": "light item on a dark background, as in Fashion-MNIST",
        },
        "output": "softmax probabilities, one per class_names entry",
        "config": cfg.to_dict(),
        "protocol": protocol,
        "data_sha256": dict(sorted(data.sha256.items())),
        "command_line": list(sys.argv if command_line is None else command_line),
        "library_versions": _library_versions(),
        "baselines": baseline_comparison(study, protocol),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_export(model, card, out_dir)
    # Only now, with the export in place: the leaderboard's "test" column gets the accuracy of a
    # model that was really fitted (an ensemble's members their own; the card the ensemble's).
    by_number = {m.number: m for m in members}
    for member in card.get("ensemble") or [{"trial": trial.number, **metrics}]:
        t = by_number[member["trial"]]
        annotate_trial(study, t, "test_accuracy", member["test_accuracy"])
        annotate_trial(study, t, "test_final_fit", bool(card["final_fit"]))
        annotate_trial(study, t, "test_scaled_up", scaled.get(t.number, False))
    return path


def scale_up_applies(protocol: dict[str, Any]) -> str | None:
    """None when the final fit may scale architectures up, else why not, in words.

    A study that optimises size or latency, or caps them, asked for small models: scaling
    them up would undo what it searched for.
    """
    if (protocol.get("objectives") or ["accuracy"]) != ["accuracy"]:
        return "the study optimises more than accuracy"
    if protocol.get("max_params") is not None or protocol.get("max_latency_ms") is not None:
        return "the study limits parameters or latency"
    if not isinstance(protocol.get("space"), dict):
        return "the study stores no search space"
    return None


def _stored_space(protocol: dict[str, Any]) -> tuple[Any, str | None]:
    """The study's search space, or None and why it can't be used (then no scale-up)."""
    from dataclasses import replace

    from searchspace import SearchSpace, SpaceError, space_from_dict

    stored = protocol["space"]
    # Studies from before filter_growth existed gave every block the same filter choices.
    base = SearchSpace() if "filter_growth" in stored else replace(SearchSpace(), filter_growth=1)
    try:
        return space_from_dict(stored, base), None
    except (SpaceError, TypeError) as e:
        return None, f"the study's stored search space is unusable ({e})"


def _check_ensemble_size(members: Sequence[FrozenTrial], protocol: dict[str, Any]) -> None:
    """Refuse an ensemble whose summed parameters break the study's --max-params."""
    limit = protocol.get("max_params")
    total = sum(int(m.user_attrs.get("params") or 0) for m in members)
    if len(members) > 1 and limit is not None and total > int(limit):
        raise ExportError(
            f"an ensemble of {len(members)} has {total:,} parameters, over the study's "
            f"--max-params {int(limit):,}; use a smaller --ensemble"
        )


def _check_fitted(trial: FrozenTrial, res: Any) -> None:
    if res.model is None or not math.isfinite(res.history.get("loss", [math.nan])[-1]):
        raise ExportError(f"trial {trial.number}: the final fit did not produce a usable model")


def _accuracy(model: keras.Model, data: Dataset) -> float:
    probs = model.predict(data.x_test, batch_size=1024, verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == data.y_test))


def average_models(members: Sequence[tuple[int, keras.Model]]) -> keras.Model:
    """One model whose output is the mean of the members' softmax outputs.

    Each member is wrapped under the name `trial_<n>` (their own names may repeat after
    `clear_session`); only built-in layers, so the file loads in Keras' safe mode.
    """
    import keras

    from .precision import float32_policy

    with float32_policy():  # the wrappers and the Average too: the export is float32 (README)
        inputs = keras.Input(shape=members[0][1].input_shape[1:])
        outputs = [keras.Sequential([m], name=f"trial_{n}")(inputs) for n, m in members]
        return keras.Model(inputs, keras.layers.Average(name="average")(outputs),
                           name="ensemble")


def annotate_trial(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> bool:
    """Record `key`=`value` for a finished trial, through Optuna's public API.

    Optuna refuses to change a finished trial, so the value goes into the study's user
    attribute `test:<trial number>` (a dict); `study.trials_with_annotations` merges it
    back into the trial's user attributes for the leaderboard.
    """
    name = f"test:{trial.number}"
    try:
        current = dict(study.user_attrs.get(name, {}))
        current[key] = value
        study.set_user_attr(name, current)
    except Exception as e:  # the export is already in place; only the leaderboard column is lost
        msg = f"could not store {key} for trial {trial.number}: {_one_line(e)}"
        warnings.warn(msg, stacklevel=2)
        return False
    trial.user_attrs[key] = value
    return True


# --------------------------------------------------------------------------- atomic writing


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_keras(model: keras.Model, path: Path) -> None:
    model.save(str(path))


def _save_saved_model(model: keras.Model, path: Path) -> None:
    model.export(str(path), format="tf_saved_model", verbose=False)


def _write_card(path: Path, card: dict[str, Any]) -> None:
    path.write_text(json.dumps(_jsonable(card), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_sums(root: Path) -> Path:
    """Write root/SHA256SUMS over every other file below root (`sha256sum -c` format)."""
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in rels if rel != SUMS_FILE]
    out = root / SUMS_FILE
    out.write_text("".join(lines), encoding="utf-8")
    return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Files first, then their directories, so the renames below publish durable content.
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        _fsync_path(p)
    _fsync_path(root)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl...
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False  # kernel or file system without exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(out_dir: Path) -> None:
    """Remove temporaries of dead exports; restore an old export a crash left moved aside."""
    for kind in ("old", "tmp"):  # "old" first: it may be the only complete export left
        for p in sorted(out_dir.parent.glob(f"{out_dir.name}.{kind}-*")):
            pid = p.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue  # another live process is exporting here
            if kind == "old" and not out_dir.exists() and (p / SUMS_FILE).is_file():
                os.rename(p, out_dir)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
    elif _exchange(tmp, out_dir):
        _fsync_path(out_dir.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous export
    else:
        old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        _fsync_path(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(out_dir.parent)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def write_export(model: keras.Model, card: dict[str, Any], out_dir: Path) -> Path:
    """Write one exported model to `out_dir`, replacing any previous export atomically.

    Writes model.keras, saved_model/, model_card.json and SHA256SUMS into a temporary
    sibling, fsyncs them, then swaps the directory into place.

    Returns:
        `out_dir`.

    Raises:
        ExportError: One line; the previous export (if any) is left as it was.
    """
    out_dir = Path(out_dir).absolute()
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_keras(model, tmp / MODEL_FILE)
        _save_saved_model(model, tmp / SAVED_MODEL_DIR)
        _write_card(tmp / CARD_FILE, card)
        write_sums(tmp)
        _fsync_tree(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while exporting to {out_dir}") from None
        if isinstance(e, OSError):
            where = f" ({e.filename})" if e.filename else ""
            why = e.strerror or str(e)
            raise ExportError(f"cannot write the export to {out_dir}: {why}{where}") from None
        if isinstance(e, Exception):
            raise ExportError(f"export to {out_dir} failed: {_one_line(e)}") from None
        raise  # KeyboardInterrupt and friends: cleaned up, then propagate
    return out_dir


# --------------------------------------------------------------------------- command line


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Parser of `run_search.py export`."""
    from .cli import (
        Parser,
        add_precision_arg,
        add_storage_args,
        int_at_least,
        positive_float,
    )

    p = Parser(
        prog=prog,
        description="Retrain the best (or a chosen) trial of a stored study on all training "
        "images, evaluate it once on the test set, and export it to results/<study>/best_model/.",
    )
    p.add_argument("--data-dir", default=None,
                   help="the study's IDX files (default: the search order of run_search.py)")
    p.add_argument("--trial", type=int_at_least(0), default=None,
                   help="export this trial (must be complete) instead of the best one")
    p.add_argument("--final-epochs", type=int_at_least(1), default=None,
                   help="epochs of the final fit (default: from the trial's peak epoch, "
                   "see README)")
    p.add_argument("--no-final-fit", action="store_true",
                   help="retrain with the trial's own split and epochs instead of all "
                   "training images")
    p.add_argument("--final-minutes", type=positive_float, default=FINAL_FIT_MINUTES,
                   help="time budget of the default final epochs, at the speed measured just "
                   f"before each fit, shared by --ensemble members (default {FINAL_FIT_MINUTES:g})")
    p.add_argument("--augment", action="store_true",
                   help="flip and shift the training images at random each epoch of the final "
                   "fit (off by default: it lost 1.3 points at 24 epochs, see README)")
    p.add_argument("--no-scale-up", action="store_true",
                   help="train the architectures as searched (default: as wide and deep as the "
                   "study's space allows, unless it limits size or latency; see README)")
    p.add_argument("--ensemble", type=int_at_least(1), default=None, metavar="K",
                   help="final fit of the best (or --trial) and the next best K-1 trials of "
                   "other architectures, exported as one model averaging them (default "
                   f"{DEFAULT_ENSEMBLE}, and up to {MAX_ENSEMBLE} while the --final-minutes "
                   "budget holds each further member's planned epochs; 1 with --trial, "
                   "--pareto or --no-final-fit)")
    p.add_argument("--seed", type=int_at_least(0), default=None,
                   help="initial-weights seed (default: the trial's own seed)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars")
    add_precision_arg(p)
    p.add_argument("--pareto", action="store_true",
                   help="export every trial on the Pareto front (accuracy vs the study's other "
                   "objectives, or vs parameters) to results/<study>/pareto/trial-<n>/")
    add_storage_args(p)
    return p


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete, feasible trials not dominated on (accuracy, params[, latency]) by another.

    The objectives are the study's own (multi-objective) or, for a plain accuracy search,
    accuracy vs parameter count.
    """
    from optuna.trial import TrialState

    from .multiobjective import non_dominated_sort

    objectives = stored_protocol(study).get("objectives") or ["accuracy", "params"]
    if list(objectives) == ["accuracy"]:
        objectives = ["accuracy", "params"]
    done = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if accuracy_of(t) is not None and is_feasible(t)
        and isinstance(t.user_attrs.get("params"), int)
    ]
    keys = {"accuracy": lambda t: accuracy_of(t), "params": lambda t: t.user_attrs["params"],
            "latency": lambda t: t.user_attrs.get("latency_ms_b1", math.inf)}
    dirs = ["maximize" if o == "accuracy" else "minimize" for o in objectives]
    points = [[float(keys[o](t)) for o in objectives] for t in done]
    depth = non_dominated_sort(points, dirs) if points else []
    front = [t for t, d in zip(done, depth, strict=True) if d == 0]
    return sorted(front, key=lambda t: -float(accuracy_of(t) or 0.0))


def _command_line(args: argparse.Namespace) -> list[str]:
    """The export command as given (rebuilt from args: main() may not come from sys.argv)."""
    from .study import redact

    line = ["run_search.py", "export", "--study-name", args.study_name]
    line += ["--results-dir", str(args.results_dir)]
    if args.storage:
        line += ["--storage", redact(args.storage)]
    if args.data_dir:
        line += ["--data-dir", str(args.data_dir)]
    optional = {"--trial": args.trial, "--final-epochs": args.final_epochs, "--seed": args.seed,
                "--final-minutes": (None if args.final_minutes == FINAL_FIT_MINUTES
                                    else args.final_minutes)}
    for flag, value in optional.items():
        if value is not None:
            line += [flag, str(value)]
    return (line + (["--no-final-fit"] if args.no_final_fit else [])
            + (["--augment"] if args.augment else [])
            + (["--no-scale-up"] if args.no_scale_up else [])
            + (["--ensemble", str(given)] if (given := getattr(args, "ensemble_given", None))
               else []))


def run(args: argparse.Namespace) -> int:
    """`run_search.py export`: returns the exit code; user errors are one line on stderr."""
    from . import study as st
    from .cli import (
        EXIT_INTERRUPTED,
        EXIT_RUNTIME,
        StoredStudyError,
        UsageError,
        err,
        load_stored_study,
        use_precision,
    )

    if args.no_final_fit and args.final_epochs is not None:
        raise UsageError("--final-epochs and --no-final-fit exclude each other")
    if args.no_final_fit and args.augment:
        raise UsageError("--augment and --no-final-fit exclude each other")
    if args.no_final_fit and (args.ensemble or 1) > 1:
        raise UsageError("--ensemble and --no-final-fit exclude each other")
    if args.pareto and (args.ensemble or 1) > 1:
        raise UsageError("--pareto exports each front trial alone; it takes no --ensemble")
    if args.pareto and args.trial is not None:
        raise UsageError("--pareto exports the whole front; it takes no --trial")
    args.ensemble_given = args.ensemble  # the card's command line: as typed
    args.ensemble = resolve_ensemble(
        args.ensemble, single=args.trial is not None or args.pareto or args.no_final_fit
    )
    try:
        study = load_stored_study(args)
        trial = pick_trial(study, args.trial)  # fail fast, before loading data or TensorFlow
        stored_protocol(study)
    except (StoredStudyError, ExportError) as e:
        err(str(e))
        return EXIT_RUNTIME
    use_precision(args.precision)
    from rich.console import Console

    from .data import DataError, load_dataset

    console = Console(stderr=True)
    try:
        data = load_dataset(args.data_dir, warn=lambda m: None)
        check_data(study, data)
    except (DataError, ExportError) as e:
        err(str(e))
        return EXIT_RUNTIME
    if args.pareto:
        return _run_pareto(args, study, data, console)
    out_dir = st.study_dir(args.results_dir, args.study_name) / EXPORT_DIR
    start = time.perf_counter()
    try:
        with FitProgress(disable=args.no_progress) as progress:
            export_study(
                study, data, out_dir, trial_number=trial.number, final_epochs=args.final_epochs,
                final_fit=not args.no_final_fit, augment=args.augment,
                final_minutes=args.final_minutes, seed=args.seed,
                command_line=_command_line(args), progress=progress, ensemble=args.ensemble,
                extra=extra_members(
                    args.ensemble_given, final_fit=not args.no_final_fit,
                    final_epochs=args.final_epochs, final_minutes=args.final_minutes,
                ) if args.trial is None else 0,
                scale_up=not args.no_scale_up,
            )
    except ExportError as e:
        err(str(e))
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        err("interrupted; the previous export (if any) is unchanged")
        return EXIT_INTERRUPTED
    card = json.loads((out_dir / CARD_FILE).read_text(encoding="utf-8"))
    console.print(f"[dim]done in {time.perf_counter() - start:.0f}s[/dim]", highlight=False)
    for line in summary_lines(card, out_dir):
        print(line)
    return 0


def summary_lines(card: dict[str, Any], out_dir: Path) -> list[str]:
    """What `export` prints once the model is written: from its card alone."""
    lines = [
        f"exported trial {card['trial']} ({card['architecture']}) to {out_dir}",
        f"test accuracy {card['test_accuracy']:.4f} on {card['test_images']} test images "
        f"(search's val accuracy {card['val_accuracy']:.4f}); final fit: "
        + ("yes" if card["final_fit"] else "no") + f", {card['final_epochs']} epoch(s)",
    ]
    # The lead's searched architecture is recorded only when it was trained otherwise; in an
    # ensemble, scale-up may have changed other members and not the lead.
    if card.get("searched_architecture"):
        scaled = (card.get("scale_up") or {}).get("applied")
        lines.append(f"searched as {card['searched_architecture']}"
                     + (" (--no-scale-up: train it as searched)" if scaled else ""))
    for m in card.get("ensemble") or []:
        searched = (f", scaled up from {m['searched_architecture']}"
                    if m.get("searched_architecture") else "")
        lines.append(f"  member trial {m['trial']} ({m['architecture']}{searched}): test "
                     f"accuracy {m['test_accuracy']:.4f}, {m['final_epochs']} epoch(s)")
    lines.append(f"model card: {out_dir / CARD_FILE}")
    return lines


def _run_pareto(args: argparse.Namespace, study: optuna.Study, data: Dataset, console: Any) -> int:
    """`export --pareto`: each front trial to results/<study>/pareto/trial-<n>/, with its card."""
    from . import study as st
    from .cli import EXIT_INTERRUPTED, EXIT_RUNTIME, err

    front = pareto_trials(study)
    if not front:
        err(f"study {study.study_name!r} has no complete, feasible trial to export")
        return EXIT_RUNTIME
    root = st.study_dir(args.results_dir, args.study_name) / "pareto"
    numbers = ", ".join(str(t.number) for t in front)
    console.print(f"Pareto front: trials {numbers}", highlight=False)
    for t in front:
        out_dir = root / f"trial-{t.number}"
        try:
            with FitProgress(disable=args.no_progress) as progress:
                export_study(
                    study, data, out_dir, trial_number=t.number, final_epochs=args.final_epochs,
                    final_fit=not args.no_final_fit, augment=args.augment,
                    final_minutes=args.final_minutes, seed=args.seed,
                    command_line=_command_line(args), progress=progress,
                    # Each front point's size is what it was chosen for.
                    scale_up=False, no_scale_up_reason="export --pareto",
                )
        except ExportError as e:
            err(str(e))
            return EXIT_RUNTIME
        except KeyboardInterrupt:
            err("interrupted; exports already written are complete, the current one unchanged")
            return EXIT_INTERRUPTED
        card = json.loads((out_dir / CARD_FILE).read_text(encoding="utf-8"))
        print(f"trial {t.number}: {card['params']:,} params, test accuracy "
              f"{card['test_accuracy']:.4f} -> {out_dir}")
    # An earlier export's folders stay (they may be in use), but the front is named.
    (root / "front.json").write_text(
        json.dumps({"trials": [t.number for t in front]}) + "\n", encoding="utf-8"
    )
    current = {f"trial-{t.number}" for t in front}
    stale = sorted(p.name for p in root.glob("trial-*") if p.name not in current)
    if stale:
        console.print(f"[yellow]no longer on the front (kept): {', '.join(stale)}; the front "
                      f"is listed in {root / 'front.json'}[/yellow]", highlight=False)
    return 0
