"""The whole-file outputs of a pre-annotation run folder (run.json, summary.json, report.csv, the --coco-out
file) under torn files and two writers at once.

Two writers are interleaved deterministically: writer A is held just before it renames its written file
into place, writer B writes the same path from start to end meanwhile, then A goes on. Each must finish
without an error and leave a whole file of its own (never a temporary file shared by both). A run.json left
empty or cut short by a crash must stop a rerun with the run-folder error and what to do, not a traceback.
"""
from __future__ import annotations

import csv
import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import preannotation_run
from pipeline.preannotation import ImageResult
from pipeline.preannotation_report import PreannotateSummary, write_report, write_summary
from pipeline.preannotation_run import PreannotateConfig, RunDirError, prepare_run_dir
from pipeline.prompts import Problem
from pipeline.run_info import record_settings


def _summary(run_dir: Path, tag: str) -> PreannotateSummary:
    return PreannotateSummary("fp", tag, False, "src", str(run_dir), images=3)


def _problem(tag: str) -> Problem:
    return Problem(key=f"coco:{tag}", image_id=f"{tag}.png", label="object", reason="no_geometry", detail=tag * 50)


WRITERS = {
    "run.json": (lambda d, tag: record_settings(d / "run.json", {"model_version": tag, "pad": tag * 2000}),
                 lambda d: json.loads((d / "run.json").read_text())["model_version"]),
    "summary.json": (lambda d, tag: write_summary(_summary(d, tag)),
                     lambda d: json.loads((d / "summary.json").read_text())["model_version"]),
    "report.csv": (lambda d, tag: write_report(d / "report.csv", [_problem(tag)] * 200, list[ImageResult]()),
                   lambda d: {r["image_id"] for r in csv.DictReader((d / "report.csv").open())}.pop()[:-4]),
    "coco-out": (lambda d, tag: preannotation_run.write_json_atomic(d / "masks.json", {"tag": tag, "pad": [tag] * 5000}),
                 lambda d: json.loads((d / "masks.json").read_text())["tag"]),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_two_writers_of_one_output_each_write_a_whole_file(tmp_path, monkeypatch, name):
    write, read_tag = WRITERS[name]
    real_replace = os.replace
    a_at_rename, b_done = threading.Event(), threading.Event()

    def replace(src, dst):
        if threading.current_thread().name == "writer-a" and not a_at_rename.is_set():
            a_at_rename.set()
            assert b_done.wait(60), "writer B never finished"
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    errors: list[BaseException] = []

    def writer_a():
        try:
            write(tmp_path, "aaaa")
        except BaseException as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=writer_a, name="writer-a")
    thread.start()
    assert a_at_rename.wait(60), "writer A never reached its rename"
    write(tmp_path, "bbbb")
    assert read_tag(tmp_path) == "bbbb"
    b_done.set()
    thread.join(60)
    assert errors == [], f"writer A failed: {errors[0]!r}" if errors else ""
    assert read_tag(tmp_path) == "aaaa"  # A renamed its own whole file last
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _cfg(tmp_path: Path, **kw) -> PreannotateConfig:
    return PreannotateConfig(coco=str(tmp_path / "prompts.json"), coco_out=str(tmp_path / "out.json"),
                             run_dir=str(tmp_path / "run"), **kw)


INFO = {"source": "/data/prompts.json", "fingerprint": "fp", "model_version": "mv", "use": "auto",
        "policy": {"max_clicks": 20, "target_iou": 0.9}}


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(json.dumps(INFO, indent=2, sort_keys=True)) - 1),
       garbage=st.sampled_from(["", "\x00\x00", "   ", "[1, 2]", "null"]))
def test_a_torn_run_json_stops_a_rerun_with_the_run_folder_error(tmp_path_factory, cut, garbage):
    """run.json cut short at any byte (a crash mid-write by an older version, a full disk), or replaced by
    something that is no settings object: the rerun raises RunDirError saying what to do, and --fresh works."""
    tmp_path = tmp_path_factory.mktemp("torn")
    cfg = _cfg(tmp_path)
    run_dir, lock = prepare_run_dir(cfg, INFO)
    lock.release()
    whole = (run_dir / "run.json").read_text()
    (run_dir / "run.json").write_text(garbage if garbage in ("[1, 2]", "null") else whole[:cut] + garbage)
    with pytest.raises(RunDirError) as e:
        prepare_run_dir(cfg, INFO)
    assert "run.json cannot be read" in str(e.value) and "--fresh" in str(e.value)
    run_dir, lock = prepare_run_dir(_cfg(tmp_path, fresh=True), INFO)
    lock.release()
    assert json.loads((run_dir / "run.json").read_text()) == INFO
    run_dir, lock = prepare_run_dir(cfg, INFO)  # the rewritten record resumes
    lock.release()


def test_an_output_written_whole_gets_the_permissions_a_plain_write_would(tmp_path):
    """The temporary file of an atomic write is created 0600; the output must not stay owner-only: a new file
    gets 0666 less the umask, a replaced one keeps its mode."""
    from pipeline.files import write_text_atomic

    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "new.json", "{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    kept = tmp_path / "kept.json"
    kept.write_text("x")
    kept.chmod(0o604)
    write_text_atomic(kept, "{}")
    assert kept.stat().st_mode & 0o777 == 0o604 and kept.read_text() == "{}"
