"""The process's Keras/TensorFlow session between trials: what a trained model leaves behind.

A worker trains many models in one process. Two things stay behind after each one unless
given back:

- **Traced training graphs.** Keras' TensorFlow optimizer sums gradients through
  `ReplicaContext.all_reduce`, a `tf.custom_gradient` function. Every trace of a training
  step registers a gradient function named `CustomGradient-N` in TensorFlow's global
  gradient registry, and that function's closure holds the traced graph: every op and
  tensor of the step (about 7,000 Python objects and 5 MB for a one-conv model, more for
  bigger ones). Nothing ever unregisters it, so `clear_session` and `gc.collect` cannot
  free the graph (tensorflow/tensorflow#27492, #97697). Once the model's training is over,
  nothing needs those entries: they are looked up only while a step is being traced.
- **Keras' global state and freed heap pages**, which `clear_session(free_memory=True)`
  and glibc's `malloc_trim` give back.

`released_session` does both around a trial; `gradients_released` does only the first,
for code that clears the session itself (the KerasTuner engine).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from typing import Any

import keras

_PREFIX = "CustomGradient-"


def _gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's global gradient registry (a private dict), or None if it has moved."""
    if keras.backend.backend() != "tensorflow":
        return None
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
    except (ImportError, AttributeError):  # another TensorFlow layout: leave it alone
        return None
    return registry if isinstance(registry, dict) else None


def traced_gradients() -> frozenset[str]:
    """Names of the custom-gradient functions registered so far in this process."""
    registry = _gradient_registry()
    if registry is None:
        return frozenset()
    return frozenset(k for k in registry if isinstance(k, str) and k.startswith(_PREFIX))


def drop_traced_gradients(keep: frozenset[str]) -> int:
    """Unregister every custom-gradient function not in `keep`; how many were dropped.

    Only call it once the models traced since `keep` was taken are done training: a step
    traced afterwards from one of those graphs would find no gradient.
    """
    registry = _gradient_registry()
    if registry is None:
        return 0
    stale = [k for k in traced_gradients() if k not in keep]
    for k in stale:
        registry.pop(k, None)
    return len(stale)


def malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc): TensorFlow's per-model allocations
    otherwise stay in the process's arenas and RSS climbs trial after trial."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def clear() -> None:
    """Clear Keras' global session (which runs the garbage collector) and trim the heap."""
    keras.backend.clear_session(free_memory=True)
    malloc_trim()


@contextlib.contextmanager
def gradients_released() -> Iterator[None]:
    """Unregister, on exit, the custom gradients registered inside (the traced graphs)."""
    keep = traced_gradients()
    try:
        yield
    finally:
        drop_traced_gradients(keep)


@contextlib.contextmanager
def released_session() -> Iterator[None]:
    """Run one trial's Keras work, then give back what it left: its traced graphs, Keras'
    global session (clear_session runs the garbage collector) and the freed heap pages.

    Models made inside must not be trained again afterwards; ones made before are untouched.
    """
    try:
        with gradients_released():
            yield
    finally:
        clear()
