"""Provisioning: turn a model reference into a verified, catalogued file on this node.

``resolve(ref)`` is cheap and answers "which file, how big, is it here already?" (the
catalog, else the Hub's metadata, the embedded package or the local file, which must lie
under the model directories: ``rbee.paths.confined_model_file``), so that
preflight can run before anything is fetched. ``ensure(resolution)`` then makes the file
present: a download, an assembly of the embedded model, or a hash of a file already on
disk, each followed by a catalog row. Nothing is fetched again once the catalog holds it,
and a catalogued file is never hashed again while its size and mtime are unchanged (the
catalog's trust rule); one that changed is hashed again on its next use.

The embedded model is used in place when a folder of ``RBEE_MODEL_DIRS`` holds it
(``embedded.shared_copy``): hashed once, catalogued with its real path, never copied; if
its sha256 is not the package's, that is said once and the model assembled into
``$RBEE_HOME/models`` as usual.

One provisioning per canonical reference runs at a time (a *flight*): a second request
for the same missing model joins the first and gets its result, so two spawns download
once. The flight runs in the hive's service nursery, not in the request that started it,
so it survives that request; when the last waiter goes away (its client disconnected)
before it finished, the flight is cancelled (a download keeps its ``.part`` to resume).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import trio

from ..errors import ModelLoadError, ModelNotFoundError, ProvisionError, RbeeError, error_for_code
from ..narration import narrate
from ..narration.events import Event
from ..paths import confined_model_file, model_not_found, models_dir, state_error
from ..requests import EMBEDDED_ALIAS, ModelRef, parse_reference
from . import download, embedded
from .catalog import GONE, CatalogEntry, ModelCatalog, utc_now
from .gguf_header import kv_cache_bytes, read_gguf_metadata
from .preflight import check_disk, human_bytes

ACTOR = "model-provisioner"
Listener = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a reference names: where the file is (or will be), its size and sha256."""

    ref: ModelRef
    reference: str  # canonical catalogue key
    provider: str
    file: str
    size: int
    local_path: Path
    entry: CatalogEntry | None = None  # catalogued and present: nothing to fetch
    hub: download.HubFile | None = None
    #: A file that starts like the model (its GGUF header) before the model itself is here.
    header_path: Path | None = None
    #: The embedded model lies at ``local_path`` in a folder of RBEE_MODEL_DIRS: used there,
    #: once its sha256 is checked.
    in_place: bool = False

    @property
    def aliases(self) -> tuple[str, ...]:
        """The user's spelling, when it differs from the canonical reference."""
        return (self.ref.reference,) if self.ref.reference != self.reference else ()

    @property
    def alternatives(self) -> tuple[tuple[str, int], ...]:
        """(quant, size) of the repository's other GGUFs (for preflight's hints)."""
        return self.hub.alternatives if self.hub else ()

    @property
    def sha256(self) -> str | None:
        """The file's sha256 when known without reading it: the catalog's, the Hub's (LFS),
        the embedded package's; None for a ``file:`` path not catalogued yet."""
        if self.entry is not None:
            return self.entry.sha256
        if self.hub is not None:
            return self.hub.sha256
        if self.provider == "embedded":
            return embedded.embedded_sha256()
        return None

    @property
    def on_disk(self) -> bool:
        """The file is on this node: catalogued (and present), a ``file:`` path, or the
        embedded model in a shared folder."""
        return self.entry is not None or self.in_place or (self.provider == "file" and self.local_path.is_file())

    def public(self) -> dict[str, object]:
        """The JSON of ``POST /v1/models/resolve``: which file the reference means here."""
        return {"reference": self.reference, "sha256": self.sha256, "size": self.size, "on_disk": self.on_disk,
                "file": self.file}

    def kv_bytes(self, ctx_size: int) -> int | None:
        """KV cache bytes from the GGUF header when the file is on disk, else None."""
        path = Path(self.entry.local_path) if self.entry else self.local_path
        if not path.is_file() and self.header_path is not None:
            path = self.header_path
        return kv_bytes_at(path, ctx_size)


def kv_bytes_at(path: Path, ctx_size: int) -> int | None:
    """KV cache bytes for ``ctx_size`` tokens from the GGUF header at ``path``, or None."""
    if not path.is_file():
        return None
    try:
        return kv_cache_bytes(read_gguf_metadata(path), ctx_size)
    except RbeeError:
        return None


def hash_file(path: Path) -> tuple[str, os.stat_result]:
    """The sha256 of ``path``, and its stat taken before reading it: a change during the
    hash then shows as another mtime at the next use. Blocking: run it in a thread."""
    seen = path.stat()
    return download.sha256_of(path), seen


def rebuild_catalog(catalog: ModelCatalog, root: Path) -> list[CatalogEntry]:
    """Register again the model files rbee itself placed under ``root`` (``$RBEE_HOME/models``),
    after a damaged catalog was set aside; returns the new rows.

    What is found there is trusted to be whole: a download or an assembly gives a file its
    final name only after its sha256 matched. Each file is hashed now, because a row
    records the sha256 (the model's identity for the queen): about a second per GiB, once.
    The embedded model counts only if it is the package's (its sha256 is known). Not found
    again, and registered on their next use instead (hashed then, or asked of the Hub):
    ``file:`` models in other folders, files used where they are in the Hugging Face cache,
    and the aliases (``hf:org/repo`` → its file). Blocking: run it in a thread.
    """
    found: list[CatalogEntry] = []

    def register(reference: str, provider: str, file: str, path: Path, hashed: tuple[str, os.stat_result]) -> None:
        sha256, stat = hashed
        written = datetime.fromtimestamp(stat.st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        entry = CatalogEntry(reference=reference, provider=provider, file=file, local_path=str(path),
                             size=stat.st_size, sha256=sha256, downloaded_at=written, mtime_ns=stat.st_mtime_ns)
        catalog.add(entry)
        found.append(entry)

    try:
        name = embedded.embedded_file_name()
        path = root / name
        if path.is_file() and (hashed := hash_file(path))[0] == embedded.embedded_sha256():
            register(EMBEDDED_ALIAS, "embedded", name, path, hashed)
    except (RbeeError, OSError):
        pass  # no embedded package, or its file is not here whole: it is assembled again when asked for
    hub_root = root / "hf"
    for path in sorted(hub_root.rglob("*.gguf")) if hub_root.is_dir() else []:
        parts = path.relative_to(hub_root).parts  # <org>/<repo>/<file in the repository>
        if len(parts) < 3:
            continue
        filename = "/".join(parts[2:])
        reference = f"hf:{parts[0]}/{parts[1]}/{filename}"
        try:
            if not path.is_file() or parse_reference(reference).reference != reference:
                continue
            register(reference, "hf", filename, path, hash_file(path))
        except (RbeeError, OSError):
            continue  # not laid out as rbee lays downloads out, or unreadable: left alone
    return found


def _os_error(res: Resolution, exc: OSError) -> RbeeError:
    """A file operation of a provisioning failed: a ``file:`` that went away (or became
    unreadable) since it was resolved gets the answer it would get now; anything else is
    the state directory's trouble (a full disk, most of the time), in one line."""
    if res.provider == "file":
        return model_not_found(res.ref.reference)
    return state_error(exc.filename or res.local_path.parent, exc)


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.entry: CatalogEntry | None = None
        self.error: RbeeError | None = None
        self.listeners: list[Listener] = []
        self.waiters = 0
        self.scope = trio.CancelScope()


class Provisioner:
    """Resolves references and provisions files, once per reference at a time."""

    def __init__(self, catalog: ModelCatalog, nursery: trio.Nursery) -> None:
        self.catalog = catalog
        self._nursery = nursery
        self._flights: dict[str, _Flight] = {}

    def provisioning(self, reference: str) -> bool:
        """A flight for this canonical reference is under way."""
        return reference in self._flights

    def catalogued(self, reference: str) -> CatalogEntry | None:
        """The catalog's entry while its file is as it was verified (the catalog's trust
        rule: same size and mtime; a stat, no hashing).

        A row whose file vanished (deleted, or its disk unmounted) is dropped and said in
        one line; the model is then provisioned again like a new one (downloaded,
        assembled), and a ``file:`` whose file is gone is refused naming it. A row whose
        file changed (another size or mtime) is dropped and said in one line too; the file
        is then verified again (hashed) by the provisioning of this use. A row from before
        schema 3 (no mtime) is trusted on its size, and the mtime seen now is recorded.
        """
        entry = self.catalog.get(reference)
        if entry is None:
            return None
        change = entry.change_on_disk()
        if change is None:
            if entry.mtime_ns is None:
                try:
                    mtime_ns = os.stat(entry.local_path).st_mtime_ns
                except OSError:
                    return entry  # gone this instant: the next use says so
                self.catalog.record_mtime(entry.reference, mtime_ns)
                entry = dataclasses.replace(entry, mtime_ns=mtime_ns)
            return entry
        self.catalog.remove(entry.reference)
        if change != GONE:
            narrate(ACTOR, "model_changed", f"The file of {entry.reference} ({entry.local_path}) changed since its "
                    f"sha256 was verified ({change}): its catalog entry is dropped and the file is verified again",
                    level="warn", target=entry.reference)
            return None
        narrate(ACTOR, "model_vanished", f"The file of {entry.reference} ({entry.local_path}) is gone from disk: "
                "its catalog entry is dropped", level="warn", target=entry.reference)
        if entry.provider == "file":
            raise ModelNotFoundError(
                f"the model file of {entry.reference} is gone from this node (catalogued at {entry.local_path}; "
                "its entry is dropped): put the file back, or pick a model the node has "
                "(`rbee-keeper models list --node NODE`)")
        return None

    async def resolve(self, ref: ModelRef) -> Resolution:
        """Which file ``ref`` means; asks the Hub only when the catalog does not know it."""
        if ref.provider == "file":
            # The catalog first (a vanished file is said here, on the Trio thread), then
            # the file itself in a thread.
            return await trio.to_thread.run_sync(self._resolve_file, ref, self.catalogued(ref.reference))
        entry = self.catalogued(ref.reference)
        if entry is not None:
            return Resolution(ref, entry.reference, entry.provider, entry.file, entry.size, Path(entry.local_path), entry)
        if ref.provider == "embedded":
            name = embedded.embedded_file_name()
            shared = await trio.to_thread.run_sync(embedded.shared_copy)
            return Resolution(ref, ref.reference, "embedded", name, embedded.embedded_size(),
                              shared or models_dir() / name, header_path=embedded.first_chunk(),
                              in_place=shared is not None)
        hub = await trio.to_thread.run_sync(download.resolve_hub_file, ref)
        entry = self.catalogued(hub.reference)
        dest = models_dir() / "hf" / hub.repo / hub.filename
        return Resolution(ref, hub.reference, "hf", hub.filename, hub.size, Path(entry.local_path) if entry else dest, entry, hub)

    @staticmethod
    def _resolve_file(ref: ModelRef, entry: CatalogEntry | None) -> Resolution:
        """A ``file:`` reference: confined to the model directories (also when catalogued:
        a row from before the file or the directories moved grants nothing), and a GGUF
        header that reads, so that no worker is started for a file it cannot load.

        Blocking (realpath, open, the header): run it in a thread.
        """
        real = confined_model_file(ref.reference, ref.path or "")
        name = Path(ref.path or "").name  # the name as given: a symlink's target is not echoed
        if entry is not None and Path(entry.local_path) == real:
            return Resolution(ref, entry.reference, entry.provider, name, entry.size, real, entry)
        try:
            read_gguf_metadata(real)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{ref.reference} cannot be loaded: {exc.message}") from None
        return Resolution(ref, ref.reference, "file", name, real.stat().st_size, real)

    async def ensure(self, res: Resolution, listener: Listener | None = None) -> CatalogEntry:
        """The catalogued file of ``res``, provisioned now if needed (joining a running flight)."""
        if res.entry is not None:
            if res.aliases:
                self.catalog.add(res.entry, aliases=res.aliases)
            return res.entry
        flight = self._flights.get(res.reference)
        if flight is None:
            flight = self._flights[res.reference] = _Flight()
            if listener is not None:
                flight.listeners.append(listener)
            self._nursery.start_soon(self._run, flight, res)
        else:
            joined = narrate(ACTOR, "download_join", f"{res.reference} is already being provisioned: waiting for it",
                             target=res.reference)
            if listener is not None:
                listener(joined)  # only to the joiner: the others know it is under way
                flight.listeners.append(listener)
        flight.waiters += 1
        try:
            await flight.done.wait()
        finally:
            flight.waiters -= 1
            if listener is not None and listener in flight.listeners:
                flight.listeners.remove(listener)
            if not flight.done.is_set() and flight.waiters == 0:
                flight.scope.cancel()
        if flight.error is not None:
            err = flight.error
            raise error_for_code(err.code, err.message, err.details)  # a fresh one per waiter, same class
        assert flight.entry is not None
        return flight.entry

    def _say(self, flight: _Flight, action: str, human: str, *, level: str = "info", **extra: object) -> None:
        event = narrate(ACTOR, action, human, level=level, **extra)  # type: ignore[arg-type]
        for listener in list(flight.listeners):
            listener(event)

    async def _run(self, flight: _Flight, res: Resolution) -> None:
        try:
            with flight.scope:
                try:
                    flight.entry = await self._provision(flight, res)
                except RbeeError as exc:
                    flight.error = exc
                except OSError as exc:
                    flight.error = _os_error(res, exc)
                except Exception as exc:  # noqa: BLE001 - a bug: report it to the waiters, keep the hive
                    traceback.print_exc(file=sys.stderr)
                    flight.error = ProvisionError(f"provisioning {res.reference} failed: {exc!r}")
            if flight.scope.cancelled_caught:
                flight.error = ProvisionError(f"provisioning {res.reference} was cancelled: nobody waits for it")
            if flight.error is not None:
                self._say(flight, "provision_failed", flight.error.message, level="error", target=res.reference)
        finally:
            if flight.entry is None and flight.error is None:
                flight.error = ProvisionError(f"provisioning {res.reference} stopped: the hive is shutting down")
            self._flights.pop(res.reference, None)
            flight.done.set()

    async def _verified(self, flight: _Flight, res: Resolution, path: Path, expected: str) -> CatalogEntry | None:
        """Hash a file already on disk and register it when its sha256 is ``expected``;
        None on a mismatch (the file is left as it is)."""
        sha, seen = await trio.to_thread.run_sync(hash_file, path)
        return self._register(flight, res, path, sha, seen) if sha == expected else None

    async def _provision(self, flight: _Flight, res: Resolution) -> CatalogEntry:
        say = self._say
        if res.provider == "embedded":
            expected = embedded.embedded_sha256()
            if res.in_place:
                say(flight, "model_hash", f"Verifying the sha256 of the embedded model in place at {res.local_path} "
                    "(once: it is used there, not copied)", target=res.reference, local_path=str(res.local_path))
                entry = await self._verified(flight, res, res.local_path, expected)
                if entry is not None:
                    return entry
                say(flight, "model_mismatch", f"{res.local_path} is named like the embedded model, but its sha256 is "
                    f"not the package's {expected}: it is not used; assembling the model into {models_dir()} instead",
                    level="warn", target=res.reference, local_path=str(res.local_path))
            assembled = models_dir() / res.file
            if assembled.is_file() and assembled.stat().st_size == res.size:
                say(flight, "model_hash", f"Verifying the sha256 of the embedded model at {assembled}",
                    target=res.reference, local_path=str(assembled))
                entry = await self._verified(flight, res, assembled, expected)
                if entry is not None:
                    return entry
            say(flight, "model_assemble", f"Assembling the embedded model {res.file} ({human_bytes(res.size)})",
                target=res.reference, bytes_total=res.size,
                cute=f"Gluing {res.file} together from its chunks! 🧩",
                story=f"The provisioner pieced the embedded model {res.file} together from its parts.")
            path = await trio.to_thread.run_sync(embedded.assemble_embedded, assembled.parent)
            return self._register(flight, res, path, expected)
        if res.provider == "file":
            say(flight, "model_hash", f"Computing the sha256 of {res.local_path}", target=res.reference,
                local_path=str(res.local_path))
            sha, seen = await trio.to_thread.run_sync(hash_file, res.local_path)
            return self._register(flight, res, res.local_path, sha, seen)
        hub = res.hub
        assert hub is not None
        cached = await trio.to_thread.run_sync(download.cached_hub_file, hub)
        if cached is not None:
            say(flight, "model_cache_hit", f"{hub.filename} is in the Hugging Face cache: verifying it", target=res.reference)
            entry = await self._verified(flight, res, cached, hub.sha256)
            if entry is not None:
                return entry
        if res.local_path.is_file() and res.local_path.stat().st_size == hub.size:
            # Downloaded before, its row dropped since (the file changed, or the catalog
            # was set aside): hashed, not fetched again, when it is still the Hub's file.
            say(flight, "model_hash", f"{hub.filename} is already at {res.local_path}: verifying its sha256",
                target=res.reference, local_path=str(res.local_path))
            entry = await self._verified(flight, res, res.local_path, hub.sha256)
            if entry is not None:
                return entry
        part = res.local_path.with_name(res.local_path.name + ".part")
        res.local_path.parent.mkdir(parents=True, exist_ok=True)
        check_disk(hub.size - (part.stat().st_size if part.exists() else 0), res.local_path.parent, model=res.reference)
        say(flight, "download_start", f"Downloading {hub.repo}/{hub.filename} ({human_bytes(hub.size)})",
            target=res.reference, bytes_total=hub.size,
            cute=f"Fetching {hub.filename} from the Hugging Face meadow! ⬇️",
            story=f"The provisioner set out to fetch {hub.filename} ({human_bytes(hub.size)}) from {hub.repo}.")

        def progress(done: int, total: int, speed: float) -> None:
            percent = math.floor(1000.0 * done / total) / 10 if total else 100.0  # 100.0 only when done
            eta = round((total - done) / speed, 1) if speed > 0 else None
            say(flight, "download_progress",
                f"{hub.filename}: {percent:.1f}% of {human_bytes(total)} at {human_bytes(speed)}/s"
                + (f", {eta:.0f} s left" if eta is not None else ""),
                target=res.reference, bytes_done=done, bytes_total=total, percent=percent,
                bytes_per_sec=round(speed), eta_s=eta,
                cute=f"Carrying {hub.filename} home: {percent:.0f}%! 🐝",
                story=f"Mile after mile the provisioner carried {hub.filename}: {percent:.0f}% was home.")

        def notice(action: str, human: str) -> None:
            say(flight, action, human, target=res.reference)

        await download.download_hub_file(hub, res.local_path, progress=progress, notice=notice)
        return self._register(flight, res, res.local_path, hub.sha256)

    def _register(self, flight: _Flight, res: Resolution, path: Path, sha256: str,
                  seen: os.stat_result | None = None) -> CatalogEntry:
        """Catalogue ``path`` as verified; ``seen``: its stat from before the hash (a file
        rbee wrote and renamed itself is stat'ed now)."""
        seen = seen or path.stat()
        entry = CatalogEntry(
            reference=res.reference, provider=res.provider, file=res.file, local_path=str(path),
            size=seen.st_size, sha256=sha256, downloaded_at=utc_now(),
            revision=res.hub.revision if res.hub else None, mtime_ns=seen.st_mtime_ns,
        )
        self.catalog.add(entry, aliases=res.aliases)
        self._say(flight, "model_ready", f"{res.reference} is ready at {path} (sha256 verified)",
                  target=res.reference, bytes_total=entry.size,
                  cute=f"{res.reference} is home and checked! 🏡",
                  story=f"{res.reference} lay safe at {path}, its sha256 checked.")
        return entry
