"""Label Studio protocol rules: labelling config, context items -> clicks, boxes, responses (pure)."""
from __future__ import annotations

import math
import time

import pytest
from backend_support import LABEL_CONFIG, keypoint, rectangle
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.label_studio_prompts import task_prompts

from connectors.protocol import (
    ContextItem,
    PredictRequest,
    ProtocolError,
    Task,
    brush_result,
    holding_box,
    parse_body,
    parse_label_config,
    percent_to_pixel,
    prediction,
    project_id,
    prompt_from_items,
    stored_objects,
    stored_prompts,
)
from interformer.clicks import Click
from pipeline.box_prompt import BOX_MARGIN, is_finite_number

SIZE = (48, 64)  # (H, W)


@pytest.fixture(scope="module")
def config():
    return parse_label_config(LABEL_CONFIG)


def items(*raw):
    return [ContextItem.model_validate(r) for r in raw]


def test_label_config_is_understood(config):
    assert config.images == {"image": "image"}
    assert config.brushes["image"].name == "tag"
    assert config.brushes["image"].labels == ("object", "background_thing")
    assert config.prompts["kp"].type == "keypointlabels"
    assert config.prompts["box"].type == "rectanglelabels"


@pytest.mark.parametrize("xml, message", [
    ("", "empty"),
    ("<View><Image name='i' value='$x'/>", "not valid XML"),
    ("<View><BrushLabels name='b' toName='i'/></View>", "no <Image>"),
    ("<View><Image name='i' value='$x'/><KeyPointLabels name='k' toName='i'/></View>", "no <BrushLabels>"),
    ("<View><Image name='i' value='$x'/><BrushLabels name='b' toName='other'/></View>", "points at no <Image>"),
    ("<!DOCTYPE x [<!ENTITY a 'b'>]><View/>", "DOCTYPE"),
])
def test_bad_label_configs_name_the_problem(xml, message):
    with pytest.raises(ProtocolError, match=message) as e:
        parse_label_config(xml)
    assert e.value.status == 422


def test_percent_coordinates_become_pixels_of_the_original_size():
    assert percent_to_pixel(25.0, 64, "x") == 16
    assert percent_to_pixel(0.0, 64, "x") == 0
    assert percent_to_pixel(100.0, 64, "x") == 63  # the right edge is the last pixel
    assert percent_to_pixel(99.99, 48, "y") == 47
    for bad in (-0.1, 100.5, float("nan"), "12", None, True):
        with pytest.raises(ProtocolError):
            percent_to_pixel(bad, 64, "x")


def test_keypoints_keep_order_and_sign(config):
    p = prompt_from_items(items(keypoint(25, 50, SIZE, item_id="a"), keypoint(75, 10, SIZE, False, item_id="b")),
                          config)
    assert p.clicks == (Click(24, 16, True), Click(4, 48, False))
    assert p.label == "object" and p.brush_name == "tag" and p.image_name == "image"
    assert p.original_size == SIZE and p.box is None
    assert p.region_key == "id:a"
    assert p.has_positive


def test_missing_is_positive_means_positive(config):
    raw = keypoint(10, 10, SIZE)
    del raw["is_positive"]
    assert prompt_from_items(items(raw), config).clicks[0].positive


def test_negative_only_prompt_has_no_positive(config):
    p = prompt_from_items(items(keypoint(10, 10, SIZE, False)), config)
    assert not p.has_positive


def test_unknown_label_is_refused_with_the_known_labels(config):
    with pytest.raises(ProtocolError, match=r"'car' is not one of the BrushLabels 'tag' labels") as e:
        prompt_from_items(items(keypoint(10, 10, SIZE, label="car")), config)
    assert e.value.status == 422


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["value"].pop("x"), "no value.x"),
    (lambda r: r["value"].update(keypointlabels=[]), "has no label"),
    (lambda r: r.update(image_rotation=90), "rotated images"),
    (lambda r: r["value"].update(y=140.0), "outside the image"),
    (lambda r: r.update(from_name="box"), "tag is another type"),
    (lambda r: r.update(to_name="nope"), "no BrushLabels with toName='nope'"),
])
def test_malformed_keypoints_are_refused(config, mutate, message):
    raw = keypoint(10, 10, SIZE)
    mutate(raw)
    with pytest.raises(ProtocolError, match=message):
        prompt_from_items(items(raw), config)


def test_items_must_agree_on_the_image_size(config):
    with pytest.raises(ProtocolError, match="disagree on the original image size"):
        prompt_from_items(items(keypoint(10, 10, SIZE), keypoint(20, 20, (50, 64), item_id="k2")), config)


def test_context_without_prompt_items_is_refused(config):
    with pytest.raises(ProtocolError, match="no keypointlabels or rectanglelabels"):
        prompt_from_items([], config)


def test_a_box_becomes_a_centre_click_and_a_grown_region(config):
    p = prompt_from_items(items(rectangle(25, 25, 50, 50, SIZE)), config)  # x 16..48, y 12..36 pixels
    assert p.clicks == (Click(24, 32, True),)
    mx, my = BOX_MARGIN * 32, BOX_MARGIN * 24
    assert p.box == (math.floor(16 - mx), math.floor(12 - my), math.ceil(48 + mx), math.ceil(36 + my))
    assert p.region_key == "id:b1"


def test_box_region_is_clipped_to_the_image_and_keypoints_follow_the_box(config):
    p = prompt_from_items(items(keypoint(99, 99, SIZE, False, item_id="k"), rectangle(0, 0, 100, 100, SIZE)),
                          config)
    assert p.box == (0, 0, SIZE[1], SIZE[0])
    assert p.clicks[0] == Click(24, 32, True)  # the box's click comes first: it starts the object
    assert p.clicks[1] == Click(47, 63, False)


@pytest.mark.parametrize("change, message", [
    (dict(width=0), "no area"),
    (dict(x=80, width=30), "leaves the image"),
    (dict(rotation=15), "rotated rectangles"),
    (dict(height="a"), "must be a finite number"),
    (dict(rotation="abc"), "value.rotation must be a finite number"),
    (dict(x=[1]), "value.x must be a finite number"),
])
def test_bad_boxes_are_refused(config, change, message):
    raw = rectangle(10, 10, 20, 20, SIZE)
    raw["value"].update(change)
    with pytest.raises(ProtocolError, match=message):
        prompt_from_items([parse_body(ContextItem, raw)], config)


def test_stored_keypoints_of_the_newest_annotation_give_one_prompt_per_label(config):
    old = {"updated_at": "2026-01-01", "result": [keypoint(10, 10, SIZE)]}
    new = {"updated_at": "2026-02-01", "result": [
        keypoint(50, 50, SIZE, item_id="a"), keypoint(60, 60, SIZE, False, item_id="b"),
        keypoint(20, 80, SIZE, label="background_thing", item_id="c"),
        {"type": "brushlabels", "value": {"rle": [1, 2]}},
    ]}
    task = Task(id=3, data={"image": "x"}, annotations=[old], drafts=[new])
    prompts, refused = stored_prompts(task, config)
    assert [p.label for p in prompts] == ["object", "background_thing"] and refused == []
    assert len(prompts[0].clicks) == 2 and len(prompts[1].clicks) == 1
    assert stored_prompts(Task(id=4, data={"image": "x"}), config) == ([], [])


def test_brush_result_has_what_label_studio_needs():
    from connectors.protocol import Prompt

    prompt = Prompt(clicks=(Click(1, 1, True),), label="object", brush_name="tag", image_name="image",
                    original_size=SIZE)
    r = brush_result([1, 2, 3], prompt, 0.75)
    assert r["type"] == "brushlabels" and r["from_name"] == "tag" and r["to_name"] == "image"
    assert (r["original_width"], r["original_height"]) == (64, 48)
    assert r["value"] == {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["object"]}
    pred = prediction([r], "interformer-x")
    assert pred["score"] == 0.75 and pred["model_version"] == "interformer-x"
    assert prediction([], "m") == {"result": [], "score": 0.0, "model_version": "m"}


def test_request_bodies_are_validated_with_clear_messages():
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        parse_body(PredictRequest, [1, 2])
    with pytest.raises(ProtocolError, match="tasks"):
        parse_body(PredictRequest, {"tasks": []})
    with pytest.raises(ProtocolError, match="tasks.0.data"):
        parse_body(PredictRequest, {"tasks": [{"id": 1}]})
    body = parse_body(PredictRequest, {"tasks": [{"id": 1, "data": {}, "predictions": [{"x": 1}]}],
                                       "project": "7.1795474399", "params": {"context": None}})
    assert body.params.context is None
    assert project_id(body.project) == "7"


# --------------------------------------------------------------------------------------------------
# Numbers beyond float range: refused as bad input, never an OverflowError


_ANY_NUMBER = st.one_of(st.integers(-(10**500), 10**500), st.floats(allow_nan=True, allow_infinity=True),
                        st.booleans(), st.none(), st.text(max_size=3), st.just(10**400), st.just(-(10**309)))


@settings(max_examples=300, deadline=None)
@given(_ANY_NUMBER, st.sampled_from(["keypointlabels", "rectanglelabels"]), st.sampled_from(["x", "y", "width",
                                                                                             "height", "rotation"]))
def test_number_checks_answer_for_any_value_and_bad_ones_are_protocol_errors(config, value, kind, key):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = False
    elif isinstance(value, int):
        expected = abs(value) < 2**1024 - 2**970  # the integers that round to a finite float
    else:
        expected = math.isfinite(value)
    assert is_finite_number(value) == expected
    base = keypoint(10, 10, SIZE) if kind == "keypointlabels" else rectangle(10, 10, 20, 20, SIZE)
    raw = {**base, "value": {**base["value"], key: value}}
    try:
        prompt_from_items([parse_body(ContextItem, raw)], config)
    except ProtocolError as e:
        assert e.status == 422 and len(e.message) < 1000
    try:
        percent_to_pixel(value, 64, "x")
    except ProtocolError as e:
        assert e.status == 422 and len(e.message) < 200


def test_one_saved_keypoint_beyond_float_range_does_not_abort_bulk_prompts(config):
    bad = {"id": 1, "data": {"image_id": "a"}, "annotations": [{"id": 1, "result": [
        {**keypoint(10, 10, SIZE), "value": {"x": 10**400, "y": 5, "keypointlabels": ["object"]}}]}]}
    good = {"id": 2, "data": {"image_id": "b"}, "annotations": [{"id": 2, "result": [keypoint(10, 10, SIZE)]}]}
    found = task_prompts([bad, good], config, config.brushes["image"])
    assert [job.image_id for job in found.images] == ["b"]
    assert len(found.problems) == 1 and "finite number" in found.problems[0].detail


_BOX = st.tuples(st.integers(0, 80), st.integers(0, 80), st.integers(1, 20), st.integers(1, 20),
                 st.sampled_from(["object", "background_thing"]))
_POINT = st.tuples(st.integers(0, 99), st.integers(0, 99), st.sampled_from(["object", "background_thing"]),
                   st.booleans())


@settings(max_examples=80, deadline=None)
@given(boxes=st.lists(_BOX, max_size=4), points=st.lists(_POINT, max_size=6))
def test_saved_regions_give_one_prompt_per_box_and_per_label_of_the_other_keypoints(config, boxes, points):
    """Batch predictions: every saved rectangle is its own object (with the keypoints of its label inside it);
    keypoints outside every box of their label form one object per label, in their saved order, unless they
    are all negative (nothing to segment: refused, as bulk pre-annotation refuses them)."""
    result = [rectangle(x, y, w, h, SIZE, label=lab, item_id=f"b{n}") for n, (x, y, w, h, lab) in enumerate(boxes)]
    result += [keypoint(x, y, SIZE, pos, label=lab, item_id=f"k{n}") for n, (x, y, lab, pos) in enumerate(points)]
    task = Task(id=1, data={"image": "x"}, annotations=[{"result": result}])
    prompts, refused = stored_prompts(task, config)

    def inside(p, b):
        return b[4] == p[2] and b[0] <= p[0] <= b[0] + b[2] and b[1] <= p[1] <= b[1] + b[3]

    loose = [p for p in points if not any(inside(p, b) for b in boxes)]
    loose_labels = {p[2] for p in loose}
    negative_only = {lab for lab in loose_labels if not any(p[3] for p in loose if p[2] == lab)}
    assert len(refused) == len(negative_only) and all("only negative keypoints" in r for r in refused)
    assert len(prompts) == len(boxes) + len(loose_labels) - len(negative_only)
    regions = [p.box for p in prompts if p.box is not None]
    assert len(regions) == len(boxes)  # no box dropped or merged
    unused = sum(1 for p in loose if p[2] in negative_only)
    assert sum(len(p.clicks) for p in prompts) == len(boxes) + len(points) - unused  # every other click used once


def test_the_label_picks_among_several_output_tags_of_one_image():
    """Two BrushLabels tags on one image (people, cars): a click labelled 'person' is answered in 'people'."""
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="people" toName="image"><Label value="person"/></BrushLabels>
      <BrushLabels name="cars" toName="image"><Label value="car"/></BrushLabels>
      <KeyPointLabels name="kp" toName="image" smart="true"><Label value="person"/><Label value="car"/></KeyPointLabels>
    </View>"""
    config = parse_label_config(xml)
    assert config.output_for("image", "person").name == "people"
    assert config.output_for("image", "car").name == "cars"
    with pytest.raises(ProtocolError, match="not one of the BrushLabels"):
        config.output_for("image", "bike")


# --------------------------------------------------------------------------------------------------
# Work per stored prompt item is bounded: no rectangle x keypoint or label-list products


def _held_by_reference(boxes: list[dict], point: dict) -> int | None:
    """The holding rule written out plainly: the smallest rectangle holding the point, edges included."""
    def holds(b):
        try:
            x, y = float(point["x"]), float(point["y"])
            return float(b["x"]) <= x <= float(b["x"]) + float(b["width"]) and \
                float(b["y"]) <= y <= float(b["y"]) + float(b["height"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return False
    inside = [n for n, b in enumerate(boxes) if holds(b)]
    return min(inside, key=lambda n: float(boxes[n]["width"]) * float(boxes[n]["height"])) if inside else None


_NUMBER = st.one_of(st.integers(-10, 110), st.floats(allow_nan=True), st.sampled_from(["5", "x", None, 10**400]))
_RECT = st.fixed_dictionaries({"x": _NUMBER, "y": _NUMBER, "width": _NUMBER, "height": _NUMBER})


@settings(max_examples=300, deadline=None)
@given(st.lists(_RECT, max_size=8), st.fixed_dictionaries({"x": _NUMBER, "y": _NUMBER}))
def test_the_holding_rectangle_is_the_smallest_that_holds_the_keypoint(boxes, point):
    assert holding_box(boxes, point) == _held_by_reference(boxes, point)


def test_grouping_keypoints_and_rectangles_of_other_labels_is_linear(config):
    """Rectangles of a label the config lacks and keypoints of another: no keypoint is compared with them
    (was O(keypoints x rectangles): 2000 of each took 15 s)."""
    n = 5000
    raw = [rectangle(1, 1, 10, 10, SIZE, label="not-a-label", item_id=f"b{i}") for i in range(n)] + \
          [keypoint(80, 80, SIZE, item_id=f"k{i}") for i in range(n)]
    t0 = time.perf_counter()
    objects = stored_objects(items(*raw), config)
    assert time.perf_counter() - t0 < 5.0
    assert len(objects) == n + 1 and len(objects[-1]) == n  # each rectangle alone; the keypoints one object


def test_refusals_name_a_few_labels_whatever_the_config_holds():
    """A config of 40,000 labels and 1,000 keypoints of labels it lacks: each refusal is short, and reading
    the labels does not walk the list per item (was: 400 KB per refusal, 20 s)."""
    labels = "".join(f'<Label value="l{i:05d}"/>' for i in range(40_000))
    config = parse_label_config(f'<View><Image name="image" value="$image"/><BrushLabels name="tag" '
                                f'toName="image">{labels}</BrushLabels></View>')
    raw = [keypoint(50, 50, SIZE, label=f"missing{i}" + "x" * 1000, item_id=f"k{i}") for i in range(1000)]
    raw.append(keypoint(50, 50, SIZE, label="l39999", item_id="ok"))
    t0 = time.perf_counter()
    prompts, refused = stored_prompts(Task(id=1, data={"image": "x"}, annotations=[{"result": raw}]), config)
    assert time.perf_counter() - t0 < 5.0
    assert [p.label for p in prompts] == ["l39999"] and len(refused) == 1000
    assert max(len(r) for r in refused) < 400
    assert "['l00000', 'l00001', 'l00002', 'l00003', 'l00004'] and 39995 more" in refused[0]
