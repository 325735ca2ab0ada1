"""The product as a user meets it: a real Label Studio 1.23.2 (strict prediction validation on), our
web process and a real RQ worker on the real Redis, small random-weight models.

Label Studio answers 200 to "Retrieve predictions" even when nothing was stored, so every check
reads the stored predictions back with GET /api/predictions?task=...
"""
from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image, ImageDraw

from tests.backend.fixtures import CONFIG_XML as CONFIG

from .ls_harness import LEGACY_TOKEN, Backend, LabelStudio, LSClient, http_ok, wait_for

pytestmark = pytest.mark.timeout(420)

CONTROL_TYPES = {"bbox": "rectanglelabels", "poly": "polygonlabels", "brush": "brushlabels"}
LABELS = {"Cat", "Dog"}
EXIF_ORIENTATION = 0x0112
VERSION_TIMEOUT = 120.0      # one bank job (a few tiny-model forward passes) per webhook
TRAIN_TIMEOUT = 180.0        # rebuild + pre-annotate every unlabelled task


# --------------------------------------------------------------------------------------- images
@dataclass
class Picture:
    """A generated image: what LS shows (after EXIF) and where its two objects are (pixels)."""

    name: str
    width: int               # displayed (EXIF-transposed) size
    height: int
    cat: tuple[int, int, int, int]   # ellipse bbox x0, y0, x1, y1
    dog: tuple[int, int, int, int]   # rectangle x0, y0, x1, y1

    def cat_mask(self) -> np.ndarray:
        """0/255 mask of the cat ellipse, as LS brush masks are encoded."""
        im = Image.new("L", (self.width, self.height), 0)
        ImageDraw.Draw(im).ellipse(self.cat, fill=255)
        return np.asarray(im, dtype=np.uint8)

    def pct(self, x: float, y: float) -> list[float]:
        return [100.0 * x / self.width, 100.0 * y / self.height]


def make_picture(folder: Path, name: str, width: int, height: int, seed: int,
                 exif_orientation: int | None = None) -> Picture:
    """Noise background, a red ellipse ("Cat") and a blue rectangle ("Dog"). With an EXIF
    orientation the pixels are stored rotated, so the displayed size is (width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 170, size=(height, width, 3), dtype=np.uint8)
    im = Image.fromarray(pixels, "RGB")
    cat = (width // 8, height // 6, width // 8 + width * 3 // 8, height // 6 + height // 2)
    dog = (width * 5 // 8, height // 2, width * 5 // 8 + width // 4, height // 2 + height // 3)
    draw = ImageDraw.Draw(im)
    draw.ellipse(cat, fill=(210, 40, 40))
    draw.rectangle(dog, fill=(40, 60, 200))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if exif_orientation == 6:  # viewer rotates 90° clockwise: store it rotated counter-clockwise
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())
    else:
        im.save(path)
    return Picture(name, width, height, cat, dog)


# -------------------------------------------------------------------------- annotation results
def brush_region(p: Picture, label: str, rid: str) -> dict:
    return {"id": rid, "from_name": "brush", "to_name": "image", "type": "brushlabels",
            "original_width": p.width, "original_height": p.height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(p.cat_mask()), "brushlabels": [label]}}


def rect_region(p: Picture, box: tuple[int, int, int, int], label: str, rid: str) -> dict:
    x, y = p.pct(box[0], box[1])
    w, h = p.pct(box[2] - box[0], box[3] - box[1])
    return {"id": rid, "from_name": "bbox", "to_name": "image", "type": "rectanglelabels",
            "original_width": p.width, "original_height": p.height, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def polygon_region(p: Picture, box: tuple[int, int, int, int], label: str, rid: str) -> dict:
    """An octagon inscribed in `box`."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    points = [p.pct(cx + rx * math.cos(a), cy + ry * math.sin(a))
              for a in np.linspace(0, 2 * math.pi, 8, endpoint=False)]
    return {"id": rid, "from_name": "poly", "to_name": "image", "type": "polygonlabels",
            "original_width": p.width, "original_height": p.height, "image_rotation": 0,
            "value": {"points": points, "closed": True, "polygonlabels": [label]}}


# ---------------------------------------------------------------------------- checking results
def check_prediction(pred: dict, picture: Picture, version: str) -> set[str]:
    """Assert one stored prediction fits the label config and the image; return its region types."""
    assert pred["model_version"] == version
    seen = set()
    for r in pred["result"]:
        kind = CONTROL_TYPES.get(r["from_name"])
        assert kind is not None and r["type"] == kind and r["to_name"] == "image", r
        labels = r["value"][kind]
        assert len(labels) == 1 and labels[0] in LABELS, r
        assert (r["original_width"], r["original_height"]) == (picture.width, picture.height), r
        value = r["value"]
        if kind == "rectanglelabels":
            assert value["width"] > 0 and value["height"] > 0, r
            for lo, extent in ((value["x"], value["width"]), (value["y"], value["height"])):
                assert 0 <= lo and lo + extent <= 100 + 1e-6, r
        elif kind == "polygonlabels":
            assert len(value["points"]) >= 3, r
            assert all(0 <= c <= 100 for point in value["points"] for c in point), r
        else:
            assert value["format"] == "rle"
            flat = decode_rle(value["rle"])
            assert flat.size == picture.width * picture.height * 4, (flat.size, picture)
            assert flat.max() > 0, "empty brush mask"
        seen.add(kind)
    return seen


# --------------------------------------------------------------------------------- LS helpers
@dataclass
class Project:
    client: LSClient
    id: int
    tasks: dict[str, int]            # picture name -> task id
    pictures: dict[str, Picture]
    ml_id: int | None = None

    def ml_version(self) -> str:
        """GET /api/ml/<id> makes LS call our /health + /setup and store the model_version."""
        return self.client.call("GET", f"/api/ml/{self.ml_id}")["model_version"]

    def predictions(self, name: str) -> list[dict]:
        return self.client.call("GET", "/api/predictions", params={"task": self.tasks[name]})

    def annotate(self, name: str, result: list[dict]) -> int:
        return self.client.call("POST", f"/api/tasks/{self.tasks[name]}/annotations",
                                json={"result": result, "lead_time": 1.0})["id"]

    def dm_action(self, action: str) -> dict:
        """A Data Manager action on every task of the project (as the UI's "select all")."""
        return self.client.call("POST", "/api/dm/actions", params={"id": action, "project": self.id},
                                json={"selectedItems": {"all": True, "excluded": []}})


def create_project(ls: LabelStudio, client: LSClient, uploaded: list[Picture], local: list[Picture],
                   synced: list[Picture], config: str = CONFIG) -> Project:
    """Images arrive three ways: multipart upload (/data/upload/...), JSON import of
    /data/local-files/?d=... URLs, and a local-files storage sync (absolute URLs)."""
    pid = client.call("POST", "/api/projects", json={"title": "ntt-e2e", "label_config": config})["id"]
    if uploaded:
        files = {f"file{i}": (p.name, (ls.work_dir / "upload" / p.name).read_bytes()) for i, p in enumerate(uploaded)}
        client.call("POST", f"/api/projects/{pid}/import", files=files)  # one field name per file
    if local:
        client.call("POST", "/api/storages/localfiles", json={
            "project": pid, "title": "json-import", "path": str(ls.files_root / "images"), "use_blob_urls": True})
        client.call("POST", f"/api/projects/{pid}/import",
                    json=[{"data": {"image": f"/data/local-files/?d=images/{p.name}"}} for p in local])
    if synced:
        storage = client.call("POST", "/api/storages/localfiles", json={
            "project": pid, "title": "synced", "path": str(ls.files_root / "synced"), "use_blob_urls": True})
        client.call("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    tasks = client.call("GET", "/api/tasks", params={"project": pid, "page_size": 100})["tasks"]
    pictures = {p.name: p for p in (*uploaded, *local, *synced)}
    url_forms = {**{p.name: "/data/upload/" for p in uploaded}, **{p.name: "/data/local-files/?d=" for p in local},
                 **{p.name: f"{ls.url}/data/local-files/?d=" for p in synced}}
    by_name = {}
    for t in tasks:
        url = t["data"]["image"]
        (name,) = [n for n in pictures if url.endswith(n)]
        assert url.startswith(url_forms[name]), (name, url)
        by_name[name] = t["id"]
    assert sorted(by_name) == sorted(pictures), [t["data"] for t in tasks]
    return Project(client, pid, by_name, pictures)


def ml_connection(project: Project, backend: Backend, basic_auth: tuple[str, str] | None = None) -> dict:
    """The body of POST /api/ml (the model connection form), with Basic auth when given."""
    body = {"url": backend.url, "project": project.id, "title": "ntt", "is_interactive": False}
    if basic_auth:
        body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
    return body


def connect(project: Project, backend: Backend, basic_auth: tuple[str, str] | None = None) -> dict:
    """Connect the model; returns the webhook to <backend>/webhook that LS created with it."""
    ml = project.client.call("POST", "/api/ml", json=ml_connection(project, backend, basic_auth))
    assert ml["state"] == "CO", ml  # Connected: /health and /setup answered
    project.ml_id = ml["id"]
    hooks = project.client.call("GET", "/api/webhooks", params={"project": project.id})
    ours = [h for h in hooks if h["url"] == backend.url + "/webhook" and h["is_active"]]
    assert len(ours) == 1, hooks
    return ours[0]


def settled_version(project: Project, backend: Backend, previous: set[str]) -> str:
    """Wait until the model version is new (webhook reached us, a worker updated the bank) and the
    backend has no job left for this project; return it."""
    def new_and_idle() -> str | None:
        version = project.ml_version()
        jobs = [j for j in backend.jobs() if j["meta"].get("project") == project.id]
        failed = [(j["func"], j["meta"].get("event"), j["error"]) for j in jobs if j["status"] == "failed"]
        assert not failed, f"backend jobs failed: {failed}"
        busy = [j for j in jobs if not is_done(j)]
        return version if version not in previous and not busy else None
    return wait_for(new_and_idle, VERSION_TIMEOUT, f"a model version other than {sorted(previous)}",
                    interval=0.5, alive=backend.check_alive)


def is_done(job: dict) -> bool:
    return job["status"] in ("finished", "failed", "stopped", "canceled")


def assert_no_failed_jobs(backend: Backend) -> None:
    failed = [(j["func"], j["error"]) for j in backend.jobs() if j["status"] == "failed"]
    assert not failed, failed


# ----------------------------------------------------------------------------------------- tests
def test_legacy_token_full_flow(label_studio: LabelStudio, start_backend: Callable[..., Backend]) -> None:
    ls = label_studio
    client = ls.client()
    up = [make_picture(ls.work_dir / "upload", "up-a.png", 96, 72, 1),
          make_picture(ls.work_dir / "upload", "up-exif.jpg", 64, 80, 2, exif_orientation=6),
          make_picture(ls.work_dir / "upload", "up-c.png", 88, 66, 3)]
    loc = [make_picture(ls.files_root / "images", "loc-a.png", 80, 60, 4),
           make_picture(ls.files_root / "images", "loc-b.png", 72, 54, 5)]
    syn = [make_picture(ls.files_root / "synced", "syn-a.png", 90, 60, 6)]
    project = create_project(ls, client, up, loc, syn)
    assert Image.open(ls.work_dir / "upload" / "up-exif.jpg").size == (80, 64)  # stored rotated

    # Strict validation is really on: a label outside the config is refused.
    bad = rect_region(up[1], up[1].dog, "Zebra", "bad")
    r = client.request("POST", "/api/predictions", json={"task": project.tasks["up-exif.jpg"],
                                                         "result": [bad], "model_version": "bad"})
    assert r.status_code == 400, (r.status_code, r.text)

    backend = start_backend(ls)
    connect(project, backend)
    versions = [project.ml_version()]

    # Reference annotations, each through the webhook -> a bank job on the worker -> new version.
    p = project.pictures
    project.annotate("up-a.png", [brush_region(p["up-a.png"], "Cat", "a1"),
                                  rect_region(p["up-a.png"], p["up-a.png"].dog, "Dog", "a2")])
    versions.append(settled_version(project, backend, set(versions)))
    ann_b = project.annotate("loc-a.png", [polygon_region(p["loc-a.png"], p["loc-a.png"].cat, "Cat", "b1")])
    versions.append(settled_version(project, backend, set(versions)))
    ann_c = project.annotate("syn-a.png", [rect_region(p["syn-a.png"], p["syn-a.png"].dog, "Dog", "c1"),
                                           polygon_region(p["syn-a.png"], p["syn-a.png"].dog, "Dog", "c2")])
    versions.append(settled_version(project, backend, set(versions)))
    assert backend.metrics()["webhooks ANNOTATION_CREATED"] == 3  # LS's automatic webhook reached us

    # "Retrieve predictions" for every task; read back what LS stored for the unlabelled ones.
    out = project.dm_action("retrieve_tasks_predictions")
    assert out["processed_items"] == len(project.tasks), out
    unlabelled = ["up-exif.jpg", "up-c.png", "loc-b.png"]
    kinds: set[str] = set()
    for name in unlabelled:
        preds = project.predictions(name)
        assert len(preds) == 1, (name, preds)
        kinds |= check_prediction(preds[0], p[name], versions[-1])
    assert kinds == set(CONTROL_TYPES.values()), kinds  # every control got regions somewhere
    assert_no_failed_jobs(backend)

    # Editing and deleting references change the bank, hence the version; the workers then bring
    # the stored predictions up to date without another "Retrieve predictions".
    client.call("PATCH", f"/api/annotations/{ann_b}",
                json={"result": [polygon_region(p["loc-a.png"], p["loc-a.png"].dog, "Dog", "b1")]})
    versions.append(settled_version(project, backend, set(versions)))
    client.call("DELETE", f"/api/annotations/{ann_c}")
    versions.append(settled_version(project, backend, set(versions)))
    for name in unlabelled:
        preds = project.predictions(name)
        assert [q["model_version"] for q in preds] == [versions[-1]], (name, preds)
        check_prediction(preds[0], p[name], versions[-1])

    # "Start training" with no prediction left: the workers rebuild the bank and post one to every
    # unlabelled task (the task whose annotation was deleted included).
    project.dm_action("delete_tasks_predictions")
    assert all(project.predictions(name) == [] for name in project.tasks)
    unlabelled.append("syn-a.png")
    client.call("POST", f"/api/ml/{project.ml_id}/train")

    def all_posted() -> str | None:
        version = project.ml_version()
        done = all(any(q["model_version"] == version for q in project.predictions(name)) for name in unlabelled)
        return version if done else None
    final = wait_for(all_posted, TRAIN_TIMEOUT, "worker-posted predictions on every unlabelled task",
                     interval=1.0, alive=backend.check_alive)
    assert final == versions[-1]  # same references as after the delete -> same bank -> same version
    for name in unlabelled:
        preds = project.predictions(name)
        assert len(preds) == 1, (name, preds)
        check_prediction(preds[0], p[name], final)
    assert project.predictions("up-a.png") == []  # annotated tasks are not pre-annotated
    assert_no_failed_jobs(backend)


def test_embedded_default_survives_a_restart_and_owns_its_state(label_studio: LabelStudio,
                                                                  start_backend: Callable[..., Backend]) -> None:
    """The README's first command: gunicorn alone, no Redis, jobs on the embedded worker thread.
    Banks, task registry and queue are SQLite files under MODEL_DIR: a restart keeps the model
    version and the predictions it refreshes; a second process on the same MODEL_DIR is refused."""
    ls = label_studio
    pics = [make_picture(ls.work_dir / "upload", f"emb-{i}.png", 80, 60, 20 + i) for i in range(3)]
    project = create_project(ls, ls.client(), pics, [], [])
    backend = start_backend(ls, embedded=True)
    assert requests.get(f"{backend.url}/health", timeout=5).json()["queue"]["mode"] == "embedded"
    connect(project, backend)
    p = project.pictures
    project.annotate("emb-0.png", [brush_region(p["emb-0.png"], "Cat", "a1"),
                                   rect_region(p["emb-0.png"], p["emb-0.png"].dog, "Dog", "a2")])
    before = settled_version(project, backend, {project.ml_version()})
    project.dm_action("retrieve_tasks_predictions")
    for name in ("emb-1.png", "emb-2.png"):
        (pred,) = project.predictions(name)
        check_prediction(pred, p[name], before)

    with pytest.raises(RuntimeError, match="is in use by another process"):
        start_backend(ls, embedded=True, work=backend.work_dir)  # same MODEL_DIR, other port: refused at start

    backend.stop()
    backend = start_backend(ls, embedded=True, work=backend.work_dir, port=backend.port)  # where LS knows it
    assert project.ml_version() == before  # the bank came back from state/store.sqlite3
    project.annotate("emb-1.png", [polygon_region(p["emb-1.png"], p["emb-1.png"].dog, "Dog", "b1")])
    after = settled_version(project, backend, {before})
    (pred,) = project.predictions("emb-2.png")  # refreshed from the registry kept across the restart
    check_prediction(pred, p["emb-2.png"], after)
    assert_no_failed_jobs(backend)


def test_personal_access_token(label_studio_factory: Callable[[], LabelStudio],
                               start_backend: Callable[..., Backend]) -> None:
    """The backend authenticates with a PAT (refresh -> Bearer) while legacy tokens are disabled
    for the organization, so the legacy `access_token` LS sends in /setup is useless."""
    ls = label_studio_factory()
    admin = ls.client()
    pat = admin.create_personal_access_token()
    admin.set_token_settings(legacy=False)
    assert ls.client(LEGACY_TOKEN).request("GET", "/api/projects").status_code == 401
    client = ls.client(pat)

    up = [make_picture(ls.work_dir / "upload", "pat-a.png", 96, 72, 11),
          make_picture(ls.work_dir / "upload", "pat-b.png", 80, 60, 12)]
    loc = [make_picture(ls.files_root / "images", "pat-c.png", 72, 54, 13)]
    project = create_project(ls, client, up, loc, [])
    backend = start_backend(ls, api_key=pat)
    connect(project, backend)
    v0 = project.ml_version()

    p = project.pictures
    project.annotate("pat-a.png", [brush_region(p["pat-a.png"], "Cat", "a1"),
                                   rect_region(p["pat-a.png"], p["pat-a.png"].dog, "Dog", "a2")])
    version = settled_version(project, backend, {v0})  # the reference image was downloaded with the PAT

    project.dm_action("retrieve_tasks_predictions")
    kinds: set[str] = set()
    for name in ("pat-b.png", "pat-c.png"):
        preds = project.predictions(name)
        assert len(preds) == 1, (name, preds)  # a failed download yields no stored prediction
        kinds |= check_prediction(preds[0], p[name], version)  # sizes read from the downloaded images
    assert kinds, "no region at all: the image sizes were never checked"
    assert_no_failed_jobs(backend)


def test_basic_auth(label_studio: LabelStudio, start_backend: Callable[..., Backend]) -> None:
    """BASIC_AUTH_USER/PASS on the backend. Label Studio calls /health, /setup and /predict with the
    credentials of the model connection, but creates its <ml url>/webhook webhook without them: its
    events are refused (401) until the webhook's headers carry them, as the README says."""
    ls = label_studio
    client = ls.client()
    user, password = "ntt-e2e", "basic-auth-pass-e2e"
    up = [make_picture(ls.work_dir / "upload", f"auth-{c}.png", 80, 60, 30 + n) for n, c in enumerate("abc")]
    project = create_project(ls, client, up, [], [])
    backend = start_backend(ls, basic_auth=(user, password))
    assert not http_ok(f"{backend.url}/health") and http_ok(f"{backend.url}/health", (user, password))

    r = client.request("POST", "/api/ml", json=ml_connection(project, backend))
    assert r.status_code == 400 and "authentication" in r.text, (r.status_code, r.text)  # LS saw our 401
    hook = connect(project, backend, (user, password))
    v0 = project.ml_version()
    assert v0.startswith("ntt-")

    # LS's own webhook carries no credentials: the annotation's event is refused
    p = project.pictures
    refused = backend.metrics().get("auth_failures", 0)
    project.annotate("auth-a.png", [rect_region(p["auth-a.png"], p["auth-a.png"].dog, "Dog", "a1")])
    wait_for(lambda: backend.metrics().get("auth_failures", 0) > refused, VERSION_TIMEOUT,
             "Label Studio's webhook to be refused (401)")
    assert "webhooks ANNOTATION_CREATED" not in backend.metrics() and project.ml_version() == v0

    # the README's step: the webhook sends the same credentials in its headers
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    client.call("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": {"Authorization": f"Basic {token}"}})
    project.annotate("auth-b.png", [brush_region(p["auth-b.png"], "Cat", "b1"),
                                    rect_region(p["auth-b.png"], p["auth-b.png"].dog, "Dog", "b2")])
    version = settled_version(project, backend, {v0})
    assert backend.metrics()["webhooks ANNOTATION_CREATED"] == 1

    out = project.dm_action("retrieve_tasks_predictions")  # /predict with the credentials
    assert out["processed_items"] == len(project.tasks), out
    (pred,) = project.predictions("auth-c.png")
    check_prediction(pred, p["auth-c.png"], version)


def finished_job(backend: Backend, job_id: str) -> dict:
    """One backend job (GET /jobs?id=, result included) once it is done; it must have finished."""
    def done() -> dict | None:
        r = requests.get(f"{backend.url}/jobs", params={"id": job_id}, timeout=5)
        r.raise_for_status()
        return r.json() if is_done(r.json()) else None
    job = wait_for(done, VERSION_TIMEOUT, f"backend job {job_id}", interval=0.5, alive=backend.check_alive)
    assert job["status"] == "finished", job
    return job


def post_webhook(backend: Backend, payload: dict) -> dict:
    """POST /webhook as anyone who reaches the backend can; returns the finished bank job."""
    r = requests.post(f"{backend.url}/webhook", json=payload, timeout=5)
    assert r.status_code == 201, (r.status_code, r.text)
    return finished_job(backend, r.json()["job"])


def test_webhooks_are_hints_and_refreshes_leave_one_current_prediction(
        label_studio: LabelStudio, start_backend: Callable[..., Backend]) -> None:
    """Predictions retrieved before the first annotation are refreshed like any other; after every
    bank change (deletions included) each task we predicted holds exactly one prediction of ours,
    of the current version, so "Retrieve predictions" adds none; forged webhooks change nothing;
    deleted tasks are forgotten; LS's model versions list (GET /versions without a project) works."""
    ls = label_studio
    client = ls.client()
    up = [make_picture(ls.work_dir / "upload", f"hint-{k}.png", 80, 60, 20 + k) for k in range(4)]
    project = create_project(ls, client, up, [], [])
    backend = start_backend(ls)
    connect(project, backend)
    p, names = project.pictures, sorted(project.tasks)

    def ours_everywhere(version: str, tasks: list[str]) -> None:
        for name in tasks:
            assert [q["model_version"] for q in project.predictions(name)] == [version], name

    # "Retrieve predictions" before any annotation: one empty prediction per task
    v0 = project.ml_version()
    project.dm_action("retrieve_tasks_predictions")
    ours_everywhere(v0, names)

    # a made-up annotation (LS never had it) on a real task changes nothing
    task = client.call("GET", f"/api/tasks/{project.tasks[names[3]]}")
    fake = {"id": 987654, "task": task["id"], "project": project.id, "was_cancelled": False,
            "result": [rect_region(p[names[3]], p[names[3]].dog, "Dog", "f1")]}
    job = post_webhook(backend, {"action": "ANNOTATION_CREATED", "annotation": fake,
                                 "task": {"id": task["id"], "data": task["data"]},
                                 "project": {"id": project.id, "label_config": CONFIG}})
    assert job["result"]["status"] == "annotation not in Label Studio", job
    assert project.ml_version() == v0

    # the first reference: every task retrieved before it is brought to the new version
    ann_a = project.annotate(names[0], [brush_region(p[names[0]], "Cat", "a1"),
                                        rect_region(p[names[0]], p[names[0]].dog, "Dog", "a2")])
    v1 = settled_version(project, backend, {v0})
    ours_everywhere(v1, names)
    project.dm_action("retrieve_tasks_predictions")
    ours_everywhere(v1, names)

    # a forged deletion of a real annotation removes nothing
    job = post_webhook(backend, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": ann_a}],
                                 "project": {"id": project.id}})
    assert job["result"]["removed"] == 0 and job["result"]["changed"] is False, job
    assert project.ml_version() == v1

    # a second reference, then its deletion: results that did not change get the version too
    ann_b = project.annotate(names[1], [polygon_region(p[names[1]], p[names[1]].cat, "Cat", "b1")])
    v2 = settled_version(project, backend, {v1})
    ours_everywhere(v2, names)
    client.call("DELETE", f"/api/annotations/{ann_b}")
    v3 = settled_version(project, backend, {v2})
    ours_everywhere(v3, names)
    project.dm_action("retrieve_tasks_predictions")
    ours_everywhere(v3, names)

    # a deleted task is forgotten: the next refresh re-scores the others only
    deleted = project.tasks[names[3]]
    before = len([j for j in backend.jobs() if j["meta"].get("event") == "TASKS_DELETED"])
    client.call("POST", "/api/dm/actions", params={"id": "delete_tasks", "project": project.id},
                json={"selectedItems": {"all": False, "included": [deleted]}})
    jobs = wait_for(lambda: [j for j in backend.jobs() if j["meta"].get("event") == "TASKS_DELETED"][before:],
                    VERSION_TIMEOUT, "the TASKS_DELETED webhook", interval=0.5, alive=backend.check_alive)
    assert finished_job(backend, jobs[0]["id"])["result"]["forgotten"] == 1
    project.annotate(names[2], [rect_region(p[names[2]], p[names[2]].dog, "Dog", "c1")])
    v4 = settled_version(project, backend, {v3})
    ours_everywhere(v4, names[:3])
    refreshes = [finished_job(backend, j["id"]) for j in backend.jobs()
                 if j["func"] == "backend.jobs.refresh.refresh_project" and j["meta"].get("project") == project.id]
    latest = max(refreshes, key=lambda j: j["ended_at"])["result"]
    assert (latest["model_version"], latest["tasks"], latest["failed"]) == (v4, 3, 0), latest

    # Settings -> Model -> versions: LS asks GET /versions without naming the project
    assert v4 in client.call("GET", f"/api/ml/{project.ml_id}/versions")["versions"]
    assert_no_failed_jobs(backend)


SMART_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Cat"/><Label value="Dog"/></KeyPointLabels>
  <BrushLabels name="brush" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
</View>"""


def smart_keypoint(p: Picture, x: float, y: float, label: str, positive: bool = True) -> dict:
    """A smart keypoint as the editor serialises it (KeyPointRegion.serialize of a dynamic region)."""
    px, py = p.pct(x, y)
    return {"id": f"kp{int(x)}-{int(y)}", "from_name": "click", "to_name": "image", "type": "keypointlabels",
            "original_width": p.width, "original_height": p.height, "image_rotation": 0, "origin": "manual",
            "is_positive": positive, "value": {"x": px, "y": py, "width": 0.6, "keypointlabels": [label],
                                               "labels": [label]}}


def test_click_to_segment_through_label_studio(label_studio: LabelStudio,
                                               start_backend: Callable[..., Backend]) -> None:
    """Interactive pre-annotations on: the editor's click, sent the way the editor sends it (POST
    /api/ml/<id>/interactive-annotating {task, context: {result: [the new smart regions]}}), goes
    through Label Studio to our /predict and comes back as a brush region of the displayed (EXIF)
    image that Label Studio's strict validation accepts; submitted, it becomes a reference."""
    ls = label_studio
    client = ls.client()
    pic = make_picture(ls.work_dir / "upload", "click-exif.jpg", 64, 80, 21, exif_orientation=6)
    project = create_project(ls, client, [pic], [], [], config=SMART_CONFIG)
    backend = start_backend(ls)
    connect(project, backend)
    client.call("PATCH", f"/api/ml/{project.ml_id}", json={**ml_connection(project, backend), "is_interactive": True})
    v0 = project.ml_version()
    task = project.tasks[pic.name]

    def click(*regions: dict) -> dict:
        answer = client.call("POST", f"/api/ml/{project.ml_id}/interactive-annotating",
                             json={"task": task, "context": {"result": list(regions)}})
        assert "errors" not in answer, answer
        return answer["data"]

    cx, cy = (pic.cat[0] + pic.cat[2]) / 2, (pic.cat[1] + pic.cat[3]) / 2
    item = click(smart_keypoint(pic, cx, cy, "Cat"))
    (region,) = item["result"]
    assert (region["from_name"], region["to_name"], region["type"]) == ("brush", "image", "brushlabels")
    assert region["value"]["brushlabels"] == ["Cat"] and item["model_version"] == v0
    assert (region["original_width"], region["original_height"]) == (pic.width, pic.height)
    flat = decode_rle(region["value"]["rle"])
    assert flat.size == pic.width * pic.height * 4 and flat.max() > 0
    item = click(smart_keypoint(pic, cx, cy, "Cat"), smart_keypoint(pic, pic.dog[0] + 2, pic.dog[1] + 2, "Cat",
                                                                     positive=False))
    assert [r["type"] for r in item["result"]] == ["brushlabels"]

    # Label Studio's strict validation accepts the region, as a prediction and as the annotation
    r = client.request("POST", "/api/predictions", json={"task": task, "result": [region],
                                                         "model_version": item["model_version"]})
    assert r.status_code == 201, (r.status_code, r.text)
    bad = {**region, "value": {**region["value"], "brushlabels": ["Zebra"]}}
    r = client.request("POST", "/api/predictions", json={"task": task, "result": [bad], "model_version": "x"})
    assert r.status_code == 400, (r.status_code, r.text)  # validation is really on
    project.annotate(pic.name, [region])
    settled_version(project, backend, {v0})  # the accepted mask is a reference: a new bank version
    clicks = [j for j in backend.jobs() if j["func"] == "backend.jobs.interactive.segment_task"]
    assert len(clicks) == 2 and all(j["status"] == "finished" for j in clicks), clicks
    assert backend.metrics()["clicks"] == 2


def test_evaluation_report_and_negatives_from_a_correction(
        label_studio: LabelStudio, start_backend: Callable[..., Backend], tmp_path: Path) -> None:
    """Issue 13: after a few annotations GET /evaluation has per-class figures for the project's
    labels, GET /report renders in headless chromium with no console error, and an annotation that
    removes one detection of our prediction (all its regions) stores negatives in the bank."""
    from tests.backend.quality.browser import load_page

    ls = label_studio
    client = ls.client()
    up = [make_picture(ls.work_dir / "upload", f"eval-{k}.png", 80, 60, 40 + k) for k in range(4)]
    project = create_project(ls, client, up, [], [])
    backend = start_backend(ls)
    connect(project, backend)
    p, names = project.pictures, sorted(project.tasks)
    version = project.ml_version()
    for name in names[:3]:
        project.annotate(name, [brush_region(p[name], "Cat", "c"), rect_region(p[name], p[name].dog, "Dog", "d")])
        version = settled_version(project, backend, {version})

    # our prediction on the last task, corrected: one detection (its region on every control) removed
    project.dm_action("retrieve_tasks_predictions")
    ours = [q for q in project.predictions(names[3]) if q["model_version"].startswith("ntt-")]
    assert len(ours) == 1 and ours[0]["result"], ours
    top = max(r["score"] for r in ours[0]["result"])
    kept = [r for r in ours[0]["result"] if r["score"] != top]
    annotation_id = project.annotate(names[3], kept)
    version = settled_version(project, backend, {version})
    applied = [j for j in backend.jobs() if j["meta"].get("event") == "ANNOTATION_CREATED"
               and finished_job(backend, j["id"])["result"].get("annotation") == annotation_id]
    assert len(applied) == 1 and finished_job(backend, applied[0]["id"])["result"]["negatives"] >= 1

    r = requests.post(f"{backend.url}/evaluation", params={"project": project.id}, timeout=5)
    assert r.status_code == 202, r.text

    def evaluated() -> dict | None:
        got = requests.get(f"{backend.url}/evaluation", params={"project": project.id}, timeout=5)
        body = got.json() if got.status_code == 200 else {}
        return body if body.get("status") == "done" and body.get("annotated_tasks") == 4 else None
    result = wait_for(evaluated, VERSION_TIMEOUT, "an evaluation of the 4 annotated tasks", interval=0.5,
                      alive=backend.check_alive)
    assert set(result["classes"]) == LABELS
    for row in result["classes"].values():
        assert {"ap", "ap50", "precision", "recall", "f1", "threshold", "references"} <= set(row), row
    assert result["curve"] and result["variant_in_use"] == "ntt"   # < 5 annotated tasks: the faithful method

    page = requests.get(f"{backend.url}/report", params={"project": project.id}, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    path = tmp_path / "report.html"
    path.write_text(page.text, encoding="utf-8")
    shown = load_page(path)
    assert shown.errors == [] and shown.svgs >= 2 * len(LABELS) + 1
    assert all(i["complete"] and i["width"] > 0 for i in shown.images)
    assert_no_failed_jobs(backend)
