"""A stop request is remembered, so a KeyboardInterrupt that library code swallows still
stops the training and the search."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from fmnist_search import stop
from fmnist_search import study as st
from fmnist_search.training import fit_config
from searchspace import CnnConfig, ConvBlock, ConvLayer


def _swallowed(sig: int = signal.SIGTERM) -> None:
    """A signal whose KeyboardInterrupt library code catches and drops."""
    try:
        signal.raise_signal(sig)
    except KeyboardInterrupt:
        pass


def test_handled_here_raises_remembers_and_restores() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop.handled_here():
        assert not stop.asked()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        assert stop.asked()
        with pytest.raises(KeyboardInterrupt):
            stop.raise_if_asked()
    assert not stop.asked()  # forgotten: the next command starts afresh
    assert {s: signal.getsignal(s) for s in before} == before
    stop.raise_if_asked()  # nothing asked: no raise


def test_an_ignored_ctrl_c_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop.handled_here():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # ignored: nothing raised, nothing asked
            assert not stop.asked()
            assert signal.getsignal(signal.SIGTERM) is stop.ask
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_swallowed_interrupt_stops_the_training_at_the_next_batch() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    cfg = CnnConfig(blocks=(ConvBlock(convs=(ConvLayer(4, 3),)),), batch_size=16)
    batches: list[int] = []
    with stop.handled_here():
        _swallowed()
        with pytest.raises(KeyboardInterrupt):
            fit_config(cfg, x, y, None, None, epochs=2, seed=0,
                       on_batch=lambda b, n: batches.append(b))
    assert batches == []  # stopped before the first batch's progress


def test_a_swallowed_interrupt_starts_no_other_trial(tmp_path: Path) -> None:
    """A worker lost its parent's SIGINT inside a trial and trained eleven more."""
    study = st.open_study(st.default_storage(tmp_path, "s"), "s", st.make_sampler("tpe", 0),
                          st.make_pruner("none", 1), {"epochs": 1})
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        # SIGTERM: a test run started in the background has SIGINT ignored.
        _swallowed(signal.SIGTERM)
        return 0.5

    with stop.handled_here(), pytest.raises(KeyboardInterrupt):
        st.run_trials(study, objective, 5)
    assert ran == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_interrupt_within_follows_causes_and_contexts() -> None:
    assert stop.interrupt_within(KeyboardInterrupt())
    assert not stop.interrupt_within(SystemError("plain"))
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OSError("while cleaning up")  # noqa: B904 (implicit context on purpose)
    except OSError as e:
        assert stop.interrupt_within(e)
    cyclic = ValueError("a")
    cyclic.__context__ = ValueError("b")
    cyclic.__context__.__context__ = cyclic
    assert not stop.interrupt_within(cyclic)


def test_a_signal_held_during_a_storage_call_is_remembered() -> None:
    with stop.handled_here():
        with pytest.raises(KeyboardInterrupt), st.uninterrupted():
            signal.raise_signal(signal.SIGTERM)  # held until the block ends...
            assert stop.asked()  # ...and remembered at once
    stop.remember()  # outside `handled_here` nobody checks it: not recorded
    assert not stop.asked()
