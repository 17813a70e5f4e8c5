"""`run_search.py report`: one self-contained HTML page about a stored study.

Everything is in the page: figures are PNGs embedded as base64 data URIs (matplotlib,
Agg), styles are inline, there are no scripts or external links, so it reads offline and
can be mailed as one file. It shows the optimisation history, hyperparameter importances,
learning curves, accuracy against parameter count with the baselines, the leaderboard
and, once a model is exported, its confusion matrix and least-confident test images.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from . import study as st
from .cli import (
    EXIT_RUNTIME,
    Parser,
    StoredStudyError,
    add_storage_args,
    err,
    int_at_least,
    load_stored_study,
    study_leaderboard,
)
from .leaderboard import (
    DOCUMENTED_NOTE,
    atomic_write,
    load_baseline_trials,
    unranked_summary,
    write_leaderboard_files,
)
from .multiobjective import accuracy_of

matplotlib.use("Agg")  # no display: the figures only become PNG bytes

REPORT_FILE = "report.html"
CARD_PATH = Path("best_model") / "model_card.json"
MIN_TRIALS_FOR_IMPORTANCE = 4
MAX_LEAST_CONFIDENT = 16
# Colour-blind-safe palette (Okabe-Ito).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]


@dataclass
class Section:
    """One part of the page: a heading, an optional figure and notes."""

    title: str
    image: str | None = None  # data URI
    alt: str = ""
    notes: list[str] = field(default_factory=list)
    html_body: str = ""


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The `report` sub-command's parser."""
    p = Parser(
        prog=prog,
        description="Write results/<study>/report.html: a self-contained page (figures embedded) "
        "with the optimisation history, importances, learning curves, accuracy vs parameters, "
        "the leaderboard and, after an export, the model's confusion matrix. Also writes "
        "leaderboard.csv/.md/.json beside it.",
    )
    p.add_argument(
        "--top",
        type=int_at_least(1),
        default=25,
        help="ranked rows in the leaderboard table (default: 25)",
    )
    p.add_argument(
        "--curves",
        type=int_at_least(1),
        default=5,
        help="complete trials whose learning curves are drawn (default: 5)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="where the test images are, for the least-confident images of an "
        "exported model (default: the search's search order, no download)",
    )
    add_storage_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the report of the stored study; print where it was written."""
    try:
        study = load_stored_study(args)
    except StoredStudyError as e:
        err(str(e))
        return EXIT_RUNTIME
    out_dir = st.study_dir(args.results_dir, args.study_name)
    try:
        baselines = load_baseline_trials(study._storage, study.study_name)
    except Exception as e:  # a damaged baselines study should not cost the whole report
        baselines = []
        print(f"warning: baselines left out: {type(e).__name__}: {e}", file=sys.stderr)
    # The same table as `leaderboard` writes: test accuracies, objectives, Pareto front.
    df = study_leaderboard(study, baselines=baselines)
    try:
        page = build_report(
            study, baselines, df, out_dir, top=args.top, curves=args.curves,
            data_dir=args.data_dir,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        files = write_leaderboard_files(df, out_dir)
        path = out_dir / REPORT_FILE
        atomic_write(path, page)
    except OSError as e:
        err(f"cannot write the report under {out_dir}: {e.strerror or e}")
        return EXIT_RUNTIME
    print(f"wrote {path}")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


# --------------------------------------------------------------------------- figures


def _png(fig: Figure) -> str:
    """The figure as a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _best_baseline(df: pd.DataFrame) -> pd.Series | None:
    base = df[(df["kind"] == "baseline") & (df["state"] == "complete")]
    return None if base.empty else base.iloc[0]


def fig_history(trials: Sequence[FrozenTrial], df: pd.DataFrame) -> Section:
    """Each trial's score in the order run, the best so far, and the best baseline."""
    sec = Section("Optimisation history", alt="validation accuracy of each trial in order")
    done = [t for t in trials if t.state == TrialState.COMPLETE and accuracy_of(t) is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if not done and not pruned:
        sec.notes.append("No finished trials yet.")
        return sec
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
            marker="x",
            color="#aaaaaa",
            label="pruned (value when stopped)",
            zorder=2,
        )
    if done:
        xs = [t.number for t in done]
        ys = [float(accuracy_of(t) or 0.0) for t in done]
        ax.scatter(xs, ys, color=PALETTE[0], label="complete", zorder=3)
        ax.step(xs, np.maximum.accumulate(ys), where="post", color=PALETTE[1], label="best so far")
    best = _best_baseline(df)
    if best is not None:
        ax.axhline(
            best["val_accuracy"],
            color=PALETTE[5],
            ls="--",
            lw=1,
            label=f"best baseline: {best['trial']} ({best['val_accuracy']:.4f})",
        )
    ax.set_xlabel("trial number")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    sec.image = _png(fig)
    fails = sum(t.state == TrialState.FAIL for t in trials)
    if fails:
        sec.notes.append(f"{fails} failed trial(s) have no score and are not drawn.")
    return sec


def fig_importances(study: optuna.Study) -> Section:
    """fANOVA importances of the hyperparameters (only those every complete trial has)."""
    sec = Section("Hyperparameter importances", alt="importance of each hyperparameter")
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        sec.notes.append(
            f"Not enough complete trials to estimate importances ({n}; at least "
            f"{MIN_TRIALS_FOR_IMPORTANCE} needed)."
        )
        return sec
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
    except (ValueError, RuntimeError) as e:
        sec.notes.append(f"Importances could not be estimated: {e}")
        return sec
    if not imp:
        sec.notes.append("No hyperparameter varied across the complete trials.")
        return sec
    names = list(imp)[::-1]
    fig = Figure(figsize=(8, 0.35 * len(names) + 1.2))
    ax = fig.subplots()
    ax.barh(names, [imp[k] for k in names], color=PALETTE[0])
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.grid(axis="x", alpha=0.3)
    sec.image = _png(fig)
    sec.notes.append(
        f"From {n} complete trials. Parameters that exist only in some trials (per-block "
        "filters, SGD's momentum...) are left out, since fANOVA needs them in every trial."
    )
    return sec


def _val_curve(trial: FrozenTrial) -> tuple[list[int], list[float]]:
    """The validated epochs (1-based) and their accuracy, averaged over the folds that
    validated that epoch (an epoch no pruner reads is not validated: NaN in the history)."""
    try:
        folds = json.loads(trial.user_attrs.get("history") or "[]")
    except (TypeError, ValueError):
        return [], []
    curves = [f.get("val_accuracy", []) for f in folds if isinstance(f, dict)]
    xs: list[int] = []
    ys: list[float] = []
    for e in range(max((len(c) for c in curves), default=0)):
        at = [float(c[e]) for c in curves if len(c) > e and c[e] is not None
              and math.isfinite(float(c[e]))]
        if at:
            xs.append(e + 1)
            ys.append(float(np.mean(at)))
    return xs, ys


def fig_curves(
    trials: Sequence[FrozenTrial], baselines: Sequence[FrozenTrial], df: pd.DataFrame, top: int
) -> Section:
    """Learning curves of the best complete trials, pruned ones in grey, baselines dashed."""
    sec = Section("Learning curves", alt="validation accuracy per epoch")
    by_number = {t.number: t for t in trials}
    ranked = df[(df["kind"] == "trial") & (df["state"] == "complete")].head(top)
    best = [by_number[int(n)] for n in ranked["trial"]]
    pruned = [t for t in trials if t.state == TrialState.PRUNED][-40:]
    measured = [t for t in baselines if t.state == TrialState.COMPLETE]
    if not any(_val_curve(t)[0] for t in [*best, *pruned, *measured]):
        sec.notes.append("No per-epoch history stored yet.")
        return sec
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    for i, t in enumerate(pruned):
        ax.plot(
            *_val_curve(t),
            color="#bbbbbb",
            lw=0.8,
            label="pruned trials" if i == 0 else None,
            zorder=1,
        )
    for i, t in enumerate(best):
        ax.plot(
            *_val_curve(t),
            marker="o",
            ms=3,
            color=PALETTE[i % len(PALETTE)],
            label=f"trial {t.number} ({accuracy_of(t) or 0:.4f})",
            zorder=3,
        )
    for i, t in enumerate(measured[:6]):
        ax.plot(
            *_val_curve(t),
            ls="--",
            lw=1,
            color=PALETTE[(i + 3) % len(PALETTE)],
            label=f"baseline {t.user_attrs.get('baseline')}",
            zorder=2,
        )
    ax.set_xlabel("epoch (mean over folds under K-fold)")
    ax.set_ylabel("validation accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    sec.image = _png(fig)
    sec.notes.append(
        f"The {len(best)} best complete trials in colour; pruned trials in grey, "
        "up to where they were stopped; baselines dashed. Each point is scored on the "
        "interim validation images (`--interim-val-size`, a stratified subset unless 0); "
        "with a subset, a trial is validated only after the epochs its pruner reads and "
        "after its last, so its line joins those (under K-fold an epoch's point averages "
        "the folds validated there), while the baselines are validated after every epoch. "
        "The legend gives each trial's score, on every validation image after its last "
        "epoch."
    )
    return sec


def fig_pareto(df: pd.DataFrame) -> Section:
    """Accuracy against parameter count (log scale), the Pareto front, the baselines."""
    sec = Section("Accuracy vs parameter count", alt="validation accuracy against parameters")
    ok = df[(df["state"] == "complete") & df["params"].notna() & df["val_accuracy"].notna()]
    if ok.empty:
        sec.notes.append("No complete trials with a parameter count yet.")
        return sec
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    trials = ok[ok["kind"] == "trial"]
    base = ok[ok["kind"] == "baseline"]
    ax.scatter(
        trials["params"].astype(float),
        trials["val_accuracy"],
        color=PALETTE[0],
        alpha=0.6,
        label="trials",
        zorder=2,
    )
    front = ok[ok["pareto"]].sort_values("params")
    ax.step(
        front["params"].astype(float),
        front["val_accuracy"],
        where="post",
        color=PALETTE[1],
        lw=1.5,
        label="Pareto front",
        zorder=1,
    )
    if not base.empty:
        ax.scatter(
            base["params"].astype(float),
            base["val_accuracy"],
            marker="D",
            s=50,
            color=PALETTE[5],
            edgecolor="black",
            label="baselines (measured here)",
            zorder=4,
        )
        for _, r in base.iterrows():
            ax.annotate(
                str(r["trial"]),
                (float(r["params"]), r["val_accuracy"]),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=8,
                color=PALETTE[5],
            )
    if not trials.empty:
        top = trials.iloc[0]
        ax.scatter(
            [float(top["params"])],
            [top["val_accuracy"]],
            marker="*",
            s=250,
            color=PALETTE[2],
            edgecolor="black",
            zorder=5,
            label=f"best trial ({int(top['trial'])})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    sec.image = _png(fig)
    not_run = int((df["state"] == "not run").sum())
    if not_run:
        sec.notes.append(
            f"{not_run} baseline(s) not measured under this protocol yet: run "
            "`python run_search.py baselines` to add them."
        )
    return sec


def _label(v: Any, names: Sequence[str]) -> str:
    if isinstance(v, (int, np.integer)) and 0 <= int(v) < len(names):
        return str(names[int(v)])
    return str(v)


def fig_model_card(
    card: dict[str, Any], study: optuna.Study, data_dir: str | None
) -> list[Section]:
    """The exported model's confusion matrix and least-confident test images."""
    names = [str(n) for n in card.get("class_names") or []]
    acc = card.get("test_accuracy")
    title = "Exported model: confusion matrix on the test set"
    sec = Section(title, alt="confusion matrix, rows true class, columns predicted class")
    cm = np.asarray(card.get("confusion_matrix") or [], dtype=float)
    if cm.ndim == 2 and cm.size and cm.shape[0] == cm.shape[1]:
        k = cm.shape[0]
        names = names if len(names) == k else [str(i) for i in range(k)]
        fig = Figure(figsize=(7.5, 6.5))
        ax = fig.subplots()
        rows = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(cm[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
        sec.image = _png(fig)
    else:
        sec.notes.append("The model card has no usable confusion matrix.")
    if isinstance(acc, (int, float)):
        sec.notes.insert(
            0,
            (
                f"Ensemble of trials {', '.join(str(m.get('trial')) for m in card['ensemble'])}"
                if card.get("ensemble")
                else f"Trial {card.get('trial', '?')}"
            )
            + f": test accuracy {acc:.4f} on "
            f"{card.get('test_images', int(cm.sum()) if cm.size else '?')} test "
            "images (the search never saw them). Counts in the cells; colour = "
            "share of the true class.",
        )
    sec.notes[1:1] = _trained_notes(card)
    out = [sec]
    least = card.get("least_confident")
    if isinstance(least, list) and least:
        out.append(_least_confident(least[:MAX_LEAST_CONFIDENT], names, card, study, data_dir))
    return out


def _trained_notes(card: dict[str, Any]) -> list[str]:
    """One line per model of the export: what was trained, for how long, and, when the final
    fit scaled it up, what the search had found."""
    ensemble = card.get("ensemble")
    members: list[Any] = ensemble if isinstance(ensemble, list) else [card]
    lines = []
    for m in members:
        if not isinstance(m, dict) or not m.get("architecture"):
            continue
        line = f"Trial {m.get('trial', '?')} trained as {m['architecture']}"
        if m.get("searched_architecture"):
            line += f" (scaled up from the searched {m['searched_architecture']})"
        if isinstance(m.get("final_epochs"), int):
            line += f", {m['final_epochs']} epochs"
        if m is not card and isinstance(m.get("test_accuracy"), (int, float)):
            line += f", test accuracy alone {m['test_accuracy']:.4f}"
        lines.append(line + ".")
    return lines


def _least_confident(
    items: list[dict[str, Any]],
    names: Sequence[str],
    card: dict[str, Any],
    study: optuna.Study,
    data_dir: str | None,
) -> Section:
    sec = Section(
        "Exported model: least-confident test images",
        alt="the test images the model was least sure about",
    )
    from .data import DataError, load_dataset

    try:
        data = load_dataset(data_dir, download=False, warn=lambda m: None)
    except DataError as e:
        sec.notes.append(f"Test images not shown: the data could not be loaded ({e}).")
        return sec
    expected = card.get("data_sha256") or study.user_attrs.get("protocol", {}).get("data_sha256")
    test_files = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if expected and any(expected.get(f) != data.sha256.get(f) for f in test_files if f in expected):
        sec.notes.append(
            f"Test images not shown: the data in {data.source_dir} are not the "
            "data the model was tested on (checksums differ); pass --data-dir."
        )
        return sec
    good = [
        it
        for it in items
        if isinstance(it.get("index"), int) and 0 <= it["index"] < len(data.x_test)
    ]
    if not good:
        sec.notes.append("Test images not shown: the model card lists no valid test indices.")
        return sec
    cols = min(8, len(good))
    nrows = math.ceil(len(good) / cols)
    fig = Figure(figsize=(1.6 * cols, 2.0 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, it in zip(axes, good, strict=False):
        ax.imshow(data.x_test[it["index"]].squeeze(), cmap="gray", vmin=0, vmax=1)
        prob = it.get("prob")
        p = f" {float(prob):.2f}" if isinstance(prob, (int, float)) else ""
        ax.set_title(
            f"#{it['index']}\ntrue {_label(it.get('true'), names)}\n"
            f"pred {_label(it.get('pred'), names)}{p}",
            fontsize=7,
        )
    sec.image = _png(fig)
    sec.notes.append("Each image: test index, true class, predicted class and its probability.")
    return sec


# --------------------------------------------------------------------------- tables


def _fmt(v: Any, spec: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    try:
        return format(v, spec) if spec else str(v)
    except (TypeError, ValueError):
        return str(v)


def leaderboard_html(df: pd.DataFrame, top: int) -> str:
    """The ranked rows (top N plus every baseline) and the unranked ones, as HTML tables."""
    ranked = df[df["state"] == "complete"]
    shown = ranked.head(top)
    extra = df[(df["kind"] == "baseline") & ~df.index.isin(shown.index)]
    rows = pd.concat([shown, extra])
    # Columns that would be empty for every row are left out.
    has_std = bool((rows["val_std"].fillna(0) > 0).any())
    has_test = bool(rows["test_accuracy"].notna().any())
    has_beats = bool(rows["beats"].notna().any())
    has_doc = bool(rows["documented_acc"].notna().any())

    def beats(r: pd.Series) -> str:
        if pd.isna(r["beats"]):
            return ""
        return f"+{r['margin_pts']:.2f} pts<br>vs {html.escape(str(r['beats']))}"

    def doc(r: pd.Series) -> str:
        if pd.isna(r["documented_acc"]):
            return ""
        return (
            f"{r['documented_acc']:.4f} {html.escape(str(r['documented_metric']))} "
            f"(doc {html.escape(str(r['source']))})<br><small>"
            f"{html.escape(str(r['documented_protocol']))}</small>"
        )

    def acc(r: pd.Series) -> str:
        if r["state"] == "not run":
            return "<em>not run</em>"
        if r["state"] == "fail":
            return f"<em>failed: {html.escape(str(r['reason']))}</em>"
        return _fmt(r["val_accuracy"], ".4f")

    def secs(r: pd.Series) -> str:
        return f"{r['train_time_s']:.0f}s" if pd.notna(r["train_time_s"]) else ""

    # (header, cell, css class): "num" cells are right-aligned and never wrap.
    cols: list[tuple[str, Any, str]] = [
        ("#", lambda r: _fmt(r["rank"]), "num"),
        ("trial", lambda r: html.escape(str(r["trial"])), "name"),
        ("architecture", lambda r: f"<code>{html.escape(str(r['architecture']))}</code>", "arch"),
        ("val acc", acc, "num"),
        *(
            [("± std", lambda r: _fmt(r["val_std"], ".4f") if r["val_std"] else "", "num")]
            if has_std
            else []
        ),
        ("params", lambda r: _fmt(r["params"], ","), "num"),
        ("epochs", lambda r: _fmt(r["epochs"]), "num"),
        ("time", secs, "num"),
        *([("test acc", lambda r: _fmt(r["test_accuracy"], ".4f"), "num")] if has_test else []),
        *([("beats baseline", beats, "txt")] if has_beats else []),
        ("★", lambda r: "★" if r["pareto"] else "", "mid"),
        *([("documented (own protocol)", doc, "doc")] if has_doc else []),
    ]
    # A wide table scrolls inside its box rather than widening the page.
    out = ['<div class="scroll"><table class="lb"><thead><tr>']
    out += [f'<th class="{c}">{html.escape(h)}</th>' for h, _, c in cols]
    out.append("</tr></thead><tbody>")
    for _, r in rows.iterrows():
        kind = "baseline" if r["kind"] == "baseline" else "trial"
        cells = "".join(f'<td class="{c}">{cell(r)}</td>' for _, cell, c in cols)
        out.append(f'<tr class="{kind}">{cells}</tr>')
    out.append("</tbody></table></div>")
    unranked = df[df["state"].isin(["pruned", "fail"])]
    if len(unranked):
        out.append("<h3>Pruned and failed trials (not ranked)</h3>")
        out.append(
            '<table class="lb"><thead><tr><th>trial</th><th>state</th>'
            '<th>architecture</th><th class="num">reached</th><th>reason</th></tr></thead><tbody>'
        )
        for _, r in unranked.iterrows():
            out.append(
                f'<tr><td class="num">{html.escape(str(r["trial"]))}</td>'
                f"<td>{html.escape(r['state'])}</td>"
                f'<td class="arch"><code>{html.escape(str(r["architecture"]))}</code></td>'
                f'<td class="num">{_fmt(r["val_accuracy"], ".4f")}</td>'
                f"<td>{html.escape(str(r['reason']))}</td></tr>"
            )
        out.append("</tbody></table>")
    return "\n".join(out)


# --------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0 auto;max-width:1150px;padding:1.5em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#555} .note{color:#555;font-size:.92em}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
table.lb{border-collapse:collapse;font-size:.86em;width:100%}
table.lb th,table.lb td{border:1px solid #ddd;padding:.25em .45em;vertical-align:top}
table.lb th{background:#f3f3f3;text-align:left}
table.lb .num{text-align:right;white-space:nowrap} table.lb .mid{text-align:center}
table.lb .arch{min-width:15em} table.lb .doc{min-width:11em;font-size:.9em}
.scroll{overflow-x:auto}
table.lb th{white-space:nowrap}
table.lb tr.baseline{background:#fff4e5}
table.lb code{font-size:.95em;white-space:normal}
.kv td{padding:.1em .8em .1em 0}
.summary{background:#f6f9fc;border-left:4px solid #0072B2;padding:.6em 1em}
"""


def _protocol_html(protocol: dict[str, Any]) -> str:
    if not protocol:
        return "<p class='note'>No protocol stored with this study.</p>"
    split = (
        f"stratified {protocol.get('cv')}-fold cross-validation"
        if protocol.get("cv")
        else f"holdout split of {protocol.get('val_size')} validation images"
    )
    subset = protocol.get("train_subset")
    rows = [
        ("split", split),
        ("epochs per trial (per fold)", protocol.get("epochs")),
        ("training subset", f"{subset} images per split" if subset else "all training images"),
        ("validation before the last epoch",
         f"{protocol['interim_val_size']} images (stratified subset), after the epochs "
         "the pruner reads"
         if protocol.get("interim_val_size") else "every validation image"),
        ("score", protocol.get("score") or "best epoch, every validation image (older study)"),
        ("seed", protocol.get("seed")),
        ("classes", ", ".join(map(str, protocol.get("class_names") or []))),
    ]
    return (
        "<table class='kv'>"
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows
        )
        + "</table>"
    )


def card_mismatch(card: dict[str, Any], study: optuna.Study) -> str | None:
    """Why a model card found in the study's folder was not exported from this study (None if
    it may have been): a folder under --results-dir can hold another storage's study of the
    same name. Only the fields the card has are compared."""
    if "study" in card and card["study"] != study.study_name:
        return f"its study is {card['study']!r}"
    if isinstance(card.get("protocol"), dict):
        protocol = study.user_attrs.get("protocol") or {}
        diff = st.protocol_differences(card["protocol"], protocol)
        if diff:
            return f"its search protocol differs in {', '.join(diff)}"
    if "val_accuracy" in card:
        number = card.get("trial")
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        val = accuracy_of(trial) if trial is not None else None
        if val is None or card["val_accuracy"] is None or abs(val - card["val_accuracy"]) > 1e-9:
            return f"its trial {number} is not this study's"
    return None


def build_report(
    study: optuna.Study,
    baselines: Sequence[FrozenTrial],
    df: pd.DataFrame,
    out_dir: Path,
    *,
    top: int = 25,
    curves: int = 5,
    data_dir: str | None = None,
) -> str:
    """The whole page as one HTML string (no file written); `df` is the study's leaderboard."""
    trials = st.trials_with_annotations(study)
    sections = [
        fig_history(trials, df),
        fig_importances(study),
        fig_curves(trials, baselines, df, curves),
        fig_pareto(df),
    ]
    card_path = out_dir / CARD_PATH
    if card_path.exists():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            if not isinstance(card, dict):
                raise ValueError("not a JSON object")
            other = card_mismatch(card, study)
            if other:
                sections.append(Section("Exported model", notes=[
                    f"{card_path} belongs to another study ({other}): left out; "
                    "`python run_search.py export` exports this one there."]))
            else:
                sections += fig_model_card(card, study, data_dir)
        except (OSError, ValueError) as e:
            sections.append(Section("Exported model", notes=[f"{card_path} is unreadable: {e}"]))
    else:
        sections.append(
            Section(
                "Exported model",
                notes=[
                    "No model exported yet: `python run_search.py export` writes "
                    f"{CARD_PATH} and its confusion matrix then appears here."
                ],
            )
        )
    protocol = study.user_attrs.get("protocol") or {}
    ranked = df[df["state"] == "complete"]
    best_trial = ranked[ranked["kind"] == "trial"].head(1)
    summary = html.escape(unranked_summary(df)) + "."
    if len(best_trial):
        b = best_trial.iloc[0]
        summary = (
            f"Best trial <b>{int(b['trial'])}</b>: validation accuracy "
            f"<b>{b['val_accuracy']:.4f}</b> with {int(b['params']):,} parameters, "
            f"<code>{html.escape(str(b['architecture']))}</code>"
        )
        if pd.notna(b["beats"]):
            summary += (
                f"; beats the baseline <b>{html.escape(str(b['beats']))}</b> by "
                f"{b['margin_pts']:.2f} points under the same protocol"
            )
        summary += ". " + html.escape(unranked_summary(df)) + "."
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Report: {html.escape(study.study_name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Architecture search: {html.escape(study.study_name)}</h1>",
        f"<p class='meta'>Generated {now} from the study's storage. Trials: {len(trials)}.</p>",
        f"<p class='summary'>{summary}</p>",
        "<h2>Protocol</h2>",
        _protocol_html(protocol),
        "<p class='note'>Every trial and every measured baseline was scored this way, so they "
        "rank together. " + html.escape(DOCUMENTED_NOTE) + ".</p>",
    ]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.image:
            parts.append(f'<img src="{sec.image}" alt="{html.escape(sec.alt)}">')
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in sec.notes]
        parts.append(sec.html_body)
    parts += [
        "<h2>Leaderboard</h2>",
        f"<p class='note'>Top {top} ranked rows plus every baseline (shaded). ★ = on the "
        "Pareto front: no other complete row is both at least as accurate and at least as "
        "small.</p>",
        leaderboard_html(df, top),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
