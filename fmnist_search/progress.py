"""Live progress of a search with rich: trials bar with ETA, epoch bar, best so far."""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from searchspace.config import CnnConfig

from .multiobjective import accuracy_of


class SearchProgress:
    """A `ProgressSink` for the objective plus an Optuna callback for finished trials."""

    def __init__(self, total_trials: int, done: int, steps: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.total = total_trials
        self.steps = steps
        self.best = float("nan")
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._trials = self.progress.add_task("trials", total=total_trials, completed=done)
        self._epoch = self.progress.add_task("epoch", total=1, visible=False)

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def set_best(self, value: float) -> None:
        self.best = value
        best = "—" if math.isnan(value) else f"{value:.4f}"
        self.progress.update(self._trials, description=f"trials (best val acc {best})")

    # ProgressSink
    def trial_started(self, number: int, cfg: CnnConfig) -> None:
        self.progress.update(self._epoch, visible=True, completed=0)
        self.console.print(f"[dim]trial {number}: {cfg.summary()}[/dim]", highlight=False)

    def epoch_started(self, number: int, step: int, total_steps: int) -> None:
        self.progress.update(
            self._epoch,
            description=f"trial {number} epoch {step}/{total_steps}",
            completed=0,
            total=1,
        )

    def batch_done(self, done: int, total: int) -> None:
        self.progress.update(self._epoch, completed=done, total=total)

    def epoch_done(self, number: int, step: int, value: float) -> None:
        pass

    # Optuna callback
    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            self.progress.advance(self._trials)
        acc = accuracy_of(trial) if trial.state == TrialState.COMPLETE else None
        if acc is not None and (math.isnan(self.best) or acc > self.best):
            self.set_best(acc)
        self.progress.update(self._epoch, visible=False)
        ua = trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            msg = f"trial {trial.number} [green]complete[/green] val acc {acc or 0:.4f}"
        elif trial.state == TrialState.PRUNED:
            ran = ua.get("epochs_run", "?")
            msg = f"trial {trial.number} [yellow]pruned[/yellow] after {ran} epoch(s)"
        else:
            msg = (
                f"trial {trial.number} [red]failed[/red]: {ua.get('fail_reason', 'unknown error')}"
            )
        self.console.print(
            f"{msg}  ({ua.get('params', '?'):,} params, {ua.get('wall_time', 0):.0f}s)"
            if isinstance(ua.get("params"), int)
            else msg,
            highlight=False,
        )
