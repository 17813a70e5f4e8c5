"""build_cnn and the baselines built from the seed documents."""

from __future__ import annotations

import pytest

from fmnist_search.model import build_cnn, count_params
from searchspace import CnnConfig, ConvBlock, ConvLayer, DenseLayer, InvalidConfigError, param_count
from searchspace.baselines import BASELINES, BY_NAME

# Documented in the seed documents (or computed by hand where they are silent).
EXPECTED_PARAMS = {
    "blog_3conv32": 31_626,
    "mlm_cnn_sgd": 542_230,
    "dense128": 101_770,
    "coursera_2conv64": 243_786,
    "conv8_dense28": 38_254,
    "lenet5_tanh": 61_610,
    "mit_model1": 201_578,
    "mit_model2_bn": 407_802,
}


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: b.name)
def test_every_baseline_builds_with_its_parameter_count(baseline) -> None:  # type: ignore[no-untyped-def]
    model = build_cnn(baseline.config)
    assert model.count_params() == EXPECTED_PARAMS[baseline.name]
    if baseline.documented_params is not None:
        assert model.count_params() == baseline.documented_params
    assert model.output_shape == (None, 10)


def test_lenet_uses_tanh_and_average_pooling() -> None:
    model = build_cnn(BY_NAME["lenet5_tanh"].config)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("AveragePooling2D") == 2
    assert "MaxPooling2D" not in kinds


def test_build_is_pure() -> None:
    cfg = BY_NAME["coursera_2conv64"].config
    a, b = build_cnn(cfg), build_cnn(cfg)
    assert a is not b and a.count_params() == b.count_params()
    assert cfg == BY_NAME["coursera_2conv64"].config


def test_num_classes_and_uncompiled() -> None:
    m = build_cnn(BY_NAME["mit_model1"].config, num_classes=3, compile_model=False)
    assert m.output_shape == (None, 3)
    assert count_params(BY_NAME["mit_model1"].config, 3) == m.count_params()


def test_collapse_rejected_before_any_layer() -> None:
    cfg = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 29, padding="valid"),)),))
    with pytest.raises(InvalidConfigError):
        build_cnn(cfg)


def test_batchnorm_statistics_settle_within_a_short_trial() -> None:
    """After 30 steps a BatchNorm model predicts in inference mode as it does in training
    mode: the moving statistics have caught up (Keras' default momentum needs hundreds)."""
    import numpy as np

    from fmnist_search.training import fit_config

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 960).astype("int32")
    x = (0.5 + 0.3 * y[:, None, None, None] + 0.1 * rng.standard_normal((960, 28, 28, 1)))
    x = x.astype("float32")
    cfg = CnnConfig(
        blocks=(ConvBlock(convs=(ConvLayer(8, 3, batch_norm=True),)),), batch_size=32
    )
    res = fit_config(cfg, x, y, None, None, epochs=1, seed=0, num_classes=2, keep_model=True)
    assert res.model is not None
    infer = np.asarray(res.model(x, training=False)).argmax(1)
    train = np.asarray(res.model(x, training=True)).argmax(1)
    assert (infer == train).mean() > 0.95 and (infer == y).mean() > 0.95


def _sampled_configs(n: int) -> list[CnnConfig]:
    import optuna

    from searchspace import SearchSpace, suggest_config

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    space = SearchSpace()
    return [suggest_config(study.ask(), space) for _ in range(n)]


def test_parameter_count_from_shapes_equals_keras_count() -> None:
    odd = CnnConfig(
        blocks=(
            ConvBlock(convs=(ConvLayer(6, 5, padding="valid", strides=2),), pool="none"),
            ConvBlock(convs=(ConvLayer(10, 3, batch_norm=True), ConvLayer(12, 3)), pool="avg",
                      pool_size=3),
        ),
        dense=(DenseLayer(20, batch_norm=True, dropout=0.2), DenseLayer(7, activation="tanh")),
    )
    # 28 -> 14 (pool) -> 7, then "same" at stride 2 rounds up to 4, and a 3-pool of 4 gives 1.
    rounding = CnnConfig(
        blocks=(
            ConvBlock(convs=(ConvLayer(4, 3, activation="leaky_relu"),)),
            ConvBlock(convs=(ConvLayer(5, 3),)),
            ConvBlock(convs=(ConvLayer(6, 3, strides=2),), pool_size=3),
        ),
        dense=(DenseLayer(9, activation="leaky_relu"),),
    )
    configs = [b.config for b in BASELINES] + _sampled_configs(25) + [odd, rounding]
    for cfg in configs:
        for classes in (10, 3):
            built = build_cnn(cfg, num_classes=classes, compile_model=False).count_params()
            assert param_count(cfg, classes) == built, cfg.summary()
            assert count_params(cfg, classes) == built


@pytest.mark.parametrize("conv, block, dense", [
    (ConvLayer(8.0, 3), {}, ()),  # type: ignore[arg-type]
    (ConvLayer(8, 3, kernel_initializer="nonsense"), {}, ()),
    (ConvLayer(8, 3), {"pool_size": 0}, ()),
    (ConvLayer(8, 3), {}, (DenseLayer(True),)),  # type: ignore[arg-type]
    (ConvLayer(8, 3), {}, (DenseLayer(16, kernel_initializer="nonsense"),)),
])
def test_what_keras_would_refuse_is_refused_before_counting(conv, block, dense) -> None:  # type: ignore[no-untyped-def]
    cfg = CnnConfig(blocks=(ConvBlock(convs=(conv,), **block),), dense=dense)
    with pytest.raises(InvalidConfigError):
        count_params(cfg)
