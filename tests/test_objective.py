"""The objective on tiny synthetic data: scores, pruning, K-fold, failures, stored attributes."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from fmnist_search.data import Dataset
from fmnist_search.objective import Objective, SearchProtocol, make_folds
from fmnist_search.study import run_trials
from searchspace import CnnConfig, ConvBlock, ConvLayer, DenseLayer, SearchSpace, space_from_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL = space_from_dict(
    {
        "n_blocks": [1, 1],
        "filters": [8],
        "dense_layers": [0, 0],
        "optimizer": ["adam"],
        "learning_rate": {"low": 0.003, "high": 0.01, "log": True},
        "batch_size": [32],
    }
)
TINY_CFG = CnnConfig(
    blocks=(ConvBlock(convs=(ConvLayer(8, 3),)),),
    dense=(DenseLayer(16),),
    batch_size=32,
    learning_rate=0.005,
)


class _PruneAtStep(optuna.pruners.BasePruner):
    def __init__(self, step: int) -> None:
        self.step = step

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.last_step is not None and trial.last_step >= self.step


def _study(pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    return optuna.create_study(
        direction="maximize",
        pruner=pruner or optuna.pruners.NopPruner(),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )


def test_holdout_trial_completes_with_attributes(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=2, seed=1)
    folds = make_folds(tiny_dataset, protocol)
    assert len(folds.splits) == 1
    tr, va = folds.splits[0]
    assert not set(tr) & set(va)
    study = _study()
    study.optimize(Objective(folds, SMALL, protocol), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and 0.0 <= t.value <= 1.0
    ua = t.user_attrs
    assert ua["epochs_run"] == 2 and ua["params"] > 0 and ua["wall_time"] > 0
    assert CnnConfig.from_json(ua["config"]).blocks[0].convs[0].filters == 8
    hist = json.loads(ua["history"])
    assert len(hist) == 1 and len(hist[0]["val_accuracy"]) == 2
    assert sorted(t.intermediate_values) == [1, 2]
    # Fewer validation images than the interim subset: every image after every epoch.
    assert t.value == pytest.approx(hist[0]["val_accuracy"][-1], abs=1e-5)


def test_interim_subset_changes_what_is_validated_not_the_score(tiny_dataset: Dataset) -> None:
    """Epochs before the last are scored on the subset; the score is every validation
    image after the last epoch, the same as validating everything every epoch."""
    scores = {}
    for n in (0, 12):
        protocol = SearchProtocol(epochs=2, seed=1, interim_val_size=n)
        folds = make_folds(tiny_dataset, protocol)
        # A median pruner may read any step, so every epoch is validated (it never prunes
        # here: it waits for 100 finished trials).
        study = _study(optuna.pruners.MedianPruner(n_startup_trials=100))
        study.optimize(Objective(folds, SMALL, protocol, config_fn=lambda t: TINY_CFG), n_trials=1)
        t = study.trials[0]
        assert t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == [1, 2]
        hist = json.loads(t.user_attrs["history"])[0]
        assert len(hist["val_accuracy"]) == len(hist["val_loss"]) == 2
        scores[n] = (t.value, hist["val_accuracy"], t.intermediate_values)
    n_val = len(folds.splits[0][1])
    assert n_val > 12
    assert scores[12][0] == pytest.approx(scores[0][0], abs=1e-6)
    # The subset's scores are multiples of 1/12; the whole set's of 1/n_val.
    for acc in scores[12][1]:
        assert acc * 12 == pytest.approx(round(acc * 12), abs=1e-4)
    assert scores[12][2][2] == pytest.approx(scores[12][1][-1], abs=1e-6)
    assert scores[0][2][2] == pytest.approx(scores[0][0], abs=1e-6)


@pytest.mark.parametrize(
    ("pruner", "cv", "reported", "validated"),
    [
        # (Hyperband: per bracket, below.)
        (optuna.pruners.NopPruner(), 0, [3], [[False, False, True]]),
        # Two folds of 3 epochs: steps 1..6; the rungs 1 and 3 fall in the first fold, and
        # each fold's last epoch is validated (on every image) anyway.
        (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
         2, [1, 3, 6], [[True, False, True], [False, False, True]]),
    ],
)
def test_only_the_epochs_the_pruner_reads_are_validated(
    tiny_dataset: Dataset, pruner: optuna.pruners.BasePruner, cv: int, reported: list[int],
    validated: list[list[bool]],
) -> None:
    protocol = SearchProtocol(epochs=3, cv=cv, seed=1, interim_val_size=12)
    folds = make_folds(tiny_dataset, protocol)
    study = _study(pruner)
    study.optimize(Objective(folds, SMALL, protocol, config_fn=lambda t: TINY_CFG), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and sorted(t.intermediate_values) == reported
    hist = json.loads(t.user_attrs["history"])
    assert [[v == v for v in f["val_accuracy"]] for f in hist] == validated  # NaN != NaN
    assert [len(f["loss"]) for f in hist] == [3] * len(validated)
    # Only validated epochs can be a peak; with none before the last, the last it is.
    assert t.user_attrs["best_epoch"] in ({1, 3} if any(validated[0][:-1]) else {3})
    assert 0.0 <= t.value <= 1.0


def test_hyperband_trials_validate_the_rungs_of_their_own_bracket(tiny_dataset: Dataset) -> None:
    """Over 3 steps, bracket 0's rungs are steps 1 and 3 and bracket 1's step 3 alone (the
    last, never pruned): only bracket 0 trials validate an epoch before the last."""
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=3, reduction_factor=3)
    protocol = SearchProtocol(epochs=3, seed=1, interim_val_size=12)
    study = optuna.create_study(study_name="brackets", direction="maximize", pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    objective = Objective(make_folds(tiny_dataset, protocol), SMALL, protocol,
                          config_fn=lambda t: TINY_CFG)
    study.optimize(objective, n_trials=5)
    brackets = set()
    for t in study.trials:
        bracket = pruner._get_bracket_id(study, t)
        brackets.add(bracket)
        validated = [v == v for v in json.loads(t.user_attrs["history"])[0]["val_accuracy"]]
        assert validated[-1] and not any(validated[1:-1])  # epoch 2 never
        if bracket == 0:
            assert validated[0] and min(t.intermediate_values) == 1
        else:
            assert validated == [False, False, True] and sorted(t.intermediate_values) == [3]
    assert brackets == {0, 1}


def test_pruned_trial_stops_and_records(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=3)
    study = _study(_PruneAtStep(1))
    study.optimize(Objective(make_folds(tiny_dataset, protocol), SMALL, protocol), n_trials=2)
    for t in study.trials:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["epochs_run"] == 1 and t.user_attrs["pruned_at_step"] == 1


def test_real_pruner_prunes_some_trials(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=3, seed=0)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    space = space_from_dict(
        {
            "n_blocks": [1, 1],
            "filters": [8],
            "dense_layers": [0, 0],
            "learning_rate": {"low": 1e-5, "high": 1e-2, "log": True},
        }
    )
    study.optimize(Objective(make_folds(tiny_dataset, protocol), space, protocol), n_trials=6)
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states


def test_kfold_reports_running_score_and_records_mean_std(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=2, cv=3)
    folds = make_folds(tiny_dataset, protocol)
    assert len(folds.splits) == 3
    study = _study()
    study.optimize(Objective(folds, SMALL, protocol), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE
    assert sorted(t.intermediate_values) == list(range(1, 7))
    scores = t.user_attrs["fold_scores"]
    assert len(scores) == 3
    assert t.value == pytest.approx(np.mean(scores), abs=1e-5)
    assert t.user_attrs["val_accuracy_std"] == pytest.approx(np.std(scores), abs=1e-5)
    # The last step reports the cross-fold mean itself: same scale as the final value.
    assert t.intermediate_values[6] == pytest.approx(t.value, abs=1e-5)


def test_nan_loss_fails_trial_with_reason(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=2)
    folds = make_folds(tiny_dataset, protocol)
    folds.x = folds.x.copy()
    folds.x[:, 0, 0, 0] = np.nan  # every batch sees a NaN pixel
    study = _study()
    with pytest.raises(Exception, match="failed trials in a row"):
        run_trials(study, Objective(folds, SMALL, protocol), 1, max_consecutive_failures=2)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("diverged" in t.user_attrs["fail_reason"] for t in study.trials)
    assert study.trials[0].user_attrs["epochs_run"] == 0


def test_invalid_config_recorded_and_search_goes_on(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=1)
    bad = CnnConfig(
        blocks=tuple(ConvBlock(convs=(ConvLayer(4, 7, padding="valid"),)) for _ in range(3))
    )

    def config_fn(trial: optuna.trial.BaseTrial) -> CnnConfig:
        return bad if trial.number == 0 else TINY_CFG

    study = _study()
    run_trials(
        study,
        Objective(make_folds(tiny_dataset, protocol), SearchSpace(), protocol, config_fn=config_fn),
        1,
    )
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "collapses" in study.trials[0].user_attrs["fail_reason"]


def test_same_seed_same_score(tiny_dataset: Dataset) -> None:
    protocol = SearchProtocol(epochs=1, seed=5)
    values = []
    for _ in range(2):
        study = _study()
        study.optimize(Objective(make_folds(tiny_dataset, protocol), SMALL, protocol), n_trials=1)
        values.append((study.trials[0].params, study.trials[0].value))
    assert values[0] == values[1]
