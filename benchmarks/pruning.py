"""What pruning saves: epochs trained and best accuracy, with and without the pruner.

The same search (seeded TPE, the same space, data, epochs and number of trials) run twice
per seed: with a pruner (the CLI's default, Hyperband, unless `--pruner` names another of
its pruners) and with none. Epochs trained are the sum of
`epochs_run` over all trials (pruned ones stop early); the best is the best complete trial's
validation accuracy. TPE's first 10 trials are random and identical in both runs, so with
few trials the comparison isolates what pruning cuts.

    python benchmarks/pruning.py            # full: 3 seeds x 50 trials, the CLI's defaults
    python benchmarks/pruning.py --quick    # harness check: 1 seed x 8 trials, 1,000 images

At the default 3 epochs per trial Hyperband cannot save 60% (see `max_saving`); where a
pruner can, for example:

    python benchmarks/pruning.py --pruner sha --epochs 9 --trials 30 --train-subset 2000 \
        --val-size 2000

After TPE's random trials the two runs of a seed part ways: each proposes from its own
results, so their best trials differ by the path as well as by what pruning cut.
`--sampler random` proposes the same configurations in the same order in both runs (the
sampler's draws do not depend on results; each trial's weights are seeded by its number),
so any accuracy lost is a trial that pruning stopped and that would have been the best.

Results go to `pruning.json`, or `pruning-<pruner>.json` for a pruner other than Hyperband
(`-random` added with `--sampler random`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import common

NAME = "pruning"
PRUNERS = ("hyperband", "sha", "median")
DESCRIBED = {
    "hyperband": "Optuna's Hyperband pruner (min 1 epoch, reduction factor 3)",
    "sha": "Optuna's successive halving pruner (min 1 epoch, reduction factor 3)",
    "median": "Optuna's median pruner (after 5 trials and 1 epoch)",
}
SHORT = {"hyperband": "Hyperband", "sha": "successive halving", "median": "median pruner"}
TARGET_SAVING_PCT = 60.0
TARGET_LOSS_PTS = 0.2
SAMPLERS = ("tpe", "random")


def parse_args() -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=None, help="trials per run (full 50)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (full 3)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    p.add_argument("--pruner", choices=PRUNERS, default="hyperband",
                   help="the pruner set against none (default: hyperband, the CLI's)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="tpe (the CLI's default) or random: the same trials in both runs")
    p.add_argument("--train-subset", type=int, default=None, help="training images (full 10000)")
    p.add_argument("--val-size", type=int, default=None, help="validation images (full 10000)")
    args = p.parse_args()
    defaults = ({"trials": 8, "seeds": 1, "train_subset": 1_000, "val_size": 1_000} if args.quick
                else {"trials": 50, "seeds": 3, "train_subset": 10_000, "val_size": 10_000})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Epochs, counts and best accuracy of one run, from its trials' records."""
    complete = [t["value"] for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    return {
        "epochs": sum(int(t["epochs_run"] or 0) for t in trials),
        "complete": sum(t["state"] == "COMPLETE" for t in trials),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "failed": sum(t["state"] == "FAIL" for t in trials),
        "best": max(complete) if complete else None,
    }


def result_name(pruner: str, sampler: str = "tpe") -> str:
    """The JSON and doc-section name: the default pruner's, under TPE, is plain `pruning`."""
    return (NAME if pruner == "hyperband" else f"{NAME}-{pruner}") + (
        "" if sampler == "tpe" else f"-{sampler}")


def best_fates(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed: the unpruned run's best trial and what became of the same-numbered trial
    in the pruned run (the same configuration under `--sampler random`)."""
    by = {(r["seed"], r["pruner"]): r for r in runs}
    fates = []
    for (seed, pruner), on in sorted(by.items()):
        off = by.get((seed, "none"))
        if pruner == "none" or off is None:
            continue
        done = [t for t in off["trials"] if t["state"] == "COMPLETE" and t["value"] is not None]
        if not done:
            continue
        best = max(done, key=lambda t: t["value"])
        twin = next((t for t in on["trials"] if t["number"] == best["number"]), None)
        fates.append({"seed": seed, "number": best["number"], "value": best["value"],
                      "state": twin["state"] if twin else None,
                      "epochs_run": twin["epochs_run"] if twin else None})
    return fates


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean epochs saved (%) and mean accuracy lost (points) over seeds."""
    by = {(r["seed"], r["pruner"]): r["summary"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    pruner = next((r["pruner"] for r in runs if r["pruner"] != "none"), "hyperband")
    saved, lost = [], []
    for s in seeds:
        on, off = by.get((s, pruner)), by.get((s, "none"))
        if not on or not off or not off["epochs"]:
            continue
        saved.append(100 * (off["epochs"] - on["epochs"]) / off["epochs"])
        if on["best"] is not None and off["best"] is not None:
            lost.append(100 * (off["best"] - on["best"]))
    return {
        "epochs_saved_pct": statistics.mean(saved) if saved else None,
        "accuracy_lost_pts": statistics.mean(lost) if lost else None,
        "per_seed_saved_pct": saved,
        "per_seed_lost_pts": lost,
    }


def main() -> int:
    args = parse_args()
    name = result_name(args.pruner, args.sampler)
    if args.render_only:
        saved = common.load_result(name, args.quick)
        print(f"updated {common.update_doc(name, args.quick, render(saved))}")
        return 0
    env = common.environment()
    common.quiet_tensorflow()
    from fmnist_search import study as st
    from fmnist_search.objective import Objective, SearchProtocol, make_folds
    from searchspace import SearchSpace

    data = common.load_data(args.data_dir)
    space = SearchSpace()
    runs = []
    for seed in range(args.seeds):
        protocol = SearchProtocol(epochs=args.epochs, val_size=args.val_size,
                                  train_subset=args.train_subset, seed=seed)
        folds = make_folds(data, protocol)
        for pruner in (args.pruner, "none"):
            run = f"{pruner}-s{seed}"
            root = common.RUNS / f"{name}-{common.form(args.quick)}"
            run_dir = common.fresh_dir(root / run)
            study = st.open_study(
                st.default_storage(run_dir, run), run, st.make_sampler(args.sampler, seed),
                st.make_pruner(pruner, protocol.steps),
                {**protocol.to_dict(), "space": space.to_dict()},
            )
            start = time.perf_counter()
            st.run_trials(study, Objective(folds, space, protocol), args.trials)
            wall = time.perf_counter() - start
            trials = [{"number": t.number, "state": t.state.name, "value": t.value,
                       "epochs_run": t.user_attrs.get("epochs_run")} for t in study.get_trials()]
            summary = summarise(trials)
            runs.append({"seed": seed, "pruner": pruner, "wall_s": wall, "summary": summary,
                         "trials": trials})
            print(f"seed {seed} pruner {pruner}: {summary['epochs']} epochs, best "
                  f"{common.acc(summary['best'])}, {wall:.0f} s", flush=True)
    result = {
        "settings": {"trials": args.trials, "seeds": args.seeds, "epochs": args.epochs,
                     "train_images": len(folds.splits[0][0]), "val_images": len(folds.splits[0][1]),
                     "sampler": args.sampler, "pruner": args.pruner},
        "runs": runs,
        **compare(runs),
    }
    common.publish(name, args.quick, result, env, render, no_doc=args.no_doc)
    return 0


def render(r: dict[str, Any]) -> str:
    s = r["settings"]
    pruner = s.get("pruner", "hyperband")  # results from before --pruner: Hyperband
    paired = s.get("sampler", "tpe") == "random"
    rows = []
    for run in r["runs"]:
        m = run["summary"]
        rows.append([run["seed"], run["pruner"], m["epochs"], m["complete"], m["pruned"],
                     m["failed"], common.acc(m["best"]), common.secs(run["wall_s"])])
    saved, lost = r["epochs_saved_pct"], r["accuracy_lost_pts"]
    met = None if saved is None or lost is None else (
        saved >= TARGET_SAVING_PCT and lost <= TARGET_LOSS_PTS)
    return "\n\n".join([
        common.section_title(
            "Pruning: epochs saved and accuracy kept"
            + ("" if pruner == "hyperband" and not paired
               else f" ({SHORT[pruner]}, {s['epochs']} epochs per trial"
               + (", the same trials in both runs)" if paired else ")")),
            r["form"] == "quick"),
        common.provenance(r),
        ("Random search" if paired else "TPE")
        + f" (seeded), {s['trials']} trials per run, {s['epochs']} epoch(s) per trial, "
        f"{s['train_images']:,} training / {s['val_images']:,} validation images, "
        f"{s['seeds']} seed(s); {DESCRIBED[pruner]} against none."
        + (" Both runs of a seed train the same configurations in the same order, with the "
           "same initial weights: what the pruned run loses, pruning cut." if paired else ""),
        common.md_table(["seed", "pruner", "epochs trained", "complete", "pruned", "failed",
                         "best val acc", "wall time"], rows),
        f"Mean over seeds: pruning trains **{saved:.1f}% fewer epochs**."
        if saved is not None else "No complete pair of runs.",
        f"Best validation accuracy lost with pruning: "
        f"**{lost:+.2f} points** (negative: pruning found a better model)."
        if lost is not None else "Accuracy difference: n/a (a run had no complete trial).",
        *([fates_text(best_fates(r["runs"]))] if paired else []),
        common.verdict(met, f">= {TARGET_SAVING_PCT:.0f}% fewer epochs for <= "
                       f"{TARGET_LOSS_PTS} points of best accuracy lost"),
        bound_note(s["epochs"], pruner),
    ])


def fates_text(fates: list[dict[str, Any]]) -> str:
    """One line per seed: was the unpruned run's best trial kept by the pruner?"""
    lines = []
    for f in fates:
        fate = ("complete there too" if f["state"] == "COMPLETE"
                else f"pruned there after {f['epochs_run']} epoch(s)" if f["state"] == "PRUNED"
                else f"{(f['state'] or 'missing').lower()} there")
        lines.append(f"- seed {f['seed']}: the best trial without pruning, trial "
                     f"{f['number']} ({common.acc(f['value'])}), was {fate}.")
    return "\n".join(lines) if lines else "No unpruned run had a complete trial."


def max_saving(epochs: int, rf: int = 3, pruner: str = "hyperband") -> tuple[list[int], float]:
    """Bracket sizes of Optuna's Hyperband (or successive halving) pruner, min 1 epoch and
    factor rf, and the most it can save.

    The saving assumes the steady state of successive halving: a 1/rf share of the trials
    goes on at every rung. (The first trials of a bracket are always kept, so real runs
    save less.) Successive halving is Hyperband's most aggressive bracket alone.
    """
    import math

    n = math.floor(math.log(epochs, rf) + 1e-9) + 1  # brackets, as Optuna computes them
    budgets = [math.ceil(n * rf ** (n - 1 - b) / (n - b)) for b in range(n)]
    if pruner == "sha":
        budgets = budgets[:1]
    saved = 0.0
    for b, w in enumerate(budgets):
        # Bracket b first compares at epoch rf**b, then at every rf-fold step.
        rungs = [rf ** (b + k) for k in range(n) if rf ** (b + k) < epochs]
        left, cost, prev = 1.0, 0.0, 0
        for r in rungs:
            cost += left * (r - prev)
            prev = r
            left /= rf
        cost += left * (epochs - prev)
        saved += w / sum(budgets) * (1 - cost / epochs)
    return budgets, saved


def bound_note(epochs: int, pruner: str = "hyperband") -> str:
    """What the pruner can save at most at this many epochs per trial."""
    if pruner == "median":
        return ("The median pruner stops a trial whose score after an epoch is below the "
                "median of earlier trials' at the same epoch: it can cut at any epoch, with "
                "no fixed bound on what it saves.")
    budgets, saved = max_saving(epochs, pruner=pruner)
    more = ", ".join(f"{100 * max_saving(e, pruner=pruner)[1]:.0f}% at {e}"
                     for e in (9, 27) if e > epochs)
    tail = (f"even in the steady state (a third of the trials going on at each comparison) "
            f"pruning saves at most about **{100 * saved:.0f}%** of the epochs at this setting"
            + (f" (about {more} epochs per trial)." if more else "."))
    if pruner == "sha":
        return (f"At {epochs} epoch(s) per trial, successive halving compares trials after "
                f"epochs 1, 3, 9, ... (those below the last); " + tail)
    return (
        f"At {epochs} epoch(s) per trial, Optuna's Hyperband (min 1 epoch, factor 3) has "
        f"{len(budgets)} bracket(s), receiving {', '.join(map(str, budgets))} of every "
        f"{sum(budgets)} trials; a bracket whose first comparison falls on the last epoch "
        f"never stops a trial early. E" + tail[1:]
    )


if __name__ == "__main__":
    raise SystemExit(main())
