"""Sample a CnnConfig from a SearchSpace, define-by-run, through any Optuna trial."""

from __future__ import annotations

from typing import Any, TypeVar

import optuna

from .config import CnnConfig, ConvBlock, ConvLayer, DenseLayer
from .space import FloatRange, IntRange, SearchSpace

T = TypeVar("T")


def _int(trial: optuna.trial.BaseTrial, name: str, r: IntRange) -> int:
    return trial.suggest_int(name, r.low, r.high)


def _float(trial: optuna.trial.BaseTrial, name: str, r: FloatRange) -> float:
    return trial.suggest_float(name, r.low, r.high, log=r.log)


def _cat(trial: optuna.trial.BaseTrial, name: str, choices: tuple[Any, ...]) -> Any:
    return trial.suggest_categorical(name, list(choices))


def suggest_config(trial: optuna.trial.BaseTrial, space: SearchSpace) -> CnnConfig:
    """Draw one architecture. Works with `optuna.trial.FixedTrial(params)` to rebuild one.

    Per-block and per-layer parameters are suggested only for blocks and layers that exist.
    Searched convolutions use 'same' padding, so depth alone never collapses the map; the
    pooling after the last block is dropped when the map is already 3x3 or smaller.
    """
    n_blocks = _int(trial, "n_blocks", space.n_blocks)
    convs_per_block = _int(trial, "convs_per_block", space.convs_per_block) if n_blocks else 0
    activation = _cat(trial, "activation", space.activation)
    batch_norm = bool(_cat(trial, "batch_norm", space.batch_norm)) if n_blocks else False
    pooling = _cat(trial, "pooling", space.pooling) if n_blocks else "none"
    conv_dropout = _float(trial, "conv_dropout", space.conv_dropout) if n_blocks else 0.0
    blocks = []
    size = 28
    for i in range(n_blocks):
        filters = int(_cat(trial, f"filters_b{i}", space.block_filters(i)))
        kernel = int(_cat(trial, f"kernel_b{i}", space.kernel_size))
        convs = tuple(
            ConvLayer(
                filters=filters,
                kernel_size=kernel,
                padding="same",
                activation=activation,
                batch_norm=batch_norm,
            )
            for _ in range(convs_per_block)
        )
        pool = pooling if size // 2 >= 1 and size > 3 else "none"
        if pool != "none":
            size //= 2
        blocks.append(ConvBlock(convs=convs, pool=pool, dropout=round(conv_dropout, 4)))
    flatten_dropout = _float(trial, "flatten_dropout", space.flatten_dropout)
    n_dense = _int(trial, "dense_layers", space.dense_layers)
    dense_dropout = _float(trial, "dense_dropout", space.dense_dropout) if n_dense else 0.0
    dense = tuple(
        DenseLayer(
            units=int(_cat(trial, f"dense_units_l{j}", space.dense_units)),
            activation=activation,
            dropout=round(dense_dropout, 4),
        )
        for j in range(n_dense)
    )
    optimizer = _cat(trial, "optimizer", space.optimizer)
    lr = _float(trial, "learning_rate", space.learning_rate)
    momentum = _float(trial, "momentum", space.momentum) if optimizer == "sgd" else 0.0
    batch_size = int(_cat(trial, "batch_size", space.batch_size))
    return CnnConfig(
        blocks=tuple(blocks),
        flatten_dropout=round(flatten_dropout, 4),
        dense=dense,
        optimizer=optimizer,
        learning_rate=lr,
        momentum=momentum,
        batch_size=batch_size,
    )
