"""Delivery of bulk predictions into a real Label Studio 1.23.2 (the session fixture `label_studio`): a task
never gets two predictions of one model version, whatever answer an import gets.

- "already predicted" is read from the predictions themselves, exactly: a task holding many long model
  versions (Label Studio's display field is cut at 500 characters), one holding a longer version that
  contains ours, one holding ours in other case;
- an import whose answer is lost after Label Studio committed it (a 502, a dropped connection, a client
  timeout, the run stopped during it) is sent once, and counted as pushed once the project shows it; task
  imports likewise, and the next run creates nothing twice;
- definite refusals: 401/403 stop the run with a clear error after one request, 429 waits for Retry-After
  and sends again, 400/422 name the bad task;
- the task list is read by id ranges: a task deleted during the read does not hide another one.
A loopback proxy (tests/ls_proxy.py) misbehaves on the chosen requests after forwarding them; every step is
ordered by events, never by sleeps.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ls_proxy import LabelStudioProxy

import pipeline.preannotation_run as run_module
from connectors.label_studio_client import LabelStudioError, LabelStudioProject
from connectors.label_studio_preannotation import ProjectLink, Pusher
from connectors.label_studio_prompts import prediction_for
from connectors.rle import mask_to_rle
from interformer.clicks import Click
from pipeline.preannotation import ImageResult, ObjectResult
from pipeline.prompts import ImageJob, ObjectPrompt, PromptSet, encode_mask

pytestmark = pytest.mark.slow

XML = """<View><Image name="image" value="$image"/>
<BrushLabels name="br" toName="image"><Label value="obj"/></BrushLabels></View>"""
MV = "interformer-small-light-pth-3f9a1c2e"


@pytest.fixture(scope="module")
def ls(label_studio):
    return label_studio


@pytest.fixture
def project(ls, request):
    client = ls.client()
    p = client.projects.create(title=request.node.name[:50], label_config=XML)
    yield client, p.id
    client.projects.delete(id=p.id)


def make_tasks(client, project_id: int, names) -> list[int]:
    return client.projects.import_tasks(id=project_id, return_task_ids=True, request=[
        {"data": {"image": f"/data/{n}.png", "image_id": n}} for n in names]).task_ids


def ours_per_task(client, project_id: int, mv: str = MV) -> Counter:
    return Counter(p.task for p in client.predictions.list(project=project_id) if p.model_version == mv)


def result(key: str) -> ImageResult:
    m = np.zeros((8, 8), bool)
    m[1:5, 2:6] = True
    o = ObjectResult(f"{key}:o", key, "obj", "points", "ok", clicks=[[2, 3, 1]], score=0.9, area=int(m.sum()),
                     rle=encode_mask(m))
    return ImageResult(key, key, "d", [8, 8], [o])


def opened(ls, project_id: int, url: str | None = None, timeout_s: float = 60.0) -> LabelStudioProject:
    p = LabelStudioProject(url or ls.url, ls.token, project_id, timeout_s=timeout_s)
    p.sleep = lambda s: pytest.fail(f"waited {s} s without a 429")
    return p


def brush_region() -> list[dict]:
    """One brush region, as a prediction that holds a mask carries it."""
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 1
    return [{"from_name": "br", "to_name": "image", "type": "brushlabels", "original_width": 8,
             "original_height": 8, "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": ["obj"]}}]


def test_already_predicted_is_read_exactly_from_the_predictions(ls, project):
    """Only a prediction of exactly this model version that holds a region counts: an empty one (what the
    backend answers Label Studio's "Retrieve predictions" with for a task without prompts, under the same
    version) holds no mask, and the run still delivers there."""
    client, pid = project
    a, b, c, d, e = make_tasks(client, pid, "abcde")
    older = [{"task": a, "result": brush_region(), "model_version": f"interformer-small-round{i:02d}-pth-{i:08x}"}
             for i in range(24)]
    client.projects.import_predictions(id=pid, request=older + [
        {"task": a, "result": brush_region(), "model_version": MV}])
    client.projects.import_predictions(id=pid, request=[
        {"task": b, "result": brush_region(), "model_version": MV + "-finetuned"},  # contains ours: not ours
        {"task": c, "result": brush_region(), "model_version": MV.upper()},  # ours in other case: not ours
        {"task": e, "result": [], "model_version": MV}])  # ours but empty: holds nothing
    p = opened(ls, pid)
    assert p.tasks_holding(MV) == {a}
    assert p.tasks_holding(MV, [a, b, c, d, e]) == {a}
    assert p.tasks_holding(MV + "-finetuned") == {b} and p.tasks_holding(MV[:-1]) == set()

    pusher = Pusher(p, MV, 10, {k: t for k, t in zip("abcde", (a, b, c, d, e))}, "fp")
    for k in "abcde":
        pusher.add(result(k))
    pusher.finish()
    assert pusher.pushed == 4 and pusher.already_there == 1 and not pusher.failures and not pusher.in_doubt
    assert ours_per_task(client, pid) == {a: 1, b: 1, c: 1, d: 1, e: 2}  # e: the empty one and the masks
    assert p.tasks_holding(MV) == {a, b, c, d, e}


TWO_TAGS = """<View><Image name="image" value="$image"/>
<BrushLabels name="br" toName="image"><Label value="obj"/></BrushLabels>
<BrushLabels name="cars" toName="image"><Label value="car"/></BrushLabels></View>"""


def test_a_prediction_holds_only_the_output_tag_it_fills(ls):
    """A run filling one output tag (`--ls-brush`) is not delivered by a prediction of another tag of the same
    project under the same version: each tag gets its prediction once, and neither a second one."""
    client = ls.client()
    pid = client.projects.create(title="two output tags", label_config=TWO_TAGS).id
    try:
        (a,) = make_tasks(client, pid, "a")
        client.projects.import_predictions(id=pid, request=[{"task": a, "result": brush_region(), "model_version": MV}])
        people = LabelStudioProject(ls.url, ls.token, pid, "br")
        cars = LabelStudioProject(ls.url, ls.token, pid, "cars")
        assert people.tasks_holding(MV) == {a} and cars.tasks_holding(MV) == set()
        assert cars.tasks_holding(MV, [a]) == set()

        pusher = Pusher(cars, MV, 10, {"a": a}, "fp")
        car = result("a")
        car.objects[0].label = "car"
        pusher.add(car)
        pusher.finish()
        assert pusher.pushed == 1 and cars.tasks_holding(MV) == {a} and people.tasks_holding(MV) == {a}
        again = Pusher(cars, MV, 10, {"a": a}, "fp")
        again.add(car)
        again.finish()
        assert again.pushed == 0 and again.already_there == 1 and ours_per_task(client, pid) == {a: 2}
    finally:
        client.projects.delete(id=pid)


@pytest.mark.parametrize("misbehaviour", [("after", 502, {}), ("after", 503, {}), "drop", "hold"])
def test_an_import_whose_answer_is_lost_is_never_sent_twice(ls, project, misbehaviour):
    client, pid = project
    tasks = make_tasks(client, pid, ["a", "b", "c"])
    first = {"done": False}

    def rule(method, path):
        if method == "POST" and "/import/predictions" in path and not first["done"]:
            first["done"] = True
            return misbehaviour
        return None

    proxy = LabelStudioProxy(ls.url, rule)
    try:
        p = opened(ls, pid, proxy.url, timeout_s=2.0 if misbehaviour == "hold" else 60.0)
        pusher = Pusher(p, MV, 2, dict(zip("abc", tasks)), "fp")
        for k in "abc":
            pusher.add(result(k))  # the first batch (a, b) gets no answer; c is pushed by finish
        if misbehaviour == "hold":
            assert [e[2] for e in proxy.posts("/import/predictions")] == ["hold"]
            proxy.release.set()  # Label Studio committed before the client gave up
        pusher.finish()
        assert len(proxy.posts("/import/predictions")) == 2  # no retry, no re-push
    finally:
        proxy.close()
    assert ours_per_task(client, pid) == {t: 1 for t in tasks}
    assert pusher.pushed == 3 and not pusher.in_doubt and not pusher.failures


def test_a_push_stopped_during_the_import_is_not_sent_again_by_the_run(ls, project, tmp_path, monkeypatch):
    """The real run loop (`_run_in`): SIGTERM arrives while an import is on its way (Label Studio committed
    it); the run's final flush must not send it again, and the next run pushes nothing twice."""
    client, pid = project
    make_tasks(client, pid, [f"im{i}" for i in range(4)])

    def run(stop_in_import: bool):
        project_ = opened(ls, pid)
        if stop_in_import:
            real = project_.client.projects.import_predictions

            def committed_then_stopped(**kwargs):
                real(**kwargs)
                raise KeyboardInterrupt  # what the run's SIGTERM handler raises

            project_.client.projects.import_predictions = committed_then_stopped
        return _run_loop(ls, pid, tmp_path, monkeypatch, 4, project_)

    first = run(stop_in_import=True)
    assert first.interrupted and first.pushed == 2 and first.push_in_doubt == []
    assert sum(ours_per_task(client, pid).values()) == 2
    second = run(stop_in_import=False)
    assert second.delivered_before == 2 and second.pushed == 2
    assert set(ours_per_task(client, pid).values()) == {1} and sum(ours_per_task(client, pid).values()) == 4



def _run_loop(ls, pid, tmp_path, monkeypatch, n_images: int, project_: LabelStudioProject | None = None):
    """`_run_in`, the real run loop, with trivial masks for `n_images` images whose tasks exist in `pid`."""
    jobs = [ImageJob(f"im{i}", (8, 8), (ObjectPrompt(f"coco:{i}", f"im{i}", "obj", "points", (8, 8),
                                                     clicks=(Click(2, 2, True),)),)) for i in range(n_images)]

    def fake_segment_all(cfg, todo, summary, image_access=None):
        for j in todo:
            r = result(j.key)
            r.digest = j.digest()
            yield r

    monkeypatch.setattr(run_module, "segment_all", fake_segment_all)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", ls.token)
    cfg = run_module.PreannotateConfig(coco="x.json", ls_project=pid, ls_url=ls.url, push=True, push_batch=2,
                                       run_dir=str(tmp_path))
    link = ProjectLink(cfg)
    link.__dict__["project"] = project_ or opened(ls, pid)
    return run_module._run_in(cfg, link, Path(tmp_path), PromptSet(images=jobs), jobs, [], "fp", MV, "x")


@pytest.mark.parametrize("status", [503, 401])
def test_label_studio_failing_mid_run_stops_the_push_not_the_run(ls, project, tmp_path, monkeypatch, status):
    """Label Studio answering 503 (an outage) or 401 to the re-read before the second batch: nothing more is
    sent, every image is still segmented and recorded, the summary lists the rest as not pushed and says why,
    and the next run pushes exactly what is missing."""
    client, pid = project
    make_tasks(client, pid, [f"im{i}" for i in range(6)])
    imports = []

    def rule(method, path):
        if "/import/predictions" in path:
            imports.append(path)
        elif imports and method == "GET":
            return ("refuse", status, {})
        return None

    proxy = LabelStudioProxy(ls.url, rule)
    try:
        first = _run_loop(ls, pid, tmp_path, monkeypatch, 6, opened(ls, pid, proxy.url, timeout_s=10))
    finally:
        proxy.close()
    assert not first.interrupted and first.push_stopped and str(status) in first.push_stopped
    assert first.pushed == 2 and len(first.push_failures) == 4 and len(imports) == 1
    assert sum(ours_per_task(client, pid).values()) == 2
    second = _run_loop(ls, pid, tmp_path, monkeypatch, 6)
    assert second.pushed == 4 and second.push_stopped is None
    assert set(ours_per_task(client, pid).values()) == {1} and sum(ours_per_task(client, pid).values()) == 6


def test_a_second_stop_while_the_last_predictions_are_pushed_still_ends_with_a_summary(ls, project, tmp_path,
                                                                                      monkeypatch):
    """Ctrl-C, then Ctrl-C again during the final import: the run returns its summary (interrupted, the
    import in doubt), and the next run pushes nothing twice."""
    client, pid = project
    make_tasks(client, pid, [f"im{i}" for i in range(3)])
    project_ = opened(ls, pid)
    real = project_.client.projects.import_predictions
    calls = []

    def stopped_on_the_last(**kwargs):
        calls.append(len(kwargs["request"]))
        real(**kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second stop, during the final flush

    project_.client.projects.import_predictions = stopped_on_the_last
    first = _run_loop(ls, pid, tmp_path, monkeypatch, 3, project_)
    assert first.interrupted and calls == [2, 1]
    assert first.pushed == 3 and first.push_in_doubt == []  # the in-doubt import was found in the project
    second = _run_loop(ls, pid, tmp_path, monkeypatch, 3)
    assert second.pushed == 0 and sum(ours_per_task(client, pid).values()) == 3


@pytest.mark.parametrize("first_to_land", ["other", "this"])
def test_two_runs_importing_one_task_at_once_leave_exactly_one_prediction(ls, project, first_to_land):
    """The window the re-read leaves: run A re-reads its batch (nothing there), then run B re-reads, imports
    and settles, then A's import lands (or A lands first and B's comes after). Both imported every task; after
    their imports each task holds exactly one prediction of the version, the oldest."""
    client, pid = project
    names = ["a", "b", "c"]
    tasks = make_tasks(client, pid, names)
    task_of = dict(zip(names, tasks))
    other = Pusher(opened(ls, pid), MV, 10, task_of, "fp-other")
    state = {"done": False}

    def run_other_at_the_import(method, path):
        if "/import/predictions" in path and not state["done"] and first_to_land == "other":
            state["done"] = True
            for n in names:
                other.add(result(n))
            other.finish()

    proxy = LabelStudioProxy(ls.url, before=run_other_at_the_import)
    try:
        this = Pusher(opened(ls, pid, proxy.url), MV, 10, task_of, "fp")
        for n in names:
            this.add(result(n))
        this.finish()
        if first_to_land == "this":
            before = {p.task: p.id for p in client.predictions.list(project=pid)}
            # the other run re-read before this one's import landed: it imports too, then looks
            other.project.push([prediction_for(result(n), task_of[n], other.project.brush, MV, "fp-other")
                                for n in names])
            other._one_each(set(tasks))
    finally:
        proxy.close()
    assert ours_per_task(client, pid) == {t: 1 for t in tasks}
    kept = {p.task: p.id for p in client.predictions.list(project=pid) if p.model_version == MV}
    if first_to_land == "this":
        assert kept == before
    assert this.duplicates_removed + other.duplicates_removed == len(tasks)

@pytest.mark.parametrize("misbehaviour", [("after", 502, {}), "drop"])
def test_a_task_import_whose_answer_is_lost_creates_no_second_task(ls, project, tmp_path, misbehaviour):
    client, pid = project
    first = {"done": False}

    def rule(method, path):
        if method == "POST" and "/import" in path and "predictions" not in path and not first["done"]:
            first["done"] = True
            return misbehaviour
        return None

    proxy = LabelStudioProxy(ls.url, rule)
    cfg = run_module.PreannotateConfig(coco="x.json", ls_project=pid, ls_url=ls.url, push=True, run_dir=str(tmp_path))
    jobs = [ImageJob(n, (8, 8), ()) for n in "abc"]
    try:
        link = ProjectLink(cfg)
        link.__dict__["project"] = opened(ls, pid, proxy.url)
        with pytest.raises(LabelStudioError, match="run again"):
            link.attach_tasks(jobs, MV)
        assert len(proxy.posts("/import")) == 1
    finally:
        proxy.close()
    link = ProjectLink(cfg)
    link.__dict__["project"] = opened(ls, pid)
    attached = link.attach_tasks(jobs, MV)
    assert attached.tasks_created == 0 and attached.duplicate_tasks == [] and len(attached.jobs) == 3
    assert Counter(t.data["image_id"] for t in client.tasks.list(project=pid, include="id,data")) == {
        "a": 1, "b": 1, "c": 1}


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_stop_the_push_after_one_request(ls, project, status):
    client, pid = project
    tasks = make_tasks(client, pid, [f"i{n}" for n in range(8)])
    proxy = LabelStudioProxy(ls.url, lambda m, p: ("refuse", status, {}) if "/import/predictions" in p else None)
    try:
        pusher = Pusher(opened(ls, pid, proxy.url), MV, 4, {f"i{n}": t for n, t in enumerate(tasks)}, "fp")
        for n in range(8):
            pusher.add(result(f"i{n}"))
        pusher.finish()
        assert "API key" in pusher.stopped
        assert len(proxy.posts("/import/predictions")) == 1
        assert len(pusher.failures) == 8 and all("not pushed" in f["error"] for f in pusher.failures)
    finally:
        proxy.close()
    assert ours_per_task(client, pid) == {}


def test_too_many_requests_waits_for_retry_after_and_sends_again(ls, project):
    client, pid = project
    tasks = make_tasks(client, pid, ["a", "b"])
    answers = iter([("refuse", 429, {"Retry-After": "7"}), ("refuse", 429, {"Retry-After": "100000"})])
    proxy = LabelStudioProxy(ls.url, lambda m, p: next(answers, None) if "/import/predictions" in p else None)
    waits: list[float] = []
    try:
        p = opened(ls, pid, proxy.url)
        p.sleep = waits.append
        pusher = Pusher(p, MV, 10, dict(zip("ab", tasks)), "fp")
        pusher.add(result("a"))
        pusher.add(result("b"))
        pusher.finish()
        assert [e[2] for e in proxy.posts("/import/predictions")] == [429, 429, 201]
    finally:
        proxy.close()
    assert waits == [7.0, 60.0]  # Retry-After honoured, bounded
    assert pusher.pushed == 2 and ours_per_task(client, pid) == {t: 1 for t in tasks}


def test_a_bad_prediction_is_named_and_the_others_are_pushed(ls, project):
    client, pid = project
    tasks = make_tasks(client, pid, ["a", "b", "c"])
    p = opened(ls, pid)
    good = [{"task": t, "result": [], "model_version": MV} for t in tasks]
    bad = {"task": 10**9, "result": [], "model_version": MV}  # no such task: Label Studio answers 400
    outcome = p.push([good[0], bad, good[1], good[2]])
    assert outcome.created == 3 and [t for t, _ in outcome.refused] == [10**9] and outcome.in_doubt == []
    assert ours_per_task(client, pid) == {t: 1 for t in tasks}


def test_a_task_deleted_during_the_listing_hides_no_other_task(ls, project):
    client, pid = project
    tasks = make_tasks(client, pid, [f"i{n:02d}" for n in range(10)])
    state = {"pages": 0}

    def before(method, path):
        if method == "GET" and "/api/tasks" in path:
            state["pages"] += 1
            if state["pages"] == 2:  # between the first and the second page
                client.tasks.delete(id=tasks[0])

    proxy = LabelStudioProxy(ls.url, before=before)
    try:
        p = opened(ls, pid, proxy.url)
        listed = [t["id"] for t in p._pages("id", page_size=3)]
    finally:
        proxy.close()
    assert listed == tasks  # the first page was read before the deletion
