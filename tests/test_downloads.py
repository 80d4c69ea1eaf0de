"""Tests for lion_mllm.checkpoints.downloads against a local Range-capable HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from lion_mllm.checkpoints.downloads import (
    ChecksumMismatchError,
    DownloadError,
    RemoteFile,
    cache_dir,
    download_file,
    sha256_record_path,
    verify_file,
)

PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(300_000))
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """A threaded HTTP server on 127.0.0.1 that serves PAYLOAD and records every request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.honour_range = True
        self.cut_first_response_at: int | None = None  # simulate a dropped connection once
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append({"path": self.path, "range": rng})
                if self.path == "/missing":
                    self.send_error(404)
                    return
                data, start = PAYLOAD, 0
                if rng and server.honour_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.cut_first_response_at is not None:
                    cut, server.cut_first_response_at = server.cut_first_response_at, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/payload.bin"


@pytest.fixture
def server():
    srv = _Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def test_full_download_verifies_and_leaves_no_part(server, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "payload.bin"
    out = download_file(server.url, dest, md5=PAYLOAD_MD5, sha256=PAYLOAD_SHA256, expected_size=len(PAYLOAD))
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "payload.bin.part").exists()
    assert [r["range"] for r in server.requests] == [None]


def test_resume_from_partial_file(server, tmp_path: Path) -> None:
    dest = tmp_path / "payload.bin"
    cut = 123_457
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD[:cut])
    download_file(server.url, dest, md5=PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD
    # only the missing tail was requested
    assert [r["range"] for r in server.requests] == [f"bytes={cut}-"]


def test_dropped_connection_is_retried_with_resume(server, tmp_path: Path) -> None:
    dest = tmp_path / "payload.bin"
    server.cut_first_response_at = 50_000
    download_file(server.url, dest, md5=PAYLOAD_MD5, expected_size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [None, "bytes=50000-"]


def test_dropped_connection_without_retries_keeps_part_for_next_call(server, tmp_path: Path) -> None:
    dest = tmp_path / "payload.bin"
    server.cut_first_response_at = 70_000
    with pytest.raises(DownloadError, match="payload.bin"):
        download_file(server.url, dest, md5=PAYLOAD_MD5, retries=0)
    assert not dest.exists()
    assert (tmp_path / "payload.bin.part").stat().st_size == 70_000
    download_file(server.url, dest, md5=PAYLOAD_MD5, retries=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1]["range"] == "bytes=70000-"


def test_server_ignoring_range_restarts_cleanly(server, tmp_path: Path) -> None:
    server.honour_range = False
    dest = tmp_path / "payload.bin"
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD[:1000])
    download_file(server.url, dest, md5=PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD  # not 1000 bytes duplicated in front


def test_complete_part_file_with_known_size_needs_no_request(server, tmp_path: Path) -> None:
    dest = tmp_path / "payload.bin"
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD)
    download_file(server.url, dest, md5=PAYLOAD_MD5, expected_size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == []


def test_complete_part_file_unknown_size_gets_416_and_finishes(server, tmp_path: Path) -> None:
    dest = tmp_path / "payload.bin"
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD)
    download_file(server.url, dest, md5=PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]


@pytest.mark.parametrize("kind", ["md5", "sha256", "size"])
def test_checksum_mismatch_is_refused_and_removed(server, tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "payload.bin"
    wrong = {"md5": {"md5": "0" * 32}, "sha256": {"sha256": "f" * 64}, "size": {"expected_size": 12}}[kind]
    with pytest.raises(ChecksumMismatchError) as excinfo:
        download_file(server.url, dest, **wrong)
    msg = str(excinfo.value)
    assert str(dest) in msg
    if kind == "md5":
        assert "0" * 32 in msg and PAYLOAD_MD5 in msg
    elif kind == "sha256":
        assert "f" * 64 in msg and PAYLOAD_SHA256 in msg
    else:
        assert "12" in msg
    assert not dest.exists()
    assert not (tmp_path / "payload.bin.part").exists()


def test_cache_is_reused_without_a_second_request(server, tmp_path: Path) -> None:
    dest = tmp_path / "payload.bin"
    download_file(server.url, dest, md5=PAYLOAD_MD5)
    assert len(server.requests) == 1
    mtime = dest.stat().st_mtime_ns
    assert download_file(server.url, dest, md5=PAYLOAD_MD5) == dest
    assert len(server.requests) == 1  # the server saw no second request
    assert dest.stat().st_mtime_ns == mtime


def test_existing_file_that_fails_verification_is_replaced(server, tmp_path: Path) -> None:
    dest = tmp_path / "payload.bin"
    dest.write_bytes(b"stale")
    download_file(server.url, dest, md5=PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_http_404_is_a_clear_error(server, tmp_path: Path) -> None:
    url = server.url.replace("/payload.bin", "/missing")
    with pytest.raises(DownloadError, match="404"):
        download_file(url, tmp_path / "x.bin", retries=2)
    assert len(server.requests) == 1  # client errors are not retried


def test_remote_file_fetch_uses_cache_dir(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LION_MLLM_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    remote = RemoteFile(url=server.url, filename="nested/p.bin", md5=PAYLOAD_MD5, size=len(PAYLOAD))
    path = remote.fetch()
    assert path == tmp_path / "cache" / "nested" / "p.bin"
    assert path.read_bytes() == PAYLOAD


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LION_MLLM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "lion_mllm"
    assert not cache_dir().exists()
    assert cache_dir(create=True).is_dir()


def test_verify_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.pth"
    f.write_bytes(b"abc")
    verify_file(f, md5=hashlib.md5(b"abc").hexdigest(), expected_size=3)
    with pytest.raises(ChecksumMismatchError, match="weights.pth"):
        verify_file(f, md5="1" * 32)


def test_file_without_published_checksum_is_checked_against_its_first_download(server, tmp_path: Path) -> None:
    dest = tmp_path / "eva.pth"
    download_file(server.url, dest, record_sha256=True)
    assert sha256_record_path(dest).read_text().split() == [PAYLOAD_SHA256, "eva.pth"]
    assert download_file(server.url, dest, record_sha256=True) == dest
    assert len(server.requests) == 1  # verified against the record, nothing fetched
    dest.write_bytes(PAYLOAD[:1000])  # the cached copy changes behind our back
    download_file(server.url, dest, record_sha256=True)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 2
