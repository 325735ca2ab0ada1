"""The evaluation as one self-contained HTML page (issue 13, item 3).

Users run offline, so the page loads nothing: charts are inline SVG drawn here, thumbnails are
base64 data: URIs, there is no script, and a Content-Security-Policy meta tag makes the browser
refuse anything else. Every label comes from users and is escaped (html.escape) wherever it goes.

Sections: summary, thresholds in force (with AP, precision/recall/F1 per class), variants side by
side, learning curve, precision-recall curve per class (IoU 0.5, the class's own IoU type), score
histograms of true vs false regions, confusion between classes, and a gallery of the worst misses:
thumbnails (bytes the caller supplies, any format OpenCV decodes) with the region drawn on them.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Hashable, Mapping, Sequence

import cv2
import numpy as np

_TP, _FP, _LINE, _GRID = "#2e7d32", "#c62828", "#1565c0", "#d0d0d0"
_MISS_BGR = {"false": (40, 40, 220), "missed": (0, 160, 255)}       # red, orange (OpenCV BGR)
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.use{font-weight:bold;background:#eef6ee}
.charts{display:flex;flex-wrap:wrap;gap:14px}.chart{font-size:12px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:220px;font-size:12px}
figure img{max-width:220px;max-height:180px;display:block;border:1px solid #aaa}
.off{background:#fde0e0}.note{color:#666;font-size:12px}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------- charts
class _Plot:
    """An SVG chart with a data area mapping x, y in [x0, x1] x [0, 1] (or [0, ymax])."""

    W, H, L, R, T, B = 260, 190, 40, 10, 22, 32

    def __init__(self, title: str, x_range: tuple[float, float], y_max: float = 1.0) -> None:
        self.title, (self.x0, self.x1), self.y_max, self.parts = title, x_range, y_max or 1.0, []

    def x(self, v: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.L + (v - self.x0) / span * (self.W - self.L - self.R)

    def y(self, v: float) -> float:
        return self.H - self.B - v / self.y_max * (self.H - self.T - self.B)

    def add(self, svg: str) -> None:
        self.parts.append(svg)

    def svg(self, x_label: str, y_label: str, x_ticks: Sequence[tuple[float, str]],
            y_ticks: Sequence[float] = (0, 0.5, 1)) -> str:
        axes = [f'<rect x="{self.L}" y="{self.T}" width="{self.W - self.L - self.R}" '
                f'height="{self.H - self.T - self.B}" fill="none" stroke="#888"/>']
        for v in y_ticks:
            axes.append(f'<line x1="{self.L}" x2="{self.W - self.R}" y1="{self.y(v):.1f}" y2="{self.y(v):.1f}" '
                        f'stroke="{_GRID}"/><text x="{self.L - 4}" y="{self.y(v) + 4:.1f}" '
                        f'text-anchor="end">{_esc(_tick(v))}</text>')
        for v, text in x_ticks:
            axes.append(f'<text x="{self.x(v):.1f}" y="{self.H - self.B + 13}" text-anchor="middle">'
                        f'{_esc(text)}</text>')
        axes.append(f'<text x="{(self.L + self.W - self.R) / 2}" y="{self.H - 4}" text-anchor="middle">'
                    f'{_esc(x_label)}</text>')
        axes.append(f'<text x="10" y="{(self.T + self.H - self.B) / 2}" text-anchor="middle" '
                    f'transform="rotate(-90 10 {(self.T + self.H - self.B) / 2})">{_esc(y_label)}</text>')
        short = self.title if len(self.title) <= 40 else self.title[:39] + "…"
        axes.append(f'<text x="{self.L}" y="14" font-weight="bold">{_esc(short)}'
                    f'<title>{_esc(self.title)}</title></text>')
        return (f'<svg class="chart" width="{self.W}" height="{self.H}" viewBox="0 0 {self.W} {self.H}" '
                f'role="img" aria-label="{_esc(self.title)}" font-size="10">'
                + "".join(axes + self.parts) + "</svg>")


def _tick(v: float) -> str:
    return f"{v:g}"


def _polyline(points: Sequence[tuple[float, float]], color: str, width: float = 1.8) -> str:
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width}"/>'


def pr_chart(label: str, row: Mapping) -> str:
    """Precision at each recall point (COCO's interpolated curve at IoU 0.5) and the operating point
    at the threshold in force."""
    plot = _Plot(label, (0.0, 1.0))
    pr = row.get("pr") or {}
    points = [(plot.x(r), plot.y(p)) for r, p in zip(pr.get("recall", []), pr.get("precision", []))]
    if points:
        plot.add(_polyline(points, _LINE))
    if row.get("precision") is not None:
        plot.add(f'<circle cx="{plot.x(row["recall"]):.1f}" cy="{plot.y(row["precision"]):.1f}" r="4" '
                 f'fill="{_FP}"><title>threshold {_esc(_num(row["threshold"]))}</title></circle>')
    return plot.svg("recall", "precision", [(0, "0"), (0.5, "0.5"), (1, "1")])


def histogram_chart(label: str, row: Mapping) -> str:
    """Scores of true (green) and false (red) regions, the threshold in force as a dashed line."""
    hist = row.get("histogram") or {}
    edges, tp, fp = hist.get("edges", []), hist.get("tp", []), hist.get("fp", [])
    top = max([*tp, *fp, 1])
    plot = _Plot(label, (0.0, 1.0), float(top))
    for k in range(len(edges) - 1):
        width = (plot.x(edges[k + 1]) - plot.x(edges[k])) / 2
        for offset, counts, color in ((0, tp, _TP), (width, fp, _FP)):
            if counts[k]:
                y = plot.y(counts[k])
                plot.add(f'<rect x="{plot.x(edges[k]) + offset:.1f}" y="{y:.1f}" width="{width:.1f}" '
                         f'height="{plot.y(0) - y:.1f}" fill="{color}"/>')
    t = row.get("threshold")
    if t is not None:
        plot.add(f'<line x1="{plot.x(t):.1f}" x2="{plot.x(t):.1f}" y1="{plot.T}" y2="{plot.y(0):.1f}" '
                 f'stroke="#000" stroke-dasharray="4 3"/>')
    return plot.svg("score", "regions", [(0, "0"), (0.5, "0.5"), (1, "1")], (0, top))


def curve_chart(curve: Sequence[Mapping]) -> str:
    """Mean AP of held-out tasks against the number of annotated tasks in the bank (log scale),
    with the spread (min to max) of the random subsets."""
    if not curve:
        return '<p class="note">Not enough annotated tasks for a learning curve (2 needed).</p>'
    xs = [math.log2(p["tasks"]) for p in curve]
    plot = _Plot("mean AP vs annotated tasks", (min(xs) - 0.3, max(xs) + 0.3))
    plot.W = 420
    for x, p in zip(xs, curve):
        plot.add(f'<line x1="{plot.x(x):.1f}" x2="{plot.x(x):.1f}" y1="{plot.y(p["min"]):.1f}" '
                 f'y2="{plot.y(p["max"]):.1f}" stroke="{_LINE}" stroke-width="1"/>')
        plot.add(f'<circle cx="{plot.x(x):.1f}" cy="{plot.y(p["mean_ap"]):.1f}" r="3" fill="{_LINE}">'
                 f'<title>{p["tasks"]} tasks: {p["mean_ap"]:.3f} ({p["runs"]} runs)</title></circle>')
    plot.add(_polyline([(plot.x(x), plot.y(p["mean_ap"])) for x, p in zip(xs, curve)], _LINE))
    return plot.svg("annotated tasks in the bank", "mean AP", [(x, str(p["tasks"])) for x, p in zip(xs, curve)])


# ------------------------------------------------------------------------------------ tables
def _thresholds_table(classes: Mapping[str, Mapping]) -> str:
    head = ("class", "threshold", "source", "calibrated", "precision", "recall", "F1", "box AP", "box AP50",
            "mask AP", "mask AP50", "references", "tasks", "regions")
    rows = []
    for label, c in sorted(classes.items()):
        cells = [_num(c["threshold"], 2), _esc(c["threshold_source"]), _num(c["calibrated_threshold"], 2),
                 _num(c["precision"]), _num(c["recall"]), _num(c["f1"]), _num(c["ap"]), _num(c["ap50"]),
                 _num(c["mask_ap"]), _num(c["mask_ap50"]), str(c["references"]), str(c["tasks"]),
                 str(c["instances"])]
        rows.append(f'<tr><td class="l">{_esc(label)}</td>' + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    return _table(head, rows)


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    cols = "".join(f'<th class="{"l" if k == 0 else ""}">{_esc(h)}</th>' for k, h in enumerate(head))
    return f"<table><tr>{cols}</tr>{''.join(rows)}</table>"


def _variants_table(evaluation: Mapping) -> str:
    variants, in_use = evaluation["variants"], evaluation["variant_in_use"]
    labels = sorted({label for v in variants.values() for label in v["classes"]})
    rows = []
    for name, v in variants.items():
        rows_of = [v["classes"].get(label) for label in labels]
        own = [None if c is None else c["mask_ap"] if c["mask_ap"] is not None else c["ap"] for c in rows_of]
        cells = [_num(v["mean_ap"])] + [_num(x) for x in own]
        marker = " (in use)" if name == in_use else ""
        rows.append(f'<tr class="{"use" if name == in_use else ""}"><td class="l">{_esc(name)}{marker}</td>'
                    + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return (_table(["variant", "mean AP", *labels], rows)
            + f'<p class="note">{_esc(evaluation.get("variant_reason", ""))}. AP per class: mask AP where '
              "the class is annotated with masks, box AP otherwise.</p>")


def _confusion_table(confusion: Mapping) -> str:
    labels, matrix, background = confusion["labels"], confusion["matrix"], confusion["background"]
    rows = []
    for i, predicted in enumerate(labels):
        cells = []
        for j, count in enumerate(matrix[i]):
            cls = ' class="off"' if i != j and count else ""
            cells.append(f"<td{cls}>{count}</td>")
        rows.append(f'<tr><td class="l">{_esc(predicted)}</td>{"".join(cells)}<td>{background[i]}</td></tr>')
    return (_table(["predicted \\ annotated", *labels, "nothing"], rows)
            + '<p class="note">Kept regions (score at or above their class threshold) by predicted class '
              "and the annotated class they overlap most at IoU ≥ 0.5; red cells are confusions.</p>")


# ------------------------------------------------------------------------------------ gallery
def draw_region(image_bytes: bytes, box: Sequence[float], image_size: Sequence[int], kind: str) -> bytes | None:
    """The thumbnail as JPEG with the region's box (image pixels, scaled to the thumbnail) drawn;
    None when the bytes are not an image."""
    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    h, w = image.shape[:2]
    H, W = image_size
    x0, y0, x1, y1 = box
    p0 = (int(round(x0 * w / W)), int(round(y0 * h / H)))
    p1 = (max(p0[0], int(round(x1 * w / W)) - 1), max(p0[1], int(round(y1 * h / H)) - 1))
    cv2.rectangle(image, p0, p1, _MISS_BGR.get(kind, (255, 0, 0)), max(1, round(min(h, w) / 100)))
    ok, out = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return out.tobytes() if ok else None


def _gallery(misses: Sequence[Mapping], thumbnails: Mapping[Hashable, bytes]) -> str:
    if not misses:
        return '<p class="note">No misses at the thresholds in force.</p>'
    figures = []
    for m in misses:
        data = thumbnails.get(m["task_id"])
        drawn = draw_region(data, m["box"], m["image_size"], m["kind"]) if data else None
        picture = (f'<img src="data:image/jpeg;base64,{base64.b64encode(drawn).decode()}" '
                   f'alt="task {_esc(m["task_id"])}">' if drawn else '<p class="note">(image unavailable)</p>')
        if m["kind"] == "false":
            what = f'false {_esc(m["label"])}, score {_num(m["score"], 2)}'
            if m.get("overlaps") is not None:
                what += f' (on a {_esc(m["overlaps"])})'
        else:
            what = f'missed {_esc(m["label"])}' + ("" if m["score"] is None else f', best score {_num(m["score"], 2)}')
        figures.append(f'<figure>{picture}<figcaption>task {_esc(m["task_id"])}: {what}</figcaption></figure>')
    return (f'<div class="gallery">{"".join(figures)}</div><p class="note">Red box: a false region kept at '
            "the threshold in force; orange box: an annotated region no kept region found.</p>")


# --------------------------------------------------------------------------------------- page
def render_report(evaluation: Mapping, thumbnails: Mapping[Hashable, bytes] | None = None, *,
                  title: str = "Pre-annotation quality") -> str:
    """One HTML page from an evaluate_project result; `thumbnails`: task id -> small image bytes
    for the tasks in evaluation["misses"] (missing or undecodable ones show a note instead)."""
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>")
    if evaluation.get("status") != "done":
        return head + f'<p>Evaluation {_esc(evaluation.get("status", "not started"))}.</p></body></html>'
    classes = evaluation["classes"]
    labels = sorted(classes)
    cost = evaluation.get("cost", {})
    body = [
        f'<p>{evaluation["annotated_tasks"]} annotated tasks, each scored by a bank without its own references '
        f'(leave-one-task-out). Method variant in use: <b>{_esc(evaluation["variant_in_use"])}</b>. '
        f'{cost.get("matches", 0)} matches in {_num(cost.get("seconds"), 1)} s.</p>',
        "<h2>Thresholds in force</h2>", _thresholds_table(classes),
        '<p class="note">Precision, recall and F1 at the threshold in force (IoU 0.5). A control\'s '
        "model_score_threshold overrides the calibrated threshold, which needs the class in enough "
        "annotated tasks; otherwise the global default applies.</p>",
        "<h2>Variants side by side</h2>", _variants_table(evaluation),
        "<h2>Learning curve</h2>", curve_chart(evaluation.get("curve", [])),
        '<p class="note">Mean AP on held-out tasks when the bank holds the references of that many '
        "random annotated tasks (bars: spread over the random subsets). Still rising: more examples help.</p>",
        "<h2>Precision–recall per class</h2>",
        '<div class="charts">' + "".join(pr_chart(label, classes[label]) for label in labels) + "</div>",
        "<h2>Scores of true and false regions</h2>",
        '<div class="charts">' + "".join(histogram_chart(label, classes[label]) for label in labels) + "</div>",
        f'<p class="note"><span style="color:{_TP}">■</span> true <span style="color:{_FP}">■</span> false; '
        "dashed: threshold in force.</p>",
        "<h2>Confusion between classes</h2>", _confusion_table(evaluation["confusion"]),
        "<h2>Worst misses</h2>", _gallery(evaluation.get("misses", []), thumbnails or {}),
    ]
    return head + "".join(body) + "</body></html>"
