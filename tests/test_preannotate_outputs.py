"""A pre-annotation whose output could only fail when it is written at the end is refused before any work.

The run checks its COCO output right after reading the prompts: before the run folder, the ledger, Ray or a
single segmented object. Each case runs the real job (`jobs/preannotate.py main`) and checks that nothing
was started; the control case (the same file with integer ids) goes on to create its run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.preannotate import main

SIZE = {"height": 16, "width": 24}


def prompt_file(path: Path, image_ids: list) -> Path:
    images = [{"id": i, "file_name": f"img{n}.png", **SIZE} for n, i in enumerate(image_ids)]
    annotations = [{"id": n + 1, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 6]} for n, i in enumerate(image_ids)]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def run(tmp_path: Path, coco: Path, out: str, *extra: str) -> int:
    return main(["--coco", str(coco), "--coco-out", out, "--db", str(tmp_path / "db"), "--variant", "small",
                 "--workers", "0", "--run-dir", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("ids", [["a", "b"], [1, "x"], ["7"]])
def test_results_format_with_non_integer_image_ids_is_refused_before_any_work(tmp_path, capsys, ids):
    coco = prompt_file(tmp_path / "prompts.json", ids)
    rc = run(tmp_path, coco, str(tmp_path / "out.json"), "--coco-format", "results")
    err = capsys.readouterr().err
    assert rc == 2 and "--coco-format results needs integer COCO image ids" in err and "annotations" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("case", ["folder", "under_a_file", "the_prompt_file"])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, case):
    coco = prompt_file(tmp_path / "prompts.json", [1, 2])
    (tmp_path / "taken").mkdir()
    (tmp_path / "plain").write_text("")
    prompts_before = coco.read_text()
    out = {"folder": tmp_path / "taken", "under_a_file": tmp_path / "plain" / "out.json", "the_prompt_file": coco}[case]
    rc = run(tmp_path, coco, str(out))
    assert rc == 2 and "--coco-out" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and coco.read_text() == prompts_before


@pytest.mark.parametrize("case", ["missing", "folder"])
def test_a_prompt_file_that_is_not_a_file_is_a_usage_error_before_the_model_is_built(tmp_path, capsys, case):
    coco = tmp_path / "nowhere.json" if case == "missing" else tmp_path
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, coco, str(tmp_path / "out.json"))
    captured = capsys.readouterr()
    assert stop.value.code == 2 and "--coco" in captured.err and "is not a file" in captured.err
    assert "RANDOMLY INITIALISED" not in captured.err + captured.out and not (tmp_path / "run").exists()


def test_integer_ids_pass_the_check_and_the_run_goes_on(tmp_path, capsys):
    coco = prompt_file(tmp_path / "prompts.json", [1, 2])
    rc = run(tmp_path, coco, str(tmp_path / "out.json"), "--coco-format", "results")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["reasons"] == {"no_features": 2}  # nothing was encoded here
    assert rc == 1 and "no object could be segmented" in capsys.readouterr().err


@pytest.mark.parametrize("objects, segmented, delivered_before, images, failed", [
    (8, 0, 0, 4, True),  # nothing could be segmented
    (8, 3, 0, 4, False),
    (8, 0, 4, 4, False),  # every task already holds this version's prediction (another run folder): done
    (8, 0, 2, 4, True),  # the other images were tried and none could be segmented
    (0, 0, 0, 0, False),  # no usable prompt: reported, not a failure of segmentation
])
def test_the_job_fails_only_when_something_was_left_unsegmented(objects, segmented, delivered_before, images, failed):
    from pipeline.preannotation_report import PreannotateSummary, nothing_segmented

    s = PreannotateSummary("fp", "mv", False, "coco", "run", images=images, objects=objects, segmented=segmented,
                           delivered_before=delivered_before)
    assert nothing_segmented(s) is failed
