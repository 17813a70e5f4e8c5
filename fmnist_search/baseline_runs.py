"""`run_search.py baselines`: re-measure the seed documents' models under a study's protocol.

The documents' accuracies come from their own protocols (test set, other epochs, unscaled
pixels...). To rank the baselines fairly beside the search's trials, each is trained here
exactly as a trial is (same split or folds, epochs, seed), through the same `Objective`,
and stored in the study `<study>.baselines` in the same storage, one trial per baseline.

`warm_start(study, space)` seeds a search with the nearest point of its space to each
baseline (the search space can't express every baseline exactly).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from searchspace.baselines import BASELINES, BY_NAME, Baseline
from searchspace.config import CnnConfig
from searchspace.space import FloatRange, IntRange, SearchSpace, SpaceError, space_from_dict

from . import cli
from . import study as st
from .cli import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    Parser,
    add_precision_arg,
    add_protocol_args,
    add_storage_args,
    err,
    load_space_arg,
    storage_url,
    use_precision,
)
from .leaderboard import baseline_study_name, leaderboard, render_baselines, study_user_attrs


class _Unset:
    """Marks a protocol flag the user did not give (the main study's value then applies)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()
PROTOCOL_KEYS = ("epochs", "cv", "val_size", "train_subset", "seed", "interim_val_size")


def _search_defaults() -> dict[str, Any]:
    """The search's own defaults for the protocol flags (used when there is no study yet)."""
    ns = vars(cli.build_parser("search").parse_args([]))
    return {k: _normalise(k, ns[k]) for k in PROTOCOL_KEYS}


def _normalise(key: str, value: Any) -> Any:
    # The search stores --train-subset 0 ("all") as None.
    if key == "train_subset":
        return value or None
    if key == "interim_val_size" and value is None:  # the optuna engine's default
        return cli.DEFAULT_INTERIM_VAL_SIZE
    if key == "val_size" and value is None:  # the search's default (resolved after parsing)
        return cli.DEFAULT_VAL_SIZE
    return value


class ProtocolConflictError(Exception):
    """Flags that contradict the main study's stored protocol (one-line message)."""


def _names(s: str) -> list[str]:
    names: list[str] = []
    for raw in s.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in BY_NAME:
            raise argparse.ArgumentTypeError(
                f"unknown baseline {name!r} (known: {', '.join(BY_NAME)})"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("expected baseline names separated by commas")
    return names


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The `baselines` sub-command's parser."""
    p = Parser(
        prog=prog,
        description="Measure the seed documents' baseline models under the same protocol as a "
        "study's trials (same split, folds, epochs, seed) and store them in the study "
        "<study-name>.baselines beside it. When the study exists, its stored protocol is used "
        "and the protocol flags may be left out; a rerun measures only what is missing.",
    )
    g = p.add_argument_group("baselines")
    g.add_argument(
        "--only",
        type=_names,
        default=None,
        metavar="NAME,...",
        help=f"measure only these baselines (of: {', '.join(BY_NAME)})",
    )
    g.add_argument(
        "--list", action="store_true", help="list the baselines and their documented numbers only"
    )
    g.add_argument(
        "--replace",
        action="store_true",
        help="discard the stored baseline measurements (e.g. made under an old protocol) first",
    )
    g.add_argument("--no-progress", action="store_true", help="plain log lines, no live bars")
    add_precision_arg(g)
    add_protocol_args(p)
    add_storage_args(p)
    # UNSET tells "not given" from "given with the default value": only given flags can
    # contradict the main study's protocol.
    p.set_defaults(**{k: UNSET for k in PROTOCOL_KEYS}, space=UNSET)
    return p


def study_protocol(protocol: Any, space: SearchSpace, data: Any) -> dict[str, Any]:
    """The protocol dict a study stores (the same fields and form as the search's)."""
    return {
        **protocol.to_dict(),
        "space": space.to_dict(),
        "data_sha256": dict(sorted(data.sha256.items())),
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
    }


def resolve_protocol(
    args: argparse.Namespace,
    stored: dict[str, Any] | None,
    given_space: SearchSpace | None = None,
) -> tuple[dict[str, Any], SearchSpace]:
    """The protocol settings and space to measure under: the stored ones win.

    Args:
        args: The parsed flags (UNSET where not given).
        stored: The main study's stored protocol, None when there is no main study.
        given_space: The space of --space, when given.

    Raises:
        ProtocolConflictError: a flag the user gave differs from the stored protocol.
    """
    settings: dict[str, Any] = {}
    conflicts: list[str] = []
    defaults = _search_defaults()
    for key in PROTOCOL_KEYS:
        given = getattr(args, key)
        if given is not UNSET:
            given = _normalise(key, given)
        if stored is None:
            settings[key] = defaults[key] if given is UNSET else given
            continue
        settings[key] = stored.get(key, defaults[key])
        if given is not UNSET and key in st.NON_BINDING:  # as the search: the flag wins
            settings[key] = given
        elif given is not UNSET and given != settings[key]:
            flag = "--" + key.replace("_", "-")
            conflicts.append(f"{flag} {given} (study: {settings[key]})")
    if stored is None or "space" not in stored:
        space = given_space or SearchSpace()
    else:
        try:
            space = space_from_dict(stored["space"])
        except SpaceError as e:
            raise ProtocolConflictError(f"the study's stored space is unusable: {e}") from None
        if given_space is not None and given_space.to_dict() != stored["space"]:
            conflicts.append(f"--space {args.space} (the study uses another space)")
    if conflicts:
        raise ProtocolConflictError(
            f"study {args.study_name!r} was created with another protocol: "
            + "; ".join(conflicts)
            + "; leave these flags out to measure the baselines under the study's protocol"
        )
    return settings, space


def run(args: argparse.Namespace) -> int:
    """Measure the requested baselines that the baselines study lacks; print their table."""
    from rich.console import Console

    if args.list:
        df = leaderboard([], documented=BASELINES)
        Console().print(render_baselines(df, title="Baselines of the seed documents"))
        return 0
    names: list[str] = args.only or [b.name for b in BASELINES]
    # Bad flags (a bad space file, a bad study name) stop us before anything is written.
    given_space = None
    if args.space is not UNSET and args.space is not None:
        given_space = load_space_arg(args)
    url = storage_url(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = None
    main_protocol = None
    if args.storage is not None or Path(url.split("sqlite:///", 1)[1]).exists():
        try:
            storage = st.make_storage(url)
        except st.StudyError as e:
            err(str(e))
            return EXIT_RUNTIME
        main_protocol = (study_user_attrs(storage, args.study_name) or {}).get("protocol")
    if main_protocol is not None and "score" not in main_protocol:
        err(f"study {args.study_name!r} was made by an older version, which scored trials at "
            "their best epoch (now: the last); search into a new --study-name")
        return EXIT_RUNTIME
    try:
        settings, space = resolve_protocol(args, main_protocol, given_space)
    except ProtocolConflictError as e:
        err(str(e))
        return EXIT_RUNTIME
    # soft_wrap: a message stays one line in logs and pipes.
    console = Console(stderr=True, soft_wrap=True)
    use_precision(args.precision)
    from .data import DataError, load_dataset
    from .objective import Objective, SearchProtocol, make_folds

    try:
        data = load_dataset(
            args.data_dir, warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}")
        )
    except DataError as e:
        err(str(e))
        return EXIT_RUNTIME
    # make_folds would shrink a large one quietly while the study stored the value given.
    cli.check_val_size(None if args.val_size is UNSET else args.val_size, settings["cv"],
                       len(data.y_train))
    protocol = SearchProtocol(**settings)
    stored = study_protocol(protocol, space, data)
    diff = (st.protocol_differences(main_protocol, stored, ignore=st.RANKING_ONLY)
            if main_protocol is not None else [])
    if diff:
        # The flags agree (checked above), so the data differ.
        err(
            f"the data in {data.source_dir} differ from study {args.study_name!r}'s "
            f"({', '.join(diff)}): pass the --data-dir the study was searched on"
        )
        return EXIT_RUNTIME
    if storage is None:
        # Only now, with the data verified: the default local storage is created.
        try:
            storage = st.make_storage(url)
        except st.StudyError as e:
            err(str(e))
            return EXIT_RUNTIME
    bname = baseline_study_name(args.study_name)
    battrs = study_user_attrs(storage, bname)
    if battrs is not None and args.replace:
        optuna.delete_study(study_name=bname, storage=storage)
    elif battrs is not None and battrs.get("protocol") is not None and (
        diff := st.protocol_differences(battrs["protocol"], stored)
    ):
        err(
            f"the baselines in {bname!r} were measured under another protocol "
            f"({', '.join(diff)} differ): pass --replace to discard them and measure again"
        )
        return EXIT_RUNTIME
    try:
        bstudy = st.open_study(
            storage,
            bname,
            optuna.samplers.RandomSampler(seed=protocol.seed),
            optuna.pruners.NopPruner(),
            stored,
        )
    except st.StudyError as e:
        err(str(e))
        return EXIT_RUNTIME
    if args.storage is None:
        # The default local study has one owner: a RUNNING trial is a leftover of a crash.
        st.fail_stale_trials(bstudy)
    done = _measured(bstudy)
    # In the table's order, whatever the order of --only: a baseline's initial weights are
    # seeded by its trial number, so a full run always gives the same numbers.
    order = {b.name: i for i, b in enumerate(BASELINES)}
    todo = sorted((n for n in names if n not in done), key=order.__getitem__)
    folds = make_folds(data, protocol)
    console.print(
        f"baselines of study [bold]{args.study_name}[/bold] in {bname!r} ({st.redact(url)}): "
        f"{len(names) - len(todo)} of {len(names)} measured; {len(folds.splits)} split(s): "
        f"{len(folds.splits[0][0])} training / {len(folds.splits[0][1])} validation images, "
        f"{protocol.epochs} epoch(s) each, seed {protocol.seed}"
        + ("" if main_protocol else " (no study of that name yet: these flags set the protocol)"),
        highlight=False,
    )
    code = _measure(bstudy, todo, folds, space, protocol, Objective, console, args.no_progress)
    trials = bstudy.get_trials(deepcopy=False)
    df = leaderboard([], baselines=trials, documented=[BY_NAME[n] for n in names])
    Console().print(
        render_baselines(df, title=f"Baselines under the protocol of study {args.study_name}")
    )
    failed = [n for n in names if n not in _measured(bstudy)]
    if code == 0 and failed:
        err(f"not measured: {', '.join(failed)} (see the reasons above); rerun to retry")
        code = EXIT_RUNTIME
    return code


def _measured(study: optuna.Study) -> set[str]:
    """Names of the baselines with a COMPLETE trial in `study`."""
    return {
        str(t.user_attrs["baseline"])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("baseline")
    }


def _measure(
    study: optuna.Study,
    todo: Sequence[str],
    folds: Any,
    space: SearchSpace,
    protocol: Any,
    objective_cls: Any,
    console: Any,
    no_progress: bool,
) -> int:
    """Train each baseline in `todo` as one trial of `study`; return an exit code."""
    from .progress import SearchProgress
    from .study import settled_heap

    if not todo:
        return 0
    total = len(_measured(study) | set(todo))
    sink = SearchProgress(total, total - len(todo), protocol.steps, console=console)
    if no_progress:
        sink.progress.disable = True
    # A failed trial is reported by the progress sink with its reason; Optuna would add a
    # traceback at WARNING level.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with sink, settled_heap():
            for name in todo:
                b = BY_NAME[name]
                console.print(f"baseline [bold]{name}[/bold] (doc {b.source})", highlight=False)

                def config_fn(trial: optuna.trial.BaseTrial, b: Baseline = b) -> CnnConfig:
                    trial.set_user_attr("baseline", b.name)
                    return b.config

                # Every epoch validated: the report draws the baselines' curves.
                objective = objective_cls(
                    folds, space, protocol, progress=sink, config_fn=config_fn,
                    every_epoch=True,
                )
                study.optimize(
                    objective, n_trials=1, callbacks=[sink], catch=(Exception,), gc_after_trial=True
                )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: rerun the same command to measure the rest[/yellow]")
        return EXIT_INTERRUPTED
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    return 0


# --------------------------------------------------------------------------- warm start


def _clamp_int(v: int, r: IntRange) -> int:
    return max(r.low, min(r.high, int(v)))


def _clamp_float(v: float, r: FloatRange) -> float:
    return float(max(r.low, min(r.high, float(v))))


def _nearest(v: float, choices: Sequence[Any]) -> Any:
    """The choice nearest to `v` on a log scale (sizes: 84 units is nearer 64 than 128)."""
    pos = [c for c in choices if c > 0]
    if v <= 0 or not pos:
        return min(choices, key=lambda c: (abs(c - v), c))
    return min(pos, key=lambda c: (abs(math.log(c / v)), c))


def _same_or_first(value: Any, choices: Sequence[Any], fallback: Any = None) -> Any:
    if value in choices:
        return value
    if fallback is not None and fallback in choices:
        return fallback
    return choices[0]


def nearest_params(cfg: CnnConfig, space: SearchSpace) -> dict[str, Any]:
    """The point of `space` (flat parameter names of `suggest_config`) nearest to `cfg`.

    Counts are clamped into their ranges (a model without conv blocks gets one block when
    the space needs one; extra blocks or layers are cut), sizes go to the nearest choice
    on a log scale, floats are clamped, and a categorical value the space lacks becomes
    the space's first choice (relu/max/adam when offered). Only the parameters that
    `suggest_config` asks for are returned, so the point can be enqueued as is.
    """
    p: dict[str, Any] = {}
    blocks = list(cfg.blocks)
    n_blocks = _clamp_int(len(blocks), space.n_blocks)
    p["n_blocks"] = n_blocks
    convs = [c for b in blocks for c in b.convs]
    acts = [c.activation for c in convs] or [d.activation for d in cfg.dense] or ["relu"]
    p["activation"] = _same_or_first(max(set(acts), key=acts.count), space.activation, "relu")
    if n_blocks:
        mean_convs = sum(len(b.convs) for b in blocks) / len(blocks) if blocks else 1
        p["convs_per_block"] = _clamp_int(round(mean_convs), space.convs_per_block)
        wants_bn = any(c.batch_norm for c in convs)
        p["batch_norm"] = _same_or_first(wants_bn, space.batch_norm)
        pools = [b.pool for b in blocks if b.pool != "none"] or ["max"]
        p["pooling"] = _same_or_first(max(set(pools), key=pools.count), space.pooling, "max")
        drops = [b.dropout for b in blocks] or [0.0]
        p["conv_dropout"] = _clamp_float(sum(drops) / len(drops), space.conv_dropout)
    for i in range(n_blocks):
        # Blocks the baseline lacks repeat its last one (or the smallest filters, 3x3).
        src = blocks[min(i, len(blocks) - 1)] if blocks else None
        choices = space.block_filters(i)
        filters = max(c.filters for c in src.convs) if src else min(choices)
        kernel = src.convs[0].kernel_size if src else 3
        p[f"filters_b{i}"] = _nearest(filters, choices)
        p[f"kernel_b{i}"] = _nearest(kernel, space.kernel_size)
    p["flatten_dropout"] = _clamp_float(cfg.flatten_dropout, space.flatten_dropout)
    dense = list(cfg.dense)
    n_dense = _clamp_int(len(dense), space.dense_layers)
    p["dense_layers"] = n_dense
    if n_dense:
        drops = [d.dropout for d in dense] or [0.0]
        p["dense_dropout"] = _clamp_float(sum(drops) / len(drops), space.dense_dropout)
    for j in range(n_dense):
        units = dense[min(j, len(dense) - 1)].units if dense else min(space.dense_units)
        p[f"dense_units_l{j}"] = _nearest(units, space.dense_units)
    p["optimizer"] = _same_or_first(cfg.optimizer, space.optimizer, "adam")
    p["learning_rate"] = _clamp_float(cfg.learning_rate, space.learning_rate)
    if p["optimizer"] == "sgd":
        p["momentum"] = _clamp_float(cfg.momentum, space.momentum)
    p["batch_size"] = _nearest(cfg.batch_size, space.batch_size)
    return p


def warm_start(
    study: optuna.Study,
    space: SearchSpace,
    baselines: Sequence[Baseline] = BASELINES,
    limit: int | None = None,
) -> list[str]:
    """Enqueue, for each baseline, the nearest point of `space` as a trial of `study`.

    These trials are approximations inside the space (same-padding convolutions, one
    filter count per block...), not the exact baselines: `run_search.py baselines`
    measures those. A point already in the study (or shared by two baselines) is not
    enqueued twice; each enqueued trial carries the user attribute "warm_start_from".
    At most `limit` points are enqueued (the search's budget: more would be left waiting).

    Returns:
        The names of the baselines whose point was enqueued now.
    """
    enqueued: list[str] = []
    for name, point in warm_start_points(space, baselines, limit):
        before = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(point, user_attrs={"warm_start_from": name}, skip_if_exists=True)
        if len(study.get_trials(deepcopy=False)) > before:
            enqueued.append(name)
    return enqueued


def warm_start_points(
    space: SearchSpace, baselines: Sequence[Baseline] = BASELINES, limit: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The distinct points `warm_start` enqueues into a new study, each with its baseline.

    A point shared by two baselines comes once, under the first; at most `limit` points.
    """
    points: list[tuple[str, dict[str, Any]]] = []
    for b in baselines:
        if limit is not None and len(points) >= limit:
            break
        point = nearest_params(b.config, space)
        if all(point != p for _, p in points):
            points.append((b.name, point))
    return points
