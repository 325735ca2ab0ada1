"""Fetch task images from Label Studio (or elsewhere), safely, with an on-disk cache.

URL forms found in task data (ls_protocol.md §4.1, ls_live_server.md §7):
* `/data/upload/<project>/<file>`: relative, prefixed with the LS URL, needs auth;
* `/data/local-files/?d=<path>`: read from `local_files_root` when the backend mounts LS's
  LOCAL_FILES_DOCUMENT_ROOT (the resolved path must stay inside it), else fetched from LS;
* `http(s)://...`: absolute; only the LS host (hostname compare, scheme/port-insensitive) and
  `allowed_hosts` ("*" = any) may be fetched, so task data cannot make the backend probe internal
  services (SSRF); redirects are checked the same way, except those LS itself issues (presign);
* `s3://`, `gs://`, `azure-blob://`: through LS's presign endpoint (needs the task id).
Auth headers go to the LS host only. Images are decoded with EXIF orientation applied, as the
browser shows them, because every percent coordinate in LS refers to that orientation.
The cache assumes a URL's content does not change (LS upload names carry a random prefix).
"""
from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

from model.atomic import atomic_write, touch
from backend.errors import ImageError, LabelStudioAPIError, redact_url
from backend.ls_client import LSAuth

log = logging.getLogger(__name__)

_CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob")
_MAX_REDIRECTS = 5
_CHUNK = 1 << 16


@dataclass
class LoadedImage:
    """array: HxWx3 uint8 RGB after EXIF transpose; sha256 of the file bytes; width, height of array."""

    array: np.ndarray
    sha256: str
    width: int
    height: int


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


class ImageFetcher:
    """Thread-safe image loader. The cache (`cache_dir/<sha256(url)>.img`, LRU by total bytes,
    atomic writes) may be shared by several processes; max_cache_bytes <= 0 disables it."""

    def __init__(self, ls_url: str | None, auth: LSAuth | None, cache_dir: Path, max_cache_bytes: int,
                 local_files_root: Path | None, allowed_hosts: set[str], max_pixels: int, max_bytes: int,
                 timeout: tuple[float, float] = (5, 60), retries: int = 2, backoff: float = 0.5):
        self.ls_url = ls_url.rstrip("/") if ls_url else None
        self.auth = auth
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = max_cache_bytes
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else None
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._ls_host = _host(self.ls_url) if self.ls_url else None
        self._session = requests.Session()
        self._evict_lock = threading.Lock()
        if max_cache_bytes > 0:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

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
        return self._ls_host is not None and _host(url) == self._ls_host

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
        if parts.scheme and not (parts.scheme in ("http", "https") and self._is_ls(url)):
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
        url, trusted = target, False
        attempt = redirects = 0
        refreshed = False
        while True:
            is_ls = self._is_ls(url)
            if not (is_ls or trusted or "*" in self.allowed_hosts or _host(url) in self.allowed_hosts):
                raise ImageError(url, f"host '{_host(url)}' is neither LABEL_STUDIO_URL's host nor an allowed "
                                      "image host; refused",
                                 hint="add it to the allowed image hosts if it is trusted, or fix LABEL_STUDIO_URL")
            headers = self._auth_headers(url, rejected=None) if is_ls and self.auth else {}
            try:
                resp = self._session.get(url, headers=headers, timeout=self.timeout, stream=True,
                                         allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt < self.retries:
                    self._sleep(attempt)
                    attempt += 1
                    continue
                hint = "LABEL_STUDIO_URL not reachable from the backend" if is_ls else "host not reachable"
                raise ImageError(url, f"connection failed ({type(e).__name__})", hint=hint) from None
            with resp:
                status = resp.status_code
                if resp.is_redirect:
                    if redirects >= _MAX_REDIRECTS:
                        raise ImageError(url, "too many redirects", status=status)
                    url, trusted = urljoin(url, resp.headers["location"]), is_ls  # LS's presign redirects
                    redirects += 1
                    continue
                if status == 401 and is_ls and self.auth is not None and self.auth.refreshable and not refreshed:
                    self._auth_headers(url, rejected=headers)
                    refreshed = True
                    continue
                if (status == 429 or status >= 500) and attempt < self.retries:
                    self._sleep(attempt)
                    attempt += 1
                    continue
                if status != 200:
                    raise ImageError(url, "download failed", status=status)
                return self._read_body(resp, url)

    def _auth_headers(self, url: str, rejected: dict | None) -> dict[str, str]:
        try:
            return self.auth.headers(rejected=rejected)
        except LabelStudioAPIError as e:
            raise ImageError(url, str(e), status=e.status) from None

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * 2 ** attempt)

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
        if self.max_cache_bytes <= 0:
            return None
        try:
            data = path.read_bytes()
            touch(path)  # recency for LRU eviction
        except FileNotFoundError:
            return None
        return data

    def _store(self, path: Path, data: bytes) -> None:
        if len(data) > self.max_cache_bytes:
            return
        try:  # a full or read-only disk costs the cache, never the image
            atomic_write(path, data, fsync=False)
            touch(path)
        except OSError as e:
            log.warning("cannot write image cache %s: %s", path, e)
            return
        self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Delete least recently used files (never `keep`, the one just stored) until the cache
        fits max_cache_bytes."""
        with self._evict_lock:
            entries = []
            for p in self.cache_dir.glob("*.img"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime_ns, st.st_size, p))
            total = sum(size for _, size, _ in entries)
            for _, size, p in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_cache_bytes:
                    break
                if p != keep:
                    p.unlink(missing_ok=True)
                    total -= size
