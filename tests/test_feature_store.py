"""The LanceDB feature store on real local tables: round trips, dedupe, freshness, fingerprints, errors."""
from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer.features import ImageFeatures, ImageGeometry, pyramid_shapes
from pipeline.feature_store import (
    ADDED_COLUMNS,
    ERROR_SCHEMA,
    FEATURE_SCHEMA,
    EncodedImage,
    FeatureReader,
    FeatureStore,
    FeatureStoreError,
    UnknownImageError,
    error_rows,
    feature_rows,
    stored_ids_by_fingerprint,
    write_feature_fragments,
)

FP = "small:random-init:max_side=None:div=32"
OTHER_FP = "small:0123456789abcdef:max_side=None:div=32"


def _features(h: int, w: int, seed: int, scale: float = 1.0) -> ImageFeatures:
    padded = (-(-h // 32) * 32, -(-w // 32) * 32)
    geometry = ImageGeometry((round(h / scale), round(w / scale)), (h, w), padded, scale)
    gen = torch.Generator().manual_seed(seed)
    return ImageFeatures(tuple(torch.randn(1, *s, generator=gen) * 3 for s in pyramid_shapes(padded)), geometry)


def _item(image_id: str, seed: int = 0, h: int = 40, w: int = 70) -> EncodedImage:
    return EncodedImage(image_id, f"/data/{image_id}", f"{seed:064x}", _features(h, w, seed))


def _rows(items: list[EncodedImage], fingerprint: str, dtype: str = "float32") -> pa.Table:
    return feature_rows(items, fingerprint, dtype)


def _assert_same(a: ImageFeatures, b: ImageFeatures) -> None:
    assert a.geometry == b.geometry
    for x, y in zip(a.pyramid, b.pyramid):
        assert x.dtype == torch.float32 and torch.equal(x, y)


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    return FeatureStore(str(tmp_path / "db"))


def test_fp32_round_trip_is_bit_exact_and_fp16_within_rounding(store: FeatureStore):
    items = [_item("a.jpg", 1, 40, 70), _item("b.png", 2, 100, 33)]
    assert store.add(feature_rows(items, FP, "float32")) == 2
    assert store.add(_rows([_item("c.jpg", 3, 65, 64)], OTHER_FP, "float16")) == 1
    fp32 = store.reader(FP)
    for item in items:
        _assert_same(fp32.get(item.image_id), item.features)
    rec = store.reader(OTHER_FP).get_record("c.jpg")
    assert rec.dtype == "float16" and rec.uri == "/data/c.jpg" and rec.content_sha256 == f"{3:064x}"
    expected = _item("c.jpg", 3, 65, 64).features
    for got, want in zip(rec.features.pyramid, expected.pyramid):
        assert torch.equal(got, want.half().float())  # exactly the fp16 rounding of the fp32 features
        assert got.shape == want.shape


def test_resized_geometry_is_stored(store: FeatureStore):
    item = EncodedImage("big.jpg", "s3://bucket/big.jpg", "ab" * 32, _features(48, 64, 5, scale=0.5))
    store.add(_rows([item], FP, "float32"))
    got = store.reader(FP).get("big.jpg")
    assert got.geometry == ImageGeometry((96, 128), (48, 64), (64, 64), 0.5)
    _assert_same(got, item.features)


def test_add_skips_pairs_already_stored_and_repeats(store: FeatureStore):
    rows = _rows([_item("a"), _item("b"), _item("a", seed=9)], FP, "float32")
    assert store.add(rows) == 2
    assert store.add(_rows([_item("a"), _item("c")], FP)) == 1
    assert store.add(_rows([_item("a")], OTHER_FP)) == 1
    assert store.count() == 4 and store.count(FP) == 3
    assert store.existing_ids(FP) == {"a", "b", "c"}
    assert store.fingerprints() == {FP: 3, OTHER_FP: 1}
    _assert_same(store.reader(FP).get("a"), _item("a").features)  # the first one added is kept


def test_reader_never_returns_another_encoders_rows(store: FeatureStore):
    store.add(_rows([_item("only-other")], OTHER_FP))
    reader = store.reader(FP)
    with pytest.raises(UnknownImageError) as info:
        reader.get("only-other")
    assert "encoded only by" in str(info.value) and OTHER_FP in str(info.value)
    with pytest.raises(KeyError, match="not in the feature table"):
        reader.get("never-seen")
    assert "only-other" not in reader
    with pytest.raises(ValueError):
        FeatureReader(store.root, "")


def test_ids_with_quotes_and_unicode(store: FeatureStore):
    ids = ["it's.jpg", "naïve/日本.png", "a' OR '1'='1"]
    store.add(_rows([_item(i, n) for n, i in enumerate(ids)], FP, "float32"))
    reader = store.reader(FP)
    for n, i in enumerate(ids):
        _assert_same(reader.get(i), _item(i, n).features)
    with pytest.raises(UnknownImageError):
        reader.get("a")


def test_reader_sees_rows_written_after_it_opened(store: FeatureStore):
    reader = store.reader(FP, refresh_interval_s=3600, miss_refresh_s=0.0)
    v0 = reader.version
    store.add(_rows([_item("late")], FP))
    _assert_same(reader.get("late"), _item("late").features)  # a miss moved it to the latest version
    assert reader.version > v0
    slow = store.reader(FP, refresh_interval_s=3600, miss_refresh_s=3600)
    with pytest.raises(UnknownImageError):
        slow.get("later")  # this miss refreshes (first one)...
    store.add(_rows([_item("later")], FP))
    with pytest.raises(UnknownImageError):
        slow.get("later")  # ...but the next miss within miss_refresh_s does not
    slow.refresh()
    assert "later" in slow
    periodic = store.reader(FP, refresh_interval_s=0.0, miss_refresh_s=3600)
    store.add(_rows([_item("periodic")], FP))
    assert "periodic" in periodic


def test_reader_opened_before_the_table_exists(tmp_path):
    reader = FeatureReader(str(tmp_path / "db"), FP, miss_refresh_s=0.0)
    assert reader.version is None
    with pytest.raises(UnknownImageError, match="does not exist yet"):
        reader.get("x")
    FeatureStore(str(tmp_path / "db")).add(_rows([_item("x")], FP))
    _assert_same(reader.get("x"), _item("x").features)


def test_fragments_are_invisible_until_committed(store: FeatureStore):
    frags = write_feature_fragments(store.features_uri, _rows([_item("f1"), _item("f2")], FP))
    assert len(frags) == 1
    assert store.count() == 0 and "f1" not in store.reader(FP)
    outcome = store.commit_fragments(frags)
    assert outcome.version == store.dataset().version and store.count(FP) == 2
    assert sorted(outcome.added) == [("f1", FP), ("f2", FP)]
    _assert_same(store.reader(FP).get("f2"), _item("f2").features)
    assert store.commit_fragments([]).version == outcome.version


def test_btree_index_on_image_id_and_optimize(store: FeatureStore):
    store.add(_rows([_item(f"i{n}", n) for n in range(5)], FP))
    indices = store.dataset().describe_indices()
    assert any("BTree" in idx.type_url and list(idx.field_names) == ["image_id"] for idx in indices)
    store.add(_rows([_item("i9", 9)], FP))
    store.optimize_index()
    plan = store.dataset().scanner(filter="image_id = 'i9'").explain_plan()
    assert "ScalarIndexQuery" in plan and "image_id_idx" in plan
    _assert_same(store.reader(FP).get("i9"), _item("i9", 9).features)


def test_reader_survives_compaction_and_cleanup(store: FeatureStore):
    for n in range(3):
        store.add(_rows([_item(f"c{n}", n)], FP))
    reader = store.reader(FP, refresh_interval_s=3600)
    _assert_same(reader.get("c0"), _item("c0", 0).features)
    ds = store.dataset()
    ds.optimize.compact_files()
    lance.dataset(store.features_uri).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    _assert_same(reader.get("c1"), _item("c1", 1).features)  # old files are gone: it moved to the latest


def test_errors_table_upserts_and_clears(store: FeatureStore):
    store.record_errors(error_rows([("bad.png", "/d/bad.png", "not_an_image", "text"), ("t.jpg", "/d/t.jpg", "truncated", "x")], FP))
    store.record_errors(error_rows([("bad.png", "/d/bad.png", "corrupt", "again")], FP))
    store.record_errors(error_rows([("bad.png", "/d/bad.png", "empty", "other encoder")], OTHER_FP))
    errors = store.errors(FP).to_pylist()
    assert sorted((e["image_id"], e["reason"], e["detail"]) for e in errors) == [
        ("bad.png", "corrupt", "again"), ("t.jpg", "truncated", "x")]
    store.clear_errors(["t.jpg"], FP)
    assert [e["image_id"] for e in store.errors(FP).to_pylist()] == ["bad.png"]
    assert store.errors().num_rows == 2


def test_errors_are_keyed_across_stores_opened_before_each_others_writes(store: FeatureStore):
    """Two processes (two stores) on one table: each write and clear acts on the latest version, so a key never
    gets a second error row and an error recorded by the other process is cleared."""
    other = FeatureStore(store.root, store.table_name)
    other.record_errors(error_rows([("bad.png", "/d/bad.png", "not_an_image", "b")], FP))
    store.record_errors(error_rows([("bad.png", "/d/bad.png", "corrupt", "a"), ("x.png", "/d/x.png", "too_large", "a")], FP))
    assert sorted((e["image_id"], e["detail"]) for e in store.errors(FP).to_pylist()) == [("bad.png", "a"), ("x.png", "a")]
    other.record_errors(error_rows([("late.png", "/d/late.png", "truncated", "b")], FP))
    store.clear_errors(["late.png", "x.png"], FP)
    assert [e["image_id"] for e in store.errors(FP).to_pylist()] == ["bad.png"]


def test_existing_table_with_another_schema_is_refused(tmp_path):
    lance.write_dataset(pa.table({"image_id": ["x"], "vector": [1.0]}), str(tmp_path / "db" / "features.lance"))
    with pytest.raises(FeatureStoreError, match="another schema"):
        FeatureStore(str(tmp_path / "db"))


def test_feature_rows_schema_and_dtype_check():
    rows = feature_rows([_item("a")], FP)
    assert rows.schema.equals(FEATURE_SCHEMA) and rows.column("dtype")[0].as_py() == "float16"
    flat = np.frombuffer(rows.column("features")[0].as_py(), np.float16)
    assert flat.size == _item("a").features.num_floats
    assert rows.column("level_shapes")[0].as_py() == [v for s in pyramid_shapes((64, 96)) for v in s]
    with pytest.raises(ValueError):
        feature_rows([_item("a")], FP, "int4")


def test_two_first_runs_on_a_new_table_race_on_the_index_and_both_open_it(tmp_path, monkeypatch):
    """Two first runs on a new --db: both find no image_id index, the other run creates it first, and this
    run's CreateIndex is preempted (Lance's retryable commit conflict). This run must re-read the table, find
    the index and go on, instead of re-checking a stale handle and raising."""
    import lancedb
    import lancedb.table as lancedb_table

    from pipeline.feature_store import ERROR_SCHEMA, FEATURE_SCHEMA

    db = lancedb.connect(str(tmp_path / "db"))
    db.create_table("features", schema=FEATURE_SCHEMA)
    db.create_table("features_errors", schema=ERROR_SCHEMA)
    real = lancedb_table.LanceTable.create_index
    other: list[FeatureStore] = []

    def the_other_run_first(self, *args, **kwargs):
        if not other:
            monkeypatch.setattr(lancedb_table.LanceTable, "create_index", real)
            other.append(FeatureStore(str(tmp_path / "db")))  # its own connection: it creates the index
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lancedb_table.LanceTable, "create_index", the_other_run_first)
    store = FeatureStore(str(tmp_path / "db"))
    assert other and store._has_id_index()
    indices = [list(i.columns) for i in store._features.list_indices()]
    assert indices.count(["image_id"]) == 1
    store.add(_rows([_item("a")], "fp"))
    assert store.existing_ids("fp") == {"a"}


# --- tables that are not ours, or that exist but cannot be read ---------------------------------------------------

def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder): equal before and after = nothing changed."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


_COLUMN_FATE = st.sampled_from(["keep", "keep", "drop", "retype"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["features", "features_errors"]), data=st.data())
def test_a_table_not_ours_is_refused_and_left_byte_for_byte_as_it_was(tmp_path_factory, which, data):
    """Any table under our name whose columns are not ours (a core column missing, any column of another type) is
    refused before anything is written: no column added, no version committed, no table created beside it. A
    table with every core column (the ADDED_COLUMNS may be missing: an older table of ours) opens and is migrated."""
    schema = FEATURE_SCHEMA if which == "features" else ERROR_SCHEMA
    fates = {f.name: data.draw(_COLUMN_FATE, label=f.name) for f in schema}
    fields = [pa.field(f.name, pa.int64() if fates[f.name] == "retype" else f.type) for f in schema
              if fates[f.name] != "drop"] + [pa.field("theirs", pa.int64())]
    db = tmp_path_factory.mktemp("db")
    uri = str(db / f"{which}.lance")
    lance.write_dataset(pa.schema(fields).empty_table(), uri, schema=pa.schema(fields))
    ours = all(fates[f.name] == "keep" or (fates[f.name] == "drop" and f.name in ADDED_COLUMNS) for f in schema)
    before, version = _tree(db), lance.dataset(uri).version
    if ours:
        FeatureStore(str(db))
        assert set(schema.names) <= set(lance.dataset(uri).schema.names)
        return
    with pytest.raises(FeatureStoreError, match="another schema"):
        FeatureStore(str(db))
    assert _tree(db) == before
    assert lance.dataset(uri).version == version and lance.dataset(uri).schema.equals(pa.schema(fields))


def _garbage_manifest(db: Path) -> None:
    (db / "features.lance" / "_versions").mkdir(parents=True)
    (db / "features.lance" / "_versions" / "1.manifest").write_bytes(b"garbage")


def _file_not_folder(db: Path) -> None:
    db.mkdir(parents=True)
    (db / "features.lance").write_bytes(b"junk")


@pytest.mark.parametrize("damage", [_garbage_manifest, _file_not_folder])
def test_a_table_that_exists_but_cannot_be_read_is_an_error_not_a_miss(tmp_path, damage, caplog):
    """Only "not found" is "not encoded yet": a damaged table is a FeatureStoreError naming the reason for every
    read (the constructor logs it), the writer refuses it unchanged, and a repaired table is read at once."""
    db = tmp_path / "db"
    damage(db)
    before = _tree(db)
    reader = FeatureReader(str(db), FP, miss_refresh_s=0.0)
    assert "cannot be read" in caplog.text and reader.version is None
    for read in (lambda: reader.get("x"), lambda: "x" in reader, lambda: reader.identities(["x"]), reader.refresh):
        with pytest.raises(FeatureStoreError, match="exists but cannot be read: LanceError"):
            read()
    with pytest.raises(FeatureStoreError, match="exists but cannot be read"):
        stored_ids_by_fingerprint(str(db))
    with pytest.raises(FeatureStoreError, match="cannot be opened: LanceError"):
        FeatureStore(str(db))
    assert _tree(db) == before
    shutil.rmtree(db)
    FeatureStore(str(db)).add(_rows([_item("x")], FP))
    _assert_same(reader.get("x"), _item("x").features)


def test_a_table_folder_with_no_version_yet_is_a_miss(tmp_path):
    """A table another process is creating (its folder, no manifest yet) does not exist yet: a miss."""
    (tmp_path / "db" / "features.lance" / "data").mkdir(parents=True)
    reader = FeatureReader(str(tmp_path / "db"), FP, miss_refresh_s=0.0)
    with pytest.raises(UnknownImageError, match="does not exist yet"):
        reader.get("x")


@pytest.mark.parametrize("name", ["my table", "a/b", "", "../up"])
def test_a_table_name_lancedb_refuses_is_a_feature_store_error_and_creates_nothing(tmp_path, name):
    with pytest.raises(FeatureStoreError, match="invalid table name"):
        FeatureStore(str(tmp_path / "db"), name)
    assert not (tmp_path / "db").exists() or not any((tmp_path / "db").iterdir())


@pytest.mark.parametrize("by", ["image_id", "image_ref"])
def test_the_backend_answers_a_table_it_cannot_read_with_a_logged_500_never_an_on_demand_encode(tmp_path, by, caplog):
    """A storage fault is not "no stored features": no on-demand encode (which would store nothing and hide the
    fault), a 500 whose error id is in the log with the reason; once the table is repaired the image is served."""
    from connectors.engine import EngineConfig, SegmentEngine
    from connectors.segment import SegmentError, SegmentRequest
    from interformer.clicks import Click

    db = tmp_path / "db"
    _garbage_manifest(db)
    asked: list[str] = []
    engine = SegmentEngine(EngineConfig(db=str(db), table="features", checkpoint=None, variant="small"),
                           lambda image_id, ref, task: asked.append(image_id) or {})
    engine.reader.miss_refresh_s = 0.0
    ids = {"image_id": "a.png", "image_ref": None} if by == "image_id" else {"image_id": None, "image_ref": "/d/a.png"}
    req = SegmentRequest(clicks=(Click(10, 12, True),), original_size=(40, 70), **ids)
    with pytest.raises(SegmentError) as refused:
        engine.segment(req)
    assert refused.value.status == 500 and "error id" in refused.value.message and asked == []
    assert "cannot be read: LanceError(IO)" in caplog.text
    shutil.rmtree(db)
    item = EncodedImage("a.png" if by == "image_id" else "/d/a.png", "/d/a.png", "0" * 64, _features(40, 70, 0))
    FeatureStore(str(db)).add(feature_rows([item], engine.fingerprint))
    assert engine.segment(req).rle and asked == []
