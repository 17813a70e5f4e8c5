"""The allocator settings made when the package is imported (fmnist_search/allocator.py)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_search import allocator

ROOT = Path(__file__).resolve().parents[1]

# Four threads each allocate a block big enough to bypass Python's small-object allocator,
# then glibc lists its arenas on stderr.
ARENAS = """
import ctypes, threading, time
{prelude}
def hold():
    block = bytearray(1 << 20)
    time.sleep(0.3)
threads = [threading.Thread(target=hold) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL("libc.so.6").malloc_stats()
"""

# TensorFlow's own threads at work (its inter- and intra-op pools), then glibc's arenas.
TF_ARENAS = """
import ctypes
import fmnist_search
import tensorflow as tf
x = tf.random.uniform((512, 512))
for _ in range(20):
    x = tf.linalg.matmul(x, x) / 512.0
tf.keras.layers.Conv2D(8, 3)(tf.random.uniform((64, 28, 28, 1))).numpy()
ctypes.CDLL("libc.so.6").malloc_stats()
"""

# A TensorFlow op on a large tensor; the pool's peak is what TensorFlow's BFC pool served.
POOL_PEAK = """
import fmnist_search
import tensorflow as tf
x = tf.random.uniform((1024, 1024, 8))
y = tf.reduce_sum(x * 2.0)
print(tf.config.experimental.get_memory_info("CPU:0")["peak"])
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in (allocator.SYSTEM_ALLOCATOR_ENV, allocator.ARENA_ENV)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def _arenas(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    return sum(line.startswith("Arena ") for line in result.stderr.splitlines())


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


def test_configure_turns_the_system_allocator_on_and_keeps_one_arena() -> None:
    env: dict[str, str] = {}
    # The package's import made the same call in this process already: nothing changes here.
    assert allocator.configure(env) is _glibc()
    assert env == {allocator.SYSTEM_ALLOCATOR_ENV: "1"}
    assert allocator.uses_system_allocator(env)


@pytest.mark.parametrize("value", ["0", "false"])
def test_a_user_who_keeps_tensorflows_pool_keeps_glibcs_arenas(value: str) -> None:
    env = {allocator.SYSTEM_ALLOCATOR_ENV: value}
    assert allocator.configure(env) is False
    assert env == {allocator.SYSTEM_ALLOCATOR_ENV: value}
    assert not allocator.uses_system_allocator(env)


def test_a_users_arena_setting_is_left_to_glibc() -> None:
    env = {allocator.ARENA_ENV: "4"}
    assert allocator.configure(env) is False
    assert env[allocator.SYSTEM_ALLOCATOR_ENV] == "1"


def test_importing_the_package_keeps_malloc_to_one_arena() -> None:
    assert _arenas(_run(ARENAS.format(prelude="import fmnist_search"))) == 1
    # The same threads without the package, or with the pool kept, get arenas of their own.
    assert _arenas(_run(ARENAS.format(prelude=""))) > 1
    assert _arenas(_run(ARENAS.format(prelude="import fmnist_search"),
                        **{allocator.SYSTEM_ALLOCATOR_ENV: "0"})) > 1


def test_tensorflows_threads_share_the_one_arena() -> None:
    assert _arenas(_run(TF_ARENAS)) == 1
    assert _arenas(_run(TF_ARENAS, **{allocator.SYSTEM_ALLOCATOR_ENV: "0"})) > 1


def test_tensorflow_serves_tensors_from_malloc_not_its_pool() -> None:
    on = _run(POOL_PEAK)
    assert on.returncode == 0, on.stderr
    assert int(on.stdout.split()[-1]) == 0
    kept = _run(POOL_PEAK, **{allocator.SYSTEM_ALLOCATOR_ENV: "0"})
    assert kept.returncode == 0, kept.stderr
    assert int(kept.stdout.split()[-1]) >= 32 * 1024 * 1024  # the 32 MB tensor came from it


def test_describe_says_where_tensors_live() -> None:
    assert allocator.describe({}) == "TensorFlow's pool"
    on = {allocator.SYSTEM_ALLOCATOR_ENV: "1"}
    assert allocator.describe(on, one_arena=True) == "malloc, one glibc arena"
    assert allocator.describe(on, one_arena=False) == "malloc"
    assert allocator.describe({**on, allocator.ARENA_ENV: "4"}) == "malloc, MALLOC_ARENA_MAX=4"
    # In this process the package's import set one arena (this machine runs glibc).
    assert allocator.describe(on) == ("malloc, one glibc arena" if _glibc() else "malloc")


LATE = """
import warnings
import tensorflow as tf
tf.zeros((2,))  # TensorFlow's devices and pool exist now
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fmnist_search
    from fmnist_search import allocator
print(len(caught), caught[0].message if caught else "")
print(allocator.describe())
x = tf.random.uniform((1024, 1024, 8))
y = tf.reduce_sum(x * 2.0)
print(tf.config.experimental.get_memory_info("CPU:0")["peak"])
"""


def test_tensorflow_run_before_the_import_is_reported() -> None:
    """Only an op run first is too late: importing `tensorflow` first is fine (POOL_PEAK's
    order reversed is checked below)."""
    late = _run(LATE)
    assert late.returncode == 0, late.stderr
    warned, described, peak = late.stdout.strip().splitlines()[-3:]
    assert warned.startswith("1 TensorFlow ran before fmnist_search was imported")
    assert described.startswith("TensorFlow's pool (TensorFlow ran before")
    assert int(peak) >= 32 * 1024 * 1024  # indeed served by the pool
    with_arenas = _run(LATE, **{allocator.ARENA_ENV: "2"})  # the user's arena setting too
    assert with_arenas.returncode == 0, with_arenas.stderr
    assert with_arenas.stdout.strip().splitlines()[-3].startswith("1 TensorFlow ran before")
    imported_first = _run(POOL_PEAK.replace("import fmnist_search\nimport tensorflow as tf",
                                            "import tensorflow as tf\nimport fmnist_search"))
    assert imported_first.returncode == 0, imported_first.stderr
    assert "TensorFlow ran before" not in imported_first.stderr
    assert int(imported_first.stdout.split()[-1]) == 0
