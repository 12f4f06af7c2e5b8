"""Downloads of URL locations: verified, cached, atomic, retried and resumed.

Every test serves a real file (a SpaceNet-6 WorldView-2 PAN tile) from a real HTTP server on
127.0.0.1 (``tests/httpserver.py``) with faults injected on the wire: no mocked HTTP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydantic
import pytest

from bnnpan.config import Location, RemoteLocation
from bnnpan.data.download import FetchContext, ResumableHTTPDownloader, cache_name, resolve
from bnnpan.data.scene import SceneError, sha256_file

try:
    from tests.httpserver import RangeHTTPServer, http_server  # noqa: F401
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from httpserver import RangeHTTPServer, http_server  # noqa: F401

NAME = "pan1.tif"


@pytest.fixture(scope="module")
def real_file(shared_data: Path) -> Path:
    path = shared_data / "worldview2-spacenet6" / NAME
    if not path.is_file():
        pytest.skip(f"real WorldView-2 tile not found: {path}")
    return path


@pytest.fixture(scope="module")
def real_sha(real_file: Path) -> str:
    return sha256_file(real_file)


@pytest.fixture
def served(http_server: RangeHTTPServer, real_file: Path) -> RangeHTTPServer:
    shutil.copyfile(real_file, http_server.root / NAME)
    return http_server


@pytest.fixture
def ctx(tmp_path: Path) -> FetchContext:
    return FetchContext(downloads=tmp_path / "downloads", progress=False, retries=3, backoff=0.01)


def _cache_files(ctx: FetchContext) -> list[str]:
    return sorted(p.name for p in ctx.downloads.iterdir()) if ctx.downloads.exists() else []


def test_download_verified_and_cached(served, real_file, real_sha, ctx):
    loc = RemoteLocation(url=served.url(NAME), sha256=real_sha)
    path, rec = resolve(loc, ctx)
    assert path.parent == ctx.downloads.resolve()
    assert path.read_bytes() == real_file.read_bytes()
    assert rec == {"url": loc.url, "sha256": real_sha, "path": str(path)}
    assert _cache_files(ctx) == [cache_name(loc.url, real_sha)]
    assert len(served.requests_for(NAME, "GET")) == 1
    # A verified file in the cache is not downloaded again.
    path2, rec2 = resolve(loc, ctx)
    assert (path2, rec2) == (path, rec)
    assert len(served.requests) == 1


def test_progress_bar_on(served, real_sha, tmp_path):
    ctx = FetchContext(downloads=tmp_path / "dl", progress=True)
    path, _ = resolve(RemoteLocation(url=served.url(NAME), sha256=real_sha), ctx)
    assert sha256_file(path) == real_sha


def test_sha256_mismatch_leaves_nothing(served, real_sha, ctx):
    wrong = "0" * 64
    url = served.url(NAME)
    with pytest.raises(SceneError) as ei:
        resolve(RemoteLocation(url=url, sha256=wrong), ctx)
    msg = str(ei.value)
    assert msg == f"{url}: sha256 mismatch (expected {wrong}, got {real_sha})"
    assert "\n" not in msg
    assert _cache_files(ctx) == []  # neither the final file, nor a .part, nor a temp file


def test_outdated_cached_file_is_replaced(served, real_file, real_sha, ctx):
    loc = RemoteLocation(url=served.url(NAME), sha256=real_sha)
    ctx.downloads.mkdir(parents=True)
    stale = ctx.downloads / cache_name(loc.url, real_sha)
    stale.write_bytes(b"corrupted")
    path, _ = resolve(loc, ctx)
    assert path.read_bytes() == real_file.read_bytes()
    assert len(served.requests_for(NAME, "GET")) == 1


def test_cut_off_download_resumes_in_a_later_run(served, real_file, real_sha, ctx):
    size = real_file.stat().st_size
    cut = size // 3
    loc = RemoteLocation(url=served.url(NAME), sha256=real_sha)
    served.truncate_next(NAME, cut)
    no_retry = FetchContext(downloads=ctx.downloads, progress=False, retries=0)
    with pytest.raises(SceneError, match="download failed"):
        resolve(loc, no_retry)
    fname = cache_name(loc.url, real_sha)
    # Only the partial file is left: the final name appears only complete and verified.
    assert _cache_files(ctx) == [f"{fname}.part"]
    # The bytes received before the cut, less the chunk being read when it broke.
    kept = (ctx.downloads / f"{fname}.part").stat().st_size
    assert cut - ResumableHTTPDownloader().chunk_size <= kept <= cut and kept > 0

    path, rec = resolve(loc, ctx)
    assert sha256_file(path) == real_sha and rec["sha256"] == real_sha
    gets = served.requests_for(NAME, "GET")
    assert [(r.range, r.status) for r in gets] == [(None, 200), (f"bytes={kept}-", 206)]
    assert served.served(NAME) == cut + (size - kept)  # the kept bytes are not sent again
    assert _cache_files(ctx) == [fname]


def test_cut_off_download_resumed_by_retry(served, real_file, real_sha, ctx):
    cut = 100_000
    served.truncate_next(NAME, cut)
    path, _ = resolve(RemoteLocation(url=served.url(NAME), sha256=real_sha), ctx)
    assert sha256_file(path) == real_sha
    gets = served.requests_for(NAME, "GET")
    assert len(gets) == 2 and gets[0].range is None and gets[1].status == 206
    kept = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < kept <= cut
    assert served.served(NAME) == cut + real_file.stat().st_size - kept


def test_mismatch_after_resume_deletes_the_part(served, real_file, real_sha, ctx):
    url = served.url(NAME)
    fname = cache_name(url, real_sha)
    ctx.downloads.mkdir(parents=True)
    (ctx.downloads / f"{fname}.part").write_bytes(b"\0" * 5000)  # stale bytes from elsewhere
    with pytest.raises(SceneError, match="sha256 mismatch"):
        resolve(RemoteLocation(url=url, sha256=real_sha), ctx)
    assert served.requests_for(NAME, "GET")[0].range == "bytes=5000-"
    assert _cache_files(ctx) == []
    # The next attempt starts clean and succeeds.
    path, _ = resolve(RemoteLocation(url=url, sha256=real_sha), ctx)
    assert sha256_file(path) == real_sha
    assert served.requests_for(NAME, "GET")[-1].range is None


def test_complete_part_is_not_downloaded_again(served, real_file, real_sha, ctx):
    url = served.url(NAME)
    ctx.downloads.mkdir(parents=True)
    shutil.copyfile(real_file, ctx.downloads / f"{cache_name(url, real_sha)}.part")
    path, _ = resolve(RemoteLocation(url=url, sha256=real_sha), ctx)
    assert sha256_file(path) == real_sha
    assert [r.status for r in served.requests_for(NAME, "GET")] == [416]
    assert served.served(NAME) == 0


def test_server_error_is_retried(served, real_sha, ctx):
    served.fail_next(2, status=503)
    path, _ = resolve(RemoteLocation(url=served.url(NAME), sha256=real_sha), ctx)
    assert sha256_file(path) == real_sha
    assert [r.status for r in served.requests_for(NAME, "GET")] == [503, 503, 200]


def test_persistent_server_error_fails_in_one_line(served, real_sha, ctx):
    served.fail_next(10, status=502)
    url = served.url(NAME)
    with pytest.raises(SceneError) as ei:
        resolve(RemoteLocation(url=url, sha256=real_sha), ctx)
    assert str(ei.value).startswith(f"{url}: file download failed: giving up after 4 attempt(s)")
    assert "\n" not in str(ei.value)
    assert len(served.requests) == 4
    assert _cache_files(ctx) == []


def test_missing_file_is_not_retried(served, real_sha, ctx):
    url = served.url("nope.tif")
    with pytest.raises(SceneError, match=r"nope\.tif: file download failed: 404"):
        resolve(RemoteLocation(url=url, sha256=real_sha), ctx)
    assert len(served.requests) == 1


def test_file_url(real_file, real_sha, ctx):
    loc = RemoteLocation(url=real_file.as_uri(), sha256=real_sha)
    path, rec = resolve(loc, ctx)
    assert path.read_bytes() == real_file.read_bytes()
    assert path.parent == ctx.downloads.resolve()
    assert rec["url"] == loc.url and rec["sha256"] == real_sha
    with pytest.raises(SceneError, match="sha256 mismatch"):
        resolve(RemoteLocation(url=real_file.as_uri(), sha256="1" * 64), ctx)
    with pytest.raises(SceneError, match="file not found"):
        absent = (real_file.parent / "absent.tif").as_uri()
        resolve(RemoteLocation(url=absent, sha256=real_sha), ctx)


def test_other_schemes_rejected(real_sha, ctx):
    url = "ftp://127.0.0.1/pan1.tif"
    with pytest.raises(pydantic.ValidationError, match="not allowed"):
        RemoteLocation(url=url, sha256=real_sha)
    # resolve() checks again (a Location built without validation).
    loc = Location.model_construct(path=None, url=url, sha256=real_sha)
    with pytest.raises(SceneError, match=r"ftp://127\.0\.0\.1/pan1\.tif: scheme 'ftp' not allowed"):
        resolve(loc, ctx)
    assert _cache_files(ctx) == []


def test_url_without_sha256_rejected(served, ctx):
    with pytest.raises(SceneError, match="needs `sha256`"):
        resolve(Location(url=served.url(NAME)), ctx)
    assert served.requests == []


def test_downloader_protocol(served, real_file, tmp_path):
    """The downloader works standalone (pooch protocol), including ``check_only``."""
    dl = ResumableHTTPDownloader(retries=1, backoff=0.01)
    assert dl(served.url(NAME), tmp_path / "x", None, check_only=True) is True
    assert dl(served.url("nope.tif"), tmp_path / "x", None, check_only=True) is False
    out = tmp_path / "out.tif"
    assert dl(served.url(NAME), str(out), None) is None
    assert out.read_bytes() == real_file.read_bytes()
    assert dl.last_sha256 == sha256_file(real_file)
    assert not Path(f"{out}.part").exists()
