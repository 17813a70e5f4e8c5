"""FusedBatchNormalization: the same training step as Keras' BatchNormalization (outputs,
gradients, moving statistics), in one fused op, and exported as the built-in layer."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from fmnist_search import precision
from fmnist_search.batchnorm import FusedBatchNormalization
from fmnist_search.model import build_cnn
from searchspace.config import CnnConfig, ConvBlock, ConvLayer, DenseLayer


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


@pytest.mark.parametrize("shape", [(32, 7, 7, 16), (8, 3, 3, 4)])
def test_a_training_step_matches_keras_batchnorm_in_float32(shape: tuple[int, ...]) -> None:
    precision.use("float32")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, shape).astype("float32"))
    w = tf.constant(rng.normal(0.0, 1.0, shape).astype("float32"))
    builtin, fused = _pair(shape)
    names = ["outputs", "d inputs", "d gamma", "d beta", "moving mean", "moving variance"]
    for name, a, b in zip(names, _step(builtin, x, w), _step(fused, x, w), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)
    assert "FusedBatchNormV3" in _ops(fused, x, training=True)  # the fused kernel ran
    assert "FusedBatchNormV3" in _ops(fused, x, training=False)
    # Inference uses the moving statistics.
    np.testing.assert_allclose(fused(x, training=False), builtin(x, training=False),
                               rtol=1e-5, atol=1e-5)


def test_under_mixed_bfloat16_it_returns_bfloat16_and_keeps_float32_statistics() -> None:
    precision.use("bfloat16")
    shape = (32, 7, 7, 16)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, shape).astype("float32"))
    w = tf.constant(rng.normal(0.0, 1.0, shape).astype("float32"))
    builtin, fused = _pair(shape)
    a, b = _step(builtin, x, w), _step(fused, x, w)
    assert fused.moving_mean.dtype == "float32"
    np.testing.assert_allclose(b[0], a[0], atol=0.05)  # bfloat16 outputs: ~3 digits
    np.testing.assert_allclose(b[4], a[4], rtol=0.01)  # moving mean
    np.testing.assert_allclose(b[5], a[5], rtol=0.02)  # moving variance
    inferred = fused(x, training=False)
    assert inferred.dtype == tf.bfloat16
    np.testing.assert_allclose(np.asarray(inferred, "float32"),
                               np.asarray(builtin(x, training=False), "float32"), atol=0.05)


def test_dense_features_take_keras_own_path() -> None:
    precision.use("float32")
    x = tf.constant(np.random.default_rng(0).normal(1.0, 2.0, (16, 10)).astype("float32"))
    builtin, fused = _pair((16, 10))
    w = tf.ones_like(x)
    for a, b in zip(_step(builtin, x, w), _step(fused, x, w), strict=True):
        np.testing.assert_array_equal(a, b)


def test_models_train_with_it_and_leave_as_the_builtin_layer() -> None:
    precision.use("float32")
    cfg = CnnConfig(
        blocks=(ConvBlock(convs=(ConvLayer(8, batch_norm=True),), pool="max"),),
        dense=(DenseLayer(16, batch_norm=True),),
    )
    model = build_cnn(cfg)
    assert sum(isinstance(layer, FusedBatchNormalization) for layer in model.layers) == 2
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    model.fit(x, np.arange(64) % 10, epochs=1, batch_size=16, verbose=0)
    copy = precision.as_float32(model)  # a float32 model too: its BatchNorm is swapped
    assert copy is not model
    bns = [layer for layer in copy.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert [type(layer) for layer in bns] == [keras.layers.BatchNormalization] * 2
    assert "FusedBatchNormalization" not in json.dumps(copy.to_json())
    np.testing.assert_allclose(copy.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
