"""Label Studio configs with several images and with label aliases, on every path that reads them: the
interactive and batch /predict (the FastAPI app in-process, with a segmenter that records its requests) and
bulk pre-annotation (`task_prompts` / `prediction_for`).

- a prompt's image identity comes from the Image tag it was drawn on, never from another tag's id;
- a `<Label alias=...>` is the same label as its value: the chosen tag is the alias-free config's, and the
  answer carries the output tag's alias when it has one;
- saved prompts of one label on several images are one object per image, and one refused object never
  costs a task its other objects;
- every cause of a refused rectangle has its own reason code.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from backend_support import keypoint, rectangle
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from connectors.label_studio_prompts import prediction_for, task_prompts
from connectors.onscreen import onscreen_candidates
from connectors.protocol import (
    ContextItem,
    ProtocolError,
    Task,
    parse_label_config,
    prompt_from_items,
    stored_prompts,
    task_image,
)
from connectors.rle import mask_to_rle
from connectors.segment import SegmentRequest, SegmentResult
from connectors.server import ServerSettings, create_app
from pipeline import box_prompt
from pipeline import prompts as reasons
from pipeline.preannotation import ImageResult, ObjectResult
from pipeline.prompts import filter_labels

MV = "interformer-test"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class RecordingSegmenter:
    """A segmenter that answers every request with a 1-pixel mask and keeps the requests; the score of an
    answer is the request's index in `requests`, so that a region can be traced to its request."""

    def __init__(self) -> None:
        self.requests: list[SegmentRequest] = []

    async def segment(self, req: SegmentRequest) -> SegmentResult:
        await asyncio.sleep(0)
        self.requests.append(req)
        h, w = req.original_size
        mask = np.zeros((h, w), np.uint8)
        mask[0, 0] = 1
        return SegmentResult(rle=mask_to_rle(mask), score=float(len(self.requests) - 1), image_id=req.image_id or "",
                             path="step", steps=1, area=1, polygons=[[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]])

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def app():
    seg = RecordingSegmenter()
    with TestClient(create_app(ServerSettings(model_version=MV), seg)) as client:
        yield client, seg


def on(item: dict, image: str, tool: str) -> dict:
    return {**item, "to_name": image, "from_name": tool}


# --------------------------------------------------------------------------------------------------
# 1. The image identity of a prompt comes from the Image tag it was drawn on


def multi_image_config(names: list[str]) -> str:
    tags = "".join(
        f'<Image name="{n}" value="${n}_url"/><BrushLabels name="brush_{n}" toName="{n}"><Label value="obj"/>'
        f'</BrushLabels><KeyPointLabels name="kp_{n}" toName="{n}"><Label value="obj"/></KeyPointLabels>'
        for n in names)
    return f"<View>{tags}</View>"


@st.composite
def multi_image_tasks(draw):
    """(config names, clicked tag, task data): every tag has its URL or its own id (or both); the task may have
    a plain image_id too."""
    names = [f"im{n}" for n in range(draw(st.integers(1, 4)))]
    clicked = draw(st.sampled_from(names))
    data: dict = {}
    for n in names:
        has_url, has_id = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
        if has_url:
            data[f"{n}_url"] = f"/data/{n}.png"
        if has_id:
            data[f"image_id_{n}"] = f"id-{n}"
    if draw(st.booleans()):
        data["image_id"] = "plain-id"
    return names, clicked, data


def expected_identity(names: list[str], tag: str, data: dict) -> tuple[str | None, str | None]:
    """The documented rule: image_id_<tag>, else image_id with one Image tag only; the tag's own URL."""
    own = data.get(f"image_id_{tag}")
    if own is None and len(names) == 1:
        own = data.get("image_id")
    return own, data.get(f"{tag}_url")


def never_another_tags(names: list[str], tag: str, data: dict, image_id: str | None, image_ref: str | None) -> None:
    others = {data.get(f"image_id_{n}") for n in names if n != tag} | {data.get(f"{n}_url") for n in names if n != tag}
    if len(names) > 1:
        others.add(data.get("image_id"))
    others.discard(None)
    assert image_id not in others and image_ref not in others


SIZE = (30, 40)


@FAST
@given(case=multi_image_tasks())
def test_an_interactive_click_is_served_from_the_clicked_images_identity(app, case):
    client, seg = app
    names, clicked, data = case
    item = on(keypoint(50, 50, SIZE, label="obj"), clicked, f"kp_{clicked}")
    before = len(seg.requests)
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": data}], "label_config": multi_image_config(names),
                                      "params": {"context": {"result": [item]}}})
    assert r.status_code == 200, r.text
    req = seg.requests[before]
    assert (req.image_id, req.image_ref) == expected_identity(names, clicked, data)
    never_another_tags(names, clicked, data, req.image_id, req.image_ref)
    assert r.json()["results"][0]["result"][0]["to_name"] == clicked


@FAST
@given(case=multi_image_tasks(), drawn=st.data())
def test_batch_predictions_serve_each_image_from_its_own_identity(app, case, drawn):
    client, seg = app
    names, _, data = case
    annotated = drawn.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    result = [on(keypoint(20 + 10 * n, 50, SIZE, label="obj", item_id=f"k{n}"), tag, f"kp_{tag}")
              for n, tag in enumerate(annotated)]
    before = len(seg.requests)
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": data, "annotations": [{"result": result}]}],
                                      "label_config": multi_image_config(names)})
    assert r.status_code == 200, r.text
    regions = r.json()["results"][0]["result"]
    assert sorted(reg["to_name"] for reg in regions) == sorted(annotated)  # one object per image
    for reg in regions:
        req = seg.requests[int(reg["score"])]
        assert before <= int(reg["score"])
        assert (req.image_id, req.image_ref) == expected_identity(names, reg["to_name"], data)
        never_another_tags(names, reg["to_name"], data, req.image_id, req.image_ref)


@settings(max_examples=80, deadline=None)
@given(case=multi_image_tasks())
def test_bulk_prompts_take_the_output_images_identity(case):
    names, _, data = case
    config = parse_label_config(multi_image_config(names))
    result = [on(keypoint(50, 50, SIZE, label="obj", item_id=f"k{n}"), tag, f"kp_{tag}") for n, tag in enumerate(names)]
    for tag in names:
        out = task_prompts([{"id": 1, "data": data, "annotations": [{"result": result}]}], config,
                           config.brushes[tag])
        (job,) = out.images
        image_id, ref = expected_identity(names, tag, data)
        assert (job.image_id, job.uri) == (image_id or ref, ref)
        never_another_tags(names, tag, data, image_id, ref)
        assert [o.key for o in job.objects] == ["ls:1:points:obj"] and out.problems == []


def test_a_task_without_the_clicked_images_identity_is_a_clear_422():
    config = parse_label_config(multi_image_config(["a", "b"]))
    with pytest.raises(ProtocolError, match="task 3 has neither data.image_id_b nor data.b_url") as e:
        task_image({"a_url": "/a.png", "image_id": "a.png", "image_id_a": "a"}, config, "b", "task 3")
    assert e.value.status == 422
    with pytest.raises(ProtocolError, match="image_id_b must be a string"):
        task_image({"b_url": "/b.png", "image_id_b": ["x"]}, config, "b")
    one = parse_label_config(multi_image_config(["a"]))
    assert task_image({"a_url": "/a.png", "image_id": 5}, one, "a") == ("5", "/a.png")


# --------------------------------------------------------------------------------------------------
# 2. Label aliases

LABELS = ["person", "car", "tree"]


@st.composite
def aliased_configs(draw):
    """(config with aliases, the same without, {tag: {value: alias}}): two BrushLabels tags on one image
    sharing the labels out, and keypoint / rectangle tools with every label, each Label with or without an
    alias of its own tag."""
    split = draw(st.integers(1, len(LABELS) - 1))
    tags = {"people": LABELS[:split], "things": LABELS[split:], "kp": LABELS, "box": LABELS}
    kinds = {"people": "BrushLabels", "things": "PolygonLabels", "kp": "KeyPointLabels", "box": "RectangleLabels"}
    aliases = {t: {v: f"{t}-{v[0]}" for v in labels if draw(st.booleans())} for t, labels in tags.items()}

    def xml(with_aliases: bool) -> str:
        body = ""
        for t, labels in tags.items():
            lab = "".join(f'<Label value="{v}"' + (f' alias="{aliases[t][v]}"' if with_aliases and v in aliases[t]
                                                   else "") + "/>" for v in labels)
            body += f'<{kinds[t]} name="{t}" toName="img">{lab}</{kinds[t]}>'
        return f'<View><Image name="img" value="$image"/>{body}</View>'

    return xml(True), xml(False), aliases


def named(value: str, tool: str, aliases: dict, use_alias: bool) -> str:
    return aliases[tool].get(value, value) if use_alias else value


def check_answer(prompt, plain, aliases) -> None:
    """The aliased config's prompt picks the alias-free one's tag and answers with that tag's name of the label."""
    assert (prompt.brush_name, prompt.output_type, prompt.image_name) == (plain.brush_name, plain.output_type,
                                                                          plain.image_name)
    assert prompt.label == aliases[plain.brush_name].get(plain.label, plain.label)
    assert plain.label in prompt.names and prompt.label in prompt.names


@settings(max_examples=80, deadline=None)
@given(cfg=aliased_configs(), value=st.sampled_from(LABELS), kinds=st.lists(st.booleans(), min_size=1, max_size=4),
       use_alias=st.lists(st.booleans(), min_size=4, max_size=4))
def test_interactive_and_batch_prompts_read_an_alias_as_its_label(cfg, value, kinds, use_alias):
    xml, plain_xml, aliases = cfg
    config, plain_config = parse_label_config(xml), parse_label_config(plain_xml)

    def items(aliased: bool) -> list[dict]:
        out = []
        for n, is_box in enumerate(kinds):
            tool = "box" if is_box else "kp"
            label = named(value, tool, aliases, aliased and use_alias[n])
            raw = rectangle(10, 10, 50, 50, SIZE, label=label, item_id=f"b{n}") if is_box else \
                keypoint(20, 20, SIZE, label=label, item_id=f"k{n}")
            out.append(on(raw, "img", tool))
        return out

    plain = prompt_from_items([ContextItem.model_validate(r) for r in items(False)], plain_config)
    prompt = prompt_from_items([ContextItem.model_validate(r) for r in items(True)], config)
    check_answer(prompt, plain, aliases)
    stored, refused = stored_prompts(Task(id=1, data={"image": "x"}, annotations=[{"result": items(True)}]), config)
    assert refused == []
    assert len(stored) == max(sum(kinds), 1)  # each box one object, keypoints in it under either name join it
    for p in stored:
        check_answer(p, plain, aliases)


@settings(max_examples=60, deadline=None)
@given(cfg=aliased_configs(), value=st.sampled_from(LABELS), use_alias=st.booleans(), saved_alias=st.booleans())
def test_a_saved_region_under_either_name_is_the_start_of_the_interactive_region(cfg, value, use_alias, saved_alias):
    xml, _, aliases = cfg
    config = parse_label_config(xml)
    prompt = prompt_from_items([ContextItem.model_validate(on(keypoint(1, 1, SIZE, label=named(
        value, "kp", aliases, use_alias)), "img", "kp"))], config)
    tool = prompt.brush_name
    mask = np.zeros(SIZE, np.uint8)
    mask[0:3, 0:3] = 1
    saved = {"type": prompt.output_type, "from_name": tool, "to_name": "img", "id": "saved",
             "original_height": SIZE[0], "original_width": SIZE[1],
             "value": {"format": "rle", "rle": [int(v) for v in mask_to_rle(mask)],
                       "points": [[0, 0], [10, 0], [10, 10]], "closed": True,
                       prompt.output_type: [named(value, tool, aliases, saved_alias)]}}
    task = Task(id=1, data={"image": "x"}, annotations=[{"id": 4, "result": [saved]}])
    found = onscreen_candidates(task, prompt)
    assert found is not None and len(found.shapes) == 1


@settings(max_examples=60, deadline=None)
@given(cfg=aliased_configs(), picks=st.lists(st.tuples(st.sampled_from(LABELS), st.booleans(), st.booleans()),
                                             min_size=1, max_size=5))
def test_bulk_prompts_read_an_alias_as_its_label_and_push_the_output_tags_name(cfg, picks):
    xml, plain_xml, aliases = cfg

    def run(config_xml: str, aliased: bool):
        config = parse_label_config(config_xml)
        output = config.outputs_of("brushlabels")[0]
        result = []
        for n, (value, is_box, use_alias) in enumerate(picks):
            tool = "box" if is_box else "kp"
            label = named(value, tool, aliases, aliased and use_alias)
            raw = rectangle(5 * n, 5 * n, 10, 10, SIZE, label=label, item_id=f"r{n}") if is_box else \
                keypoint(5 * n + 1, 5 * n + 1, SIZE, label=label, item_id=f"r{n}")
            result.append(on(raw, "img", tool))
        found = task_prompts([{"id": 1, "data": {"image": "/a.png"}, "annotations": [{"result": result}]}],
                             config, output)
        kept, refused = filter_labels(found.images, output.labels, "project")
        return output, found.problems, kept, refused

    output, problems, kept, refused = run(xml, True)
    _, plain_problems, plain_kept, plain_refused = run(plain_xml, False)
    assert problems == plain_problems == []
    assert [(p.key, p.label) for p in refused] == [(p.key, p.label) for p in plain_refused]
    assert [[(o.key, o.label) for o in j.objects] for j in kept] == [[(o.key, o.label) for o in j.objects]
                                                                     for j in plain_kept]
    for job in kept:
        rle = mask_utils.encode(np.asfortranarray(np.ones(job.size, np.uint8)))
        rle = {"size": list(job.size), "counts": rle["counts"].decode()}
        result = ImageResult(job.key, job.image_id, "d", list(job.size), [
            ObjectResult(o.key, job.image_id, o.label, o.kind, "ok", rle=rle, score=0.5) for o in job.objects])
        pushed = prediction_for(result, 1, output, MV)
        assert [r["value"]["brushlabels"] for r in pushed["result"]] == [
            [aliases["people"].get(o.label, o.label)] for o in job.objects]


def test_an_unknown_label_is_refused_naming_values_and_aliases():
    config = parse_label_config('<View><Image name="img" value="$image"/><BrushLabels name="b" toName="img">'
                                '<Label value="Object" alias="o"/></BrushLabels></View>')
    with pytest.raises(ProtocolError, match=r"label 'x' is not one of the BrushLabels 'b' labels \['Object \(alias o\)'\]"):
        prompt_from_items([ContextItem.model_validate(on(keypoint(1, 1, SIZE, label="x"), "img", "kp"))], config)
    prompt = prompt_from_items([ContextItem.model_validate(on(keypoint(1, 1, SIZE, label="o"), "img", "kp"))], config)
    assert (prompt.label, prompt.brush_name) == ("o", "b")


# --------------------------------------------------------------------------------------------------
# 3. Saved prompts over several images: one object per (image, label, box)

IMAGE_SIZES = {"a": (30, 40), "b": (50, 20), "c": (24, 24)}
TWO_LABELS = ["obj", "other"]


def three_images_config() -> str:
    labels = "".join(f'<Label value="{v}"/>' for v in TWO_LABELS)
    return "<View>" + "".join(
        f'<Image name="{n}" value="${n}"/><BrushLabels name="brush_{n}" toName="{n}">{labels}</BrushLabels>'
        f'<KeyPointLabels name="kp_{n}" toName="{n}">{labels}</KeyPointLabels>'
        f'<RectangleLabels name="box_{n}" toName="{n}">{labels}</RectangleLabels>' for n in IMAGE_SIZES) + "</View>"


_REGION = st.tuples(st.sampled_from(sorted(IMAGE_SIZES)), st.sampled_from(TWO_LABELS), st.booleans(),
                    st.integers(0, 60), st.integers(0, 60))


@settings(max_examples=100, deadline=None)
@given(regions=st.lists(_REGION, min_size=1, max_size=10))
def test_saved_prompts_over_several_images_are_one_object_per_image_label_and_box(regions):
    config = parse_label_config(three_images_config())
    result, boxes, points = [], [], []
    for n, (image, label, is_box, x, y) in enumerate(regions):
        size = IMAGE_SIZES[image]
        if is_box:
            result.append(on(rectangle(x, y, 30, 30, size, label=label, item_id=f"r{n}"), image, f"box_{image}"))
            boxes.append((image, label, x, y))
        else:
            result.append(on(keypoint(x, y, size, label=label, item_id=f"r{n}"), image, f"kp_{image}"))
            points.append((image, label, x, y))

    def in_box(p, b):
        return p[:2] == b[:2] and b[2] <= p[2] <= b[2] + 30 and b[3] <= p[3] <= b[3] + 30

    loose = {p[:2] for p in points if not any(in_box(p, b) for b in boxes)}
    prompts, refused = stored_prompts(Task(id=1, data={n: f"/{n}.png" for n in IMAGE_SIZES},
                                           annotations=[{"result": result}]), config)
    assert refused == []
    assert len(prompts) == len(boxes) + len(loose)
    for p in prompts:  # one image each: its own size and output tag
        assert p.original_size == IMAGE_SIZES[p.image_name] and p.brush_name == f"brush_{p.image_name}"
    assert sorted((p.image_name, p.label) for p in prompts if p.box is None) == sorted(loose)
    assert sum(len(p.clicks) for p in prompts) == len(regions)


def test_one_refused_object_does_not_cost_the_task_its_other_objects(app):
    client, _ = app
    good = on(keypoint(50, 50, IMAGE_SIZES["a"], label="obj", item_id="g"), "a", "kp_a")
    bad = on(keypoint(50, 50, IMAGE_SIZES["b"], label="dog", item_id="d"), "b", "kp_b")
    task = Task(id=1, data={"a": "/a.png", "b": "/b.png"}, annotations=[{"result": [good, bad]}])
    prompts, refused = stored_prompts(task, parse_label_config(three_images_config()))
    assert [p.image_name for p in prompts] == ["a"] and len(refused) == 1 and "'dog'" in refused[0]
    r = client.post("/predict", json={"tasks": [task.model_dump()], "label_config": three_images_config()})
    assert [reg["to_name"] for reg in r.json()["results"][0]["result"]] == ["a"]


# --------------------------------------------------------------------------------------------------
# 4. Every cause of a refused rectangle has its reason code; 5. a size mismatch is retried

# (cause, rectangle value, its code, the code of a Label Studio region with that value in bulk pre-annotation:
# a non-numeric coordinate is refused when the region is read, before the box rule, as a malformed region)
BOX_CAUSES = [
    ("a missing key", {"x": 1, "y": 1, "width": 5}, reasons.DEGENERATE_BOX, reasons.DEGENERATE_BOX),
    ("a rotation that is not a number", {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": "9"},
     reasons.DEGENERATE_BOX, reasons.BAD_IMAGE_ENTRY),
    ("a rotated box", {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": 30}, reasons.ROTATED_BOX,
     reasons.ROTATED_BOX),
    ("a coordinate that is not finite", {"x": float("nan"), "y": 1, "width": 5, "height": 5}, reasons.DEGENERATE_BOX,
     reasons.BAD_IMAGE_ENTRY),
    ("no area", {"x": 1, "y": 1, "width": 0, "height": 5}, reasons.DEGENERATE_BOX, reasons.DEGENERATE_BOX),
    ("negative size", {"x": 10, "y": 1, "width": -5, "height": 5}, reasons.DEGENERATE_BOX, reasons.DEGENERATE_BOX),
    ("leaving the image", {"x": 90, "y": 1, "width": 20, "height": 5}, reasons.BOX_OUTSIDE, reasons.BOX_OUTSIDE),
    ("starting before the image", {"x": -1, "y": 1, "width": 20, "height": 5}, reasons.BOX_OUTSIDE,
     reasons.BOX_OUTSIDE),
]


@pytest.mark.parametrize("cause, value, code, bulk_code", BOX_CAUSES, ids=[c[0] for c in BOX_CAUSES])
def test_every_refused_rectangle_has_its_causes_reason_code(cause, value, code, bulk_code):
    with pytest.raises(box_prompt.BoxPromptError) as e:
        box_prompt.box_to_click(value, SIZE)
    assert e.value.reason == code
    config = parse_label_config('<View><Image name="img" value="$image"/><BrushLabels name="b" toName="img">'
                                '<Label value="obj"/></BrushLabels></View>')
    region = {**on(rectangle(1, 1, 5, 5, SIZE, label="obj"), "img", "box"), "value": {**value, "rectanglelabels": ["obj"]}}
    found = task_prompts([{"id": 1, "data": {"image": "/a.png"}, "annotations": [{"result": [region]}]}], config,
                         config.brushes["img"])
    assert [p.reason for p in found.problems] == [bulk_code]


def test_a_rectangle_that_is_not_an_object_is_degenerate():
    with pytest.raises(box_prompt.BoxPromptError) as e:
        box_prompt.box_to_click([1, 2], SIZE)
    assert e.value.reason == reasons.DEGENERATE_BOX


def test_every_box_reason_is_a_known_reason_code():
    codes = {v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str)}
    assert {c for _, _, c, _ in BOX_CAUSES} <= codes


def test_a_size_mismatch_is_retried_by_a_later_run():
    def result(reason: str) -> ImageResult:
        return ImageResult("k", "i", "d", [4, 4], [ObjectResult("o", "i", "obj", "points", "failed", reason=reason)])

    assert not result(reasons.SIZE_MISMATCH).final  # re-encoding (EXIF orientation recorded) may cure it
    assert result(reasons.BAD_POINTS).final


# --------------------------------------------------------------------------------------------------
# 6. The backend's batch path and bulk pre-annotation make the same objects of the same saved regions

ONE_IMAGE = ('<View><Image name="a" value="$a"/><BrushLabels name="brush_a" toName="a">'
             + "".join(f'<Label value="{v}"/>' for v in TWO_LABELS) + '</BrushLabels>'
             '<KeyPointLabels name="kp_a" toName="a">' + "".join(f'<Label value="{v}"/>' for v in TWO_LABELS)
             + '</KeyPointLabels><RectangleLabels name="box_a" toName="a">'
             + "".join(f'<Label value="{v}"/>' for v in TWO_LABELS) + "</RectangleLabels></View>")
_COORD = st.integers(-20, 110).map(float)
_SAVED = st.one_of(
    st.tuples(st.just("box"), st.sampled_from(TWO_LABELS), _COORD, _COORD, st.integers(-5, 80).map(float),
              st.integers(-5, 80).map(float), st.sampled_from([0, 0, 0, 30, 90])),
    st.tuples(st.just("point"), st.sampled_from(TWO_LABELS), st.integers(0, 100).map(float),
              st.integers(0, 100).map(float), st.booleans()),
)


@settings(max_examples=150, deadline=None)
@given(saved=st.lists(_SAVED, min_size=1, max_size=8))
def test_batch_and_bulk_make_the_same_objects_of_any_saved_regions(saved):
    """Rectangles the box rule refuses (rotated, outside, degenerate) included: each path refuses them alone,
    and a keypoint inside one is its own object on both paths, never lost with it."""
    size = IMAGE_SIZES["a"]
    config = parse_label_config(ONE_IMAGE)
    result = []
    for n, (kind, label, *rest) in enumerate(saved):
        if kind == "box":
            x, y, w, h, rotation = rest
            region = on(rectangle(x, y, w, h, size, label=label, item_id=f"r{n}"), "a", "box_a")
            region["value"]["rotation"] = rotation
        else:
            x, y, positive = rest
            region = on(keypoint(x, y, size, positive, label=label, item_id=f"r{n}"), "a", "kp_a")
        result.append(region)
    batch, refused = stored_prompts(Task(id=1, data={"a": "/a.png"}, annotations=[{"result": result}]), config)
    bulk = task_prompts([{"id": 1, "data": {"a": "/a.png"}, "annotations": [{"result": result}]}], config,
                        config.brushes["a"])
    objects = [o for job in bulk.images for o in job.objects]
    assert sorted(repr((p.label, p.box, p.clicks)) for p in batch) == sorted(
        repr((o.label, o.box, o.clicks)) for o in objects)
    assert len(refused) == len(bulk.problems)
