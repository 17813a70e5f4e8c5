"""Rank a study's trials: a pure function to a pandas DataFrame, rendered separately."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

COLUMNS = [
    "rank",
    "trial",
    "architecture",
    "val_accuracy",
    "val_std",
    "params",
    "epochs",
    "train_time_s",
    "state",
    "reason",
]


def leaderboard(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """Complete trials ranked by validation accuracy, then pruned, then failed (unranked).

    Ties in accuracy go to the smaller model.
    """
    rows = []
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        ua = t.user_attrs
        value = t.value if t.state == TrialState.COMPLETE else None
        if t.state == TrialState.PRUNED and t.intermediate_values:
            # The last reported value: what the trial had reached when it was stopped.
            value = t.intermediate_values[max(t.intermediate_values)]
        reason = ""
        if t.state == TrialState.PRUNED:
            reason = f"pruned at step {ua.get('pruned_at_step', max(t.intermediate_values or {0: 0}))}"
        elif t.state == TrialState.FAIL:
            reason = str(ua.get("fail_reason", "unknown error"))
        rows.append(
            {
                "trial": t.number,
                "architecture": ua.get("summary", ""),
                "val_accuracy": value,
                "val_std": ua.get("val_accuracy_std"),
                "params": ua.get("params"),
                "epochs": ua.get("epochs_run"),
                "train_time_s": ua.get("wall_time"),
                "state": t.state.name.lower(),
                "reason": reason,
            }
        )
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "rank"])
    order = {"complete": 0, "pruned": 1, "fail": 2}
    df["_o"] = df["state"].map(order)
    df["_acc"] = df["val_accuracy"].fillna(-1.0)
    df["_p"] = df["params"].fillna(float("inf"))
    df = df.sort_values(["_o", "_acc", "_p", "trial"], ascending=[True, False, True, True])
    df = df.drop(columns=["_o", "_acc", "_p"]).reset_index(drop=True)
    complete = df["state"] == "complete"
    df.insert(0, "rank", pd.array([i + 1 if c else None for i, c in enumerate(complete)], dtype="Int64"))
    return df


def render_table(df: pd.DataFrame, top: int | None = 10, title: str = "Leaderboard") -> Table:
    """A rich table of the top complete rows, with a footnote counting pruned and failed."""
    complete = df[df["state"] == "complete"]
    shown = complete.head(top) if top else complete
    n_pruned = int((df["state"] == "pruned").sum())
    n_failed = int((df["state"] == "fail").sum())
    table = Table(title=title, caption=f"{len(complete)} complete, {n_pruned} pruned, {n_failed} failed")
    for col, justify in [
        ("rank", "right"),
        ("trial", "right"),
        ("architecture", "left"),
        ("val acc", "right"),
        ("params", "right"),
        ("epochs", "right"),
        ("time", "right"),
        ("state", "left"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for _, r in shown.iterrows():
        acc = f"{r.val_accuracy:.4f}"
        if pd.notna(r.val_std) and r.val_std:
            acc += f" ± {r.val_std:.4f}"
        table.add_row(
            str(r["rank"]),
            str(r.trial),
            str(r.architecture),
            acc,
            f"{int(r.params):,}" if pd.notna(r.params) else "",
            str(int(r.epochs)) if pd.notna(r.epochs) else "",
            f"{r.train_time_s:.0f}s" if pd.notna(r.train_time_s) else "",
            str(r.state),
        )
    return table
