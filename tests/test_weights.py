"""`ganforge weights get inception`: download into ganforge's cache with a progress bar, resume, sha256 check,
offline advice; and evaluation then finds the file by itself. All traffic goes to a server on 127.0.0.1
started here."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from launch.cli import main
from orchestrator.eval.evaluator import EvalConfig, EvalError, check_feature_extractor
from orchestrator.eval.weights import INCEPTION_FILE, INCEPTION_SHA256, INCEPTION_URL, cached_inception

BODY = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` when ``server.ranges``; stops after ``server.cut``
    bytes of the body (the connection drops) when that is set; records each request's path and Range."""

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and srv.ranges:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        data = body[start:] if srv.cut is None else body[start : start + srv.cut]
        self.wfile.write(data)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.ranges, srv.cut = {"/w.pth": BODY}, [], True, None
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/w.pth"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GANFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights" / INCEPTION_FILE


def get(url: str, sha256: str = SHA) -> list[str]:
    return ["weights", "get", "inception", "--url", url, "--sha256", sha256]


def test_the_official_file_and_digest():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3 and INCEPTION_FILE == "weights-inception-2015-12-05-6726825d.pth"
    # torch hub's convention: the name ends in the first 8 hex digits of the file's sha256
    assert re.fullmatch(r"[0-9a-f]{64}", INCEPTION_SHA256) and INCEPTION_SHA256[:8] == "6726825d"


def test_download_verifies_and_becomes_the_default_weights(server, cache, capsys):
    assert main(get(server.url)) == 0
    out, err = capsys.readouterr()
    assert cache.read_bytes() == BODY and not cache.with_name(cache.name + ".part").exists()
    assert f"wrote {cache} (1,048,576 bytes fetched; sha256 {SHA} verified)" in out
    assert "100%" in err and "1.00M/1.00M" in err  # tqdm's bar, in binary units
    assert server.requests == [("/w.pth", None)]

    assert main(get(server.url)) == 0  # nothing fetched twice
    assert f"{cache} is already there" in capsys.readouterr().out and len(server.requests) == 1

    # evaluation now finds it without any setting (this small file is no Inception, so it is refused by name)
    with pytest.raises(EvalError, match=rf"ganforge weights cache: {re.escape(str(cache))} is not torch-fidelity's"):
        check_feature_extractor(EvalConfig(cache_dir=str(cache.parent / "eval")))
    assert cached_inception() == cache


def test_a_download_cut_short_resumes_where_it_stopped(server, cache, capsys):
    part = cache.with_name(cache.name + ".part")
    server.cut = 300_000
    assert main(get(server.url)) == 2
    err = capsys.readouterr().err
    assert "ended after 300,000 of 1,048,576 bytes" in err and f"{part} is kept: run the same command again" in err
    assert part.stat().st_size == 300_000 and not cache.exists()

    server.cut = None
    assert main(get(server.url)) == 0
    assert "748,576 bytes fetched, resumed at byte 300,000" in capsys.readouterr().out
    assert server.requests[-1] == ("/w.pth", "bytes=300000-")
    assert cache.read_bytes() == BODY and not part.exists()


def test_a_server_without_ranges_restarts_from_the_first_byte(server, cache, capsys):
    part = cache.with_name(cache.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # not even the right bytes: appending would corrupt the file
    server.ranges = False
    assert main(get(server.url)) == 0
    assert server.requests == [("/w.pth", "bytes=1000-")] and cache.read_bytes() == BODY
    assert "1,048,576 bytes fetched;" in capsys.readouterr().out


def test_a_whole_partial_file_is_checked_and_kept(server, cache, capsys):
    part = cache.with_name(cache.name + ".part")  # e.g. the command was stopped while it hashed the file
    part.parent.mkdir(parents=True)
    part.write_bytes(BODY)
    assert main(get(server.url)) == 0  # the server answers 416: there is nothing after the last byte
    assert server.requests == [("/w.pth", "bytes=1048576-")] and cache.read_bytes() == BODY and not part.exists()
    assert "0 bytes fetched, resumed at byte 1,048,576" in capsys.readouterr().out


def test_a_corrupted_download_is_refused_and_not_kept(server, cache, capsys):
    wrong = hashlib.sha256(b"the file we expected").hexdigest()
    assert main(get(server.url, wrong)) == 2
    err = capsys.readouterr().err
    assert f"sha256 is {SHA}, not {wrong}; it was deleted" in err
    assert not cache.exists() and not cache.with_name(cache.name + ".part").exists()
    assert list(cache.parent.iterdir()) == []


def test_offline_says_where_to_get_the_file_and_where_it_goes(cache, capsys):
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/{INCEPTION_FILE}"
    assert main(get(url)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ganforge weights: error: cannot download {url}: ")
    assert f"The file goes to {cache}" in err and "run `ganforge weights get inception`" in err
    assert not cache.exists()


def test_help_names_the_cache_and_hides_the_test_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["weights", "get", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "{inception}" in text and "--no-progress" in text
    assert "$GANFORGE_CACHE/weights (default ~/.cache/ganforge/weights)" in text and "sha256" in text
    assert "--url" not in text and "--sha256" not in text
