import logging
import socket
import threading
import time

import jwt
import pytest

from backend.errors import LabelStudioAPIError
from backend.ls.auth import LSAuth, origin
from backend.ls.ls_client import LabelStudioClient
from tests.backend.fixtures import LEGACY_TOKEN, FakeHTTPServer

JWT_KEY = "test-signing-key-with-at-least-32-bytes!!"


def make_jwt(token_type: str, ttl: float, **claims) -> str:
    return jwt.encode({"token_type": token_type, "exp": int(time.time() + ttl), **claims}, JWT_KEY)


@pytest.fixture
def server():
    s = FakeHTTPServer()
    yield s
    s.close()


@pytest.fixture
def pat(server):
    """A PAT and a refresh endpoint issuing access tokens with a settable lifetime."""
    state = {"pat": make_jwt("refresh", 3600, jti="pat"), "ttl": 300.0, "issued": []}

    def refresh(req):
        if req["body"] != {"refresh": state["pat"]}:
            return 401, {}, {"detail": "Token is invalid or expired", "code": "token_not_valid"}
        state["issued"].append(make_jwt("access", state["ttl"], n=len(state["issued"])))
        return 200, {}, {"access": state["issued"][-1]}

    server.route("/api/token/refresh/", refresh)
    return state


def client(server, auth=None, **kw):
    kw.setdefault("backoff", 0.01)
    return LabelStudioClient(server.url, auth if auth is not None else LSAuth(LEGACY_TOKEN, server.url), **kw)


# ---------------------------------------------------------------------------------------- LSAuth
def test_legacy_token_header():
    auth = LSAuth(LEGACY_TOKEN)
    assert auth.kind == "legacy" and not auth.refreshable
    assert auth.headers() == {"Authorization": f"Token {LEGACY_TOKEN}"}
    assert LEGACY_TOKEN not in repr(auth)
    assert LSAuth("my-custom-token").headers() == {"Authorization": "Token my-custom-token"}  # non-JWT = legacy
    with pytest.raises(ValueError):
        LSAuth("  ")


def test_pat_is_exchanged_for_a_bearer_access_token_and_cached(server, pat):
    auth = LSAuth(pat["pat"], server.url + "/")
    assert auth.kind == "pat" and auth.refreshable
    h1, h2 = auth.headers(), auth.headers()
    assert h1 == h2 == {"Authorization": f"Bearer {pat['issued'][0]}"}
    (req,) = server.hits("/api/token/refresh/")
    assert req["method"] == "POST" and req["body"] == {"refresh": pat["pat"]}
    assert "Authorization" not in req["headers"]
    assert pat["pat"] not in repr(auth)


def test_access_token_refreshed_30s_before_exp(server, pat):
    pat["ttl"] = 20  # expires within the 30 s margin: every call refreshes
    auth = LSAuth(pat["pat"], server.url)
    auth.headers()
    auth.headers()
    assert len(pat["issued"]) == 2


def test_forced_refresh_once_per_rejected_token(server, pat):
    auth = LSAuth(pat["pat"], server.url)
    old = auth.headers()
    new = auth.headers(rejected=old)
    assert new != old and len(pat["issued"]) == 2
    assert auth.headers(rejected=old) == new  # another thread already replaced the rejected token
    assert len(pat["issued"]) == 2


def test_concurrent_first_use_refreshes_once(server, pat):
    auth = LSAuth(pat["pat"], server.url)
    results = []
    threads = [threading.Thread(target=lambda: results.append(auth.headers())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pat["issued"]) == 1 and len({r["Authorization"] for r in results}) == 1


def test_rejected_pat_is_a_clear_error_without_the_key(server, pat):
    expired = make_jwt("refresh", -60, jti="old")
    with pytest.raises(LabelStudioAPIError) as e:
        LSAuth(expired, server.url).headers()
    assert e.value.status == 401 and "personal access token rejected" in str(e.value)
    assert expired not in str(e.value)
    with pytest.raises(LabelStudioAPIError, match="LABEL_STUDIO_URL"):
        LSAuth(pat["pat"]).headers()


# ---------------------------------------------------------------------------------------- client
def test_iter_tasks_pages_with_all_fields(server):
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}, "annotations": [], "predictions": []}
             for i in range(1, 6)]
    for page in (1, 2, 3):
        server.route(f"/api/tasks/?project=1&page={page}&page_size=2&fields=all",
                     (200, {}, {"total": 5, "total_annotations": 0, "total_predictions": 0,
                                "tasks": tasks[2 * (page - 1):2 * page]}))
    assert [t["id"] for t in client(server).iter_tasks(1, page_size=2)] == [1, 2, 3, 4, 5]
    assert len(server.requests) == 3
    assert all(r["headers"]["Authorization"] == f"Token {LEGACY_TOKEN}" for r in server.requests)


def test_iter_tasks_stops_at_404_past_the_last_page(server):
    for page in (1, 2):
        server.route(f"/api/tasks/?project=3&page={page}&page_size=2&fields=all",
                     (200, {}, {"tasks": [{"id": 2 * page - 1}, {"id": 2 * page}]}))
    server.route("/api/tasks/?project=3&page=3&page_size=2&fields=all", (404, {}, {"detail": "Invalid page."}))
    assert [t["id"] for t in client(server).iter_tasks(3, page_size=2)] == [1, 2, 3, 4]
    server.route("/api/tasks/?project=4&page=1&page_size=2&fields=all", (404, {}, {"detail": "Not found."}))
    with pytest.raises(LabelStudioAPIError) as e:
        list(client(server).iter_tasks(4, page_size=2))
    assert e.value.status == 404


def test_project_task_and_predictions_calls(server):
    server.route("/api/projects/1/", (200, {}, {"id": 1, "label_config": "<View/>"}))
    server.route("/api/tasks/2/", (200, {}, {"id": 2, "annotations": []}))
    server.route("/api/predictions/?task=2", (200, {}, [{"id": 9, "model_version": "v1"}]))
    server.route("/api/predictions/?task=3", (200, {}, {"results": [{"id": 10}]}))
    server.route("/api/predictions/", (201, {}, {"id": 11, "task": 2}))
    server.route("/api/predictions/11/", (200, {}, {"id": 11}))
    c = client(server)
    assert c.get_project(1)["label_config"] == "<View/>"
    assert c.get_task(2)["id"] == 2
    assert c.list_predictions(2) == [{"id": 9, "model_version": "v1"}]
    assert c.list_predictions(3) == [{"id": 10}]
    result = [{"id": "r1", "type": "rectanglelabels", "value": {"x": 1.5}}]
    assert c.create_prediction(2, result, 0.5, "m/refs-1") == {"id": 11, "task": 2}
    assert server.hits("/api/predictions/")[0]["body"] == {
        "task": 2, "result": result, "score": 0.5, "model_version": "m/refs-1"}
    assert c.update_prediction(11, score=0.7) == {"id": 11}
    assert c.update_prediction(11, result=[], model_version="m/refs-2") == {"id": 11}
    patches = [r["body"] for r in server.hits("/api/predictions/11/") if r["method"] == "PATCH"]
    assert patches == [{"score": 0.7}, {"result": [], "model_version": "m/refs-2"}]


def test_get_retries_5xx_and_429(server):
    server.route("/api/projects/1/", (503, {}, b""), (429, {}, b""), (200, {}, {"id": 1}))
    assert client(server, retries=3).get_project(1) == {"id": 1}
    assert len(server.requests) == 3
    server.route("/api/projects/2/", (500, {}, {"detail": "boom"}))
    with pytest.raises(LabelStudioAPIError) as e:
        client(server, retries=2).get_project(2)
    assert e.value.status == 500 and len(server.hits("/api/projects/2/")) == 3


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_post_is_not_retried_when_it_may_have_been_processed(server, status):
    server.route("/api/predictions/", (status, {}, {"detail": "boom"}))
    with pytest.raises(LabelStudioAPIError) as e:
        client(server).create_prediction(1, [], 0.0, "v")
    assert e.value.status == status and len(server.requests) == 1


def test_post_is_retried_when_label_studio_refused_it(server):
    server.route("/api/predictions/", (429, {}, b""), (503, {"Retry-After": "0"}, b""), (201, {}, {"id": 5}))
    assert client(server).create_prediction(1, [], 0.0, "v") == {"id": 5}
    assert len(server.requests) == 3


def test_unreachable_ls():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LabelStudioAPIError) as e:
        url = f"http://127.0.0.1:{port}"
        LabelStudioClient(url, LSAuth(LEGACY_TOKEN, url), retries=1, backoff=0.01).get_task(1)
    assert e.value.status is None and "not reachable" in str(e.value)
    with pytest.raises(ValueError, match="http"):
        LabelStudioClient("localhost:8080", None)


def test_401_with_pat_refreshes_once_and_retries(server, pat):
    accepted = set()
    server.route("/api/projects/1/", lambda req: (200, {}, {"id": 1})
                 if req["headers"].get("Authorization") in accepted else (401, {}, {"detail": "expired"}))
    auth = LSAuth(pat["pat"], server.url)
    first = auth.headers()["Authorization"]
    accepted.add(f"Bearer {make_jwt('access', 300, n='x')}")  # LS no longer accepts `first`
    with pytest.raises(LabelStudioAPIError) as e:
        client(server, auth).get_project(1)
    assert e.value.status == 401 and "LABEL_STUDIO_API_KEY" in str(e.value)
    assert len(pat["issued"]) == 2 and len(server.hits("/api/projects/1/")) == 2  # one forced refresh
    accepted.add(f"Bearer {pat['issued'][-1]}")
    assert auth.headers()["Authorization"] != first
    assert client(server, auth).get_project(1) == {"id": 1}


def test_legacy_401_is_not_retried_and_messages_hide_the_key(server, caplog):
    server.route("/api/projects/1/", (401, {}, {"detail": f"Invalid token {LEGACY_TOKEN}"}))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(LabelStudioAPIError) as e:
            client(server).get_project(1)
    assert e.value.status == 401 and len(server.requests) == 1
    assert "check LABEL_STUDIO_API_KEY" in str(e.value) and "Invalid token ***" in str(e.value)
    assert LEGACY_TOKEN not in str(e.value) and LEGACY_TOKEN not in caplog.text


# ---------------------------------------------------------------------------------------- origins
@pytest.mark.parametrize("url, expected", [
    ("http://LS.Example.com:8080/api/", "http://ls.example.com:8080"),
    ("HTTPS://ls.example.com/", "https://ls.example.com:443"),
    ("https://ls.example.com:443", "https://ls.example.com:443"),
    ("http://ls.example.com", "http://ls.example.com:80"),
    ("http://user:pw@ls.example.com:80/x?y=1", "http://ls.example.com:80"),
    ("http://[::1]:8080/data", "http://[::1]:8080"),
    ("http://[FE80::1]/", "http://[fe80::1]:80"),
    ("ftp://ls.example.com/", None), ("/data/upload/1/a.png", None), ("http://ls:99999/", None),
    ("http:///nohost", None), (None, None),
])
def test_origin_is_scheme_host_and_port(url, expected):
    assert origin(url) == expected


def test_a_key_goes_only_to_its_own_origin():
    auth = LSAuth(LEGACY_TOKEN, "https://ls.example.com")
    assert auth.origin == "https://ls.example.com:443"
    assert auth.sends_to("https://LS.example.com:443/data/upload/1/a.png")
    for url in ("http://ls.example.com/data/upload/1/a.png",      # plain http to an https LS
                "https://ls.example.com:8443/a.png",             # another port of the same host
                "https://evil.example.com/a.png", "/data/upload/1/a.png"):
        assert not auth.sends_to(url), url
    assert not LSAuth(LEGACY_TOKEN).sends_to("http://ls.example.com/")  # a key made without a URL goes nowhere
    with pytest.raises(ValueError, match="belongs to https://ls.example.com:443"):
        LabelStudioClient("http://ls.example.com", auth)
    with pytest.raises(ValueError, match="no URL"):
        LabelStudioClient("http://ls.example.com", LSAuth(LEGACY_TOKEN))


def test_redirects_leaving_the_origin_drop_the_key(server):
    other = FakeHTTPServer()  # same host (127.0.0.1), another port: another origin
    try:
        server.route("/api/projects/1/", (302, {"Location": f"{other.url}/api/projects/1/"}, b""))
        other.route("/api/projects/1/", (200, {}, {"id": 1}))
        assert client(server).get_project(1) == {"id": 1}
        assert server.requests[0]["headers"]["Authorization"] == f"Token {LEGACY_TOKEN}"
        assert "Authorization" not in other.requests[0]["headers"]
    finally:
        other.close()
    # requests alone keeps the header on an http -> https upgrade of the same host: a new origin
    session = client(server)._session
    assert session.should_strip_auth("http://ls.example.com/api/", "https://ls.example.com/api/")
    assert session.should_strip_auth("https://ls.example.com/api/", "https://ls.example.com:8443/api/")
    assert not session.should_strip_auth("https://ls.example.com/api/", "https://LS.example.com:443/api/x")


def test_pat_refresh_is_never_redirected(server, pat):
    other = FakeHTTPServer()
    try:
        server.route("/api/token/refresh/", (307, {"Location": f"{other.url}/api/token/refresh/"}, b""))
        with pytest.raises(LabelStudioAPIError) as e:
            LSAuth(pat["pat"], server.url).headers()
        assert e.value.status == 307 and "redirected" in str(e.value) and pat["pat"] not in str(e.value)
        assert other.requests == []  # a 307 would have carried the PAT in the body
    finally:
        other.close()


def test_get_tasks_lists_the_named_tasks_of_the_project_without_opening_them():
    """GET /api/tasks/<id>/ would make LS run /predict for a task without predictions: the tasks are
    read through the project's listing narrowed to their ids, `chunk` ids per request."""
    from bench.fake_ls import FakeLabelStudio

    with FakeLabelStudio(LEGACY_TOKEN) as ls:
        ls.add_project(1, "<View/>")
        ls.add_project(2, "<View/>")
        for tid in range(1, 6):
            ls.add_task(1 if tid != 4 else 2, tid, f"img{tid}.png", b"png",
                        annotations=[{"id": 10 + tid, "result": []}])
        client = LabelStudioClient(ls.url, LSAuth(LEGACY_TOKEN, ls.url))
        tasks = client.get_tasks(1, [5, 4, 3, 2, 99], chunk=2)   # 4: another project's; 99: none
        assert sorted(t["id"] for t in tasks) == [2, 3, 5]
        assert all(t["annotations"][0]["id"] == 10 + t["id"] for t in tasks)
        assert client.get_tasks(1, []) == []
        assert client.get_annotation(13)["task"] == 3
        with pytest.raises(LabelStudioAPIError) as err:
            client.get_annotation(77)
        assert err.value.status == 404
