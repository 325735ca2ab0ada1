"""Interactive segmentation through the web process: POST /predict with a smart tool's `context`,
as Label Studio 1.23 forwards an editor click, answered by the real small engine (random weights)
on the embedded worker, with images served by a fake Label Studio.
"""
from __future__ import annotations

import copy
import io
import os
import threading
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend import runtime
from backend import jobs
from backend import queueing
from backend.web.app import create_app
from backend.settings import Settings
from bench.fake_ls import FakeLabelStudio
from model.engine import Engine, EngineConfig
from model.options import MethodOptions
from tests.backend.fixtures import LEGACY_TOKEN as TOKEN
from tests.backend.test_jobs import FakeLS
from tests.helpers import png_bytes

PID = 7
SMART_XML = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/><Label value="Dog"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Cat"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
</View>"""
POLYGON_XML = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/></KeyPointLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>
</View>"""
DISPLAYED = (64, 48)  # W, H of the EXIF-rotated test image as LS shows it


def exif_jpeg(size: tuple[int, int] = DISPLAYED) -> bytes:
    """A JPEG stored rotated, with EXIF orientation 6: viewers show it `size` (W, H)."""
    shown = Image.open(io.BytesIO(png_bytes(3, size))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    shown.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def keypoint(x: float, y: float, positive: bool = True, label: str = "Cat") -> dict:
    """A smart keypoint as the editor serialises it (KeyPointRegion.serialize, dynamic)."""
    w, h = DISPLAYED
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label], "labels": [label]},
            "is_positive": positive, "id": uuid.uuid4().hex[:10], "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}


def body(task: dict, xml: str, *regions: dict) -> dict:
    """POST /predict as LS's interactive_annotating sends it: one task, params.context.result."""
    return {"tasks": [{**task, "drafts": [], "annotations": [], "predictions": []}],
            "project": f"{PID}.1795705944", "label_config": xml,
            "params": {"login": None, "password": None, "context": {"result": list(regions)}}}


class Spy:
    """Counts SAM2 image-encoder passes and records the prompt labels given to the prompt encoder."""

    def __init__(self, engine: Engine) -> None:
        self.encodes = 0
        self.labels: list[list[int]] = []
        self.coords: list[np.ndarray] = []
        self._hooks = [engine.sam.image_encoder.register_forward_hook(self._encoded),
                       engine.sam.sam_prompt_encoder.register_forward_pre_hook(self._prompted, with_kwargs=True)]

    def _encoded(self, *_) -> None:
        self.encodes += 1

    def _prompted(self, _module, _args, kwargs) -> None:
        coords, labels = kwargs["points"]
        self.coords.append(coords[0].cpu().numpy())
        self.labels.append(labels[0].tolist())

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return Engine(EngineConfig(sam_model="sam2.1-t", dino_model="dinov2-s", random_weights=True, device="cpu",
                               options=MethodOptions(sam_image_size=256, dino_image_size=112, points_per_side=2,
                                                     iou_threshold=0.0, compile_decoder=False)))


@pytest.fixture
def ls():
    fake = FakeLabelStudio(TOKEN, keep_alive=False)
    fake.add_project(PID, SMART_XML)
    yield fake
    fake.close()


@pytest.fixture
def client(engine, ls, tmp_path, monkeypatch):
    """The web app in embedded mode (no Redis): its worker thread runs the real jobs."""
    settings = Settings.from_env({
        "MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
        "NTT_SAM_MODEL": "sam2.1-t", "NTT_DINO_MODEL": "dinov2-s", "NTT_RANDOM_WEIGHTS": "1",
        "NTT_DEVICE": "cpu", "SCORE_THRESHOLD": "0", "PREDICT_BUDGET_S": "60"})
    runtime.reset()
    runtime.configure(settings=settings, engine=engine)
    monkeypatch.setattr(queueing, "_backend", queueing.EmbeddedBackend())
    monkeypatch.setattr(queueing, "_backend_settings", settings)
    engine.embeddings.clear()
    spy = Spy(engine)
    app = create_app()
    yield app.test_client(), spy
    spy.close()
    runtime.reset()


def click(client, task: dict, *regions: dict, xml: str = SMART_XML) -> dict:
    resp = client.post("/predict", json=body(task, xml, *regions))
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert len(results) == 1
    return results[0]


def test_a_click_returns_a_brush_region_of_the_displayed_image(client, ls, engine):
    web, spy = client
    task = ls.add_task(PID, 1, "exif.jpg", exif_jpeg())
    item = click(web, task, keypoint(40.0, 45.0))
    assert "error" not in item, item
    (region,) = item["result"]
    assert (region["from_name"], region["to_name"], region["type"]) == ("brush", "image", "brushlabels")
    assert region["value"]["brushlabels"] == ["Cat"] and region["value"]["format"] == "rle"
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (*DISPLAYED, 0)
    w, h = DISPLAYED
    mask = decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
    # the mask SAM2 gives for that click on the image as displayed (EXIF applied), in pixels
    shown = np.asarray(Image.open(io.BytesIO(png_bytes(3, DISPLAYED))).convert("RGB"))
    assert mask.shape == shown.shape[:2]
    assert item["model_version"] == runtime.model_version(PID) and item["score"] == region["score"]
    assert LabelInterface(SMART_XML).validate_prediction({"result": item["result"], "score": item["score"]})
    assert spy.labels == [[1]]
    np.testing.assert_allclose(spy.coords[0], [[0.40 * 256, 0.45 * 256]], atol=1e-3)  # percent -> S-px frame
    image = runtime.get_fetcher(PID).fetch(task["data"]["image"], task_id=1)
    assert (image.width, image.height) == DISPLAYED
    expected = engine.segment(image.array, [(0.40 * w, 0.45 * h, True)], key=image.sha256)
    assert mask.any() == expected.mask.any() and np.array_equal(mask, expected.mask)


def test_a_negative_click_reaches_the_decoder_as_label_zero(client, ls):
    web, spy = client
    task = ls.add_task(PID, 1, "a.png", png_bytes(1, DISPLAYED))
    click(web, task, keypoint(30.0, 40.0), keypoint(60.0, 70.0, positive=False))
    assert spy.labels == [[1, 0]]
    np.testing.assert_allclose(spy.coords[0], [[0.30 * 256, 0.40 * 256], [0.60 * 256, 0.70 * 256]], atol=1e-3)


def test_a_box_prompt_and_a_polygon_control(client, ls):
    web, spy = client
    task = ls.add_task(PID, 1, "a.png", png_bytes(1, DISPLAYED))
    w, h = DISPLAYED
    box = {"original_width": w, "original_height": h, "image_rotation": 0, "id": "r1", "from_name": "box",
           "to_name": "image", "type": "rectanglelabels", "origin": "manual",
           "value": {"x": 10.0, "y": 16.0, "width": 40.0, "height": 42.0, "rotation": 0, "rectanglelabels": ["Cat"]}}
    item = click(web, task, box)
    assert spy.labels == [[2, 3]]  # a box: its two corners
    assert {r["type"] for r in item["result"]} <= {"brushlabels"}
    item = click(web, task, keypoint(30.0, 40.0), xml=POLYGON_XML)
    assert item["result"] and all(r["type"] == "polygonlabels" and r["from_name"] == "poly"
                                  and r["value"]["polygonlabels"] == ["Cat"] for r in item["result"])
    assert LabelInterface(POLYGON_XML).validate_prediction({"result": item["result"], "score": item["score"]})


def test_the_second_click_does_not_recompute_the_embedding(client, ls):
    web, spy = client
    task = ls.add_task(PID, 1, "a.png", png_bytes(1, DISPLAYED))
    click(web, task, keypoint(30.0, 40.0))
    assert spy.encodes == 1
    click(web, task, keypoint(30.0, 40.0), keypoint(50.0, 50.0, positive=False))
    click(web, task, keypoint(70.0, 20.0))
    assert spy.encodes == 1 and len(spy.labels) == 3


def test_opening_a_task_warms_its_embedding_for_the_first_click(client, ls):
    """LS's plain /predict of the one task opened in the editor (empty bank: no prediction job
    runs a model) queues warm_task; the first click then runs no image encoder."""
    web, spy = client
    task = ls.add_task(PID, 1, "a.png", png_bytes(1, DISPLAYED))
    opened = {"tasks": [task], "project": f"{PID}.1795705944", "label_config": SMART_XML,
              "params": {"login": None, "password": None, "context": None}}
    resp = web.post("/predict", json=opened)
    assert resp.status_code == 200 and resp.get_json()["results"][0]["result"] == []
    warm = [j for j in queueing.list_jobs(10) if j.func == "backend.jobs.interactive.warm_task"]
    assert len(warm) == 1
    done = _wait_done(warm[0].id)
    assert (done.status, done.result) == ("finished", {"computed": True}) and spy.encodes == 1
    click(web, task, keypoint(30.0, 40.0))
    assert spy.encodes == 1


def test_a_bad_context_is_a_400_with_the_reason(client, ls):
    web, _ = client
    task = ls.add_task(PID, 1, "a.png", png_bytes(1, DISPLAYED))
    no_label = keypoint(30.0, 40.0)
    no_label["value"] = {"x": 30.0, "y": 40.0, "width": 0.6}
    unknown = keypoint(30.0, 40.0, label="Zebra")
    nan = keypoint(30.0, 40.0)
    nan["value"]["x"] = "NaN"
    for regions, reason in (([no_label], "names no label"), ([unknown], "'Zebra'"), ([nan], "finite number"),
                            ([{"type": "choices", "value": {}}], "no keypointlabels or rectanglelabels")):
        resp = web.post("/predict", json=body(task, SMART_XML, *regions))
        assert resp.status_code == 400 and reason in resp.get_json()["error"], resp.get_json()
    two = body(task, SMART_XML, keypoint(30.0, 40.0))
    two["tasks"].append(copy.deepcopy(two["tasks"][0]))
    resp = web.post("/predict", json=two)
    assert resp.status_code == 400 and "one task" in resp.get_json()["error"]


def _wait_done(job_id: str, timeout: float = 60.0) -> queueing.JobInfo:
    done = threading.Event()
    info: list = []

    def poll() -> None:
        while not done.is_set():
            current = queueing.fetch(job_id)
            if current is not None and current.done:
                info.append(current)
                done.set()
            done.wait(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    assert done.wait(timeout), f"job {job_id} not done after {timeout} s"
    return info[0]


def test_train_serves_a_click_before_its_next_task(engine, tmp_path, monkeypatch):
    """A START_TRAINING job pre-annotating many tasks runs a click queued meanwhile before its next
    task (event-driven: the click is queued while the first task is being predicted)."""
    fake = FakeLS()
    for tid in (1, 2, 3):
        fake.add_task(tid, seed=tid)
    fake.add_task(9, seed=9, annotations=[{"id": 90, "task": 9, "was_cancelled": False, "result": [
        {"id": "a", "from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 80,
         "original_height": 60, "image_rotation": 0,
         "value": {"points": [[10, 16], [50, 16], [50, 58], [10, 58]], "closed": True, "polygonlabels": ["Cat"]}}]}])
    settings = Settings.from_env({
        "MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": TOKEN,
        "NTT_SAM_MODEL": "sam2.1-t", "NTT_DINO_MODEL": "dinov2-s", "NTT_RANDOM_WEIGHTS": "1",
        "NTT_DEVICE": "cpu", "SCORE_THRESHOLD": "0", "LS_POST_CONCURRENCY": "1"})
    runtime.reset()
    runtime.configure(settings=settings, engine=engine)
    monkeypatch.setattr(queueing, "_backend", queueing.EmbeddedBackend())
    monkeypatch.setattr(queueing, "_backend_settings", settings)
    order: list[str] = []
    first_task, clicked = threading.Event(), threading.Event()
    real_predict, real_segment = jobs._predict_one, jobs.segment_task

    def predict_one(pid, task_id, *args, **kwargs):
        order.append(f"task {task_id}")
        if len(order) == 1:
            first_task.set()
            assert clicked.wait(30)  # the click is queued now, while this task is at work
        return real_predict(pid, task_id, *args, **kwargs)

    def segment(*args, **kwargs):
        order.append("click")
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(jobs, "_predict_one", predict_one)
    monkeypatch.setattr(jobs, "segment_task", segment)
    try:
        train = queueing.enqueue("backend.jobs.train_project", PID, queue="bank", retries=0)
        assert first_task.wait(120)
        xml = runtime.get_bank_store().label_config(PID)
        prompt = {"points": [[30.0, 40.0, True]], "box": None, "label": "Cat", "control": "poly"}
        task = {"id": 2, "data": {"image": fake.tasks[2]["data"]["image"]}}
        click_id = queueing.enqueue("backend.jobs.segment_task", PID, task, xml, prompt, queue="interactive",
                                    retries=0)
        clicked.set()
        info = _wait_done(train, 300)
        assert info.status == "finished", info.error
        assert order == ["task 1", "click", "task 2", "task 3"]
        click_info = queueing.fetch(click_id)
        assert click_info.status == "finished" and click_info.result["result"], click_info
    finally:
        clicked.set()
        fake.close()
        runtime.reset()


def test_a_pre_annotated_image_is_warm_for_clicks(client, ls):
    """The proposals of a prediction job and the clicks share the image's embedding: one key."""
    web, spy = client
    task = ls.add_task(PID, 1, "a.png", png_bytes(1, DISPLAYED))
    jobs._proposals(runtime.get_fetcher(PID).fetch(task["data"]["image"], task_id=1))
    assert spy.encodes == 1
    click(web, task, keypoint(30.0, 40.0))
    assert spy.encodes == 1
