"""Fit one config on one split, with per-epoch reporting hooks and a NaN guard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from searchspace.config import CnnConfig

from . import stop
from .model import build_cnn

EpochHook = Callable[[int, dict[str, float]], None]
BatchHook = Callable[[int, int], None]


class DivergedError(RuntimeError):
    """Training loss became NaN or infinite."""


class CollapsedError(DivergedError):
    """Training accuracy fell to chance: the model answers (nearly) one class for all."""


@dataclass
class FitResult:
    """What one fit produced."""

    history: dict[str, list[float]] = field(default_factory=dict)
    best_val_accuracy: float = float("nan")
    best_epoch: int = 0  # 1-based
    # Accuracy on every validation image after the last epoch run (the search's score);
    # NaN without a validation set.
    final_val_accuracy: float = float("nan")
    epochs_run: int = 0
    wall_time: float = 0.0
    params: int = 0
    model: keras.Model | None = None


class _Hooks(keras.callbacks.Callback):
    """Stops at the first non-finite loss (and, with `collapse_below`, at the end of an
    epoch after the first whose training accuracy is under it) and forwards progress.

    The first epoch is not judged: on small data a healthy model can still be near chance
    after one pass."""

    def __init__(
        self, on_epoch: EpochHook | None, on_batch: BatchHook | None, steps: int,
        schedule: CosineWithinDeadline | None = None, collapse_below: float | None = None,
        hold_epoch: int | None = None,
    ):
        super().__init__()
        self._on_epoch = on_epoch
        self._on_batch = on_batch
        self._steps = steps
        self._schedule = schedule
        self._collapse_below = collapse_below
        # The 0-based epoch whose report waits for `release` (its validation runs after fit).
        self._hold_epoch = hold_epoch
        self.held: dict[str, float] | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise DivergedError(
                f"loss became {float(loss)} at epoch {self._epoch + 1}, batch {batch + 1}"
            )
        stop.raise_if_asked()  # a Ctrl-C whose KeyboardInterrupt library code swallowed
        if self._on_batch is not None:
            self._on_batch(batch + 1, self._steps)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        acc = (logs or {}).get("accuracy")
        if (self._collapse_below is not None and epoch >= 1 and acc is not None
                and acc < self._collapse_below):
            raise CollapsedError(
                f"training accuracy {float(acc):.4f} after epoch {epoch + 1}, about chance"
            )
        out = {k: float(v) for k, v in (logs or {}).items()}
        if self._schedule is not None:  # the plan may have just been cut
            out["epochs_planned"] = float(self._schedule.planned)
        if epoch == self._hold_epoch:
            self.held = out
        elif self._on_epoch is not None:
            self._on_epoch(epoch, out)

    def release(self, extra: dict[str, float]) -> None:
        """Report the held epoch, with `extra` (its validation scores) added to its logs."""
        if self.held is not None and self._on_epoch is not None and self._hold_epoch is not None:
            self._on_epoch(self._hold_epoch, {**self.held, **extra})


def forward(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for `x`, one `predict_on_batch` per batch.

    The same numbers as `model.predict`, without the set-up each `predict` call pays (a
    tf.data pipeline, callbacks): over 2,000 images, the interim validation pass of a
    trial, 0.05 s instead of 0.11 s for a two-block model (medians of 7, bfloat16).
    """
    if len(x) == 0:  # nothing to score (Keras' predict fails on no images)
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate([np.asarray(model.predict_on_batch(x[i:i + batch_size]))
                           for i in range(0, len(x), batch_size)])


class _SubsetValidation(keras.callbacks.Callback):
    """Scores the epochs before the last on a validation subset, by `forward`, and only
    the epochs in `when` (1-based; None: all of them).

    The epochs it skips get NaN, so every epoch keeps a place in the history. `forward`
    rather than Keras' own validation: the pass after the last epoch (`_final_validation`)
    is a `forward` too, and the two share one traced function (Keras' validation would
    trace a second, 0.10 s per trial, measured). Must come before the callbacks that read
    the scores: Keras hands every callback the same logs.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, last: int,
                 when: Collection[int] | None, before: Callable[[], None] | None = None,
                 ) -> None:
        super().__init__()
        self._x, self._y, self._batch, self._last = x, y, batch_size, last
        self._when = None if when is None else frozenset(when)
        self._before = before  # runs before each pass (BatchNorm's re-estimation)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None or epoch + 1 >= self._last:  # the last: validated after the fit
            return
        if self._when is not None and epoch + 1 not in self._when:
            logs.update(val_accuracy=float("nan"), val_loss=float("nan"))
            return
        if self._before is not None:
            self._before()
        hit, nll = _scores(forward(self.model, self._x, self._batch), self._y)
        logs.update(val_accuracy=float(hit.mean()), val_loss=float(nll.mean()))


class CosineWithinDeadline(keras.callbacks.Callback):
    """Anneals the learning rate from `base_lr` to 0 with a cosine over the planned epochs,
    and, when the steps run slower than planned, plans fewer epochs so the fit ends within
    `deadline_s` seconds of its start.

    After each epoch the epochs that still fit, at the mean step time since the first step
    ended (the first holds the fit's start-up, as the speed probe leaves it out too), cap
    the plan; on a cut the rate decays from where it is to 0 over the steps left (no jump),
    and the fit stops at the new last epoch. Without a deadline it is Keras' `CosineDecay`
    (alpha 0) over `epochs * steps` steps. Why a guard: the speed probe before the fit timed
    run 8's second model at 92 s per epoch; it trained at 138 s, 50% over its share.
    """

    def __init__(
        self, base_lr: float, epochs: int, steps: int, deadline_s: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self.planned = epochs
        self.cut_from: int | None = None  # the plan before the first cut
        self._steps, self._deadline, self._clock = steps, deadline_s, clock
        self._from_step, self._from_lr, self._to_step = 0, base_lr, epochs * steps
        self._step = 0
        self._start = self._first_step_end = 0.0

    def rate(self, step: int) -> float:
        """The learning rate of training step `step` (0-based) under the current plan."""
        span = max(1, self._to_step - self._from_step)
        frac = min(1.0, max(0.0, (step - self._from_step) / span))
        return self._from_lr * 0.5 * (1.0 + math.cos(math.pi * frac))

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._start = self._clock()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.model.optimizer.learning_rate = self.rate(self._step)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._step += 1
        if self._step == 1 and self._deadline is not None:
            self._first_step_end = self._clock()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        done = epoch + 1
        if self._deadline is not None and done < self.planned:
            now = self._clock()
            per_step = (now - self._first_step_end) / max(1, self._step - 1)
            left = max(0.0, self._deadline - (now - self._start))
            fits = done + (int(left / per_step) // self._steps if per_step > 0 else self.planned)
            if fits < self.planned:
                self.cut_from = self.cut_from or self.planned
                self.planned = fits
                self._from_lr, self._from_step = self.rate(self._step), self._step
                self._to_step = fits * self._steps
        if done >= self.planned:
            self.model.stop_training = True


# Final-fit augmentation: flips and shifts keep a garment a garment (a shoe pointing the
# other way is still a shoe) and are what small CNNs on Fashion-MNIST commonly train with.
SHIFT_PIXELS = 2
# Validation passes run in batches of at least this many images (small training batches
# would make many tiny steps). Not more: TensorFlow's oneDNN pool keeps the largest working
# set a process has seen, and batches of 512 made it 107 MB larger over 40 trials of the
# memory benchmark (+278 MB against +171), while a forward pass over 10,000 images was
# barely faster than in batches of 128 for a plain model (0.30 s against 0.33-0.35 in
# bfloat16, 0.67 s both ways in float32) and slower with BatchNorm (1.58 s against
# 1.32-1.41; float32 2.28-2.59 s against 2.10-2.34; docs/benchmarks.md, memory).
MIN_VALIDATION_BATCH = 128


# Training images whose statistics replace BatchNorm's moving ones before a validation pass.
# The moving averages lag the weights: in the pruning benchmark on 2,000 images, seed 2's
# trial 7 (three BatchNorm conv blocks, batch 256: 8 steps an epoch) had 0.76 training
# accuracy after 3 epochs and scored 0.39 on validation, 0.86 after 9; the pruner had cut
# it after epoch 1 (0.26), as it cut seed 1's best trial, also a BatchNorm model.
# Statistics re-estimated with the weights as they are ("precise BatchNorm") score the
# model, not the lag.
# Re-estimating on 1,024 of them took 0.8-0.9 s for that model, against 5.1 s for one of its
# epochs on 2,000 images and 14-30 s on 10,000 (measured beside a running search); only
# models with BatchNorm pay it, and only before the epochs that are validated.
BN_RECALIBRATION_IMAGES = 1024


def recalibrate_batchnorm(model: keras.Model, x: np.ndarray, batch_size: int) -> bool:
    """Set each BatchNorm layer's moving mean and variance to its batch statistics
    averaged over `x` in batches of `batch_size`, with the weights as they are now.

    Only BatchNorm runs in training mode: Dropout and the rest stay in inference mode,
    so no random numbers are drawn and the weights learned after it are unchanged. The
    averaging is cumulative (momentum k/(k+1) for the k-th batch), so every batch counts
    the same. Returns False, doing nothing, for a model without BatchNorm.
    Raises TypeError for a model that is not a flat Sequential (it runs layer by layer).
    """
    if not isinstance(model, keras.Sequential) or any(
            isinstance(layer, keras.Model) for layer in model.layers):
        raise TypeError("BatchNorm statistics are re-estimated layer by layer: "
                        "a flat Sequential model is needed")
    bns = {id(layer): layer for layer in model.layers
           if isinstance(layer, keras.layers.BatchNormalization)}
    if not bns or len(x) == 0:
        return False
    # A short last batch would weigh as much as a full one: leave it out, if there are others.
    n = (len(x) // batch_size) * batch_size or len(x)
    saved = {k: bn.momentum for k, bn in bns.items()}
    for bn in bns.values():  # the first batch then replaces them, even NaN ones
        bn.moving_mean.assign(keras.ops.zeros_like(bn.moving_mean))
        bn.moving_variance.assign(keras.ops.ones_like(bn.moving_variance))
    try:
        for k, start in enumerate(range(0, n, batch_size)):
            for bn in bns.values():
                bn.momentum = k / (k + 1)
            h = keras.ops.convert_to_tensor(x[start:start + batch_size])
            for layer in model.layers:
                h = layer(h, training=id(layer) in bns)
    finally:
        for k, bn in bns.items():
            bn.momentum = saved[k]
    return True


class _PreciseBatchNorm(keras.callbacks.Callback):
    """Re-estimates BatchNorm's statistics (`recalibrate_batchnorm`) before each of
    Keras' own validation passes, and on demand before the others."""

    def __init__(self, model: keras.Model, x: np.ndarray, batch_size: int) -> None:
        super().__init__()
        # Its own reference: `apply` also runs where Keras has not set `self.model`.
        self._net, self._x, self._batch = model, x, batch_size

    def apply(self) -> None:
        recalibrate_batchnorm(self._net, self._x, self._batch)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.apply()


def precise_batchnorm(
    model: keras.Model, x_train: np.ndarray, cfg: CnnConfig,
) -> _PreciseBatchNorm | None:
    """The callback that re-estimates `model`'s BatchNorm statistics on
    BN_RECALIBRATION_IMAGES training images before validation; None without BatchNorm."""
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        return None
    # Spread over the whole set, not its first images, and shuffled (by a generator of
    # its own, leaving the global random state alone): a set stored class by class would
    # otherwise give one class's statistics, or batches of few classes, whose averaged
    # variances miss the spread between them.
    n = min(len(x_train), BN_RECALIBRATION_IMAGES)
    pick = np.random.default_rng(0).permutation(
        np.linspace(0, len(x_train) - 1, n).round().astype(int))
    return _PreciseBatchNorm(model, x_train[pick], validation_batch_size(cfg))


def validation_batch_size(cfg: CnnConfig) -> int:
    """Batch size for validation passes: the training batch, at least MIN_VALIDATION_BATCH.

    The scores are the same at any batch size up to float rounding (BatchNorm uses its
    moving statistics).
    BatchNorm's re-estimation before validation runs in batches of this size too.
    """
    return max(cfg.batch_size, MIN_VALIDATION_BATCH)


def augmented_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shift: int = SHIFT_PIXELS
) -> Any:
    """A tf.data pipeline of shuffled batches, each image flipped left-right at random and
    shifted by up to `shift` pixels each way (zero fill: the images' background is 0)."""
    import tensorflow as tf

    n, h, w = x.shape[0], x.shape[1], x.shape[2]

    def augment(xb: Any, yb: Any, key: Any) -> tuple[Any, Any]:
        # Stateless ops keyed per batch: the same seed gives the same augmented epochs.
        keys = tf.random.experimental.stateless_split(key, 3)
        xb = tf.image.stateless_random_flip_left_right(xb, keys[0])
        padded = tf.pad(xb, [[0, 0], [shift, shift], [shift, shift], [0, 0]])
        b = tf.shape(xb)[0]
        dy = tf.random.stateless_uniform([b], keys[1], 0, 2 * shift + 1, dtype=tf.int32)
        dx = tf.random.stateless_uniform([b], keys[2], 0, 2 * shift + 1, dtype=tf.int32)
        rows = dy[:, None] + tf.range(h)[None, :]
        cols = dx[:, None] + tf.range(w)[None, :]
        xb = tf.gather(padded, rows, axis=1, batch_dims=1)
        xb = tf.gather(xb, cols, axis=2, batch_dims=1)
        return xb, yb

    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(n, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    return (
        tf.data.Dataset.zip((ds, keys))
        .map(lambda xy, k: augment(xy[0], xy[1], tf.cast(k, tf.int64)),
             num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


PROBE_WARMUP, PROBE_BATCHES = 4, 40  # training steps of the speed probe: untimed, timed


class _BatchClock(keras.callbacks.Callback):
    """Records when each training batch ends."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.ends.append(time.perf_counter())


def measure_epoch_seconds(
    cfg: CnnConfig, x: np.ndarray, y: np.ndarray, *, num_classes: int = 10,
    warmup: int = PROBE_WARMUP, batches: int = PROBE_BATCHES, augment: bool = False,
) -> float:
    """Seconds one epoch over `x` takes on this machine now, timed on a few real batches.

    A throwaway model trains `warmup` + `batches` steps in one `fit`; the time between the
    end of the last warm-up batch and the end of the last batch, per batch, scales by the
    epoch's batch count; with `augment`, through the final fit's augmentation pipeline.
    Timing inside the fit leaves out its start-up (tracing, the data
    pipeline), which timing whole `fit` calls of a few batches counted: that erred 1.4x
    long on a fast model. The trial's own wall time is a poorer guide still (it includes
    validation and often ran beside another worker: 2.2x long on run 6's winner).
    """
    model = build_cnn(cfg, num_classes=num_classes, input_shape=tuple(x.shape[1:]))
    bs = cfg.batch_size
    n = min(len(x), bs * (warmup + batches))
    warm = min(warmup, max(1, math.ceil(n / bs) - 1))  # tiny data: time what is left
    clock = _BatchClock()
    inputs: dict[str, Any] = (
        {"x": augmented_batches(x[:n], y[:n], bs, seed=0)}
        if augment
        else {"x": x[:n], "y": y[:n], "batch_size": bs}
    )
    start = time.perf_counter()
    model.fit(**inputs, epochs=1, verbose=0, shuffle=False, callbacks=[clock])
    timed = len(clock.ends) - warm
    if timed < 1:  # a single batch: its time, start-up included
        return clock.ends[-1] - start
    per_batch = (clock.ends[-1] - clock.ends[warm - 1]) / timed
    return per_batch * math.ceil(len(x) / bs)


def fit_config(
    cfg: CnnConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    epochs: int,
    seed: int,
    num_classes: int = 10,
    on_epoch: EpochHook | None = None,
    on_batch: BatchHook | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    keep_model: bool = False,
    cosine_decay: bool = False,
    deadline_s: float | None = None,
    augment: bool = False,
    collapse_below: float | None = None,
    interim_val: np.ndarray | None = None,
    interim_epochs: Collection[int] | None = None,
) -> FitResult:
    """Build `cfg` with weights seeded by `seed`, train it, and return its history.

    `on_epoch(epoch0, logs)` runs after each epoch (logs include val_accuracy when a
    validation set is given, and with `cosine_decay` epochs_planned, the plan as it stands
    now); it may raise `optuna.TrialPruned` to stop the fit.
    With `cosine_decay` the learning rate decays from the config's to 0 over the fit, and
    with `deadline_s` as well the fit plans fewer epochs when they run too slow to end
    within that many seconds (`CosineWithinDeadline`); with `augment` every epoch sees the
    training images randomly flipped and shifted; with `collapse_below` the fit stops with
    CollapsedError after an epoch (past the first) whose training accuracy is under it.
    With `interim_val` (indices into the validation set) the epochs before the last are
    validated on those images only, and the last on every image, once, after the fit:
    `final_val_accuracy` is that score, and the last epoch's `val_accuracy` in the history
    (and in `on_epoch`'s logs) is the subset's, from the same pass, so the curve is on one
    set throughout. `interim_epochs` (1-based) then names the epochs before the last that
    are validated at all (None: every one); the others log NaN.
    Raises DivergedError on a NaN/inf loss, InvalidConfigError for an unbuildable config.
    """
    keras.utils.set_random_seed(seed)
    model = build_cnn(cfg, num_classes=num_classes, input_shape=tuple(x_train.shape[1:]))
    steps = math.ceil(len(x_train) / cfg.batch_size)
    schedule = (
        CosineWithinDeadline(cfg.learning_rate, epochs, steps, deadline_s)
        if cosine_decay else None
    )
    if interim_val is not None and deadline_s is not None:
        raise ValueError("interim_val and deadline_s exclude each other")
    interim = (interim_val is not None and len(interim_val) > 0
               and x_val is not None and y_val is not None)
    val_data: tuple[np.ndarray, np.ndarray] | None = None
    early: list[keras.callbacks.Callback] = []
    precise = precise_batchnorm(model, x_train, cfg) if x_val is not None else None
    if interim:
        early.append(_SubsetValidation(
            x_val[interim_val], y_val[interim_val],  # type: ignore[index]
            validation_batch_size(cfg), epochs, interim_epochs,
            before=None if precise is None else precise.apply,
        ))
    elif x_val is not None and y_val is not None:
        val_data = (x_val, y_val)
        if precise is not None:
            early.append(precise)  # its on_test_begin precedes each of Keras' passes
    if schedule is not None:
        early.insert(0, schedule)
    hooks = _Hooks(on_epoch, on_batch, steps, schedule, collapse_below,
                   hold_epoch=epochs - 1 if interim else None)
    start = time.perf_counter()
    result = FitResult(params=int(model.count_params()))
    try:
        inputs: dict[str, Any] = (
            # The pipeline shuffles itself (seeded); Keras must not try to.
            {"x": augmented_batches(x_train, y_train, cfg.batch_size, seed), "shuffle": False}
            if augment
            else {"x": x_train, "y": y_train, "batch_size": cfg.batch_size, "shuffle": True}
        )
        hist = model.fit(
            **inputs,
            epochs=epochs,
            validation_data=val_data,
            validation_batch_size=validation_batch_size(cfg),
            # With `interim_val` the last epoch is validated below, on every image.
            callbacks=[*early, hooks, *callbacks],
            verbose=0,
        )
        result.history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
        ran = len(result.history.get("loss", []))
        if interim and ran:
            # Stopped early by a callback: the model as it is gets the score; the last
            # epoch run keeps its own interim point, or takes this pass's if it had none.
            if precise is not None:
                precise.apply()
            sub = _final_validation(model, cfg, x_val, y_val, interim_val,  # type: ignore[arg-type]
                                    result, append=ran == epochs)
            if ran == epochs:
                hooks.release(sub)
            else:
                for k, v in sub.items():
                    curve = result.history.get(k)
                    if curve and not math.isfinite(curve[-1]):
                        curve[-1] = v
    finally:
        result.wall_time = time.perf_counter() - start
        # Keras keeps the history on the model even when a callback raised.
        h = getattr(model, "history", None)
        if not result.history and h is not None and getattr(h, "history", None):
            result.history = {k: [float(v) for v in vs] for k, vs in h.history.items()}
        if keep_model:
            result.model = model
    result.epochs_run = len(result.history.get("loss", []))
    val = result.history.get("val_accuracy", [])
    if val:
        scored_on = len(interim_val) if interim else len(x_val)  # type: ignore[arg-type]
        result.best_epoch = peak_epoch(val, scored_on)
        result.best_val_accuracy = float(val[result.best_epoch - 1])
        if not interim:
            result.final_val_accuracy = float(val[-1])
    return result


def peak_epoch(curve: Sequence[float], n: int) -> int:
    """The 1-based peak epoch of a curve scored on `n` images: the last epoch, unless an
    earlier one beats it by more than one standard error of an accuracy on `n` images.

    On a 2,000-image subset that error is about 0.9 points, as large as a good trial's
    gain from its second epoch to its third (0.4-1.6 points on 10,000 images in the
    headline runs); by plain argmax, noise would often call a still-improving trial
    peaked, and the final fit would plan a third of the epochs for it.
    """
    last = curve[-1]
    if len(curve) < 2 or not math.isfinite(last):
        return len(curve)
    se = math.sqrt(max(last * (1.0 - last), 1.0 / n) / max(1, n))
    before = np.asarray(curve[:-1], dtype=float)
    earlier = int(np.argmax(np.where(np.isfinite(before), before, -np.inf)))
    return earlier + 1 if before[earlier] > last + se else len(curve)


def _final_validation(
    model: keras.Model, cfg: CnnConfig, x_val: np.ndarray, y_val: np.ndarray,
    subset: np.ndarray, result: FitResult, append: bool = True,
) -> dict[str, float]:
    """One forward pass over every validation image after the last epoch.

    Sets `result.final_val_accuracy` (every image), appends (with `append`) the subset's
    accuracy and loss to the history, and returns those two as the last epoch's logs.
    """
    hit, nll = _scores(forward(model, x_val, validation_batch_size(cfg)), y_val)
    result.final_val_accuracy = float(hit.mean())
    sub = {"val_accuracy": float(hit[subset].mean()), "val_loss": float(nll[subset].mean())}
    if append:
        for k, v in sub.items():
            result.history.setdefault(k, []).append(v)
    return sub


def _scores(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: whether the top class is right, and the negative log-likelihood."""
    y = np.asarray(y).astype(int)
    hit = np.argmax(probs, axis=1) == y
    # Clipped as Keras clips probabilities; Keras itself computes the loss from the logits,
    # so a confidently wrong image counts a little less here (at most 16.1 nats).
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))
    return hit, nll
