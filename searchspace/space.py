"""What can be searched, as plain data, loadable from YAML or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .config import ACTIVATIONS, OPTIMIZERS, POOLINGS, CnnConfig


class SpaceError(ValueError):
    """A space file that can't be used; the message names the bad key."""


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class SearchSpace:
    """Ranges (IntRange/FloatRange) and choices (tuples) of the default CNN space.

    Parameter names sampled from it (flat, stable): n_blocks, convs_per_block,
    filters_b{i} (choices from `block_filters(i)`), kernel_b{i}, pooling, activation,
    batch_norm, conv_dropout, flatten_dropout, dense_layers, dense_units_l{j},
    dense_dropout, optimizer, learning_rate, momentum (SGD only), batch_size.
    """

    # 2 or 3 blocks: with few epochs on a subset, a 1-block wide-dense model learns fastest
    # and won the search, then tied the simplest baselines at full training (measured,
    # docs/benchmarks.md). `n_blocks: [1, 3]` in a space file brings it back.
    n_blocks: IntRange = IntRange(2, 3)
    convs_per_block: IntRange = IntRange(1, 2)
    # Choices for the first block; block i draws from these times filter_growth**i. Growing
    # width as the map shrinks keeps every block's cost alike: 3 blocks of 2 convs with 64
    # filters throughout trained 3.8x slower than 16/32/64 here (docs/benchmarks.md).
    filters: tuple[int, ...] = (16, 32)
    filter_growth: int = 2
    kernel_size: tuple[int, ...] = (3, 5)
    pooling: tuple[str, ...] = ("max", "avg")
    activation: tuple[str, ...] = ("relu", "tanh", "elu", "swish")
    batch_norm: tuple[bool, ...] = (True, False)
    conv_dropout: FloatRange = FloatRange(0.0, 0.4)
    flatten_dropout: FloatRange = FloatRange(0.0, 0.5)
    dense_layers: IntRange = IntRange(0, 2)
    dense_units: tuple[int, ...] = (64, 128, 256)
    dense_dropout: FloatRange = FloatRange(0.0, 0.5)
    optimizer: tuple[str, ...] = ("adam", "sgd", "rmsprop")
    learning_rate: FloatRange = FloatRange(1e-4, 1e-2, log=True)
    momentum: FloatRange = FloatRange(0.5, 0.95)
    batch_size: tuple[int, ...] = (64, 128, 256)

    def block_filters(self, i: int) -> tuple[int, ...]:
        """Filter-count choices of block `i` (0-based): `filters` x `filter_growth`**i."""
        return tuple(f * self.filter_growth**i for f in self.filters)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, the same shape a space file uses."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, IntRange):
                out[f.name] = {"low": v.low, "high": v.high}
            elif isinstance(v, FloatRange):
                out[f.name] = {"low": v.low, "high": v.high, "log": v.log}
            elif isinstance(v, int):
                out[f.name] = v
            else:
                out[f.name] = list(v)
        return out


# Allowed values of the categorical keys; ints must be positive.
_ALLOWED: dict[str, tuple[Any, ...]] = {
    "pooling": POOLINGS,
    "activation": ACTIVATIONS,
    "optimizer": OPTIMIZERS,
    "batch_norm": (True, False),
}
_INT_MIN = {"n_blocks": 0, "convs_per_block": 1, "dense_layers": 0}
_FLOAT_BOUNDS = {
    "conv_dropout": (0.0, 0.95),
    "flatten_dropout": (0.0, 0.95),
    "dense_dropout": (0.0, 0.95),
    "learning_rate": (1e-7, 10.0),
    "momentum": (0.0, 0.999),
}


def _number(x: Any) -> float | None:
    """A float from a number, or from text that reads as one: YAML 1.1 (PyYAML) reads `1e-4`
    without a dot as a string."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _parse_value(key: str, default: Any, raw: Any) -> Any:
    def bad(msg: str) -> SpaceError:
        return SpaceError(f"space key {key!r}: {msg}")

    if isinstance(default, (IntRange, FloatRange)):
        if isinstance(raw, (list, tuple)) and len(raw) == 2:
            raw = {"low": raw[0], "high": raw[1]}
        if not isinstance(raw, dict) or not {"low", "high"} <= set(raw):
            raise bad("expected {low: .., high: ..} or [low, high]")
        fields_ok = {"low", "high"} | ({"log"} if isinstance(default, FloatRange) else set())
        unknown = set(raw) - fields_ok
        if unknown:
            raise bad(f"unknown field(s) {sorted(map(str, unknown))}"
                      + (" (log applies to float ranges only)" if "log" in unknown else ""))
        lo, hi = raw["low"], raw["high"]
        if isinstance(default, IntRange):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)):
                raise bad("low and high must be integers")
            if lo > hi:
                raise bad(f"empty range: low {lo} > high {hi}")
            if lo < _INT_MIN[key]:
                raise bad(f"low must be >= {_INT_MIN[key]}")
            return IntRange(lo, hi)
        lo, hi = _number(lo), _number(hi)
        if lo is None or hi is None:
            raise bad("low and high must be numbers")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise bad(f"empty range: low {lo} > high {hi}")
        blo, bhi = _FLOAT_BOUNDS[key]
        if lo < blo or hi > bhi:
            raise bad(f"range must lie within [{blo}, {bhi}]")
        log = raw.get("log", default.log)
        if not isinstance(log, bool):
            raise bad(f"log must be true or false, not {log!r}")
        if log and lo <= 0:
            raise bad("a log range needs low > 0")
        return FloatRange(lo, hi, log)
    if isinstance(default, int):  # filter_growth: one positive integer
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= 8:
            raise bad("expected one integer from 1 to 8")
        return raw
    # Categorical.
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    if len(raw) == 0:
        raise bad("empty list of choices")
    if len(set(map(repr, raw))) != len(raw):
        raise bad("duplicate choices")
    if key in _ALLOWED:
        wrong = [x for x in raw if x not in _ALLOWED[key] or type(x) is not type(_ALLOWED[key][0])]
        if wrong:
            raise bad(f"unknown choice(s) {wrong} (allowed: {list(_ALLOWED[key])})")
    else:  # filters, kernel_size, dense_units, batch_size: positive integers
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in raw):
            raise bad("choices must be positive integers")
    return tuple(raw)


def space_from_dict(d: dict[str, Any], base: SearchSpace | None = None) -> SearchSpace:
    """Override `base` (default space) with the keys of `d`; unknown keys are errors."""
    base = base or SearchSpace()
    if not isinstance(d, dict):
        raise SpaceError("a space file must hold a mapping of parameter names to ranges")
    names = {f.name for f in fields(SearchSpace)}
    unknown = sorted(map(str, set(d) - names))  # str: YAML keys may be numbers too
    if unknown:
        raise SpaceError(
            f"unknown space key {unknown[0]!r} (known keys: {', '.join(sorted(names))})"
        )
    return replace(base, **{k: _parse_value(k, getattr(base, k), v) for k, v in d.items()})


def load_space(path: str | Path) -> SearchSpace:
    """Read a YAML (.yaml/.yml) or JSON space file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpaceError(f"cannot read space file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SpaceError(f"space file {p} is not UTF-8 text") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both mean unparsable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpaceError(f"cannot parse space file {p}: {first}") from None
    if data is None:
        data = {}
    return space_from_dict(data)


def scaled_up(cfg: CnnConfig, space: SearchSpace) -> CnnConfig:
    """The same cell as wide and as deep as `space` allows, for the final fit.

    Every block gets the space's most convolutions per block, each with the widest filter
    choice of that block (never fewer or narrower than it had); kernels, activation,
    BatchNorm, pooling, dropout, the dense head and the optimiser stay. A short trial on a
    subset cannot tell width and depth apart (they pay off only with more data and epochs),
    so the search picks the cell and the final fit scales it, as NAS methods commonly do:
    run 6's trial 46 scored 0.9232 as searched (18 epochs) and 0.9347 scaled (12 epochs).
    A config that is not a point of the space ('valid' padding, strides, no blocks) is
    returned unchanged.
    """
    convs = [c for b in cfg.blocks for c in b.convs]
    if not convs or any(c.padding != "same" or c.strides != 1 for c in convs):
        return cfg
    blocks = []
    for i, b in enumerate(cfg.blocks):
        width = max((*space.block_filters(i), *(c.filters for c in b.convs)))
        depth = max(space.convs_per_block.high, len(b.convs))
        blocks.append(replace(b, convs=(replace(b.convs[0], filters=width),) * depth))
    return replace(cfg, blocks=tuple(blocks))
