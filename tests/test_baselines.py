"""The seed documents' baselines: the table, warm start, and the `baselines` sub-command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from fmnist_search import study as st
from fmnist_search.baseline_runs import (
    nearest_params,
    study_protocol,
    warm_start,
    warm_start_points,
)
from fmnist_search.cli import main
from fmnist_search.leaderboard import baseline_study_name, leaderboard, load_baseline_trials
from fmnist_search.objective import SearchProtocol
from searchspace.baselines import BASELINES, BY_NAME
from searchspace.space import SearchSpace, space_from_dict
from searchspace.suggest import suggest_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

# What the seed documents print (checked against /work/shared/seeds when written):
# name -> (documents, accuracy, metric, epochs, batch size, optimizer, learning rate).
DOCUMENTED = {
    "blog_3conv32": ("000, 002", 0.811, "val", 100, 64, "adam", 1e-3),
    "mlm_cnn_sgd": ("001", 0.9043, "test", 5, 32, "sgd", 0.01),
    "dense128": ("001", 0.1055, "test", 1, 32, "adam", 1e-3),
    "coursera_2conv64": ("001", 0.9081, "test", 5, 32, "adam", 1e-3),
    "conv8_dense28": ("003", 0.8771, "test", 10, 32, "adam", 1e-3),
    "lenet5_tanh": ("003", 0.8174, "test", 10, 128, "sgd", 0.01),
    "mit_model1": ("004", 0.855, "test", 10, 128, "adam", 0.01),
    "mit_model2_bn": ("004", 0.9089, "test", 10, 128, "adam", 0.01),
}
NARROW = space_from_dict(
    {
        "n_blocks": [2, 3],
        "convs_per_block": [1, 1],
        "filters": [32],
        "kernel_size": [3],
        "pooling": ["avg"],
        "activation": ["elu"],
        "batch_norm": [True],
        "dense_layers": [1, 2],
        "dense_units": [256],
        "optimizer": ["rmsprop"],
        "learning_rate": {"low": 0.002, "high": 0.005, "log": True},
        "batch_size": [256],
    }
)


def test_table_matches_the_documents() -> None:
    assert set(BY_NAME) == set(DOCUMENTED)
    for b in BASELINES:
        source, acc, metric, epochs, batch, opt, lr = DOCUMENTED[b.name]
        assert (b.source, b.documented_accuracy, b.documented_metric, b.epochs) == (
            source,
            acc,
            metric,
            epochs,
        ), b.name
        cfg = b.config
        assert (cfg.batch_size, cfg.optimizer, cfg.learning_rate) == (batch, opt, lr), b.name
    assert BY_NAME["mlm_cnn_sgd"].config.momentum == 0.9
    assert BY_NAME["lenet5_tanh"].config.momentum == 0.0  # Keras' plain 'sgd'


def test_every_baseline_has_its_parameter_count_checked() -> None:
    # tests/test_model.py builds each baseline and compares its parameter count.
    from test_model import EXPECTED_PARAMS

    assert set(EXPECTED_PARAMS) == set(BY_NAME)
    for b in BASELINES:
        if b.documented_params is not None:
            assert EXPECTED_PARAMS[b.name] == b.documented_params


@pytest.mark.parametrize("space", [SearchSpace(), NARROW], ids=["default", "narrow"])
@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: b.name)
def test_nearest_params_are_a_valid_point_of_the_space(baseline: Any, space: SearchSpace) -> None:
    params = nearest_params(baseline.config, space)
    fixed = optuna.trial.FixedTrial(params)
    cfg = suggest_config(fixed, space)
    # Exactly the parameters suggest_config asks for: nothing missing, nothing extra.
    assert fixed.params == params
    assert space.n_blocks.low <= len(cfg.blocks) <= space.n_blocks.high
    assert space.dense_layers.low <= len(cfg.dense) <= space.dense_layers.high
    assert space.learning_rate.low <= cfg.learning_rate <= space.learning_rate.high
    assert cfg.batch_size in space.batch_size and cfg.optimizer in space.optimizer


def test_nearest_params_keep_what_the_space_can_express() -> None:
    space = space_from_dict({"n_blocks": [1, 3]})
    dense = nearest_params(BY_NAME["dense128"].config, space)
    assert dense["n_blocks"] == 1 and dense["dense_layers"] == 1  # no conv blocks -> one
    # A space that starts at 2 blocks: the count is clamped up.
    two = space_from_dict({"n_blocks": [2, 3]})
    assert nearest_params(BY_NAME["dense128"].config, two)["n_blocks"] == 2
    lenet = nearest_params(BY_NAME["lenet5_tanh"].config, space)
    assert (lenet["activation"], lenet["pooling"], lenet["n_blocks"]) == ("tanh", "avg", 3)
    # Block 2 draws from (64, 128): LeNet's 120 filters map to 128; its 6 in block 0 to 16.
    assert (lenet["filters_b0"], lenet["filters_b2"]) == (16, 128)
    assert lenet["momentum"] == space.momentum.low  # clamped
    sgd = nearest_params(BY_NAME["mlm_cnn_sgd"].config, space)
    assert (sgd["optimizer"], sgd["momentum"], sgd["dense_units_l0"]) == ("sgd", 0.9, 128)
    assert nearest_params(BY_NAME["mit_model2_bn"].config, space)["convs_per_block"] == 2
    assert nearest_params(BY_NAME["blog_3conv32"].config, space)["flatten_dropout"] == 0.2


def test_warm_start_enqueues_each_point_once() -> None:
    study = optuna.create_study(direction="maximize")
    names = warm_start(study, SearchSpace())
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert names and len(waiting) == len(names)
    assert [t.user_attrs["warm_start_from"] for t in waiting] == names
    assert warm_start(study, SearchSpace()) == []  # already there
    # The enqueued points are what the next trials run.
    trial = study.ask()
    assert suggest_config(trial, SearchSpace()) == suggest_config(
        optuna.trial.FixedTrial(nearest_params(BY_NAME[names[0]].config, SearchSpace())),
        SearchSpace(),
    )


def _args(tmp_path: Path, synthetic_dir: Path, *extra: str) -> list[str]:
    return [
        "baselines",
        "--data-dir",
        str(synthetic_dir),
        "--results-dir",
        str(tmp_path / "res"),
        "--study-name",
        "b",
        "--no-progress",
        *extra,
    ]


def _baseline_trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    storage = st.default_storage(tmp_path / "res", "b")
    return optuna.load_study(study_name="b.baselines", storage=storage).get_trials()


def test_baselines_subcommand_measures_stores_and_resumes(
    tmp_path: Path, synthetic_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(tmp_path, synthetic_dir, "--only", "conv8_dense28,dense128", "--epochs", "1")
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "conv8_dense28" in out and "dense128" in out and "Traceback" not in err
    trials = _baseline_trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert {t.user_attrs["baseline"] for t in trials} == {"conv8_dense28", "dense128"}
    for t in trials:
        ua = t.user_attrs
        assert {"config", "summary", "params", "epochs_run", "history", "wall_time"} <= set(ua)
        assert ua["epochs_run"] == 1 and ua["summary"] == BY_NAME[ua["baseline"]].config.summary()
    # A rerun trains nothing new.
    assert main(args) == 0
    assert "2 of 2 measured" in capsys.readouterr().err
    assert len(_baseline_trials(tmp_path)) == 2
    # The leaderboard ranks them (no main study yet: only baselines).
    got = load_baseline_trials(st.default_storage(tmp_path / "res", "b"), "b")
    df = leaderboard([], baselines=got)
    assert list(df["kind"]) == ["baseline"] * 2 and list(df["rank"]) == [1, 2]


def test_baselines_take_the_main_study_protocol_and_refuse_other_flags(
    tmp_path: Path, synthetic_dir: Path, tiny_dataset: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    search = SearchProtocol(epochs=1, val_size=40, train_subset=None, seed=2)
    protocol = study_protocol(search, SearchSpace(), tiny_dataset)
    st.open_study(
        st.default_storage(tmp_path / "res", "b"),
        "b",
        optuna.samplers.RandomSampler(seed=0),
        optuna.pruners.NopPruner(),
        protocol,
    )
    assert main(_args(tmp_path, synthetic_dir, "--only", "dense128", "--epochs", "2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--epochs 2" in err and "Traceback" not in err
    # Without the contradicting flag, the study's protocol is used as stored.
    assert main(_args(tmp_path, synthetic_dir, "--only", "dense128", "--seed", "2")) == 0
    (t,) = _baseline_trials(tmp_path)
    assert t.state == TrialState.COMPLETE and t.user_attrs["epochs_run"] == 1
    storage = st.default_storage(tmp_path / "res", "b")
    stored = optuna.load_study(study_name=baseline_study_name("b"), storage=storage)
    assert stored.user_attrs["protocol"] == protocol
    # The interim subset does not bind a study: another size is taken, as the search takes it.
    assert main(_args(tmp_path, synthetic_dir, "--only", "conv8_dense28",
                      "--interim-val-size", "10")) == 0
    assert len(_baseline_trials(tmp_path)) == 2


def test_baselines_serve_a_multi_objective_study(
    tmp_path: Path, synthetic_dir: Path, tiny_dataset: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Objectives and limits rank the main study's trials; a baseline's score is the same."""
    from fmnist_search.multiobjective import protocol_entries

    search = SearchProtocol(epochs=1, val_size=40, train_subset=None, seed=2)
    protocol = {**study_protocol(search, SearchSpace(), tiny_dataset),
                **protocol_entries(["accuracy", "params"], max_params=50_000)}
    st.open_study(st.default_storage(tmp_path / "res", "b"), "b",
                  optuna.samplers.RandomSampler(seed=0), optuna.pruners.NopPruner(), protocol,
                  directions=("maximize", "minimize"))
    assert main(_args(tmp_path, synthetic_dir, "--only", "dense128")) == 0, (
        capsys.readouterr().err)
    (t,) = _baseline_trials(tmp_path)
    assert t.state == TrialState.COMPLETE
    warnings: list[str] = []
    got = load_baseline_trials(st.default_storage(tmp_path / "res", "b"), "b",
                               warn=warnings.append)
    assert [g.user_attrs["baseline"] for g in got] == ["dense128"] and warnings == []


def test_baselines_bad_name_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["baselines", "--only", "dense128,nope", "--results-dir", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
    assert not (tmp_path / "r").exists()


def test_baselines_list_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["baselines", "--list", "--results-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BY_NAME) and not (tmp_path / "r").exists()


def test_baselines_bad_space_or_missing_data_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "space.yaml"
    bad.write_text("pooling: [max, median]\n")
    results = tmp_path / "r"
    common = ["baselines", "--only", "dense128", "--results-dir", str(results)]
    assert main([*common, "--space", str(bad)]) == 2
    assert main([*common, "--data-dir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "'pooling'" in err[0] and "nowhere" in err[1]
    assert not results.exists()


@pytest.mark.parametrize("limit", [None, 3, 0])
def test_warm_start_points_are_what_warm_start_enqueues(limit: int | None) -> None:
    # The CLI sizes TPE's startup by warm_start_points before the study is filled.
    study = optuna.create_study(direction="maximize")
    names = warm_start(study, SearchSpace(), limit=limit)
    points = warm_start_points(SearchSpace(), limit=limit)
    assert [name for name, _ in points] == names
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [p for _, p in points] == [t.system_attrs["fixed_params"] for t in waiting]


def test_warm_start_stops_at_the_budget() -> None:
    study = optuna.create_study(direction="maximize")
    assert len(warm_start(study, SearchSpace(), limit=3)) == 3
    assert len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) == 3
    assert warm_start(study, SearchSpace(), limit=0) == []
