"""llama.cpp's own programs (llama-bench, llama-server) for the benchmarks to compare against.

Both are built once, with CMake Release, from the ``vendor/llama.cpp`` of the sdist of the
installed llama-cpp-python, so they run exactly the llama.cpp our native core links:
a comparison against another llama.cpp commit would measure the commits, not us. The
sdist is fetched with pip and extracted once into the user cache, and both programs are
built from that one tree, each into a build directory of its own (about 6 minutes each on
2 cores, with ``-j 2``). ``RBEE_LLAMA_CPP_SRC`` may name an extracted sdist to use instead.

Cache layout, under ``$XDG_CACHE_HOME`` (else ``~/.cache``) ``/rbee/``:

    llama-cpp-python-<version>/     the extracted sdist (vendor/llama.cpp inside)
    llama-bench-<version>/build/    bin/llama-bench
    llama-server-<version>/build/   bin/llama-server

A build counts as done only once a stamp file is written after CMake succeeded, so an
interrupted build (Ctrl-C during a link) is resumed by CMake instead of being trusted.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, Callable, NoReturn
from contextlib import contextmanager
from pathlib import Path

#: What every build of llama.cpp here leaves out: nothing but the one program is needed,
#: and nothing may reach the network (curl; the server's web UI would be downloaded).
_COMMON_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_CURL=OFF"]
_SERVER_FLAGS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF"]


#: Story openings after which the base model writes on for well over 128 tokens, greedy
#: (the benchmarks' prompts: long, varied, no shared prefix to cache).
STORY_OPENINGS = (
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The old lighthouse keeper climbed the stairs one last time and looked out at",
    "In the year 2150, the first colony ship arrived at the distant planet, and",
    "My grandmother always told me that the garden behind her house was special because",
    "The detective knelt beside the broken window and noticed something strange:",
    "When the river froze that winter, the children of the town discovered that",
    "Deep beneath the city, in tunnels that nobody had entered for a hundred years,",
    "The recipe had been in our family for generations, and every summer we would",
)

def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rbee"


def llama_cpp_python_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


@contextmanager
def _locked(name: str) -> Iterator[None]:
    # Two benchmarks started at once must not extract or build into the same tree.
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def llama_cpp_source(version: str) -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python ``version`` sdist (fetched once)."""
    explicit = os.environ.get("RBEE_LLAMA_CPP_SRC")
    if explicit:
        return Path(explicit) / "vendor" / "llama.cpp"
    root = cache_root() / f"llama-cpp-python-{version}"
    source = root / "vendor" / "llama.cpp"
    with _locked(f"llama-cpp-python-{version}"):
        if (root / ".extracted").is_file():
            return source
        print(f"llama.cpp tools: fetching the llama-cpp-python {version} sdist", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={version}", "-d", tmp], check=True)
            unpack = Path(tmp) / "unpack"
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
                tar.extractall(unpack, filter="data")
            shutil.rmtree(root, ignore_errors=True)  # a half-extracted tree from before
            shutil.move(next(unpack.iterdir()), root)
        (root / ".extracted").touch()
    return source


def _build(program: str, version: str, flags: list[str]) -> Path:
    """``program`` built once into ``<cache>/<program>-<version>/build/bin``."""
    root = cache_root() / f"{program}-{version}"
    build = root / "build"
    binary = build / "bin" / program
    stamp = build / ".built"
    if stamp.is_file() and binary.is_file():
        return binary
    source = llama_cpp_source(version)
    with _locked(f"{program}-{version}"):
        if stamp.is_file() and binary.is_file():  # built by another run while we waited
            return binary
        cached = build / "CMakeCache.txt"
        if cached.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={source}\n" not in cached.read_text():
            # A build directory configured from another source tree (an older cache layout):
            # CMake refuses to reconfigure it, so start it afresh.
            shutil.rmtree(build)
        print(f"{program}: building it once (CMake Release, ~6 min on 2 cores)", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *_COMMON_FLAGS, *flags], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", program, "-j", "2"], check=True,
                       stdout=subprocess.DEVNULL)
        stamp.touch()
    return binary


def llama_bench_binary(version: str) -> Path:
    """llama-bench from PATH, else built once into the cache."""
    on_path = shutil.which("llama-bench")
    if on_path:
        return Path(on_path)
    return _build("llama-bench", version, ["-DLLAMA_BUILD_SERVER=OFF"])


def llama_server_binary(version: str) -> Path:
    """llama-server built once into the cache (never from PATH: it must be our llama.cpp)."""
    return _build("llama-server", version, _SERVER_FLAGS)


if __name__ == "__main__":
    # Build ahead of a benchmark: python benchmarks/llama_tools.py [llama-bench] [llama-server]
    wanted = sys.argv[1:] or ["llama-bench", "llama-server"]
    builders = {"llama-bench": llama_bench_binary, "llama-server": llama_server_binary}
    for name in wanted:
        print(builders[name](llama_cpp_python_version()))


def narrated_bind_url(process: "subprocess.Popen[Any]", seconds: float) -> str | None:
    """The URL an rbee program narrates on stdout (``server_bind``), or None if it did not
    within ``seconds``. The rest of stdout is drained on a thread for the program's life, so
    it never blocks on a full pipe."""
    found: list[str] = []
    bound = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("action") == "server_bind" and not found:
                found.append(event["url"])
                bound.set()
        bound.set()

    threading.Thread(target=read, daemon=True).start()
    bound.wait(seconds)
    return found[0] if found else None



def exit_with(main: Callable[[], int], *, on_interrupt: str) -> NoReturn:
    """Run a benchmark's ``main`` and exit with its code; Ctrl-C exits 130 after saying
    ``on_interrupt`` (what ``main``'s cleanup has stopped)."""
    interrupted = False
    code = 1
    try:
        code = main()
    except* KeyboardInterrupt:  # Trio hands it over inside an exception group
        interrupted = True
    if interrupted:
        print(f"interrupted: {on_interrupt}", file=sys.stderr)
        code = 130
    sys.exit(code)
