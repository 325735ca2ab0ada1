import base64
import hashlib
import io
import logging
import os
import socket
import time

import jwt
import requests
import numpy as np
import pytest
from PIL import Image

from backend.errors import ImageError
from backend.ls.images import ImageFetcher
from backend.regions.label_config import parse_label_config
from backend.ls.auth import LSAuth
from backend.regions.results import detections_to_regions
from tests.backend.fixtures import CONFIG_XML, LEGACY_TOKEN, FakeHTTPServer
from tests.backend.test_results import make_detections
from tests.helpers import free_port

JWT_KEY = "test-signing-key-with-at-least-32-bytes!!"


def png(w=64, h=48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def ok(data: bytes):
    return 200, {"Content-Type": "image/png"}, data


@pytest.fixture
def server():
    s = FakeHTTPServer()
    yield s
    s.close()


@pytest.fixture
def make_fetcher(server, tmp_path):
    def make(**kw):
        args = dict(ls_url=server.url, auth=LSAuth(LEGACY_TOKEN, server.url), cache_dir=tmp_path / "cache",
                    max_cache_bytes=10_000_000, local_files_root=None, allowed_hosts=set(),
                    max_pixels=50_000_000, max_bytes=5_000_000, timeout=(2, 5), retries=2, backoff=0.01)
        args.update(kw)
        return ImageFetcher(**args)
    return make


def test_relative_upload_url_with_token(server, make_fetcher):
    data = png(64, 48)
    server.route("/data/upload/1/3ab875df-img3.png", ok(data))
    img = make_fetcher().fetch("/data/upload/1/3ab875df-img3.png")
    assert img.array.shape == (48, 64, 3) and img.array.dtype == np.uint8
    assert (img.width, img.height) == (64, 48)
    assert tuple(img.array[0, 0]) == (200, 30, 30)
    assert img.sha256 == hashlib.sha256(data).hexdigest()
    (req,) = server.requests
    assert req["headers"]["Authorization"] == f"Token {LEGACY_TOKEN}"


def test_absolute_url_on_ls_host_gets_auth(server, make_fetcher):
    server.route("/data/upload/1/a.png", ok(png()))
    make_fetcher().fetch(f"{server.url}/data/upload/1/a.png")
    assert server.requests[0]["headers"]["Authorization"] == f"Token {LEGACY_TOKEN}"


@pytest.mark.parametrize("status, hint", [
    (404, "check LABEL_STUDIO_URL / file path"),
    (401, "check LABEL_STUDIO_API_KEY (legacy token vs personal access token)"),
    (403, "check LABEL_STUDIO_API_KEY"),
])
def test_client_errors_are_not_retried(server, make_fetcher, status, hint):
    server.route("/data/upload/1/x.png", (status, {}, b'{"detail": "nope"}'))
    with pytest.raises(ImageError) as e:
        make_fetcher().fetch("/data/upload/1/x.png")
    assert e.value.status == status and hint in str(e.value)
    assert e.value.url == f"{server.url}/data/upload/1/x.png"  # the URL actually requested
    assert len(server.requests) == 1


def test_server_errors_are_retried_a_bounded_number_of_times(server, make_fetcher):
    server.route("/a.png", (503, {}, b""), (429, {}, b""), ok(png()))
    make_fetcher(retries=2).fetch("/a.png")
    assert len(server.hits("/a.png")) == 3
    server.route("/b.png", (502, {}, b""))
    with pytest.raises(ImageError) as e:
        make_fetcher(retries=2).fetch("/b.png")
    assert e.value.status == 502
    assert len(server.hits("/b.png")) == 3  # 1 try + 2 retries


def test_connection_refused_says_ls_not_reachable(make_fetcher):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(ImageError) as e:
        make_fetcher(ls_url=f"http://127.0.0.1:{port}", retries=1).fetch("/data/upload/1/a.png")
    assert "LABEL_STUDIO_URL not reachable from the backend" in str(e.value)


def test_cache_hit_makes_no_second_request(server, make_fetcher, tmp_path):
    data = png()
    server.route("/data/upload/1/a.png", ok(data))
    fetcher = make_fetcher()
    first = fetcher.fetch("/data/upload/1/a.png")
    second = make_fetcher().fetch("/data/upload/1/a.png")  # a new fetcher (another worker) shares the cache
    assert len(server.requests) == 1
    np.testing.assert_array_equal(first.array, second.array)
    assert second.sha256 == first.sha256
    key = hashlib.sha256(f"{server.url}/data/upload/1/a.png".encode()).hexdigest()
    assert (tmp_path / "cache" / f"{key}.img").read_bytes() == data
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.img"]  # no temp files left


def test_corrupt_cached_file_is_fetched_again(server, make_fetcher, tmp_path, caplog):
    data = png()
    server.route("/data/upload/1/a.png", ok(data))
    fetcher = make_fetcher()
    fetcher.fetch("/data/upload/1/a.png")
    (cached,) = (tmp_path / "cache").glob("*.img")
    cached.write_bytes(data[: len(data) // 2])  # truncated write, e.g. a crash elsewhere
    with caplog.at_level(logging.WARNING):
        img = fetcher.fetch("/data/upload/1/a.png")
    assert img.width == 64 and len(server.requests) == 2
    assert cached.read_bytes() == data
    assert "fetching it again" in caplog.text


def test_corrupt_download_is_an_error_and_not_cached(server, make_fetcher, tmp_path):
    server.route("/bad.png", ok(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10))
    with pytest.raises(ImageError) as e:
        make_fetcher().fetch("/bad.png")
    assert "not a decodable image" in str(e.value)
    assert list((tmp_path / "cache").glob("*.img")) == []


def test_lru_eviction_by_total_bytes(server, make_fetcher, tmp_path):
    images = {name: png(64, 48, (i * 40, 0, 0)) for i, name in enumerate("abc")}
    for name, data in images.items():
        server.route(f"/{name}.png", ok(data))
    size = max(len(d) for d in images.values())
    fetcher = make_fetcher(max_cache_bytes=2 * size + size // 2)
    fetcher.fetch("/a.png")  # back to back, no pause: uses within one clock tick keep their order
    fetcher.fetch("/b.png")
    fetcher.fetch("/a.png")  # hit: a becomes the most recently used
    fetcher.fetch("/c.png")  # over budget: b (least recently used) goes
    assert [len(server.hits(f"/{n}.png")) for n in "abc"] == [1, 1, 1]
    total = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.img"))
    assert total <= 2 * size + size // 2
    fetcher.fetch("/a.png")
    fetcher.fetch("/b.png")
    assert [len(server.hits(f"/{n}.png")) for n in "ab"] == [1, 2]


def test_lru_order_of_hits_in_a_row(server, make_fetcher, tmp_path):
    """Hits in quick succession (within one tick of the kernel's coarse file-time clock) still
    order the entries: after hits on b then a, c's arrival evicts b, never a or c itself."""
    images = {name: png(64, 48, (i * 40, 0, 0)) for i, name in enumerate("abc")}
    for name, data in images.items():
        server.route(f"/{name}.png", ok(data))
    size = max(len(d) for d in images.values())
    for n in range(20):  # each round a fresh cache; an order left to chance fails within a few
        cache = tmp_path / f"cache{n}"
        fetcher = make_fetcher(cache_dir=cache, max_cache_bytes=2 * size + size // 2)
        for name in "abbac":
            fetcher.fetch(f"/{name}.png")
        server.requests.clear()
        fetcher.fetch("/a.png")
        fetcher.fetch("/c.png")
        assert server.requests == [], "a or c was evicted instead of b"


def test_other_hosts_are_refused_unless_allowed(server, make_fetcher):
    server.route("/x.png", ok(png()))
    foreign = f"http://localhost:{server.port}/x.png"  # same server, different host name
    with pytest.raises(ImageError) as e:
        make_fetcher().fetch(foreign)
    assert "refused" in str(e.value) and "'localhost'" in str(e.value)
    assert server.requests == []
    make_fetcher(allowed_hosts={"LOCALHOST"}, max_cache_bytes=0).fetch(foreign)
    make_fetcher(allowed_hosts={"*"}, max_cache_bytes=0).fetch(foreign)
    assert len(server.requests) == 2
    assert all("Authorization" not in r["headers"] for r in server.requests)  # no token to other hosts


def test_redirects_are_checked_like_urls(server, make_fetcher):
    server.route("/hop.png", (302, {"Location": "http://localhost:%d/x.png" % server.port}, b""))
    fetcher = make_fetcher(ls_url="http://ls.invalid", allowed_hosts={"127.0.0.1"})
    with pytest.raises(ImageError) as e:
        fetcher.fetch(f"{server.url}/hop.png")  # allowed host redirecting to a non-allowed one
    assert "'localhost'" in str(e.value)
    assert [r["path"] for r in server.requests] == ["/hop.png"]


def test_cloud_uri_goes_through_presign_and_redirect_without_auth(server, make_fetcher):
    uri = "s3://bucket/dir/cat.png"
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    server.route(f"/tasks/5/presign/?fileuri={fileuri}",
                 (303, {"Location": f"http://localhost:{server.port}/bucket/dir/cat.png?X-Amz-Signature=s3cr3t"}, b""))
    server.route("/bucket/dir/cat.png?X-Amz-Signature=s3cr3t", (503, {}, b""), ok(png()))
    img = make_fetcher().fetch(uri, task_id=5)
    assert img.width == 64
    presign, s3_busy, s3 = server.requests  # a retry of the presigned URL stays allowed
    assert presign["headers"]["Authorization"] == f"Token {LEGACY_TOKEN}"
    assert "Authorization" not in s3["headers"] and "Authorization" not in s3_busy["headers"]
    with pytest.raises(ImageError) as e:
        make_fetcher().fetch(uri)
    assert "task id" in str(e.value)


def test_error_urls_hide_query_secrets(server, make_fetcher):
    server.route("/p.png?token=abc123&d=images/a.png", (404, {}, b""))
    with pytest.raises(ImageError) as e:
        make_fetcher().fetch("/p.png?token=abc123&d=images/a.png")
    assert "abc123" not in str(e.value) and "d=images/a.png" in str(e.value)


@pytest.fixture
def files_root(tmp_path):
    root = tmp_path / "ls-files"
    (root / "images").mkdir(parents=True)
    (root / "images" / "local1.png").write_bytes(png(32, 24))
    (tmp_path / "secret.png").write_bytes(png(8, 8))
    return root


def test_local_files_read_from_disk(server, make_fetcher, files_root):
    fetcher = make_fetcher(local_files_root=files_root)
    img = fetcher.fetch("/data/local-files/?d=images/local1.png")
    assert (img.width, img.height) == (32, 24)
    img = fetcher.fetch(f"{server.url}/data/local-files/?d=images%2Flocal1.png")  # absolute on the LS host
    assert img.width == 32
    assert server.requests == []


@pytest.mark.parametrize("d", ["../../etc/passwd", "../secret.png", "/etc/passwd", "images/../../secret.png",
                               "images/escape/secret.png"])
def test_local_files_traversal_is_refused(server, make_fetcher, files_root, d):
    (files_root / "images" / "escape").symlink_to(files_root.parent)  # a link out of the root
    with pytest.raises(ImageError) as e:
        make_fetcher(local_files_root=files_root).fetch(f"/data/local-files/?d={d}")
    assert "leaves the local files root" in str(e.value)
    assert server.requests == []


def test_local_files_missing_file_and_fallback_to_ls(server, make_fetcher, files_root):
    with pytest.raises(ImageError) as e:
        make_fetcher(local_files_root=files_root).fetch("/data/local-files/?d=images/nope.png")
    assert e.value.status is None and "file not found" in str(e.value) and "mounted" in str(e.value)
    server.route("/data/local-files/?d=images/local1.png", ok(png(32, 24)))
    img = make_fetcher(local_files_root=None).fetch("/data/local-files/?d=images/local1.png")
    assert img.width == 32 and server.requests[0]["headers"]["Authorization"].startswith("Token ")


def test_too_many_pixels_is_refused_before_decoding(server, make_fetcher):
    server.route("/big.png", ok(png(2000, 1500)))
    with pytest.raises(ImageError) as e:
        make_fetcher(max_pixels=2_000_000).fetch("/big.png")
    assert "image is 3.0 MP, over the MAX_IMAGE_PIXELS limit" in str(e.value)


def test_too_many_bytes_is_refused(server, make_fetcher):
    data = png(300, 300, (1, 2, 3))
    server.route("/heavy.png", ok(data))
    with pytest.raises(ImageError) as e:
        make_fetcher(max_bytes=len(data) - 1).fetch("/heavy.png")
    assert "byte limit" in str(e.value)


def test_unsupported_inputs(make_fetcher):
    with pytest.raises(ImageError, match="unsupported URL scheme 'file'"):
        make_fetcher().fetch("file:///etc/passwd")
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL is not set"):
        make_fetcher(ls_url=None).fetch("/data/upload/1/a.png")
    with pytest.raises(ImageError, match="no image URL"):
        make_fetcher().fetch("")


def exif_jpeg(orientation: int) -> bytes:
    """64x48 stored pixels, red block at stored columns 0..15, rows 0..7, rest white."""
    stored = np.full((48, 64, 3), 255, np.uint8)
    stored[0:8, 0:16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied_and_percentages_match_the_browser(server, make_fetcher):
    server.route("/data/upload/1/phone.jpg", ok(exif_jpeg(6)))
    img = make_fetcher().fetch("/data/upload/1/phone.jpg")
    # orientation 6 = rotate 90 degrees clockwise for display: 48 wide, 64 high, block at the top right
    assert (img.width, img.height) == (48, 64) and img.array.shape == (64, 48, 3)
    red = (img.array[:, :, 0] > 128) & (img.array[:, :, 1] < 128)
    ys, xs = np.nonzero(red)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (40, 47, 0, 15)
    det = make_detections([red], ["Cat"], [0.9])
    assert det.image_size == (64, 48)
    rect = next(r for r in detections_to_regions(det, parse_label_config(CONFIG_XML), score_threshold=None,
                                                 polygon_tolerance=1.0) if r["type"] == "rectanglelabels")
    # where the browser (which applies EXIF) shows the block: right sixth, top quarter
    assert (rect["original_width"], rect["original_height"]) == (48, 64)
    assert rect["value"]["x"] == pytest.approx(100 * 40 / 48)
    assert rect["value"]["width"] == pytest.approx(100 * 8 / 48)
    assert (rect["value"]["y"], rect["value"]["height"]) == (0.0, 25.0)


def pat_server(server):
    """LS stand-in: /api/token/refresh/ issues access JWTs; images accept the tokens in `valid`."""
    refresh = jwt.encode({"token_type": "refresh", "exp": int(time.time()) + 3600, "jti": "r1"}, JWT_KEY)
    state = {"issued": [], "valid": set(), "accept_new": True}

    def refresh_endpoint(req):
        if req["body"] != {"refresh": refresh}:
            return 401, {}, {"detail": "Token is invalid or expired"}
        token = jwt.encode({"token_type": "access", "exp": int(time.time()) + 300, "n": len(state["issued"])},
                           JWT_KEY)
        state["issued"].append(token)
        if state["accept_new"]:
            state["valid"].add(token)
        return 200, {}, {"access": token}

    def image(req):
        if req["headers"].get("Authorization", "").removeprefix("Bearer ") in state["valid"]:
            return ok(png())
        return 401, {}, {"detail": "Given token not valid for any token type"}

    server.route("/api/token/refresh/", refresh_endpoint)
    server.route("/data/upload/1/a.png", image)
    return refresh, state


def test_pat_is_exchanged_and_refreshed_once_on_401(server, make_fetcher, caplog):
    refresh, state = pat_server(server)
    fetcher = make_fetcher(auth=LSAuth(refresh, server.url), max_cache_bytes=0)
    with caplog.at_level(logging.DEBUG):
        fetcher.fetch("/data/upload/1/a.png")
        fetcher.fetch("/data/upload/1/a.png")
        assert len(state["issued"]) == 1  # cached until exp - 30 s
        assert server.hits("/data/upload/1/a.png")[0]["headers"]["Authorization"] == f"Bearer {state['issued'][0]}"
        state["valid"].clear()  # e.g. LS restarted with a new secret: the cached token is refused
        fetcher.fetch("/data/upload/1/a.png")
        assert len(state["issued"]) == 2
        state["valid"].clear()
        state["accept_new"] = False  # refreshing does not help: exactly one forced refresh, then an error
        with pytest.raises(ImageError) as e:
            fetcher.fetch("/data/upload/1/a.png")
    assert e.value.status == 401 and "LABEL_STUDIO_API_KEY" in str(e.value)
    assert len(state["issued"]) == 3
    assert len(server.hits("/data/upload/1/a.png")) == 2 + 2 + 2
    for secret in [refresh, *state["issued"]]:
        assert secret not in caplog.text and secret not in str(e.value)


def test_expired_pat_is_a_clear_image_error(server, make_fetcher):
    pat_server(server)
    other = jwt.encode({"token_type": "refresh", "exp": int(time.time()) + 3600, "jti": "other"}, JWT_KEY)
    with pytest.raises(ImageError) as e:
        make_fetcher(auth=LSAuth(other, server.url)).fetch("/data/upload/1/a.png")
    assert e.value.status == 401 and "personal access token rejected" in str(e.value)
    assert other not in str(e.value)


def test_logs_never_contain_the_token(server, make_fetcher, files_root, caplog):
    server.route("/data/upload/1/a.png", (503, {}, b""), ok(png()))
    server.route("/data/upload/1/b.png", (401, {}, b""))
    server.route("/data/upload/1/c.png", ok(b"broken"))
    fetcher = make_fetcher(local_files_root=files_root)
    errors = []
    with caplog.at_level(logging.DEBUG):
        fetcher.fetch("/data/upload/1/a.png")
        for url in ("/data/upload/1/b.png", "/data/upload/1/c.png",
                    "/data/local-files/?d=../../etc/passwd"):
            with pytest.raises(ImageError) as e:
                fetcher.fetch(url)
            errors.append(str(e.value))
    assert LEGACY_TOKEN not in caplog.text
    assert all(LEGACY_TOKEN not in msg for msg in errors)
    assert LEGACY_TOKEN not in repr(fetcher.auth)


def test_cache_can_be_disabled(server, make_fetcher, tmp_path):
    server.route("/a.png", ok(png()))
    fetcher = make_fetcher(max_cache_bytes=0)
    fetcher.fetch("/a.png")
    fetcher.fetch("/a.png")
    assert len(server.requests) == 2
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


# ------------------------------------------------------------------------------------ origins
@pytest.fixture
def other():
    """A second server on LS's host (127.0.0.1) but another port: another origin."""
    s = FakeHTTPServer()
    yield s
    s.close()


def test_same_host_other_port_is_another_origin(server, other, make_fetcher):
    other.route("/x.png", ok(png()))
    with pytest.raises(ImageError, match="refused"):  # not LS: not allowed by default
        make_fetcher().fetch(f"{other.url}/x.png")
    assert other.requests == []
    make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(f"{other.url}/x.png")
    assert "Authorization" not in other.requests[0]["headers"]
    other.route("/locked.png", (401, {}, b""))
    with pytest.raises(ImageError) as e:  # its 401 is not about LS's key
        make_fetcher(allowed_hosts={"127.0.0.1"}).fetch(f"{other.url}/locked.png")
    assert "LABEL_STUDIO_API_KEY" not in str(e.value) and f"only sent to {server.url}" in str(e.value)
    assert server.requests == []


def test_plain_http_to_an_https_label_studio_gets_no_credentials(server, make_fetcher):
    """LS configured as https on this host and port: the same address over http is another origin."""
    https_ls = f"https://127.0.0.1:{server.port}"
    server.route("/data/upload/1/a.png", ok(png()))
    fetcher = make_fetcher(ls_url=https_ls, auth=LSAuth(LEGACY_TOKEN, https_ls), allowed_hosts={"127.0.0.1"})
    fetcher.fetch(f"{server.url}/data/upload/1/a.png")
    assert "Authorization" not in server.requests[0]["headers"]


def test_redirect_chain_drops_credentials_once_it_leaves_the_origin(server, other, make_fetcher):
    third = FakeHTTPServer()
    try:
        server.route("/start.png", (302, {"Location": f"{other.url}/mid.png"}, b""))
        other.route("/mid.png", (302, {"Location": f"{server.url}/final.png"}, b""))
        server.route("/final.png", ok(png()))
        make_fetcher().fetch("/start.png")  # LS -> other port (LS issued it: followed) -> back to LS
        start, final = server.requests
        assert start["headers"]["Authorization"] == f"Token {LEGACY_TOKEN}"
        assert "Authorization" not in other.requests[0]["headers"] and "Authorization" not in final["headers"]

        # a hop LS did not issue is checked against the allowed hosts again
        server.route("/start2.png", (302, {"Location": f"{other.url}/mid2.png"}, b""))
        other.route("/mid2.png", (302, {"Location": f"{third.url}/x.png"}, b""))
        with pytest.raises(ImageError) as e:
            make_fetcher().fetch("/start2.png")
        assert "refused" in str(e.value) and e.value.url == f"{third.url}/x.png"
        assert third.requests == []
    finally:
        third.close()


def test_unreachable_image_names_its_own_origin(server, make_fetcher):
    dead = f"http://127.0.0.1:{free_port()}"  # LS's host, another port, nothing listening
    with pytest.raises(ImageError) as e:
        make_fetcher(allowed_hosts={"127.0.0.1"}, retries=0).fetch(f"{dead}/data/upload/1/a.png")
    assert f"{dead} not reachable from the backend" in str(e.value) and "LABEL_STUDIO_URL" not in str(e.value)


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/iam/", "http://[fe80::1]/a.png", "http://[fd00:ec2::254]/latest/",
    "http://100.100.100.200/latest/meta-data/", "http://[::ffff:169.254.169.254]/", "http://169.254.170.2/v2/creds",
    "http://metadata.google.internal/computeMetadata/v1/", "http://imds.test/latest/",
])
def test_link_local_and_metadata_hosts_are_refused_unless_allowed(make_fetcher, monkeypatch, url):
    real = socket.getaddrinfo

    def resolve(host, *args, **kw):  # a name that resolves to the metadata address
        if host == "imds.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    fetcher = make_fetcher(allowed_hosts={"*"})
    requested = []

    def never(url, **kw):
        requested.append(url)
        raise requests.ConnectionError("test: no network")

    monkeypatch.setattr(fetcher._session, "get", never)
    with pytest.raises(ImageError) as e:
        fetcher.fetch(url)
    assert "refused" in str(e.value) and "ALLOW_LINK_LOCAL_IMAGE_HOSTS" in str(e.value)
    assert requested == []
    allowed = make_fetcher(allowed_hosts={"*"}, allow_link_local=True, retries=0)
    monkeypatch.setattr(allowed._session, "get", never)
    with pytest.raises(ImageError, match="connection failed"):
        allowed.fetch(url)
    assert requested == [url]
