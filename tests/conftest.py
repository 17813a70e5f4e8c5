"""Shared fixtures: tiny synthetic IDX data, seeded Keras, isolated environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

from idx_utils import make_synthetic_idx_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    import keras

    keras.utils.set_random_seed(0)
    yield
    # A command run in this process (`cli.main`) chooses the precision models are built
    # in; the next test builds its models in float32 unless it chooses one itself.
    from fmnist_search.precision import use

    use("float32")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 training and 60 test images of 10 learnable synthetic classes."""
    return make_synthetic_idx_dir(tmp_path_factory.mktemp("syn"), n_train=240, n_test=60, seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(synthetic_dir: Path):  # type: ignore[no-untyped-def]
    from fmnist_search.data import load_dataset

    return load_dataset(synthetic_dir, download=False, warn=lambda m: None)


DEFAULT_PG_URL = "postgresql://fmnist:fmnist@127.0.0.1:5432/fmnist_test"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The tests' PostgreSQL (started by `./setup.sh --test`); required under CI."""
    url = os.environ.get("FMNIST_TEST_PG_URL") or DEFAULT_PG_URL
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # no server here: a developer machine without PostgreSQL
        msg = f"PostgreSQL not reachable at {url}: {str(e).splitlines()[0]}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must run the PostgreSQL tests: see .ci/run)")
        pytest.skip(msg + " (run ./setup.sh --test as root to start it)")
    return url


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a run_search.py subprocess: project importable, no stray data dir."""
    return {**os.environ, "FMNIST_DATA_DIR": "", "PYTHONPATH": str(ROOT), **extra}


def run_cli(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python run_search.py ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run_search.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(**env),
        timeout=timeout,
    )


def _default_sigint() -> None:
    # A shell that starts the test run in the background (`cmd &` without job control)
    # makes SIGINT ignored, and children inherit that: the Ctrl-C tests need it back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_cli(*args: str, **env: str) -> subprocess.Popen[str]:
    """Start `python run_search.py ARGS` in the background (Ctrl-C reaches it)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_search.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=cli_env(**env),
        preexec_fn=_default_sigint,
    )
