import logging

import pytest

from backend.errors import BadRequest, UnsupportedConfig
from backend.regions.label_config import parse_label_config
from tests.backend.fixtures import CONFIG_WITH_ATTRS_XML, CONFIG_XML


def test_three_controls_of_the_live_server_config():
    cfg = parse_label_config(CONFIG_XML)
    assert cfg.value_key == "image"
    assert [(c.name, c.type, c.to_name, c.value_key, c.labels) for c in cfg.controls] == [
        ("bbox", "rectanglelabels", "image", "image", ["Cat", "Dog"]),
        ("poly", "polygonlabels", "image", "image", ["Cat", "Dog"]),
        ("brush", "brushlabels", "image", "image", ["Cat", "Dog"]),
    ]
    assert all(c.score_threshold is None and c.max_detections is None and c.polygon_tolerance is None
               for c in cfg.controls)


def test_control_attributes_and_choices_ignored():
    cfg = parse_label_config(CONFIG_WITH_ATTRS_XML)
    by_name = {c.name: c for c in cfg.controls}
    assert set(by_name) == {"bbox", "poly", "brush"}  # Choices is not an output of this backend
    assert by_name["bbox"].score_threshold == 0.6
    assert by_name["bbox"].max_detections == 2
    assert by_name["poly"].polygon_tolerance == 0.0
    assert by_name["bbox"].predicted_values == {"Cat": ["kitty", "feline"]}


def test_output_label_exact_predicted_values_then_case():
    bbox = next(c for c in parse_label_config(CONFIG_WITH_ATTRS_XML).controls if c.name == "bbox")
    assert bbox.output_label("Cat") == "Cat"
    assert bbox.output_label("feline") == "Cat"       # predicted_values, whitespace stripped
    assert bbox.output_label("kitty") == "Cat"
    assert bbox.output_label("dog") == "Dog"          # case-insensitive label
    assert bbox.output_label("FELINE") == "Cat"       # case-insensitive predicted_values
    assert bbox.output_label("Zebra") is None


def test_exact_match_beats_case_insensitive():
    xml = """<View><Image name="img" value="$photo"/>
      <RectangleLabels name="r" toName="img"><Label value="car"/><Label value="Car"/></RectangleLabels></View>"""
    r = parse_label_config(xml).controls[0]
    assert r.output_label("Car") == "Car"
    assert r.output_label("car") == "car"
    assert r.output_label("CAR") == "car"  # first in config order
    assert parse_label_config(xml).value_key == "photo"


def test_parse_is_cached():
    assert parse_label_config(CONFIG_XML) is parse_label_config(CONFIG_XML)


@pytest.mark.parametrize("attr, value", [
    ("model_score_threshold", "1.5"), ("model_score_threshold", "high"), ("model_score_threshold", "nan"),
    ("model_max_detections", "0"), ("model_max_detections", "2.5"), ("model_max_detections", "many"),
    ("model_polygon_tolerance", "-1"), ("model_polygon_tolerance", "inf"),
])
def test_bad_attribute_values_are_rejected_clearly(attr, value):
    xml = f"""<View><Image name="image" value="$image"/>
      <PolygonLabels name="poly" toName="image" {attr}="{value}"><Label value="Cat"/></PolygonLabels></View>"""
    with pytest.raises(UnsupportedConfig) as e:
        parse_label_config(xml)
    assert f"control 'poly': {attr}=\"{value}\" is not valid" in str(e.value)
    assert isinstance(e.value, BadRequest)


def test_no_supported_control_lists_what_was_found():
    xml = """<View><Image name="image" value="$image"/>
      <Choices name="c" toName="image"><Choice value="a"/></Choices>
      <Text name="t" value="$text"/>
      <RectangleLabels name="spans" toName="t"><Label value="X"/></RectangleLabels></View>"""
    with pytest.raises(UnsupportedConfig) as e:
        parse_label_config(xml)
    msg = str(e.value)
    assert msg.startswith("label config has no RectangleLabels, PolygonLabels or BrushLabels attached to an Image; "
                          "found: ")
    assert "Choices(name=c, toName=image)" in msg and "RectangleLabels(name=spans, toName=t)" in msg


@pytest.mark.parametrize("xml", ["", "   ", "<View><Image name='image' value='$image'>", "not xml at all"])
def test_malformed_config(xml):
    with pytest.raises(UnsupportedConfig):
        parse_label_config(xml)


def test_controls_on_a_second_image_are_left_out(caplog):
    xml = """<View><Image name="a" value="$front"/><Image name="b" value="$back"/>
      <BrushLabels name="m" toName="a"><Label value="Cat"/></BrushLabels>
      <RectangleLabels name="r" toName="b"><Label value="Cat"/></RectangleLabels>
      <PolygonLabels name="p" toName="a"><Label value="Cat"/></PolygonLabels></View>"""
    with caplog.at_level(logging.WARNING):
        cfg = parse_label_config(xml)
    assert cfg.value_key == "front"
    assert [c.name for c in cfg.controls] == ["m", "p"]
    assert "['r']" in caplog.text
