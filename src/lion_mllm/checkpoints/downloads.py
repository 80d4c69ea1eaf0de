"""A small, dependency-free file downloader shared by the whole package.

Everything LION needs from the network (RAM's tag vocabulary here; the checkpoints later, through
``lion download``) goes through :func:`download_file`:

* plain ``urllib`` from the standard library, so nothing beyond Python is needed;
* data is written to ``<dest>.part`` first and renamed onto ``dest`` atomically only once it verifies,
  so an interrupted or corrupt transfer never leaves a file that looks complete;
* an existing ``.part`` file is resumed with an HTTP ``Range`` request (a server that ignores ranges
  simply sends the whole file again, which is detected and handled);
* size / md5 / sha256 are checked when given; a mismatch raises :class:`ChecksumMismatchError` naming
  the file and both checksums, and the bad data is deleted;
* a destination that already exists and verifies is reused without any network access.

:func:`cache_dir` is the package cache: ``$LION_MLLM_CACHE`` when set, else ``~/.cache/lion_mllm``.
Concurrent downloads of the same file from several processes are not coordinated.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "ChecksumMismatchError",
    "DownloadError",
    "RemoteFile",
    "cache_dir",
    "download_file",
    "file_digest",
    "sha256_record_path",
    "verify_file",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "LION_MLLM_CACHE"
_USER_AGENT = "lion-mllm-downloader/1"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be downloaded (network error, HTTP error, incomplete transfer)."""


class ChecksumMismatchError(DownloadError):
    """A downloaded (or cached) file does not have the expected size or checksum."""


def cache_dir(*, create: bool = False) -> Path:
    """Return the package cache directory: ``$LION_MLLM_CACHE`` if set, else ``~/.cache/lion_mllm``."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "lion_mllm"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: str | os.PathLike[str], algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in chunks (works for multi-GB checkpoints)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(
    path: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    expected_size: int | None = None,
    name: str | os.PathLike[str] | None = None,
) -> None:
    """Raise :class:`ChecksumMismatchError` unless ``path`` has the given size and checksums.

    ``name`` is the file name used in the message (e.g. the final destination while ``path`` is still
    the ``.part`` file). Checks that are ``None`` are skipped.
    """
    path = Path(path)
    shown = Path(name) if name is not None else path
    if expected_size is not None:
        size = path.stat().st_size
        if size != expected_size:
            raise ChecksumMismatchError(f"size mismatch for {shown}: expected {expected_size} bytes, got {size} bytes")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual.lower() != expected.lower():
            raise ChecksumMismatchError(f"{algorithm} mismatch for {shown}: expected {expected.lower()}, got {actual}")


class _Incomplete(Exception):
    """Internal: the connection ended before the announced number of bytes arrived (retryable)."""


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/200" or "bytes */200"
    if not value:
        return None
    m = re.search(r"/(\d+)\s*$", value)
    return int(m.group(1)) if m else None


def _start_from_content_range(value: str | None) -> int | None:
    if not value:
        return None
    m = re.match(r"\s*bytes\s+(\d+)-", value)
    return int(m.group(1)) if m else None


class _Progress:
    """Minimal progress line on stderr (no tqdm dependency)."""

    def __init__(self, enabled: bool, label: str, total: int | None, done: int) -> None:
        self.enabled, self.label, self.total, self.done = enabled, label, total, done
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        self._print()

    def _print(self) -> None:
        mib = self.done / 2**20
        if self.total:
            pct = 100.0 * self.done / self.total
            sys.stderr.write(f"\r{self.label}: {mib:.1f}/{self.total / 2**20:.1f} MiB ({pct:.0f}%)")
        else:
            sys.stderr.write(f"\r{self.label}: {mib:.1f} MiB")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._print()
            sys.stderr.write("\n")
            sys.stderr.flush()


def _transfer(url: str, part: Path, *, expected_size: int | None, timeout: float, progress: bool, label: str) -> None:
    """Bring ``part`` to the full content of ``url``, resuming from its current length if possible."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None:
        if offset == expected_size:
            return  # a previous attempt already received everything; verification decides
        if offset > expected_size:
            part.unlink()
            offset = 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range not satisfiable: either the partial file is already complete, or it is longer
            # than the resource (stale data from another version); decide from Content-Range.
            total = _total_from_content_range(err.headers.get("Content-Range"))
            err.close()
            if total is not None and total == offset:
                return
            part.unlink()
            raise _Incomplete(f"stale partial file discarded ({offset} bytes, server says {total})") from None
        raise
    with response:
        status = getattr(response, "status", None) or 200
        if offset and status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                # The server answered a different range than asked for: do not splice, start over.
                part.unlink()
                raise _Incomplete(f"server answered range start {start}, asked for {offset}")
            mode = "ab"
        else:
            # 200: the server ignored the Range header and sends the whole file.
            offset, mode = 0, "wb"
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header is not None and length_header.isdigit() else None
        total = offset + length if length is not None else expected_size
        bar = _Progress(progress, label, total, offset)
        received = 0
        try:
            with open(part, mode) as f:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
        if length is not None and received < length:
            raise _Incomplete(f"connection closed after {received} of {length} bytes")


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    expected_size: int | None = None,
    progress: bool = False,
    timeout: float = 60.0,
    retries: int = 3,
    record_sha256: bool = False,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, verified, atomic) and return ``dest``.

    ``record_sha256`` is for files whose publisher gives no checksum: the sha256 of the first complete
    download is written beside it (``dest.sha256``) and every later call checks the file against it, so a
    cached file that changed (truncated, overwritten, corrupted) is caught and downloaded again.

    If ``dest`` already exists and passes the given checks it is returned without any request
    (with no checks given, an existing file is trusted). A ``dest.part`` left by an interrupted
    download is resumed with an HTTP Range request; transient failures are retried ``retries``
    times, each retry resuming where the last one stopped. On a size/checksum mismatch the data is
    deleted and :class:`ChecksumMismatchError` is raised; other failures raise :class:`DownloadError`
    and keep the ``.part`` file so that the next call resumes.
    """
    dest = Path(dest).expanduser()
    recorded = sha256_record_path(dest)
    if record_sha256 and sha256 is None and md5 is None and recorded.is_file():
        sha256 = recorded.read_text().split()[0]
    if dest.exists():
        try:
            verify_file(dest, md5=md5, sha256=sha256, expected_size=expected_size)
            logger.debug("reusing verified %s", dest)
            if record_sha256 and not recorded.is_file():
                _record_sha256(dest)
            return dest
        except ChecksumMismatchError as err:
            logger.warning("%s; downloading it again", err)
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    last_error: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, expected_size=expected_size, timeout=timeout, progress=progress, label=dest.name)
            last_error = None
            break
        except urllib.error.HTTPError as err:
            # Client errors (404, 403, ...) will not get better by retrying.
            if 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"could not download {url} to {dest}: HTTP {err.code} {err.reason}") from err
            last_error = err
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            last_error = err
        logger.warning("download of %s interrupted (%s); attempt %d of %d", url, last_error, attempt + 1, retries + 1)
    if last_error is not None:
        kept = f"; {part.stat().st_size} bytes kept in {part} for resuming" if part.exists() else ""
        raise DownloadError(f"could not download {url} to {dest}: {last_error}{kept}") from last_error

    try:
        verify_file(part, md5=md5, sha256=sha256, expected_size=expected_size, name=dest)
    except ChecksumMismatchError as err:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(f"{err} (downloaded from {url}; the bad download was deleted)") from None
    os.replace(part, dest)  # atomic on POSIX and Windows within one directory
    if record_sha256:
        _record_sha256(dest)
    return dest


def sha256_record_path(dest: str | os.PathLike[str]) -> Path:
    """Where :func:`download_file` records the sha256 of a file that came without a published checksum."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".sha256")


def _record_sha256(dest: Path) -> str:
    digest = file_digest(dest, "sha256")
    sha256_record_path(dest).write_text(f"{digest}  {dest.name}\n")  # sha256sum's format
    return digest


@dataclass(frozen=True)
class RemoteFile:
    """A file the package knows how to fetch: URL, cache file name and its expected checksums."""

    url: str
    filename: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None

    def fetch(self, directory: str | os.PathLike[str] | None = None, *, progress: bool = False) -> Path:
        """Download (or reuse) this file into ``directory`` (default: :func:`cache_dir`) and return its path."""
        base = Path(directory).expanduser() if directory is not None else cache_dir()
        return download_file(
            self.url,
            base / self.filename,
            md5=self.md5,
            sha256=self.sha256,
            expected_size=self.size,
            progress=progress,
        )
