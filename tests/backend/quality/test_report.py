"""The HTML report (backend.quality.report): self-contained, labels escaped, and rendered by a real
headless chromium with every image decoded and no console error."""
from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from backend.quality.evaluation import AnnotatedTask, EvaluationSettings, TruthRegion, evaluate_project
from backend.quality.report import draw_region, render_report
from tests.backend.quality.browser import load_page
from tests.backend.quality.fakes import SIZE, detections, project_bank, rect_mask

HOSTILE = '<img src=x onerror=alert(1)> "cat" & \'dog\''
LABELS = ("plain", HOSTILE)


def _project(n: int = 6) -> tuple[list[AnnotatedTask], dict]:
    """Two classes, one hostile; per task a hit, a near miss, a false region and a confusion."""
    rng = np.random.default_rng(3)
    tasks, found = [], {}
    for t in range(n):
        truth, items = [], []
        for k, label in enumerate(LABELS):
            x0, y0 = 4 + 28 * k, int(rng.integers(2, 20))
            mask = rect_mask(x0, y0, x0 + 16, y0 + 12)
            box = (x0, y0, x0 + 16, y0 + 12)
            truth.append(TruthRegion(label, mask=mask) if k == 0 else TruthRegion(label, box=box))
            if rng.random() < 0.7:
                items.append((label, float(rng.uniform(0.4, 1.0)), np.roll(mask, int(rng.integers(-2, 3)), 1)))
        items.append((LABELS[t % 2], float(rng.uniform(0.3, 0.95)), rect_mask(20, 28, 30, 38)))
        items.append((LABELS[1], float(rng.uniform(0.5, 0.9)), truth[0].mask))
        tasks.append(AnnotatedTask(t, SIZE, tuple(truth), frozenset({f"g{t}"})))
        found[t] = detections(items)
    return tasks, found


def _thumbnail(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.full((SIZE[0] * 3, SIZE[1] * 3, 3), 200, np.uint8)
    image[rng.integers(0, 100):, rng.integers(0, 150):] = (60, 120, 180)
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def evaluation() -> dict:
    tasks, found = _project()
    return evaluate_project(tasks, project_bank(tasks), lambda task_id, bank, options: found[task_id],
                            {"ntt": None, "graph": None}, EvaluationSettings(gallery_size=6))


def test_report_loads_nothing_and_escapes_every_label(evaluation):
    assert HOSTILE in evaluation["classes"]
    page = render_report(evaluation, {m["task_id"]: _thumbnail(m["task_id"]) for m in evaluation["misses"]},
                         title=f"Project {HOSTILE}")
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(re.fullmatch(r"data:image/jpeg;base64,[A-Za-z0-9+/]+=*", s) for s in sources)
    rest = re.sub(r"data:image/jpeg;base64,[A-Za-z0-9+/]+=*", "", page)
    assert not re.search(r"https?:|//|url\(", rest, re.I)            # no URL of any kind
    assert not re.search(r"\bhref=", page) and "<script" not in page.lower() and "@import" not in page
    assert "<img src=x" not in page and "\"cat\"" not in page
    escaped = "&lt;img src=x onerror=alert(1)&gt; &quot;cat&quot; &amp; &#x27;dog&#x27;"
    assert page.count(escaped) >= 8      # tables, chart titles, captions, page title
    assert "default-src 'none'" in page


def test_report_of_a_running_evaluation_says_so():
    page = render_report({"status": "running"})
    assert "Evaluation running" in page and "<svg" not in page


def test_draw_region_scales_the_box_and_rejects_non_images():
    image = np.zeros((20, 30, 3), np.uint8)
    drawn = cv2.imdecode(np.frombuffer(draw_region(cv2.imencode(".png", image)[1].tobytes(), (20, 10, 40, 30),
                                                   (40, 60), "false"), np.uint8), cv2.IMREAD_COLOR)
    red = drawn[..., 2] > 120                  # box (20, 10)-(40, 30) of 60x40 -> (10, 5)-(19, 14) of 30x20
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == pytest.approx((10, 5, 19, 14), abs=1)
    assert draw_region(b"not an image", (0, 0, 1, 1), (4, 4), "missed") is None


def test_report_renders_in_headless_chromium(evaluation, tmp_path):
    thumbnails = {m["task_id"]: _thumbnail(m["task_id"]) for m in evaluation["misses"]}
    thumbnails[evaluation["misses"][-1]["task_id"]] = b"broken bytes"       # shows a note, not a broken image
    path = tmp_path / "report.html"
    path.write_text(render_report(evaluation, thumbnails), encoding="utf-8")
    page = load_page(path)
    assert page.errors == []
    shown = [m for m in evaluation["misses"] if m["task_id"] != evaluation["misses"][-1]["task_id"]]
    assert len(page.images) == len(shown) > 0
    assert all(i["complete"] and i["width"] == SIZE[1] * 3 for i in page.images)
    labels = len(evaluation["classes"])
    assert page.svgs == 2 * labels + 1                        # PR curves, histograms, learning curve
    pixels = cv2.imdecode(np.frombuffer(page.screenshot, np.uint8), cv2.IMREAD_COLOR)
    assert pixels.shape[0] > 900 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50   # not blank


def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    """The checks above can fail: a console error and an undecodable image are reported."""
    path = tmp_path / "bad.html"
    path.write_text('<!DOCTYPE html><title>bad</title><script>console.error("broken page")</script>'
                    '<img src="data:image/png;base64,AAAA" alt="broken"><svg width="5" height="5"></svg>')
    page = load_page(path)
    assert page.errors == ["console: broken page"]
    assert page.images == [{"complete": True, "width": 0, "alt": "broken"}] and page.svgs == 1


def test_the_browser_check_sees_a_blocked_external_load(tmp_path):
    """Under the report's Content-Security-Policy an external image is refused, and reported."""
    path = tmp_path / "external.html"
    page = render_report({"status": "running"}).replace("</body>", '<img src="http://127.0.0.1:9/x.png"></body>')
    path.write_text(page)
    report = load_page(path)
    assert len(report.errors) == 1 and "Content Security Policy" in report.errors[0]
    assert report.images == [{"complete": True, "width": 0, "alt": ""}]
