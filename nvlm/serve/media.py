"""The media gate: the one place an image URL from a request becomes pixels (the server's guard against SSRF).

Every ingress path (the HTTP server, the web chat, the eval client) calls ``MediaGate.fetch`` and then
``MediaGate.decode`` (``load`` does both). Policy:

* ``data:image/…;base64,…`` URLs are always accepted; their size is judged from the length of the base64 text
  before anything is decoded, and the MIME type must be one of the allowed image formats.
* ``http(s)://`` only for hosts in ``allowed_domains`` (exact name or a subdomain). The name is resolved once,
  every address must be public (loopback, private, link-local, CGNAT, multicast, reserved are refused unless
  ``allow_private_addresses``, a test-only opt-in), and the connection goes to that checked address (no second
  lookup an attacker could re-point). Redirects are never followed blindly: each hop is checked as above.
* ``file://`` only when ``allowed_local_path`` is set, and only for regular files whose real path (symlinks
  resolved) lies under it. Plain paths and every other scheme are refused.
* Byte size is capped while reading, the pixel count is read from the header before decoding, and decoding is
  ``nvlm.vision.image_io.load_image`` (format allowlist JPEG/PNG/WebP/GIF/BMP, bomb checks, frame 0).
* At most ``max_images`` per request, counted before any fetch or decode.
* At most ``max_tiles`` regular tiles per image, whatever a request asks for (``None``: the model's own
  ``tiling.max_tiles``); the tiler's own ceiling (40) holds beyond it.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

from PIL import Image

from nvlm.vision.image_io import ALLOWED_FORMATS, ImageLoadError, load_image

_MIMES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/x-ms-bmp"}
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)


class MediaError(ValueError):
    """A refused or unreadable image; `status` is the HTTP status to answer (400, or 413 for too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()
    allowed_local_path: str | None = None
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 8
    max_tiles: int | None = None
    max_redirects: int = 3
    timeout_s: float = 10.0
    allow_private_addresses: bool = False  # tests only: lets a loopback server stand in for a remote host


class MediaGate:
    def __init__(self, policy: MediaPolicy | None = None) -> None:
        self.policy = policy or MediaPolicy()

    def load(self, url: str) -> Image.Image:
        """One image URL → an RGB PIL image, or MediaError."""
        return self.decode(self.fetch(url))

    def fetch(self, url: str) -> bytes:
        """One image URL → its bytes, every check but the pixel count done (``decode`` does that), or MediaError."""
        if not isinstance(url, str) or not url:
            raise MediaError("image_url.url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._data_url(url)
        elif scheme in ("http", "https"):
            data = self._fetch(url)
        elif scheme == "file":
            data = self._local(url)
        else:
            raise MediaError(
                f"unsupported image URL scheme {scheme or '(none)'!r}: use a data: URL"
                + (", or http(s) for --allowed-media-domains" if self.policy.allowed_domains else "")
            )
        if len(data) > self.policy.max_bytes:
            raise MediaError(f"image is over {self.policy.max_bytes:,} bytes", 413)
        return data

    # ---- sources ------------------------------------------------------------------------------------
    def _data_url(self, url: str) -> bytes:
        m = _DATA_URL.match(url[:256])  # the header is short; do not regex-scan megabytes of payload
        if not m:
            raise MediaError("malformed data: URL; expected data:image/png;base64,<payload>")
        mime, params = m.group(1).strip().lower(), [p.strip().lower() for p in m.group(2).split(";") if p]
        if mime not in _MIMES:
            raise MediaError(
                f"data: URL type {mime or '(none)'!r} is not an allowed image type ({', '.join(sorted(_MIMES))})"
            )
        if "base64" not in params:
            raise MediaError("data: URL must be base64-encoded (data:image/png;base64,...)")
        payload = url[url.index(",") + 1 :]
        if len(payload) // 4 * 3 > self.policy.max_bytes:  # judged from the length alone, before decoding
            raise MediaError(f"image is over {self.policy.max_bytes:,} bytes", 413)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"data: URL payload is not valid base64 ({e})") from None

    def _check_host(self, url: str) -> tuple[urllib.parse.ParseResult, str]:
        """Allowlisted scheme and host, and one public address of it (checked, then used to connect)."""
        u = urllib.parse.urlparse(url)
        host = (u.hostname or "").lower().rstrip(".")
        if u.scheme not in ("http", "https") or not host:
            raise MediaError(f"refused image URL {url[:200]!r}: only http(s) URLs with a host")
        if not self.policy.allowed_domains:
            raise MediaError(
                "remote image URLs are off: send a data: URL, or start the server with --allowed-media-domains"
            )
        if not any(host == d or host.endswith("." + d) for d in self.policy.allowed_domains):
            raise MediaError(f"image host {host!r} is not in --allowed-media-domains")
        try:
            port = u.port or (443 if u.scheme == "https" else 80)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as e:
            raise MediaError(f"cannot resolve image host {host!r} ({e})") from None
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        for a in addrs:
            if a.version == 6 and a.ipv4_mapped:  # ::ffff:127.0.0.1 is loopback too
                a = a.ipv4_mapped
            if not a.is_global and not self.policy.allow_private_addresses:
                raise MediaError(f"image host {host!r} resolves to a non-public address ({a}); refused")
        return u, str(addrs[0])

    def _fetch(self, url: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            u, ip = self._check_host(url)
            conn = _pinned(u, ip, self.policy.timeout_s)
            try:
                path = (u.path or "/") + (f"?{u.query}" if u.query else "")
                conn.request("GET", path, headers={"Host": u.netloc, "User-Agent": "nvlm-serve", "Accept": "image/*"})
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308):
                    loc = resp.getheader("Location")
                    if not loc:
                        raise MediaError(f"redirect without a Location from {url[:200]!r}")
                    url = urllib.parse.urljoin(url, loc)  # checked again at the top of the loop
                    continue
                if resp.status != 200:
                    raise MediaError(f"image URL answered HTTP {resp.status}")
                length = resp.getheader("Content-Length")
                if length and length.isdigit() and int(length) > self.policy.max_bytes:
                    raise MediaError(f"image is over {self.policy.max_bytes:,} bytes", 413)
                data = resp.read(self.policy.max_bytes + 1)
                if len(data) > self.policy.max_bytes:
                    raise MediaError(f"image is over {self.policy.max_bytes:,} bytes", 413)
                return data
            except (OSError, http.client.HTTPException) as e:
                raise MediaError(f"cannot fetch image URL ({type(e).__name__}: {e})") from None
            finally:
                conn.close()
        raise MediaError(f"more than {self.policy.max_redirects} redirects")

    def _local(self, url: str) -> bytes:
        root = self.policy.allowed_local_path
        if not root:
            raise MediaError("file: URLs are refused; start the server with --allowed-local-media-path DIR")
        u = urllib.parse.urlparse(url)
        if u.netloc not in ("", "localhost"):
            raise MediaError(f"file: URL with a host {u.netloc!r} is refused")
        root = os.path.realpath(root)
        real = os.path.realpath(urllib.parse.unquote(u.path))  # symlinks and .. resolved before the check
        if os.path.commonpath([root, real]) != root:
            raise MediaError("file: URL outside --allowed-local-media-path is refused")
        if not os.path.isfile(real):
            raise MediaError("file: URL is not a regular file under --allowed-local-media-path")
        if os.path.getsize(real) > self.policy.max_bytes:
            raise MediaError(f"image is over {self.policy.max_bytes:,} bytes", 413)
        with open(real, "rb") as f:
            return f.read(self.policy.max_bytes + 1)

    # ---- decoding -----------------------------------------------------------------------------------
    def decode(self, data: bytes) -> Image.Image:
        """Fetched bytes → an RGB PIL image, once the header's pixel count is within the bound; or MediaError."""
        if len(data) > self.policy.max_bytes:
            raise MediaError(f"image is over {self.policy.max_bytes:,} bytes", 413)
        try:  # header only: the pixel count decides before any pixel is decoded
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                w, h = im.size
        except Exception:
            w = h = 0  # load_image below names what is wrong
        if w * h > self.policy.max_pixels:
            raise MediaError(f"image is {w}x{h} = {w * h:,} pixels, over this server's {self.policy.max_pixels:,}", 413)
        try:
            return load_image(data, max_pixels=self.policy.max_pixels)
        except ImageLoadError as e:
            raise MediaError(str(e)) from None


def _pinned(u: urllib.parse.ParseResult, ip: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to the already-checked address `ip`; TLS still verifies the certificate for the name."""
    port = u.port or (443 if u.scheme == "https" else 80)
    host = u.hostname or ""  # checked against the allowed domains before any connection
    if u.scheme == "https":
        ctx = ssl.create_default_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)

        def connect() -> None:
            sock = socket.create_connection((ip, port), timeout)
            conn.sock = ctx.wrap_socket(sock, server_hostname=host)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)

        def connect() -> None:
            conn.sock = socket.create_connection((ip, port), timeout)

    conn.connect = connect  # type: ignore[method-assign]
    return conn
