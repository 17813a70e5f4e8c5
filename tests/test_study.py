"""Study plumbing: total-trial semantics, resume, protocol guard, names and URLs."""

from __future__ import annotations

import gc
import signal
import time
import uuid
import weakref
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from fmnist_search import study as st

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _quick(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0, 1)
    trial.report(x, 1)
    return x


def _open(url: str, protocol: dict | None = None) -> optuna.Study:
    return st.open_study(
        url, "s", st.make_sampler("tpe", 0), st.make_pruner("none", 1), protocol or {"epochs": 1}
    )


def test_trials_means_total_finished_across_runs(tmp_path: Path) -> None:
    url = st.default_storage(tmp_path, "s")
    run1 = _open(url)
    st.run_trials(run1, _quick, 3)
    assert st.count_finished(run1) == 3
    run2 = _open(url)  # the same command again: continue, not restart
    st.run_trials(run2, _quick, 5)
    assert st.count_finished(run2) == 5
    st.run_trials(_open(url), _quick, 5)  # already done: nothing new
    trials = _open(url).get_trials()
    assert [t.number for t in trials] == list(range(5))
    assert (tmp_path / "s" / "study.db").exists()


class _Cycle:
    """An object in a reference cycle: only the garbage collector can free it."""

    def __init__(self) -> None:
        self.me = self


def test_trials_run_on_a_settled_heap_and_leave_it_collectable(tmp_path: Path) -> None:
    """Objects alive before the trials are frozen during them (cheap collections), and
    collectable again afterwards; garbage the trials make is still collected."""
    seen: dict[str, int] = {}

    def objective(trial: optuna.Trial) -> float:
        seen["frozen"] = gc.get_freeze_count()
        made = weakref.ref(_Cycle())
        gc.collect()
        seen["made_freed"] = made() is None
        return trial.suggest_float("x", 0, 1)

    old2 = _Cycle()  # alive while the trials run
    old2_ref = weakref.ref(old2)
    study = _open(st.default_storage(tmp_path, "s"))
    st.run_trials(study, objective, 1)
    assert seen["frozen"] > 1000 and seen["made_freed"]
    assert gc.get_freeze_count() == 0
    del old2  # frozen during the trials, garbage now: collectable once they are over
    gc.collect()
    assert old2_ref() is None


def test_settled_heap_nests() -> None:
    with st.settled_heap():
        frozen = gc.get_freeze_count()
        with st.settled_heap():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen  # the inner one did not unfreeze
    assert gc.get_freeze_count() == 0


def test_failed_trials_are_replaced(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(trial: optuna.Trial) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return trial.suggest_float("x", 0, 1)

    study = _open(st.default_storage(tmp_path, "s"))
    st.run_trials(study, flaky, 3)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1


def test_protocol_change_is_refused(tmp_path: Path) -> None:
    url = st.default_storage(tmp_path, "s")
    _open(url, {"epochs": 1, "seed": 0})
    with pytest.raises(st.StudyError, match="epochs"):
        _open(url, {"epochs": 2, "seed": 0})


def test_interim_validation_size_may_change_but_not_the_score(tmp_path: Path) -> None:
    from fmnist_search.objective import SearchProtocol

    url = st.default_storage(tmp_path, "s")
    _open(url, SearchProtocol(interim_val_size=2000).to_dict())
    # Another interim subset (or the KerasTuner engine's 0) continues the study.
    study = _open(url, SearchProtocol(interim_val_size=0).to_dict())
    assert study.user_attrs["protocol"]["interim_val_size"] == 2000
    # A study stored by a version that scored trials at their best epoch is not continued.
    old = SearchProtocol().to_dict()
    del old["score"]
    url2 = st.default_storage(tmp_path, "old")
    st.open_study(url2, "old", st.make_sampler("tpe", 0), st.make_pruner("none", 1), old)
    with pytest.raises(st.StudyError, match="older version.*best epoch.*new --study-name"):
        st.open_study(url2, "old", st.make_sampler("tpe", 0), st.make_pruner("none", 1),
                      SearchProtocol().to_dict())


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt here, as in a terminal; a test run started in the
    background (CI) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_inside_a_storage_read_waits_for_it(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a SQLite read arrives once the call returns. Cut there, the
    read kept its shared lock (alive in the traceback) and every write that recorded the
    interrupted trial waited out the busy timeout: a CI run hung after Ctrl-C."""
    from sqlalchemy import event

    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = st.make_storage(url)
    study = optuna.create_study(storage=storage, study_name="u")
    for _ in range(3):
        study.tell(study.ask(), 1.0)
    fired: list[str] = []

    @event.listens_for(storage.engine, "after_cursor_execute")  # type: ignore[attr-defined]
    def ctrl_c(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if not fired and statement.lstrip().upper().startswith("SELECT"):
            fired.append(statement)  # the statement has run; its rows are not read yet
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as kept:  # kept: its traceback stays alive
        storage.get_all_trials(study._study_id)
    assert fired and kept.value is not None
    other = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 2}})
    start = time.monotonic()
    other.set_study_user_attr(study._study_id, "written", True)  # not "database is locked"
    assert time.monotonic() - start < 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


@pytest.mark.usefixtures("sigint_raises")
def test_a_second_ctrl_c_does_not_wait() -> None:
    """A storage call that hangs must not trap the user: the second Ctrl-C goes through."""
    reached = []
    with pytest.raises(KeyboardInterrupt), st.uninterrupted():
        signal.raise_signal(signal.SIGINT)
        reached.append("after the first")
        signal.raise_signal(signal.SIGINT)
        reached.append("after the second")
    assert reached == ["after the first"]


def test_an_ignored_ctrl_c_stays_ignored() -> None:
    """A search started in the background ignores the terminal's Ctrl-C, even twice."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with st.uninterrupted():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    except KeyboardInterrupt:  # not re-raised: pytest would take it as the user's Ctrl-C
        pytest.fail("an ignored Ctrl-C interrupted")
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_while_a_trial_is_recorded_waits_for_the_record(tmp_path: Path) -> None:
    """Ctrl-C inside Optuna's bookkeeping after the objective returned (here, the UPDATE
    that completes the trial) arrives once the trial is recorded: cut there, Optuna
    raised UnboundLocalError (a traceback instead of exit 130) and left the trial RUNNING."""
    from sqlalchemy import event

    study = _open(st.default_storage(tmp_path, "s"))
    fired: list[str] = []

    @event.listens_for(study._storage._backend.engine, "after_cursor_execute")  # type: ignore[attr-defined]
    def ctrl_c(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if not fired and statement.startswith("UPDATE trials SET state"):
            fired.append(statement)
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        st.run_trials(study, _quick, 3)
    assert fired
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_held_back_reaches_the_objective_at_its_start() -> None:
    """Held while Optuna prepares a trial, Ctrl-C is raised as the objective begins, so the
    trial is failed as interrupted rather than trained."""
    ran = []
    with st.uninterrupted():
        signal.raise_signal(signal.SIGINT)  # held
        with pytest.raises(KeyboardInterrupt), st.interruptible():
            ran.append("objective")
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # held again
    assert ran == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_before_the_objective_fails_the_trial_as_interrupted(tmp_path: Path) -> None:
    study = _open(st.default_storage(tmp_path, "s"))
    st.run_trials(study, _quick, 1)

    def objective(trial: optuna.Trial) -> float:
        raise AssertionError("trained after Ctrl-C")

    from sqlalchemy import event

    fired: list[str] = []

    @event.listens_for(study._storage._backend.engine, "after_cursor_execute")  # type: ignore[attr-defined]
    def ctrl_c(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if not fired and statement.startswith("INSERT INTO trials "):  # study.ask()
            fired.append(statement)
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        st.run_trials(study, objective, 3)
    assert fired
    last = study.get_trials()[-1]
    assert last.state == TrialState.FAIL and "Ctrl-C" in last.user_attrs["fail_reason"]


def test_ctrl_c_that_c_code_turned_into_system_error_stops_the_search(tmp_path: Path) -> None:
    """A signal handled inside TensorFlow's C code can surface as `SystemError: ...
    returned a result with an exception set`, caused by the KeyboardInterrupt. Taken as a
    crash, the trial failed as one and the worker started the next trial, which its
    parent then killed mid-way (left RUNNING): it must stop the search as Ctrl-C does."""
    study = _open(st.default_storage(tmp_path, "s"))
    calls = []

    def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:  # what CPython's C-call result check does
            raise SystemError(
                "<built-in function __import__> returned a result with an exception set"
            ) from e

    with pytest.raises(KeyboardInterrupt):
        st.run_trials(study, objective, 3)
    assert calls == [0]
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "interrupted (Ctrl-C)"


def test_stale_running_trial_is_failed(tmp_path: Path) -> None:
    study = _open(st.default_storage(tmp_path, "s"))
    study.ask()  # left RUNNING, as by a killed process
    assert st.fail_stale_trials(study) == [0]
    t = study.get_trials()[0]
    assert t.state == TrialState.FAIL and "interrupted" in t.user_attrs["fail_reason"]


def _running_trial(study: optuna.Study, age_s: float) -> int:
    """A RUNNING trial (x = 0.5) started `age_s` ago, without a heartbeat; its id."""
    t = optuna.trial.create_trial(state=TrialState.RUNNING, params={"x": 0.5},
                                  distributions={"x": FloatDistribution(0, 1)})
    t.datetime_start = datetime.now() - timedelta(seconds=age_s)
    return study._storage.create_new_trial(study._study_id, template_trial=t)


@pytest.mark.parametrize("where", ["sqlite", "postgresql"])
def test_trial_that_never_beat_is_failed_and_retried(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A worker killed between creating its trial and the first heartbeat: Optuna never
    calls that trial stale, so without this it would hold a place in the budget for good."""
    if where == "sqlite":
        url = f"sqlite:///{tmp_path / 's.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    study = st.open_study(url, f"silent-{uuid.uuid4().hex[:8]}", st.make_sampler("tpe", 0),
                          st.make_pruner("none", 1), {"epochs": 1})
    storage = study._storage

    def running(age_s: float, beat: bool) -> int:
        trial_id = _running_trial(study, age_s)
        if beat:
            storage.record_heartbeat(trial_id)
        return storage.get_trial(trial_id).number

    old = 2 * st.GRACE_PERIOD
    silent, alive, young = running(old, beat=False), running(old, beat=True), running(1, False)
    assert st.fail_silent_trials(study) == [silent]
    trials = study.get_trials()
    assert trials[silent].state == TrialState.FAIL
    assert trials[silent].user_attrs["fail_reason"] == "worker died before its first heartbeat"
    assert trials[alive].state == trials[young].state == TrialState.RUNNING
    assert st.fail_silent_trials(study) == []  # once only
    # The retry runs with the silent trial's parameters.
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == silent]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == {"x": 0.5}


def test_search_frees_the_place_of_a_trial_that_never_beat(tmp_path: Path) -> None:
    study = _open(f"sqlite:///{tmp_path / 's.db'}")
    _running_trial(study, 2 * st.GRACE_PERIOD)
    st.run_trials(study, _quick, 2)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert st.count_finished(study) == 2  # the dead trial no longer holds a place
    assert any(t.system_attrs.get("failed_trial") == 0 for t in trials[1:])


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".hidden", "a\x00b", "", "x" * 101])
def test_bad_study_names(name: str) -> None:
    with pytest.raises(ValueError):
        st.check_study_name(name)


def test_study_dir_stays_inside(tmp_path: Path) -> None:
    assert st.study_dir(tmp_path, "ok-name_1.2") == (tmp_path / "ok-name_1.2").resolve()


@pytest.mark.parametrize("url", ["redis://x", "foo", "file:///tmp/x", "http://h/db"])
def test_unsupported_storage(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        st.check_storage_url(url)


def test_password_redacted() -> None:
    assert st.redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"


@pytest.mark.parametrize("name", st.SAMPLERS)
def test_samplers(name: str) -> None:
    assert st.make_sampler(name, 1) is not None


def test_tpe_draws_its_random_trials_after_the_enqueued_points() -> None:
    # Counted as TPE's startup, the warm start's points would leave it 2 random trials of 10.
    assert st.make_sampler("tpe", 1)._n_startup_trials == st.TPE_RANDOM_TRIALS  # type: ignore[attr-defined]
    warm = st.make_sampler("tpe", 1, enqueued=8)
    assert warm._n_startup_trials == st.TPE_RANDOM_TRIALS + 8  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", st.PRUNERS)
def test_pruners(name: str) -> None:
    assert st.make_pruner(name, 6) is not None


def test_ctrl_c_while_the_heartbeat_starts_leaves_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C inside Optuna's heartbeat `with` entry: its exit never runs, so its non-daemon
    thread would keep the process alive for good and the trial would stay RUNNING."""
    import optuna.storages._heartbeat as hb

    started = hb.HeartbeatThread.start

    def start_then_ctrl_c(self: hb.HeartbeatThread) -> None:
        started(self)  # the thread runs...
        raise KeyboardInterrupt  # ...and Ctrl-C arrives before the trial's block begins

    monkeypatch.setattr(hb.HeartbeatThread, "start", start_then_ctrl_c)
    study = _open(st.default_storage(tmp_path, "s"))
    try:
        with pytest.raises(KeyboardInterrupt):
            st.run_trials(study, _quick, 2)
        assert not st._heartbeat_threads()
        t = study.get_trials()[0]
        assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    finally:
        for _, _, stop in st._heartbeat_threads():  # never leave pytest unable to exit
            stop.set()


def test_process_seed_keeps_fresh_searches_and_varies_resumed_ones() -> None:
    from fmnist_search.study import process_seed

    assert process_seed(3, 0, 0) == 3  # a fresh search's first worker: --seed itself
    fresh = {process_seed(s, i, 0) for s in range(4) for i in range(3)}
    assert len(fresh) == 12  # neighbouring seeds' workers draw apart (seed + index did not)
    resumed = {process_seed(3, i, n) for i in range(3) for n in (1, 2, 25, 50)}
    assert len(resumed) == 12 and not resumed & fresh
    assert process_seed(3, 1, 25) == process_seed(3, 1, 25)  # fixed by --seed and the history
