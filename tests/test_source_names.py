"""Names the feature table cannot key, and several ids for one file, in every listing mode.

A file name that is not valid UTF-8 (Python keeps its bytes as lone surrogates) cannot be stored by Arrow:
it must become a per-image error with a printable name while every other image is listed, never abort the
job. A COCO file may name one file under several spellings ('b.png', './b.png', 'sub/../b.png'): the ids
stay as written (tables are keyed by them), and the listing reports them.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import lancedb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.sources import list_images, printable

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def _folder(root: Path, names: list[bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(_png(i))
    return root


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# b"*" is left out: a file named '*.png' is what the spec 'root/*.png' names (an existing path is no glob).
_NAME_BYTES = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b
                                                         and not b.startswith(b".") and b != b"*")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stems=st.lists(_NAME_BYTES, min_size=1, max_size=5, unique=True))
def test_every_listed_id_is_storable_and_every_other_name_is_reported(tmp_path_factory, stems):
    names = [stem + b".png" for stem in stems]
    root = _folder(tmp_path_factory.mktemp("names"), names)
    for spec in (str(root), str(root) + "/*.png"):
        listing = list_images(spec)
        assert all(_storable(s.image_id) and _storable(s.uri) for s in listing.sources)
        good = sorted(os.fsdecode(n) for n in names if _storable(os.fsdecode(n)))
        assert [s.image_id for s in listing.sources] == good
        bad = [n for n in names if not _storable(os.fsdecode(n))]
        assert sorted(u[0] for u in listing.unusable) == sorted(printable(os.fsdecode(n)) for n in bad)
        assert all(_storable(field) for u in listing.unusable for field in u)


def test_a_non_utf8_name_is_an_unreadable_input_with_an_escaped_name(tmp_path):
    root = _folder(tmp_path / "imgs", [b"plain.png", b"bad\xffname.png"])
    listing = list_images(str(root))
    assert [s.image_id for s in listing.sources] == ["plain.png"]
    ((image_id, uri, reason, detail),) = listing.unusable
    assert image_id == "bad\\xffname.png" and uri.endswith("/bad\\xffname.png")
    assert reason == "unreadable" and "not valid UTF-8" in detail and "rename" in detail


def test_a_coco_name_with_a_lone_surrogate_is_reported_not_listed(tmp_path):
    _folder(tmp_path / "imgs", [b"plain.png"])
    coco = tmp_path / "c.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "plain.png"}, {"id": 2, "file_name": "x\\udcff.png"}]}')
    for coco_id in ("file_name", "id"):
        listing = list_images(str(coco), image_root=str(tmp_path / "imgs"), coco_id=coco_id)
        assert len(listing.sources) == 1 and len(listing.unusable) == 1
        assert listing.unusable[0][1].endswith("x\\xff.png")


def test_one_file_under_several_coco_ids_is_reported_and_plain_ids_are_kept(tmp_path):
    _folder(tmp_path / "imgs", [b"b.png", b"c.png"])
    (tmp_path / "imgs" / "sub").mkdir()
    coco = tmp_path / "c.json"
    names = ["b.png", "./b.png", "sub/../b.png", "c.png"]
    coco.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)]}))
    listing = list_images(str(coco), image_root=str(tmp_path / "imgs"))
    assert sorted(s.image_id for s in listing.sources) == sorted(names)
    assert sorted((a.image_id, b.image_id) for a, b in listing.same_uri) == [("./b.png", "b.png"),
                                                                           ("./b.png", "sub/../b.png")]
    assert {a.uri for a, _ in listing.same_uri} == {str(tmp_path / "imgs" / "b.png")}


@pytest.mark.slow
def test_an_encode_run_over_a_folder_with_a_non_utf8_name_stores_the_other_images(tmp_path):
    """The auditor's case end to end: `python -m jobs.encode DIR` on a private local Ray. Before, the job died
    (rc 1, UnicodeEncodeError in a Ray task) with 0 rows stored."""
    root = _folder(tmp_path / "imgs", [b"plain.png", b"bad\xffname.png"])
    db = tmp_path / "db"
    summary = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "INTERFORMER_FAULT"))
           and k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "jobs.encode", str(root), "--db", str(db), "--variant", "small",
                          "--num-cpus", "1", "--summary-json", str(summary)], cwd=ROOT,
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    features = lancedb.connect(str(db)).open_table("features").to_arrow()
    assert features.column("image_id").to_pylist() == ["plain.png"]
    errors = lancedb.connect(str(db)).open_table("features_errors").to_arrow().to_pylist()
    assert [(e["image_id"], e["reason"]) for e in errors] == [("bad\\xffname.png", "unreadable")]
    s = json.loads(summary.read_text())
    assert s["listed"] == 2 and s["not_stored"] == 1 and s["failed"][0]["image_id"] == "bad\\xffname.png"
    assert "bad\\xffname.png" in run.stdout
