"""A rerun of the encode job never keeps serving features of other pixels than an id names now.

The table keys rows by (image id, encoder) and a rerun skips stored ids. An id can come to name other bytes: a
file rewritten in place, or an id another file has taken (two COCO files with overlapping numeric ids). Each row
keeps the uri and sha256 it was encoded from; the run compares them (reading a source whose uri changed, or
every one with --check-content), reports what changed, fails --strict, and with --reencode-changed replaces
those rows, still one row per id.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lancedb
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from interformer import ImageFeatures, ImageGeometry
from interformer.features import pyramid_shapes
from pipeline.changed_sources import changed_sources
from pipeline.feature_store import EncodedImage, FeatureStore, Origin, feature_rows
from pipeline.sources import ImageSource

ROOT = Path(__file__).resolve().parents[1]
FP = "small:random-init:max_side=None:div=32"


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Per listed image: is it listed under the uri it was encoded from, and what do its bytes say now.
_CASE = st.tuples(st.booleans(), st.sampled_from(["same", "other", "unreadable", "no stored sha"]))


@settings(max_examples=60, deadline=None)
@given(cases=st.lists(_CASE, min_size=1, max_size=8), check_all=st.booleans())
def test_changed_is_exactly_the_readable_sources_whose_bytes_differ_among_those_it_reads(cases, check_all):
    with tempfile.TemporaryDirectory() as tmp:
        sources, stored, expected = [], {}, set()
        for n, (same_uri, now) in enumerate(cases):
            encoded_from = os.path.join(tmp, f"old{n}.png")
            uri = encoded_from if same_uri else os.path.join(tmp, f"new{n}.png")
            if now != "unreadable":
                Path(uri).write_bytes(_png(n if now in ("same", "no stored sha") else 1000 + n))
            stored[f"id{n}"] = Origin(encoded_from, None if now == "no stored sha" else _sha(_png(n)))
            sources.append(ImageSource(f"id{n}", uri))
            if now == "other" and (check_all or not same_uri):
                expected.add(f"id{n}")
        sources.append(ImageSource("not-stored", os.path.join(tmp, "none.png")))
        changed, read = changed_sources(sources, stored, check_all)
        assert {c.image_id for c in changed} == expected
        assert read == sum(1 for same_uri, _ in cases if check_all or not same_uri)
        assert all(c.stored_uri == stored[c.image_id].uri for c in changed)


def _item(image_id: str, uri: str, sha: str) -> EncodedImage:
    geometry = ImageGeometry((40, 56), (40, 56), (64, 64), 1.0)
    gen = torch.Generator().manual_seed(0)
    feats = ImageFeatures(tuple(torch.randn(1, *s, generator=gen) for s in pyramid_shapes((64, 64))), geometry)
    return EncodedImage(image_id, uri, sha, feats)


def test_the_store_gives_each_rows_origin_and_removes_rows_of_one_encoder_only(tmp_path):
    store = FeatureStore(str(tmp_path / "db"))
    other = "small:0123456789abcdef:max_side=None:div=32"
    store.add(feature_rows([_item("a", "/x/a.png", "1" * 64), _item("b'quote", "/x/b.png", "2" * 64)], FP))
    store.add(feature_rows([_item("a", "/x/a.png", "3" * 64)], other))
    assert store.origins(FP) == {"a": Origin("/x/a.png", "1" * 64), "b'quote": Origin("/x/b.png", "2" * 64)}
    assert store.dtypes(FP) == {"float16": 2} and store.dtypes("none") == {}
    assert store.remove(["a", "b'quote", "missing"], FP) == 2
    assert store.existing_ids(FP) == set() and store.existing_ids(other) == {"a"}


def _encode(folder: Path, db: Path, summary: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "INTERFORMER_FAULT"))
           and k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.encode", str(folder), "--db", str(db), "--variant", "small",
                           "--num-cpus", "1", "--summary-json", str(summary), *extra], cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)


def _rows(db: Path) -> dict[str, str]:
    table = lancedb.connect(str(db)).open_table("features").to_arrow()
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "one row per id"
    return dict(zip(ids, table.column("content_sha256").to_pylist()))


@pytest.mark.slow
def test_a_rewritten_image_is_reported_fails_strict_and_is_replaced_when_asked(tmp_path):
    folder, db, summary = tmp_path / "imgs", tmp_path / "db", tmp_path / "summary.json"
    folder.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2)):
        (folder / name).write_bytes(_png(seed))
    first = _encode(folder, db, summary)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (folder / "a.png").write_bytes(_png(3))  # same name, same size, other pixels

    plain = _encode(folder, db, summary, "--strict")  # the uri is the same: nothing is read without --check-content
    assert plain.returncode == 0 and json.loads(summary.read_text())["changed"] == []

    strict = _encode(folder, db, summary, "--strict", "--check-content")
    s = json.loads(summary.read_text())
    assert strict.returncode == 1, strict.stdout[-3000:] + strict.stderr[-3000:]
    assert [c["image_id"] for c in s["changed"]] == ["a.png"] and s["checked"] == 2 and s["replaced"] == 0
    assert "--reencode-changed" in strict.stderr and _rows(db)["a.png"] == _sha(_png(1))

    again = _encode(folder, db, summary, "--strict", "--check-content", "--reencode-changed", "--dtype", "float32")
    s = json.loads(summary.read_text())
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert s["replaced"] == 1 and s["encoded"] == 1 and s["skipped"] == 1
    assert s["other_dtypes"] == {"float16": 1} and "keep their dtype" in again.stdout  # b.png stays float16
    assert _rows(db) == {"a.png": _sha(_png(3)), "b.png": _sha(_png(2))}


def test_an_id_another_coco_file_takes_is_found_by_its_uri_without_check_content(tmp_path):
    """Two COCO files keyed by numeric id into one table: id 1 was set A's cat, and is set B's dog now."""
    store = FeatureStore(str(tmp_path / "db"))
    cat, dog = tmp_path / "a" / "cat.png", tmp_path / "b" / "dog.png"
    for path, seed in ((cat, 1), (dog, 2)):
        path.parent.mkdir()
        path.write_bytes(_png(seed))
    store.add(feature_rows([_item("1", str(cat), _sha(_png(1)))], FP))
    changed, read = changed_sources([ImageSource("1", str(dog))], store.origins(FP))
    assert read == 1 and [(c.image_id, c.uri, c.stored_uri) for c in changed] == [("1", str(dog), str(cat))]
    moved = tmp_path / "moved.png"
    moved.write_bytes(_png(1))  # the same bytes from another place: not a change
    assert changed_sources([ImageSource("1", str(moved))], store.origins(FP)) == ([], 1)
