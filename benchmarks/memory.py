"""Memory over many trials in one process: RSS after each trial of a small search.

The search's own path (`study.run_trials` on an SQLite study, the `Objective`, TPE and the
Hyperband pruner) over a small space on a stratified subset; the process's resident set
size (psutil) is read after every trial. Growth is measured from the end of the first trial
(TensorFlow's start-up allocations are not a leak) to the end of the last.

Then the same search through the CLI as a user runs it (`run_search.py --recycle-after N`,
one worker): the peak RSS of each successive worker process, sampled twice a second, shows
whether recycling bounds what TensorFlow keeps.

    python benchmarks/memory.py            # full: 100 trials on 2,000 training images
    python benchmarks/memory.py --quick    # harness check: 30 trials on 500 images
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
from typing import Any

import common

NAME = "memory"
SMALL_SPACE = {
    "n_blocks": [1, 2], "convs_per_block": [1, 2], "filters": [8, 16, 32], "kernel_size": [3, 5],
    "dense_layers": [0, 1], "dense_units": [32, 64], "batch_size": [64, 128],
}
TARGET_MB = 100.0


def parse_args() -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=None, help="trials (full 100, quick 30)")
    p.add_argument("--train-subset", type=int, default=None, help="training images (full 2000)")
    p.add_argument("--val-size", type=int, default=None, help="validation images (full 2000)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    p.add_argument("--recycle-after", type=int, default=10,
                   help="trials per worker process in the CLI run (default 10; 0 skips it)")
    p.add_argument("--no-bare", action="store_true",
                   help="skip the comparison with bare Keras on the same configs")
    p.add_argument("--bare-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    defaults = ({"trials": 30, "train_subset": 500, "val_size": 500} if args.quick
                else {"trials": 100, "train_subset": 2_000, "val_size": 2_000})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def bare_child(args: Any) -> int:
    """Train the configs of a finished study with bare Keras; print RSS after each as JSON.

    Runs in its own process, so the tool's run leaves nothing behind in it.
    """
    common.quiet_tensorflow()
    import keras
    import optuna
    import psutil

    from fmnist_search.model import build_cnn
    from fmnist_search.objective import SearchProtocol, make_folds
    from searchspace import CnnConfig

    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{args.bare_child}")
    data = common.load_data(args.data_dir)
    protocol = SearchProtocol(epochs=args.epochs, val_size=args.val_size,
                              train_subset=args.train_subset, seed=0)
    folds = make_folds(data, protocol)
    tr, va = folds.splits[0]
    x, y, xv, yv = folds.x[tr], folds.y[tr], folds.x[va], folds.y[va]
    proc = psutil.Process()
    rss = []
    for t in study.get_trials():
        cfg = CnnConfig.from_json(t.user_attrs["config"])
        keras.utils.set_random_seed(t.number)
        model = build_cnn(cfg, num_classes=folds.num_classes)
        model.fit(x, y, batch_size=cfg.batch_size, epochs=protocol.epochs, verbose=0,
                  validation_data=(xv, yv))
        del model
        keras.backend.clear_session(free_memory=True)
        gc.collect()
        rss.append(proc.memory_info().rss / (1024 * 1024))
    print(json.dumps(rss))
    return 0


def main() -> int:
    args = parse_args()
    if args.bare_child:
        return bare_child(args)
    if args.render_only:
        saved = common.load_result(NAME, args.quick)
        plot(saved, args.quick)
        print(f"updated {common.update_doc(NAME, args.quick, render(saved))}")
        return 0
    env = common.environment()
    common.quiet_tensorflow()
    import numpy as np
    import psutil

    from fmnist_search import study as st
    from fmnist_search.objective import Objective, SearchProtocol, make_folds
    from searchspace import space_from_dict

    proc = psutil.Process()
    mb = 1024 * 1024
    data = common.load_data(args.data_dir)
    protocol = SearchProtocol(epochs=args.epochs, val_size=args.val_size,
                              train_subset=args.train_subset, seed=0)
    folds = make_folds(data, protocol)
    space = space_from_dict(SMALL_SPACE)
    run_dir = common.fresh_dir(common.RUNS / f"{NAME}-{common.form(args.quick)}")
    study = st.open_study(st.default_storage(run_dir, NAME), NAME, st.make_sampler("tpe", 0),
                          st.make_pruner("hyperband", protocol.steps),
                          {**protocol.to_dict(), "space": space.to_dict()})
    gc.collect()
    rss_start = proc.memory_info().rss / mb
    rss: list[float] = []

    def after_trial(study: Any, trial: Any) -> None:
        gc.collect()
        rss.append(proc.memory_info().rss / mb)
        print(f"trial {trial.number} {trial.state.name.lower()}: RSS {rss[-1]:.1f} MB", flush=True)

    st.run_trials(study, Objective(folds, space, protocol), args.trials, callbacks=[after_trial])
    trials = study.get_trials()
    x = np.arange(len(rss))
    tail_from = min(5, len(rss) - 2) if len(rss) > 2 else 0
    slope = 0.0
    if len(rss) - tail_from >= 2:  # the trend once the first trials' allocations are done
        slope = float(np.polyfit(x[tail_from:], rss[tail_from:], 1)[0])
    result = {
        "settings": {"trials": len(rss), "train_images": len(folds.splits[0][0]),
                     "val_images": len(folds.splits[0][1]), "epochs": protocol.epochs,
                     "space": SMALL_SPACE},
        "states": {s: sum(t.state.name == s for t in trials)
                   for s in ("COMPLETE", "PRUNED", "FAIL")},
        "rss_mb_before_first_trial": rss_start,
        "rss_mb_after_each_trial": rss,
        "growth_mb": rss[-1] - rss[0],
        "growth_after_5_mb": rss[-1] - rss[tail_from],
        "peak_mb": max(rss),
        "slope_mb_per_trial": slope,
    }
    if not args.no_bare:
        print("bare Keras on the same configs, in a fresh process ...", flush=True)
        cmd = [sys.executable, __file__, "--bare-child", str(run_dir / NAME / "study.db"),
               "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
               "--val-size", str(args.val_size)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            bare = json.loads(proc.stdout.strip().splitlines()[-1])
            result["bare_rss_mb_after_each_model"] = bare
            result["bare_growth_mb"] = bare[-1] - bare[0]
        except (IndexError, ValueError):  # keep the tool's measurement; say what went wrong
            err = [x for x in proc.stderr.splitlines() if x.strip()]
            result["bare_error"] = err[-1] if err else f"exit code {proc.returncode}"
            print(f"bare comparison failed: {result['bare_error']}", file=sys.stderr)
    if args.recycle_after:
        print(f"the same search through the CLI, --recycle-after {args.recycle_after} ...",
              flush=True)
        result["recycled"] = recycled_run(args, run_dir)
    common.publish(NAME, args.quick, result, env, render, no_doc=args.no_doc, plot=plot)
    print(f"RSS growth over {len(rss)} trials: {result['growth_mb']:+.1f} MB "
          f"({slope:+.2f} MB/trial after trial {tail_from + 1})")
    return 0


def recycled_run(args: Any, run_dir: Any) -> dict[str, Any]:
    """Run the CLI with one recycled worker; peak RSS (MB) of each worker process, in order."""
    import time

    import psutil

    space_file = run_dir / "small_space.json"
    space_file.write_text(json.dumps(SMALL_SPACE))
    cmd = [sys.executable, str(common.ROOT / "run_search.py"), "--trials", str(args.trials),
           "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
           "--val-size", str(args.val_size), "--space", str(space_file), "--seed", "0",
           "--results-dir", str(run_dir / "recycled"), "--study-name", NAME,
           "--recycle-after", str(args.recycle_after), "--workers", "1",
           "--no-export", "--no-progress"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    log = run_dir / "recycled.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        parent = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peaks: dict[int, float] = {}  # worker pid -> peak RSS (MB); dicts keep start order
        parent_peak = 0.0
        me = psutil.Process(parent.pid)
        while parent.poll() is None:
            try:
                parent_peak = max(parent_peak, me.memory_info().rss / 2**20)
                for c in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        peaks[c.pid] = max(peaks.get(c.pid, 0.0), c.memory_info().rss / 2**20)
            except psutil.Error:
                pass  # the parent is ending
            time.sleep(0.5)
    workers = list(peaks.values())
    return {"recycle_after": args.recycle_after, "exit_code": parent.returncode,
            "wall_s": time.perf_counter() - started, "worker_peak_mb": workers,
            "parent_peak_mb": parent_peak,
            "log_tail": common.tail(log, 1) if parent.returncode else ""}


def plot(r: dict[str, Any], quick: bool) -> None:
    fig, ax = common.new_figure(6.5, 3.2)
    rss = r["rss_mb_after_each_trial"]
    ax.plot(range(1, len(rss) + 1), rss, marker=".", lw=1, label="tool (run_trials + Objective)")
    bare = r.get("bare_rss_mb_after_each_model")
    if bare:
        ax.plot(range(1, len(bare) + 1), bare, marker=".", lw=1, color="grey",
                label="bare Keras, same configs")
    ax.axhline(rss[0] + TARGET_MB, color="red", ls="--", lw=0.8, label="first trial + 100 MB")
    ax.set_xlabel("trials finished")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Resident memory after each trial" + (" (quick form)" if quick else ""))
    ax.legend(loc="upper left")  # the tool's line runs along the bottom right
    common.save_figure(fig, common.plot_path(NAME, quick))


def render(r: dict[str, Any]) -> str:
    s, rss = r["settings"], r["rss_mb_after_each_trial"]
    quick = r["form"] == "quick"
    peak_at = max(range(len(rss)), key=rss.__getitem__)
    rows = [
        ["before the first trial (TensorFlow loaded, data in memory)",
         f"{r['rss_mb_before_first_trial']:.0f}"],
        ["after trial 1", f"{rss[0]:.0f}"],
        [f"after trial {min(6, len(rss))}", f"{rss[min(5, len(rss) - 1)]:.0f}"],
        [f"after trial {len(rss)} (last)", f"{rss[-1]:.0f}"],
        ["peak", f"{r['peak_mb']:.0f}"],
    ]
    img = common.plot_path(NAME, quick).name
    states = ", ".join(f"{v} {k.lower()}" for k, v in r["states"].items() if v)
    return "\n\n".join(filter(None, [
        common.section_title("Memory over many trials", quick),
        common.provenance(r),
        f"{s['trials']} trials ({states}) of a small space in one process, "
        f"{s['epochs']} epoch(s) on {s['train_images']:,} training / {s['val_images']:,} "
        f"validation images; RSS read with psutil after each trial.",
        common.md_table(["when", "RSS (MB)"], rows),
        f"Growth from the first trial to the last: **{r['growth_mb']:+.1f} MB** "
        f"({r['growth_after_5_mb']:+.1f} MB after the first few; trend "
        f"{r['slope_mb_per_trial']:+.2f} MB per trial, i.e. "
        f"{100 * r['slope_mb_per_trial']:+.0f} MB per 100 trials); to the highest reading "
        f"(after trial {peak_at + 1}): **{rss[peak_at] - rss[0]:+.1f} MB**.",
        # Judged at the highest reading: RSS read after one trial swings by tens of MB
        # (a pruned trial leaves more behind until the next), so the last reading alone
        # could pass a run whose memory went over the mark on the way.
        common.verdict(rss[peak_at] - rss[0] < TARGET_MB,
                       f"growth < {TARGET_MB:.0f} MB over {s['trials']} trials, at the highest "
                       "reading"),
        (f"Where it grows: {rss[29] - rss[0]:+.1f} MB by trial 30, then "
         f"{rss[-1] - rss[29]:+.1f} MB over the {len(rss) - 30} trials after it."
         if len(rss) > 30 else ""),
        bare_note(r),
        recycled_note(r),
        f"![RSS after each trial]({img})",
    ]))


def recycled_note(r: dict[str, Any]) -> str:
    """The CLI's answer: worker processes restarted every N trials, and their peak RSS."""
    rec = r.get("recycled")
    if not rec:
        return "(No recycled CLI run in this measurement.)"
    peaks = rec["worker_peak_mb"]
    if rec["exit_code"] != 0 or not peaks:
        return f"The recycled CLI run failed (exit {rec['exit_code']}): {rec['log_tail']}"
    n = rec["recycle_after"]
    rows = [[i + 1, f"{p:.0f}"] for i, p in enumerate(peaks)]
    growth = peaks[-1] - peaks[0]
    return "\n\n".join([
        f"The same search through the CLI as a user runs it, `run_search.py --trials "
        f"{r['settings']['trials']} --recycle-after {n}` (one worker; {rec['wall_s']:.0f} s): "
        f"{len(peaks)} successive worker processes of at most {n} trials each. Peak RSS of "
        f"each (sampled twice a second); the parent, which only watches the storage, peaked "
        f"at {rec['parent_peak_mb']:.0f} MB:",
        common.md_table(["worker process", "peak RSS (MB)"], rows),
        f"Last worker against the first: **{growth:+.0f} MB**.",
        common.verdict(max(peaks) - peaks[0] < TARGET_MB,
                       f"no later worker peaks {TARGET_MB:.0f} MB or more above the first"),
    ])


def bare_note(r: dict[str, Any]) -> str:
    """Whose growth it is: the same configs trained by bare Keras in a fresh process."""
    bare = r.get("bare_rss_mb_after_each_model")
    if not bare:
        why = r.get("bare_error")
        return "(No bare-Keras comparison in this run" + (f": {why})." if why else ".)")
    tool, own = r["growth_mb"], r["bare_growth_mb"]
    text = (
        f"The same {len(bare)} configs trained by bare Keras in a fresh process (`build_cnn`, "
        f"`fit`, `del model`, `keras.backend.clear_session(free_memory=True)`, `gc.collect()`) "
        f"grow by **{own:+.1f} MB**, against {tool:+.1f} MB for the tool. "
    )
    if own > tool + 20:
        return text + (
            f"Bare Keras keeps {own - tool:.0f} MB more: every traced training step's graph, "
            "which stays referenced from TensorFlow's global gradient registry (a "
            "`CustomGradient-N` entry per trace, from the optimizer's all-reduce; "
            "tensorflow/tensorflow#27492, #97697). The tool unregisters a trial's entries "
            "when the trial ends (`fmnist_search/session.py`)."
        )
    if tool > 0 and own >= 0.8 * tool:
        return text + (
            "The growth is TensorFlow/Keras's own: memory kept after every model even once "
            "the session is cleared. Only ending the process gives it back."
        )
    return text + f"The tool itself adds about {tool - own:+.1f} MB over the run."


if __name__ == "__main__":
    raise SystemExit(main())
