"""Ctrl-C (SIGINT) and SIGTERM during a stage: stop, remove what was half written, keep the earlier output.

While :func:`interrupts_raise` is active, the first signal raises ``KeyboardInterrupt`` (SIGTERM:
:class:`Terminated`) in the main thread, and the stage's temporary outputs are removed on the way out
(segmenter.artifacts). Python raises a signal handler's exception in whatever Python code runs at that
moment, and that can be code called back from a C or Rust library which swallows it (pydantic-core did,
inside an ``isinstance`` check) or turns it into another error (a ``TypeError`` from ``np.load``). So the
request is also remembered: :func:`raise_if_requested` raises it again, and the output commits of
segmenter.artifacts call it, so a swallowed stop still never replaces the earlier output, and
:func:`requested` lets the command line report an error that came of a stop as the stop it was.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so the same cleanup runs."""


_requested: list[int] = []  # the signal that asked this process's stage to stop, once asked
_depth = 0  # nested interrupts_raise blocks (segmenter_main around run_stage)


def _stop(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated` in the main thread.

    Signals after the first are ignored, so the cleanup it starts can finish (``kill -9`` still stops
    the process). A signal the caller ignores (SIG_IGN, e.g. SIGINT of a background job) stays ignored.
    Outside the main thread this does nothing.
    """
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _requested:  # already stopping: let the cleanup finish
            return
        _requested.append(signum)
        raise _stop(signum)

    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _requested.clear()
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)


def requested() -> Optional[KeyboardInterrupt]:
    """The stop a signal asked for during the running stage (a fresh exception), or None."""
    return _stop(_requested[0]) if _requested else None


def raise_if_requested() -> None:
    """Raise the stop a signal asked for, in case the code it first interrupted swallowed it."""
    stop = requested()
    if stop is not None:
        raise stop
