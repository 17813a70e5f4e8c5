"""One architecture plus its optimiser, as a frozen, JSON-serialisable value."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

ACTIVATIONS = ("relu", "tanh", "elu", "selu", "gelu", "swish", "sigmoid", "leaky_relu")
POOLINGS = ("max", "avg", "none")
PADDINGS = ("same", "valid")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
INITIALIZERS = ("glorot_uniform", "he_uniform", "he_normal", "glorot_normal")


class InvalidConfigError(ValueError):
    """A config that cannot be built (bad value, or a feature map that collapses)."""


@dataclass(frozen=True)
class ConvLayer:
    """One Conv2D; BatchNorm, when on, sits between the convolution and its activation."""

    filters: int
    kernel_size: int = 3
    padding: str = "same"
    strides: int = 1
    activation: str = "relu"
    batch_norm: bool = False
    kernel_initializer: str = "glorot_uniform"


@dataclass(frozen=True)
class ConvBlock:
    """Convolutions followed by an optional pooling and dropout."""

    convs: tuple[ConvLayer, ...]
    pool: str = "max"
    pool_size: int = 2
    dropout: float = 0.0


@dataclass(frozen=True)
class DenseLayer:
    """One hidden Dense layer; BatchNorm, when on, follows the activation (as in document 004)."""

    units: int
    activation: str = "relu"
    batch_norm: bool = False
    dropout: float = 0.0
    kernel_initializer: str = "glorot_uniform"


@dataclass(frozen=True)
class CnnConfig:
    """A whole model: conv blocks, flatten (+dropout), dense head, softmax output, optimiser."""

    blocks: tuple[ConvBlock, ...] = ()
    flatten_dropout: float = 0.0
    dense: tuple[DenseLayer, ...] = ()
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.0
    batch_size: int = 128
    extras: tuple[tuple[str, Any], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) for JSON."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, so equal configs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CnnConfig:
        """Inverse of `to_dict`."""
        blocks = tuple(
            ConvBlock(
                convs=tuple(ConvLayer(**c) for c in b["convs"]),
                **{k: v for k, v in b.items() if k != "convs"},
            )
            for b in d.get("blocks", ())
        )
        dense = tuple(DenseLayer(**x) for x in d.get("dense", ()))
        rest = {k: v for k, v in d.items() if k not in ("blocks", "dense", "extras")}
        extras = tuple((str(k), v) for k, v in d.get("extras", ()))
        return cls(blocks=blocks, dense=dense, extras=extras, **rest)

    @classmethod
    def from_json(cls, s: str) -> CnnConfig:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(s))

    def summary(self) -> str:
        """One readable line, e.g. `[C32k3-C32k3 BN max D0.25] [C64k3 max] F H128 | adam ...`."""
        parts = []
        for b in self.blocks:
            convs = "-".join(
                f"C{c.filters}k{c.kernel_size}"
                + ("v" if c.padding == "valid" else "")
                + (f"s{c.strides}" if c.strides != 1 else "")
                for c in b.convs
            )
            acts = {c.activation for c in b.convs}
            bits = [convs]
            if any(c.batch_norm for c in b.convs):
                bits.append("BN")
            if acts != {"relu"}:
                bits.append("/".join(sorted(acts)))
            if b.pool != "none":
                bits.append(b.pool)
            if b.dropout:
                bits.append(f"D{b.dropout:.2g}")
            parts.append("[" + " ".join(bits) + "]")
        parts.append("F" + (f" D{self.flatten_dropout:.2g}" if self.flatten_dropout else ""))
        for d in self.dense:
            s = f"H{d.units}"
            if d.activation != "relu":
                s += d.activation
            if d.batch_norm:
                s += "+BN"
            if d.dropout:
                s += f" D{d.dropout:.2g}"
            parts.append(s)
        opt = self.optimizer + (f"(m{self.momentum:.2g})" if self.momentum else "")
        return " ".join(parts) + f" | {opt} lr{self.learning_rate:.2g} b{self.batch_size}"


def _whole(v: object) -> bool:
    """A count that Keras takes: an integer (not a bool, not 32.0) of at least 1."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1


def _conv_out(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - kernel) // stride + 1


def feature_map_sizes(cfg: CnnConfig, input_size: int = 28) -> list[int]:
    """Spatial size after each conv and pool, in order (no Keras needed)."""
    sizes = []
    s = input_size
    for b in cfg.blocks:
        for c in b.convs:
            s = _conv_out(s, c.kernel_size, c.strides, c.padding)
            sizes.append(s)
        if b.pool != "none":
            s = s // b.pool_size
            sizes.append(s)
    return sizes


def param_count(cfg: CnnConfig, num_classes: int = 10, input_size: int = 28,
                channels: int = 1) -> int:
    """Trainable plus non-trainable parameters of the model `cfg` describes (no Keras needed).

    The count Keras gives for `build_cnn`'s model, worked out from the shapes, so a trial
    knows its size without building a model first. BatchNorm holds 4 numbers per channel
    (scale, offset and the two moving statistics); a convolution that BatchNorm follows
    has no bias.
    """
    n, width = 0, channels
    for c in (c for b in cfg.blocks for c in b.convs):
        n += c.kernel_size**2 * width * c.filters + (4 if c.batch_norm else 1) * c.filters
        width = c.filters
    size = (feature_map_sizes(cfg, input_size) or [input_size])[-1]
    width *= size * size  # flattened
    for d in cfg.dense:
        n += (width + 1) * d.units + (4 * d.units if d.batch_norm else 0)
        width = d.units
    return n + (width + 1) * num_classes


def validate(cfg: CnnConfig, input_size: int = 28) -> None:
    """Raise InvalidConfigError with a one-line reason when `cfg` can't be built or trained."""

    def bad(msg: str) -> None:
        raise InvalidConfigError(msg)

    if cfg.optimizer not in OPTIMIZERS:
        bad(f"unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        bad(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if cfg.batch_size < 1:
        bad(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not 0.0 <= cfg.momentum < 1.0:
        bad(f"momentum must be in [0, 1), got {cfg.momentum}")
    dropouts = [
        cfg.flatten_dropout,
        *(b.dropout for b in cfg.blocks),
        *(d.dropout for d in cfg.dense),
    ]
    if any(not 0.0 <= p < 1.0 for p in dropouts):
        bad(f"dropout rates must be in [0, 1), got {dropouts}")
    for i, b in enumerate(cfg.blocks):
        if not b.convs:
            bad(f"block {i} has no convolution")
        if b.pool not in POOLINGS:
            bad(f"block {i}: unknown pooling {b.pool!r} (choose from {', '.join(POOLINGS)})")
        for c in b.convs:
            if c.activation not in ACTIVATIONS:
                bad(f"block {i}: unknown activation {c.activation!r}")
            if c.padding not in PADDINGS:
                bad(f"block {i}: unknown padding {c.padding!r}")
            if not all(_whole(v) for v in (c.filters, c.kernel_size, c.strides)):
                bad(f"block {i}: filters, kernel_size and strides must be whole numbers >= 1")
            if c.kernel_initializer not in INITIALIZERS:
                bad(f"block {i}: unknown kernel_initializer {c.kernel_initializer!r}")
        if b.pool != "none" and not _whole(b.pool_size):
            bad(f"block {i}: pool_size must be a whole number >= 1, got {b.pool_size!r}")
    for d in cfg.dense:
        if not _whole(d.units) or d.activation not in ACTIVATIONS:
            bad(f"dense layer {d}: units must be a whole number >= 1 and activation known")
        if d.kernel_initializer not in INITIALIZERS:
            bad(f"dense layer {d}: unknown kernel_initializer {d.kernel_initializer!r}")
    s = input_size
    for i, b in enumerate(cfg.blocks):
        for c in b.convs:
            s = _conv_out(s, c.kernel_size, c.strides, c.padding)
            if s < 1:
                bad(f"feature map collapses below 1x1 in block {i} (kernel {c.kernel_size})")
        if b.pool != "none":
            s = s // b.pool_size
            if s < 1:
                bad(f"feature map collapses below 1x1 at the pooling of block {i}")
