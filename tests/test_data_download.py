"""Downloads (resume, restart, verification) against a local HTTP server, and safe archive extraction."""

import hashlib
import http.server
import io
import os
import stat
import tarfile
import threading
import zipfile

import pytest

from datamodules.download import DownloadError, UnsafeArchiveError, download_file, extract_archive, git_blob_sha1

PAYLOAD = os.urandom(300_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.requests.append(self.headers.get("Range"))
        if self.path != "/file.bin":
            self.send_error(404)
            return
        start = 0
        if server.honour_range and self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drops:  # announce the full length, send part of it, hang up
            server.drops -= 1
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.honour_range, httpd.drops = [], True, 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def url(server, path="/file.bin"):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_verifies_and_skips_a_good_copy(server, tmp_path):
    dest = tmp_path / "f.bin"
    download_file(url(server), dest, sha256=SHA, size=len(PAYLOAD), md5=hashlib.md5(PAYLOAD).hexdigest(),
                  progress=False, timeout=10)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    download_file(url(server), dest, sha256=SHA, progress=False, timeout=10)
    assert len(server.requests) == 1


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.drops = 1
    dest = tmp_path / "f.bin"
    download_file(url(server), dest, sha256=SHA, progress=False, timeout=10)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0] is None and server.requests[1] == f"bytes={len(PAYLOAD) // 3}-"


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes from an earlier attempt")
    download_file(url(server), dest, sha256=SHA, progress=False, timeout=10)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0].startswith("bytes=")


def test_checksum_mismatch_leaves_nothing_behind(server, tmp_path):
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="sha256"):
        download_file(url(server), dest, sha256="0" * 64, progress=False, timeout=10)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="size"):
        download_file(url(server), dest, size=5, progress=False, timeout=10)


def test_http_error_names_url_and_manual_route(server, tmp_path):
    with pytest.raises(DownloadError, match=r"missing\.bin: HTTP 404.*by hand and save it as"):
        download_file(url(server, "/missing.bin"), tmp_path / "m.bin", progress=False, timeout=10, retries=0)


def test_corrupt_existing_copy_is_replaced_and_file_urls_work(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "f.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"corrupt")
    download_file(source.as_uri(), dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_git_blob_sha1_matches_git(tmp_path):
    path = tmp_path / "hello"
    path.write_bytes(b"hello\n")
    assert git_blob_sha1(path) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `echo hello | git hash-object --stdin`


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def test_zip_extraction(tmp_path):
    archive = _zip(tmp_path / "ok.zip", [("ml-1m/ratings.dat", b"1::2::3::4\n", None), ("ml-1m/README", b"r", None)])
    written = extract_archive(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["ml-1m/README", "ml-1m/ratings.dat"]
    assert (tmp_path / "out" / "ml-1m" / "ratings.dat").read_bytes() == b"1::2::3::4\n"
    only = extract_archive(archive, tmp_path / "only", ["ml-1m/README"])
    assert [p.name for p in only] == ["README"]
    with pytest.raises(DownloadError, match="does not contain"):
        extract_archive(archive, tmp_path / "x", ["ml-1m/movies.dat"])


@pytest.mark.parametrize("name,mode", [("../escape.txt", None), ("/abs/escape.txt", None),
                                       ("a/../../escape.txt", None), ("link", stat.S_IFLNK | 0o777)])
def test_zip_members_escaping_the_folder_are_refused(tmp_path, name, mode):
    archive = _zip(tmp_path / "evil.zip", [("fine.txt", b"ok", None), (name, b"/etc/passwd", mode)])
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "fine.txt").exists() and not (tmp_path / "escape.txt").exists()


def _tar(path, member: tarfile.TarInfo, data=b""):
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tf.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("member", [_member("../escape.txt"), _member("/tmp/escape.txt"),
                                    _member("sym", tarfile.SYMTYPE, "/etc/passwd"),
                                    _member("hard", tarfile.LNKTYPE, "../../etc/passwd"),
                                    _member("dev", tarfile.CHRTYPE)], ids=["dotdot", "abs", "sym", "hard", "dev"])
def test_tar_members_escaping_the_folder_are_refused(tmp_path, member):
    archive = _tar(tmp_path / "evil.tar.gz", member, b"x" if member.isfile() else b"")
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "fine.txt").exists()


def test_tar_extraction_and_non_archives(tmp_path):
    archive = _tar(tmp_path / "ok.tar.gz", _member("dir/data.txt"), b"hello")
    extract_archive(archive, tmp_path / "out")
    assert (tmp_path / "out" / "dir" / "data.txt").read_bytes() == b"hello"
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"<html>error page</html>")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        extract_archive(junk, tmp_path / "out2")
