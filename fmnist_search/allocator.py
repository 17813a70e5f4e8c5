"""Where TensorFlow's tensors live: glibc's heap, in one arena, instead of TensorFlow's pool.

TensorFlow's oneDNN build serves large tensors from its own BFC pool, which grows to the
largest working set a process has seen and, in our runs, did not shrink, so a process that
trains many different models kept the biggest one's footprint.
`TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1` sends them to `malloc` instead. With glibc kept to one
arena (as `MALLOC_ARENA_MAX=1` would) little of what a trial freed stayed resident after the
`malloc_trim` that follows it: over the memory benchmark's 100 trials RSS grew about half as
much, and whole trials showed no difference in time (docs/benchmarks.md, "Memory: what was
tried"). With glibc's usual arenas the system allocator alone grew about as much as the pool.

Both settings must be in place before TensorFlow creates its devices and threads (its first
op), so `configure` runs when the package is imported. Importing `tensorflow` first is fine;
running a TensorFlow op first is not: the pool is then in place for good (measured: a 32 MB
op's peak 0 either way without an op first, 64 MB with one). `configure` warns when that
happened, and `describe` says so. A user who sets `TF_ONEDNN_USE_SYSTEM_ALLOCATOR` (0 keeps
TensorFlow's pool) or `MALLOC_ARENA_MAX` keeps what they set.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from collections.abc import MutableMapping

SYSTEM_ALLOCATOR_ENV = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"
ARENA_ENV = "MALLOC_ARENA_MAX"  # glibc reads it at start-up; mallopt sets it afterwards
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)

_one_arena = False  # whether `configure` limited this process's glibc to one arena
_too_late = False  # whether TensorFlow had started before `configure` ran


def tensorflow_started() -> bool:
    """Whether TensorFlow has created its devices and threads in this process (run an op)."""
    if "tensorflow" not in sys.modules:  # not even imported: nothing to import here
        return False
    try:
        from tensorflow.python.eager import context

        return bool(context.context()._initialized)
    except (ImportError, AttributeError):  # another TensorFlow layout: cannot tell
        return False


def uses_system_allocator(env: MutableMapping[str, str]) -> bool:
    """Whether TensorFlow will hand its tensors to `malloc` under `env`."""
    return env.get(SYSTEM_ALLOCATOR_ENV, "0").strip().lower() in ("1", "true")


def configure(env: MutableMapping[str, str] = os.environ) -> bool:
    """Send TensorFlow's tensors to `malloc` and keep glibc to one arena, unless the user
    chose otherwise; whether glibc was set to one arena here (False where it is not glibc)."""
    global _one_arena, _too_late
    env.setdefault(SYSTEM_ALLOCATOR_ENV, "1")
    if not uses_system_allocator(env):
        return False
    if env is os.environ and tensorflow_started():
        _too_late = True
        warnings.warn("TensorFlow ran before fmnist_search was imported: this process's "
                      "tensors stay in TensorFlow's pool (import fmnist_search before running "
                      "TensorFlow)", RuntimeWarning, stacklevel=2)
    if ARENA_ENV in env:
        return False
    _one_arena = set_arena_max(1)
    return _one_arena


def set_arena_max(n: int) -> bool:
    """Limit glibc to `n` malloc arenas for threads that have none yet; False if not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, n))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator, left alone
        return False


def describe(env: MutableMapping[str, str] = os.environ, one_arena: bool | None = None) -> str:
    """Where this process's TensorFlow tensors live, in words (for benchmark records);
    `one_arena` defaults to what `configure` did in this process."""
    if not uses_system_allocator(env):
        return "TensorFlow's pool"
    if _too_late and env is os.environ:
        return "TensorFlow's pool (TensorFlow ran before fmnist_search was imported)"
    if ARENA_ENV in env:
        return f"malloc, {ARENA_ENV}={env[ARENA_ENV].strip()}"
    one = _one_arena if one_arena is None else one_arena
    return "malloc, one glibc arena" if one else "malloc"
