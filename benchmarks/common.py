"""What every benchmark shares: data, JSON results, the markdown sections, plots.

Each benchmark writes `results/benchmarks/<name>[.quick].json` and replaces its own section
of `docs/benchmarks.md` (between `<!-- benchmark:<name>:<form> -->` markers), so running
one benchmark never drops another's numbers. Quick-form sections are labelled as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "results" / "benchmarks"
RUNS = RESULTS / "runs"  # studies the benchmarks create (fresh on every run)
DOCS = ROOT / "docs"
DOC = DOCS / "benchmarks.md"
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
# The order of the sections in docs/benchmarks.md.
ORDER = ("summary-by-hand", "headline", "search_efficiency", "pruning", "pruning-sha",
         "pruning-sha-random", "pruning-median", "overhead", "memory", "workers")

DOC_HEADER = """# Benchmarks

Measured by the scripts in `benchmarks/` (see `benchmarks/README.md` for the commands).
Each script rewrites only its own section below, from its JSON in `results/benchmarks/`.

**Full** sections are the real measurements. **Quick** sections come from the `--quick`
forms: a tiny subset of Fashion-MNIST, 1 to 3 epochs, a few trials. They only show that the
harness runs end to end; their numbers say little about the tool and must not be quoted as
results. Every section records the machine's core count and load average at the start:
these machines are shared, and a busy neighbour slows everything down.
"""


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark has: --quick, --data-dir, --no-doc."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="the few-minute harness check on a tiny subset (numbers not meaningful)")
    default_dir = DEFAULT_DATA_DIR if Path(DEFAULT_DATA_DIR).is_dir() else None
    p.add_argument("--data-dir", default=default_dir,
                   help=f"Fashion-MNIST IDX files (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--no-doc", action="store_true",
                   help="write the JSON only, not docs/benchmarks.md")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite this benchmark's section (and plot) of "
                   "docs/benchmarks.md from its saved JSON")
    return p


def load_result(name: str, quick: bool) -> dict[str, Any]:
    """The saved JSON of a benchmark (for --render-only)."""
    path = result_path(name, quick)
    if not path.exists():
        raise SystemExit(f"no saved result {path}: run the benchmark first")
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def form(quick: bool) -> str:
    return "quick" if quick else "full"


def quiet_tensorflow() -> None:
    """Import TensorFlow with its start-up chatter muted, and train in the precision the
    CLI picks by default (`--precision auto`), so both sides of a comparison share it."""
    from fmnist_search.cli import use_precision

    use_precision("auto")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def load_data(data_dir: str | None) -> Any:
    """The data set through the project's own loader (checksums verified)."""
    from fmnist_search.data import load_dataset

    def warn(m: str) -> None:
        print(f"warning: {m}", file=sys.stderr)

    return load_dataset(data_dir, download=False, warn=warn)


def environment() -> dict[str, Any]:
    """Machine and library versions, and how busy the machine was when the run started."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in ("tensorflow", "keras", "optuna", "keras-tuner", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
        "precision": _precision(),
        "allocator": _allocator(),
    }


def _allocator() -> str:
    """Where TensorFlow's tensors live in this process (fmnist_search/allocator.py)."""
    from fmnist_search.allocator import describe

    return describe()


def _precision() -> str:
    """The arithmetic `--precision auto` trains in on this machine (float32 or bfloat16)."""
    from fmnist_search.precision import resolve

    return resolve("auto")


def result_path(name: str, quick: bool) -> Path:
    return RESULTS / f"{name}{'.quick' if quick else ''}.json"


def save_json(name: str, quick: bool, payload: dict[str, Any], env: dict[str, Any]) -> Path:
    """Write the benchmark's result with when, how and where it was measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "form": form(quick),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "environment": env,
        **payload,
    }
    path = result_path(name, quick)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _marker(name: str, kind: str, end: bool = False) -> str:
    return f"<!-- {'/' if end else ''}benchmark:{name}:{kind} -->"


def read_sections(text: str) -> dict[tuple[str, str], str]:
    """The (name, form) -> markdown sections between markers in `text`."""
    out = {}
    pattern = re.compile(
        r"<!-- benchmark:([\w-]+):(quick|full) -->\n(.*?)\n<!-- /benchmark:\1:\2 -->", re.S
    )
    for m in pattern.finditer(text):
        out[(m.group(1), m.group(2))] = m.group(3)
    return out


def render_doc(sections: dict[tuple[str, str], str]) -> str:
    """The whole document: header, then full before quick per benchmark, in ORDER."""
    names = [*ORDER, *sorted({n for n, _ in sections} - set(ORDER))]
    parts = [DOC_HEADER]
    for name in names:
        for kind in ("full", "quick"):
            body = sections.get((name, kind))
            if body is not None:
                start, end = _marker(name, kind), _marker(name, kind, end=True)
                parts.append(f"{start}\n{body.strip()}\n{end}\n")
    return "\n".join(parts)


def update_doc(name: str, quick: bool, markdown: str, doc: Path = DOC) -> Path:
    """Replace (or add) this benchmark's section of docs/benchmarks.md."""
    sections = read_sections(doc.read_text(encoding="utf-8")) if doc.exists() else {}
    sections[(name, form(quick))] = markdown.strip()
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_doc(sections), encoding="utf-8")
    return doc


def section_title(title: str, quick: bool) -> str:
    if quick:
        return f"## {title} (quick form: harness check only, not a result)"
    return f"## {title}"


def provenance(result: dict[str, Any]) -> str:
    """One italic line: the command, the date, the machine and its load."""
    env = result["environment"]
    load = env.get("load_average_at_start") or []
    return (
        f"*`{result['command']}` on {result['created'][:16].replace('T', ' ')}; "
        f"{env.get('cpu_count')} CPU cores, load average {load[0] if load else '?'} at the start; "
        f"TensorFlow {env['versions'].get('tensorflow')}, Keras {env['versions'].get('keras')}, "
        f"Optuna {env['versions'].get('optuna')}, KerasTuner {env['versions'].get('keras-tuner')}"
        # Runs from before the precision was recorded trained in float32.
        f"; {env.get('precision', 'float32')} arithmetic"
        # Runs from before the allocator was recorded kept TensorFlow's pool; said by hand.
        + (f"; tensors in {env['allocator']}" if env.get("allocator") else "") + ".*"
    )


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(met: bool | None, text: str, unsettled: bool = False) -> str:
    """A target line: met, not met, or not measurable; `unsettled`: measured, but the
    machine's noise is larger than what the target asks to resolve."""
    mark = {True: "**met**", False: "**not met**", None: "**not measured**"}[met]
    if unsettled:
        mark = "**not settled** by this run (its noise is larger than the target's margin)"
    return f"Target: {text}: {mark}."


def plot_path(name: str, quick: bool) -> Path:
    return DOCS / f"benchmark-{name}{'-quick' if quick else ''}.png"


def new_figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return fig, ax


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fresh_dir(path: Path) -> Path:
    """An empty directory under results/benchmarks (a rerun measures afresh)."""
    import shutil

    if RESULTS not in path.resolve().parents:
        raise ValueError(f"refusing to clear {path}: not under {RESULTS}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_logged(cmd: Sequence[str], log: Path, timeout: float | None = None,
               env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run a command with its output in `log`; return (exit code, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return proc.returncode, time.perf_counter() - start


def tail(log: Path, n: int = 1) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return " / ".join(lines[-n:]) if lines else "no output"


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}%"


def acc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def secs(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == float("inf"):
        return "not reached"
    return f"{x:,.0f} s" if x >= 100 else f"{x:.1f} s"


def publish(
    name: str,
    quick: bool,
    result: dict[str, Any],
    env: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    *,
    no_doc: bool = False,
    plot: Callable[[dict[str, Any], bool], Any] | None = None,
) -> dict[str, Any]:
    """Save the JSON, then (unless `no_doc`) redraw the plot and rewrite the doc section.

    Returns the saved result as read back, so the doc shows exactly what the JSON holds.
    """
    path = save_json(name, quick, result, env)
    print(f"wrote {path}")
    saved: dict[str, Any] = json.loads(path.read_text())
    if not no_doc:
        if plot is not None:
            plot(saved, quick)
        print(f"updated {update_doc(name, quick, render(saved))}")
    return saved
