"""Security: basic auth everywhere, no secret in any log line or answer, no SSRF, no path escape, 413.

Secrets checked: the LS personal access token and the access tokens LS hands out for it, a legacy
token sent by /setup, the basic-auth password (and its base64 form).
"""
from __future__ import annotations

import base64
import hmac
import logging
import os
from pathlib import Path

import pytest
import requests

from backend.web import openapi
from backend import queueing
from backend.errors import ImageError
from backend.ls.images import ImageFetcher
from backend.ls.auth import LSAuth
from tests.reliability.conftest import (CAT, CONFIG_XML, LEGACY_TOKEN, PAT, FakeLabelStudio, assert_no_secrets,
                                        fill_bank, mark_bank_filled, png_bytes, polygon_region, serving, wait_job)

PID = 1
USER, PASSWORD = "label-studio", "basic-pass-93ad0c"


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def every_operation() -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, ops in openapi.spec()["paths"].items() for method in ops]


# ------------------------------------------------------------------------------------ basic auth
def test_basic_auth_on_every_route_with_constant_time_compare(make_app, fake_jobs, monkeypatch):
    client = make_app(basic_auth_user=USER, basic_auth_pass=PASSWORD).test_client()
    compares: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compares.append((a, b)) or real(a, b))
    operations = every_operation() + [("GET", "/no-such-route"), ("DELETE", "/predict")]
    assert len(operations) >= 11
    rejected = [None, basic(USER, "wrong"), basic("someone", PASSWORD), basic(USER, PASSWORD + "x"),
                basic("", ""), {"Authorization": f"Bearer {PASSWORD}"}, {"Authorization": "Basic !!notbase64"}]
    for method, path in operations:
        for headers in rejected:
            compares.clear()
            resp = client.open(path, method=method, headers=headers or {}, json={"project": "1"})
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json == {"error": "authentication required"}
            assert resp.headers["WWW-Authenticate"].startswith("Basic ")
            if headers and headers["Authorization"].startswith("Basic ") and "!!" not in headers["Authorization"]:
                assert len(compares) == 2  # user AND password compared, even when the user is wrong
        resp = client.open(path, method=method, headers=basic(USER, PASSWORD), json={"project": "1"})
        assert resp.status_code != 401, (method, path)


# ------------------------------------------------------------------------------------ secrets
def test_no_secret_in_logs_or_answers_through_a_full_flow(embedded, engine, caplog):
    ls = FakeLabelStudio(token=None, pat=PAT)  # only a personal access token works here
    other_token = "fedcba9876543210fedcba9876543210fedcba98"
    try:
        client = embedded(label_studio_url=None, label_studio_api_key=None,
                          basic_auth_user=USER, basic_auth_pass=PASSWORD)
        auth = basic(USER, PASSWORD)
        ls.add_task(1, annotations=[{"id": 11, "task": 1, "result": [polygon_region("a", "Cat", CAT)]}])
        ls.add_task(2)
        ls.add_task(3)
        texts: list[str] = []

        def call(method: str, path: str, **kw):
            resp = client.open(path, method=method, headers=auth, **kw)
            texts.append(resp.get_data(as_text=True))
            return resp

        with caplog.at_level(logging.DEBUG):
            assert call("POST", "/setup", json={"project": f"{PID}.1717", "schema": CONFIG_XML,
                                                "hostname": ls.url, "access_token": PAT}).status_code == 200
            assert call("POST", "/setup", json={"project": "2.1717", "schema": CONFIG_XML, "hostname": ls.url,
                                                "access_token": other_token}).status_code == 200
            job = call("POST", "/webhook", json={
                "action": "ANNOTATION_CREATED", "project": {"id": PID, "label_config": CONFIG_XML},
                "annotation": {"id": 11, "task": 1, "project": PID, "result": [polygon_region("a", "Cat", CAT)]},
                "task": {"id": 1, "project": PID, "data": ls.tasks[1]["data"]}}).json["job"]
            assert wait_job(job).status == "finished"

            ls.fail("GET", r"/img3\.png$", 401, 401, 401, 401)  # refused even after a token refresh
            items = call("POST", "/predict", json={"project": f"{PID}.1717", "label_config": CONFIG_XML,
                                                   "tasks": [ls.tasks[2], ls.tasks[3]]}).json["results"]
            assert "result" in items[0] and "HTTP 401" in items[1]["error"]
            fill_bank(2)
            # project 2: its legacy token is refused by this LS
            ls.add_task(4)  # not in the image cache yet
            items = call("POST", "/predict", json={"project": "2.1717", "label_config": CONFIG_XML,
                                                   "tasks": [ls.tasks[4]]}).json["results"]
            assert "HTTP 401" in items[0]["error"]

            ls.fail("POST", r"^/api/predictions/$", 401, 401)  # the body echoes the Bearer token
            job = call("POST", "/webhook", json={"action": "START_TRAINING",
                                                 "project": {"id": PID, "label_config": CONFIG_XML}}).json["job"]
            info = wait_job(job)
            assert info.status == "finished" and info.result["failed"] == 1
            call("GET", "/jobs")
            call("GET", f"/jobs?id={job}")
            call("GET", "/metrics")
            client.get("/health", headers=basic(USER, "guess"))  # a failed login is logged too
            call("POST", "/predict", data=b"{not json")
        assert len(ls.access_tokens) >= 2  # the PAT was exchanged, and refreshed after a 401
        assert any("posting the prediction to Label Studio failed" in r.getMessage() for r in caplog.records)
        everything = caplog.text + "\n".join(texts) + repr(queueing.list_jobs(100))
        assert_no_secrets(everything, PAT, other_token, PASSWORD, auth["Authorization"].split()[1],
                          *ls.access_tokens)
    finally:
        ls.close()


def test_settings_never_show_secrets():
    from backend.settings import Settings

    s = Settings.from_env({"LABEL_STUDIO_API_KEY": LEGACY_TOKEN, "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
                           "REDIS_URL": "redis://:redis-secret-1@127.0.0.1:6379/0"})
    assert_no_secrets(repr(s) + str(s), LEGACY_TOKEN, PASSWORD, "redis-secret-1")
    assert repr(LSAuth(PAT)) == "LSAuth(kind='pat')"


# ------------------------------------------------------------------------------------ SSRF
@pytest.fixture
def hosts():
    """LS on 127.0.0.1, an 'internal service' on 127.0.0.2, a 'CDN' on 127.0.0.3 (all loopback)."""
    ls = FakeLabelStudio()
    internal = FakeLabelStudio(host="127.0.0.2")
    cdn = FakeLabelStudio(host="127.0.0.3", token=None)
    yield ls, internal, cdn
    for server in (ls, internal, cdn):
        server.close()


def _fetcher(ls_url: str, tmp_path: Path, allowed=(), root: Path | None = None) -> ImageFetcher:
    return ImageFetcher(ls_url, LSAuth(LEGACY_TOKEN, ls_url), tmp_path / "cache", 0, root, set(allowed),
                        max_pixels=40_000_000, max_bytes=2**20)


def test_image_urls_are_restricted_to_the_label_studio_host(hosts, tmp_path):
    ls, internal, cdn = hosts
    internal.images["secret.png"] = png_bytes()
    fetch = _fetcher(ls.url, tmp_path).fetch
    refused = [f"{internal.url}/data/upload/1/secret.png",                        # another host
               f"http://localhost:{ls.server.server_address[1]}/data/upload/1/x.png",  # another name
               "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "ftp://127.0.0.2/x.png",
               f"http://user:pw@127.0.0.2:{internal.server.server_address[1]}/x.png"]
    for url in refused:
        with pytest.raises(ImageError) as err:
            fetch(url)
        assert "refused" in str(err.value) or "unsupported URL scheme" in str(err.value), url
    assert internal.requests == [] and ls.requests == []

    # an allowed extra host is fetched, without the LS credentials
    cdn.images["cdn.png"] = png_bytes(3)
    cdn.authorized = lambda auth: auth is None
    image = _fetcher(ls.url, tmp_path, allowed={"127.0.0.3"}).fetch(f"{cdn.url}/data/upload/1/cdn.png")
    assert image.width == 80 and cdn.requests[-1][2] is None

    # ... but its redirects are checked like any URL: no hop to a host that is not allowed
    cdn.redirect(r"/hop\.png$", f"{internal.url}/data/upload/1/secret.png")
    with pytest.raises(ImageError, match="refused"):
        _fetcher(ls.url, tmp_path, allowed={"127.0.0.3"}).fetch(f"{cdn.url}/hop.png")
    assert internal.requests == []

    # Label Studio's own redirects (presigned storage URLs) are followed, without the key
    ls.redirect(r"/presigned\.png$", f"{cdn.url}/data/upload/1/cdn.png")
    assert _fetcher(ls.url, tmp_path).fetch(f"{ls.url}/presigned.png").width == 80
    assert ls.requests[-1][2] == f"Token {LEGACY_TOKEN}" and cdn.requests[-1][2] is None


def test_predict_refuses_foreign_image_hosts_per_task(embedded, hosts, fake_ls):
    _, internal, _ = hosts
    client = embedded()
    fill_bank(PID)
    fake_ls.add_task(1)
    items = client.post("/predict", json={"project": f"{PID}.1", "label_config": CONFIG_XML, "tasks": [
        {"id": 1, "data": {"image": f"{internal.url}/data/upload/1/secret.png"}},
        {"id": 2, "data": {"image": "http://169.254.169.254/latest/meta-data/iam/"}}]}).json["results"]
    assert all("refused" in i["error"] and "result" not in i for i in items), items
    assert internal.requests == []


def test_link_local_and_metadata_are_refused_even_with_any_host_allowed(embedded, fake_ls):
    client = embedded(allowed_image_hosts=("*",))
    fill_bank(PID)
    items = client.post("/predict", json={"project": f"{PID}.1", "label_config": CONFIG_XML, "tasks": [
        {"id": 1, "data": {"image": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}},
        {"id": 2, "data": {"image": "http://[fe80::a9fe:a9fe]/latest/meta-data/"}}]}).json["results"]
    assert "cloud metadata address" in items[0]["error"] and "link-local address" in items[1]["error"], items
    assert all("refused" in i["error"] and "result" not in i for i in items)


# ------------------------------------------------------------------------------------ key origins
ENV_KEY = "e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0"
SETUP_TOKEN = "5e75e75e75e75e75e75e75e75e75e75e75e75e7a"


def _setup_and_predict(client, hostname: str, token: str | None, task: dict) -> dict:
    body = {"project": f"{PID}.1717", "schema": CONFIG_XML, "hostname": hostname}
    if token:
        body["access_token"] = token
    assert client.post("/setup", json=body).status_code == 200
    return client.post("/predict", json={"project": f"{PID}.1717", "label_config": CONFIG_XML,
                                         "tasks": [task]}).json["results"][0]


def test_setup_never_sends_the_env_key_to_a_host_it_names(embedded):
    """Only LABEL_STUDIO_API_KEY is set: /setup's hostname gets its own token, never that key."""
    named = FakeLabelStudio(token=SETUP_TOKEN)  # the host a /setup names (127.0.0.1, its own port)
    try:
        client = embedded(label_studio_url=None, label_studio_api_key=ENV_KEY)
        fill_bank(PID)
        named.add_task(1)
        named.add_task(2)
        assert "HTTP 401" in _setup_and_predict(client, named.url, None, named.tasks[1])["error"]
        assert "result" in _setup_and_predict(client, named.url, SETUP_TOKEN, named.tasks[2])
        seen = {auth for _, _, auth in named.requests}
        assert None in seen and f"Token {SETUP_TOKEN}" in seen and f"Token {ENV_KEY}" not in seen
    finally:
        named.close()


def test_setup_token_goes_only_to_its_own_hostname(embedded, fake_ls):
    """LABEL_STUDIO_URL without a key: /setup's token is used only when its hostname is that origin."""
    fake_ls.token = SETUP_TOKEN
    client = embedded(label_studio_api_key=None)  # LABEL_STUDIO_URL = fake_ls.url (127.0.0.1)
    fill_bank(PID)
    port = fake_ls.server.server_address[1]
    fake_ls.add_task(1)
    fake_ls.add_task(2)
    item = _setup_and_predict(client, f"http://localhost:{port}", SETUP_TOKEN, fake_ls.tasks[1])
    assert "HTTP 401" in item["error"] and "LABEL_STUDIO_API_KEY" in item["error"]
    assert fake_ls.hits("GET", r"/img1\.png$")[0][2] is None
    # the same origin spelled differently (upper-case scheme, trailing slash) is that origin
    assert "result" in _setup_and_predict(client, f"HTTP://127.0.0.1:{port}/", SETUP_TOKEN, fake_ls.tasks[2])
    assert fake_ls.hits("GET", r"/img2\.png$")[0][2] == f"Token {SETUP_TOKEN}"


# ------------------------------------------------------------------------------------ local files
def test_local_files_cannot_escape_the_document_root(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(png_bytes(1))
    (tmp_path / "secret.png").write_bytes(png_bytes(2))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    ls = "http://127.0.0.1:9"  # never contacted: local-files are read from the mounted root
    fetch = _fetcher(ls, tmp_path, root=root).fetch
    assert fetch("/data/local-files/?d=images/ok.png").width == 80
    assert fetch("/data/local-files/?d=images/../images/ok.png").width == 80
    assert fetch(f"{ls}/data/local-files/?d=images%2Fok.png").width == 80
    for d in ("../secret.png", str(tmp_path / "secret.png"), "images/%2e%2e/%2e%2e/secret.png",
              "images/..%2F..%2Fsecret.png", "link.png", "images/../../root/../secret.png"):
        with pytest.raises(ImageError, match="leaves the local files root"):
            fetch(f"/data/local-files/?d={d}")
    with pytest.raises(ImageError, match="without the"):
        fetch("/data/local-files/?x=1")


# ------------------------------------------------------------------------------------ 413
def test_huge_payloads_are_refused_with_413(make_app, fake_jobs):
    app = make_app(max_request_mb=1)
    mark_bank_filled(PID)
    big = b'{"tasks": [' + b'{"id": 1, "data": {"image": "x"}},' * 40_000 + b'{"id": 2}]}'
    assert len(big) > 2**20
    with serving(app) as url:
        for path in ("/predict", "/webhook", "/setup"):
            resp = requests.post(url + path, data=big, headers={"Content-Type": "application/json"}, timeout=10)
            assert resp.status_code == 413 and "MAX_REQUEST_MB" in resp.json()["error"], path
        # no Content-Length (chunked): refused once the limit is read, not buffered to the end
        resp = requests.post(url + "/predict", data=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                             headers={"Content-Type": "application/json"}, timeout=10)
        assert resp.status_code == 413
        ok = requests.post(url + "/predict", json={"project": "1", "label_config": CONFIG_XML,
                                                   "tasks": [{"id": 1, "data": {}}]}, timeout=10)
        assert ok.status_code == 200
