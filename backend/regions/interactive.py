"""Interactive segmentation on Label Studio's wire: the `context` of an interactive /predict (the
regions an annotator just drew with a smart tool) -> SAM2 prompts -> one mask, as a region.

With "Interactive preannotations" on, the editor sends each finished smart-tool region to LS
(POST /api/ml/<id>/interactive-annotating), and LS forwards it as a /predict of one task with
`params.context = {"result": [<region>, ...]}`. A region is a keypoint
(`{"type": "keypointlabels", "value": {"x", "y", "width", "keypointlabels": [label]},
"is_positive": bool}`, negative when drawn with Alt) or a rectangle (`"rectanglelabels"`, x, y,
width, height), in percent of the image as displayed (EXIF applied), with `original_width` /
`original_height`. The answer is LS's prediction item; its regions are shown as suggestions.

`read_context` checks and reduces the context to a `Prompt` (JSON, queued for the worker);
the worker turns its percents into pixels of the image it loaded (`Prompt.in_pixels`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backend.errors import BadRequest
from backend.regions.label_config import PROMPT_CONTROLS, Control, LabelConfig

MASK_CONTROLS = ("brushlabels", "polygonlabels")  # preferred in this order: a brush is the exact mask


@dataclass(frozen=True)
class Prompt:
    """Clicks [(x, y, positive)] and an optional box (x0, y0, x1, y1), in percent of the displayed
    image; the label of the prompt and the control its mask goes to."""

    points: list[tuple[float, float, bool]]
    box: tuple[float, float, float, float] | None
    label: str
    control: str

    def to_json(self) -> dict:
        return {"points": [list(p) for p in self.points], "box": list(self.box) if self.box else None,
                "label": self.label, "control": self.control}

    @classmethod
    def from_json(cls, data: dict) -> "Prompt":
        return cls([(float(x), float(y), bool(pos)) for x, y, pos in data["points"]],
                   tuple(float(v) for v in data["box"]) if data.get("box") else None,
                   str(data["label"]), str(data["control"]))

    def in_pixels(self, width: int, height: int) -> tuple[list[tuple[float, float, bool]],
                                                           tuple[float, float, float, float] | None]:
        """(clicks, box) in pixels of a width x height image (Engine.segment's frame)."""
        points = [(x * width / 100.0, y * height / 100.0, positive) for x, y, positive in self.points]
        box = None
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            box = (x0 * width / 100.0, y0 * height / 100.0, x1 * width / 100.0, y1 * height / 100.0)
        return points, box


def is_interactive(params: Any) -> bool:
    """A /predict is interactive when `params.context.result` is a non-empty list."""
    context = params.get("context") if isinstance(params, dict) else None
    return isinstance(context, dict) and isinstance(context.get("result"), list) and bool(context["result"])


def _percent(value: dict, key: str, where: str) -> float:
    raw = value.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise BadRequest(f"{where}: value.{key} must be a finite number (percent), got {str(raw)[:40]!r}")
    return min(100.0, max(0.0, float(raw)))


def _label(region: dict, kind: str) -> str | None:
    value = region["value"]
    for key in (kind, "labels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str) and labels[0].strip():
            return labels[0]
    return None


def mask_control(config: LabelConfig, label: str) -> tuple[Control, str]:
    """The brush (else polygon) control that has `label`, and its own spelling of it."""
    for kind in MASK_CONTROLS:
        for control in config.controls:
            if control.type == kind and (own := control.output_label(label)) is not None:
                return control, own
    raise BadRequest(f"no BrushLabels or PolygonLabels control of the label config has the label {label!r}: "
                     "add it there to get masks for the smart tool's clicks")


def read_context(context: dict, config: LabelConfig) -> Prompt:
    """The prompt of an interactive context: every keypoint (positive unless is_positive is false)
    and the last rectangle; the label of the last region that has one. BadRequest when nothing
    usable is in it."""
    points: list[tuple[float, float, bool]] = []
    box = None
    label = None
    for i, region in enumerate(context.get("result") or []):
        where = f"context.result[{i}]"
        kind = region.get("type") if isinstance(region, dict) else None
        if kind not in PROMPT_CONTROLS or not isinstance(region.get("value"), dict):
            continue  # not a smart-tool prompt (LS sends only those; anything else is ignored)
        value = region["value"]
        x, y = _percent(value, "x", where), _percent(value, "y", where)
        if kind == "keypointlabels":
            positive = region.get("is_positive", True)
            if not isinstance(positive, bool):
                raise BadRequest(f"{where}: is_positive must be true or false")
            points.append((x, y, positive))
        else:
            w, h = _percent(value, "width", where), _percent(value, "height", where)
            box = (x, y, min(100.0, x + w), min(100.0, y + h))
        label = _label(region, kind) or label
    if not points and box is None:
        raise BadRequest("interactive context has no keypointlabels or rectanglelabels region with x and y")
    if label is None:
        raise BadRequest("interactive context names no label: pick a label of the smart tool before clicking")
    control, label = mask_control(config, label)
    return Prompt(points, box, label, control.name)
