"""Rank a study's trials beside the measured baselines: a pure function to a pandas DataFrame.

Baseline rows are the seed documents' models re-measured under the study's own protocol
(`run_search.py baselines`, stored in the study `<study>.baselines`), so they rank together
with the trials. The documents' own accuracies are carried in separate `documented_*`
columns: they come from other protocols (often the test set) and are never ranked.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from searchspace.baselines import BY_NAME, Baseline

from .multiobjective import accuracy_of, is_feasible, pareto_rank_frame, smallest_beating

COLUMNS = [
    "rank",
    "trial",  # the trial number, or the baseline's name
    "kind",  # "trial" or "baseline"
    "architecture",
    "val_accuracy",  # every validation image after the last epoch; mean over folds under K-fold
    "val_std",  # std over folds (0 for a holdout split)
    "params",
    "epochs",
    "best_epoch",
    "train_time_s",
    "state",  # complete, pruned, fail, or "not run" (a documented baseline not measured yet)
    "test_accuracy",
    "test_scaled_up",  # the test accuracy is the final fit's scaled-up model's (export)
    "beats",  # the best measured baseline this trial beats
    "margin_pts",  # by how many percentage points
    "pareto",  # no other complete row is at least as accurate and at least as small
    "smallest_beating",  # for a measured baseline: the smallest trial more accurate than it
    "latency_ms",  # CPU ms per image at batch 1 (when latency was an objective or a limit)
    "feasible",  # within --max-params / --max-latency-ms
    "documented_acc",
    "documented_metric",
    "documented_protocol",
    "source",
    "reason",
]
BASELINE_SUFFIX = ".baselines"
LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.json")
DOCUMENTED_NOTE = (
    "documented_acc is the seed document's own number under its own protocol "
    "(often the test set, other epochs, sometimes unscaled pixels): not comparable, never ranked"
)
_STATE_ORDER = {"complete": 0, "not run": 1, "pruned": 2, "fail": 3}


def baseline_study_name(study_name: str) -> str:
    """The study holding a study's measured baselines: `<study>.baselines`."""
    return study_name + BASELINE_SUFFIX


def _row(t: FrozenTrial, kind: str, ident: int | str) -> dict[str, Any]:
    ua = t.user_attrs
    # Complete: its score; pruned: the last value it reported before it was stopped.
    value = accuracy_of(t)
    reason = ""
    if t.state == TrialState.PRUNED:
        step = ua.get("pruned_at_step", max(t.intermediate_values or {0: 0}))
        reason = f"pruned at step {step}"
        if ua.get("infeasible_reason"):
            reason = f"infeasible: {ua['infeasible_reason']}"
    elif t.state == TrialState.FAIL:
        reason = str(ua.get("fail_reason", "unknown error"))
    return {
        "trial": ident,
        "kind": kind,
        "architecture": ua.get("summary", ""),
        "val_accuracy": value,
        "val_std": ua.get("val_accuracy_std"),
        "params": ua.get("params"),
        "epochs": ua.get("epochs_run"),
        "best_epoch": ua.get("best_epoch"),
        "train_time_s": ua.get("wall_time"),
        "state": t.state.name.lower(),
        "test_accuracy": ua.get("test_accuracy"),
        "test_scaled_up": ua.get("test_scaled_up"),
        "latency_ms": ua.get("latency_ms_b1"),
        "feasible": is_feasible(t),
        "reason": reason,
    }


def _documented(b: Baseline) -> dict[str, Any]:
    return {
        "documented_acc": b.documented_accuracy,
        "documented_metric": b.documented_metric,
        "documented_protocol": b.documented_protocol,
        "source": b.source,
    }


def _pick_baseline_trials(baselines: Sequence[FrozenTrial]) -> dict[str, FrozenTrial]:
    """One trial per baseline name: the first COMPLETE one, else the latest finished one."""
    chosen: dict[str, FrozenTrial] = {}
    for t in sorted(baselines, key=lambda t: t.number):
        name = t.user_attrs.get("baseline")
        if not name or not t.state.is_finished():
            continue
        old = chosen.get(name)
        if old is None or old.state != TrialState.COMPLETE:
            chosen[name] = t
    return chosen


def leaderboard(
    trials: Sequence[FrozenTrial],
    baselines: Sequence[FrozenTrial] | None = None,
    documented: Sequence[Baseline] | None = None,
    objectives: Sequence[str] = ("accuracy",),
) -> pd.DataFrame:
    """Rank complete trials and measured baselines together; pruned and failed rows follow.

    In a multi-objective study (`objectives` beyond accuracy) the ranked rows are ordered by
    dominance depth (column `front`, 0 = the Pareto front), then accuracy; infeasible rows
    (outside the limits) follow unranked.

    Args:
        trials: The study's trials (RUNNING and WAITING ones are left out).
        baselines: Trials of `<study>.baselines`, each with the user attribute "baseline".
        documented: Baselines (usually `searchspace.baselines.BASELINES`) whose documented
            numbers should be shown even when not measured yet (state "not run", unranked).

    Returns:
        One row per trial or baseline with the columns of `COLUMNS`: complete rows first,
        ranked by validation accuracy (ties go to the smaller model), then documented-only
        baselines, then pruned, then failed trials (unranked).
    """
    rows: list[dict[str, Any]] = []
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            rows.append(_row(t, "trial", t.number))
    measured = _pick_baseline_trials(baselines or ())
    for name, t in measured.items():
        row = _row(t, "baseline", name)
        if name in BY_NAME:
            row.update(_documented(BY_NAME[name]))
            row["architecture"] = row["architecture"] or BY_NAME[name].config.summary()
        rows.append(row)
    for b in documented or ():
        if b.name not in measured:
            rows.append(
                {
                    "trial": b.name,
                    "kind": "baseline",
                    "architecture": b.config.summary(),
                    "state": "not run",
                    "reason": "not measured under this protocol yet",
                    **_documented(b),
                }
            )
    df = pd.DataFrame(rows, columns=COLUMNS[1:])
    df = _sorted(df)
    complete = (df["state"] == "complete").to_numpy()
    # Complete rows sort first, so their rank is their position.
    ranks = [i + 1 if c else None for i, c in enumerate(complete)]
    df.insert(0, "rank", pd.array(ranks, dtype="Int64"))
    _add_margins(df)
    df["pareto"] = _pareto(df)
    df = _typed(df)
    if len(objectives) > 1:
        df = pareto_rank_frame(df, objectives)
    # For each measured baseline: the smallest trial that beats it (accuracy vs size).
    smallest = smallest_beating(df)
    df["smallest_beating"] = pd.array(
        [smallest.get(str(r.trial)) if r.kind == "baseline" else None for r in df.itertuples()],
        dtype="Int64",
    )
    return df


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    keys = pd.DataFrame(
        {
            "_o": df["state"].map(_STATE_ORDER).fillna(9),
            "_acc": -pd.to_numeric(df["val_accuracy"], errors="coerce").fillna(-1.0),
            "_p": pd.to_numeric(df["params"], errors="coerce").fillna(float("inf")),
            "_k": (df["kind"] == "baseline").astype(int),
            "_n": [t if isinstance(t, int) else -1 for t in df["trial"]],
            "_s": [t if isinstance(t, str) else "" for t in df["trial"]],
        },
        index=df.index,
    )
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return df.loc[order].reset_index(drop=True)


def _add_margins(df: pd.DataFrame) -> None:
    """For each complete trial: the most accurate measured baseline it beats, and by how much."""
    acc = pd.to_numeric(df["val_accuracy"], errors="coerce")
    complete = df["state"] == "complete"
    base = df[complete & (df["kind"] == "baseline") & acc.notna()]
    beats: list[str | None] = [None] * len(df)
    margin: list[float | None] = [None] * len(df)
    for i in np.flatnonzero((complete & (df["kind"] == "trial") & acc.notna()).to_numpy()):
        below = base[acc[base.index] < acc.iloc[i]]
        if len(below):
            j = acc[below.index].idxmax()
            beats[i] = str(df.at[j, "trial"])
            # Percentage points, rounded: 0.9123 vs 0.9000 -> 1.23.
            margin[i] = round(float(acc.iloc[i] - acc[j]) * 100, 2)
    df["beats"] = beats
    df["margin_pts"] = pd.array(margin, dtype="Float64")


def _pareto(df: pd.DataFrame) -> np.ndarray:
    """True where no other complete row is at least as accurate and as small, and better in one."""
    acc = pd.to_numeric(df["val_accuracy"], errors="coerce").to_numpy(dtype=float)
    params = pd.to_numeric(df["params"], errors="coerce").to_numpy(dtype=float)
    ok = (df["state"] == "complete").to_numpy() & np.isfinite(acc) & np.isfinite(params)
    out = np.zeros(len(df), dtype=bool)
    a, p = acc[ok], params[ok]
    for i in np.flatnonzero(ok):
        dominated = (a >= acc[i]) & (p <= params[i]) & ((a > acc[i]) | (p < params[i]))
        out[i] = not dominated.any()
    return out


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("params", "epochs", "best_epoch"):
        df[col] = pd.array(pd.to_numeric(df[col], errors="coerce").round(), dtype="Int64")
    for col in ("val_accuracy", "val_std", "train_time_s", "test_accuracy", "latency_ms",
                "documented_acc"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["pareto"] = df["pareto"].astype(bool)
    # Baselines and documented rows carry no constraint values: feasible unless known not.
    df["feasible"] = df["feasible"].astype(object).where(df["feasible"].notna(), True).astype(bool)
    for col in ("architecture", "documented_metric", "documented_protocol", "source", "reason"):
        # Via object: an all-empty column arrives as float NaN, which can't take "" directly.
        df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    return df


def unranked_summary(df: pd.DataFrame) -> str:
    """One line counting ranked, pruned and failed rows, with the failures' reasons grouped."""
    ranked = df[df["state"] == "complete"]
    n_base = int((ranked["kind"] == "baseline").sum())
    n = len(ranked)
    parts = [f"{n} complete and ranked ({n - n_base} trials, {n_base} baselines)"]
    parts.append(f"{int((df['state'] == 'pruned').sum())} pruned")
    failed = df[df["state"] == "fail"]
    if len(failed):
        # Group by the reason's head ("diverged", "invalid config", "ResourceExhaustedError").
        heads = Counter(str(r).split(":", 1)[0].strip()[:40] or "unknown" for r in failed["reason"])
        why = ", ".join(f"{h} x{n}" for h, n in heads.most_common(4))
        parts.append(f"{len(failed)} failed ({why}{', ...' if len(heads) > 4 else ''})")
    else:
        parts.append("0 failed")
    not_run = int((df["state"] == "not run").sum())
    if not_run:
        parts.append(f"{not_run} baselines not measured yet")
    return ", ".join(parts)


def _fmt_acc(r: pd.Series, sep: str = " ") -> str:
    if r["state"] == "not run":
        return "not run"
    if r["state"] == "fail":
        return "failed"
    if pd.isna(r["val_accuracy"]):
        return ""
    s = f"{r['val_accuracy']:.4f}"
    if pd.notna(r["val_std"]) and r["val_std"]:
        s += f"{sep}± {r['val_std']:.4f}"
    return s + (f"{sep}(pruned)" if r["state"] == "pruned" else "")


def _compact(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n >= 1_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def render_table(
    df: pd.DataFrame, top: int | None = 10, title: str = "Leaderboard", *, width: int | None = None
) -> Table:
    """A rich table of the top ranked rows plus every baseline, with a caption counting the rest.

    Args:
        df: A `leaderboard()` frame.
        top: Ranked rows to show (None: all); baselines outside them follow in their own section.
        title: The table's title.
        width: The console width to fit (default: the terminal's); optional columns (time,
            test accuracy, baseline margins) are left out when they would not fit.
    """
    from rich.console import Console

    width = width or Console().width
    ranked = df[df["state"] == "complete"]
    shown = ranked.head(top) if top else ranked
    extra = df[(df["kind"] == "baseline") & ~df.index.isin(shown.index)]
    rows = pd.concat([shown, extra])
    wide = width >= 110

    def beats(r: pd.Series) -> str:
        if r["beats"] is None or pd.isna(r["beats"]):
            return ""
        sep = " vs " if wide else "\n"
        return f"+{r['margin_pts']:.2f} pts{sep}{escape(str(r['beats']))}"

    def acc(r: pd.Series) -> str:
        s = _fmt_acc(r, " " if wide else "\n")
        if r["kind"] == "baseline" and pd.notna(r["documented_acc"]):
            # The document's own number, on its own line and dimmed: never compared.
            s += f"\n[dim]doc {r['documented_acc']:.3f} {escape(str(r['documented_metric']))}[/dim]"
        return s

    def params(r: pd.Series) -> str:
        if pd.isna(r["params"]):
            return ""
        return f"{int(r['params']):,}" if wide else _compact(int(r["params"]))

    def time(r: pd.Series) -> str:
        s = f"{r['train_time_s']:.0f}s" if pd.notna(r["train_time_s"]) else ""
        if pd.notna(r["epochs"]):
            s += f"\n[dim]{int(r['epochs'])} ep[/dim]"
        return s

    def test(r: pd.Series) -> str:
        if pd.isna(r["test_accuracy"]):
            return ""
        return f"{r['test_accuracy']:.4f}" + (" ↑" if r["test_scaled_up"] is True else "")

    def rank(r: pd.Series) -> str:
        return ("" if pd.isna(r["rank"]) else str(r["rank"])) + (" ★" if r["pareto"] else "")

    # (header, cell, priority): the highest priority is dropped first when the table is too wide.
    specs: list[tuple[str, Callable[[pd.Series], str], int]] = [
        ("#", rank, 0),
        ("trial", lambda r: escape(str(r["trial"])), 0),
        ("architecture", lambda r: escape(str(r["architecture"])), 0),
        ("val acc", acc, 0),
        ("params", params, 0),
    ]
    if bool(rows["train_time_s"].notna().any() or rows["epochs"].notna().any()):
        specs.append(("time", time, 3))
    if bool(rows["test_accuracy"].notna().any()):
        specs.append(("test acc", test, 2))
    if bool(rows["beats"].notna().any()):
        specs.append(("beats baseline", beats, 1))
    cells = {h: [cell(r) for _, r in rows.iterrows()] for h, cell, _ in specs}

    def lengths(header: str, split: bool) -> list[int]:
        texts = [Text.from_markup(c).plain for c in [header, *cells[header]]]
        parts = [w for t in texts for w in (t.split() if split else t.splitlines())]
        return [len(x) for x in parts] or [1]

    def min_width(header: str) -> int:
        # What a column needs without breaking words; folding columns can go narrower.
        need = max(lengths(header, split=True))
        # Baseline names stay whole (they are looked up by name); margins may fold.
        return {"architecture": 16, "beats baseline": min(need, 12)}.get(header, need)

    def budget(specs: list[tuple[str, Callable[[pd.Series], str], int]]) -> int:
        return width - 3 * len(specs) - 1  # borders and padding

    while sum(min_width(h) for h, _, _ in specs) > budget(specs) and max(p for *_, p in specs):
        worst = max(p for *_, p in specs)
        specs = [sp for sp in specs if sp[2] != worst]
    # Fixed widths that fit: each column's natural width, shrunk widest-first down to its
    # minimum (rich alone would crop the right edge of a table wider than the terminal).
    widths = {h: max(lengths(h, split=False)) for h, _, _ in specs}
    floor = {h: min(min_width(h), widths[h]) for h in widths}
    while sum(widths.values()) > budget(specs):
        h = max(widths, key=lambda k: widths[k] - floor[k])
        if widths[h] <= floor[h]:
            break
        widths[h] -= 1

    caption = unranked_summary(df) + ". ★ = Pareto front (accuracy vs parameters)."
    if bool(rows["documented_acc"].notna().any()):
        caption += " doc = the document's own accuracy under its own protocol: not comparable."
    if bool((rows["test_scaled_up"] == True).any()):  # noqa: E712 (None/NaN where not set)
        caption += " ↑ = test accuracy of the architecture scaled up by the final fit."
    table = Table(title=title, caption=caption, caption_justify="left")
    for header, _, _ in specs:
        fold = header in ("architecture", "trial", "beats baseline")
        table.add_column(
            header,
            justify="left" if fold else "right",
            overflow="fold" if fold else "ellipsis",
            width=widths[header],
        )
    for i, (_, r) in enumerate(rows.iterrows()):
        if i == len(shown) and len(extra):
            table.add_section()
        style = "cyan" if r["kind"] == "baseline" else None
        table.add_row(*(cells[h][i] for h, _, _ in specs), style=style)
    return table


def render_baselines(df: pd.DataFrame, title: str = "Baselines") -> Table:
    """A rich table of the baseline rows: measured here beside documented there."""
    base = df[df["kind"] == "baseline"]
    table = Table(
        title=title,
        caption="measured: validation accuracy under this study's protocol (ranked with its "
        "trials); documented: the document's own number and protocol (not comparable).",
        caption_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("baseline", no_wrap=True)
    # The documented protocol goes under the architecture: one long column, not two.
    table.add_column("architecture / documented protocol", overflow="fold", min_width=20, ratio=1)
    table.add_column("params", justify="right")
    table.add_column("measured", justify="right")
    table.add_column("documented", justify="right")
    for _, r in base.iterrows():
        acc = _fmt_acc(r)
        if r["state"] == "fail":
            acc = f"failed: {r['reason']}"
        elif pd.notna(r["train_time_s"]):
            acc += f"\n[dim]{r['train_time_s']:.0f}s[/dim]"
        doc = r["documented_acc"]
        arch = escape(str(r["architecture"]))
        if r["documented_protocol"]:
            arch += f"\n[dim]{escape(str(r['documented_protocol']))}[/dim]"
        table.add_row(
            "" if pd.isna(r["rank"]) else str(r["rank"]),
            f"{r['trial']}\n[dim]doc {r['source']}[/dim]" if r["source"] else str(r["trial"]),
            arch,
            f"{int(r['params']):,}" if pd.notna(r["params"]) else "",
            acc,
            f"{doc:.4f}\n{r['documented_metric']}" if pd.notna(doc) else "",
        )
    return table


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename."""
    # Write beside the target and rename, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_json_text(df: pd.DataFrame) -> str:
    """The rows as a JSON list of records (NaN and NA become null)."""
    return df.to_json(orient="records", indent=2) + "\n"


def write_leaderboard_files(df: pd.DataFrame, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write leaderboard.csv, leaderboard.md and leaderboard.json (all rows) into `out_dir`.

    Returns:
        The three paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "leaderboard.csv": df.to_csv(index=False),
        "leaderboard.md": df.to_markdown(index=False) + f"\n\n{DOCUMENTED_NOTE}.\n",
        "leaderboard.json": to_json_text(df),
    }
    paths = []
    for name in LEADERBOARD_FILES:
        atomic_write(out / name, texts[name])
        paths.append(out / name)
    return paths


def _stderr_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def study_user_attrs(storage: Any, name: str) -> dict[str, Any] | None:
    """A stored study's user attributes, or None when there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    attrs: dict[str, Any] = storage.get_study_user_attrs(study_id)
    return attrs


def load_baseline_trials(
    storage: Any, study_name: str, *, warn: Callable[[str], None] | None = None
) -> list[FrozenTrial]:
    """The measured baseline trials stored beside study `study_name` (empty when none).

    Args:
        storage: An Optuna storage or RDB URL (the main study's).
        study_name: The main study's name; baselines live in `<study_name>.baselines`.
        warn: Told (one line) when the baselines were measured under another protocol than
            the main study's; they are then left out. Defaults to a line on stderr.

    Returns:
        The baseline study's trials that carry the user attribute "baseline".
    """
    import optuna

    from .study import RANKING_ONLY, make_storage, protocol_differences

    if isinstance(storage, str):
        storage = make_storage(storage)
    ours = study_user_attrs(storage, baseline_study_name(study_name))
    if ours is None:
        return []
    bname = baseline_study_name(study_name)
    main = (study_user_attrs(storage, study_name) or {}).get("protocol")
    diff = (protocol_differences(ours.get("protocol") or {}, main, ignore=RANKING_ONLY)
            if main is not None else [])
    if diff:
        (warn or _stderr_warning)(
            f"baselines in {bname!r} were measured under another protocol ({', '.join(diff)} "
            f"differ): left out; remeasure with `run_search.py baselines --study-name "
            f"{study_name} --replace`"
        )
        return []
    study = optuna.load_study(study_name=bname, storage=storage)
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")]
