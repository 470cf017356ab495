"""The media gate on its own: SSRF (a local redirecting server whose target's hit count stays 0), private and
loopback addresses, file:// with ../ and symlinks (nothing outside the allowed folder is opened), data: URLs
(size judged before decoding), format allowlist, pixel ceiling before decoding, images per request.

python -m pytest tests/test_serve_media.py -q
"""

from __future__ import annotations

import builtins
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import picture
from PIL import Image
from serve_util import data_url, raw_data_url

from nvlm.serve import media
from nvlm.serve.media import MediaError, MediaGate, MediaPolicy


def _png(w=40, h=30) -> bytes:
    buf = io.BytesIO()
    picture(w, h).save(buf, "PNG")
    return buf.getvalue()


class _Site:
    """A loopback HTTP server: `routes` maps a path to (status, headers, body); counts hits per path."""

    def __init__(self, routes):
        self.routes, self.hits = routes, {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                site.hits[self.path] = site.hits.get(self.path, 0) + 1
                status, headers, body = site.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sites():
    target = _Site({"/secret.png": (200, {"Content-Type": "image/png"}, _png())})
    front = _Site(
        {
            "/img.png": (200, {"Content-Type": "image/png"}, _png()),
            "/hop": (302, {"Location": f"http://localhost:{target.port}/secret.png"}, b""),
            "/meta": (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""),
        }
    )
    yield front, target
    front.close()
    target.close()


def test_remote_fetch_is_off_by_default_and_redirects_are_rechecked(sites):
    front, target = sites
    with pytest.raises(MediaError, match="remote image URLs are off"):
        MediaGate().load(f"http://127.0.0.1:{front.port}/img.png")
    # loopback stands in for a public host only with the test opt-in
    gate = MediaGate(MediaPolicy(allowed_domains=("127.0.0.1",), allow_private_addresses=True))
    assert gate.load(f"http://127.0.0.1:{front.port}/img.png").size == (40, 30)
    with pytest.raises(MediaError, match="'localhost' is not in --allowed-media-domains"):
        gate.load(f"http://127.0.0.1:{front.port}/hop")  # 302 to a host that is not allowed
    with pytest.raises(MediaError, match="not in --allowed-media-domains"):
        gate.load(f"http://127.0.0.1:{front.port}/meta")  # 302 to the cloud metadata address
    assert target.hits == {}  # the redirect target was never contacted
    both = MediaGate(MediaPolicy(allowed_domains=("127.0.0.1", "localhost"), allow_private_addresses=True))
    assert both.load(f"http://127.0.0.1:{front.port}/hop").size == (
        40,
        30,
    )  # control: allowed hop is followed
    assert target.hits == {"/secret.png": 1}


def test_private_and_loopback_addresses_are_refused_before_connecting(sites, monkeypatch):
    front, _ = sites
    strict = MediaGate(MediaPolicy(allowed_domains=("127.0.0.1", "10.0.0.7", "169.254.169.254", "evil.test")))
    for url in (
        f"http://127.0.0.1:{front.port}/img.png",
        "http://10.0.0.7/x.png",
        "http://169.254.169.254/latest/meta-data",
    ):
        with pytest.raises(MediaError, match="non-public address"):
            strict.load(url)
    # a public-looking name that resolves to loopback (DNS rebinding) is refused the same way
    monkeypatch.setattr(media.socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "", ("127.0.0.1", 80))])
    with pytest.raises(MediaError, match="non-public address"):
        strict.load("http://evil.test/x.png")
    assert front.hits == {}


def test_local_files_only_under_the_allowed_folder(tmp_path, monkeypatch):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.png").write_bytes(_png())
    (outside / "secret.png").write_bytes(_png())
    os.symlink(outside / "secret.png", allowed / "link.png")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(MediaError, match="refused; start the server with --allowed-local-media-path"):
        MediaGate().load(f"file://{allowed}/ok.png")
    gate = MediaGate(MediaPolicy(allowed_local_path=str(allowed)))
    for url in (
        "file:///etc/passwd",
        f"file://{allowed}/../outside/secret.png",
        f"file://{allowed}/link.png",
        f"file://{allowed}/%2e%2e/outside/secret.png",
    ):
        with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
            gate.load(url)
    for url in (str(allowed / "ok.png"), "/etc/passwd", "../x.png", "ftp://x/y.png", "gopher://x"):
        with pytest.raises(MediaError, match="unsupported image URL scheme"):
            gate.load(url)
    with pytest.raises(MediaError, match="host"):
        gate.load(f"file://otherhost{allowed}/ok.png")
    assert opened == []  # nothing at all was opened by the refused requests
    assert gate.load(f"file://{allowed}/ok.png").size == (40, 30)
    assert opened == [str(allowed / "ok.png")]


def test_data_urls_formats_and_sizes(monkeypatch):
    gate = MediaGate(MediaPolicy(max_bytes=50_000, max_pixels=1_000_000))
    assert gate.load(data_url(picture(30, 20))).size == (30, 20)
    for fmt in ("JPEG", "WEBP", "GIF", "BMP"):
        assert gate.load(data_url(picture(30, 20), fmt)).size == (30, 20)
    cases = {
        "not valid base64": "data:image/png;base64,iVBORw0KGgo=x=",
        "not an allowed image type": raw_data_url(_png(), "text/html"),
        "must be base64": "data:image/png," + "A" * 10,
        "malformed data: URL": "data:image/png;base64",
        "format TIFF not allowed": data_url(picture(20, 20), "TIFF", "image/png"),
        "not a readable image": raw_data_url(b"<html><body>hi</body></html>"),
        "empty input": raw_data_url(b""),
        "truncated": raw_data_url(_png(200, 200)[:400]),
    }
    for why, url in cases.items():
        with pytest.raises(MediaError, match=why) as e:
            gate.load(url)
        assert e.value.status == 400
    decoded = []
    monkeypatch.setattr(media.base64, "b64decode", lambda *a, **k: decoded.append(1))
    with pytest.raises(MediaError, match="over 50,000 bytes") as e:
        gate.load("data:image/png;base64," + "A" * 80_000)
    assert e.value.status == 413 and decoded == []  # judged from the length alone


def test_pixel_ceiling_before_decoding(monkeypatch):
    bomb = io.BytesIO()
    Image.new("1", (4000, 4000)).save(bomb, "PNG")  # ~2 KB file, 16 M pixels
    assert len(bomb.getvalue()) < 10_000
    decoded = []
    monkeypatch.setattr(media, "load_image", lambda *a, **k: decoded.append(1))
    gate = MediaGate(MediaPolicy(max_pixels=1_000_000, max_images=2))
    with pytest.raises(MediaError, match="over this server's 1,000,000") as e:
        gate.load(raw_data_url(bomb.getvalue()))
    assert e.value.status == 413 and decoded == []
    fetched = gate.fetch(raw_data_url(bomb.getvalue()))  # fetching checks bytes only; decoding judges the pixels
    assert fetched == bomb.getvalue() and decoded == []
    with pytest.raises(MediaError, match="over this server's 1,000,000"):
        gate.decode(fetched)
    assert decoded == []  # (images per request are counted by the route before any fetch: test_serve_abuse)
