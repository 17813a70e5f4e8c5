"""build_cnn: a CnnConfig in, a compiled Keras model out. Nothing else."""

from __future__ import annotations

import keras

from searchspace.config import CnnConfig, param_count, validate

from .batchnorm import FusedBatchNormalization
from .precision import ensure as ensure_precision

# BatchNorm's moving statistics keep this share of their old value at each step. Keras'
# default, 0.99, needs several hundred steps to forget its initial mean 0 / variance 1: a
# 3-epoch trial on 10,000 images has 120 to 470, and BatchNorm models then scored near
# chance in inference mode (val 0.16 after one epoch against 0.77 with 0.9, measured on one
# of run 5's trials; README), so they were pruned or ranked low. 0.9 (PyTorch's default)
# settles within tens of steps; a final fit has thousands either way.
BN_MOMENTUM = 0.9


def _activation(name: str) -> keras.layers.Layer:
    # Named built-in activations keep the saved model free of custom objects.
    if name == "leaky_relu":
        return keras.layers.LeakyReLU()
    return keras.layers.Activation(name)


def make_optimizer(cfg: CnnConfig) -> keras.optimizers.Optimizer:
    """The optimiser the config names, with its learning rate (and momentum for SGD).

    The rate is a plain number, so a callback may set it at every step (the final fit's
    cosine, `training.CosineWithinDeadline`).
    """
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=cfg.learning_rate, momentum=cfg.momentum)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=cfg.learning_rate)
    return keras.optimizers.Adam(learning_rate=cfg.learning_rate)


def build_cnn(
    cfg: CnnConfig,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (28, 28, 1),
    compile_model: bool = True,
) -> keras.Model:
    """Build (and compile) the model `cfg` describes.

    Raises:
        InvalidConfigError: before any layer is made, when `cfg` can't be built.
    """
    validate(cfg, input_shape[0])
    ensure_precision()  # the chosen one, even after a cleared session (precision.py)
    layers: list[keras.layers.Layer] = [keras.Input(shape=input_shape)]
    for block in cfg.blocks:
        for c in block.convs:
            layers.append(
                keras.layers.Conv2D(
                    c.filters,
                    c.kernel_size,
                    strides=c.strides,
                    padding=c.padding,
                    kernel_initializer=c.kernel_initializer,
                    # The bias is redundant when BatchNorm follows.
                    use_bias=not c.batch_norm,
                )
            )
            if c.batch_norm:
                layers.append(FusedBatchNormalization(momentum=BN_MOMENTUM))
            layers.append(_activation(c.activation))
        if block.pool == "max":
            layers.append(keras.layers.MaxPooling2D(block.pool_size))
        elif block.pool == "avg":
            layers.append(keras.layers.AveragePooling2D(block.pool_size))
        if block.dropout:
            layers.append(keras.layers.Dropout(block.dropout))
    layers.append(keras.layers.Flatten())
    if cfg.flatten_dropout:
        layers.append(keras.layers.Dropout(cfg.flatten_dropout))
    for d in cfg.dense:
        layers.append(keras.layers.Dense(d.units, kernel_initializer=d.kernel_initializer))
        layers.append(_activation(d.activation))
        if d.batch_norm:
            layers.append(FusedBatchNormalization(momentum=BN_MOMENTUM))
        if d.dropout:
            layers.append(keras.layers.Dropout(d.dropout))
    # float32 whatever the policy (precision.py): under mixed bfloat16 the probabilities,
    # and the loss computed from them, would otherwise keep only about 3 significant digits.
    layers.append(keras.layers.Dense(num_classes, activation="softmax", dtype="float32"))
    model = keras.Sequential(layers, name="cnn")
    if compile_model:
        model.compile(
            optimizer=make_optimizer(cfg),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model


def count_params(cfg: CnnConfig, num_classes: int = 10) -> int:
    """Trainable plus non-trainable parameters of the model `cfg` describes.

    Worked out from the shapes (`searchspace.param_count`): building a model to count
    them cost a trial about 50 ms (docs/benchmarks.md, "Overhead")."""
    validate(cfg)
    return param_count(cfg, num_classes)
