"""A rerun of the encode job never keeps serving features of other pixels than an id names now.

The table keys rows by (image id, encoder) and a rerun skips stored ids. An id can come to name other bytes: a
file rewritten in place, or an id another file has taken (two COCO files with overlapping numeric ids). Each row
keeps the uri and sha256 it was encoded from; the run compares them (reading a source whose uri changed, or
every one with --check-content), reports what changed, fails --strict, and with --reencode-changed replaces
those rows, still one row per id.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
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


def _rewritten_table(tmp_path: Path) -> tuple[Path, Path, Path]:
    """a.png and b.png encoded, then a.png rewritten (same size, other pixels)."""
    folder, db, summary = tmp_path / "imgs", tmp_path / "db", tmp_path / "summary.json"
    folder.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2)):
        (folder / name).write_bytes(_png(seed))
    first = _encode(folder, db, summary)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (folder / "a.png").write_bytes(_png(3))
    return folder, db, summary


@pytest.mark.slow
def test_a_rewritten_image_is_reported_fails_strict_and_is_replaced_when_asked(tmp_path):
    folder, db, summary = _rewritten_table(tmp_path)

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


# --- rows an older feature version or another precision computed ----------------------------------------------

def _stored_row(image_id: str, uri: str, sha: str, padded: tuple[int, int], version, precision):
    """A row as an older writer left it: its feature version and precision as given (None: not recorded)."""
    import pyarrow as pa

    from pipeline.feature_store import EncoderProvenance

    h, w = padded
    geometry = ImageGeometry((h, w), (h, w), padded, 1.0)
    gen = torch.Generator().manual_seed(len(image_id))
    feats = ImageFeatures(tuple(torch.randn(1, *s, generator=gen) for s in pyramid_shapes(padded)), geometry)
    rows = feature_rows([EncodedImage(image_id, uri, sha, feats)], _job_fingerprint(), "float16",
                        EncoderProvenance(None if precision is None else "torch", precision))
    column = rows.schema.get_field_index("feature_version")
    return rows.set_column(column, rows.schema.field(column), pa.array([version], pa.int32()))


@functools.lru_cache(maxsize=None)
def _job_fingerprint() -> str:
    from pipeline.encoding import EncoderSpec, build_predictor

    return build_predictor(EncoderSpec(variant="small"), device="cpu").fingerprint


def _encode_in_process(cfg, store, fingerprint, pending, summary, vit=None):
    """The job's stages without Ray: decode, the real EncoderStage (which records what computed each row), add."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.encoding import EncoderStage, decode_stage
    from pipeline.feature_store import FEATURE_SCHEMA

    batch = pa.table({"image_id": [s.image_id for s in pending], "uri": [s.uri for s in pending]})
    encoded = EncoderStage(cfg.encoder, fingerprint)(decode_stage(batch, cfg.encoder.preprocess, vit))
    summary.encoded = store.add(encoded.filter(pc.is_null(encoded.column("reason"))).select(FEATURE_SCHEMA.names))


def test_stale_rows_are_reported_fail_strict_and_are_encoded_again_when_asked(tmp_path, monkeypatch):
    """Rows of feature version 1 at a grid version 2 changed (256x1024: 16x64 tokens for the 32x32 window) and rows
    encoded at bf16 are stale for an fp32 run; version-1 rows at other sizes and rows of unknown precision are not.
    """
    from pipeline import encode_run
    from pipeline.encode_run import EncodeConfig, EncoderSpec, exit_code, format_summary
    from pipeline.sources import list_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"wide.png": (256, 1024), "square.png": (64, 64), "bf16.png": (64, 96), "unknown.png": (64, 96)}
    for n, (name, (h, w)) in enumerate(sizes.items()):
        Image.fromarray(np.random.default_rng(n).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    uris = {s.image_id: s.uri for s in list_images(str(folder)).sources}
    store = FeatureStore(str(tmp_path / "db"))
    made = {"wide.png": (None, None), "square.png": (None, None), "bf16.png": (2, "bf16"), "unknown.png": (2, None)}
    for name, (version, precision) in made.items():
        sha = _sha((folder / name).read_bytes())
        store.add(_stored_row(name, uris[name], sha, sizes[name], version, precision))
    monkeypatch.setattr(encode_run, "_encode", _encode_in_process)
    monkeypatch.setattr(encode_run, "_join_cluster", lambda cfg: None)

    def run(**kwargs):
        spec = EncoderSpec(variant="small", precision=kwargs.pop("precision", "fp32"))
        return encode_run.run(EncodeConfig(str(folder), db=str(tmp_path / "db"), encoder=spec, **kwargs))

    kept = run(strict=True)
    reasons = {s["image_id"]: s["reason"] for s in kept.stale}
    assert set(reasons) == {"wide.png", "bf16.png"} and kept.skipped == 4 and kept.encoded == 0
    assert reasons["wide.png"].startswith("feature version 1 < 2 at 1024x256")
    assert reasons["bf16.png"] == "encoded at bf16 precision, this run encodes at fp32"
    assert exit_code(kept, strict=True) == 1 and exit_code(kept) == 0
    assert "stale        2 stored images" in format_summary(kept) and "kept with their old features" in format_summary(kept)

    again = run(strict=True, reencode_changed=True)
    assert again.stale_replaced == 2 and again.encoded == 2 and again.skipped == 2
    assert exit_code(again, strict=True) == 0
    ids = store.dataset().to_table(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(sizes), "one row per id"
    rows = store.provenance(_job_fingerprint())
    for name in ("wide.png", "bf16.png"):
        assert (rows[name].feature_version, rows[name].engine, rows[name].precision) == (2, "torch", "fp32")
    assert run(strict=True).stale == []

    bf16 = run(strict=True, precision="bf16")  # fp32 rows are more exact than a bf16 run asks for: not stale
    assert bf16.stale == [] and bf16.skipped == 4 and exit_code(bf16, strict=True) == 0


def test_stale_rows_judge_listed_rows_of_an_older_version_at_an_affected_size_or_a_known_other_precision():
    from interformer.config import SMALL
    from pipeline.changed_sources import row_stale_reason, stale_rows
    from pipeline.feature_store import RowProvenance

    sources = [ImageSource("a", "/a.png"), ImageSource("b", "/b.png"), ImageSource("c", "/c.png")]
    stored = {"a": RowProvenance(1, "torch", "fp32", (1024, 256)), "b": RowProvenance(None, None, None, (512, 512)),
              "d": RowProvenance(None, None, "bf16", (64, 64))}  # d is not listed: not judged
    assert [(s.image_id, s.uri) for s in stale_rows(sources, stored, SMALL.vit, "fp32")] == [("a", "/a.png")]
    assert row_stale_reason(RowProvenance(2, "openvino", "fp32", (64, 64)), SMALL.vit, "fp32") is None
    assert row_stale_reason(RowProvenance(2, None, None, (64, 64)), SMALL.vit, "bf16") is None


def test_check_content_records_the_orientation_tag_of_rows_stored_before_it_without_encoding(tmp_path, monkeypatch):
    """--check-content reads every stored source anyway: an unchanged one whose row has no tag (stored before the
    tag was recorded) gets it from the header, by an update of that column; its features and identity stay."""
    from pipeline import encode_run
    from pipeline.encode_run import EncodeConfig, EncoderSpec
    from pipeline.sources import list_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "turned.jpg", "JPEG", exif=exif.tobytes())
    Image.fromarray(pixels).save(folder / "known.jpg", "JPEG", exif=exif.tobytes())
    (folder / "rewritten.png").write_bytes(_png(5))
    uris = {s.image_id: s.uri for s in list_images(str(folder)).sources}
    store = FeatureStore(str(tmp_path / "db"))
    fp = _job_fingerprint()
    for name, tag, sha in (("turned.jpg", None, None), ("known.jpg", 3, None), ("rewritten.png", None, _sha(_png(4)))):
        item = _item(name, uris[name], sha or _sha((folder / name).read_bytes()))
        store.add(feature_rows([EncodedImage(item.image_id, item.uri, item.content_sha256, item.features, tag)], fp))
    before = {r.image_id: r for r in (store.reader(fp).get_record(i) for i in uris)}
    monkeypatch.setattr(encode_run, "_join_cluster", lambda cfg: None)
    monkeypatch.setattr(encode_run, "_encode", _encode_in_process)

    def run(**kwargs):
        return encode_run.run(EncodeConfig(str(folder), db=str(tmp_path / "db"), encoder=EncoderSpec(variant="small"),
                                           **kwargs))

    assert run().orientation_filled == 0  # nothing read without --check-content
    summary = run(check_content=True)
    assert summary.orientation_filled == 1 and [c["image_id"] for c in summary.changed] == ["rewritten.png"]
    after = {r.image_id: r for r in (store.reader(fp).get_record(i) for i in uris)}
    assert {i: r.exif_orientation for i, r in after.items()} == {"turned.jpg": 6, "known.jpg": 3, "rewritten.png": None}
    for i in uris:
        assert (after[i].content_sha256, after[i].created_at) == (before[i].content_sha256, before[i].created_at)
        assert all(torch.equal(x, y) for x, y in zip(after[i].features.pyramid, before[i].features.pyramid))
    assert sorted(store.dataset().to_table(columns=["image_id"]).column("image_id").to_pylist()) == sorted(uris)
    assert run(check_content=True).orientation_filled == 0


# --- precision staleness is judged on the request, never on the driver's hardware ----------------------------

@given(requested=st.sampled_from(["fp32", "bf16"]), recorded=st.sampled_from(["fp32", "bf16", None]),
       engine=st.sampled_from(["torch", "openvino", None]))
def test_a_row_is_stale_for_precision_exactly_when_fp32_is_asked_for_and_it_recorded_bf16(requested, recorded, engine):
    """Rows record what each actor resolved; the driver cannot know that (other CPU flags, a GPU, OpenVINO on one
    side only), so only the request decides: fp32 is what every engine and device computes when asked."""
    from interformer.config import SMALL
    from pipeline import changed_sources
    from pipeline.feature_store import RowProvenance

    row = RowProvenance(2, engine, recorded, (64, 64))
    expected = requested == "fp32" and recorded == "bf16"
    assert (changed_sources.row_stale_reason(row, SMALL.vit, requested) is not None) == expected
    assert len(changed_sources.stale_rows([ImageSource("a", "/a.png")], {"a": row}, SMALL.vit, requested)) == expected
    assert changed_sources.precision_stale(requested, recorded) == expected


def test_rows_an_actor_wrote_at_bf16_are_not_stale_for_a_bf16_run_whose_driver_lacks_bf16(tmp_path, monkeypatch):
    """The reviewer's shape: workers with native bf16 wrote OpenVINO bf16 rows; the driver's CPU has none (so it
    would resolve the request to f32). A rerun with the same options skips every image, --strict passes."""
    from interformer import encode_engine
    from pipeline import encode_run
    from pipeline.encode_run import EncodeConfig, EncoderSpec, exit_code
    from pipeline.sources import list_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in range(2):
        (folder / f"im{n}.png").write_bytes(_png(n))
    store = FeatureStore(str(tmp_path / "db"))
    for s in list_images(str(folder)).sources:
        store.add(_stored_row(s.image_id, s.uri, _sha(Path(s.uri).read_bytes()), (64, 64), 2, "bf16"))
    monkeypatch.setattr(encode_engine, "native_bf16", lambda flags=None: False)
    monkeypatch.setattr(encode_engine, "openvino_available", lambda: None)
    monkeypatch.setattr(encode_run, "_join_cluster", lambda cfg: None)
    monkeypatch.setattr(encode_run, "_encode", _encode_in_process)
    spec = EncoderSpec(variant="small", precision="bf16", engine="openvino")
    summary = encode_run.run(EncodeConfig(str(folder), db=str(tmp_path / "db"), encoder=spec, strict=True,
                                          reencode_changed=True))
    assert summary.stale == [] and summary.skipped == 2 and summary.pending == 0 and summary.stale_replaced == 0
    assert exit_code(summary, strict=True) == 0


# --- --reencode-changed removes a row only for an image this run can encode again -------------------------------

_SIDES = {"readable": (32, 32), "over_memory": (128, 128), "over_pixels": (64, 96)}  # (H, W)
_MAX_PIXELS, _BUDGET_GIB = 5000, 5e-5  # 32x32 passes both; 96x64 is over the pixels; 128x128 over the memory


def _image(path: Path, state: str, seed: int) -> str:
    """Write the image of `state` and return its sha256; an unreadable one is removed again (moved away)."""
    h, w = _SIDES.get(state, _SIDES["readable"])
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    sha = _sha(path.read_bytes())
    if state == "unreadable":
        path.unlink()
    return sha


@settings(max_examples=10, deadline=None)
@given(images=st.lists(st.tuples(st.sampled_from(["stale", "changed", "new"]),
                                 st.sampled_from(["readable", "unreadable", "over_memory", "over_pixels"])),
                       min_size=1, max_size=6),
       limit=st.one_of(st.none(), st.integers(0, 4)))
def test_reencode_changed_keeps_the_old_row_of_every_image_it_cannot_encode_again_now(images, limit):
    """Stale (bf16 row, fp32 run) and changed (other bytes, --check-content) rows x {readable, source gone, over
    --max-pixels, over --max-encode-memory} x --limit, with images without a row among them: a row is replaced
    only when this run takes the image (within the limit, in listing order, new images counting too) and can
    decode it; every other row stays exactly as it was, and replaced / stale_replaced count the removed rows."""
    import pytest as _pytest

    from interformer.config import PreprocessConfig
    from pipeline import encode_run
    from pipeline.encode_run import EncodeConfig, EncoderSpec, exit_code
    from pipeline.images import REASONS

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(encode_run, "_join_cluster", lambda cfg: None)
        mp.setattr(encode_run, "_encode", _encode_in_process)
        tmp = Path(tmp)
        folder = tmp / "imgs"
        folder.mkdir()
        store = FeatureStore(str(tmp / "db"))
        names = [f"im{n}.png" for n in range(len(images))]
        for n, (name, (kind, state)) in enumerate(zip(names, images)):
            sha = _image(folder / name, state, n)
            if kind != "new":
                sha = "0" * 64 if kind == "changed" else sha
                store.add(_stored_row(name, str(folder / name), sha, (64, 64), 2, "bf16" if kind == "stale" else "fp32"))
        (folder / "list.txt").write_text("".join(f"{name}\n" for name in names))  # lists a file gone too
        before = _row_table(store)

        # The model: in listing order, new images always take a slot of the limit; a row to replace takes one only
        # when it can be encoded now (and a changed source that cannot be read is not found changed at all).
        slots = len(names) if limit is None else limit
        taken = set()
        for name, (kind, state) in zip(names, images):
            if slots and (kind == "new" or state == "readable"):
                taken.add(name)
                slots -= 1
        replaced = {name for name, (kind, _) in zip(names, images) if kind != "new" and name in taken}

        preprocess = PreprocessConfig(max_pixels=_MAX_PIXELS, max_encode_memory_gib=_BUDGET_GIB)
        summary = encode_run.run(EncodeConfig(str(folder / "list.txt"), db=str(tmp / "db"), limit=limit,
                                              encoder=EncoderSpec(variant="small", preprocess=preprocess),
                                              check_content=True, reencode_changed=True, strict=True))
        after = _row_table(store)
        for name in before:
            if name not in replaced:
                assert after[name] == before[name], f"{name}: its row must stay as it was"
            else:
                assert after[name][:2] == (_sha((folder / name).read_bytes()), "fp32") and after[name] != before[name]
        assert summary.replaced == sum(1 for n in replaced if images[names.index(n)][0] == "changed")
        assert summary.stale_replaced == sum(1 for n in replaced if images[names.index(n)][0] == "stale")
        found = {s["image_id"] for s in summary.stale} | {c["image_id"] for c in summary.changed}
        assert {k["image_id"] for k in summary.kept} == found - replaced
        assert all(k["reason"] for k in summary.kept)
        assert exit_code(summary, strict=True) == (1 if summary.not_stored or found - replaced else 0)
        if found - replaced:
            assert "kept: " in encode_run.format_summary(summary)


def _row_table(store: FeatureStore) -> dict[str, tuple]:
    """image id -> (sha256, precision, created_at) of every row; asserts one row per id."""
    table = store.dataset().to_table(columns=["image_id", "content_sha256", "encode_precision", "created_at"])
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "one row per id"
    return {i: (s, p, c) for i, s, p, c in zip(ids, table.column("content_sha256").to_pylist(),
                                               table.column("encode_precision").to_pylist(),
                                               table.column("created_at").to_pylist())}


# --- a run that cannot start, or is stopped before encoding, removes nothing and says so -----------------------

@pytest.mark.slow
def test_options_the_cluster_cannot_take_are_refused_before_any_row_is_removed(tmp_path):
    folder, db, summary = _rewritten_table(tmp_path)
    bad = _encode(folder, db, summary, "--check-content", "--reencode-changed", "--cpus-per-encoder", "1")
    assert bad.returncode == 2 and "error: 1 encoders x 1 CPUs take all 1 CPUs" in bad.stderr, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr and _rows(db) == {"a.png": _sha(_png(1)), "b.png": _sha(_png(2))}


@pytest.mark.slow
@pytest.mark.parametrize("step", ["listed", "sources_checked", "rows_removed"])
def test_a_sigterm_at_any_step_before_encoding_is_a_stop_and_the_rerun_finishes(tmp_path, step):
    """The job is held at the step (fault injection) and sent a real SIGTERM: exit 130 with the summary; a row
    removed for re-encoding before the stop is encoded by the next run, the other rows stay."""
    import signal
    import time

    folder, db, summary = _rewritten_table(tmp_path)
    faults = tmp_path / "faults"
    faults.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "INTERFORMER_FAULT"))
           and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), INTERFORMER_FAULT=f"{step}:hold", INTERFORMER_FAULT_DIR=str(faults))
    job = subprocess.Popen([sys.executable, "-m", "jobs.encode", str(folder), "--db", str(db), "--variant", "small",
                            "--num-cpus", "1", "--summary-json", str(summary), "--check-content", "--reencode-changed"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not list(faults.glob("held-*")):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.1)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, out[-3000:] + err[-3000:]
    assert "encode summary" in out and "Traceback" not in err and json.loads(summary.read_text())["interrupted"]
    rows = _rows(db)
    assert rows.get("b.png") == _sha(_png(2)) and rows.get("a.png") == (None if step == "rows_removed" else _sha(_png(1)))
    rerun = _encode(folder, db, summary, "--check-content", "--reencode-changed", "--strict")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert _rows(db) == {"a.png": _sha(_png(3)), "b.png": _sha(_png(2))}


@pytest.mark.slow
def test_a_run_counts_as_its_own_only_its_images_though_it_commits_what_another_run_staged(tmp_path):
    """Run A (held mid-pipeline) and run B (another encoder, killed after staging) on one table: A's committer
    commits B's staged work too (nothing is lost), and A's summary counts only A's images and failures."""
    import time

    folder, db, summary = tmp_path / "imgs", tmp_path / "db", tmp_path / "a.json"
    folder.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2)):
        (folder / name).write_bytes(_png(seed))
    (folder / "bad.png").write_bytes(b"not an image")
    faults = tmp_path / "faults"
    faults.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "INTERFORMER_FAULT"))
           and k != "RAY_ADDRESS"}
    a = subprocess.Popen([sys.executable, "-m", "jobs.encode", str(folder), "--db", str(db), "--variant", "small",
                          "--num-cpus", "1", "--summary-json", str(summary)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**env, "PYTHONPATH": str(ROOT), "INTERFORMER_FAULT": "written:hold",
                              "INTERFORMER_FAULT_DIR": str(faults)})
    try:
        deadline = time.monotonic() + 600
        while not list(faults.glob("held-*")):
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.1)
        b = subprocess.run([sys.executable, "-m", "jobs.encode", str(folder), "--db", str(db), "--variant", "small",
                            "--num-cpus", "1", "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env={**env, "PYTHONPATH": str(ROOT), "INTERFORMER_FAULT": "staged:exit"})
        assert b.returncode == 97, b.stderr[-3000:]
        (faults / "release").touch()
        out, err = a.communicate(timeout=600)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, out[-3000:] + err[-3000:]
    s = json.loads(summary.read_text())
    assert s["encoded"] == 2 and s["pending"] == 3 and s["committed_for_other_runs"] == 2
    assert [f["image_id"] for f in s["failed"]] == ["bad.png"]
    table = lancedb.connect(str(db)).open_table("features").to_arrow()
    assert sorted(Counter(table.column("fingerprint").to_pylist()).values()) == [2, 2]


# --- inputs the listing drops as duplicate ids ----------------------------------------------------------------------

def _encode_and_commit(cfg, store, fingerprint, pending, summary, vit=None):
    """The job's stages without Ray, committed as the job commits (staged records, StagedCommitter), so that a
    commit clears the error rows of the ids it stores as it does in a real run."""
    import pyarrow as pa

    from pipeline.encoding import EncoderStage, decode_stage, write_stage
    from pipeline.staged_commits import StagedCommitter

    committer = StagedCommitter(store)
    batch = pa.table({"image_id": [s.image_id for s in pending], "uri": [s.uri for s in pending]})
    write_stage(EncoderStage(cfg.encoder, fingerprint)(decode_stage(batch, cfg.encoder.preprocess, vit)),
                store.features_uri, committer.uri, fingerprint)
    committer.commit_staged()
    summary.encoded = len(committer.tally.stored)
    summary.failed.extend(v for k, v in committer.tally.failed.items() if k not in committer.tally.stored)


@settings(max_examples=6, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 3), st.booleans()), min_size=1, max_size=6))
def test_a_file_dropped_as_a_duplicate_id_is_listed_not_stored_recorded_and_fails_strict(entries):
    """COCO entries (numeric id, file, good or truncated) where several files may share an id: the files the
    listing drops count as listed and not stored (listed = stored + not stored), `--strict` fails on them, and
    their id has an error row (duplicate_id, or its first file's own failure), on a first run and on a rerun."""
    from pipeline import encode_run
    from pipeline.encode_run import EncodeConfig, EncoderSpec, exit_code
    from pipeline.images import REASONS

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        folder, db = Path(tmp) / "imgs", Path(tmp) / "db"
        folder.mkdir()
        files = {}
        for coco_id, n, good in entries:
            name = f"f{n}.png"
            if name not in files:
                files[name] = good
                (folder / name).write_bytes(_png(n) if good else _png(n)[:40])
        images = [{"id": i, "file_name": f"f{n}.png"} for i, n, _ in entries]
        (folder / "coco.json").write_text(json.dumps({"images": images}))
        mp.setattr(encode_run, "_join_cluster", lambda cfg: None)
        mp.setattr(encode_run, "_encode", _encode_and_commit)
        distinct = {(e["id"], e["file_name"]) for e in images}
        duplicated = {i for i, _ in distinct if sum(1 for j, _ in distinct if j == i) > 1}
        for attempt in range(2):
            summary = encode_run.run(EncodeConfig(str(folder / "coco.json"), image_root=str(folder), coco_id="id",
                                                  db=str(db), encoder=EncoderSpec(variant="small"), strict=True))
            stored = set(FeatureStore(str(db)).existing_ids(_job_fingerprint()))
            assert summary.listed == len(distinct) and summary.not_stored == len(distinct) - len(stored)
            assert exit_code(summary, strict=True) == (0 if summary.not_stored == 0 else 1)
            if duplicated:
                assert exit_code(summary, strict=True) == 1
            errors = {e["image_id"]: e["reason"] for e in FeatureStore(str(db)).errors().to_pylist()}
            assert {str(i) for i in duplicated} <= set(errors), attempt
            assert all(errors[str(i)] in ("duplicate_id", *REASONS) for i in duplicated)
            assert [f for f in summary.failed if f["reason"] == "duplicate_id"] != [] or not duplicated


# --- the content check reads any file with bounded memory, and never hangs on a special one ----------------------


@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=300), chunk=st.integers(1, 64))
def test_the_streamed_digest_is_the_files_sha256_whatever_the_chunk_size(tmp_path_factory, content, chunk):
    import pipeline.sources as sources

    path = tmp_path_factory.mktemp("digest") / "x.png"
    path.write_bytes(content)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "_CHUNK", chunk)
        assert sources.sha256_of(str(path)) == hashlib.sha256(content).hexdigest()


def test_the_content_check_and_the_reencode_check_never_read_a_file_whole_nor_block(tmp_path):
    """A FIFO is not judged (its row stays) and never opened blocking; a file larger than any image the run
    could encode is too_large for re-encoding from its size alone (a sparse file: nothing is read)."""
    from interformer.config import CONFIGS, PreprocessConfig
    from pipeline.changed_sources import check_content, reencode_problem
    from pipeline.images import max_file_bytes

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    stored = {"pipe.png": Origin(str(fifo), "0" * 64, None)}
    result = check_content([ImageSource("pipe.png", str(fifo))], stored, check_all=True)
    assert result.changed == [] and result.orientations == {}
    preprocess = PreprocessConfig(max_pixels=1000)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(max_file_bytes(preprocess.max_pixels) + 1)
    problem = reencode_problem(ImageSource("huge.png", str(huge)), preprocess, CONFIGS["small"].vit)
    assert problem is not None and problem.startswith("too_large")
