"""Downloads from the Hugging Face Hub: pick the GGUF, fetch it resumably, verify sha256.

Why our own ranged GET rather than ``hf_hub_download``: we need progress as narration
events from Trio (not a tqdm bar in a thread), a ``.part`` file beside the final one that
survives a hive restart, and the sha256 check before anything is renamed or registered.
Everything Hub-specific still goes through ``huggingface_hub``, so its environment is
honoured: ``HfApi.model_info(files_metadata=True)`` lists the files with their LFS sha256
and size, ``hf_hub_url``/``get_hf_file_metadata`` give the resolve URL and its CDN
location, ``build_hf_headers`` the token (``HF_TOKEN``, or the token file under
``HF_HOME``); ``HF_ENDPOINT`` is read by the library; ``HF_HUB_OFFLINE`` stops before any
request; a file already in the Hugging Face cache (``HF_HOME``) is used where it is.

Resume: a ``.part`` that exists is continued with ``Range: bytes=<size>-`` (206); a
server that answers 200 instead restarts it. A broken connection is retried (resuming)
up to ``MAX_STALLED_ATTEMPTS`` times in a row without new bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx
import trio

from ..errors import ChecksumMismatchError, ModelNotFoundError, ProvisionError, RbeeError
from ..requests import EMBEDDED_ALIAS, ModelRef

#: Progress narration is rate-limited to this many events per second.
PROGRESS_EVENTS_PER_S = 4
MAX_STALLED_ATTEMPTS = 5
RETRY_DELAY_S = 0.5
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Quantisations in the order ``hf:org/repo`` prefers them.
PREFERRED_QUANTS = ("Q4_K_M", "Q5_K_M", "Q8_0", "F16")


@dataclass(frozen=True, slots=True)
class HubFile:
    """One GGUF file on the Hub, as ``model_info`` and the resolve HEAD describe it."""

    repo: str
    filename: str
    revision: str
    size: int
    sha256: str
    url: str  # the resolve URL at that revision
    alternatives: tuple[tuple[str, int], ...] = field(default=())  # (quant, size) of the repo's other GGUFs

    @property
    def reference(self) -> str:
        """The canonical catalogue reference, ``hf:org/repo/file.gguf``."""
        return f"hf:{self.repo}/{self.filename}"


def quant_of(filename: str) -> str | None:
    """The quantisation named in a GGUF file name (``...-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    stem = filename.rsplit("/", 1)[-1]
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    match = re.search(r"(?:^|[-_.])((?:IQ|Q)\d[A-Z0-9_]*|F16|BF16|F32)$", stem, re.IGNORECASE)
    return match.group(1).upper() if match else None


def pick_gguf(filenames: list[str], quant: str | None) -> str | None:
    """The GGUF a repository reference means: that ``quant``, else the preferred order.

    Split GGUFs (``-00001-of-00003.gguf``) are not picked: a worker loads one file.
    """
    ggufs = [f for f in filenames if f.lower().endswith(".gguf") and not re.search(r"-\d{5}-of-\d{5}\.gguf$", f)]
    by_quant: dict[str, list[str]] = {}
    for name in ggufs:
        q = quant_of(name)
        if q:
            by_quant.setdefault(q, []).append(name)
    for wanted in ([quant] if quant else list(PREFERRED_QUANTS)):
        if wanted in by_quant:
            return sorted(by_quant[wanted], key=len)[0]
    return None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: no request to the Hub may be made."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


#: The models that need no Hub: what to use when it cannot be reached.
WITHOUT_THE_HUB = (
    f"a model this node already has (rbee-keeper models list), the embedded {EMBEDDED_ALIAS}, or a file: "
    "model (file:/abs/path.gguf, in a folder of RBEE_MODEL_DIRS)"
)

#: Failing to connect, by class name: huggingface_hub's HTTP library has been requests
#: (``ConnectionError``, ``ConnectTimeout``), httpx and httpx2 (``ConnectError``,
#: ``ConnectTimeout``); beneath them the OS's (``gaierror``: no DNS; ``ConnectionRefusedError``,
#: a builtin ``ConnectionError``).
_CONNECT_FAILURES = frozenset({"ConnectionError", "ConnectTimeout", "ConnectError", "gaierror"})


def offline_message(ref: ModelRef) -> str:
    """Why an hf: reference the catalog does not hold cannot be resolved offline, and the fix."""
    return (
        f"{ref.reference} is not on this node (not in its model catalog), and HF_HUB_OFFLINE is set, so the "
        f"Hugging Face Hub cannot be asked which file it is: unset HF_HUB_OFFLINE and download it while the Hub "
        f"can be reached (rbee-keeper models download {ref.reference}), or use {WITHOUT_THE_HUB}"
    )


def cannot_connect(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a failure to connect at all:
    no DNS, refused, timed out while connecting. A Hub that answers badly is not one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(cls.__name__ in _CONNECT_FAILURES for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def unreachable_message(what: str, exc: BaseException) -> str:
    """The Hub could not be reached for ``what`` (an offline node, a wrong ``HF_ENDPOINT``):
    the cause and every way out, in one line."""
    from huggingface_hub import constants

    cause = str(exc) or type(exc).__name__
    return (
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} for {what} ({cause}): if the Hub is reached "
        f"through a mirror, set HF_ENDPOINT to its URL; offline, use {WITHOUT_THE_HUB}, and set HF_HUB_OFFLINE=1 "
        "to stop asking the Hub"
    )


def resolve_hub_file(ref: ModelRef) -> HubFile:
    """Ask the Hub which file ``ref`` means, its size and sha256 (blocking: run in a thread)."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hf_errors

    assert ref.repo is not None
    if offline():
        raise ProvisionError(offline_message(ref))
    try:
        info = HfApi().model_info(ref.repo, files_metadata=True)
        siblings = {s.rfilename: s for s in (info.siblings or [])}
        filename = ref.filename or pick_gguf(sorted(siblings), ref.quant)
        if filename is None or filename not in siblings:
            ggufs = sorted(n for n in siblings if n.lower().endswith(".gguf"))
            wanted = ref.filename or ref.quant or "Q4_K_M, Q5_K_M, Q8_0 or F16"
            raise ModelNotFoundError(
                f"{ref.reference}: {ref.repo} on the Hub has no GGUF for {wanted}; its GGUF files: "
                f"{', '.join(ggufs) or 'none'}" + (f" (name one: hf:{ref.repo}/FILE.gguf)" if ggufs else ""),
            )
        sibling = siblings[filename]
        revision = info.sha or "main"
        url = hf_hub_url(ref.repo, filename, revision=revision)
        meta = get_hf_file_metadata(url)
    except RbeeError:
        raise
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{ref.reference}: the repository {ref.repo} does not exist on the Hugging Face Hub, or it is "
            "private/gated and HF_TOKEN is not set: check the name (org/repo), or set HF_TOKEN",
        ) from None
    except hf_errors.OfflineModeIsEnabled:
        raise ProvisionError(offline_message(ref)) from None
    except Exception as exc:  # noqa: BLE001 - network and Hub errors become one clear message
        if cannot_connect(exc):
            raise ProvisionError(unreachable_message(ref.reference, exc)) from None
        raise ProvisionError(f"could not ask the Hub about {ref.reference}: {exc}") from None
    lfs = sibling.lfs
    sha256 = (lfs.sha256 if lfs else None) or (meta.etag if meta.etag and _SHA256.match(meta.etag) else None)
    size = (lfs.size if lfs else None) or sibling.size or meta.size
    if not sha256 or not size:
        raise ProvisionError(
            f"the Hub states no sha256/size for {ref.repo}/{filename}: rbee does not register an unverified file"
        )
    alternatives = tuple(
        (q, (s.lfs.size if s.lfs else s.size) or 0)
        for name, s in siblings.items()
        if name != filename and name.lower().endswith(".gguf") and (q := quant_of(name))
    )
    return HubFile(ref.repo, filename, revision, int(size), sha256.lower(), url, alternatives)


def cached_hub_file(hub: HubFile) -> Path | None:
    """The file in the Hugging Face cache (``HF_HOME``) at that revision, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub.repo, hub.filename, revision=hub.revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def install_verified(part: Path, dest: Path, *, actual: str, expected: str, mismatch: str) -> None:
    """Move a finished ``part`` file to ``dest`` only if its sha256 is ``expected``.

    The one place that enforces "never register an unverified file": on a mismatch the
    part file is deleted and ``ProvisionError`` (code ``checksum_mismatch``) says
    ``mismatch``. The rename is atomic, so ``dest`` is either absent or whole.
    """
    if actual != expected:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(mismatch)
    os.replace(part, dest)


def sha256_of(path: Path) -> str:
    """The sha256 of a file (blocking: run in a thread)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _location_and_headers(hub: HubFile) -> tuple[str, dict[str, str]]:
    """Where the bytes are (the CDN after the Hub's redirect) and the headers to send."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, not of a gzip
    location = get_hf_file_metadata(hub.url).location or hub.url
    if urlsplit(location)[:2] != urlsplit(hub.url)[:2]:
        # A signed CDN URL: the Hub token must not leave the Hub.
        headers.pop("authorization", None)
        headers.pop("Authorization", None)
    return location, headers


ProgressFn = Callable[[int, int, float], None]  # (bytes_done, bytes_total, bytes_per_sec)
NoticeFn = Callable[[str, str], None]  # (action, human)


async def download_hub_file(hub: HubFile, dest: Path, *, progress: ProgressFn, notice: NoticeFn) -> None:
    """Fetch ``hub`` into ``dest.part`` (resuming), verify sha256, rename to ``dest``.

    On a sha256 mismatch the ``.part`` is deleted and ``ProvisionError`` raised: nothing
    partial or unverified ever sits at ``dest``.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stalled = 0
    started_at = trio.current_time()
    first_have: int | None = None
    last_tick = -1.0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > hub.size:
            part.unlink()
            have = 0
        if first_have is None:
            first_have = have
            if have:
                notice("download_resume", f"Resuming {hub.filename} at {have} of {hub.size} bytes")
        if have == hub.size:
            break
        try:
            location, headers = await trio.to_thread.run_sync(_location_and_headers, hub)
        except Exception as exc:  # noqa: BLE001 - the Hub's errors become one message
            if cannot_connect(exc):
                raise ProvisionError(unreachable_message(hub.reference, exc)) from None
            raise ProvisionError(f"could not reach the Hub for {hub.reference}: {exc}") from None
        if have:
            headers["Range"] = f"bytes={have}-"
        got_bytes = False
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), follow_redirects=True) as client:
                async with client.stream("GET", location, headers=headers) as response:
                    if response.status_code == 416:  # our .part is not a prefix any more
                        part.unlink(missing_ok=True)
                        continue
                    if response.status_code not in (200, 206):
                        await response.aread()
                        raise ProvisionError(
                            f"the Hub answered {response.status_code} for {hub.reference}: {response.text[:200]}"
                        )
                    if response.status_code == 200 and have:
                        notice("download_restart", f"The server ignored the range request: restarting {hub.filename}")
                        have = 0
                        first_have = 0
                    with open(part, "ab" if have else "wb") as out:
                        # As the bytes arrive (no re-chunking): what came before a cut is kept.
                        async for chunk in response.aiter_bytes():
                            out.write(chunk)
                            have += len(chunk)
                            got_bytes = True
                            now = trio.current_time()
                            if now - last_tick >= 1 / PROGRESS_EVENTS_PER_S or have == hub.size:
                                last_tick = now
                                elapsed = max(now - started_at, 1e-6)
                                progress(have, hub.size, (have - first_have) / elapsed)
        except httpx.TransportError as exc:
            stalled = 0 if got_bytes else stalled + 1
            if stalled >= MAX_STALLED_ATTEMPTS:
                raise ProvisionError(
                    f"downloading {hub.reference} failed {stalled} times in a row without progress ({exc}); "
                    f"{part.name} is kept and the next try resumes it"
                ) from None
            have_now = part.stat().st_size if part.exists() else 0
            notice("download_retry", f"Connection lost at {have_now} of {hub.size} bytes ({exc}); resuming")
            await trio.sleep(RETRY_DELAY_S * (stalled + 1))
            continue
    notice("download_verify", f"Verifying the sha256 of {hub.filename}")
    actual = await trio.to_thread.run_sync(sha256_of, part)
    install_verified(
        part, dest, actual=actual, expected=hub.sha256,
        mismatch=f"sha256 mismatch for {hub.reference}: the Hub states {hub.sha256}, the download has "
                 f"{actual}; the file was deleted and not registered",
    )
