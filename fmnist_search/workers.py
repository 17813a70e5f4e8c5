"""Local worker processes on one study, watched by the parent that shows progress once.

Workers coordinate only through the Optuna storage (and `study.TrialLock`): the same
mechanism that lets several machines share one PostgreSQL study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

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


def spawn(
    argv: Sequence[str], workers: int, threads: int, log_dir: Path
) -> list[subprocess.Popen[bytes]]:
    """Start `workers` copies of this search as quiet worker processes, logging to files."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(workers):
        log = open(log_dir / f"worker-{i}.log", "ab")  # noqa: SIM115 - owned by the child
        cmd = [
            sys.executable,
            "-m",
            "fmnist_search.cli",
            *argv,
            "--worker-index",
            str(i),
            "--threads",
            str(threads),
        ]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def watch(
    study: optuna.Study, procs: list[subprocess.Popen[bytes]], sink: SearchProgress
) -> list[int]:
    """Show the study's progress from its storage until every worker has exited.

    Ctrl-C is forwarded to the workers (each marks its running trial failed and stops).
    Returns the workers' exit codes.
    """
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            _show(study, seen, sink)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
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
