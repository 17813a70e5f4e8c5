"""Samplers, pruners, storage and the create-or-resume logic around an Optuna study."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import os
import re
import signal
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from . import stop

SAMPLERS = ("tpe", "random", "cmaes", "qmc", "nsga2")
PRUNERS = ("hyperband", "median", "sha", "none")
STORAGE_SCHEMES = (
    "sqlite",
    "postgresql",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "mysql",
    "mysql+pymysql",
)
# Trials that used up budget: "--trials N" means N of these in the study.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class StudyError(RuntimeError):
    """A study that can't be opened or continued as asked (one-line message)."""


def check_study_name(name: str) -> str:
    """Refuse names that could leave the results directory (separators, '..', NUL)."""
    if not _STUDY_NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid study name {name!r}: use letters, digits, '.', '_' or '-' "
            "(no path separators, no '..', at most 100 characters)"
        )
    return name


def check_storage_url(url: str) -> str:
    """Accept only the RDB URL schemes Optuna's RDBStorage supports."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.lower() not in STORAGE_SCHEMES:
        raise ValueError(
            f"unsupported storage scheme {scheme or url!r}: use one of "
            + ", ".join(f"{s}://" for s in STORAGE_SCHEMES)
        )
    if scheme.lower() == "sqlite" and not (url.startswith("sqlite:///") and url[10:]):
        # SQLAlchemy's form: the file's path after three slashes (four when absolute).
        raise ValueError(
            f"a SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db, not {url}"
        )
    return url


def study_dir(results_dir: str | Path, study_name: str) -> Path:
    """results/<study>, resolved, and proven to lie inside the results directory."""
    root = Path(results_dir).resolve()
    d = (root / check_study_name(study_name)).resolve()
    if root not in d.parents:
        raise ValueError(f"study directory {d} would lie outside {root}")
    return d


def default_storage(results_dir: str | Path, study_name: str) -> str:
    """sqlite:///<results-dir>/<study>/study.db (the directory is made by `open_study`)."""
    return f"sqlite:///{study_dir(results_dir, study_name) / 'study.db'}"


# Random trials TPE draws before it models the space (Optuna's default).
TPE_RANDOM_TRIALS = 10


def make_sampler(name: str, seed: int, enqueued: int = 0) -> optuna.samplers.BaseSampler:
    """A seeded sampler by name.

    `enqueued` is how many trials the search queues itself (the warm start's points).
    TPE counts every finished trial towards its startup, queued ones included; they are
    added to its random trials instead of replacing them.
    """
    with warnings.catch_warnings():
        # multivariate/group TPE and QMC are marked experimental; the flags are stable in use.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _make_sampler(name, seed, enqueued)


def process_seed(seed: int, worker_index: int, finished: int) -> int:
    """The sampler's seed in one process: `--seed`, the worker's index, the trials already
    finished when the process starts.

    A fresh search's first worker (the only one of most searches) keeps `seed`. The others
    are derived from both numbers: `seed + worker_index` gave `--seed 0`'s worker 1 the
    stream of `--seed 1`'s worker 0, so runs at neighbouring seeds shared random trials.
    A resumed or recycled process gets a stream of its own: with the same seed it would
    replay the random draws of the process before it (random search, TPE's random
    trials), the same configurations again.
    """
    if finished == 0 and worker_index == 0:
        return seed
    parts = [seed, worker_index] + ([finished] if finished else [])
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def _make_sampler(name: str, seed: int, enqueued: int = 0) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate + group handle the define-by-run (conditional) space better.
        # The warm start's points are all near the seed documents' models (none with conv
        # BatchNorm): counted as startup, they left TPE two random trials, and its searches
        # rarely tried BatchNorm (3 trials in 50; 17 with the random trials kept, same seed).
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True,
            n_startup_trials=TPE_RANDOM_TRIALS + enqueued,
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES handles only numeric, fixed-dimension params; the rest fall back to random.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def make_pruner(name: str, max_steps: int) -> optuna.pruners.BasePruner:
    """A pruner by name; `max_steps` is epochs x folds (one report per epoch)."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max(1, max_steps), reduction_factor=3
        )
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r} (choose from {', '.join(PRUNERS)})")


def pruner_read_steps(
    pruner: optuna.pruners.BasePruner, max_steps: int,
    study: optuna.Study | None = None, trial_number: int | None = None,
) -> frozenset[int] | None:
    """The steps before `max_steps` whose reported value `pruner` can act on; None: any.

    Successive halving and Hyperband decide only when a trial reaches a rung, at
    min_resource x reduction_factor^k steps (Hyperband's brackets start at every k), and
    read the value reported there; NopPruner reads none. The last step is never pruned.
    Given the study and trial, Hyperband's reads are those of the trial's own bracket:
    with 3 epochs, bracket 1 (about 2 trials in 5) has no rung before the last epoch.
    An epoch whose score no pruner reads need not be validated: with 3 epochs, epoch 2's
    pass was 0.16 s of the 0.55 s a default trial spent over a bare fit (measured). Other
    pruners (median, percentile, wrappers) may read any step.
    """
    if isinstance(pruner, optuna.pruners.NopPruner):
        return frozenset()
    if isinstance(pruner, optuna.pruners.HyperbandPruner) and study is not None \
            and trial_number is not None:
        bracket = _hyperband_bracket(pruner, study, trial_number)
        if bracket is not None:
            return pruner_read_steps(bracket, max_steps)
    if isinstance(pruner, (optuna.pruners.HyperbandPruner,
                           optuna.pruners.SuccessiveHalvingPruner)):
        # Private attributes: if a later Optuna renames them, validate every epoch.
        base = getattr(pruner, "_min_resource", None)  # None: "auto", not known yet
        factor = getattr(pruner, "_reduction_factor", None)
        rate = getattr(pruner, "_min_early_stopping_rate", 0)
        if not (isinstance(base, int) and isinstance(factor, int) and isinstance(rate, int)
                and base >= 1 and factor >= 2):
            return None
        base *= factor ** rate  # Hyperband's brackets start at every rate from 0
        steps, step = set(), base
        while step < max_steps:
            steps.add(step)
            step *= factor
        return frozenset(steps)
    return None


def _hyperband_bracket(
    pruner: optuna.pruners.HyperbandPruner, study: optuna.Study, trial_number: int
) -> optuna.pruners.SuccessiveHalvingPruner | None:
    """The successive-halving pruner of the trial's bracket; None if not known (yet)."""
    # Private: Hyperband builds its brackets on its first prune() call, and picks a trial's
    # bracket from a hash of the study name and trial number. If a later Optuna changes
    # them, the reads of every bracket are used instead.
    try:
        if not pruner._pruners:
            pruner._try_initialization(study)  # what its own prune() would do first
        if not pruner._pruners:
            return None  # max_resource "auto" before any trial completed
        number = types.SimpleNamespace(number=trial_number)
        bracket = pruner._pruners[pruner._get_bracket_id(study, number)]  # type: ignore[arg-type]
    except (AttributeError, TypeError, IndexError):
        return None
    return bracket if isinstance(bracket, optuna.pruners.SuccessiveHalvingPruner) else None


def _retry_callback() -> Callable[[optuna.Study, FrozenTrial], None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)


def _heartbeat_setting() -> tuple[int, int]:
    # FMNIST_SEARCH_HEARTBEAT="interval,grace" (seconds) lets tests see a dead worker sooner.
    raw = os.environ.get("FMNIST_SEARCH_HEARTBEAT", "")
    try:
        interval, grace = (int(x) for x in raw.split(","))
        if 0 < interval < grace:
            return interval, grace
    except ValueError:
        pass
    return 10, 40


# Seconds between a running trial's heartbeats; a RUNNING trial silent for longer than the
# grace period belongs to a dead worker.
HEARTBEAT_INTERVAL, GRACE_PERIOD = _heartbeat_setting()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # both end a search the same way (see cli)


class _Held:
    """The signals an `uninterrupted` block holds back: the handlers it replaced, and
    those that arrived meanwhile."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: list[Any] = []

    def hold(self, signum: int, frame: Any) -> None:
        stop.remember()
        if self.pending:  # asked twice: a hung storage call must not trap the user
            raise KeyboardInterrupt
        self.pending.append(signum)

    def swap_in(self) -> None:
        # An ignored signal stays ignored (a search started in the background ignores
        # the terminal's Ctrl-C): holding it would let a second one interrupt.
        self.previous = [signal.getsignal(s) for s in _SIGNALS]
        for s, handler in zip(_SIGNALS, self.previous, strict=True):
            if handler is not signal.SIG_IGN:
                signal.signal(s, self.hold)

    def swap_out(self) -> None:
        for s, handler in zip(_SIGNALS, self.previous, strict=True):
            if handler is not signal.SIG_IGN:
                signal.signal(s, handler)

    def deliver(self) -> None:
        """Raise the first held signal again, to the handlers now in place."""
        if self.pending:
            signal.raise_signal(self.pending.pop(0))
            self.pending.clear()


_held: _Held | None = None  # the `uninterrupted` block the main thread is in, if any


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Within: Ctrl-C and SIGTERM wait for the block to end; a second one does not wait.

    A KeyboardInterrupt raised in the middle of a storage call can leave a SQLite read
    statement unfinished, kept alive by the traceback's frames: its shared lock then
    blocks the writes that record the interrupted trial as failed, 60 s (the busy
    timeout) each, and a CI run hung there. Raised inside Optuna's bookkeeping after an
    objective returns, it leaves the trial RUNNING and Optuna fails with UnboundLocalError.
    So these are never cut in half: the signal is delivered again, to whatever handler
    was in place, once the block ends. Only the main thread handles signals; elsewhere
    (heartbeat threads) this does nothing.
    """
    global _held
    if (
        _held is not None
        or threading.current_thread() is not threading.main_thread()
        or any(signal.getsignal(s) is None for s in _SIGNALS)  # a C handler: not ours to swap
    ):
        yield
        return
    held = _Held()
    held.swap_in()
    _held = held
    try:
        yield
    finally:
        _held = None
        held.swap_out()
        held.deliver()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within an `uninterrupted` block: signals act at once again (an objective's training).

    One held until now is delivered on entry. Storage calls made within are still
    `uninterrupted`, each on its own."""
    global _held
    held = _held
    if held is None:
        yield
        return
    _held = None
    held.swap_out()
    try:
        held.deliver()
        yield
    finally:
        held.swap_in()
        _held = held


def _uninterrupted_call(method: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with uninterrupted():
            return method(*args, **kwargs)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class SafeRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose public calls Ctrl-C does not cut in half (`uninterrupted`)."""


# Public calls, and the private ones Optuna's cache and heartbeats call on the backend.
_PRIVATE_CALLS = ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id",
                  "_get_stale_trial_ids")
for _name, _attr in vars(optuna.storages.RDBStorage).items():
    if (not _name.startswith("_") or _name in _PRIVATE_CALLS) and isinstance(
        _attr, types.FunctionType
    ):
        setattr(SafeRDBStorage, _name, _uninterrupted_call(_attr))


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so that a killed worker's trial is failed and retried.

    SQLite gets a long busy timeout so that local workers wait for each other, not fail.
    """
    kwargs: dict[str, Any] = {
        "heartbeat_interval": HEARTBEAT_INTERVAL,
        "grace_period": GRACE_PERIOD,
        # The dead trial is kept as FAIL and a copy with the same parameters is enqueued,
        # recorded as a retry (system attrs "failed_trial" / "retry_history").
        "heartbeat_stale_trial_callback": _retry_callback(),
    }
    if url.startswith("sqlite"):
        folder = Path(url.split("sqlite:///", 1)[1]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # nothing is stored yet: say so, not "rerun to continue"
            raise StudyError(f"cannot create {folder}: {e.strerror or e}") from None
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            # Heartbeats are marked experimental; they are what makes dead workers visible.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SafeRDBStorage(url, **kwargs)
    except Exception as e:  # sqlalchemy wraps driver errors; keep one line, no password
        raise StudyError(f"cannot open storage {redact(url)}: {_first_line(e)}") from None


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_study(
    storage: optuna.storages.BaseStorage | str,
    study_name: str,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    protocol: dict[str, Any],
    directions: Sequence[str] = ("maximize",),
) -> optuna.Study:
    """Create the study or load it; refuse to continue it under another protocol.

    The protocol (epochs, folds, split, seed, space) is stored in the study's user
    attributes when it is created, so every trial in a study is scored the same way.
    """
    if isinstance(storage, str):
        storage = make_storage(storage)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            sampler=sampler,
            pruner=pruner,
            directions=[StudyDirection[d.upper()] for d in directions],
            load_if_exists=True,
        )
    except Exception as e:
        raise StudyError(f"cannot open study {study_name!r}: {_first_line(e)}") from None
    stored = study.user_attrs.get("protocol")
    if stored is None:
        study.set_user_attr("protocol", protocol)
    elif "score" in protocol and "score" not in stored:
        raise StudyError(
            f"study {study_name!r} was made by an older version, which scored trials at their "
            "best epoch (now: the last); choose a new --study-name"
        )
    elif diff := protocol_differences(stored, protocol):
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {protocol.get(k)!r})" for k in diff)
        raise StudyError(
            f"study {study_name!r} was created with another protocol: {shown}; "
            "rerun with the same settings or choose a new --study-name"
        )
    return study


# Protocol entries that do not change what a score means: how many validation images the
# epochs before the last are scored on (the pruner's and the curves' view) may differ
# between runs of one study, and the KerasTuner engine always validates every image.
NON_BINDING = frozenset({"interim_val_size"})
# How the main study ranks its trials (multiobjective.protocol_entries): a baseline's score does
# not depend on them, so baselines measured once serve every such study of the same protocol.
RANKING_ONLY = frozenset({"objectives", "max_params", "max_latency_ms"})


def protocol_differences(
    stored: dict[str, Any], now: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """The protocol keys whose values differ, leaving out NON_BINDING ones and `ignore`."""
    skip = NON_BINDING | ignore
    return sorted(
        k for k in set(stored) | set(now) if k not in skip and stored.get(k) != now.get(k)
    )


def trials_with_annotations(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials (copies), with what was recorded after they finished merged in.

    Exports record a trial's test accuracy in the study's user attribute
    `test:<number>` (finished trials are read-only in Optuna).
    """
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=True)
    for t in trials:
        t.user_attrs.update(attrs.get(f"test:{t.number}", {}))
    return trials


def count_finished(study: optuna.Study) -> int:
    """Complete + pruned trials: the ones `--trials` counts."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def fail_stale_trials(
    study: optuna.Study, reason: str = "interrupted (process ended mid-trial)"
) -> list[int]:
    """Mark RUNNING trials left by a dead local search as FAIL, enqueue a retry of each.

    Only for a search that owns its study alone (the default local storage, before its
    workers start): another live worker's running trial would be failed too. Shared
    storages rely on heartbeats instead (`make_storage`, `fail_silent_trials`).
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return _fail_and_retry(study, [t._trial_id for t in running], reason)


def fail_silent_trials(study: optuna.Study) -> list[int]:
    """Fail (and retry) RUNNING trials that never recorded a heartbeat, once older than the
    grace period, on a storage with heartbeats. Returns their numbers.

    Optuna calls a trial stale only from its last heartbeat. A worker killed between
    creating its trial and the heartbeat thread's first beat (milliseconds) would leave
    a trial that nothing ever fails, holding a place in `--trials` for good. A live
    worker's trial beats within milliseconds of its start, long before the grace period.
    """
    backend = getattr(study._storage, "_backend", study._storage)  # unwrap Optuna's cache
    if not isinstance(backend, optuna.storages.RDBStorage) or not is_heartbeat_enabled(backend):
        return []
    grace = backend.grace_period or 2 * (backend.heartbeat_interval or 0)
    # A live trial beats milliseconds after it starts; it could be taken for dead only if
    # its machine's clock ran a grace period behind this one's. (Beating before the trial
    # lock is released would close even that, but it puts a storage write where Ctrl-C
    # lands, and a CI run with it hung once after a Ctrl-C there.) datetime_start is the
    # creating machine's clock (naive local time); compared in UTC so that a
    # daylight-saving change does not age a trial by an hour.
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=grace)
    old = [
        t._trial_id
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and t.datetime_start.astimezone(timezone.utc) < cutoff
    ]
    beaten = beaten_trials(backend, old) if old else set()
    if beaten is None:  # Optuna's private layout changed: rely on its heartbeats alone
        return []
    silent = [i for i in old if i not in beaten]
    return _fail_and_retry(study, silent, "worker died before its first heartbeat")


def beaten_trials(storage: optuna.storages.RDBStorage, trial_ids: Sequence[int]) -> set[int] | None:
    """Those of `trial_ids` with a heartbeat recorded; None if Optuna's tables are not known."""
    try:
        from optuna.storages._rdb.models import TrialHeartbeatModel
        from sqlalchemy import select

        table = TrialHeartbeatModel.__table__
        with uninterrupted(), storage.engine.connect() as conn:
            query = select(table.c.trial_id).where(table.c.trial_id.in_(list(trial_ids)))
            return set(conn.execute(query).scalars())
    except (ImportError, AttributeError):
        return None


def _fail_and_retry(study: optuna.Study, trial_ids: Sequence[int], reason: str) -> list[int]:
    """Fail the given RUNNING trials with `reason`, enqueue a retry of each; their numbers."""
    storage = study._storage
    retry = _retry_callback()
    failed = []
    for trial_id in trial_ids:
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or failed it first
        frozen = storage.get_trial(trial_id)
        failed.append(frozen.number)
        retry(study, frozen)
    return failed


class TrialLock:
    """Serialises "count the trials, then start one" across workers on the same study.

    Without it two workers seeing N-1 finished trials would both start one and the study
    would end with N+1. SQLite: an flock beside the database (local workers); PostgreSQL:
    a session advisory lock (workers on several machines); other storages: no lock.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str) -> None:
        self._fd: int | None = None
        self._conn: Any = None
        self._path: str | None = None
        self._engine: Any = None
        self._key = int.from_bytes(
            hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True
        )
        storage = getattr(storage, "_backend", storage)  # studies wrap RDBStorage in a cache
        url = str(getattr(storage, "url", "") or "")
        if url.startswith("sqlite:///"):
            self._path = url.split("sqlite:///", 1)[1] + ".lock"
        elif url.startswith("postgresql"):
            self._engine = getattr(storage, "engine", None)

    def acquire(self) -> None:
        if self._path is not None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self._engine is not None:
            from sqlalchemy import text

            with uninterrupted():
                self._conn = self._engine.connect()
                self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
                self._conn.commit()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            from sqlalchemy import text

            with uninterrupted():
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                    self._conn.commit()
                finally:
                    self._conn.close()
                    self._conn = None


def _heartbeat_threads() -> list[tuple[threading.Thread, int, threading.Event]]:
    """Optuna's live heartbeat threads, with the trial id and stop event of each."""
    found: list[tuple[threading.Thread, int, threading.Event]] = []
    for t in threading.enumerate():
        # Optuna starts them as Thread(target=_record_heartbeat, args=(trial_id, storage, event)).
        if getattr(getattr(t, "_target", None), "__name__", "") != "_record_heartbeat":
            continue
        args: tuple[Any, ...] = tuple(getattr(t, "_args", ()))
        if len(args) == 3 and isinstance(args[0], int) and isinstance(args[2], threading.Event):
            found.append((t, args[0], args[2]))
    return found


def _stop_heartbeats(study: optuna.Study, reason: str) -> list[int]:
    """Stop heartbeat threads an interrupted trial start left behind; fail their trials.

    A Ctrl-C that lands inside Optuna's `with get_heartbeat_thread(...)` entry (after the
    thread started, before the block began) skips its exit: the non-daemon thread beats on,
    the process never exits, and the trial stays RUNNING. Returns the trials failed here.
    """
    failed = []
    for thread, trial_id, beating in _heartbeat_threads():
        beating.set()
        thread.join(timeout=10)
        try:
            frozen = study._storage.get_trial(trial_id)
            if frozen.state == TrialState.RUNNING:
                study._storage.set_trial_user_attr(trial_id, "fail_reason", reason)
                study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
                failed.append(frozen.number)
        except Exception:  # the storage itself may be what failed: reopening fails it
            pass
    return failed


@contextlib.contextmanager
def settled_heap() -> Iterator[None]:
    """Within: every object alive on entry is exempt from garbage collection (`gc.freeze`).

    TensorFlow and Keras leave about 450,000 long-lived objects that every full
    collection walks again: 0.2 s each time, and a trial once ran three (Keras'
    clear_session, Optuna's gc_after_trial, one of ours), 0.6 s of a 10 s trial; it now
    runs one, the cleanup's. Frozen, a collection walks
    only what was made since. Frozen objects are still freed by reference counting; on exit
    they are collectable again, so a cycle that became garbage meanwhile is not kept.
    Nested, only the outermost freezes and unfreezes.
    """
    if gc.get_freeze_count():  # a caller has settled it already
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float | tuple[float, ...]],
    total_trials: int,
    *,
    timeout: float | None = None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    max_consecutive_failures: int = 10,
    max_trials: int | None = None,
) -> bool:
    """Run trials until the study holds `total_trials` finished ones (or the timeout passes).

    Returns True when this call stopped only because it had started `max_trials` trials
    (a worker about to be recycled) while the study still wants more.

    Works the same for one process or many workers on one storage: each trial is started
    only while finished + running trials are fewer than `total_trials`, under a
    `TrialLock`. Failed trials (diverged, invalid, crashed, killed) are recorded and
    replaced; `max_consecutive_failures` of them in a row stop this worker (StudyError).
    """
    with settled_heap():
        return _run_trials(study, objective, total_trials, timeout, callbacks,
                           max_consecutive_failures, max_trials)


def _run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float | tuple[float, ...]],
    total_trials: int,
    timeout: float | None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]],
    max_consecutive_failures: int,
    max_trials: int | None,
) -> bool:
    lock = TrialLock(study._storage, study.study_name)
    deadline = time.monotonic() + timeout if timeout else None
    streak = 0
    last: list[FrozenTrial] = []
    heartbeat = is_heartbeat_enabled(study._storage)

    def remember(study: optuna.Study, trial: FrozenTrial) -> None:
        last.append(trial)

    next_silent_check = 0.0  # monotonic time of the next `fail_silent_trials`

    def started() -> list[FrozenTrial]:
        return study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))

    started_here = 0
    while deadline is None or time.monotonic() < deadline:
        stop.raise_if_asked()  # a Ctrl-C lost inside the last trial: start no other
        if max_trials is not None and started_here >= max_trials:
            return len(started()) < total_trials
        started_here += 1
        lock.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                lock.release()
                held = False

        def locked_objective(trial: optuna.Trial) -> float | tuple[float, ...]:
            release()  # the trial exists (RUNNING): other workers may now count it
            try:
                with interruptible():  # Ctrl-C stops training at once, not Optuna's records
                    return objective(trial)
            except KeyboardInterrupt:
                if "fail_reason" not in trial.user_attrs:  # held until the objective began
                    trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
                raise
            except Exception as e:
                if not stop.interrupt_within(e):
                    raise
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
                raise KeyboardInterrupt from e

        try:
            # A trial's own start (Optuna's `_run_trial`) fails the stale trials of dead
            # workers; the silent ones (never beat) are rare, so looked for once per heartbeat
            # interval, not every trial: each check is a storage read, 5-10 ms.
            if heartbeat and time.monotonic() >= next_silent_check:
                fail_silent_trials(study)
                next_silent_check = time.monotonic() + HEARTBEAT_INTERVAL
            trials = started()
            if len(trials) >= total_trials:
                if not heartbeat or all(t.state != TrialState.RUNNING for t in trials):
                    break
                # A dead worker's trial counts as started until failed: check before stopping.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                fail_silent_trials(study)
                if len(started()) >= total_trials:
                    break
            last.clear()
            # n_trials counts per optimize() call in Optuna: one call per trial here.
            with uninterrupted():  # only the objective's own work may be cut short
                study.optimize(
                    locked_objective,
                    n_trials=1,
                    callbacks=[*callbacks, remember],
                    catch=(Exception,),
                    # Not Optuna's collection too: the objective cleans up after itself
                    # (`Objective` through `session.released_session`, which collects).
                    gc_after_trial=False,
                )
        except BaseException as e:  # Ctrl-C, SystemExit, a lost storage
            reason = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else None
            _stop_heartbeats(study, reason or f"interrupted ({type(e).__name__})")
            raise
        finally:
            release()
        if last and last[-1].state == TrialState.FAIL:
            streak += 1
            if streak >= max_consecutive_failures:
                why = last[-1].user_attrs.get("fail_reason", "see the log")
                raise StudyError(f"stopped after {streak} failed trials in a row; last: {why}")
        else:
            streak = 0
    return False
