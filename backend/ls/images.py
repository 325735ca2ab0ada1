"""Fetch task images from Label Studio (or elsewhere), safely, with an on-disk cache.

URL forms found in task data (as Label Studio 1.23 writes them):
* `/data/upload/<project>/<file>`: relative, prefixed with the LS URL, needs auth;
* `/data/local-files/?d=<path>`: read from `local_files_root` when the backend mounts LS's
  LOCAL_FILES_DOCUMENT_ROOT (the resolved path must stay inside it), else fetched from LS;
* `http(s)://...`: absolute; only LS's origin (scheme, host and port) and `allowed_hosts` ("*" =
  any) may be fetched, so task data cannot make the backend probe internal services (SSRF);
  every redirect hop is checked the same way, except a hop LS itself issues (presign);
* `s3://`, `gs://`, `azure-blob://`: through LS's presign endpoint (needs the task id).
Link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254,
100.100.100.200, metadata.google.internal), named or resolved to, are refused on every hop off
LS's origin, even with "*", unless `allow_link_local`. Credentials go only to the origin of the
key (`LSAuth.sends_to`), never to another port or scheme of that host, and are dropped for the
rest of a redirect chain once a hop leaves it. Images are decoded with EXIF orientation applied,
as the browser shows them, because every percent coordinate in LS refers to that orientation.
The cache assumes a URL's content does not change (LS upload names carry a random prefix).
"""
from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from backend.errors import ImageError, LabelStudioAPIError, redact_url
from backend.ls.auth import LSAuth, origin
from backend.ls.session import retrying_session
from backend.storage.disk_lru import DiskLRU

log = logging.getLogger(__name__)

_CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob")
_MAX_REDIRECTS = 5
_CHUNK = 1 << 16
# Cloud instance metadata services (credentials of the machine) besides the link-local ranges:
# AWS IPv6, Alibaba (in the 100.64/10 shared range), and GCP's names.
_METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog"})


@dataclass
class LoadedImage:
    """array: HxWx3 uint8 RGB after EXIF transpose; sha256 of the file bytes; width, height of array."""

    array: np.ndarray
    sha256: str
    width: int
    height: int


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` names or resolves to ([] when it does not resolve: the download fails
    then with its own error)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def _metadata_or_link_local(url: str) -> str | None:
    """Why `url`'s host must not be fetched from (a cloud metadata service or a link-local address,
    by name or by what it resolves to), else None."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    if host in _METADATA_NAMES:
        return f"'{host}' is a cloud metadata service"
    for ip in _addresses(host, parts.port or 0):
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:169.254.169.254 is 169.254.169.254
        if ip in _METADATA_IPS:
            return f"'{host}' is a cloud metadata address ({ip})"
        if ip.is_link_local:
            return f"'{host}' is a link-local address ({ip})"
    return None


class ImageFetcher:
    """Thread-safe image loader. The cache (`cache_dir/<sha256(url)>.img`, a DiskLRU: LRU by total
    bytes, atomic writes) may be shared by several processes; max_cache_bytes <= 0 disables it."""

    def __init__(self, ls_url: str | None, auth: LSAuth | None, cache_dir: Path, max_cache_bytes: int,
                 local_files_root: Path | None, allowed_hosts: set[str], max_pixels: int, max_bytes: int,
                 timeout: tuple[float, float] = (5, 60), retries: int = 2, backoff: float = 0.5,
                 allow_link_local: bool = False):
        self.ls_url = ls_url.rstrip("/") if ls_url else None
        self.auth = auth
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = max_cache_bytes
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else None
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allow_link_local = allow_link_local
        self._ls_origin = origin(self.ls_url)
        self._session = retrying_session(retries, backoff)  # the LS client's policy (GETs: idempotent)
        self._cache = DiskLRU(self.cache_dir, max_cache_bytes, patterns=("*.img",)) if max_cache_bytes > 0 else None

    # ------------------------------------------------------------------ public
    def fetch(self, url: str, task_id: int | None = None) -> LoadedImage:
        """Load the image a task's data points to; raises ImageError with what to check."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError(str(url), "task has no image URL")
        url = url.strip()
        local = self._local_path(url)
        if local is not None:
            return self._decode(self._read_local(local, url), url)
        target, key = self._resolve(url, task_id)
        path = self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.img"
        cached = self._read_cache(path)
        if cached is not None:
            try:
                return self._decode(cached, url)
            except ImageError as e:
                log.warning("cached copy of %s is unusable (%s); fetching it again", redact_url(url), e.reason)
                path.unlink(missing_ok=True)
        data = self._download(target)
        image = self._decode(data, url)
        self._store(path, data)
        return image

    # ------------------------------------------------------------------ resolving
    def _is_ls(self, url: str) -> bool:
        """Whether `url` is on LABEL_STUDIO_URL's origin (scheme, host and port)."""
        return self._ls_origin is not None and origin(url) == self._ls_origin

    def _resolve(self, url: str, task_id: int | None) -> tuple[str, str]:
        """(URL to request, cache key)."""
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return url, url
        if scheme in _CLOUD_SCHEMES:
            if not self.ls_url or task_id is None:
                raise ImageError(url, "cloud storage URIs are fetched through Label Studio's presign endpoint, "
                                      "which needs LABEL_STUDIO_URL and the task id")
            fileuri = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{self.ls_url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}", url
        if scheme:
            raise ImageError(url, f"unsupported URL scheme '{scheme}'")
        if not self.ls_url:
            raise ImageError(url, "relative image URL but LABEL_STUDIO_URL is not set")
        absolute = f"{self.ls_url}/{url.lstrip('/')}"
        return absolute, absolute

    def _local_path(self, url: str) -> Path | None:
        """File under local_files_root for a /data/local-files/ URL on LS, else None."""
        parts = urlsplit(url)
        if self.local_files_root is None or not parts.path.rstrip("/").endswith("/data/local-files"):
            return None
        if parts.scheme and not self._is_ls(url):
            return None
        d = parse_qs(parts.query).get("d")
        if not d or not d[0]:
            raise ImageError(url, "local-files URL without the ?d= file path")
        path = (self.local_files_root / d[0]).resolve()
        if not path.is_relative_to(self.local_files_root):
            raise ImageError(url, "path leaves the local files root; refused")
        return path

    def _read_local(self, path: Path, url: str) -> bytes:
        try:
            size = path.stat().st_size
        except OSError:
            raise ImageError(url, f"file not found under the local files root {self.local_files_root}",
                             hint="check that LS's LOCAL_FILES_DOCUMENT_ROOT is mounted at the same path") from None
        if size > self.max_bytes:
            raise ImageError(url, f"file is {size} bytes, over the {self.max_bytes} byte limit")
        return path.read_bytes()

    # ------------------------------------------------------------------ network
    def _download(self, target: str) -> bytes:
        """Bytes at `target`; errors name the URL of the hop that failed."""
        url, trusted, left_origin = target, False, False
        redirects = 0
        refreshed = False
        while True:
            is_ls = self._is_ls(url)
            self._check_hop(url, is_ls, trusted)
            # once a hop leaves the key's origin, no later hop gets it (not even one back to LS)
            left_origin = left_origin or self.auth is None or not self.auth.sends_to(url)
            headers = self._auth_headers(url, rejected=None) if not left_origin else {}
            try:
                resp = self._session.get(url, headers=headers, timeout=self.timeout, stream=True,
                                         allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout) as e:
                where = "LABEL_STUDIO_URL" if is_ls else origin(url)
                raise ImageError(url, f"connection failed ({type(e).__name__})",
                                 hint=f"{where} not reachable from the backend") from None
            with resp:
                status = resp.status_code
                if resp.is_redirect:
                    if redirects >= _MAX_REDIRECTS:
                        raise ImageError(url, "too many redirects", status=status)
                    url, trusted = urljoin(url, resp.headers["location"]), is_ls  # LS's presign redirects
                    redirects += 1
                    continue
                if status == 401 and headers and self.auth.refreshable and not refreshed:
                    self._auth_headers(url, rejected=headers)
                    refreshed = True
                    continue
                if status != 200:
                    raise ImageError(url, "download failed", status=status,
                                     hint=None if is_ls else self._foreign_hint(url, status))
                return self._read_body(resp, url)

    def _check_hop(self, url: str, is_ls: bool, trusted: bool) -> None:
        """Refuse a hop off LS's origin that is not allowed (a hop LS redirected to is: presign),
        and, unless allowed, one to a link-local or cloud metadata address."""
        if is_ls:
            return
        if not (trusted or "*" in self.allowed_hosts or _host(url) in self.allowed_hosts):
            raise ImageError(url, f"host '{_host(url)}' is neither on LABEL_STUDIO_URL ({self._ls_origin}) "
                                  "nor an allowed image host; refused",
                             hint="add it to the allowed image hosts if it is trusted, or fix LABEL_STUDIO_URL "
                                  "(scheme, host and port)")
        why = None if self.allow_link_local else _metadata_or_link_local(url)
        if why:
            raise ImageError(url, f"{why}; refused",
                             hint="set ALLOW_LINK_LOCAL_IMAGE_HOSTS=1 if images really are served there")

    def _foreign_hint(self, url: str, status: int) -> str:
        """What to check when a host off LS's origin answers an error (not LS's key or URL)."""
        if status in (401, 403):
            return (f"{origin(url)} wants credentials; Label Studio's are only sent to "
                    f"{self.auth.origin if self.auth and self.auth.origin else 'its own origin'}")
        return "check the image URL" if status == 404 else ""

    def _auth_headers(self, url: str, rejected: dict | None) -> dict[str, str]:
        try:
            return self.auth.headers(rejected=rejected)
        except LabelStudioAPIError as e:
            raise ImageError(url, str(e), status=e.status) from None

    def _read_body(self, resp: requests.Response, url: str) -> bytes:
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageError(url, f"image is {declared} bytes, over the {self.max_bytes} byte limit")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageError(url, f"image is over the {self.max_bytes} byte limit")
        except requests.RequestException as e:
            raise ImageError(url, f"download interrupted ({type(e).__name__})") from None
        return bytes(buf)

    # ------------------------------------------------------------------ decoding
    def _decode(self, data: bytes, url: str) -> LoadedImage:
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > self.max_pixels:
                    raise ImageError(url, f"image is {w * h / 1e6:.1f} MP, over the MAX_IMAGE_PIXELS limit "
                                          f"({self.max_pixels / 1e6:.1f} MP)")
                array = np.array(ImageOps.exif_transpose(im).convert("RGB"))
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(url, f"{e}; over the MAX_IMAGE_PIXELS limit") from None
        except Exception as e:  # Pillow raises many types for corrupt data (OSError, SyntaxError, struct.error...)
            raise ImageError(url, f"not a decodable image ({type(e).__name__}: {e})") from None
        return LoadedImage(array=array, sha256=hashlib.sha256(data).hexdigest(),
                           width=int(array.shape[1]), height=int(array.shape[0]))

    # ------------------------------------------------------------------ cache
    def _read_cache(self, path: Path) -> bytes | None:
        return self._cache.read(path) if self._cache else None

    def _store(self, path: Path, data: bytes) -> None:
        if self._cache is None or len(data) > self.max_cache_bytes:
            return
        try:  # a full or read-only disk costs the cache, never the image
            self._cache.write(path, data)
        except OSError as e:
            log.warning("cannot write image cache %s: %s", path, e)
