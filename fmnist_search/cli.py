"""Command line: argv -> validated settings -> the search, leaderboard and other commands.

Exit codes: 0 done, 1 a runtime error (data, storage, failed search), 2 bad arguments,
130 interrupted with Ctrl-C (or SIGTERM, handled the same way).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import stop
from . import study as st

# Sub-commands implemented in other modules: each has `build_parser(prog)` and `run(args)`.
PLUGINS: dict[str, str] = {
    "baselines": "fmnist_search.baseline_runs",
    "report": "fmnist_search.report",
    "export": "fmnist_search.export",
    "predict": "fmnist_search.predictor",
}
SUBCOMMANDS = ("search", "leaderboard", *PLUGINS)
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEFAULT_VAL_SIZE = 10_000


class UsageError(Exception):
    """A bad argument value found after parsing (exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


DEFAULT_TRAIN_SUBSET = 10_000
DEFAULT_INTERIM_VAL_SIZE = 2_000
DEFAULT_RECYCLE = 25  # trials per worker process before it is restarted
# Default workers: one single-threaded worker per core. On 2 cores, 2 workers x 1 thread ran
# 1.69x the trials per hour of 1 x 2 threads (docs/benchmarks.md, workers); capped because
# each worker holds its own copy of the data and TensorFlow (~1.2 GB).
MAX_AUTO_WORKERS = 4


def _train_subset(s: str) -> int:
    v = int_at_least(0)(s)
    if 0 < v < 20:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or >= 20, got {v}")
    return v


def _cv(s: str) -> int:
    v = int_at_least(0)(s)
    if v == 1:
        raise argparse.ArgumentTypeError("K-fold needs at least 2 folds (0 = holdout split)")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _objectives(s: str) -> tuple[str, ...]:
    from .multiobjective import parse_objectives

    try:
        return parse_objectives(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _study_name(s: str) -> str:
    try:
        return st.check_study_name(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _storage(s: str) -> str:
    try:
        return st.check_storage_url(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage")
    g.add_argument(
        "--study-name", type=_study_name, default="fmnist", help="study name (default: fmnist)"
    )
    g.add_argument("--results-dir", default="results", help="where runs write (default: ./results)")
    g.add_argument(
        "--storage",
        type=_storage,
        default=None,
        help="Optuna storage URL, e.g. postgresql://user:pw@host/db "
        "(default: sqlite:///<results-dir>/<study-name>/study.db)",
    )


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and protocol (fixed per study)")
    g.add_argument(
        "--data-dir",
        default=None,
        help="directory with the four IDX .gz files "
        "(default: $FMNIST_DATA_DIR, Keras' cache, /usr/share/datasets/fashion-mnist, download)",
    )
    g.add_argument(
        "--epochs", type=int_at_least(1), default=3, help="epochs per trial (per fold) (default: 3)"
    )
    g.add_argument(
        "--cv",
        type=_cv,
        default=0,
        help="K-fold cross-validation with K>=2 folds (default: 0 = holdout)",
    )
    g.add_argument(
        "--val-size",
        type=int_at_least(1),
        default=None,
        help=f"holdout validation images (default: {DEFAULT_VAL_SIZE} of the 60000; a sixth "
        "of a training set under twice that)",
    )
    g.add_argument(
        "--train-subset",
        type=_train_subset,
        default=DEFAULT_TRAIN_SUBSET,
        help="each trial trains on a stratified subset of N training images of its split "
        f"(validation images are not reduced); 0 = all (default: {DEFAULT_TRAIN_SUBSET})",
    )
    g.add_argument(
        "--interim-val-size",
        type=int_at_least(0),
        default=None,
        help="validation images scored after the epochs before the last that the pruner reads "
        "(a stratified subset); the score is every validation image after the "
        f"last epoch; 0 = every image after every epoch (default: {DEFAULT_INTERIM_VAL_SIZE}; "
        "0 with --engine keras-tuner, which validates as KerasTuner does)",
    )
    g.add_argument(
        "--seed",
        type=int_at_least(0),
        default=0,
        help="fixes the split, the sampler and the initial weights (default: 0)",
    )
    g.add_argument(
        "--space", default=None, help="YAML or JSON file overriding the default search space"
    )


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one sub-command ('search' is the default command)."""
    prog = "run_search.py" + ("" if command == "search" else f" {command}")
    if command == "search":
        p = Parser(
            prog=prog,
            description="Search CNN architectures on Fashion-MNIST with Optuna, then re-train, "
            "test and export the best. Other commands (each with --help): leaderboard, "
            "baselines, report, export, predict.",
        )
        g = p.add_argument_group("search")
        g.add_argument(
            "--trials",
            type=int_at_least(1),
            default=50,
            help="finished (complete or pruned) trials wanted in the study in total; "
            "rerunning continues up to this count (default: 50)",
        )
        g.add_argument(
            "--timeout",
            type=positive_float,
            default=None,
            help="stop starting trials after SECONDS",
        )
        g.add_argument(
            "--sampler", choices=st.SAMPLERS, default=None,
            help="default: tpe (seeded); the optuna engine's",
        )
        g.add_argument(
            "--pruner", choices=st.PRUNERS, default=None,
            help="default: hyperband; the optuna engine's",
        )
        g.add_argument(
            "--max-failures",
            type=int_at_least(1),
            default=10,
            help="stop after this many failed trials in a row (default: 10)",
        )
        g.add_argument(
            "--top", type=int_at_least(1), default=10, help="rows of the final table (default: 10)"
        )
        g.add_argument(
            "--engine",
            choices=("optuna", "keras-tuner"),
            default="optuna",
            help="optuna (default), or KerasTuner over the same space, split and epochs; its "
            "trials are recorded in the same study",
        )
        g.add_argument(
            "--kt-algorithm",
            choices=("hyperband", "bayesian", "random"),
            default=None,
            help="KerasTuner's algorithm with --engine keras-tuner (default: hyperband)",
        )
        g.add_argument(
            "--objectives",
            type=_objectives,
            default=("accuracy",),
            help="comma list: accuracy (required), params, latency; more than one runs "
            "a multi-objective search (default: accuracy)",
        )
        g.add_argument(
            "--max-params", type=int_at_least(1), default=None, help="hard limit on parameters"
        )
        g.add_argument(
            "--max-latency-ms",
            type=positive_float,
            default=None,
            help="hard limit on CPU inference ms per image at batch 1",
        )
        g.add_argument(
            "--warm-start",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="enqueue the nearest points of the space to the seed documents' baselines "
            "as the first trials (default: on with the Optuna engine; they also serve as "
            "TPE's first observations)",
        )
        g.add_argument("--no-progress", action="store_true", help="plain log lines, no live bars")
        g.add_argument(
            "--workers",
            type=int_at_least(1),
            default=None,
            help="worker processes on this machine sharing the study (default: one per CPU "
            f"core, at most {MAX_AUTO_WORKERS}, when more than --recycle-after trials are left; "
            "otherwise 1, in this process)",
        )
        g.add_argument(
            "--threads",
            type=int_at_least(1),
            default=None,
            help="CPU threads per worker (default: cores / workers)",
        )
        add_precision_arg(g)
        g.add_argument("--worker-index", type=int_at_least(0), default=None, help=argparse.SUPPRESS)
        g.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
        g.add_argument(
            "--recycle-after",
            type=int_at_least(0),
            default=None,
            help="run the trials in worker processes restarted after N trials each, which "
            "bounds whatever TensorFlow keeps after a trial until its process ends "
            f"(default {DEFAULT_RECYCLE}; one worker with at most {DEFAULT_RECYCLE} trials "
            "left runs them in this process; 0: always in this process, one worker only)",
        )
        from .export import DEFAULT_ENSEMBLE, FINAL_FIT_MINUTES, MAX_ENSEMBLE

        g = p.add_argument_group("export of the best model (after the search)")
        g.add_argument(
            "--no-export",
            action="store_true",
            help="skip the final fit, test evaluation and export after the search",
        )
        g.add_argument(
            "--final-epochs",
            type=int_at_least(1),
            default=None,
            help="epochs of the final fit on all training images (default: from the "
            "best trial's peak epoch, see README)",
        )
        g.add_argument(
            "--no-final-fit",
            action="store_true",
            help="export a retrain of the best trial on its own split instead",
        )
        g.add_argument(
            "--final-minutes",
            type=positive_float,
            default=FINAL_FIT_MINUTES,
            help="time budget of the default final epochs, at the speed measured just "
            f"before each fit, shared by --ensemble members (default: {FINAL_FIT_MINUTES:g})",
        )
        g.add_argument(
            "--augment",
            action="store_true",
            help="flip and shift the training images at random each epoch of the final fit "
            "(off by default, see README)",
        )
        g.add_argument(
            "--no-scale-up",
            action="store_true",
            help="train the final fit's architectures as searched (default: as wide and deep "
            "as the space allows, unless the study limits size or latency; see README)",
        )
        g.add_argument(
            "--ensemble",
            type=int_at_least(1),
            default=None,
            metavar="K",
            help="final fit of the best trial and the next best K-1 of other architectures, "
            f"exported as one model averaging them (default {DEFAULT_ENSEMBLE}, and up to "
            f"{MAX_ENSEMBLE} while the --final-minutes budget holds each further member's "
            "planned epochs; 1 with --no-final-fit)",
        )
        add_protocol_args(p)
        add_storage_args(p)
        return p
    if command == "leaderboard":
        p = Parser(
            prog=prog, description="Re-render the leaderboard of a stored study (no training)."
        )
        p.add_argument(
            "--top",
            type=int_at_least(1),
            default=None,
            help="rows to show (default: 10 in the table, all rows in csv/markdown/json)",
        )
        p.add_argument("--format", choices=("table", "csv", "markdown", "json"), default="table")
        add_storage_args(p)
        return p
    if command in PLUGINS:
        import importlib

        module = importlib.import_module(PLUGINS[command])
        parser: argparse.ArgumentParser = module.build_parser(prog)
        return parser
    raise ValueError(command)


def _split_command(argv: Sequence[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in SUBCOMMANDS:
        return argv[0], list(argv[1:])
    return "search", list(argv)


def add_precision_arg(g: Any) -> None:
    """`--precision` on a command that trains models (search, baselines, export)."""
    from .precision import CHOICES

    g.add_argument(
        "--precision",
        choices=CHOICES,
        default="auto",
        help="arithmetic of training: bfloat16 (Keras' mixed policy: float32 weights) runs "
        "several times faster on CPUs with AMX; auto picks it there, float32 elsewhere; "
        "exported models are float32 either way (default: auto)",
    )


def use_precision(choice: str) -> str:
    """Import TensorFlow quietly and set the precision models are built in; which one."""
    import_tensorflow_quietly()
    from .precision import use

    return use(choice)


def import_tensorflow_quietly() -> None:
    """Import Keras/TensorFlow with fd 2 muted (its C++ start-up lines ignore log levels)."""
    import os

    if "keras" in sys.modules or os.environ.get("FMNIST_SEARCH_TF_LOGS"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import keras  # noqa: F401
            import tensorflow as tf

            # Device discovery prints a CUDA probe error on CPU-only machines: do it now.
            tf.config.list_physical_devices()
            tf.get_logger().setLevel("ERROR")  # retracing warnings between trials are noise
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (never raises for user errors)."""
    command, rest = _split_command(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(command).parse_args(rest)
    args.argv = rest
    # A supervisor's SIGTERM (and a worker's when its parent dies) gets Ctrl-C's handling:
    # the running trial marked failed, workers told, the leaderboard printed, exit 130.
    with stop.handled_here():
        return _main(command, args)


def _main(command: str, args: argparse.Namespace) -> int:
    try:
        if command == "search":
            return cmd_search(args)
        if command == "leaderboard":
            return cmd_leaderboard(args)
        import importlib

        code: int = importlib.import_module(PLUGINS[command]).run(args)
        return code
    except UsageError as e:
        err(str(e))
        return EXIT_USAGE
    except OSError as e:  # a full disk, a read-only results directory...
        where = f" ({e.filename})" if e.filename else ""
        err(f"{e.strerror or e}{where}; what is stored so far is kept: rerun to continue")
        return EXIT_RUNTIME
    except Exception as e:
        # Storage failures (e.g. SQLite "database or disk is full", a lost PostgreSQL
        # connection) surface as SQLAlchemy errors: one line, password redacted.
        if type(e).__module__.startswith("sqlalchemy"):
            first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0]
            err(
                f"storage error: {st.redact(first)}; "
                "what is stored so far is kept: rerun to continue"
            )
            return EXIT_RUNTIME
        raise


def storage_url(args: argparse.Namespace) -> str:
    try:
        st.study_dir(args.results_dir, args.study_name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return args.storage or st.default_storage(args.results_dir, args.study_name)


def load_space_arg(args: argparse.Namespace) -> Any:
    from searchspace.space import SearchSpace, SpaceError, load_space

    if args.space is None:
        return SearchSpace()
    try:
        return load_space(args.space)
    except SpaceError as e:
        raise UsageError(str(e)) from None


def check_val_size(val_size: int | None, cv: int, train_images: int | None = None) -> None:
    """A --val-size the user gave (None: not given): not with --cv, and, once the training
    set's size is known, at most half of it.

    Raises:
        UsageError: The folds of --cv are the validation sets (a --val-size would be stored,
            never used); or it is over half (the default shrinks for a small set, a given
            value is not silently changed).
    """
    if val_size is None:
        return
    if cv:
        raise UsageError("--val-size sets the holdout split, which --cv replaces: drop one")
    if train_images is not None and val_size > train_images // 2:
        raise UsageError(
            f"--val-size {val_size} is more than half of the {train_images} training images"
        )


def cmd_search(args: argparse.Namespace) -> int:
    """The search: verify data, open or resume the study, run trials, print the leaderboard."""
    if args.no_export:
        from .export import FINAL_FIT_MINUTES

        given = [flag for flag, on in (
            ("--final-epochs", args.final_epochs is not None),
            ("--no-final-fit", args.no_final_fit),
            ("--final-minutes", args.final_minutes != FINAL_FIT_MINUTES),
            ("--augment", args.augment),
            ("--ensemble", args.ensemble is not None),
            ("--no-scale-up", args.no_scale_up),
        ) if on]
        if given:  # they shape the export, which --no-export skips: say so, not ignore them
            raise UsageError(
                f"--no-export skips the final fit: drop {', '.join(given)} (or pass them to "
                "the export command)"
            )
    if args.no_final_fit and args.final_epochs is not None:
        raise UsageError("--final-epochs and --no-final-fit exclude each other")
    check_val_size(args.val_size, args.cv)
    if args.no_final_fit and args.augment:
        raise UsageError("--augment and --no-final-fit exclude each other")
    if args.no_final_fit and (args.ensemble or 1) > 1:
        raise UsageError("--ensemble and --no-final-fit exclude each other")
    from .export import resolve_ensemble

    args.ensemble_given = args.ensemble  # None: the default, which may grow (extra_members)
    args.ensemble = resolve_ensemble(args.ensemble, single=args.no_final_fit)
    if args.recycle_after == 0 and (args.workers or 1) > 1:
        raise UsageError("--recycle-after 0 (trials in this process) needs --workers 1")
    if args.engine == "keras-tuner":
        if args.interim_val_size:
            raise UsageError(
                "--interim-val-size applies to the optuna engine; KerasTuner validates every "
                "image after every epoch"
            )
        args.interim_val_size = 0
    elif args.interim_val_size is None:
        args.interim_val_size = DEFAULT_INTERIM_VAL_SIZE
    if args.engine == "keras-tuner" and (args.sampler or args.pruner):
        # KerasTuner's algorithm samples and stops trials itself.
        raise UsageError(
            "--sampler and --pruner apply to the optuna engine; with --engine keras-tuner "
            "choose --kt-algorithm"
        )
    if len(args.objectives) > 1 and args.pruner not in (None, "none"):
        # Optuna's pruners refuse multi-objective studies; the search's own rule runs instead.
        raise UsageError(
            f"--pruner {args.pruner} does not apply with several objectives: they prune by "
            "their own rule on the accuracy curve (README); --pruner none turns it off"
        )
    args.sampler = args.sampler or "tpe"
    args.pruner = args.pruner or "hyperband"
    if args.engine != "keras-tuner" and args.kt_algorithm is not None:
        # Silently running the Optuna engine instead would look like KerasTuner's results.
        raise UsageError("--kt-algorithm needs --engine keras-tuner")
    if args.engine == "keras-tuner":
        args.kt_algorithm = args.kt_algorithm or "hyperband"
        if (args.workers or 1) > 1 or args.recycle_after:
            raise UsageError(
                "--engine keras-tuner runs in one process: drop --workers/--recycle-after"
            )
        if args.cv:
            raise UsageError("--engine keras-tuner supports the holdout split only: drop --cv")
        if len(args.objectives) > 1 or args.max_params or args.max_latency_ms:
            raise UsageError("--engine keras-tuner searches accuracy only (no --objectives/limits)")
        if args.warm_start:
            raise UsageError("--warm-start works with the Optuna engine only")
        args.warm_start = False
    elif args.warm_start is None:
        args.warm_start = True
    space = load_space_arg(args)
    url = storage_url(args)
    precision = use_precision(args.precision)
    from rich.console import Console

    # soft_wrap: a message stays one line in logs and pipes (no wrapping at 80 columns).
    console = Console(stderr=True, soft_wrap=True)
    import optuna

    from .data import DataError, load_dataset
    from .multiobjective import (
        MultiObjectivePruning,
        directions,
        make_mo_sampler,
        protocol_entries,
    )
    from .objective import Objective, SearchProtocol, make_folds

    # Failed trials are reported by our own lines; Optuna would add their tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = None
    if not url.startswith("sqlite"):
        try:
            # Connect before the data are read: a bad URL or password fails in a second.
            storage = st.make_storage(url)
        except st.StudyError as e:
            err(str(e))
            return EXIT_RUNTIME
    try:
        data = load_dataset(
            args.data_dir, warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}")
        )
    except DataError as e:
        err(str(e))
        return EXIT_RUNTIME
    check_val_size(args.val_size, args.cv, len(data.y_train))
    protocol = SearchProtocol(
        epochs=args.epochs,
        cv=args.cv,
        val_size=args.val_size or DEFAULT_VAL_SIZE,
        train_subset=args.train_subset or None,
        seed=args.seed,
        interim_val_size=args.interim_val_size,
    )
    folds = make_folds(data, protocol)
    stored_protocol = {
        **protocol.to_dict(),
        "space": space.to_dict(),
        "data_sha256": dict(sorted(data.sha256.items())),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        **protocol_entries(args.objectives, args.max_params, args.max_latency_ms),
    }
    multi = len(args.objectives) > 1
    # TPE's random trials come after the warm start's points. Counted from the flags, so
    # every worker builds the same sampler; a study first run with --trials below the 8
    # points and resumed with more counts the larger number (a few more random trials).
    if args.warm_start:
        from .baseline_runs import warm_start_points

        queued_points = len(warm_start_points(space, limit=args.trials))
    else:
        queued_points = 0

    def make_sampler(finished: int) -> Any:
        # Each worker its own stream, fixed by --seed; another after a resume or recycle.
        seed = st.process_seed(args.seed, args.worker_index or 0, finished)
        return (
            make_mo_sampler(args.sampler, seed, enqueued=queued_points) if multi
            else st.make_sampler(args.sampler, seed, enqueued=queued_points)
        )

    try:
        sampler = make_sampler(0)
    except ValueError as e:
        raise UsageError(str(e)) from None
    worker = args.worker_index is not None
    if worker:
        from .workers import set_threads

        set_threads(args.threads or 1)
    try:
        study = st.open_study(
            storage or st.make_storage(url),
            args.study_name,
            sampler,
            # Optuna's pruners don't work on multi-objective studies: MultiObjectivePruning.
            st.make_pruner("none" if multi else args.pruner, protocol.steps),
            stored_protocol,
            directions=directions(args.objectives),
        )
    except st.StudyError as e:
        err(str(e))
        return EXIT_RUNTIME
    if args.storage is None and not worker:
        # The default local study has one owner: a RUNNING trial is a leftover of a crash.
        stale = st.fail_stale_trials(study)
        if stale:
            console.print(
                f"[yellow]marked interrupted trial(s) {stale} as failed; each is retried[/yellow]"
            )
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    if finished:
        study.sampler = make_sampler(finished)

    def make_objective(progress: Any = None) -> Objective:
        mo = None
        if multi and args.pruner != "none":
            mo = MultiObjectivePruning(
                study, study.directions, max_steps=protocol.steps, objectives=args.objectives
            )
        return Objective(
            folds,
            space,
            protocol,
            progress=progress,
            objectives=args.objectives,
            max_params=args.max_params,
            max_latency_ms=args.max_latency_ms,
            mo_pruning=mo,
        )

    if worker:
        timeout = args.timeout
        if args.deadline is not None:  # the parent's --timeout, across recycled processes
            timeout = max(0.001, args.deadline - time.time())
        try:
            from .workers import die_with_parent

            die_with_parent()
            recycle = st.run_trials(
                study,
                make_objective(),
                args.trials,
                timeout=timeout,
                max_consecutive_failures=args.max_failures,
                max_trials=args.recycle_after or DEFAULT_RECYCLE,
            )
            if recycle:
                from .workers import EXIT_RECYCLE

                return EXIT_RECYCLE
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except st.StudyError as e:
            err(str(e))
            return EXIT_RUNTIME
        return 0
    # Only into a new study, and no more points than its budget: a resumed or shared study
    # (another machine may be enqueuing the same points) is left as it is.
    if args.warm_start and not study.get_trials(deepcopy=False):
        from .baseline_runs import warm_start

        queued = warm_start(study, space, limit=args.trials)
        if queued:
            console.print(
                f"warm start: enqueued the nearest points to {', '.join(queued)}", highlight=False
            )
    done = st.count_finished(study)
    console.print(
        f"study [bold]{args.study_name}[/bold] ({st.redact(url)}): "
        f"{done} of {args.trials} trials finished; {len(folds.splits)} split(s): "
        f"{len(folds.splits[0][0])} training / {len(folds.splits[0][1])} "
        f"validation images, {protocol.epochs} epoch(s) per trial, "
        + (f"keras-tuner {args.kt_algorithm}" if args.engine == "keras-tuner"
           else f"sampler {args.sampler}, pruner {args.pruner}")
        + f", seed {args.seed}, {precision} arithmetic",
        highlight=False,
    )
    from .progress import SearchProgress

    sink = SearchProgress(args.trials, done, protocol.steps, console=console)
    from .multiobjective import accuracy_of

    scores = [
        accuracy_of(t) for t in study.get_trials(deepcopy=False, states=(st.TrialState.COMPLETE,))
    ]
    if any(v is not None for v in scores):
        sink.set_best(max(v for v in scores if v is not None))
    objective = make_objective(sink)
    code = 0
    if args.no_progress:
        sink.progress.disable = True
    try:
        if uses_worker_processes(args, done):
            args.workers = resolve_workers(args, done)
            code = _run_workers(args, study, sink, console)
        elif args.engine == "keras-tuner":
            from .kt_engine import run_keras_tuner

            if args.threads:
                from .workers import set_threads

                set_threads(args.threads)
            with sink:
                run_keras_tuner(
                    study,
                    folds,
                    space,
                    protocol,
                    algorithm=args.kt_algorithm,
                    total_trials=args.trials,
                    seed=args.seed,
                    results_dir=Path(args.results_dir),
                    timeout=args.timeout,
                    progress=sink,
                    max_failures=args.max_failures,
                )
        else:
            if args.threads:
                from .workers import set_threads

                set_threads(args.threads)
            with sink:
                st.run_trials(
                    study,
                    objective,
                    args.trials,
                    timeout=args.timeout,
                    callbacks=[sink],
                    max_consecutive_failures=args.max_failures,
                )
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted: the running trial is marked failed; "
            "rerun the same command to continue[/yellow]"
        )
        code = EXIT_INTERRUPTED
    except st.StudyError as e:
        err(str(e))
        code = EXIT_RUNTIME
    if code == 0 and not args.no_export:
        try:
            code = _export_best(args, study, data, console)
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted during the export; "
                "the previous export (if any) is unchanged[/yellow]"
            )
            code = EXIT_INTERRUPTED
    _print_leaderboard(study, args.top, console, results_dir=args.results_dir)
    return code


def resolve_workers(args: argparse.Namespace, done: int) -> int:
    """--workers, or its default: one per core (at most MAX_AUTO_WORKERS) for long searches.

    A short search (at most --recycle-after trials left) keeps one worker in this process:
    starting workers costs seconds each, about what a few small trials gain from them.
    """
    if args.workers is not None:
        return int(args.workers)
    if args.engine == "keras-tuner" or args.recycle_after == 0:
        return 1
    if args.trials - done <= (args.recycle_after or DEFAULT_RECYCLE):
        return 1
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_WORKERS))


def uses_worker_processes(args: argparse.Namespace, done: int) -> bool:
    """Whether the trials run in (recycled) worker processes rather than in this one.

    Whatever TensorFlow still keeps after a trial (little since `session.released_session`,
    but a process is the only sure bound) goes when the process ends, so no process runs
    more than --recycle-after trials. One worker with that many trials or fewer left runs
    them here, which also starts faster.
    """
    if args.engine == "keras-tuner":
        return False
    if resolve_workers(args, done) > 1:
        return True
    if args.recycle_after == 0:
        return False
    return args.trials - done > (args.recycle_after or DEFAULT_RECYCLE)


def _export_best(args: argparse.Namespace, study: Any, data: Any, console: Any) -> int:
    """Final fit of the best trial, one test evaluation, and the export (issue: export)."""
    from .export import (
        EXPORT_DIR,
        ExportError,
        FitProgress,
        export_study,
        extra_members,
        pick_trial,
    )

    try:
        best = pick_trial(study)
    except ExportError:
        console.print("[yellow]no complete (feasible) trial: nothing to export[/yellow]")
        return 0
    out_dir = st.study_dir(args.results_dir, args.study_name) / EXPORT_DIR
    more = f" and the next best {args.ensemble - 1} (--ensemble)" if args.ensemble > 1 else ""
    console.print(f"final fit of trial {best.number}{more}, export to {out_dir}", highlight=False)
    try:
        with FitProgress(disable=args.no_progress) as progress:
            export_study(
                study,
                data,
                out_dir,
                trial_number=best.number,
                final_epochs=args.final_epochs,
                final_fit=not args.no_final_fit,
                augment=args.augment,
                final_minutes=args.final_minutes,
                command_line=sys.argv,
                progress=progress,
                ensemble=args.ensemble,
                extra=extra_members(
                    args.ensemble_given, final_fit=not args.no_final_fit,
                    final_epochs=args.final_epochs, final_minutes=args.final_minutes,
                ),
                scale_up=not args.no_scale_up,
            )
    except ExportError as e:
        err(str(e))
        return EXIT_RUNTIME
    import json

    card = json.loads((out_dir / "model_card.json").read_text(encoding="utf-8"))
    if (card.get("scale_up") or {}).get("applied"):
        console.print(
            f"trained scaled up (--no-scale-up: as searched): {card['architecture']}",
            highlight=False, markup=False,
        )
    if card.get("ensemble"):
        console.print(
            "ensemble members: "
            + ", ".join(
                f"trial {m['trial']} (test {m['test_accuracy']:.4f})" for m in card["ensemble"]
            ),
            highlight=False,
        )
    console.print(
        f"exported trial {card['trial']}"
        + (f" and {len(card['ensemble']) - 1} more (ensemble)" if card.get("ensemble") else "")
        + f": test accuracy [bold]{card['test_accuracy']:.4f}[/bold] "
        f"({card['final_epochs']} epoch(s) on {card.get('train_images', 'all')} images) "
        f"-> {out_dir}",
        highlight=False,
    )
    return 0


def _run_workers(args: argparse.Namespace, study: Any, sink: Any, console: Any) -> int:
    """Start --workers processes on the study and show their progress from the storage."""
    from .workers import Workers, default_threads, watch

    threads = args.threads or default_threads(args.workers)
    argv = list(args.argv)
    if args.timeout:
        argv += ["--deadline", str(time.time() + args.timeout)]
    log_dir = st.study_dir(args.results_dir, args.study_name) / "logs"
    console.print(
        f"{args.workers} worker(s) x {threads} thread(s); worker logs in {log_dir}", highlight=False
    )
    pool = Workers(argv, threads, log_dir)
    procs = [pool.start(i) for i in range(args.workers)]
    with sink:
        codes = watch(study, procs, sink, pool)
    if pool.restarts:
        console.print(
            f"worker processes restarted {pool.restarts} time(s) (--recycle-after)", highlight=False
        )
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if not bad:
        return 0
    if any(c == EXIT_INTERRUPTED for _, c in bad):
        return EXIT_INTERRUPTED
    for i, c in bad:
        lines = (log_dir / f"worker-{i}.log").read_text(errors="replace").strip().splitlines()
        err(f"worker {i} exited with code {c}: {lines[-1] if lines else 'no output'}")
    return EXIT_RUNTIME


def _print_leaderboard(study: Any, top: int, console: Any, results_dir: str | None = None) -> None:
    """Print the ranked table; with `results_dir`, also write leaderboard.csv/.md/.json."""
    from rich.console import Console

    from .leaderboard import render_table

    df = study_leaderboard(study, warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}"))
    Console().print(render_table(df, top=top, title=f"Leaderboard: {study.study_name}"))
    if results_dir is not None:
        from .leaderboard import write_leaderboard_files

        try:
            write_leaderboard_files(df, st.study_dir(results_dir, study.study_name))
        except OSError as e:
            err(f"could not write the leaderboard files: {e.strerror or e}")


def study_leaderboard(
    study: Any, warn: Callable[[str], None] | None = None, baselines: Any = None
) -> Any:
    """The study's leaderboard DataFrame with its measured (loaded unless given) and
    documented baselines."""
    from searchspace.baselines import BASELINES

    from .leaderboard import leaderboard, load_baseline_trials

    if baselines is None:
        baselines = load_baseline_trials(study._storage, study.study_name, warn=warn)
    objectives = study.user_attrs.get("protocol", {}).get("objectives", ["accuracy"])
    return leaderboard(
        st.trials_with_annotations(study),
        baselines=baselines,
        documented=BASELINES,
        objectives=objectives,
    )


class StoredStudyError(Exception):
    """A study named on the command line that isn't in the storage (exit 1)."""


def load_stored_study(args: argparse.Namespace) -> Any:
    """The existing study named by --study-name/--results-dir/--storage (never creates one).

    Raises:
        StoredStudyError: with a one-line message when there is no such study.
    """
    import optuna

    url = storage_url(args)
    db = url.split("?", 1)[0][len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if db and db != ":memory:" and not Path(db).exists():
        # Opening it would create the file (and its folders): a typo must leave nothing behind.
        if args.storage is None:
            raise StoredStudyError(
                f"no study {args.study_name!r} under {args.results_dir} (nothing at {url})"
            )
        raise StoredStudyError(f"no study {args.study_name!r}: no database file at {db}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=args.study_name, storage=st.make_storage(url))
    except KeyError:
        raise StoredStudyError(f"no study {args.study_name!r} in {st.redact(url)}") from None
    except st.StudyError as e:
        raise StoredStudyError(str(e)) from None


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """Re-render a stored study's leaderboard without training."""
    import pandas as pd

    from .leaderboard import render_table

    try:
        study = load_stored_study(args)
    except StoredStudyError as e:
        err(str(e))
        return EXIT_RUNTIME
    df = study_leaderboard(study, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    from .leaderboard import write_leaderboard_files

    try:
        write_leaderboard_files(df, st.study_dir(args.results_dir, args.study_name))
    except OSError as e:
        err(f"could not write the leaderboard files: {e.strerror or e}")
    if args.format == "table":
        from rich.console import Console

        Console().print(
            render_table(df, top=args.top or 10, title=f"Leaderboard: {study.study_name}")
        )
        return 0
    if args.top:
        # --top limits the ranked rows; unranked ones (pruned, failed, baselines not yet
        # measured) are always listed apart, never dropped.
        ranked = df["rank"].notna()
        df = pd.concat([df[ranked].head(args.top), df[~ranked]])
    if args.format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif args.format == "markdown":
        sys.stdout.write(df.to_markdown(index=False) + "\n")
    else:
        sys.stdout.write(df.to_json(orient="records", indent=2) + "\n")
    return 0


if __name__ == "__main__":  # worker processes start here: python -m fmnist_search.cli
    raise SystemExit(main())
