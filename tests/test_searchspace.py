"""Search space: configs, sampling, FixedTrial rebuild, space files, validation."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from searchspace import (
    CnnConfig,
    ConvBlock,
    ConvLayer,
    InvalidConfigError,
    SearchSpace,
    SpaceError,
    load_space,
    space_from_dict,
    suggest_config,
    validate,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sample(seed: int, n: int = 12) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    space = SearchSpace()
    out = []
    for i in range(n):
        t = study.ask()
        suggest_config(t, space)
        out.append(t.params)
        study.tell(t, float(i % 5))  # deterministic fake scores
    return out


def test_seeded_sampling_is_reproducible() -> None:
    assert _sample(7) == _sample(7)
    assert _sample(7) != _sample(8)


def test_fixed_trial_rebuilds_identical_config() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    space = SearchSpace()
    for _ in range(30):
        t = study.ask()
        cfg = suggest_config(t, space)
        assert suggest_config(optuna.trial.FixedTrial(t.params), space) == cfg
        assert CnnConfig.from_json(cfg.to_json()) == cfg
        assert json.loads(cfg.to_json()) == cfg.to_dict()
        study.tell(t, 0.5)


def test_parameter_names_are_flat_and_conditional() -> None:
    params = {
        "n_blocks": 2,
        "convs_per_block": 2,
        "activation": "tanh",
        "batch_norm": True,
        "pooling": "avg",
        "conv_dropout": 0.1,
        "filters_b0": 32,
        "kernel_b0": 3,
        "filters_b1": 64,
        "kernel_b1": 5,
        "flatten_dropout": 0.2,
        "dense_layers": 1,
        "dense_dropout": 0.3,
        "dense_units_l0": 128,
        "optimizer": "sgd",
        "learning_rate": 0.01,
        "momentum": 0.9,
        "batch_size": 64,
    }
    cfg = suggest_config(optuna.trial.FixedTrial(params), SearchSpace())
    assert [b.convs[0].filters for b in cfg.blocks] == [32, 64]
    assert all(len(b.convs) == 2 and b.pool == "avg" for b in cfg.blocks)
    assert cfg.blocks[1].convs[0].kernel_size == 5 and cfg.blocks[0].convs[0].batch_norm
    assert cfg.dense[0].units == 128 and cfg.dense[0].activation == "tanh"
    assert (cfg.optimizer, cfg.momentum, cfg.batch_size) == ("sgd", 0.9, 64)
    # Adam draws no momentum; zero blocks draw no per-block names.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    small = space_from_dict({"n_blocks": [0, 0], "optimizer": ["adam"], "dense_layers": [0, 0]})
    t = study.ask()
    suggest_config(t, small)
    assert not any(
        k.startswith(("filters_b", "kernel_b", "momentum", "dense_units")) for k in t.params
    )


def test_space_file_yaml_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "space.yaml"
    f.write_text("n_blocks: {low: 2, high: 2}\nactivation: [relu]\nlearning_rate: [0.001, 0.01]\n")
    space = load_space(f)
    assert space.n_blocks.low == space.n_blocks.high == 2
    assert space.activation == ("relu",)
    assert space.learning_rate.log  # log kept from the default
    assert space.filters == SearchSpace().filters


def test_space_file_yaml_reads_exponents_and_mixed_keys(tmp_path: Path) -> None:
    f = tmp_path / "space.yaml"
    f.write_text("learning_rate: {low: 1e-4, high: 1e-2}\n")  # PyYAML: `1e-4` is a string
    assert load_space(f).learning_rate.low == pytest.approx(1e-4)
    f.write_text("n_block: [1, 2]\n2: [3]\n")  # keys of two types: one line, not a TypeError
    with pytest.raises(SpaceError, match="unknown space key '2'"):
        load_space(f)


def test_space_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "space.json"
    f.write_bytes(b'{"activation": ["relu"]} \xff')
    with pytest.raises(SpaceError, match="not UTF-8 text"):
        load_space(f)


def test_filter_choices_grow_per_block() -> None:
    space = SearchSpace()
    assert space.block_filters(0) == space.filters
    assert space.block_filters(2) == tuple(f * space.filter_growth**2 for f in space.filters)
    # Growth 1: every block draws from the same choices, as a space file may ask.
    flat = space_from_dict({"filters": [16, 48], "filter_growth": 1, "n_blocks": [3, 3]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        t = study.ask()
        cfg = suggest_config(t, flat)
        assert all(b.convs[0].filters in (16, 48) for b in cfg.blocks)
    grown = suggest_config(
        optuna.trial.FixedTrial(
            {**t.params, "filters_b0": 16, "filters_b1": 32, "filters_b2": 128}
        ),
        space_from_dict({"n_blocks": [3, 3]}),
    )
    assert [b.convs[0].filters for b in grown.blocks] == [16, 32, 128]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"n_block": {"low": 1, "high": 2}}', "'n_block'"),
        ('{"filter_growth": 0}', "'filter_growth'"),
        ('{"filter_growth": [2]}', "'filter_growth'"),
        ('{"n_blocks": {"low": 3, "high": 1}}', "'n_blocks'"),
        ('{"filters": []}', "'filters'"),
        ('{"activation": ["relu", "sinus"]}', "'activation'"),
        ('{"learning_rate": {"low": 0, "high": 0.1, "log": true}}', "'learning_rate'"),
        ('{"batch_size": [0, 64]}', "'batch_size'"),
        ("{not json", "cannot parse"),
        ("[1, 2]", "mapping"),
        ('{"learning_rate": {"low": 0.001, "high": 0.01, "log": "false"}}', "log must be true"),
        ('{"n_blocks": {"low": 1, "high": 3, "log": true}}', "float ranges only"),
        ('{"n_block": 1, "2": [3]}', "unknown space key '2'"),
    ],
)
def test_invalid_space_file_names_the_problem(tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "space.json"
    f.write_text(content)
    with pytest.raises(SpaceError) as e:
        load_space(f)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_collapsing_feature_map_is_rejected_with_reason() -> None:
    cfg = CnnConfig(
        blocks=tuple(
            ConvBlock(convs=(ConvLayer(8, 5, padding="valid"),), pool="max") for _ in range(3)
        )
    )
    with pytest.raises(InvalidConfigError, match="collapses below 1x1"):
        validate(cfg)


def test_summary_is_one_line() -> None:
    cfg = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(32, 3, batch_norm=True),), dropout=0.25),))
    s = cfg.summary()
    assert "\n" not in s and "C32k3" in s and "BN" in s


def test_scaled_up_takes_the_spaces_widest_and_deepest_blocks() -> None:
    from dataclasses import replace

    from searchspace import scaled_up

    space = SearchSpace()  # 1-2 convs per block; filters 16/32, x2 per block
    cell = ConvLayer(16, 5, activation="swish", batch_norm=True)
    cfg = CnnConfig(
        blocks=(ConvBlock(convs=(cell,), pool="avg", dropout=0.1),
                ConvBlock(convs=(replace(cell, filters=32, kernel_size=3),), pool="avg")),
        flatten_dropout=0.2, optimizer="rmsprop", learning_rate=0.003, batch_size=64,
    )
    big = scaled_up(cfg, space)
    assert [[c.filters for c in b.convs] for b in big.blocks] == [[32, 32], [64, 64]]
    # Only width and depth change: kernels, activation, BatchNorm, pooling, dropout, training.
    assert [b.convs[0].kernel_size for b in big.blocks] == [5, 3]
    assert all(c.activation == "swish" and c.batch_norm for b in big.blocks for c in b.convs)
    assert [(b.pool, b.dropout) for b in big.blocks] == [("avg", 0.1), ("avg", 0.0)]
    assert (big.flatten_dropout, big.optimizer, big.learning_rate, big.batch_size) == (
        0.2, "rmsprop", 0.003, 64)
    assert scaled_up(big, space) == big  # already at the top
    # A user's space bounds the scale: one conv per block, 16 filters at most in block 0.
    small = space_from_dict({"convs_per_block": [1, 1], "filters": [8, 16]})
    assert [[c.filters for c in b.convs] for b in scaled_up(cfg, small).blocks] == [[16], [32]]
    # Never narrower or shallower than the config was.
    wide = replace(cfg, blocks=(replace(cfg.blocks[0], convs=(replace(cell, filters=48),) * 3),))
    assert [[c.filters for c in b.convs] for b in scaled_up(wide, space).blocks] == [[48] * 3]
    # Not a point of a space (a baseline's 'valid' convolutions, no conv at all): unchanged.
    valid = replace(cfg, blocks=(ConvBlock(convs=(ConvLayer(8, 3, padding="valid"),)),))
    assert scaled_up(valid, space) == valid
    assert scaled_up(CnnConfig(), space) == CnnConfig()
