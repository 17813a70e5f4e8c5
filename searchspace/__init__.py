"""The search space: architectures as data, the space to sample them from, the baselines."""

from .config import (
    CnnConfig,
    ConvBlock,
    ConvLayer,
    DenseLayer,
    InvalidConfigError,
    feature_map_sizes,
    param_count,
    validate,
)
from .space import (
    FloatRange,
    IntRange,
    SearchSpace,
    SpaceError,
    load_space,
    scaled_up,
    space_from_dict,
)
from .suggest import suggest_config

__all__ = [
    "CnnConfig",
    "ConvBlock",
    "ConvLayer",
    "DenseLayer",
    "FloatRange",
    "IntRange",
    "InvalidConfigError",
    "SearchSpace",
    "SpaceError",
    "feature_map_sizes",
    "load_space",
    "param_count",
    "scaled_up",
    "space_from_dict",
    "suggest_config",
    "validate",
]
