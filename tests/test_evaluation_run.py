"""An evaluation output folder: one run at a time, results only reused by the same settings (weights by
content, datasets by location and options), each sample counted once, reports written whole.

Every run here finds its samples already in results.jsonl, so no Ray is started."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.files
from pipeline.evaluation import EvalConfig, SampleResult, append_results, read_results
from pipeline.evaluation_report import summarize_run, unique_results
from pipeline.evaluation_run import (
    DatasetSelection, OutputLock, RunFolderError, WorkerPlacement, collect_samples, load_run, prepare_output,
    run_evaluation, run_settings, write_reports)
from pipeline.segmenters import SegmenterSpec

ROOT = Path(__file__).resolve().parents[1]
GRABCUT = SegmenterSpec("grabcut")
CONFIG = EvalConfig(max_clicks=2)
NOWHERE = WorkerPlacement(workers=1)


def _dataset(root: Path, stems: tuple[str, ...] = ("a", "b")) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for s in stems:
        cv2.imwrite(str(root / "images" / f"{s}.png"), np.full((8, 8, 3), 9, np.uint8))
        cv2.imwrite(str(root / "masks" / f"{s}.png"), np.eye(8, dtype=np.uint8))
    return root


def _result(dataset: str, sample_id: str, iou: float = 0.5) -> SampleResult:
    return SampleResult(dataset, sample_id, f"{sample_id}.png", "ritm", 8, 8, [iou, iou], [[0, 0, True]] * 2,
                        0.0, 0.0, [0.0, 0.0], 0.0)


def _done(out: Path, refs) -> None:
    """Results for every ref, as if a run had evaluated them."""
    out.mkdir(parents=True, exist_ok=True)
    append_results(out / "results.jsonl", [_result(r.dataset, r.sample_id) for r in refs])


def _run(out: Path, refs, spec: SegmenterSpec = GRABCUT, overwrite: bool = False):
    return run_evaluation("run", spec, CONFIG, refs, out, NOWHERE, overwrite)


# ---- a rerun reuses results only under the same settings ---------------------------------------------------

def test_a_checkpoint_is_recorded_by_content_and_a_replaced_file_is_refused(tmp_path):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"weights, first version")
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds"))]))
    _done(tmp_path / "out", refs)
    spec = SegmenterSpec("checkpoint", checkpoint=str(ckpt))
    assert _run(tmp_path / "out", refs, spec).already_done == 2
    assert _run(tmp_path / "out", refs, spec).already_done == 2  # same file: resumes
    pinned = spec.pinned()
    ckpt.write_bytes(b"weights, second version")  # same path, new weights
    with pytest.raises(RunFolderError, match=r"segmenter.*--output or --overwrite"):
        _run(tmp_path / "out", refs, spec)
    with pytest.raises(ValueError, match="changed after the run started"):
        pinned.build()  # a worker given the pinned spec refuses the new file too


def _coco(root: Path) -> Path:
    (root / "imgs").mkdir(parents=True)
    cv2.imwrite(str(root / "imgs" / "one.png"), np.zeros((8, 8, 3), np.uint8))
    doc = {"images": [{"id": 1, "file_name": "one.png", "height": 8, "width": 8}],
           "annotations": [{"id": 1, "image_id": 1, "area": 6.0, "segmentation": [[1, 1, 4, 1, 4, 3]]}]}
    (root / "ds.json").write_text(json.dumps(doc))
    return root


def _benchmark_root(root: Path) -> Path:
    gc = root / "GrabCut"
    (gc / "data_GT").mkdir(parents=True)
    (gc / "boundary_GT").mkdir()
    cv2.imwrite(str(gc / "data_GT" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(gc / "boundary_GT" / "a.png"), np.eye(8, dtype=np.uint8) * 255)
    return root


def _selections(tmp_path: Path) -> dict[str, tuple[DatasetSelection, DatasetSelection]]:
    """Pairs of selections that read a dataset of one name differently."""
    a, b = _dataset(tmp_path / "A" / "ds"), _dataset(tmp_path / "B" / "ds")
    c = _coco(tmp_path / "coco")
    r1, r2 = _benchmark_root(tmp_path / "root1"), _benchmark_root(tmp_path / "root2")
    coco = dict(specs=[str(c / "ds.json")], coco_images=c / "imgs")
    return {
        "another folder of that name": (DatasetSelection([str(a)]), DatasetSelection([str(b)])),
        "--ignore-value": (DatasetSelection([str(a)]), DatasetSelection([str(a)], ignore_value=255)),
        "--data-root": (DatasetSelection(["GrabCut"], r1), DatasetSelection(["GrabCut"], r2)),
        "--coco-min-area": (DatasetSelection(**coco), DatasetSelection(**coco, coco_min_area=1.0)),
        "--coco-include-crowd": (DatasetSelection(**coco), DatasetSelection(**coco, coco_include_crowd=True)),
        "--coco-images": (DatasetSelection(**coco),
                          DatasetSelection(coco["specs"], coco_images=_coco(tmp_path / "coco2") / "imgs")),
    }


@pytest.mark.parametrize("change", ["another folder of that name", "--ignore-value", "--data-root",
                                    "--coco-min-area", "--coco-include-crowd", "--coco-images"])
def test_a_dataset_read_from_elsewhere_or_otherwise_is_not_reused(tmp_path, change):
    first, second = _selections(tmp_path)[change]
    refs = collect_samples(first)
    _done(tmp_path / "out", refs)
    assert _run(tmp_path / "out", refs).already_done == len(refs)
    again = collect_samples(second)
    assert [r.key for r in again] == [r.key for r in refs]  # same names: the old code reused the results
    with pytest.raises(RunFolderError, match=rf"datasets\.{refs[0].dataset}.*--output or --overwrite"):
        _run(tmp_path / "out", again)
    outcome = _run(tmp_path / "out", again[:0], overwrite=True)  # --overwrite discards the old results
    assert outcome.already_done == 0 and read_results(tmp_path / "out" / "results.jsonl") == []


def test_a_folder_gains_datasets_and_resumes_with_the_same_ones(tmp_path):
    a = collect_samples(DatasetSelection([str(_dataset(tmp_path / "A" / "one"))]))
    b = collect_samples(DatasetSelection([str(_dataset(tmp_path / "A" / "two"))]))
    _done(tmp_path / "out", a + b)
    assert _run(tmp_path / "out", a).already_done == 2
    assert _run(tmp_path / "out", a + b).already_done == 4
    assert _run(tmp_path / "out", b).already_done == 2
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())
    assert sorted(recorded["datasets"]) == ["one", "two"]
    assert recorded["datasets"]["one"]["images"] == str((tmp_path / "A" / "one" / "images").resolve())


# ---- one run at a time, each sample counted once -----------------------------------------------------------

_HOLDER = """
import sys
from pathlib import Path
from pipeline.evaluation_run import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # hold the folder until the test closes our stdin
"""


def test_a_second_run_on_a_folder_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "out"
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds"))]))
    _done(out, refs)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"  # the other run is inside its locked section
        with pytest.raises(RunFolderError, match=rf"in use by another run \(process {holder.pid} "):
            _run(out, refs)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert _run(out, refs).already_done == 2  # the holder is gone: the folder is free again
    with OutputLock(out), pytest.raises(RunFolderError, match="one run at a time"):
        _run(out, refs)  # in one process too: each run opens the lock file itself
    assert len(read_results(out / "results.jsonl")) == 2


def test_a_sample_recorded_twice_counts_once_with_its_first_figures(tmp_path):
    out = tmp_path / "out"
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds"))]))
    out.mkdir()
    append_results(out / "results.jsonl", [_result("ds", "a", 0.9), _result("ds", "b", 0.8), _result("ds", "a", 0.1)])
    outcome = _run(out, refs)
    assert [(r.sample_id, r.ious[0]) for r in outcome.results] == [("a", 0.9), ("b", 0.8)]
    name, results, _ = load_run(out)
    assert [(r.sample_id, r.ious[0]) for r in results] == [("a", 0.9), ("b", 0.8)]
    rows = summarize_run("run", outcome.results + outcome.results, 2)
    assert rows[0].summary.samples == 2
    write_reports(rows, out, outcome.results + outcome.results)
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2 * 2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["d1", "d2"]), st.sampled_from(["s1", "s2", "s3"]),
                          st.floats(0, 1)), min_size=1, max_size=12))
def test_summaries_count_each_sample_once_whatever_the_repeats(records):
    results = [_result(d, s, iou) for d, s, iou in records]
    first: dict[tuple[str, str], float] = {}
    for d, s, iou in records:
        first.setdefault((d, s), iou)
    assert [(r.key, r.ious[0]) for r in unique_results(results)] == list(first.items())
    for row in summarize_run("run", results, 2):
        ious = [v for (d, _), v in first.items() if d == row.dataset]
        assert row.summary.samples == len(ious)
        assert row.summary.miou[0] == pytest.approx(float(np.mean(ious)))


# ---- reports are written whole --------------------------------------------------------------------------

REPORTS = ("results.csv", "summary.md", "summary.json", "miou.png")


@pytest.mark.parametrize("failing", range(len(REPORTS)))
def test_an_interrupted_report_write_leaves_every_file_whole(tmp_path, monkeypatch, failing):
    """The n-th report file's write is interrupted just before it is complete on disk: that file keeps its
    previous content (never a truncated one), the ones before it are new, and no temporary file is left."""
    old_results = [_result("ds", "a", 0.25)]
    new_results = [_result("ds", "a", 0.75), _result("ds", "b", 0.5)]
    write_reports(summarize_run("run", old_results, 2), tmp_path, old_results)
    before = {n: (tmp_path / n).read_bytes() for n in REPORTS}
    calls = []

    def interrupted_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > failing:
            raise OSError("disk full")

    monkeypatch.setattr(pipeline.files.os, "fsync", interrupted_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_reports(summarize_run("run", new_results, 2), tmp_path, new_results)
    after = {n: (tmp_path / n).read_bytes() for n in REPORTS}
    assert [after[n] != before[n] for n in REPORTS] == [i < failing for i in range(len(REPORTS))]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORTS)


# ---- --overwrite leaves nothing of the discarded run; a damaged results file is one line -----------------

def test_a_folder_of_the_older_interformer_loop_is_not_resumed_and_ritm_folders_are(tmp_path):
    """The InterFormer protocol's loop changed (padding clicks applied, a forward pass at steps without a
    click, NoC in float64): a folder whose run.json the older loop wrote (no protocol revision) would mix both
    loops' results, so it is refused; a RITM-protocol folder recorded the same way still resumes."""
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds"))]))
    for protocol, refused in (("interformer", True), ("ritm", False)):
        out = tmp_path / protocol
        config = EvalConfig(protocol=protocol, max_clicks=2)
        info = run_settings("run", GRABCUT, config, refs)
        older = {**info, "eval": {k: v for k, v in info["eval"].items() if k != "protocol_revision"}}
        out.mkdir()
        (out / "run.json").write_text(json.dumps(older))
        if refused:
            assert info["eval"]["protocol_revision"] >= 2
            with pytest.raises(RunFolderError, match=r"differs in: eval.*--output or --overwrite"):
                prepare_output(out, info, overwrite=False)
            assert prepare_output(out, info, overwrite=True) == []
        else:
            assert info == older
            assert prepare_output(out, info, overwrite=False) == []
        assert json.loads((out / "run.json").read_text()) == info


def test_overwrite_removes_every_file_the_discarded_run_wrote(tmp_path):
    """Whatever the new run then writes (nothing, when all its samples fail or it is killed), no report of the
    discarded run stays beside the new run.json."""
    out = tmp_path / "out"
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds"))]))
    _done(out, refs)
    old = [_result("ds", "a", 0.25)]
    written = write_reports(summarize_run("old", old, 2), out, old)
    (out / "run.json").write_text(json.dumps({"name": "old"}))
    assert {p.name for p in written} | {"results.jsonl", "run.json"} == {p.name for p in out.iterdir()}
    prepare_output(out, run_settings("new", GRABCUT, CONFIG, refs), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["run.json"]
    assert json.loads((out / "run.json").read_text())["name"] == "new"


@pytest.mark.parametrize("line", [b'{"oops": 1}\n', b"not json\n", b"[1, 2]\n"])
def test_a_malformed_results_record_is_a_run_folder_error_naming_the_line(tmp_path, line):
    out = tmp_path / "out"
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds"))]))
    _done(out, refs[:1])
    with open(out / "results.jsonl", "ab") as f:
        f.write(line)
    with pytest.raises(RunFolderError, match=r"results\.jsonl: line 2 is not a valid result record"):
        _run(out, refs)
    assert not (out / "run.json").exists()  # refused before anything was recorded
