"""Bad input, from the HTTP routes down to the jobs.

1. Property-based fuzzing of every route of backend/web/openapi.py with hypothesis: bodies and query
   strings drawn from the routes' schemas (mutated: keys dropped, values swapped for arbitrary
   JSON), from arbitrary JSON and from arbitrary bytes. Over 1,000 cases in all, each must get a
   documented status (never a 500), a JSON body that validates against the route's response
   schema, a clear `{"error": ...}` on 4xx, and one item per task from /predict.
2. The job side of bad input with the real (small) engine: broken regions in an annotation,
   corrupt / truncated / 50-megapixel images, unsupported label configs.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import zlib

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend import runtime
from backend.regions.annotations import annotation_references
from backend.web import openapi
from backend.regions.label_config import parse_label_config
from tests.reliability.conftest import (CAT, CONFIG_XML, DOG, fill_bank, mark_bank_filled, png_bytes,
                                        polygon_region, wait_job)

PID = 1
SPEC = openapi.spec()
COMPONENTS = SPEC["components"]["schemas"]
OPERATIONS = [(method.upper(), path) for path, ops in SPEC["paths"].items() for method in ops]
QUOTA = {"POST": 250, "GET": 60}  # hypothesis examples per operation: 3 x 250 + 8 x 60 = 1,230

CONFIGS = [
    CONFIG_XML,
    '<View><Image name="image" value="$image"/><Choices name="q" toName="image"><Choice value="ok"/></Choices></View>',
    '<View><Image name="image" value="$image"/><RectangleLabels name="b" toName="image">',
    '<View><Image name="image" value="https://x/y.png"/><RectangleLabels name="b" toName="image">'
    '<Label value="Cat"/></RectangleLabels></View>',
    '<View><Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="A"/></Labels></View>',
    '<View><Image name="image" value="$image"/><PolygonLabels name="p" toName="image" model_score_threshold="7">'
    '<Label value="Cat"/></PolygonLabels></View>',
    "", "<View/>", "not xml at all", "<!DOCTYPE x [<!ENTITY a 'aaaa'>]><View>&a;</View>",
]
URLS = ["/data/upload/1/a.png", "/data/local-files/?d=../../etc/passwd", "http://169.254.169.254/latest/",
        "file:///etc/passwd", "s3://bucket/key.png", "gs://b/k", "", "   ", "javascript:alert(1)",
        "http://[::1", "/data/upload/1/" + "a" * 3000]
EVENTS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
          "START_TRAINING", "PROJECT_UPDATED", "TASKS_CREATED", "", "annotation_created"]

# ------------------------------------------------------------------------------------ strategies
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30))
any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
HINTS = {  # realistic values for fields that matter, beside what the schema allows
    "schema": st.sampled_from(CONFIGS), "label_config": st.sampled_from(CONFIGS),
    "action": st.sampled_from(EVENTS), "image": st.sampled_from(URLS),
    "project": st.sampled_from(["1.1717", "1", 1, "2.0", "-1", "1e3", "99999999999999999999", "٣.1", None]),
}


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = COMPONENTS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def from_schema(schema: dict, name: str = "", depth: int = 0) -> st.SearchStrategy:
    """Values for an OpenAPI schema, sometimes broken: any node may become arbitrary JSON."""
    schema = _resolve(schema)
    options = []
    if name in HINTS:
        options.append(HINTS[name])
    if "oneOf" in schema or "anyOf" in schema:
        options += [from_schema(s, name, depth) for s in schema.get("oneOf", schema.get("anyOf"))]
    elif "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    else:
        kind = schema.get("type")
        if kind == "object":
            options.append(_object(schema, depth))
        elif kind == "array":
            items = from_schema(schema.get("items", {}), name, depth + 1) if depth < 4 else any_json
            options.append(st.lists(items, max_size=3))
        elif kind == "string":
            options.append(st.from_regex(schema["pattern"], fullmatch=True) if "pattern" in schema
                           else st.text(max_size=40))
        elif kind == "integer":
            options.append(st.integers(schema.get("minimum"), schema.get("maximum")))
        elif kind == "number":
            options.append(st.floats(allow_nan=False, allow_infinity=False))
        elif kind == "boolean":
            options.append(st.booleans())
    if schema.get("nullable"):
        options.append(st.none())
    valid = st.one_of(options) if options else any_json
    return st.one_of(valid, valid, valid, any_json)  # mostly schema-shaped, sometimes anything


def _object(schema: dict, depth: int) -> st.SearchStrategy:
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    extra = schema.get("additionalProperties")
    fixed = {k: from_schema(v, k, depth + 1) for k, v in props.items() if k in required}
    optional = {k: from_schema(v, k, depth + 1) for k, v in props.items() if k not in required}
    base = st.fixed_dictionaries(fixed, optional=optional)
    if isinstance(extra, dict):
        base = st.tuples(base, st.dictionaries(st.sampled_from(["image", "text", "url"]) | st.text(max_size=6),
                                               from_schema(extra, "image", depth + 1), max_size=2)
                         ).map(lambda pair: {**pair[1], **pair[0]})
    dropped = st.tuples(base, st.sets(st.sampled_from(sorted(required)), max_size=len(required))
                        ).map(lambda pair: {k: v for k, v in pair[0].items() if k not in pair[1]}) \
        if required else base
    return st.one_of(base, base, dropped)


def request_strategy(method: str, path: str) -> st.SearchStrategy:
    """(query dict, body bytes | None, content type) for one operation."""
    op = SPEC["paths"][path][method.lower()]
    params = op.get("parameters", [])
    query = st.fixed_dictionaries({}, optional={p["name"]: from_schema(p["schema"], p["name"]).map(str)
                                                for p in params}) if params else st.just({})
    query = st.one_of(query, st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3))
    if "requestBody" in op:
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        body = st.one_of(from_schema(schema).map(lambda v: json.dumps(v).encode()),
                         any_json.map(lambda v: json.dumps(v).encode()),
                         st.binary(max_size=200), st.just(b""), st.just(b"{\"tasks\": [" * 400))
    else:
        body = st.one_of(st.none(), any_json.map(lambda v: json.dumps(v).encode()), st.binary(max_size=50))
    ctype = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None])
    return st.tuples(query, body, ctype)


# ------------------------------------------------------------------------------------ response checks
def _json_schema(schema):
    """OpenAPI 3.0 schema -> JSON Schema (refs inlined, `nullable` as a null type)."""
    if isinstance(schema, list):
        return [_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = _resolve(schema)
    out = {k: _json_schema(v) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.lru_cache(maxsize=None)
def _validator(method: str, path: str, status: str):
    schema = SPEC["paths"][path][method.lower()]["responses"][status]["content"]["application/json"]["schema"]
    return jsonschema.Draft7Validator(_json_schema(schema))


def check_response(method: str, path: str, resp, body: bytes | None) -> None:
    documented = SPEC["paths"][path][method.lower()]["responses"]
    assert resp.status_code < 500, (method, path, resp.status_code, resp.get_data()[:300])
    assert str(resp.status_code) in documented, (method, path, resp.status_code, resp.get_data()[:300])
    assert resp.is_json, resp.get_data()[:200]
    payload = resp.get_json()
    _validator(method, path, str(resp.status_code)).validate(payload)
    if resp.status_code >= 400:
        assert isinstance(payload["error"], str) and payload["error"].strip()
    if path == "/predict" and resp.status_code == 200:
        tasks = json.loads(body)["tasks"]
        assert len(payload["results"]) == len(tasks)
        for item in payload["results"]:
            assert isinstance(item.get("result"), list) or item.get("error") or item.get("status") == "deferred"


# ------------------------------------------------------------------------------------ route fuzzing
@pytest.fixture
def fuzz_client(make_app, fake_jobs):
    """Embedded mode with fast fake jobs; project 1 is set up and has a 'bank'."""
    client = make_app(predict_budget_s=5.0, max_request_mb=1.0).test_client()
    assert client.post("/setup", json={"project": "1.1717", "schema": CONFIG_XML}).status_code == 200
    mark_bank_filled(PID)
    return client


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_route(fuzz_client, method, path):
    cases = []

    @settings(max_examples=QUOTA[method], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request_strategy(method, path))
    def run(request):
        query, body, ctype = request
        cases.append(1)
        headers = {"Content-Type": ctype} if ctype else {}
        resp = fuzz_client.open(path, method=method, query_string=query, data=body, headers=headers)
        check_response(method, path, resp, body)

    run()
    assert len(cases) >= QUOTA[method]  # together: >= 1,000 cases


def test_every_route_is_described(fuzz_client):
    rules = {r.rule for r in fuzz_client.application.url_map.iter_rules() if r.endpoint != "static"}
    assert rules == set(SPEC["paths"])
    served = fuzz_client.get("/openapi.json").get_json()
    assert served["paths"].keys() == SPEC["paths"].keys() and served["openapi"].startswith("3.0")


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_other_methods_get_405_json(fuzz_client, method):
    for path in SPEC["paths"]:
        resp = fuzz_client.open(path, method=method)
        assert resp.status_code == 405 and resp.get_json()["error"]


# ------------------------------------------------------------------------------------ regions (no I/O)
@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.lists(from_schema({"$ref": "#/components/schemas/Region"}), max_size=4), any_json),
       st.sampled_from([(80, 60), (1, 1), (4000, 3000)]))
def test_any_annotation_result_yields_references_or_warnings_never_an_exception(result, size):
    """What a webhook's annotation holds reaches the rasterisers only through this function: a
    crash here (pycocotools segfaults on NaN or huge coordinates) would kill the worker."""
    refs = annotation_references({"id": 5, "result": result}, parse_label_config(CONFIG_XML), size,
                                 max_pixels=runtime.get_settings().max_image_pixels)
    for ref in refs:
        assert ref.label and (ref.mask is not None) != (ref.box is not None)
        if ref.mask is not None:
            assert ref.mask.shape == (size[1], size[0]) and ref.mask.any()


# ------------------------------------------------------------------------------------ jobs, real engine
def _rle(mask: np.ndarray) -> list[int]:
    return [int(v) for v in mask2rle((mask * 255).astype(np.uint8))]


def _region(rid, kind, value, size=(80, 60), **extra) -> dict:
    return {"id": rid, "from_name": {"rectanglelabels": "bbox", "polygonlabels": "poly",
                                     "brushlabels": "brush"}.get(kind, "kp"),
            "to_name": "image", "type": kind, "original_width": size[0], "original_height": size[1],
            "image_rotation": 0, "value": value, **extra}


def test_broken_regions_are_skipped_and_the_rest_is_learned(embedded, fake_ls, caplog):
    client = embedded()
    client.post("/setup", json={"project": "1.1717", "schema": CONFIG_XML})
    fake_ls.add_task(1)
    full = np.ones((60, 80), bool)
    small = np.zeros((48, 64), bool)
    small[10:20, 10:30] = True
    result = [
        polygon_region("good", "Cat", CAT),
        _region("huge", "brushlabels", {"format": "rle", "rle": _rle(full), "brushlabels": ["Dog"]}),
        _region("rle-size", "brushlabels", {"format": "rle", "rle": _rle(small), "brushlabels": ["Dog"]}),
        _region("rle-junk", "brushlabels", {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["Dog"]}),
        _region("rle-empty", "brushlabels", {"format": "rle", "rle": _rle(np.zeros((60, 80), bool)),
                                             "brushlabels": ["Dog"]}),
        _region("outside", "rectanglelabels", {"x": 150, "y": 150, "width": 20, "height": 20, "rotation": 0,
                                               "rectanglelabels": ["Cat"]}),
        _region("flat", "rectanglelabels", {"x": 10, "y": 10, "width": 0, "height": 30, "rotation": 0,
                                            "rectanglelabels": ["Cat"]}),
        _region("two-points", "polygonlabels", {"points": [[1, 1], [50, 50]], "polygonlabels": ["Cat"]}),
        _region("collinear", "polygonlabels", {"points": [[1, 1], [50, 50], [99, 99]], "polygonlabels": ["Cat"]}),
        _region("nan", "polygonlabels", {"points": [[float("nan"), 1], [5, 5], [9, 1]], "polygonlabels": ["Cat"]}),
        _region("two-labels", "polygonlabels", {"points": DOG, "polygonlabels": ["Cat", "Dog"]}),
        _region("no-value", "polygonlabels", None),
        _region("keypoint", "keypointlabels", {"x": 5, "y": 5, "keypointlabels": ["Cat"]}),
        _region("other-image", "polygonlabels", {"points": DOG, "polygonlabels": ["Dog"]}, to_name="image2"),
        "not a region", None, 7,
    ]
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": PID, "label_config": CONFIG_XML},
               "annotation": fake_ls.save_annotation({"id": 21, "task": 1, "result": result}),
               "task": {"id": 1, "data": fake_ls.tasks[1]["data"]}}
    with caplog.at_level(logging.WARNING):
        info = wait_job(client.post("/webhook", json=payload).json["job"])
    assert info.status == "finished", info.error
    assert info.result["references"] == 2
    bank = runtime.get_bank_store().get(PID)
    assert sorted(r.ref_id for c in bank.classes for r in bank.refs(c)) == ["21:good", "21:huge"]
    warned = caplog.text
    for rid in ("rle-size", "rle-junk", "rle-empty", "outside", "flat", "two-points", "collinear", "two-labels"):
        assert f"region {rid} " in warned, rid


def test_unknown_label_names_never_reach_predictions(embedded, fake_ls):
    client = embedded()
    client.post("/setup", json={"project": "1.1717", "schema": CONFIG_XML})
    for tid in (1, 2):
        fake_ls.add_task(tid)
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": PID, "label_config": CONFIG_XML},
               "annotation": fake_ls.save_annotation({"id": 22, "task": 1, "result": [
                   polygon_region("z", "Zebra", CAT), polygon_region("c", "cat", DOG)]}),
               "task": {"id": 1, "data": fake_ls.tasks[1]["data"]}}
    info = wait_job(client.post("/webhook", json=payload).json["job"])
    assert info.status == "finished", info.error
    body = {"project": "1.1717", "label_config": CONFIG_XML, "tasks": [fake_ls.tasks[2]]}
    item = client.post("/predict", json=body).json["results"][0]
    labels = {lab for r in item["result"] for lab in r["value"][r["type"]]}
    assert labels <= {"Cat", "Dog"}, item  # "Zebra" is never emitted (proposals it wins get no region)
    assert LabelInterface(CONFIG_XML).validate_prediction(item, return_errors=True) == []
    # with "cat" the only class every proposal is a cat: emitted under the config's "Cat"
    payload = {**payload, "action": "ANNOTATION_UPDATED", "annotation": fake_ls.save_annotation(
        {**payload["annotation"], "result": [polygon_region("c", "cat", DOG)]})}
    assert wait_job(client.post("/webhook", json=payload).json["job"]).status == "finished"
    item = client.post("/predict", json=body).json["results"][0]
    assert item["result"] and {lab for r in item["result"] for lab in r["value"][r["type"]]} == {"Cat"}, item
    assert LabelInterface(CONFIG_XML).validate_prediction(item, return_errors=True) == []


def _png_of(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def test_corrupt_truncated_and_50_megapixel_images_fail_alone(embedded, fake_ls):
    client = embedded()
    fill_bank(PID)
    good = png_bytes(1)
    huge = _png_of((8000, 6250))                     # 50 MP, mostly constant: ~50 kB on the wire
    assert len(huge) < 200_000
    bomb = b"\x89PNG\r\n\x1a\n" + good[8:33] + zlib.compress(b"\0" * 10)   # header only, broken data
    images = {1: good, 2: b"\x89PNG\r\n\x1a\n garbage", 3: good[: len(good) // 2], 4: huge, 5: b"", 6: b"GIF89a",
              7: bomb, 8: "<html>login</html>".encode()}
    for tid, data in images.items():
        fake_ls.add_task(tid, image=data)
    body = {"project": "1.1717", "label_config": CONFIG_XML, "tasks": [fake_ls.tasks[t] for t in images]}
    items = client.post("/predict", json=body).json["results"]
    assert isinstance(items[0]["result"], list)
    for tid, item in zip(list(images)[1:], items[1:]):
        assert "result" not in item and "cannot load image" in item["error"], (tid, item)
    assert "50.0 MP, over the MAX_IMAGE_PIXELS limit" in items[3]["error"]


@pytest.mark.parametrize("xml, message", [
    (CONFIGS[1], "no RectangleLabels, PolygonLabels or BrushLabels"),
    (CONFIGS[2], "cannot be parsed"),
    (CONFIGS[3], "must name task data"),
    (CONFIGS[4], "no RectangleLabels, PolygonLabels or BrushLabels"),
    (CONFIGS[5], 'model_score_threshold="7" is not valid'),
    ("", "label config is empty"),
])
def test_unsupported_label_configs_get_a_clear_400(make_app, fake_jobs, xml, message):
    client = make_app().test_client()
    resp = client.post("/setup", json={"project": "1.1717", "schema": xml})
    assert resp.status_code == 400 and message in resp.json["error"], resp.json
    resp = client.post("/predict", json={"project": "1", "label_config": xml or " ",
                                         "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]})
    assert resp.status_code == 400, resp.json
    assert message in resp.json["error"] or (not xml and "never set up" in resp.json["error"])


def test_unsupported_config_in_a_webhook_fails_its_job_with_the_reason(embedded, fake_ls):
    client = embedded()
    payload = {"action": "PROJECT_UPDATED", "project": {"id": PID, "label_config": CONFIGS[1]}}
    fake_ls.label_config = CONFIGS[1]
    info = wait_job(client.post("/webhook", json=payload).json["job"])
    assert info.status == "failed" and "no RectangleLabels, PolygonLabels or BrushLabels" in info.error
    assert client.get("/health").status_code == 200  # the worker thread lives on
