"""``rbee-keeper chat``: an interactive, multi-turn chat on one queen (like ``ollama run``).

Each line typed at ``>>> `` is a user message; the whole conversation (system, user and
assistant turns) goes to the queen as one ``infer`` job with ``messages``; the answer
streams to stdout and, once complete, joins the conversation (``conversation.py``). One
queen serves the session: the running one, else an ephemeral queen started once and shut
down (with its hives and workers) when the chat ends.

Threads, and why: Trio runs on a thread of its own for the whole session, and the main
thread reads the lines with ``input()`` (readline), as ``python -m asyncio`` runs its REPL.

- Not ``input()`` in ``trio.to_thread.run_sync`` with Trio on the main thread: Python runs
  signal handlers on the main thread only, and ``readline`` on another thread cannot be
  interrupted, so Ctrl-C could not clear a half-typed line (and a second reader could
  not start while the first still owns the terminal).
- Not one ``trio.run`` per turn with ``input()`` between them: an ephemeral queen lives
  for the whole session and its narration (its stdout pipe) must be read all along, or
  the pipe fills while the user thinks and the queen blocks on its next write.

Ctrl-C: one ``signal.signal`` handler on the main thread acts by phase
(``conversation.sigint_action``): at the prompt it raises ``KeyboardInterrupt``, which only
``input()`` sees (the line is dropped, a new prompt comes); while an answer streams (or
the queen starts) it cancels that call's cancel scope through the Trio token, so the job
leaves ``open_job_stream`` early and is cancelled at every hop (``DELETE`` on the queen,
which stops the worker's decode); a second Ctrl-C before that is done, or one while the
chat ends, SIGKILLs an ephemeral queen (its hives still get SIGTERM through
PR_SET_PDEATHSIG) and exits 130 at once, as a second Ctrl-C does for ``infer``. Never a
``KeyboardInterrupt`` at a random point: outside the prompt the handler raises nothing.

PR_SET_PDEATHSIG fires when the *thread* that forked a child exits: the ephemeral queen
is forked on the Trio thread, which lives until the queen has been shut down, and whose
end (however the keeper ends) takes the queen down with it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

import trio

from ..errors import InternalError, RbeeError, StateError
from ..paths import rbee_home
from .conversation import HELP, Conversation, Entry, Phase, PromptReader, sigint_action
from .exit_codes import EXIT_CANCELLED, EXIT_JOB_FAILED, EXIT_OK
from .output import Output
from .queen_control import EphemeralQueen, find_queen
from .run_job import _JobOutcome, _report, _stream

T = TypeVar("T")

#: The history of lines typed at the prompt, across sessions (like a shell's).
HISTORY_FILE = "chat_history"


class ChatOutput(Output):
    """``Output`` that also keeps the answer being streamed (for the conversation)."""

    def __init__(self, mode: str = "human") -> None:
        super().__init__(mode)
        self.answer: list[str] = []

    def token(self, text: str) -> None:
        self.answer.append(text)
        super().token(text)


class ChatSession:
    """One chat: the Trio thread, the queen, the conversation, and Ctrl-C by phase.

    ``run(reader)`` runs on the main thread; the methods starting with ``_a`` run on the
    Trio thread (through ``_call``).
    """

    def __init__(self, base: dict[str, Any], conversation: Conversation, out: ChatOutput, later_mode: str) -> None:
        self.base = base  # the infer request without its messages
        self.conversation = conversation
        self.out = out
        self.later_mode = later_mode  # the narration mode after the first turn
        self.phase: Phase = "idle"
        self.interrupting = False
        self.queen: EphemeralQueen | None = None
        self.url: str | None = None
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closed: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._loop_error: BaseException | None = None

    # -- main thread ----------------------------------------------------------------------

    def run(self, reader: PromptReader) -> int:
        """The whole session; returns the exit code (0 at Ctrl-D or ``/bye``)."""
        self._start_loop()
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            try:
                connected = self._call("starting", self._aconnect)
            except RbeeError as exc:
                self.out.error(exc.message)
                return EXIT_JOB_FAILED
            except OSError as exc:  # queen-rbee could not be started at all
                self.out.error(f"cannot start queen-rbee: {exc.strerror or exc}")
                return EXIT_JOB_FAILED
            if not connected:
                self.out.line("Cancelled.")
                return EXIT_CANCELLED
            return self._converse(reader)
        finally:
            self.phase = "closing"
            try:
                if self._token is not None:
                    trio.from_thread.run(self._aclose, trio_token=self._token)
            except (trio.RunFinishedError, trio.Cancelled):
                pass  # the loop has ended already
            finally:
                if self._thread is not None:
                    self._thread.join()
                signal.signal(signal.SIGINT, previous)
                self.phase = "idle"

    def _converse(self, reader: PromptReader) -> int:
        first = True
        while True:
            try:
                self.phase = "reading"
                entry = reader.read()
                self.phase = "idle"
            except KeyboardInterrupt:  # Ctrl-C just before or after input() itself
                self.phase = "idle"
                entry = Entry("interrupted")
            if entry.kind == "bye":
                return EXIT_OK
            if entry.kind == "help":
                sys.stdout.write(HELP + "\n")
                sys.stdout.flush()
            elif entry.kind == "clear":
                self.conversation.clear()
                self.out.line("Cleared the conversation.")
            elif entry.kind == "unknown":
                self.out.line(f"Unknown command {entry.text!r}. Type /? for help")
            elif entry.kind == "say":
                if not self._turn(entry.text):
                    return EXIT_JOB_FAILED
                if first:
                    # The first turn shows what it takes (queen, hive, model load); then
                    # quiet, unless --narration was given.
                    self.out.set_mode(self.later_mode)
                    first = False

    def _turn(self, question: str) -> bool:
        """One question and its answer; False when the session cannot go on (its queen is gone).

        The turn joins the conversation only when its answer completed: an interrupted or
        failed one is forgotten, question and all.
        """
        request = {**self.base, "messages": self.conversation.messages(question)}
        self.out.answer = []
        started = time.monotonic()
        try:
            outcome = self._call("streaming", self._aask, request, started)
        except RbeeError as exc:
            self.out.end_text()
            self.out.error(exc.message)
            if "exceeds the context" in exc.message and len(self.conversation):
                self.out.line("The conversation no longer fits the model's context: /clear starts a new one.")
            return self._queen_alive()
        if outcome is None:  # Ctrl-C: after the terminal's ^C, a new line
            self.out.new_line()
            return self._queen_alive()
        self.out.end_text()
        if _report(request, self.out, outcome, time.monotonic() - started) == EXIT_OK:
            self.conversation.remember(question, "".join(self.out.answer))
        return self._queen_alive()

    def _queen_alive(self) -> bool:
        if self.queen is not None and self.queen.child.returncode is not None:
            self.out.error(f"the ephemeral queen-rbee exited ({self.queen.child.returncode}); ending the chat")
            return False
        if self._loop_error is not None:
            return False
        return True

    def _call(self, phase: Phase, afn: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """Run ``afn`` on the Trio thread in a cancel scope that Ctrl-C cancels; None if it did."""
        if self._token is None:
            raise InternalError(f"the keeper's event loop did not start ({self._loop_error!r})")
        scope = trio.CancelScope()
        self._scope = scope
        self.interrupting = False
        self.phase = phase
        try:
            return trio.from_thread.run(self._awithin, scope, afn, *args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            raise InternalError(f"the keeper's event loop ended ({self._loop_error!r})") from None
        finally:
            self.phase = "idle"
            self._scope = None

    def _on_sigint(self, signum: int, frame: object) -> None:
        action = sigint_action(self.phase, self.interrupting)
        if action == "clear_line":
            raise KeyboardInterrupt
        if action == "cancel":
            self.interrupting = True
            scope, token = self._scope, self._token
            if scope is not None and token is not None:
                token.run_sync_soon(scope.cancel)
        elif action == "exit_now":
            if self.queen is not None:
                self.queen.kill()
            self.out.line("Cancelled.")
            os._exit(EXIT_CANCELLED)

    def _start_loop(self) -> None:
        ready = threading.Event()

        def main() -> None:
            try:
                trio.run(self._aloop, ready)
            except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
                self._loop_error = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=main, name="rbee-chat-trio", daemon=True)
        self._thread.start()
        ready.wait()

    # -- Trio thread ----------------------------------------------------------------------

    async def _aloop(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._closed = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            ready.set()
            await self._closed.wait()
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _awithin(scope: trio.CancelScope, afn: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        with scope:
            return await afn(*args)
        return None  # cancelled (Ctrl-C)

    async def _aconnect(self) -> bool:
        url = await find_queen()
        if url is None:
            assert self._nursery is not None
            self.queen = await EphemeralQueen.start(self._nursery, self.out.event)
            url = self.queen.url
            # While jobs stream, the queen's stdout only repeats what their streams carry;
            # between turns nothing of it may write over the prompt.
            self.queen.mute(True)
        self.url = url
        return True

    async def _aask(self, request: dict[str, Any], started: float) -> _JobOutcome:
        """Stream one answer (tokens to stdout, narration to stderr); how it ended."""
        assert self.url is not None
        outcome = _JobOutcome()
        await _stream(self.url, request, self.out, outcome, started)
        return outcome

    async def _aclose(self) -> None:
        try:
            if self.queen is not None:
                self.queen.mute(False)  # the cascade shutting down (in the current mode)
                await self.queen.shutdown()
        finally:
            assert self._closed is not None
            self._closed.set()


def run_chat(base: dict[str, Any], system: str | None, narration: str | None) -> int:
    """``rbee-keeper chat``: ``base`` is the checked infer request without messages;
    ``narration`` None means human for the first turn, quiet after it."""
    out = ChatOutput(narration or "human")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    history = None
    if interactive:
        try:
            history = rbee_home() / HISTORY_FILE
        except StateError as exc:  # an unusable RBEE_HOME costs the history, not the chat
            out.error(f"{exc.message} (chat history off)")
    reader = PromptReader(interactive=interactive, history_path=history)
    session = ChatSession(base, Conversation(system), out, narration or "quiet")
    try:
        return session.run(reader)
    finally:
        reader.save_history()
