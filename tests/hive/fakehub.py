"""A local HTTP server that answers like the Hugging Face Hub, for the calls rbee makes.

Read from huggingface_hub's own source (``HfApi.model_info``, ``get_hf_file_metadata``,
``hf_hub_url``): ``GET /api/models/{repo}[/revision/{rev}]?blobs=true`` lists the
siblings with ``size`` and ``lfs {sha256, size, pointerSize}``; ``HEAD/GET
/{repo}/resolve/{rev}/{file}`` answers 302 with ``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag`` (the LFS sha256), ``X-Linked-Size`` and a ``Location`` on the "CDN",
which is a second server (another origin, as the real CDN is: huggingface_hub stops at a
cross-origin redirect and keeps the metadata of the 302). The CDN serves the bytes with
``Range`` support (206).

Knobs: ``cut_at`` (a fraction: the next full GET sends its headers for the whole file,
then only that share of the body, then drops the connection, once), ``wrong_sha256``
(state a sha256 that the bytes do not have), ``bytes_per_sec`` (throttle). Every request
is recorded in ``requests`` as (server, method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    """One file of a fake repository."""

    path: Path
    sha256: str
    size: int


@dataclass
class FakeHub:
    """The two servers and their knobs; start with ``start()``, end with ``close()``."""

    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    cut_at: float | None = None
    wrong_sha256: bool = False
    bytes_per_sec: int | None = None
    requests: list[tuple[str, str, str, str | None]] = field(default_factory=list)

    def add_file(self, repo: str, filename: str, path: Path) -> HubFile:
        """Serve ``path`` as ``repo``/``filename``."""
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        entry = HubFile(Path(path), digest, Path(path).stat().st_size)
        self.repos.setdefault(repo, {})[filename] = entry
        return entry

    def stated_sha256(self, entry: HubFile) -> str:
        """The sha256 the Hub states (wrong on purpose when ``wrong_sha256``)."""
        return ("f" * 64) if self.wrong_sha256 else entry.sha256

    def start(self) -> "FakeHub":
        """Start the hub and CDN servers on 127.0.0.1, each on a free port, in threads."""
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "cdn"))
        for server in (self.hub, self.cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        """What ``HF_ENDPOINT`` is set to."""
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """Base URL of the CDN server."""
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def close(self) -> None:
        """Stop both servers."""
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def cdn_gets(self) -> list[tuple[str, str, str, str | None]]:
        """The GET requests the CDN served (one per download attempt)."""
        return [r for r in self.requests if r[0] == "cdn" and r[1] == "GET"]

    def find(self, sha: str) -> HubFile | None:
        """The file whose true sha256 is ``sha``."""
        for files in self.repos.values():
            for entry in files.values():
                if entry.sha256 == sha:
                    return entry
        return None


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((role, method, path, self.headers.get("Range")))
            if role == "cdn":
                return self._cdn(method, path)
            if path.startswith("/api/models/"):
                return self._model_info(path[len("/api/models/"):])
            if "/resolve/" in path:
                return self._resolve(path)
            self._json(404, {"error": "not found"})

        def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _model_info(self, rest: str) -> None:
            repo = rest.split("/revision/")[0]
            files = hub.repos.get(repo)
            if files is None:
                return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            siblings = [
                {"rfilename": name, "size": f.size, "blobId": "b" * 40,
                 "lfs": {"sha256": hub.stated_sha256(f), "size": f.size, "pointerSize": 134}}
                for name, f in files.items()
            ] + [{"rfilename": "README.md", "size": 10, "blobId": "c" * 40}]
            self._json(200, {"id": repo, "sha": COMMIT, "siblings": siblings, "private": False})

        def _resolve(self, path: str) -> None:
            repo_part, _, rest = path.lstrip("/").partition("/resolve/")
            _, _, filename = rest.partition("/")
            entry = hub.repos.get(repo_part, {}).get(filename)
            if entry is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            sha = hub.stated_sha256(entry)
            self.send_response(302)
            self.send_header("Location", f"{hub.cdn_url}/cdn/{entry.sha256}?signed=1")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", '"' + "d" * 40 + '"')
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(entry.size))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _cdn(self, method: str, path: str) -> None:
            entry = hub.find(path.rsplit("/", 1)[-1]) if path.startswith("/cdn/") else None
            if entry is None:
                return self._json(404, {"error": "no such blob"})
            start, end = 0, entry.size - 1
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                first, _, last = ranged[len("bytes="):].partition("-")
                start = int(first)
                end = int(last) if last else entry.size - 1
                if start >= entry.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{entry.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
            self.end_headers()
            if method == "HEAD":
                return
            stop_at = end + 1
            cut = hub.cut_at is not None and not ranged
            if cut:
                stop_at = int(entry.size * hub.cut_at)  # type: ignore[operator]
                hub.cut_at = None  # once
            self._send_bytes(entry.path, start, stop_at)
            if cut:
                self.close_connection = True
                self.connection.shutdown(2)  # drop it mid-body, as a broken network does

        def _send_bytes(self, path: Path, start: int, stop: int) -> None:
            chunk = 64 * 1024
            with open(path, "rb") as f:
                f.seek(start)
                pos = start
                while pos < stop:
                    data = f.read(min(chunk, stop - pos))
                    if not data:
                        break
                    self.wfile.write(data)
                    pos += len(data)
                    if hub.bytes_per_sec:
                        time.sleep(len(data) / hub.bytes_per_sec)

    return Handler


def write_small_gguf(path: Path, *, tensor_bytes: int = 4 * 1024 * 1024) -> Path:
    """A valid GGUF v3 with llama-like metadata and one F32 tensor of ``tensor_bytes``."""
    import struct

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [
        (s("general.architecture") + struct.pack("<I", 8) + s("llama")),
        (s("general.name") + struct.pack("<I", 8) + s("rbee test model")),
        (s("llama.block_count") + struct.pack("<I", 4) + struct.pack("<I", 2)),
        (s("llama.embedding_length") + struct.pack("<I", 4) + struct.pack("<I", 64)),
        (s("llama.attention.head_count") + struct.pack("<I", 4) + struct.pack("<I", 4)),
        (s("llama.attention.head_count_kv") + struct.pack("<I", 4) + struct.pack("<I", 2)),
        (s("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 2048)),
        # an array of strings, as a tokenizer's vocabulary is (the header reader skips it)
        (s("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 3) + s("a") + s("b") + s("c")),
    ]
    count = tensor_bytes // 4
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs)
    header += s("weights") + struct.pack("<I", 1) + struct.pack("<Q", count) + struct.pack("<I", 0) + struct.pack("<Q", 0)
    header += b"\0" * (-len(header) % 32)
    with open(path, "wb") as f:
        f.write(header)
        # Not zeros: a cut or misplaced range must change the sha256.
        block = bytes(range(256)) * 4096
        left = count * 4
        while left:
            f.write(block[:left])
            left -= min(left, len(block))
    return path
