"""Prompts read from Label Studio tasks for bulk pre-annotation, and the project's output tag, against
hostile and unusual input: a prompt is used only on the output tag's image, every object key is unique
within a job (regions without an id included), a rotated image and a malformed task are per-task problems,
never an exception, and a config with two output tags on one image makes the job ask which one to fill.
"""
from __future__ import annotations

import pytest
from backend_support import keypoint, rectangle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.label_studio_client import LabelStudioError, LabelStudioProject
from connectors.label_studio_prompts import task_prompts
from connectors.protocol import parse_label_config

TWO_IMAGES = """<View>
  <Image name="left" value="$left"/><Image name="right" value="$right"/>
  <BrushLabels name="tag" toName="right"><Label value="object"/></BrushLabels>
  <RectangleLabels name="box_l" toName="left"><Label value="object"/></RectangleLabels>
  <RectangleLabels name="box" toName="right"><Label value="object"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="right"><Label value="object"/></KeyPointLabels>
</View>"""
ONE_IMAGE = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image"><Label value="object"/></KeyPointLabels></View>"""
RIGHT, LEFT = (40, 60), (300, 500)


def prompts(config_xml: str, tasks: list) -> tuple:
    config = parse_label_config(config_xml)
    brush = next(iter(config.brushes.values()))
    out = task_prompts(tasks, config, brush)
    return out.images, out.problems


def on(region: dict, to_name: str, from_name: str) -> dict:
    return {**region, "to_name": to_name, "from_name": from_name}


def test_only_regions_on_the_output_tags_image_are_prompts():
    right_box = on(rectangle(10, 10, 30, 30, RIGHT, item_id="r1"), "right", "box")
    left_box = on(rectangle(50, 50, 40, 40, LEFT, item_id="l1"), "left", "box_l")  # another image, another size
    mislabelled = on(rectangle(20, 20, 30, 30, RIGHT, item_id="l2"), "right", "box_l")  # a left tool on right?
    task = {"id": 7, "data": {"left": "/l.png", "right": "/r.png", "image_id": "r"},
            "annotations": [{"id": 1, "result": [right_box, left_box, mislabelled]}]}
    (job,), problems = prompts(TWO_IMAGES, [task])
    assert problems == []
    assert [o.key for o in job.objects] == ["ls:7:r1"] and job.size == RIGHT and job.uri == "/r.png"

    only_left = {**task, "annotations": [{"id": 1, "result": [left_box]}]}
    assert prompts(TWO_IMAGES, [only_left]) == ([], [])


def test_a_rotated_image_is_a_problem_as_in_the_backend():
    rotated = {**rectangle(10, 10, 30, 30, RIGHT, item_id="b1"), "image_rotation": 90}
    task = {"id": 3, "data": {"image": "/a.png"}, "annotations": [{"result": [rotated, keypoint(80, 80, RIGHT,
                                                                                                 item_id="k1")]}]}
    (job,), problems = prompts(ONE_IMAGE, [task])
    assert [p.key for p in problems] == ["ls:3:b1"] and "rotated images are not supported" in problems[0].detail
    assert [o.key for o in job.objects] == ["ls:3:points:object"]


region_ids = st.one_of(st.none(), st.just(""), st.sampled_from(["a", "b", "points:object"]), st.integers(0, 3))


@st.composite
def task_with_regions(draw, tid: int) -> dict:
    regions = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["box", "kp"]))
        x, y = draw(st.floats(0, 80)), draw(st.floats(0, 80))
        r = rectangle(x, y, 10, 10, RIGHT) if kind == "box" else keypoint(x, y, RIGHT, draw(st.booleans()))
        rid = draw(region_ids)
        if rid is None:
            r.pop("id")
        else:
            r["id"] = rid
        regions.append(r)
    return {"id": tid, "data": {"image": f"/{tid}.png"}, "annotations": [{"id": 1, "result": regions}]}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 50), min_size=1, max_size=4, unique=True).flatmap(
    lambda ids: st.tuples(*(task_with_regions(t) for t in ids))))
def test_object_keys_are_unique_within_a_job_with_or_without_region_ids(tasks):
    images, problems = prompts(ONE_IMAGE, list(tasks))
    keys = [o.key for j in images for o in j.objects]
    assert len(keys) == len(set(keys)) and all("None" not in k for k in keys)
    for job in images:
        assert all(o.key.startswith(f"ls:{job.task_id}:") for o in job.objects)
    regions = sum(len(t["annotations"][0]["result"]) for t in tasks)
    boxes = sum(1 for j in images for o in j.objects if o.kind == "box")
    assert boxes + len(problems) <= regions


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True),
                      st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=12)
hostile_region = st.one_of(json_value, st.fixed_dictionaries({
    "type": st.sampled_from(["rectanglelabels", "keypointlabels"]),
    "value": json_value, "original_width": json_value, "original_height": json_value,
    "image_rotation": json_value, "id": json_value, "to_name": st.sampled_from(["image", None, 5]),
    "from_name": json_value, "is_positive": json_value}))
hostile_task = st.one_of(json_value, st.fixed_dictionaries({
    "id": st.one_of(st.integers(1, 10**6), json_value),
    "data": st.one_of(st.fixed_dictionaries({"image": json_value, "image_id": json_value}), json_value),
    "annotations": st.one_of(json_value, st.lists(st.one_of(json_value, st.fixed_dictionaries({
        "id": json_value, "updated_at": json_value, "was_cancelled": json_value,
        "result": st.one_of(json_value, st.lists(hostile_region, max_size=4))})), max_size=3))}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_task, max_size=4))
def test_hostile_task_json_gives_prompts_or_problems_never_an_exception(tasks):
    images, problems = prompts(ONE_IMAGE, tasks)
    assert all(isinstance(p.detail, str) and p.key for p in problems)
    assert all(j.task_id is not None and j.objects for j in images)


@pytest.mark.parametrize("task", [
    {"id": "abc", "data": {"image": "/a.png"}, "annotations": [{"result": [rectangle(1, 1, 5, 5, RIGHT)]}]},
    {"id": 4, "data": ["/a.png"], "annotations": [{"result": [rectangle(1, 1, 5, 5, RIGHT)]}]},
    {"id": 4, "data": {"image": "/a.png"}, "annotations": 5},
])
def test_the_audited_malformed_tasks_are_problems(task):
    images, problems = prompts(ONE_IMAGE, [task, {"id": 9, "data": {"image": "/b.png"},
                                                  "annotations": [{"result": [rectangle(1, 1, 5, 5, RIGHT)]}]}])
    assert [j.task_id for j in images] == [9] and len(problems) == 1


TWO_BRUSHES = """<View><Image name="image" value="$image"/>
  <BrushLabels name="people" toName="image"><Label value="person"/></BrushLabels>
  <BrushLabels name="things" toName="image"><Label value="car"/></BrushLabels>
  <PolygonLabels name="poly_a" toName="image"><Label value="person"/></PolygonLabels>
  <PolygonLabels name="poly_b" toName="image"><Label value="car"/></PolygonLabels></View>"""


def test_every_output_tag_of_an_image_is_kept():
    config = parse_label_config(TWO_BRUSHES)
    assert [t.name for t in config.outputs_of("brushlabels")] == ["people", "things"]
    assert [t.name for t in config.outputs_of("polygonlabels")] == ["poly_a", "poly_b"]


class _Project:
    def __init__(self, xml: str) -> None:
        self.label_config = xml


@pytest.mark.parametrize("output, name, expect", [
    ("brushlabels", None, "name the one to fill (--ls-brush)"),
    ("polygonlabels", None, "name the one to fill (--ls-polygon)"),
    ("brushlabels", "things", "things"),
    ("polygonlabels", "poly_a", "poly_a"),
    ("brushlabels", "nope", "has no BrushLabels named 'nope'"),
])
def test_several_output_tags_on_one_image_must_be_named(monkeypatch, output, name, expect):
    import label_studio_sdk

    class FakeProjects:
        def get(self, id):
            return _Project(TWO_BRUSHES)

    class FakeClient:
        def __init__(self, **kwargs):
            self.projects = FakeProjects()

    monkeypatch.setattr(label_studio_sdk, "LabelStudio", FakeClient)
    if expect in ("things", "poly_a"):
        p = LabelStudioProject("http://127.0.0.1:9", "k", 1, brush_name=name, output=output)
        assert p.brush.name == expect and p.image_key == "image"
    else:
        with pytest.raises(LabelStudioError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            LabelStudioProject("http://127.0.0.1:9", "k", 1, brush_name=name, output=output)


# --- which task holds an image: the bulk job's task index and task creation use the backend's rule --------------


class _FakeLabelStudio:
    """label-studio-sdk's client over an in-memory project: its config, its tasks, task imports."""

    def __init__(self, xml: str, tasks: list[dict]) -> None:
        from types import SimpleNamespace

        self.tasks_store = tasks
        self.projects = SimpleNamespace(get=lambda id: _Project(xml), import_tasks=self._import)
        self.tasks = SimpleNamespace(list=self._list)

    def _import(self, id, request, return_task_ids=None, request_options=None):
        from types import SimpleNamespace

        start = max((t["id"] for t in self.tasks_store), default=0) + 1
        self.tasks_store += [{"id": start + n, **item} for n, item in enumerate(request)]
        return SimpleNamespace(task_ids=[start + n for n in range(len(request))] if return_task_ids else None)

    def _list(self, project, query, page, page_size, include=None):
        from types import SimpleNamespace

        def dumped(task):
            return SimpleNamespace(model_dump=lambda exclude_none=True: dict(task))
        return SimpleNamespace(items=[dumped(t) for t in self.tasks_store[:page_size]])


def fake_project(xml: str, tasks: list[dict]) -> LabelStudioProject:
    import label_studio_sdk

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(label_studio_sdk, "LabelStudio", lambda **kwargs: _FakeLabelStudio(xml, tasks))
        return LabelStudioProject("http://127.0.0.1:9", "k", 1)


id_value = st.one_of(st.none(), st.just(""), st.sampled_from(["a.jpg", "b.jpg", "7"]), st.integers(0, 9),
                     st.booleans(), st.lists(st.just("x"), max_size=1))


@st.composite
def task_data(draw, keys: tuple[str, ...]) -> dict:
    data = {}
    for key in keys:
        value = draw(id_value if key.startswith("image_id") else st.one_of(
            st.none(), st.just(""), st.sampled_from(["/data/a.jpg", "/data/b.jpg"]), st.integers(0, 3)))
        if value is not None or draw(st.booleans()):
            data[key] = value
    return data


CONFIGS = {ONE_IMAGE: ("image", "image_id", "image_id_image"),
           TWO_IMAGES: ("right", "left", "image_id", "image_id_right", "image_id_left")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), xml=st.sampled_from(sorted(CONFIGS)))
def test_the_task_index_names_each_tasks_image_as_the_backend_does_and_created_tasks_resolve_back(data, xml):
    from connectors.protocol import ProtocolError, task_image

    datas = data.draw(st.lists(task_data(CONFIGS[xml]), max_size=4))
    tasks = [{"id": n + 1, "data": d} for n, d in enumerate(datas)]
    project = fake_project(xml, tasks)
    config, image = project.config, project.brush.to_name
    for ref, task in zip(project.task_refs(), tasks):
        try:
            image_id, image_ref = task_image(task["data"], config, image)
            want = image_id if image_id is not None else image_ref
        except ProtocolError:
            want = None
        assert ref.id == task["id"] and ref.image_id == want
    new = [(f"new-{n}.jpg", f"/data/local-files/?d=imgs/new-{n}.jpg") for n in range(2)]
    result = project.create_tasks(new)
    assert result.count == 2 and result.ids == {len(datas) + 1, len(datas) + 2}
    made = tasks[len(datas):]
    assert [task_image(t["data"], config, image) for t in made] == new  # the backend finds their features
    assert [(r.image_id, r.id) for r in project.task_refs()[len(datas):]] == [(i, t["id"]) for (i, _), t in
                                                                              zip(new, made)]


@pytest.mark.parametrize("xml, key", [(ONE_IMAGE, "image_id_image"), (ONE_IMAGE, "image_id"),
                                      (TWO_IMAGES, "image_id_right")])
def test_a_prompt_file_job_is_attached_to_the_task_that_names_its_image(xml, key):
    from types import SimpleNamespace

    from connectors.label_studio_preannotation import ProjectLink
    from pipeline.prompts import ImageJob

    ref_key = "image" if xml == ONE_IMAGE else "right"
    tasks = [{"id": 1, "data": {ref_key: "/data/local-files/?d=imgs/a.jpg", key: "a.jpg"}}]
    project = fake_project(xml, tasks)
    project.tasks_holding = lambda model_version, task_ids=None: set()
    link = ProjectLink.__new__(ProjectLink)
    link.cfg = SimpleNamespace(image_url="/data/local-files/?d=imgs/{file_name}")
    link.__dict__["project"] = project
    jobs = [ImageJob("a.jpg", (10, 10), ()), ImageJob("b.jpg", (10, 10), ())]
    attached = link.attach_tasks(jobs, "mv")
    if xml == ONE_IMAGE:
        assert attached.tasks_created == 1 and [j.task_id for j in attached.jobs] == [1, 2]
        assert project.task_refs()[1].image_id == "b.jpg" and len(tasks) == 2
    else:  # Label Studio refuses a task naming one image of several: none is created, b.jpg is reported
        assert attached.tasks_created == 0 and [j.task_id for j in attached.jobs] == [1, None]
        assert [g["image_id"] for g in attached.no_task] == ["b.jpg"] and len(tasks) == 1


# --- which keypoints refine which rectangle: bulk and the backend's batch path group alike ----------------------

TWO_LABELS = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/><Label value="thing"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/><Label value="thing"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image"><Label value="object"/><Label value="thing"/></KeyPointLabels></View>"""
GRID = (200, 300)
labels = st.sampled_from(["object", "thing"])


@st.composite
def boxes_and_keypoints(draw) -> list[dict]:
    boxes = []
    for n in range(draw(st.integers(0, 3))):
        x, y = draw(st.floats(0, 80)), draw(st.floats(0, 80))
        w, h = draw(st.floats(5, 100 - x)), draw(st.floats(5, 100 - y))
        boxes.append(rectangle(x, y, w, h, GRID, label=draw(labels), item_id=f"b{n}"))
    points = []
    for n in range(draw(st.integers(1, 5))):
        if boxes and draw(st.booleans()):  # near a drawn edge: inside, on it, or in the ring a grown box adds
            v = draw(st.sampled_from(boxes))["value"]
            x = v["x"] + draw(st.sampled_from([0.0, v["width"]])) + draw(st.floats(-3, 3))
            y = v["y"] + draw(st.floats(-0.2, 1.2)) * v["height"]
        else:
            x, y = draw(st.floats(0, 100)), draw(st.floats(0, 100))
        points.append(keypoint(min(max(x, 0.0), 100.0), min(max(y, 0.0), 100.0), GRID, draw(st.booleans()),
                               label=draw(labels), item_id=f"k{n}"))
    return draw(st.permutations(boxes + points))


def grouping(prompts) -> list:
    """Objects as (label, box, clicks as a multiset), in a canonical order; objects without a positive click
    are nothing to segment on either path."""
    return sorted((p.label, p.box or (), tuple(sorted(p.clicks))) for p in prompts if any(c.positive for c in p.clicks))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boxes_and_keypoints())
def test_bulk_and_the_backend_batch_path_group_keypoints_with_rectangles_alike(regions):
    from connectors.protocol import Task, stored_prompts

    config = parse_label_config(TWO_LABELS)
    task = {"id": 5, "data": {"image": "/data/a.png"}, "annotations": [{"id": 1, "result": regions}]}
    found = task_prompts([task], config, config.outputs_of("brushlabels")[0])
    assert not [p for p in found.problems if p.reason != "bad_points"]
    bulk = [o for j in found.images for o in j.objects]
    backend, refused = stored_prompts(Task(**task), config)
    assert grouping(bulk) == grouping(backend)
