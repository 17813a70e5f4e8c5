"""Search efficiency: best validation accuracy against wall-clock time, six searchers.

Same space, data, protocol and time budget for each; several seeds each; every run is a
fresh study in its own process (runs go seed by seed, so that a change in the machine's
load hits all searchers alike; `--parallel 2` runs two at a time with one CPU thread each,
which on 2 cores gets more trials per hour than one run with two threads):

- ours: the tool's default: TPE (multivariate, seeded) with the Hyperband pruner, its first
  trials the nearest points of the space to the seed documents' baselines (warm start)
- ours-cold: the same without the warm start (TPE's first 10 trials random)
- tpe: the same TPE without pruning
- random: random search without pruning
- kt-hyperband, kt-bayesian: KerasTuner's Hyperband and Bayesian optimisation through
  `fmnist_search.kt_engine.run_keras_tuner` (same split, epochs and recording)

Each run records (time since its search started, best-so-far) from its complete trials'
`datetime_complete`; trials completing after the budget are not counted. Reported: the best
at the budget, and the time each searcher needs to reach the accuracy KerasTuner Hyperband
ends with (median over its seeds). Target: ours in at most half KerasTuner Hyperband's time.

    python benchmarks/search_efficiency.py            # full: 3 seeds x 30 min per searcher
    python benchmarks/search_efficiency.py --budget 300 --parallel 2   # what fits a session
    python benchmarks/search_efficiency.py --quick    # harness check: 2 seeds x 20 s, tiny data
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import common

NAME = "search_efficiency"
METHODS: dict[str, dict[str, str]] = {
    "ours": {"label": "ours: TPE + Hyperband pruning + warm start", "sampler": "tpe",
             "pruner": "hyperband", "warm_start": "yes"},
    "ours-cold": {"label": "ours without the warm start", "sampler": "tpe",
                  "pruner": "hyperband"},
    "tpe": {"label": "Optuna TPE, no pruning", "sampler": "tpe", "pruner": "none"},
    "random": {"label": "random search", "sampler": "random", "pruner": "none"},
    "kt-hyperband": {"label": "KerasTuner Hyperband", "algorithm": "hyperband"},
    "kt-bayesian": {"label": "KerasTuner Bayesian", "algorithm": "bayesian"},
}
REFERENCE = "kt-hyperband"
MANY = 1_000_000  # "--trials": the budget is time


def parse_args() -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=None, help="seconds per run (full 1800)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (full 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (full 3)")
    p.add_argument("--train-subset", type=int, default=None, help="training images (full 10000)")
    p.add_argument("--val-size", type=int, default=None, help="validation images (full 10000)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at a time, each with cores/N CPU threads (default 1)")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    defaults = (
        {"budget": 20.0, "seeds": 2, "epochs": 2, "train_subset": 1_000, "val_size": 1_000}
        if args.quick else
        {"budget": 1800.0, "seeds": 3, "epochs": 3, "train_subset": 10_000, "val_size": 10_000}
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- one run (child)

def child(args: Any) -> int:
    """One searcher, one seed, in this process: a fresh study, searched for --budget seconds."""
    common.quiet_tensorflow()
    from fmnist_search import study as st
    from fmnist_search.baseline_runs import warm_start, warm_start_points
    from fmnist_search.objective import Objective, SearchProtocol, make_folds
    from fmnist_search.workers import set_threads
    from searchspace import SearchSpace

    if args.threads:
        set_threads(args.threads)
    method = METHODS[args.child]
    data = common.load_data(args.data_dir)
    protocol = SearchProtocol(epochs=args.epochs, val_size=args.val_size,
                              train_subset=args.train_subset, seed=args.seed,
                              # KerasTuner validates every image after every epoch, as the
                              # CLI's keras-tuner engine does; ours use the interim subset.
                              interim_val_size=0 if "algorithm" in method else 2_000)
    folds = make_folds(data, protocol)
    space = SearchSpace()
    name = f"{args.child}-s{args.seed}"
    run_dir = Path(args.run_dir)
    study = st.open_study(
        st.default_storage(run_dir, name), name,
        st.make_sampler(method.get("sampler", "tpe"), args.seed,
                        enqueued=len(warm_start_points(space)) if method.get("warm_start") else 0),
        st.make_pruner(method.get("pruner", "none"), protocol.steps),
        {**protocol.to_dict(), "space": space.to_dict()},
    )
    # The clock starts here, after imports and data loading, for every searcher alike.
    study.set_user_attr("bench_t0", datetime.datetime.now().isoformat())
    try:
        if "algorithm" in method:
            from fmnist_search.kt_engine import run_keras_tuner

            run_keras_tuner(study, folds, space, protocol, algorithm=method["algorithm"],
                            total_trials=MANY, seed=args.seed, results_dir=run_dir,
                            timeout=args.budget)
        else:
            if method.get("warm_start"):
                warm_start(study, space)
            st.run_trials(study, Objective(folds, space, protocol), MANY, timeout=args.budget)
    except st.StudyError as e:  # a run of failures: what was recorded still counts
        print(f"search stopped: {e}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- analysis

def curve(study: Any, budget: float) -> dict[str, Any]:
    """Best-so-far steps (seconds since the search started, accuracy) within the budget."""
    t0 = datetime.datetime.fromisoformat(study.user_attrs["bench_t0"])
    points, finished, epochs = [], 0, 0
    best = None
    for t in sorted(study.get_trials(), key=lambda t: t.datetime_complete or datetime.datetime.max):
        if t.datetime_complete is None:
            continue
        at = (t.datetime_complete - t0).total_seconds()
        if at > budget:
            continue
        epochs += int(t.user_attrs.get("epochs_run") or 0)
        if t.state.name in ("COMPLETE", "PRUNED"):
            finished += 1
        if t.state.name == "COMPLETE" and t.value is not None and (best is None or t.value > best):
            best = t.value
            points.append([round(at, 2), t.value])
    return {"points": points, "final": best, "finished": finished, "epochs": epochs,
            "trials": len(study.get_trials())}


def time_to(points: list[list[float]], target: float) -> float:
    """The first time the best-so-far reaches `target` (inf when it never does)."""
    for at, value in points:
        if value >= target - 1e-12:
            return at
    return math.inf


def median_time(times: list[float]) -> float:
    """Median that treats "never" as larger than anything (inf when most never reach)."""
    xs = sorted(times)
    if not xs:
        return math.inf
    mid = len(xs) // 2
    if len(xs) % 2:
        return xs[mid]
    a, b = xs[mid - 1], xs[mid]
    return math.inf if math.inf in (a, b) else (a + b) / 2


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per searcher: finals, and times to reach KerasTuner Hyperband's final accuracy."""
    ref_finals = [r["final"] for r in runs if r["method"] == REFERENCE and r["final"] is not None]
    # The lower median: with an even number of seeds, at least half of them reach it.
    target = statistics.median_low(ref_finals) if ref_finals else None
    out: dict[str, Any] = {"target": target, "methods": {}}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        finals = [r["final"] for r in rs if r["final"] is not None]
        times = [time_to(r["points"], target) for r in rs] if target is not None else []
        out["methods"][m] = {
            "seeds": len(rs),
            "final_mean": statistics.mean(finals) if finals else None,
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "finished_mean": statistics.mean(r["finished"] for r in rs),
            "epochs_mean": statistics.mean(r["epochs"] for r in rs),
            "times_to_target": times,
            "median_time_to_target": median_time(times) if times else None,
        }
    ours, ref = out["methods"].get("ours"), out["methods"].get(REFERENCE)
    out["ratio"] = None
    if ours and ref and ref["median_time_to_target"] not in (None, math.inf, 0.0):
        out["ratio"] = ours["median_time_to_target"] / ref["median_time_to_target"]
    return out


# ----------------------------------------------------------------------------- driver

def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    if args.render_only:
        saved = common.load_result(NAME, args.quick)
        saved["summary"] = summarise(saved["runs"])  # the analysis as it is now
        plot(saved, args.quick)
        print(f"updated {common.update_doc(NAME, args.quick, render(saved))}")
        return 0
    env = common.environment()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    if args.parallel < 1:
        raise SystemExit("--parallel must be at least 1")
    root = common.RUNS / f"{NAME}-{common.form(args.quick)}"
    # Seed-major order: with --parallel N, the runs that share the machine at any moment are
    # neighbours in this list, so every searcher meets the same kind of neighbour.
    jobs = [(seed, m) for seed in range(args.seeds) for m in methods]
    threads = max(1, (os.cpu_count() or 1) // args.parallel)

    def one(job: tuple[int, str]) -> dict[str, Any]:
        seed, m = job
        name = f"{m}-s{seed}"
        run_dir = common.fresh_dir(root / name)
        cmd = [sys.executable, __file__, "--child", m, "--seed", str(seed),
               "--run-dir", str(run_dir), "--budget", str(args.budget),
               "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
               "--val-size", str(args.val_size)]
        if args.parallel > 1:
            cmd += ["--threads", str(threads)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        # A trial started just before the budget may run past it: allow generously.
        code, wall = common.run_logged(cmd, run_dir / "run.log", timeout=3 * args.budget + 600)
        study = optuna.load_study(study_name=name,
                                  storage=f"sqlite:///{run_dir / name / 'study.db'}")
        c = curve(study, args.budget)
        print(f"{name}: best {common.acc(c['final'])} after {c['finished']} trials "
              f"(exit {code}, {wall:.0f} s)", flush=True)
        if code != 0:
            print(f"  {common.tail(run_dir / 'run.log')}", flush=True)
        return {"method": m, "seed": seed, "exit_code": code, "wall_s": wall, **c}

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(one, jobs))
    result = {
        "settings": {"budget_s": args.budget, "seeds": args.seeds, "epochs": args.epochs,
                     "train_subset": args.train_subset, "val_size": args.val_size,
                     "methods": methods, "parallel": args.parallel,
                     "threads_per_run": threads if args.parallel > 1 else None},
        "runs": runs,
        "summary": summarise(runs),
    }
    common.publish(NAME, args.quick, result, env, render, no_doc=args.no_doc, plot=plot)
    return 0


def plot(r: dict[str, Any], quick: bool) -> None:
    fig, ax = common.new_figure(7.5, 4.2)
    colors = dict(zip(METHODS, ("C3", "C4", "C0", "C7", "C2", "C1"), strict=True))
    budget = r["settings"]["budget_s"]
    seen = set()
    for run in r["runs"]:
        pts = run["points"]
        if not pts:
            continue
        xs = [p[0] for p in pts] + [budget]
        ys = [p[1] for p in pts] + [pts[-1][1]]
        label = None if run["method"] in seen else METHODS[run["method"]]["label"]
        seen.add(run["method"])
        ax.step(xs, ys, where="post", color=colors.get(run["method"]), alpha=0.8, lw=1.2,
                label=label)
    target = r["summary"]["target"]
    if target is not None:
        ax.axhline(target, color="C2", ls=":", lw=0.8)
    ax.set_xlabel("seconds since the search started")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title("Best-so-far, one line per seed" + (" (quick form)" if quick else ""))
    ax.legend(loc="lower right", fontsize=8)
    common.save_figure(fig, common.plot_path(NAME, quick))


def render(r: dict[str, Any]) -> str:
    s, summ = r["settings"], r["summary"]
    quick = r["form"] == "quick"
    rows = []
    for m, v in summ["methods"].items():
        t = v["median_time_to_target"]
        rows.append([
            METHODS[m]["label"], v["seeds"],
            f"{common.acc(v['final_mean'])} ± {v['final_std']:.4f}"
            if v["final_mean"] is not None else "n/a",
            f"{v['finished_mean']:.1f}", f"{v['epochs_mean']:.0f}",
            common.secs(t),
            ", ".join(common.secs(x) for x in v["times_to_target"]),
        ])
    ratio = summ["ratio"]
    met = None if ratio is None else ratio <= 0.5
    cold = summ["methods"].get("ours-cold")
    ref_t = (summ["methods"].get(REFERENCE) or {}).get("median_time_to_target")
    cold_note = ""
    if cold and ref_t not in (None, math.inf, 0.0):
        cold_t = cold["median_time_to_target"]
        cold_note = (
            "Ours starts from the nearest points of the space to the seed documents' "
            "baselines (the warm start, on by default); without it, ours needs "
            + (f"**{cold_t / ref_t:.2f}×** that time." if cold_t not in (None, math.inf)
               else "longer than the budget in most seeds.")
        )
    img = common.plot_path(NAME, quick).name
    failed = [f"{x['method']}-s{x['seed']} (exit {x['exit_code']})" for x in r["runs"]
              if x["exit_code"] != 0]
    return "\n\n".join(filter(None, [
        common.section_title("Search efficiency: best accuracy against time", quick),
        common.provenance(r),
        f"Default search space; {s['epochs']} epoch(s) per trial on {s['train_subset']:,} "
        f"training / {s['val_size']:,} validation images; {common.secs(s['budget_s'])} per run, "
        f"{s['seeds']} seed(s) per searcher, each run a fresh study in its own process"
        + (f"; {s['parallel']} runs at a time, {s['threads_per_run']} CPU thread(s) each "
           "(neighbours in seed-major order share the machine)." if s.get("parallel", 1) > 1
           else ", one run at a time."),
        common.md_table(
            ["searcher", "seeds", f"best at {common.secs(s['budget_s'])} (mean ± sd)",
             "finished trials", "epochs trained",
             f"median time to {common.acc(summ['target'])}", "per seed"],
            rows,
        ),
        f"The target accuracy is KerasTuner Hyperband's (lower) median final best "
        f"({common.acc(summ['target'])}). Ours needs "
        + (f"**{ratio:.2f}×** KerasTuner Hyperband's time to reach it." if ratio is not None
           else "an undefined share of KerasTuner Hyperband's time (one never reached it)."),
        common.verdict(met, "ours reaches it in at most half KerasTuner Hyperband's time"),
        cold_note,
        f"Failed runs: {', '.join(failed)} (see their run.log)." if failed else "",
        f"![best-so-far against time]({img})",
    ]))


if __name__ == "__main__":
    raise SystemExit(main())
