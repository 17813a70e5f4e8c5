"""Samplers, pruners, storage and the create-or-resume logic around an Optuna study."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

SAMPLERS = ("tpe", "random", "cmaes", "qmc")
PRUNERS = ("hyperband", "median", "sha", "none")
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "mysql+pymysql")
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


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """A seeded sampler by name."""
    with warnings.catch_warnings():
        # multivariate/group TPE and QMC are marked experimental; the flags are stable in use.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _make_sampler(name, seed)


def _make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate + group handle the define-by-run (conditional) space better.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES handles only numeric, fixed-dimension params; the rest fall back to random.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def make_pruner(name: str, max_steps: int) -> optuna.pruners.BasePruner:
    """A pruner by name; `max_steps` is epochs x folds (one report per epoch)."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_steps), reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r} (choose from {', '.join(PRUNERS)})")


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB storage; SQLite gets a long busy timeout so that local workers wait, not fail."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        Path(url.split("sqlite:///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
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
            direction="maximize",
            load_if_exists=True,
        )
    except Exception as e:
        raise StudyError(f"cannot open study {study_name!r}: {_first_line(e)}") from None
    stored = study.user_attrs.get("protocol")
    if stored is None:
        study.set_user_attr("protocol", protocol)
    elif stored != protocol:
        diff = sorted(k for k in set(stored) | set(protocol) if stored.get(k) != protocol.get(k))
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {protocol.get(k)!r})" for k in diff)
        raise StudyError(
            f"study {study_name!r} was created with another protocol: {shown}; "
            "rerun with the same settings or choose a new --study-name"
        )
    return study


def count_finished(study: optuna.Study) -> int:
    """Complete + pruned trials: the ones `--trials` counts."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def fail_stale_trials(study: optuna.Study, reason: str = "interrupted (process ended mid-trial)") -> list[int]:
    """Mark RUNNING trials left by a dead single-process search as FAIL; return their numbers.

    Only for a search that owns its study alone (the default local run): another live
    worker's running trial would be failed too.
    """
    storage = study._storage
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            failed.append(t.number)
    return failed


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    total_trials: int,
    *,
    timeout: float | None = None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    catch: tuple[type[Exception], ...] = (Exception,),
    max_consecutive_failures: int = 10,
) -> None:
    """Run until the study holds `total_trials` finished trials (or the timeout passes).

    Failed trials (diverged, invalid, crashed) are recorded and replaced; a run of
    `max_consecutive_failures` of them stops the search with StudyError.
    """
    remaining = total_trials - count_finished(study)
    if remaining <= 0:
        return
    streak = {"n": 0}

    def stop_when_done(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            streak["n"] += 1
            if streak["n"] >= max_consecutive_failures:
                study.stop()
        else:
            streak["n"] = 0
        if count_finished(study) >= total_trials:
            study.stop()

    # n_trials bounds this call only (Optuna counts per call); failed trials get replaced,
    # so allow more calls to the objective than the remaining budget.
    study.optimize(
        objective,
        n_trials=remaining + max_consecutive_failures * 10,
        timeout=timeout,
        callbacks=[*callbacks, stop_when_done],
        catch=catch,
        gc_after_trial=True,
    )
    if streak["n"] >= max_consecutive_failures:
        last = study.get_trials(deepcopy=False)[-1]
        why = last.user_attrs.get("fail_reason", "see the log")
        raise StudyError(f"stopped after {streak['n']} failed trials in a row; last: {why}")
