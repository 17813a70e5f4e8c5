"""FusedBatchNormalization: under mixed bfloat16 the same training step as Keras'
BatchNormalization (outputs, gradients, moving statistics) in one fused op; Keras' own code
in float32; exported as the built-in layer; trains with every activation of the space."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from fmnist_search import precision
from fmnist_search.batchnorm import FusedBatchNormalization
from fmnist_search.model import build_cnn
from fmnist_search.training import fit_config
from searchspace.config import ACTIVATIONS, CnnConfig, ConvBlock, ConvLayer, DenseLayer

SHAPE = (32, 7, 7, 16)


def _pair(shape: tuple[int, ...]) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """A built-in and a fused layer with the same (non-trivial) scale and offset."""
    rng = np.random.default_rng(1)
    gamma = rng.normal(1.0, 0.2, shape[-1]).astype("float32")
    beta = rng.normal(0.0, 0.2, shape[-1]).astype("float32")
    pair = (keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9))
    for layer in pair:
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return pair


def _inputs(shape: tuple[int, ...]) -> tuple[tf.Tensor, tf.Tensor]:
    """Feature maps (bfloat16 values, so both layers see the same numbers) and the weights
    of a linear loss over the outputs."""
    rng = np.random.default_rng(0)
    x = tf.cast(tf.constant(rng.normal(2.0, 3.0, shape).astype("float32")), "bfloat16")
    return tf.cast(x, "float32"), tf.constant(rng.normal(0.0, 1.0, shape).astype("float32"))


def _step(layer: keras.layers.Layer, x: tf.Tensor, w: tf.Tensor) -> list[np.ndarray]:
    """One training-mode call: outputs, gradients (inputs, scale, offset), moving stats."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") * w)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [np.asarray(v, dtype="float32") for v in
            (y, *grads, layer.moving_mean, layer.moving_variance)]


def _ops(layer: keras.layers.Layer, x: tf.Tensor, training: bool) -> set[str]:
    """The types of the operations a traced call of `layer` runs."""
    graph = tf.function(lambda t: layer(t, training=training)).get_concrete_function(x).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("shape", [SHAPE, (8, 3, 3, 4)])
def test_under_bfloat16_a_training_step_matches_keras_batchnorm(shape: tuple[int, ...]) -> None:
    precision.use("bfloat16")
    x, w = _inputs(shape)
    builtin, fused = _pair(shape)
    a, b = _step(builtin, x, w), _step(fused, x, w)
    scale = {k: np.abs(v).max() for k, v in zip("ydgbmv", a, strict=True)}
    # bfloat16 outputs and gradients keep about 3 significant digits.
    np.testing.assert_allclose(b[0], a[0], atol=0.02 * scale["y"], err_msg="outputs")
    np.testing.assert_allclose(b[1], a[1], atol=0.02 * scale["d"], err_msg="d inputs")
    np.testing.assert_allclose(b[2], a[2], atol=0.02 * scale["g"], err_msg="d gamma")
    np.testing.assert_allclose(b[3], a[3], atol=0.02 * scale["b"], err_msg="d beta")
    # The statistics are float32 sums of the same bfloat16 values: float32 round-off
    # (Bessel's correction left in would be 1/(n-1): 1.4% at the smaller shape).
    np.testing.assert_allclose(b[4], a[4], rtol=1e-4, atol=1e-5, err_msg="moving mean")
    np.testing.assert_allclose(b[5], a[5], rtol=1e-4, err_msg="moving variance")
    inferred = fused(x, training=False)
    assert inferred.dtype == tf.bfloat16 and fused.moving_mean.dtype == "float32"
    np.testing.assert_allclose(np.asarray(inferred, "float32"),
                               np.asarray(builtin(x, training=False), "float32"),
                               atol=0.02 * scale["y"])
    assert "FusedBatchNormV3" in _ops(fused, x, training=True)  # the fused kernel ran
    assert "FusedBatchNormV3" in _ops(fused, x, training=False)


def test_float32_and_dense_features_take_keras_own_code() -> None:
    precision.use("float32")
    x, w = _inputs(SHAPE)
    builtin, fused = _pair(SHAPE)
    for a, b in zip(_step(builtin, x, w), _step(fused, x, w), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "FusedBatchNormV3" not in _ops(fused, x, training=True)
    precision.use("bfloat16")
    x2 = tf.constant(np.random.default_rng(0).normal(1.0, 2.0, (16, 10)).astype("float32"))
    builtin, fused = _pair((16, 10))
    for a, b in zip(_step(builtin, x2, tf.ones_like(x2)), _step(fused, x2, tf.ones_like(x2)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("prec", ["bfloat16", "float32"])
def test_a_trial_trains_and_validates_with_every_activation(prec: str) -> None:
    # Under float32 TensorFlow once merged the fused op with a following tanh into a kernel
    # that lacks it; every activation must train and validate as a trial does.
    precision.use(prec)
    rng = np.random.default_rng(0)
    x, y = rng.random((120, 28, 28, 1), dtype=np.float32), np.arange(120) % 10
    for act in ACTIVATIONS:
        cfg = CnnConfig(
            blocks=(ConvBlock(convs=(ConvLayer(8, batch_norm=True, activation=act),),
                              pool="avg", dropout=0.1),),
            flatten_dropout=0.2, optimizer="sgd", learning_rate=1e-3, batch_size=32,
        )
        res = fit_config(cfg, x[:80], y[:80], x[80:], y[80:], epochs=1, seed=0)
        assert np.isfinite(res.final_val_accuracy), act
        keras.backend.clear_session()


def test_models_train_with_it_and_leave_as_the_builtin_layer() -> None:
    precision.use("bfloat16")
    cfg = CnnConfig(
        blocks=(ConvBlock(convs=(ConvLayer(8, batch_norm=True),), pool="max"),),
        dense=(DenseLayer(16, batch_norm=True),),
    )
    model = build_cnn(cfg)
    assert sum(isinstance(layer, FusedBatchNormalization) for layer in model.layers) == 2
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    model.fit(x, np.arange(64) % 10, epochs=1, batch_size=16, verbose=0)
    copy = precision.as_float32(model)
    bns = [layer for layer in copy.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [type(layer) for layer in bns] == [keras.layers.BatchNormalization] * 2
    assert "FusedBatchNormalization" not in json.dumps(copy.to_json())
    np.testing.assert_allclose(copy.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=0.02)  # the mixed model's bfloat16 against float32
    precision.use("float32")
    plain32 = build_cnn(cfg)  # a float32 model too: its BatchNorm is swapped on the way out
    swapped = precision.as_float32(plain32)
    assert swapped is not plain32
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in swapped.layers)
