"""jobs/encode.py refuses outputs it could not write at the END of a run before it does any work: one `error:`
line, exit 2 (a complete run used to end in a traceback and exit 1, "incomplete", when --summary-json could
not be written), and a --db that is a file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", ["summary is a folder", "summary under a file", "db is a file"])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("")
    extra = {"summary is a folder": ["--db", str(tmp_path / "db"), "--summary-json", str(tmp_path)],
             "summary under a file": ["--db", str(tmp_path / "db"), "--summary-json", str(afile / "s.json")],
             "db is a file": ["--db", str(afile)]}[case]
    done = subprocess.run([sys.executable, "jobs/encode.py", "samples/", "--variant", "small", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("case", ["missing folder", "missing list file", "missing coco file", "coco image root"])
def test_a_missing_input_is_refused_before_the_model_is_built(tmp_path, case):
    coco = tmp_path / "coco.json"
    coco.write_text('{"images": [], "annotations": [], "categories": []}')
    args = {"missing folder": [str(tmp_path / "no such folder")],
            "missing list file": [str(tmp_path / "paths.txt")],
            "missing coco file": [str(tmp_path / "ann.json"), "--image-root", str(tmp_path)],
            "coco image root": [str(coco), "--image-root", str(tmp_path / "images")]}[case]
    done = subprocess.run([sys.executable, "jobs/encode.py", *args, "--db", str(tmp_path / "db")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "does not exist" in done.stderr or "is not a folder" in done.stderr, done.stderr[-2000:]
    assert "RANDOMLY INITIALISED" not in done.stderr + done.stdout  # refused before the encoder was built
    assert not (tmp_path / "db").exists()
