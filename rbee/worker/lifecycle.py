"""Process-level lifecycle: turning signals into a shutdown.

Dying with the parent is ``rbee.lifetime.set_parent_death_signal()``, which the worker
calls itself at startup (not only whoever spawns it sets it), so the guarantee holds for
any parent: a hive, a test, a shell script. Caveat of Linux's ``PR_SET_PDEATHSIG``: it
fires when the parent *thread* that forked us exits, not the parent process; a parent must
spawn workers from a long-lived thread (its main/event-loop thread).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import AsyncIterator, Iterator

import trio

from ..errors import RbeeError, ShuttingDownError, WorkerLostError
from ..lifetime import pid_alive
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


#: After a shutdown signal, how long to look for the parent's death (see ``stop_cause``).
PARENT_DEATH_WINDOW_S = 0.1


async def stop_cause(signal_name: str, worker_id: str, parent_pid: int) -> RbeeError:
    """What a job cut short by ``signal_name`` ends with.

    A parent that is dying (its death signal, PR_SET_PDEATHSIG, is what arrived) means the
    hive died under the job: ``worker_lost``. Otherwise someone stopped this worker on
    purpose: ``shutting_down``. Neither is the job's own cancel. Linux sends the death
    signal when the parent's *thread* that forked us ends, which for a killed hive is
    slightly before its last thread: we may still be its child for a moment, so we watch
    it briefly rather than ask once.
    """
    with trio.move_on_after(PARENT_DEATH_WINDOW_S):
        while os.getppid() == parent_pid and pid_alive(parent_pid):
            await trio.sleep(0.005)
    if os.getppid() != parent_pid or not pid_alive(parent_pid):
        return WorkerLostError(f"worker {worker_id} lost its hive (the hive process died) in the middle of the job")
    return ShuttingDownError(f"worker {worker_id} was stopped ({signal_name}) in the middle of the job")


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
    parent_pid = os.getppid()
    async for signum in signals:
        name = signal.Signals(signum).name
        if not state.shutdown_requested.is_set():
            say("signal_received", f"Received {name}: shutting down", signal=name)
        if state.stop_error is None and state.jobs:  # the cause matters only to a running job
            cause = await stop_cause(name, state.config.worker_id, parent_pid)
        else:
            cause = ShuttingDownError(f"worker {state.config.worker_id} was stopped ({name})")
        state.request_shutdown(cause)  # the first cause wins
