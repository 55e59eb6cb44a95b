"""What one `llm-worker-rbee` process is told to do, and the exit codes it answers with.

``WorkerConfig`` is built by the CLI (``rbee.worker.main``) or by a test/embedding program
and handed to ``rbee.worker.server.serve``. It holds no live state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: The backends the CLI accepts; whether one is compiled in is checked at startup.
BACKENDS = ("cpu", "cuda", "metal")

#: The actor name of every narration event this program emits.
ACTOR = "llm-worker-rbee"

SECONDS = 1.0

#: The context size when ``--ctx-size`` is not given: enough for chat-sized prompts and
#: answers, small enough that the KV cache of a 270M model stays in tens of MB.
DEFAULT_CTX_SIZE = 4096

#: Streams one worker serves at once (``--parallel``): one copy of the weights, one KV
#: cache of ``ctx_size × parallel`` cells, continuous batching. 4 like llama-server's auto.
DEFAULT_PARALLEL = 4

# Exit codes: a parent (the hive) can tell the failures apart without parsing stderr.
EXIT_OK = 0
EXIT_USAGE = 2  #: a bad command line (unknown backend, missing option ...)
EXIT_CALLBACK_FAILED = 3  #: the ready callback never succeeded
EXIT_BACKEND_UNAVAILABLE = 4  #: --backend names a backend this build or machine lacks
EXIT_MODEL_LOAD_FAILED = 5  #: the model file is missing, unreadable or not a GGUF
EXIT_INTERNAL_ERROR = 1  #: anything else (a bug: narrated and written to stderr)


def default_threads() -> int:
    """Threads for decode when ``--threads`` is not given: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything `llm-worker-rbee` needs to serve one model on one device.

    ``port`` 0 picks a free port (the bound one is narrated as ``server_bind``).
    ``model_ref`` is what the ready callback reports; it defaults to ``file:<path>``.
    ``api_key``, when set, guards every route but ``/health``.
    """

    model_path: Path
    worker_id: str
    port: int = 0
    host: str = "127.0.0.1"
    backend: str = "cpu"
    device: int = 0
    callback_url: str | None = None
    api_key: str | None = None
    threads: int | None = None
    #: Tokens ONE stream may hold (prompt + generated); the KV cache holds ctx_size × parallel.
    ctx_size: int = DEFAULT_CTX_SIZE
    parallel: int = DEFAULT_PARALLEL
    model_ref: str | None = None
    #: How long a graceful shutdown lets open streams finish before cutting them.
    graceful_timeout: float = 2 * SECONDS

    @property
    def effective_threads(self) -> int:
        """``threads``, or every CPU this process may run on."""
        return self.threads if self.threads else default_threads()

    @property
    def effective_model_ref(self) -> str:
        """``model_ref``, or ``file:<absolute model path>``."""
        return self.model_ref or f"file:{Path(self.model_path).resolve()}"
