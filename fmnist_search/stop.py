"""A request to stop (Ctrl-C or SIGTERM), remembered as well as raised.

Python runs a signal handler between two bytecodes of whatever code is on the main thread,
often library code called from C (TensorFlow, Keras, SQLAlchemy). Some of those C paths
clear any error they meet, so the KeyboardInterrupt the handler raised can vanish: in the
workers' stop test (1 run in 9), a worker lost its parent's SIGINT that way and trained
eleven more trials until the parent killed it, mid-trial. Others turn it into a SystemError
(`interrupt_within`), as in a CI run's worker.
So, within `handled_here`, the handler also records the request, and the places that start
work check it: each training batch (`training`), each trial (`study.run_trials`), the
parent's watch loop.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

# Plain flags, not a threading.Event: a signal handler must not wait for a lock that the
# code it interrupted may hold.
_active = False  # inside `handled_here`
_asked = False  # a stop was requested there


def remember() -> None:
    """Record a stop request (within `handled_here`; elsewhere nobody checks it)."""
    global _asked
    if _active:
        _asked = True


def ask(signum: int, frame: Any) -> None:
    """Signal handler: remember the request, then raise it as Ctrl-C."""
    remember()
    raise KeyboardInterrupt


def asked() -> bool:
    """Whether a stop was requested since `handled_here` began."""
    return _asked


def raise_if_asked() -> None:
    """Raise KeyboardInterrupt again if a stop was requested (its first raise may be lost)."""
    if _asked:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handled_here() -> Iterator[None]:
    """Within: SIGINT and SIGTERM call `ask`. An ignored SIGINT stays ignored (a search
    started in the background ignores the terminal's Ctrl-C), and so does one with a
    handler of the caller's own; SIGTERM, from a supervisor or a dying parent, gets
    Ctrl-C's handling either way. On exit the previous handlers are back and the request
    is forgotten."""
    global _active, _asked
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _active, _asked = True, False
    if previous[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, ask)
    signal.signal(signal.SIGTERM, ask)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: set from C, not restorable from Python
                signal.signal(s, handler)
        _active, _asked = False, False


def interrupt_within(error: BaseException) -> bool:
    """Whether `error` is, or came from, a Ctrl-C (KeyboardInterrupt).

    A signal handled while C code (TensorFlow's, the import machinery) runs a Python
    callback can come out as `SystemError: ... returned a result with an exception set`,
    with the KeyboardInterrupt as its cause. Counted as an ordinary exception, it would
    fail the trial as a crash and let the worker start the next one, which the parent then
    kills mid-trial (left RUNNING)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False
