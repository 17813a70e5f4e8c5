"""Several workers on one study (SQLite and PostgreSQL), killed workers, Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, cli_env, popen_cli, run_cli
from idx_utils import make_synthetic_idx_dir
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def slower_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that a trial runs for a few seconds (to be caught mid-trial)."""
    return make_synthetic_idx_dir(tmp_path_factory.mktemp("slow"), n_train=2000, n_test=60, seed=1)


def _check_exact(study: optuna.Study, n: int) -> None:
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(n)), [(t.number, t.state) for t in trials]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert all(t.value is not None for t in trials if t.state == TrialState.COMPLETE)


def _args(data: Path, results: Path, name: str, trials: int, *extra: str) -> list[str]:
    return [
        "--trials",
        str(trials),
        "--epochs",
        "1",
        "--data-dir",
        str(data),
        "--results-dir",
        str(results),
        "--study-name",
        name,
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize("workers", [2, 4])
def test_local_workers_on_default_storage(
    workers: int, synthetic_dir: Path, tmp_path: Path
) -> None:
    n = 2 * workers + 1
    r = run_cli(*_args(synthetic_dir, tmp_path, "w", n, "--workers", str(workers)))
    assert r.returncode == 0, r.stderr
    assert "database is locked" not in r.stderr
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{tmp_path / 'w' / 'study.db'}")
    _check_exact(study, n)
    assert r.stdout.count("Leaderboard") == 1  # shown once, by the parent
    for i in range(workers):
        assert "locked" not in (tmp_path / "w" / "logs" / f"worker-{i}.log").read_text()


def test_workers_run_their_parents_code(synthetic_dir: Path, tmp_path: Path) -> None:
    """Started from elsewhere, with another `fmnist_search` on the path, workers still
    import the parent's package (not the other one, and not nothing)."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    decoy = tmp_path / "decoy" / "fmnist_search"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy package was imported')\n")
    (decoy / "cli.py").write_text("")
    r = subprocess.run(
        [sys.executable, str(ROOT / "run_search.py"),
         *_args(synthetic_dir, tmp_path / "r", "w", 2, "--workers", "2")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=cli_env(PYTHONPATH=str(tmp_path / "decoy")),
    )
    assert r.returncode == 0, r.stderr
    for i in range(2):
        assert "decoy" not in (tmp_path / "r" / "w" / "logs" / f"worker-{i}.log").read_text()
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{tmp_path / 'r/w/study.db'}")
    _check_exact(study, 2)


@pytest.mark.parametrize("workers", [2, 4])
def test_local_workers_on_postgresql(
    workers: int, pg_url: str, synthetic_dir: Path, tmp_path: Path
) -> None:
    name = f"pgw-{uuid.uuid4().hex[:8]}"
    n = 2 * workers + 1
    r = run_cli(
        *_args(synthetic_dir, tmp_path, name, n, "--workers", str(workers), "--storage", pg_url)
    )
    assert r.returncode == 0, r.stderr
    _check_exact(optuna.load_study(study_name=name, storage=pg_url), n)
    assert "fmnist:fmnist@" not in r.stdout + r.stderr  # password never printed


def test_two_machines_share_the_budget(pg_url: str, synthetic_dir: Path, tmp_path: Path) -> None:
    """The same command on two 'machines' (separate processes) shares --trials."""
    name = f"pgm-{uuid.uuid4().hex[:8]}"
    first = run_cli(*_args(synthetic_dir, tmp_path / "a", name, 1, "--storage", pg_url))
    assert first.returncode == 0, first.stderr  # creates the study, like the first machine
    procs = [
        popen_cli(*_args(synthetic_dir, tmp_path / m, name, 7, "--storage", pg_url)) for m in "bc"
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _check_exact(optuna.load_study(study_name=name, storage=pg_url), 7)


def _schema_written(path: str) -> bool:
    """The SQLite file exists and Optuna has stamped its schema version (read-only look)."""
    if not Path(path).exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as c:
            return bool(c.execute("SELECT count(*) FROM alembic_version").fetchone()[0])
    except sqlite3.Error:
        return False


def _wait_for_objectives(db: str, name: str, proc: object, n: int, limit: float = 300) -> None:
    """Wait until `n` RUNNING trials have begun their objective (recorded their config)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()  # type: ignore[attr-defined]
        trials = optuna.load_study(study_name=name, storage=db).get_trials(deepcopy=False)
        if sum(t.state == TrialState.RUNNING and "config" in t.user_attrs
               for t in trials) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} trials were not caught in their objectives")


def _wait_for_running(
    db: str, name: str, proc: object, min_finished: int = 1, limit: float = 300
) -> int:
    deadline = time.monotonic() + limit
    storage = None  # one connection pool once the study exists: polls stay fast
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()  # type: ignore[attr-defined]
        try:
            # Open the storage only once the CLI has written the schema: opening it
            # earlier makes this poller write it too, and one of the two writers fails.
            if storage is None and (not db.startswith("sqlite") or _schema_written(db[10:])):
                storage = optuna.storages.RDBStorage(db)
            if storage is None:
                raise FileNotFoundError(db)
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except Exception:  # not created yet
            time.sleep(0.2)
            continue
        done = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if len(done) >= min_finished and running:
            return running[0].number
        time.sleep(0.1)
    raise AssertionError("no trial was caught running")


def _after_signal(proc: subprocess.Popen[str], limit: float = 120) -> tuple[str, str]:
    """The output of a search told to stop; on a hang, what it printed, not just a timeout."""
    try:
        return proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running {limit:.0f} s after the signal\n{out[-3000:]}\n{err[-3000:]}")


def _wait_for_heartbeat(db: str, name: str, number: int, limit: float = 60) -> None:
    """Waits until trial `number` of study `name` has a heartbeat recorded."""
    from fmnist_search import study as st

    storage = optuna.storages.RDBStorage(db)
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(name), number)
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if st.beaten_trials(storage, [trial_id]):
                return
            time.sleep(0.1)
    finally:
        storage.engine.dispose()
    raise AssertionError(f"trial {number} never recorded a heartbeat")


def test_sigkill_mid_trial_then_resume(slower_dir: Path, tmp_path: Path) -> None:
    args = [
        "--trials",
        "4",
        "--epochs",
        "3",
        "--data-dir",
        str(slower_dir),
        "--results-dir",
        str(tmp_path),
        "--study-name",
        "k",
        "--no-progress",
        "--pruner",
        "none",
        "--train-subset",
        "0",
    ]
    db = f"sqlite:///{tmp_path / 'k' / 'study.db'}"
    proc = popen_cli(*args)
    killed = _wait_for_running(db, "k", proc)
    before = {
        t.number: t.value
        for t in optuna.load_study(study_name="k", storage=db).trials
        if t.state == TrialState.COMPLETE
    }
    os.kill(proc.pid, signal.SIGKILL)  # a real kill -9
    proc.wait()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "interrupted" in r.stderr
    study = optuna.load_study(study_name="k", storage=db)
    trials = study.get_trials()
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and "interrupted" in dead.user_attrs["fail_reason"]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == dead.params  # retried, recorded as a retry
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    for number, value in before.items():
        assert trials[number].state == TrialState.COMPLETE and trials[number].value == value


def test_sigkill_of_one_postgres_worker_is_noticed_by_another(
    pg_url: str, slower_dir: Path, tmp_path: Path
) -> None:
    """With shared storage the heartbeat, not a restart, fails the dead worker's trial."""
    name = f"pgk-{uuid.uuid4().hex[:8]}"
    args = [
        "--trials",
        "5",
        "--epochs",
        "3",
        "--data-dir",
        str(slower_dir),
        "--storage",
        pg_url,
        "--study-name",
        name,
        "--no-progress",
        "--pruner",
        "none",
        "--train-subset",
        "0",
    ]
    hb = {"FMNIST_SEARCH_HEARTBEAT": "1,4"}
    victim = popen_cli(*args, "--results-dir", str(tmp_path / "a"), **hb)
    killed = _wait_for_running(pg_url, name, victim, min_finished=0)
    # Kill it only once the trial has beaten, so that this tests the heartbeat path (a trial
    # that never beat is failed by its age instead: test_study's never_beat tests).
    _wait_for_heartbeat(pg_url, name, killed)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    time.sleep(5)  # past the grace period
    other = run_cli(*args, "--results-dir", str(tmp_path / "b"), **hb)
    assert other.returncode == 0, other.stderr
    trials = optuna.load_study(study_name=name, storage=pg_url).get_trials()
    assert trials[killed].state == TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == killed for t in trials)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 5


def test_sigint_marks_trial_prints_leaderboard_exit_130(slower_dir: Path, tmp_path: Path) -> None:
    args = [
        "--trials",
        "3",
        "--epochs",
        "3",
        "--data-dir",
        str(slower_dir),
        "--results-dir",
        str(tmp_path),
        "--study-name",
        "i",
        "--no-progress",
        "--pruner",
        "none",
        "--train-subset",
        "0",
    ]
    db = f"sqlite:///{tmp_path / 'i' / 'study.db'}"
    proc = popen_cli(*args)
    stopped = _wait_for_running(db, "i", proc)
    proc.send_signal(signal.SIGINT)
    out, err = _after_signal(proc)
    assert proc.returncode == 130, err
    assert "Leaderboard" in out and "Traceback" not in err
    t = optuna.load_study(study_name="i", storage=db).get_trials()[stopped]
    assert t.state == TrialState.FAIL and "Ctrl-C" in t.user_attrs["fail_reason"]
    r = run_cli(*args)  # the same command continues
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="i", storage=db)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_parent_stops_its_workers(
    sig: signal.Signals, slower_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM is handled as Ctrl-C; a parent killed outright takes its workers with it
    (they would otherwise train on beside the next run's)."""
    import psutil

    args = _args(slower_dir, tmp_path, "t", 60, "--workers", "2", "--pruner", "none",
                 "--epochs", "3", "--train-subset", "0")
    db = f"sqlite:///{tmp_path / 't' / 'study.db'}"
    proc = popen_cli(*args)
    _wait_for_running(db, "t", proc, min_finished=0)
    # Both workers inside a trial's objective: a trial caught in the milliseconds between
    # its creation and its objective's start stays RUNNING until the next start fails it
    # by its age (test_study's never_beat tests), which is not what this test is about.
    _wait_for_objectives(db, "t", proc, 2)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    proc.send_signal(sig)
    out, err = _after_signal(proc)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, err
        assert "Leaderboard" in out and "Traceback" not in err
    _, alive = psutil.wait_procs(workers, timeout=90)
    assert not alive, "workers outlived their parent"
    trials = optuna.load_study(study_name="t", storage=db).get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert any("interrupted" in t.user_attrs.get("fail_reason", "") for t in trials)
    assert len([t for t in trials if t.state.is_finished()]) < 60


def test_a_background_search_stops_its_workers(slower_dir: Path, tmp_path: Path) -> None:
    """Started with `cmd &`, a search has SIGINT ignored, and so have its workers: told to
    stop with SIGINT, they trained on until the parent killed them, trials left RUNNING."""
    import psutil

    args = _args(slower_dir, tmp_path, "b", 60, "--workers", "2", "--pruner", "none",
                 "--epochs", "3", "--train-subset", "0")
    db = f"sqlite:///{tmp_path / 'b' / 'study.db'}"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_search.py"), *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _wait_for_running(db, "b", proc, min_finished=0)
    _wait_for_objectives(db, "b", proc, 2)
    workers = psutil.Process(proc.pid).children()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = _after_signal(proc)
    assert proc.returncode == 130, err
    _, alive = psutil.wait_procs(workers, timeout=90)
    assert not alive
    # Within a batch or so, not after the parent's 60-s wait for them.
    assert time.monotonic() - start < 45, err
    trials = optuna.load_study(study_name="b", storage=db).get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials
                if "interrupted" in t.user_attrs.get("fail_reason", "")]) == 2


def test_storage_errors_are_one_line_without_password(
    synthetic_dir: Path, tmp_path: Path, pg_url: str
) -> None:
    bad_pw = pg_url.replace("fmnist:fmnist@", "fmnist:wrongpass@")
    r = run_cli(*_args(synthetic_dir, tmp_path, "s", 1, "--storage", bad_pw))
    assert r.returncode == 1
    assert "wrongpass" not in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # before the data are even read
    assert r.stderr.startswith("error: cannot open storage postgresql://fmnist:***@")
    unreachable = "postgresql://u:secret@127.0.0.1:1/db"
    r = run_cli(*_args(synthetic_dir, tmp_path, "s", 1, "--storage", unreachable))
    assert r.returncode == 1 and "secret" not in r.stderr and "Traceback" not in r.stderr


def test_results_dir_that_cannot_be_made_is_one_line(synthetic_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    r = run_cli(*_args(synthetic_dir, tmp_path / "a_file", "s", 1))
    assert r.returncode == 1, r.stderr
    # Nothing was stored, so no "rerun to continue" (the line before is the synthetic
    # data's checksum warning).
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot create {tmp_path / 'a_file' / 's'}: Not a directory"
    assert "Traceback" not in r.stderr


def test_disk_full_during_search_keeps_the_study(
    synthetic_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SQLite's "database or disk is full": one line, exit 1, the study still opens."""
    import sqlalchemy

    from fmnist_search import study as st
    from fmnist_search.cli import main

    args = [
        "--trials",
        "2",
        "--epochs",
        "1",
        "--data-dir",
        str(synthetic_dir),
        "--results-dir",
        str(tmp_path),
        "--study-name",
        "full",
        "--no-progress",
        "--no-export",
    ]
    assert main(args) == 0
    real = st.make_storage

    def tiny_disk(url: str) -> optuna.storages.BaseStorage:
        storage = real(url)
        engine = storage.engine  # type: ignore[attr-defined]

        @sqlalchemy.event.listens_for(engine, "connect")
        def _cap(conn, _record):  # type: ignore[no-untyped-def]
            # The database may not grow any more: what a full disk looks like to SQLite.
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")

        engine.dispose()
        return storage

    monkeypatch.setattr(st, "make_storage", tiny_disk)
    # In this process (--recycle-after 0), where the storage is patched.
    code = main([*args[:1], "40", *args[2:], "--recycle-after", "0"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "full" in err and "Traceback" not in err
    monkeypatch.undo()
    study = optuna.load_study(study_name="full", storage=st.default_storage(tmp_path, "full"))
    assert (
        sum(t.state == TrialState.COMPLETE or t.state == TrialState.PRUNED for t in study.trials)
        >= 2
    )


def test_recycled_worker_processes_finish_the_budget(synthetic_dir: Path, tmp_path: Path) -> None:
    """--recycle-after bounds a process's trials (and so TensorFlow's memory); none is lost."""
    r = run_cli(
        *_args(synthetic_dir, tmp_path, "rc", 5, "--recycle-after", "2", "--workers", "1"),
        "--no-export",
    )
    assert r.returncode == 0, r.stderr
    assert "restarted 2 time(s)" in r.stderr  # 2 + 2 + 1 trials in three processes
    study = optuna.load_study(study_name="rc", storage=f"sqlite:///{tmp_path / 'rc' / 'study.db'}")
    _check_exact(study, 5)


@pytest.mark.parametrize(
    ("argv", "done", "expected"),
    [
        (["--trials", "50"], 0, True),  # the default run: 50 trials left > 25 per process
        (["--trials", "50"], 30, False),  # 20 left: one process is enough
        (["--trials", "25"], 0, False),
        (["--trials", "50", "--recycle-after", "0"], 0, False),
        (["--trials", "5", "--recycle-after", "2"], 0, True),
        (["--trials", "2", "--workers", "2"], 0, True),
        (["--trials", "50", "--engine", "keras-tuner"], 0, False),
    ],
)
def test_when_trials_run_in_worker_processes(argv: list[str], done: int, expected: bool) -> None:
    """No process trains more than --recycle-after models (TensorFlow keeps their memory)."""
    from fmnist_search.cli import build_parser, uses_worker_processes

    args = build_parser("search").parse_args(argv)
    assert uses_worker_processes(args, done) is expected


def test_recycle_after_zero_needs_one_worker(tmp_path: Path) -> None:
    r = run_cli("--workers", "2", "--recycle-after", "0", "--results-dir", str(tmp_path))
    assert r.returncode == 2 and "--recycle-after 0" in r.stderr
    assert not any(tmp_path.iterdir())


def test_augment_needs_the_final_fit(tmp_path: Path) -> None:
    r = run_cli("--augment", "--no-final-fit", "--results-dir", str(tmp_path))
    assert r.returncode == 2 and "--augment and --no-final-fit" in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "done", "cores", "expected"),
    [
        (["--trials", "50"], 0, 2, 2),  # a long search: one single-threaded worker per core
        (["--trials", "50"], 0, 16, 4),  # capped: each worker holds the data and TensorFlow
        (["--trials", "50"], 30, 2, 1),  # 20 left: not worth starting processes
        (["--trials", "10"], 0, 2, 1),
        (["--trials", "50", "--workers", "3"], 0, 2, 3),
        (["--trials", "50", "--recycle-after", "0"], 0, 2, 1),
        (["--trials", "50", "--engine", "keras-tuner"], 0, 2, 1),
    ],
)
def test_default_workers(
    argv: list[str], done: int, cores: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmnist_search.cli import build_parser, resolve_workers

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert resolve_workers(build_parser("search").parse_args(argv), done) == expected
