"""Where TensorFlow's tensors live: glibc's heap, in one arena, instead of TensorFlow's pool.

TensorFlow's oneDNN build serves large tensors from its own BFC pool, which grows to the
largest working set a process has seen and does not shrink, so a process that trains many
different models keeps the biggest one's footprint. `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`
sends them to `malloc` instead, and with glibc kept to one arena (`MALLOC_ARENA_MAX=1`) the
`malloc_trim` after each trial gives most of what a trial freed back: over the memory
benchmark's trials RSS grew about half as much, and whole trials took as long as with the
pool (docs/benchmarks.md, "Memory").

Both settings must be in place before TensorFlow creates its devices and threads, so
`configure` runs when the package is imported. A user who sets
`TF_ONEDNN_USE_SYSTEM_ALLOCATOR` (0 keeps TensorFlow's pool) or `MALLOC_ARENA_MAX` keeps what
they set.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import MutableMapping

SYSTEM_ALLOCATOR_ENV = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"
ARENA_ENV = "MALLOC_ARENA_MAX"  # glibc reads it at start-up; mallopt sets it afterwards
_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def uses_system_allocator(env: MutableMapping[str, str]) -> bool:
    """Whether TensorFlow will hand its tensors to `malloc` under `env`."""
    return env.get(SYSTEM_ALLOCATOR_ENV, "0").strip().lower() in ("1", "true")


def configure(env: MutableMapping[str, str] = os.environ) -> bool:
    """Send TensorFlow's tensors to `malloc` and keep glibc to one arena, unless the user
    chose otherwise; whether glibc was set to one arena here."""
    env.setdefault(SYSTEM_ALLOCATOR_ENV, "1")
    if not uses_system_allocator(env) or ARENA_ENV in env:
        return False
    return set_arena_max(1)


def set_arena_max(n: int) -> bool:
    """Limit glibc to `n` malloc arenas for threads that have none yet; False if not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, n))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator, left alone
        return False


def describe(env: MutableMapping[str, str] = os.environ) -> str:
    """Where this process's TensorFlow tensors live, in words (for benchmark records)."""
    if not uses_system_allocator(env):
        return "TensorFlow's pool"
    arenas = env.get(ARENA_ENV, "1").strip()
    return "malloc, one glibc arena" if arenas == "1" else f"malloc, MALLOC_ARENA_MAX={arenas}"
