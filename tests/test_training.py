"""The final fit's augmentation pipeline, its learning-rate schedule and deadline, and
their use in fit_config; BatchNorm's statistics re-estimated before validation."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import pytest

from fmnist_search import training
from fmnist_search.model import build_cnn
from fmnist_search.training import (
    MIN_VALIDATION_BATCH,
    SHIFT_PIXELS,
    CollapsedError,
    CosineWithinDeadline,
    augmented_batches,
    fit_config,
    precise_batchnorm,
    recalibrate_batchnorm,
)
from searchspace import CnnConfig, ConvBlock, ConvLayer


def _blocks(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Images holding one bright 8x4 bar away from the edges, label = index."""
    x = np.zeros((n, 28, 28, 1), np.float32)
    x[:, 10:18, 5:9, 0] = 1.0
    return x, np.arange(n, dtype=np.int32)


def _epoch(ds) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    xs, ys = zip(*((xb.numpy(), yb.numpy()) for xb, yb in ds), strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_every_image_once_flipped_or_shifted_within_bounds() -> None:
    x, y = _blocks()
    xa, ya = _epoch(augmented_batches(x, y, batch_size=5, seed=3))
    assert xa.shape == x.shape and sorted(ya.tolist()) == y.tolist()  # a permutation
    assert np.allclose(xa.sum(axis=(1, 2, 3)), 32.0)  # nothing cut off, nothing added
    lefts = []
    for im in xa[..., 0]:
        rows, cols = np.nonzero(im)
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 3  # same bar
        assert abs(rows.min() - 10) <= SHIFT_PIXELS
        # unflipped: columns 5..8 moved; flipped: columns 19..22 moved.
        left = cols.min()
        assert abs(left - 5) <= SHIFT_PIXELS or abs(left - 19) <= SHIFT_PIXELS
        lefts.append(left)
    assert any(v < 14 for v in lefts) and any(v >= 14 for v in lefts)  # some flipped, some not


def test_same_seed_same_epochs_and_epochs_differ() -> None:
    x, y = _blocks()
    a, b = augmented_batches(x, y, 4, seed=7), augmented_batches(x, y, 4, seed=7)
    first_a, first_b = _epoch(a), _epoch(b)
    assert np.array_equal(first_a[0], first_b[0]) and np.array_equal(first_a[1], first_b[1])
    second_a = _epoch(a)
    assert not np.array_equal(first_a[0], second_a[0])  # a new draw every epoch
    other = _epoch(augmented_batches(x, y, 4, seed=8))
    assert not np.array_equal(first_a[0], other[0])


@pytest.mark.parametrize("augment", [False, True])
def test_fit_config_trains_with_and_without_augmentation(augment: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    cfg = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),)),), batch_size=16)
    res = fit_config(cfg, x, y, None, None, epochs=2, seed=0, augment=augment,
                     cosine_decay=True, keep_model=True)
    assert res.epochs_run == 2 and np.isfinite(res.history["loss"]).all()
    assert res.model is not None and res.model.predict(x[:2], verbose=0).shape == (2, 10)


def test_collapse_below_stops_the_fit_after_the_epoch() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    cfg = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),)),), batch_size=16)
    epochs: list[int] = []
    res = fit_config(cfg, x, y, None, None, epochs=2, seed=0, collapse_below=0.0,
                     on_epoch=lambda e, logs: epochs.append(e))
    assert res.epochs_run == 2 and epochs == [0, 1]  # accuracy is never under 0
    epochs.clear()
    # Under 1.01 every epoch is "collapsed" but the first, which is not judged: the fit
    # stops after the second, before its hook.
    with pytest.raises(CollapsedError, match="after epoch 2"):
        fit_config(cfg, x, y, None, None, epochs=3, seed=0, collapse_below=1.01,
                   on_epoch=lambda e, logs: epochs.append(e))
    assert epochs == [0]


class _TestBatches(keras.callbacks.Callback):
    """Counts the validation batches run inside `fit`."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.count += 1


def _noise(seed: int, n_train: int, n_val: int) -> tuple[np.ndarray, ...]:
    """Random images and labels: training x, y and validation x, y."""
    rng = np.random.default_rng(seed)
    return (rng.random((n_train, 28, 28, 1), dtype=np.float32),
            rng.integers(0, 10, n_train).astype(np.int32),
            rng.random((n_val, 28, 28, 1), dtype=np.float32),
            rng.integers(0, 10, n_val).astype(np.int32))


TINY = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),)),), batch_size=16)


def test_validation_runs_in_large_batches_with_the_same_score() -> None:
    x, y, xv, yv = _noise(0, 64, MIN_VALIDATION_BATCH + 88)
    cfg = TINY
    batches = _TestBatches()
    res = fit_config(cfg, x, y, xv, yv, epochs=2, seed=0, callbacks=[batches], keep_model=True)
    # MIN_VALIDATION_BATCH + 88 images in two batches per pass, twice: not one per 16 images
    assert batches.count == 2 * 2
    assert res.model is not None
    _, acc = res.model.evaluate(xv, yv, batch_size=cfg.batch_size, verbose=0)
    assert res.history["val_accuracy"][-1] == pytest.approx(acc, abs=1e-6)


def _count_predicts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of images of every validation pass (`forward`) from now on."""
    sizes: list[int] = []
    real = training.forward

    def spy(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
        sizes.append(len(x))
        return real(model, x, batch_size)

    monkeypatch.setattr(training, "forward", spy)
    return sizes


def test_forward_matches_predict_at_any_batch_size() -> None:
    x, *_ = _noise(7, 70, 0)
    model = build_cnn(TINY, num_classes=10)
    expected = model.predict(x, verbose=0)
    for batch in (16, 32, 128):  # 70 = 4 x 16 + 6: a short last batch too
        np.testing.assert_allclose(training.forward(model, x, batch), expected, atol=1e-6)
    assert training.forward(model, x[:0], 16).shape == (0, 10)


def test_interim_validation_scores_a_subset_then_every_image_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y, xv, yv = _noise(1, 64, 700)
    subset = np.arange(0, 700, 7)  # 100 images
    cfg = TINY
    batches = _TestBatches()
    predicts = _count_predicts(monkeypatch)
    seen: list[tuple[int, float]] = []
    res = fit_config(cfg, x, y, xv, yv, epochs=3, seed=0, callbacks=[batches], keep_model=True,
                     interim_val=subset, on_epoch=lambda e, logs: seen.append(
                         (e, logs["val_accuracy"])))
    # Epochs 1 and 2 on the subset, then every image once; no Keras validation at all.
    assert predicts == [100, 100, 700] and batches.count == 0
    assert [e for e, _ in seen] == [0, 1, 2]
    assert [a for _, a in seen] == pytest.approx(res.history["val_accuracy"], abs=1e-9)
    assert len(res.history["val_loss"]) == 3 and res.epochs_run == 3
    assert res.model is not None
    loss, acc = res.model.evaluate(xv[subset], yv[subset], batch_size=512, verbose=0)
    assert res.history["val_accuracy"][-1] == pytest.approx(acc, abs=1e-6)
    assert res.history["val_loss"][-1] == pytest.approx(loss, rel=1e-4)
    _, acc_all = res.model.evaluate(xv, yv, batch_size=512, verbose=0)
    assert res.final_val_accuracy == pytest.approx(acc_all, abs=1e-6)


def test_interim_validation_skips_the_epochs_not_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y, xv, yv = _noise(3, 64, 300)
    predicts = _count_predicts(monkeypatch)
    seen: list[float] = []
    res = fit_config(TINY, x, y, xv, yv, epochs=4, seed=0, interim_val=np.arange(0, 300, 3),
                     interim_epochs={2}, on_epoch=lambda e, logs: seen.append(
                         logs["val_accuracy"]))
    assert predicts == [100, 300]  # epoch 2 on the subset, then every image after epoch 4
    curve = res.history["val_accuracy"]
    assert len(curve) == 4 and len(res.history["val_loss"]) == 4
    assert [math.isfinite(a) for a in curve] == [False, True, False, True]
    assert [math.isfinite(a) for a in seen] == [False, True, False, True]
    assert res.best_epoch in (2, 4) and math.isfinite(res.final_val_accuracy)
    predicts.clear()
    fit_config(TINY, x, y, xv, yv, epochs=3, seed=0, interim_val=np.arange(100),
               interim_epochs=set())
    assert predicts == [300]  # nothing read before the last epoch: one pass in all


def test_interim_validation_after_an_early_stop_scores_the_model_as_it_is() -> None:
    x, y, xv, yv = _noise(2, 48, 50)
    cfg = TINY

    class StopAfter2(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if epoch == 1:
                self.model.stop_training = True

    res = fit_config(cfg, x, y, xv, yv, epochs=4, seed=0, callbacks=[StopAfter2()],
                     keep_model=True, interim_val=np.arange(10))
    assert res.epochs_run == 2 and len(res.history["val_accuracy"]) == 2
    assert res.model is not None
    _, acc_all = res.model.evaluate(xv, yv, batch_size=512, verbose=0)
    assert res.final_val_accuracy == pytest.approx(acc_all, abs=1e-6)
    # Its last epoch not validated: it takes the subset's score from the pass after the fit.
    res = fit_config(cfg, x, y, xv, yv, epochs=4, seed=0, callbacks=[StopAfter2()],
                     interim_val=np.arange(10), interim_epochs=set())
    curve = res.history["val_accuracy"]
    assert len(curve) == 2 and math.isnan(curve[0]) and math.isfinite(curve[1])
    with pytest.raises(ValueError, match="exclude"):
        fit_config(cfg, x, y, xv, yv, epochs=1, seed=0, interim_val=np.arange(10),
                   cosine_decay=True, deadline_s=10.0)


def test_interim_peak_needs_more_than_noise_to_beat_the_last_epoch() -> None:
    from fmnist_search.training import peak_epoch

    # 2,000 images at 0.80: one standard error is about 0.9 points.
    assert peak_epoch([0.70, 0.805, 0.80], 2000) == 3
    assert peak_epoch([0.70, 0.82, 0.80], 2000) == 2
    assert peak_epoch([0.83, 0.81, 0.80], 2000) == 1
    assert peak_epoch([0.5], 2000) == 1


class _Rates(keras.callbacks.Callback):
    """Records the learning rate each training step runs with."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.rates.append(float(self.model.optimizer.learning_rate.numpy()))


def _fit_with(schedule: CosineWithinDeadline, epochs: int) -> tuple[list[float], int]:
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    model = build_cnn(CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),)),), batch_size=16))
    rates = _Rates()
    hist = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[schedule, rates])
    return rates.rates, len(hist.history["loss"])


def test_cosine_without_deadline_is_keras_cosine_decay() -> None:
    rates, run = _fit_with(CosineWithinDeadline(0.01, epochs=3, steps=4), epochs=3)
    decay = keras.optimizers.schedules.CosineDecay(0.01, 12)
    assert run == 3
    assert rates == pytest.approx([float(decay(s)) for s in range(12)], rel=1e-5)


def test_slow_epochs_shorten_the_plan_and_the_rate_still_anneals() -> None:
    # Clock readings: the fit starts at 0, its first step (start-up included) ends at 1, then
    # 3 s per step: epoch 1 ends at 10, epoch 2 at 22. Against a 35 s deadline, after epoch 1
    # 25 s are left, 8 steps, 2 epochs of 4: the plan of 6 becomes 3.
    ticks = iter([0.0, 1.0, 10.0, 22.0, 34.0])
    schedule = CosineWithinDeadline(0.01, epochs=6, steps=4, deadline_s=35,
                                    clock=lambda: next(ticks))
    rates, run = _fit_with(schedule, epochs=6)
    assert run == 3 and schedule.planned == 3 and schedule.cut_from == 6
    old = keras.optimizers.schedules.CosineDecay(0.01, 24)
    assert rates[:5] == pytest.approx([float(old(s)) for s in range(5)], rel=1e-5)
    # From the cut on, a cosine from the rate reached to 0 over the 8 steps left: no jump.
    assert rates[4:] == pytest.approx(
        [rates[4] * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)], rel=1e-5)
    assert (np.diff(rates) < 0).all() and rates[-1] < 0.05 * 0.01
    # Steps as fast as planned: no cut, whatever the first step's start-up cost.
    ticks = iter([0.0, 20.0, 29.0, 41.0, 53.0, 65.0, 77.0])
    on_time = CosineWithinDeadline(0.01, epochs=5, steps=4, deadline_s=80,
                                   clock=lambda: next(ticks))
    assert _fit_with(on_time, epochs=5)[1] == 5 and on_time.cut_from is None


def test_fit_config_with_a_spent_deadline_stops_after_one_epoch() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    cfg = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),)),), batch_size=16)
    res = fit_config(cfg, x, y, None, None, epochs=4, seed=0, cosine_decay=True, deadline_s=0.0)
    assert res.epochs_run == 1
    assert fit_config(cfg, x, y, None, None, epochs=2, seed=0, cosine_decay=True,
                      deadline_s=3600.0).epochs_run == 2


def test_recalibration_sets_the_average_batch_statistics_and_draws_nothing() -> None:
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal((1100, 4))).astype(np.float32)
    bn = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5), bn])
    assert recalibrate_batchnorm(model, x, 512)
    # Two full batches of 512; the short last batch of 76 is left out.
    batches = x[:1024].reshape(2, 512, 4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), batches.mean(axis=1).mean(axis=0),
                               rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), batches.var(axis=1).mean(axis=0),
                               rtol=1e-4)
    assert bn.momentum == 0.9
    # Dropout stayed in inference mode: the statistics are those of the inputs themselves.
    assert recalibrate_batchnorm(model, x[:100], 512)  # one short batch: used alone
    np.testing.assert_allclose(bn.moving_mean.numpy(), x[:100].mean(axis=0), rtol=1e-5)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert not recalibrate_batchnorm(plain, x, 512)
    # Statistics gone NaN are replaced too; a model it cannot walk layer by layer is refused.
    bn.moving_mean.assign(np.full(4, np.nan, np.float32))
    recalibrate_batchnorm(model, x, 512)
    assert np.isfinite(bn.moving_mean.numpy()).all()
    inp = keras.Input((4,))
    with pytest.raises(TypeError, match="flat Sequential"):
        recalibrate_batchnorm(keras.Model(inp, keras.layers.BatchNormalization()(inp)), x, 512)


def test_interim_validation_re_estimates_before_each_pass_it_makes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fmnist_search.training as training

    calls: list[int] = []
    real = training.recalibrate_batchnorm

    def spy(model: keras.Model, x: np.ndarray, batch_size: int) -> bool:
        calls.append(len(x))
        return real(model, x, batch_size)

    monkeypatch.setattr(training, "recalibrate_batchnorm", spy)
    x, y, xv, yv = _noise(5, 64, 60)
    fit_config(BN_CFG, x, y, xv, yv, epochs=3, seed=0, interim_val=np.arange(30),
               interim_epochs={1})
    assert calls == [64, 64]  # epoch 1 on the subset, then every image after epoch 3
    calls.clear()
    fit_config(TINY, x, y, xv, yv, epochs=2, seed=0)
    assert calls == []  # no BatchNorm, nothing to do


BN_CFG = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3, batch_norm=True),),
                                     dropout=0.2),), batch_size=16)


@pytest.mark.parametrize("interim", [False, True])
def test_batchnorm_models_are_validated_with_statistics_of_their_current_weights(
    monkeypatch: pytest.MonkeyPatch, interim: bool,
) -> None:
    x, y, xv, yv = _noise(4, 64, 60)
    extra: dict[str, Any] = {"interim_val": np.arange(30)} if interim else {}
    res = fit_config(BN_CFG, x, y, xv, yv, epochs=2, seed=0, keep_model=True, **extra)
    assert res.model is not None
    bn = next(layer for layer in res.model.layers
              if isinstance(layer, keras.layers.BatchNormalization))
    mean = bn.moving_mean.numpy().copy()
    # Re-estimating again changes nothing: the last pass was scored with these statistics,
    # not with the moving averages that trail the weights.
    recalibrate_batchnorm(res.model, x, MIN_VALIDATION_BATCH)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    # ... and training itself is untouched: the same losses and weights without it.
    monkeypatch.setattr("fmnist_search.training.recalibrate_batchnorm",
                        lambda *a, **k: False)
    bare = fit_config(BN_CFG, x, y, xv, yv, epochs=2, seed=0, keep_model=True, **extra)
    assert bare.history["loss"] == pytest.approx(res.history["loss"], rel=1e-6)
    assert bare.model is not None
    for a, b in zip(bare.model.trainable_weights, res.model.trainable_weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        next(layer for layer in bare.model.layers
             if isinstance(layer, keras.layers.BatchNormalization)).moving_mean.numpy(),
        mean, rtol=1e-3)


def test_recalibration_images_are_spread_over_a_set_stored_class_by_class() -> None:
    x = np.concatenate([np.zeros((3000, 2), np.float32), np.ones((3000, 2), np.float32)])
    bn = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((2,)), bn])
    callback = precise_batchnorm(model, x, TINY)
    assert callback is not None
    callback.apply()
    np.testing.assert_allclose(bn.moving_mean.numpy(), [0.5, 0.5], atol=0.01)
    # Batches mix both halves, so the variance is the set's, not that within a block.
    np.testing.assert_allclose(bn.moving_variance.numpy(), [0.25, 0.25], atol=0.01)
    assert precise_batchnorm(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
                             x, TINY) is None
