"""Process-level lifecycle: turning signals into a shutdown.

Dying with the parent is ``rbee.lifetime.set_parent_death_signal()``, which the worker
calls itself at startup (not only whoever spawns it sets it), so the guarantee holds for
any parent: a hive, a test, a shell script. Caveat of Linux's ``PR_SET_PDEATHSIG``: it
fires when the parent *thread* that forked us exits, not the parent process; a parent must
spawn workers from a long-lived thread (its main/event-loop thread).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import AsyncIterator, Iterator

import trio

from .narrator import Narrator
from .state import WorkerState

#: The signals that mean "shut down cleanly, exit 0".
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def install_early_exit() -> None:
    """Until ``serve`` catches them itself, a shutdown signal exits 0 at once.

    Before the model is loaded there is nothing to free; without this a SIGTERM during
    interpreter startup would end the process with the signal's default status.
    """
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, lambda *_: sys.exit(0))


@contextlib.contextmanager
def shutdown_signals() -> Iterator[AsyncIterator[int] | None]:
    """Catch the shutdown signals for the block (None when not on the main thread,
    where Python cannot install signal handlers: an embedding program handles them)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        yield signals


async def watch_signals(signals: AsyncIterator[int] | None, state: WorkerState, say: Narrator) -> None:
    """Turn each shutdown signal into a graceful shutdown (runs until cancelled)."""
    if signals is None:
        return
    async for signum in signals:
        if not state.shutdown_requested.is_set():
            name = signal.Signals(signum).name
            say("signal_received", f"Received {name}: shutting down", signal=name)
        state.shutdown_requested.set()
