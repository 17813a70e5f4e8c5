"""Local worker processes on one study, watched by the parent that shows progress once.

Workers coordinate only through the Optuna storage (and `study.TrialLock`): the same
mechanism that lets several machines share one PostgreSQL study.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

from . import stop
from .progress import SearchProgress


def default_threads(workers: int) -> int:
    """CPU threads each worker may use: the machine's cores shared evenly."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def set_threads(threads: int) -> None:
    """Limit TensorFlow to `threads` CPU threads (must run before its first op)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # already initialised (in-process tests): keep its setting


# A worker's exit code meaning "I ran my --recycle-after trials; start a fresh me".
EXIT_RECYCLE = 75


class Workers:
    """The worker processes of one search: started, restarted when they recycle, watched."""

    def __init__(self, argv: Sequence[str], threads: int, log_dir: Path) -> None:
        self.argv = list(argv)
        self.threads = threads
        self.log_dir = log_dir
        self.restarts = 0

    def start(self, index: int) -> subprocess.Popen[bytes]:
        """Start worker `index` as `python -m fmnist_search.cli ARGV --worker-index i`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"worker-{index}.log", "ab") as log:
            cmd = [
                sys.executable,
                "-m",
                "fmnist_search.cli",
                *self.argv,
                "--worker-index",
                str(index),
                "--threads",
                str(self.threads),
            ]
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env())


def worker_env() -> dict[str, str]:
    """This environment, with the directory this package was imported from first on the path.

    Workers then run the very code of their parent: started from a checkout that is not
    installed (`python path/to/run_search.py` from elsewhere), `-m fmnist_search.cli` would
    otherwise fail, or import another, installed copy of the package.
    """
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


PARENT_PID_ENV = "FMNIST_SEARCH_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """In a worker: have Linux send SIGTERM (handled as Ctrl-C) when the parent dies.

    A parent killed outright (SIGKILL, a crash) would otherwise leave its workers training
    on, and a rerun would start new ones beside them. Raises KeyboardInterrupt if the
    parent is already gone; does nothing where prctl is missing (not Linux).
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the request was made
        raise KeyboardInterrupt


def watch(
    study: optuna.Study,
    procs: list[subprocess.Popen[bytes]],
    sink: SearchProgress,
    pool: Workers | None = None,
) -> list[int]:
    """Show the study's progress from its storage until every worker has exited.

    A worker that exits with EXIT_RECYCLE (it ran its share of trials in one process, and
    TensorFlow's memory only comes back when a process ends) is started afresh. Ctrl-C is
    forwarded to the workers, as SIGTERM (each marks its running trial failed and stops).
    Returns the workers' exit codes.
    """
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    try:
        while any(p.poll() is None for p in procs) or any(
            p.returncode == EXIT_RECYCLE for p in procs
        ):
            for i, p in enumerate(procs):
                if p.poll() == EXIT_RECYCLE and pool is not None:
                    procs[i] = pool.start(i)
                    pool.restarts += 1
            time.sleep(1.0)
            _show(study, seen, sink)
            stop.raise_if_asked()
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                # SIGTERM, not SIGINT: a search started in the background (`cmd &`) has
                # SIGINT ignored, and its workers inherit that; SIGTERM is handled as
                # Ctrl-C in every worker (`stop.handled_here`).
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        _show(study, seen, sink)
        raise
    _show(study, seen, sink)
    return [p.returncode for p in procs]


def _show(study: optuna.Study, seen: set[int], sink: SearchProgress) -> None:
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state.is_finished() and t.number not in seen:
            seen.add(t.number)
            sink(study, t)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    desc = ", ".join(f"trial {t.number} step {t.last_step or 0}/{sink.steps}" for t in running)
    sink.progress.update(
        sink._epoch, visible=bool(running), description=desc or "waiting", completed=0, total=None
    )
