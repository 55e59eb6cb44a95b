"""The one thread on which an ``Engine`` runs llama.cpp's compute (load, generate, free).

Why one long-lived thread per engine, measured: llama.cpp's CPU backend parallelizes
with OpenMP, and GNU libgomp keeps a separate pool of worker threads for every thread
that ever started a parallel region, alive as long as that thread lives. Once the pools
hold more threads than there are CPUs, libgomp stops letting idle workers spin and parks
them in the kernel between regions, so every decode step pays a wake-up. On 2 cores,
decoding on one thread while a second pool merely exists (its thread idle in Trio's
thread cache) drops from ~90 to ~80 tok/s; back to ~90 as soon as that thread is gone.
Running whatever computes on a fixed thread keeps one pool per engine, whichever Trio
worker thread or caller asked.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, TypeVar

import outcome

T = TypeVar("T")


class EngineThread:
    """A single daemon thread: runs posted jobs in order and, between them, the stepper.

    The stepper (``Engine._step``) is called again and again while it returns True (some
    stream is active); then the thread sleeps on its job queue until the next job, so an
    idle engine costs nothing. While stepping, posted jobs (a new request joining) are
    picked up between two steps.
    """

    def __init__(self, name: str = "rbee-engine") -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stepper: Callable[[], bool] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        active = False
        while True:
            try:
                job = self._jobs.get(block=not active)
            except queue.Empty:
                job = _NO_JOB
            if job is None:
                return
            if job is not _NO_JOB:
                job()
                # Take every job already waiting before the next step: requests posted
                # together start in the same step.
                while True:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        return
                    more()
            active = self._stepper() if self._stepper is not None else False

    def set_stepper(self, stepper: Callable[[], bool]) -> None:
        """What to call between jobs while it returns True (set once, on the thread)."""
        self._stepper = stepper

    def post(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the thread before its next step (exceptions are the caller's to catch)."""
        self._jobs.put(fn)

    def submit(self, fn: Callable[[], T], deliver: Callable[[outcome.Outcome[T]], object]) -> None:
        """Run ``fn`` on the thread, then ``deliver(outcome)`` there too (never raises)."""
        self._jobs.put(lambda: deliver(outcome.capture(fn)))

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the thread and wait for it (blocking); its exception is re-raised here."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box: list[outcome.Outcome[T]] = []

        def deliver(result: outcome.Outcome[T]) -> None:
            box.append(result)
            done.set()

        self.submit(fn, deliver)
        done.wait()
        return box[0].unwrap()

    def stop(self) -> None:
        """Let the thread finish its queue and end (waits, unless called from the thread)."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _no_job() -> None:
    pass


#: What the loop runs when it polled the queue between steps and found nothing.
_NO_JOB: Callable[[], None] = _no_job
