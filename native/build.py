"""Build rbee's native core (``_rbee_native``) against the installed llama-cpp-python.

Run it with the interpreter of the environment that will import it::

    python native/build.py

It compiles ``native/*.c`` with cffi in API mode against exactly the llama.cpp that the
installed ``llama-cpp-python`` was built from: its shared libraries (``llama_cpp/lib``,
linked with an rpath so nothing needs ``LD_LIBRARY_PATH``) and the headers of the same
version's source distribution. The wheel carries no headers, so they come from, in order:

1. ``RBEE_LLAMA_CPP_SRC``: a directory holding that sdist's tree (``vendor/llama.cpp/...``);
2. the cache ``$XDG_CACHE_HOME/rbee/llama-cpp-python-<version>/`` (or ``~/.cache/...``);
3. ``pip download --no-binary :all: --no-deps llama-cpp-python==<version>``, from whose
   tarball only the header files are extracted into that cache.

The module lands in this environment's platlib as a top-level ``_rbee_native`` so every
virtualenv (and tox env) has its own build linked to its own libllama. A stamp beside it
(a hash of our sources, the headers, the library directory and the version) makes a
second run a no-op. It prints one line saying what it did.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent
SOURCES = ["rbee_core.c", "rbee_generate.c", "rbee_text.c"]
HEADERS = ["rbee_core.h", "rbee_internal.h", "rbee_text.h"]
MODULE_NAME = "_rbee_native"
# The header sets we compile against, relative to the sdist root.
LLAMA_INCLUDE = Path("vendor/llama.cpp/include")
GGML_INCLUDE = Path("vendor/llama.cpp/ggml/include")
# The sdist records the llama.cpp submodule's commit here (a git dir, not a source file).
COMMIT_FILE = Path(".git/modules/vendor/llama.cpp/HEAD")
CDEF_START = "/* --- cdef start --- */"
CDEF_END = "/* --- cdef end --- */"
# The Python callbacks the C side calls: per piece of text (the token loop) and per load
# progress report (see rbee/worker/native_lib.py).
CDEF_CALLBACK = ('extern "Python" int rbee_py_on_token(void *, int32_t, const char *, size_t);\n'
                 'extern "Python" bool rbee_py_on_load_progress(float, void *);\n')


def llama_cpp_location() -> tuple[Path, str]:
    """The installed llama_cpp's ``lib/`` directory and its distribution version.

    ``find_spec`` locates the package without importing it (importing would load
    libllama through ctypes for nothing).
    """
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        sys.exit("native: llama-cpp-python is not installed in this environment (pip install -e .)")
    lib_dir = Path(spec.origin).resolve().parent / "lib"
    if not any(lib_dir.glob("libllama.*")):
        sys.exit(f"native: no libllama in {lib_dir}; reinstall llama-cpp-python")
    return lib_dir, importlib.metadata.version("llama-cpp-python")


def cache_dir(version: str) -> Path:
    """Where the headers of llama-cpp-python ``version`` are cached for this user."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rbee" / f"llama-cpp-python-{version}"


def has_headers(root: Path) -> bool:
    """True if ``root`` looks like the sdist tree with the headers we need."""
    return (root / LLAMA_INCLUDE / "llama.h").is_file() and (root / GGML_INCLUDE / "ggml.h").is_file()


def fetch_headers(version: str, target: Path) -> None:
    """Download the sdist of ``version`` and extract only its llama.cpp/ggml headers."""
    with tempfile.TemporaryDirectory(prefix="rbee-sdist-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", tmp],
            check=True,
        )
        tarballs = list(Path(tmp).glob("*.tar.gz"))
        if not tarballs:
            sys.exit(f"native: pip download gave no sdist for llama-cpp-python=={version}")
        staging = Path(tempfile.mkdtemp(prefix="headers-", dir=target.parent))
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                # Members are "<name>-<version>/vendor/...": drop the top directory.
                relative = Path(*Path(member.name).parts[1:])
                wanted = relative.suffix == ".h" and relative.parent in (LLAMA_INCLUDE, GGML_INCLUDE)
                if not member.isfile() or not (wanted or relative == COMMIT_FILE):
                    continue
                source = tar.extractfile(member)
                assert source is not None
                out = staging / relative
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(source.read())
        # Publish the whole set at once so a half-filled cache is never mistaken for one.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def header_root(version: str) -> Path:
    """The sdist tree whose headers we compile against (see the module docstring)."""
    explicit = os.environ.get("RBEE_LLAMA_CPP_SRC")
    if explicit:
        root = Path(explicit).expanduser().resolve()
        if not has_headers(root):
            sys.exit(f"native: RBEE_LLAMA_CPP_SRC={root} has no {LLAMA_INCLUDE / 'llama.h'}")
        return root
    cached = cache_dir(version)
    if not has_headers(cached):
        cached.parent.mkdir(parents=True, exist_ok=True)
        fetch_headers(version, cached)
    return cached


def llama_commit(headers: Path) -> str:
    """The llama.cpp commit of the sdist tree (``unknown`` if it does not say)."""
    path = headers / COMMIT_FILE
    commit = path.read_text().strip() if path.is_file() else ""
    return commit if commit.isalnum() else "unknown"


def cdef_text() -> str:
    """The declarations cffi needs: the marked part of rbee_core.h plus the callback."""
    header = (NATIVE_DIR / "rbee_core.h").read_text()
    start = header.index(CDEF_START) + len(CDEF_START)
    return header[start : header.index(CDEF_END)] + CDEF_CALLBACK


def build_hash(lib_dir: Path, version: str, headers: Path) -> str:
    """Everything that decides the compiled module's content."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS + ["build.py"]:
        digest.update(name.encode() + b"\0" + (NATIVE_DIR / name).read_bytes())
    digest.update(llama_commit(headers).encode())
    for include in (LLAMA_INCLUDE, GGML_INCLUDE):
        for path in sorted((headers / include).glob("*.h")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    libllama = max(lib_dir.glob("libllama.*"), key=lambda p: len(p.name))
    stat = libllama.stat()
    digest.update(f"{lib_dir}\0{version}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    digest.update(f"{sys.implementation.cache_tag}\0{sysconfig.get_platform()}".encode())
    return digest.hexdigest()


def compile_module(lib_dir: Path, version: str, headers: Path, out_dir: Path) -> Path:
    """Compiles ``_rbee_native`` with cffi and copies it into ``out_dir``."""
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(cdef_text())
    ffibuilder.set_source(
        MODULE_NAME,
        '#include "rbee_core.h"\n',
        sources=[str(NATIVE_DIR / name) for name in SOURCES],
        include_dirs=[str(NATIVE_DIR), str(headers / LLAMA_INCLUDE), str(headers / GGML_INCLUDE)],
        library_dirs=[str(lib_dir)],
        libraries=["llama", "ggml", "ggml-base"],
        define_macros=[
            ("RBEE_LLAMA_COMMIT", f'"{llama_commit(headers)}"'),
            ("RBEE_LLAMA_CPP_PYTHON_VERSION", f'"{version}"'),
        ],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
        # The rpath pins this build to this environment's libllama, whatever the loader path.
        extra_link_args=[f"-Wl,-rpath,{lib_dir}"],
    )
    with tempfile.TemporaryDirectory(prefix="rbee-native-") as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        target = out_dir / built.name
        # Copy beside, then rename: a process importing it meanwhile sees the old or the
        # new module, never half a file (one already running keeps its mapped copy).
        partial = target.with_name(target.name + ".partial")
        shutil.copy2(built, partial)
        os.replace(partial, target)
    return target


def main() -> int:
    """Build (or confirm up to date) and print one line saying which."""
    lib_dir, version = llama_cpp_location()
    headers = header_root(version)
    out_dir = Path(sysconfig.get_paths()["platlib"])
    stamp = out_dir / f"{MODULE_NAME}.build-info.json"
    wanted = build_hash(lib_dir, version, headers)
    existing = list(out_dir.glob(f"{MODULE_NAME}.*.so")) + list(out_dir.glob(f"{MODULE_NAME}.*.pyd"))
    if existing and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("hash") == wanted:
                print(f"native: {MODULE_NAME} is up to date (llama-cpp-python {version}, {lib_dir})")
                return 0
        except ValueError:
            pass  # a damaged stamp just means: build again
    target = compile_module(lib_dir, version, headers, out_dir)
    for old in existing:
        if old != target:
            old.unlink()  # a build for another interpreter ABI tag
    stamp.write_text(json.dumps({"hash": wanted, "llama_cpp_python": version, "lib_dir": str(lib_dir),
                                 "headers": str(headers)}, indent=2) + "\n")
    print(f"native: built {target} against llama-cpp-python {version} ({lib_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
