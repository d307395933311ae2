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

from interformer.click_engine import ENGINES, ClickEngineConfig
from pipeline import preannotation_run
from pipeline.polygons import DEFAULT_TOLERANCE
from pipeline.preannotation import MASK_FORMATS, ClickPolicy, ImageResult, MaskFormat
from pipeline.preannotation_report import PreannotateSummary, write_report, write_summary
from pipeline.preannotation_run import PreannotateConfig, RunDirError, prepare_run_dir
from pipeline.prompts import USE_CHOICES, Problem
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


def _default_dir(tmp_path: Path, **kw) -> Path:
    """The folder a run of these settings takes when no --run-dir is given (relative to the cwd)."""
    cfg = PreannotateConfig(coco=str(tmp_path / "coarse.json"), coco_out=str(tmp_path / "out.json"), **kw)
    info = preannotation_run.run_info(cfg, cfg.coco, "fp", "interformer-small-light-5a433573")
    run_dir, lock = prepare_run_dir(cfg, info)
    lock.release()
    return run_dir


def test_the_documented_polygon_run_after_the_brush_run_gets_its_own_default_folder(tmp_path, monkeypatch):
    """README's brush push then preannotation.md's `--mask-format polygon` push, both without --run-dir: the
    second used to be refused (the same default folder, other settings); each now has its folder, a brush
    run keeps the name it had before settings were named, and rerunning either resumes its own."""
    monkeypatch.chdir(tmp_path)
    brush = _default_dir(tmp_path)
    assert brush == Path("runs/preannotate/coarse-interformer-small-light-5a433573")
    polygon = _default_dir(tmp_path, output=MaskFormat("polygon"))
    coarse = _default_dir(tmp_path, output=MaskFormat("polygon", tolerance=2.5))
    assert polygon == Path(f"{brush}-polygon") and coarse == Path(f"{brush}-polygon-tol2.5")
    assert _default_dir(tmp_path) == brush and _default_dir(tmp_path, output=MaskFormat("polygon")) == polygon


SETTINGS = st.fixed_dictionaries({
    "use": st.sampled_from(USE_CHOICES), "coco_id": st.sampled_from(("file_name", "id")),
    "policy": st.builds(ClickPolicy, target_iou=st.sampled_from((0.9, 0.85, 1.0)), max_clicks=st.integers(1, 30)),
    "output": st.builds(MaskFormat, kind=st.sampled_from(MASK_FORMATS),
                        tolerance=st.sampled_from((DEFAULT_TOLERANCE, 0.0, 0.5, 2.5))),
    "engine": st.builds(ClickEngineConfig, engine=st.sampled_from(ENGINES)),
})
LS_SETTINGS = st.fixed_dictionaries({
    "ls_prompts": st.sampled_from(("annotations", "predictions")),
    "ls_prompt_model_version": st.sampled_from((None, "yolo", "yolo-v8", "yolo-polygon", "det/2 b", "x" * 90))})


@settings(max_examples=200, deadline=None)
@given(a=SETTINGS, b=SETTINGS, ls_a=LS_SETTINGS, ls_b=LS_SETTINGS, from_ls=st.booleans())
def test_runs_of_other_settings_never_share_a_default_folder(a, b, ls_a, ls_b, from_ls):
    """Every setting a run folder refuses to mix (run_info) is in the default folder's name: two runs from one
    source and model whose settings differ get different folders, the same settings the same folder, and the
    defaults no suffix (the folders of earlier runs still resume)."""
    def info(kw: dict, ls: dict) -> tuple[PreannotateConfig, dict]:
        if ls["ls_prompt_model_version"] and ls["ls_prompts"] != "predictions":
            ls = {**ls, "ls_prompt_model_version": None}
        src = dict(ls_project=3, push=True, **ls) if from_ls else dict(coco="/data/coarse.json", coco_out="/o.json")
        cfg = PreannotateConfig(**src, **kw)
        return cfg, preannotation_run.run_info(cfg, "src", "fp", "mv")
    (cfg_a, info_a), (cfg_b, info_b) = info(a, ls_a), info(b, ls_b)
    dir_a, dir_b = preannotation_run.default_run_dir(cfg_a, info_a), preannotation_run.default_run_dir(cfg_b, info_b)
    assert (dir_a == dir_b) == (info_a == info_b), (info_a, info_b)
    assert len(dir_a.name) <= 160 and "/" not in dir_a.name
    if info_a == preannotation_run.run_info(PreannotateConfig(**{**dict(cfg_a.__dict__), **dict(
            use="auto", coco_id="file_name", policy=ClickPolicy(), output=MaskFormat(), engine=ClickEngineConfig(),
            ls_prompts="annotations", ls_prompt_model_version=None)}), "src", "fp", "mv"):
        assert dir_a.name == ("ls-project-3-mv" if from_ls else "coarse-mv")

