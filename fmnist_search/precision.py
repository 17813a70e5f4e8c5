"""The floating-point precision models train in: float32, or bfloat16 where the CPU has it.

CPUs with Intel AMX (the `amx_bf16` flag: Xeon Sapphire Rapids and later) run oneDNN's
bfloat16 convolutions and matrix products several times faster than float32. Keras' mixed
policy (`mixed_bfloat16`) computes in bfloat16 and keeps every variable, the optimiser's
state and BatchNorm's statistics in float32; `model.build_cnn` keeps the output layer in
float32, so the softmax and the loss keep their precision. Elsewhere bfloat16 would be
emulated, slower than float32, so `auto` picks it only where AMX is present.

A model trained under the mixed policy is exported as a float32 copy with the same weights
(`as_float32`), so a saved model runs on any CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

CHOICES = ("auto", "float32", "bfloat16")
_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# What `use` set. Keras keeps its global policy in the session state that `clear_session`
# resets to float32 (the tool clears it after every trial, KerasTuner before every build),
# so `ensure` sets it again before each model is built.
_chosen: str | None = None


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def _machine_flags() -> frozenset[str]:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no flags known, so float32
        return frozenset()


def resolve(
    choice: str, flags: frozenset[str] | None = None, backend: str = "tensorflow"
) -> str:
    """`float32` or `bfloat16`: `auto` is bfloat16 only on a CPU with AMX (`amx_bf16`),
    under TensorFlow (whose oneDNN kernels were measured; README).

    Raises:
        ValueError: `choice` is not one of CHOICES.
    """
    if choice not in CHOICES:
        raise ValueError(f"unknown precision {choice!r} (choose from {', '.join(CHOICES)})")
    if choice != "auto":
        return choice
    if backend != "tensorflow":
        return "float32"
    return "bfloat16" if "amx_bf16" in (_machine_flags() if flags is None else flags) else "float32"


def use(choice: str) -> str:
    """Set Keras' global dtype policy for the models built from now on; the precision used."""
    import keras

    global _chosen
    _chosen = resolve(choice, backend=keras.backend.backend())
    keras.mixed_precision.set_global_policy(_POLICY[_chosen])
    return _chosen


def ensure() -> None:
    """Set Keras' global policy to what `use` chose (a cleared session left float32)."""
    import keras

    if _chosen is not None and keras.mixed_precision.global_policy().name != _POLICY[_chosen]:
        keras.mixed_precision.set_global_policy(_POLICY[_chosen])


def current() -> str:
    """The precision models are built in: what `use` chose, else Keras' global policy's."""
    import keras

    if _chosen is not None:
        return _chosen
    compute = keras.mixed_precision.global_policy().compute_dtype
    return "bfloat16" if compute == "bfloat16" else "float32"


@contextlib.contextmanager
def float32_policy() -> Iterator[None]:
    """Keras' global policy float32 inside (what `use` chose outside): for models that ship.

    Layers made without a dtype take the global policy, and so do the input layers Keras
    adds for them (a Sequential wrapping a model would round its images to bfloat16).
    """
    import keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def as_float32(model: keras.Model) -> keras.Model:
    """A float32 copy of `model` with its weights (the same values: the mixed policy keeps
    variables in float32), made of built-in layers only: a layer naming a `portable_class`
    (batchnorm.FusedBatchNormalization) becomes that class, so the copy loads without the
    tool. A float32 model of built-in layers is returned as it is."""
    import keras

    if all(_float32(layer) and not _needs_swap(layer) for layer in model.layers):
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        config["dtype"] = "float32"
        return getattr(layer, "portable_class", layer.__class__).from_config(config)

    with float32_policy():
        copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _needs_swap(layer: keras.layers.Layer) -> bool:
    return getattr(layer, "portable_class", type(layer)) is not type(layer)


def _float32(layer: keras.layers.Layer) -> bool:
    policy = layer.dtype_policy
    return bool(policy.compute_dtype == "float32" and policy.variable_dtype == "float32")
