"""Draw a CnnConfig through KerasTuner's `HyperParameters`, exactly as `suggest_config` would.

The names, ranges, log scales and conditions are those of `searchspace.suggest`: a block's
parameters exist only when the block does (`conditional_scope` on `n_blocks`), a dense
layer's only when the layer does, `momentum` only under SGD. A KerasTuner trial is thus an
ordinary point of the space: its active values, given to `optuna.trial.FixedTrial`, rebuild
the same `CnnConfig` and carry the same Optuna distributions as a trial of the Optuna engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution
from optuna.trial import FixedTrial

from .config import CnnConfig
from .space import FloatRange, IntRange, SearchSpace
from .suggest import suggest_config

if TYPE_CHECKING:  # importing keras_tuner pulls in Keras and TensorFlow
    import keras_tuner

# Keys KerasTuner's Hyperband adds to a trial's values ("tuner/epochs", ...): not parameters.
TUNER_PREFIX = "tuner/"


def _int(hp: keras_tuner.HyperParameters, name: str, r: IntRange) -> int | None:
    # A one-value range is Fixed: KerasTuner's Bayesian oracle divides by (max - min).
    v = hp.Fixed(name, r.low) if r.low == r.high else hp.Int(name, r.low, r.high)
    return None if v is None else int(v)


def _float(hp: keras_tuner.HyperParameters, name: str, r: FloatRange) -> float | None:
    if r.low == r.high:
        v = hp.Fixed(name, float(r.low))
    else:
        v = hp.Float(name, r.low, r.high, sampling="log" if r.log else "linear")
    return None if v is None else float(v)


def _cat(hp: keras_tuner.HyperParameters, name: str, choices: Sequence[Any]) -> Any:
    if len(choices) == 1:
        v = hp.Fixed(name, choices[0])
    elif all(isinstance(c, bool) for c in choices):
        # hp.Choice stores booleans as 1/0; Boolean keeps them booleans.
        v = hp.Boolean(name)
    else:
        v = hp.Choice(name, list(choices))
    if v is None:
        return None
    # The space's own element, so types (bool, int) are exactly those Optuna would return.
    return choices[list(choices).index(v)]


@contextlib.contextmanager
def _when(
    hp: keras_tuner.HyperParameters, parent: str, active: Sequence[Any], possible: Sequence[Any]
) -> Iterator[None]:
    """Declare what follows as conditional on `parent` taking one of `active`.

    Always-true conditions open no scope: an unconditional parameter is simpler for the
    oracles and means the same.
    """
    if set(active) >= set(possible):
        yield
        return
    with hp.conditional_scope(parent, list(active)):
        yield


def draw_params(hp: keras_tuner.HyperParameters, space: SearchSpace) -> dict[str, Any]:
    """Declare the space's hyperparameters on `hp` and return the active values by name.

    Every parameter that could exist is declared (inside its conditional scope), so the
    oracle learns the whole conditional space; only the active ones are returned, which are
    exactly the parameters `suggest_config` draws for the same architecture.
    """
    values: dict[str, Any] = {}

    def put(name: str, v: Any) -> Any:
        if v is not None:
            values[name] = v
        return v

    nb = space.n_blocks
    block_counts = list(range(nb.low, nb.high + 1))
    put("n_blocks", _int(hp, "n_blocks", nb))
    with_convs = [n for n in block_counts if n >= 1]
    if with_convs:
        with _when(hp, "n_blocks", with_convs, block_counts):
            put("convs_per_block", _int(hp, "convs_per_block", space.convs_per_block))
    put("activation", _cat(hp, "activation", space.activation))
    if with_convs:
        with _when(hp, "n_blocks", with_convs, block_counts):
            put("batch_norm", _cat(hp, "batch_norm", space.batch_norm))
            put("pooling", _cat(hp, "pooling", space.pooling))
            put("conv_dropout", _float(hp, "conv_dropout", space.conv_dropout))
    for i in range(nb.high):
        with _when(hp, "n_blocks", [n for n in block_counts if n > i], block_counts):
            put(f"filters_b{i}", _cat(hp, f"filters_b{i}", space.block_filters(i)))
            put(f"kernel_b{i}", _cat(hp, f"kernel_b{i}", space.kernel_size))
    put("flatten_dropout", _float(hp, "flatten_dropout", space.flatten_dropout))
    dl = space.dense_layers
    layer_counts = list(range(dl.low, dl.high + 1))
    put("dense_layers", _int(hp, "dense_layers", dl))
    with_dense = [n for n in layer_counts if n >= 1]
    if with_dense:
        with _when(hp, "dense_layers", with_dense, layer_counts):
            put("dense_dropout", _float(hp, "dense_dropout", space.dense_dropout))
    for j in range(dl.high):
        with _when(hp, "dense_layers", [n for n in layer_counts if n > j], layer_counts):
            put(f"dense_units_l{j}", _cat(hp, f"dense_units_l{j}", space.dense_units))
    put("optimizer", _cat(hp, "optimizer", space.optimizer))
    put("learning_rate", _float(hp, "learning_rate", space.learning_rate))
    if "sgd" in space.optimizer:
        with _when(hp, "optimizer", ["sgd"], space.optimizer):
            put("momentum", _float(hp, "momentum", space.momentum))
    put("batch_size", _cat(hp, "batch_size", space.batch_size))
    return values


def optuna_point(
    hp: keras_tuner.HyperParameters, space: SearchSpace
) -> tuple[CnnConfig, dict[str, Any], dict[str, BaseDistribution]]:
    """The config, and the params and distributions an Optuna trial of it would hold.

    Both come from `suggest_config` itself (through a FixedTrial), so a KerasTuner trial
    recorded with them is indistinguishable, to Optuna's samplers, from one of its own.

    Raises:
        ValueError: a parameter `suggest_config` needs is missing (a space mismatch).
    """
    trial = FixedTrial(draw_params(hp, space))
    cfg = suggest_config(trial, space)
    return cfg, dict(trial.params), dict(trial.distributions)


def config_from_hp(hp: keras_tuner.HyperParameters, space: SearchSpace) -> CnnConfig:
    """The architecture `hp` describes: `suggest_config(FixedTrial(values))` of its draws."""
    return optuna_point(hp, space)[0]
