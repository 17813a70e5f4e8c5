"""Throughput with local workers: trials per hour for 1 and 2 workers and their thread splits.

Each layout runs the CLI (`python run_search.py --workers W --threads T ...`) on a fresh
study. The space is pinned to one architecture (only the learning rate varies, which costs
nothing), and pruning is off, so every trial does the same work and throughput is all that
differs. Trials per hour are counted from the first trial's start to the last one's end
(the process start-up is reported apart).

Layouts: 1 worker x 1 thread (one core's worth), 1 worker x 2 threads, 2 workers x 1 thread.

    python benchmarks/workers.py            # full: 12 trials per layout, 3 epochs, 10,000 images
    python benchmarks/workers.py --quick    # harness check: 4 trials, 1 epoch, 1,000 images
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

import common

NAME = "workers"
LAYOUTS = ((1, 1), (1, 2), (2, 1))
FIXED_SPACE = {
    "n_blocks": [2, 2], "convs_per_block": [1, 1], "filters": [32], "kernel_size": [3],
    "pooling": ["max"], "activation": ["relu"], "batch_norm": [False],
    "conv_dropout": [0.0, 0.0], "flatten_dropout": [0.0, 0.0], "dense_layers": [1, 1],
    "dense_units": [128], "dense_dropout": [0.0, 0.0], "optimizer": ["adam"],
    "learning_rate": {"low": 0.001, "high": 0.002, "log": True}, "batch_size": [128],
}


def parse_args() -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=None, help="trials per layout (full 12)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (full 3)")
    p.add_argument("--train-subset", type=int, default=None, help="training images (full 10000)")
    p.add_argument("--val-size", type=int, default=None, help="validation images (full 10000)")
    args = p.parse_args()
    defaults = ({"trials": 4, "epochs": 1, "train_subset": 1_000, "val_size": 1_000} if args.quick
                else {"trials": 12, "epochs": 3, "train_subset": 10_000, "val_size": 10_000})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main() -> int:
    args = parse_args()
    if args.render_only:
        saved = common.load_result(NAME, args.quick)
        print(f"updated {common.update_doc(NAME, args.quick, render(saved))}")
        return 0
    env = common.environment()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    root = common.fresh_dir(common.RUNS / f"{NAME}-{common.form(args.quick)}")
    space_file = root / "space.json"
    space_file.write_text(json.dumps(FIXED_SPACE), encoding="utf-8")
    runs = []
    for workers, threads in LAYOUTS:
        name = f"w{workers}x{threads}"
        cmd = [sys.executable, str(common.ROOT / "run_search.py"), "--trials", str(args.trials),
               "--workers", str(workers), "--threads", str(threads), "--study-name", name,
               "--results-dir", str(root), "--space", str(space_file), "--pruner", "none",
               "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
               "--val-size", str(args.val_size), "--seed", "0", "--no-progress",
               # Trials per hour, not the final fit: the default export trains for up to
               # 40 minutes on all 60,000 images, the same in every layout.
               "--no-export"]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        code, wall = common.run_logged(cmd, root / f"{name}.log")
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / name / 'study.db'}")
        done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
        starts = [t.datetime_start for t in done if t.datetime_start]
        ends = [t.datetime_complete for t in done if t.datetime_complete]
        span = (max(ends) - min(starts)).total_seconds() if done else None
        runs.append({
            "workers": workers, "threads": threads, "exit_code": code, "wall_s": wall,
            "complete": len(done), "span_s": span,
            "trials_per_hour": 3600 * len(done) / span if span else None,
            "trials_per_hour_wall": 3600 * len(done) / wall if wall else None,
            "mean_trial_s": sum((t.duration or datetime.timedelta()).total_seconds()
                                for t in done) / len(done) if done else None,
        })
        print(f"{name}: {len(done)} trials, {runs[-1]['trials_per_hour'] or 0:.0f}/h "
              f"(exit {code}, {wall:.0f} s)", flush=True)
    result = {
        "settings": {"trials": args.trials, "epochs": args.epochs,
                     "train_subset": args.train_subset, "val_size": args.val_size,
                     "space": FIXED_SPACE, "export": False},
        "runs": runs,
    }
    common.publish(NAME, args.quick, result, env, render, no_doc=args.no_doc)
    return 0


def render(r: dict[str, Any]) -> str:
    s = r["settings"]
    base = next((x["trials_per_hour"] for x in r["runs"]
                 if (x["workers"], x["threads"]) == (1, 2)), None)
    rows = []
    for x in r["runs"]:
        tph = x["trials_per_hour"]
        rows.append([
            f"{x['workers']} worker(s) x {x['threads']} thread(s)", x["complete"],
            f"{tph:.0f}" if tph else "n/a",
            f"{x['trials_per_hour_wall']:.0f}" if x["trials_per_hour_wall"] else "n/a",
            common.secs(x["mean_trial_s"]),
            f"{tph / base:.2f}x" if tph and base else "n/a",
            x["exit_code"],
        ])
    return "\n\n".join([
        common.section_title("Local workers: trials per hour", r["form"] == "quick"),
        common.provenance(r),
        f"{s['trials']} trials per layout of one fixed architecture (only the learning rate "
        f"varies; no pruning), {s['epochs']} epoch(s) on {s['train_subset']:,} training / "
        f"{s['val_size']:,} validation images; `python run_search.py --workers W --threads T"
        + (" --no-export`: the whole command is start-up and search, without the final fit."
           if s.get("export") is False else "`, the final fit and export included."),
        common.md_table(["layout", "trials", "trials/hour (first start to last end)",
                         "trials/hour (whole command)", "mean trial", "vs 1x2", "exit"], rows),
        "On a machine shared with other work, these numbers move with its load; compare "
        "layouts measured in the same run only.",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
