"""Which parts of a Label Studio label config this backend fills in, and how.

`parse_label_config(xml)` finds every RectangleLabels / PolygonLabels / BrushLabels control attached
to an Image object (label-studio-sdk's LabelInterface does the XML work) and reads the optional
per-control attributes an admin can put in the config:

    <RectangleLabels name="box" toName="image" model_score_threshold="0.4"
                     model_max_detections="20">
    <PolygonLabels name="poly" toName="image" model_polygon_tolerance="1.5">

Smart tools (`<KeyPointLabels smart="true">`, `<RectangleLabels smart="true">`) are the prompts of
interactive segmentation (a click or box in the editor -> SAM2 mask, backend.regions.interactive):
`LabelConfig.prompts` names them. KeyPointLabels are prompts only, never predicted nor read as
references; a smart RectangleLabels stays an output control as well.

A task has one image here, so all emitted controls must share it: `LabelConfig.value_key` is the
task-data key of the Image that the first supported control points to (config order), and
controls attached to another Image are left out with a warning.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from backend.errors import UnsupportedConfig

log = logging.getLogger(__name__)

# control tag (lower case) -> region type; the region type is the lower-cased tag name in LS.
SUPPORTED_CONTROLS = {"rectanglelabels": "rectanglelabels", "polygonlabels": "polygonlabels",
                      "brushlabels": "brushlabels"}
# smart tools whose regions LS sends as interactive prompts (the `context` of /predict)
PROMPT_CONTROLS = ("keypointlabels", "rectanglelabels")


@dataclass(frozen=True)
class Control:
    """One output control. Shared through the parse cache: treat the lists as read-only.

    predicted_values maps each label to the model class names declared for it with
    `<Label value="Car" predicted_values="car,truck"/>`.
    """

    name: str
    type: str
    to_name: str
    value_key: str
    labels: list[str]
    score_threshold: float | None = None
    max_detections: int | None = None
    polygon_tolerance: float | None = None
    predicted_values: dict[str, list[str]] = field(default_factory=dict)

    def output_label(self, class_name: str) -> str | None:
        """The label of this control for a memory-bank class name, or None when none fits.

        Order: exact label, exact predicted_values entry, then the same two case-insensitively;
        the first label in config order wins when several declare the same name.
        """
        if class_name in self.labels:
            return class_name
        for label in self.labels:
            if class_name in self.predicted_values.get(label, ()):
                return label
        folded = class_name.casefold()
        for label in self.labels:
            if label.casefold() == folded:
                return label
        for label in self.labels:
            if any(v.casefold() == folded for v in self.predicted_values.get(label, ())):
                return label
        return None


@dataclass(frozen=True)
class LabelConfig:
    """The supported controls of one label config, all on the Image whose data key is value_key."""

    controls: list[Control]
    value_key: str
    interface: LabelInterface = field(repr=False, compare=False)
    prompts: dict[str, str] = field(default_factory=dict)  # smart tool name -> region type, same Image


def _optional_attr(tag, attr: str, convert, check, expected: str):
    raw = tag.attr.get(attr)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = convert(str(raw).strip())
    except ValueError:
        value = None
    if value is None or not check(value):
        raise UnsupportedConfig(f"control '{tag.name}': {attr}=\"{raw}\" is not valid; expected {expected}")
    return value


def _describe(li: LabelInterface) -> str:
    parts = [f"{c.tag}(name={c.name}, toName={','.join(c.to_name or [])})" for c in li.controls or []]
    parts += [f"{o.tag}(name={o.name})" for o in li.objects or []]
    return ", ".join(parts) or "no tags"


def _control(tag, image) -> Control:
    predicted = {}
    for label, label_tag in (tag.labels_attrs or {}).items():
        names = [v.strip() for v in str(label_tag.attr.get("predicted_values", "")).split(",")]
        if any(names):
            predicted[label] = [v for v in names if v]
    if not tag.labels:
        log.warning("control '%s' has no static <Label> values; it will never receive regions", tag.name)
    return Control(
        name=tag.name,
        type=SUPPORTED_CONTROLS[tag.tag.lower()],
        to_name=image.name,
        value_key=image.value_name,
        labels=list(tag.labels),
        score_threshold=_optional_attr(tag, "model_score_threshold", float,
                                       lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1"),
        max_detections=_optional_attr(tag, "model_max_detections", int, lambda v: v >= 1,
                                      "a whole number >= 1"),
        polygon_tolerance=_optional_attr(tag, "model_polygon_tolerance", float,
                                         lambda v: math.isfinite(v) and v >= 0.0,
                                         "a number of pixels >= 0"),
        predicted_values=predicted,
    )


@functools.lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse (and cache, LRU keyed by the XML's hash) the supported controls of a label config."""
    if not xml or not xml.strip():
        raise UnsupportedConfig("label config is empty")
    try:
        li = LabelInterface(xml)
    except Exception as e:  # the SDK raises several exception types for malformed XML
        raise UnsupportedConfig(f"label config cannot be parsed: {e}") from e

    controls: list[Control] = []
    for tag in li.controls or []:
        if tag.tag.lower() not in SUPPORTED_CONTROLS:
            continue
        image = next((o for o in tag.objects if o.tag.lower() == "image"), None)
        if image is None:
            continue
        if not image.value or not image.value_is_variable:
            raise UnsupportedConfig(f"Image '{image.name}' value=\"{image.value}\" must name task data, "
                                    f"like value=\"$image\"")
        controls.append(_control(tag, image))
    if not controls:
        raise UnsupportedConfig("label config has no RectangleLabels, PolygonLabels or BrushLabels attached "
                                f"to an Image; found: {_describe(li)}")

    primary = controls[0].to_name
    dropped = [c.name for c in controls if c.to_name != primary]
    if dropped:
        log.warning("controls %s are attached to another Image than '%s' and are ignored", dropped, primary)
    kept = [c for c in controls if c.to_name == primary]
    return LabelConfig(controls=kept, value_key=kept[0].value_key, interface=li, prompts=_prompts(li, primary))


def _smart(tag) -> bool:
    return str(tag.attr.get("smart", "")).strip().lower() in ("true", "1", "yes")


def _prompts(li: LabelInterface, image_name: str) -> dict[str, str]:
    """Smart KeyPointLabels / RectangleLabels on the Image `image_name`: name -> region type."""
    return {tag.name: tag.tag.lower() for tag in li.controls or []
            if tag.tag.lower() in PROMPT_CONTROLS and _smart(tag)
            and any(o.name == image_name for o in tag.objects)}
