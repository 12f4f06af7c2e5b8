"""Resolve a :class:`~bnnpan.config.Location` to a local file (downloading and verifying it).

Local paths are used in place; URLs (http, https, file) are downloaded into the
downloads cache with :func:`pooch.retrieve` and their sha256 verified (see :func:`resolve`).

Why pooch plus a downloader of our own: pooch gives the cache, the verification and the
atomic write (it downloads into a temporary file in the cache folder, checks the hash, and
only then renames it to the final name; the temporary file is deleted on any failure).
Its stock :class:`pooch.HTTPDownloader` neither retries nor resumes, and remote scenes are
large files on flaky links, so :class:`ResumableHTTPDownloader` adds both: transient
failures (connection resets, timeouts, 5xx/429) are retried with exponential backoff, and
the bytes received so far live in a persistent ``<cache>/<fname>.part`` that the next
attempt (in this run or a later one) continues with an HTTP ``Range`` request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pooch
import requests

from bnnpan.config import Location
from bnnpan.data.scene import SceneError, sha256_file

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https", "file")
# HTTP statuses worth another try: the server or a proxy is (probably) only briefly unwell.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# (connect, read) timeouts of one HTTP request, in seconds.
DEFAULT_TIMEOUT = (10.0, 60.0)


@dataclass(frozen=True)
class FetchContext:
    """Where a fetch may cache downloads, whether to draw progress bars, and how hard to retry."""

    downloads: Path
    progress: bool = True
    retries: int = 3
    backoff: float = 0.5


class _Transient(Exception):
    """A failure worth retrying (wraps the HTTP status or the network error)."""


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///abs/path`` or ``file://localhost/...``)."""
    p = urlparse(url)
    if p.netloc not in ("", "localhost"):
        raise SceneError(f"{url}: file:// URLs must name a local file (no host)")
    return Path(url2pathname(p.path))


def _check_scheme(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme not in ALLOWED_SCHEMES:
        raise SceneError(f"{url}: scheme {scheme!r} not allowed (use {', '.join(ALLOWED_SCHEMES)})")
    return scheme


def cache_name(url: str, sha256: str) -> str:
    """File name of a download in the cache: ``<first 12 hex of sha256>-<URL basename>``.

    Keyed by content, so two scenes whose files share a basename never collide, and the
    extension (``.tar.gz``, ``.mat``, ``.json``) is kept for the readers downstream.
    """
    base = unquote(urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", base).lstrip(".") or "download"
    return f"{sha256[:12]}-{base}"


class ResumableHTTPDownloader:
    """A pooch downloader (``__call__(url, output_file, pooch, check_only=False)``) that retries
    transient failures and resumes interrupted downloads.

    The data go to ``part`` (default ``<output_file>.part``; :func:`resolve` passes
    ``<cache>/<fname>.part`` because pooch's ``output_file`` is a fresh random temporary
    name on every call). When ``part`` already holds bytes, the request carries
    ``Range: bytes=<size>-``: a ``206`` answer is appended, a ``200`` (server without range
    support) restarts from scratch. On success the complete file is moved to
    ``output_file`` and its sha256 is kept in :attr:`last_sha256` (pooch then verifies it).
    ``file://`` URLs are copied (no HTTP). ``progress`` draws a rich progress bar on stderr.
    """

    def __init__(
        self,
        retries: int = 3,
        backoff: float = 0.5,
        progress: bool = False,
        *,
        part: str | os.PathLike[str] | None = None,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        chunk_size: int = 1 << 16,
    ) -> None:
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.progress = progress
        self.part = Path(part) if part is not None else None
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.last_sha256: str | None = None
        self.attempts = 0

    def __call__(
        self, url: str, output_file: Any, pooch: Any = None, check_only: bool = False
    ) -> Any:
        """Download ``url`` to ``output_file`` (a path); ``check_only``: only say if it exists."""
        scheme = urlparse(url).scheme
        if scheme == "file":
            src = file_url_path(url)
            if check_only:
                return src.is_file()
            if not src.is_file():
                raise SceneError(f"{url}: file not found")
            shutil.copyfile(src, output_file)
            self.last_sha256 = sha256_file(output_file)
            return None
        if scheme not in ("http", "https"):
            _check_scheme(url)
        if check_only:
            r = requests.head(url, timeout=self.timeout, allow_redirects=True)
            return r.status_code == 200
        part = self.part if self.part is not None else Path(f"{output_file}.part")
        part.parent.mkdir(parents=True, exist_ok=True)
        self.last_sha256 = None
        for attempt in range(self.retries + 1):
            self.attempts = attempt + 1
            try:
                self._fetch(url, part)
                break
            except _Transient as e:
                if attempt == self.retries:
                    raise requests.ConnectionError(
                        f"giving up after {attempt + 1} attempt(s): {e}"
                    ) from None
                delay = self.backoff * 2**attempt
                log.info("download of %s failed (%s); retrying in %.1f s", url, e, delay)
                time.sleep(delay)
        self.last_sha256 = sha256_file(part)
        os.replace(part, output_file)
        return None

    def _fetch(self, url: str, part: Path) -> None:
        """One attempt: continue ``part`` from its current size up to the end of the file."""
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be those of the file
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
                if r.status_code == 416 and offset:
                    total = _content_range_total(r.headers.get("Content-Range", ""))
                    if total == offset:
                        return  # the .part is already complete (killed before the rename)
                    part.unlink()
                    raise _Transient(f"HTTP 416 for a stale partial file of {offset} bytes")
                if r.status_code in RETRY_STATUS:
                    raise _Transient(f"HTTP {r.status_code}")
                r.raise_for_status()
                if r.status_code == 206 and offset:
                    start = _content_range_start(r.headers.get("Content-Range", ""))
                    if start != offset:
                        part.unlink()
                        raise _Transient(f"server resumed at byte {start}, asked for {offset}")
                    mode = "ab"
                else:
                    mode, offset = "wb", 0
                length = r.headers.get("Content-Length")
                total = offset + int(length) if length and length.isdigit() else None
                got = 0
                with open(part, mode) as f, _progress_bar(self.progress, total, offset, url) as bar:
                    for chunk in r.iter_content(chunk_size=self.chunk_size):
                        f.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                if total is not None and offset + got < total:
                    raise _Transient(f"connection closed after {offset + got} of {total} bytes")
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None


def _content_range_start(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value)
    return int(m.group(1)) if m else None


def _content_range_total(value: str) -> int | None:
    m = re.search(r"/(\d+)\s*$", value)
    return int(m.group(1)) if m else None


class _Bar:
    """A rich download bar (bytes, speed, ETA) on stderr; a no-op when progress is off."""

    def __init__(self, on: bool, total: int | None, initial: int, url: str) -> None:
        self._progress = None
        if on:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            name = urlparse(url).path.rsplit("/", 1)[-1] or url
            self._progress = Progress(TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                      TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._task = self._progress.add_task(name, total=total, completed=initial)

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


def _progress_bar(on: bool, total: int | None, initial: int, url: str) -> _Bar:
    return _Bar(on, total, initial, url)


def resolve(loc: Location, ctx: FetchContext, what: str = "file") -> tuple[Path, dict[str, Any]]:
    """Return (local path, source record) for a Location.

    The record goes into ``scene.json``: ``{"path": ..., "sha256": ...}`` for a local path,
    ``{"url": ..., "sha256": ..., "path": <cached file>}`` for a URL. A local path with a
    declared sha256 is verified too. A URL needs a sha256; it is downloaded once into
    ``ctx.downloads`` (a verified file already there is reused), retried and resumed by
    :class:`ResumableHTTPDownloader`. Every failure is a one-line :class:`SceneError`; a
    sha256 mismatch leaves nothing of that file in the cache (neither partial nor final).
    """
    if loc.path is not None:
        path = Path(loc.path)
        if not path.is_file():
            raise SceneError(f"{path}: {what} not found")
        digest = sha256_file(path)
        if loc.sha256 is not None and digest != loc.sha256:
            raise SceneError(f"{path}: sha256 mismatch (expected {loc.sha256}, got {digest})")
        return path, {"path": str(path), "sha256": digest}
    url = loc.url
    if url is None:
        raise SceneError(f"{what}: a location needs `path` or `url`")
    _check_scheme(url)
    if loc.sha256 is None:
        raise SceneError(f"{url}: {what} download needs `sha256` (every download is verified)")
    expected = loc.sha256.lower()
    cache = Path(ctx.downloads)
    fname = cache_name(url, expected)
    part = cache / f"{fname}.part"
    downloader = ResumableHTTPDownloader(
        retries=ctx.retries, backoff=ctx.backoff, progress=ctx.progress, part=part
    )
    try:
        local = pooch.retrieve(
            url, known_hash=f"sha256:{expected}", fname=fname, path=cache,
            downloader=downloader, progressbar=ctx.progress,
        )
    except ValueError as e:  # pooch: hash mismatch (SceneError is a ValueError too)
        if isinstance(e, SceneError):
            raise
        got = downloader.last_sha256
        if got is None:
            m = re.search(r"got ([0-9a-fA-F]{64})", str(e))
            got = m.group(1).lower() if m else "?"
        # pooch removed its temporary file; an outdated final file may still be there.
        for stale in (part, cache / fname):
            stale.unlink(missing_ok=True)
        raise SceneError(f"{url}: sha256 mismatch (expected {expected}, got {got})") from None
    except requests.RequestException as e:
        raise SceneError(f"{url}: {what} download failed: {_one_line(e)}") from None
    except OSError as e:
        raise SceneError(f"{url}: {what} download failed: {_one_line(e)}") from None
    return Path(local), {"url": url, "sha256": expected, "path": str(local)}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def sha256_bytes(data: bytes) -> str:
    """sha256 hex digest of a bytes object (used for items read without a declared hash)."""
    return hashlib.sha256(data).hexdigest()
