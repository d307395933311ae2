"""Every feature row says what computed it (feature version, engine, precision), an older table gets those columns
from the first writer that opens it, and a table whose columns have the right names but other types is refused
when it is opened, before any image is encoded."""
from __future__ import annotations

import lance
import lancedb
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer.features import ImageFeatures, ImageGeometry, pyramid_shapes
from interformer.modeling.interformer import FEATURE_VERSION
from pipeline.feature_store import (
    ERROR_SCHEMA,
    FEATURE_SCHEMA,
    EncodedImage,
    EncoderProvenance,
    FeatureReader,
    FeatureStore,
    FeatureStoreError,
    RowProvenance,
    encoder_provenance,
    feature_rows,
    schema_type_mismatches,
    write_feature_fragments,
)

PROVENANCE = ("feature_version", "encode_engine", "encode_precision")


def _features(seed: int, padded=(64, 96)) -> ImageFeatures:
    gen = torch.Generator().manual_seed(seed)
    geometry = ImageGeometry((40, 70), (40, 70), padded, 1.0)
    return ImageFeatures(tuple(torch.randn(1, *s, generator=gen) for s in pyramid_shapes(padded)), geometry)


def _item(image_id: str, seed: int = 0, padded=(64, 96)) -> EncodedImage:
    return EncodedImage(image_id, f"/data/{image_id}", f"{seed:064x}", _features(seed, padded))


def test_rows_record_this_codes_feature_version_and_the_encoder_given():
    rows = feature_rows([_item("a")], "fp", "float16", EncoderProvenance("openvino", "bf16"))
    assert rows.schema.equals(FEATURE_SCHEMA)
    assert [rows.column(c)[0].as_py() for c in PROVENANCE] == [FEATURE_VERSION, "openvino", "bf16"]
    unknown = feature_rows([_item("a")], "fp")  # a writer that does not say: the version is still this code's
    assert [unknown.column(c)[0].as_py() for c in PROVENANCE] == [FEATURE_VERSION, None, None]


class _Encoder:
    def __init__(self, name: str, precision: str, builds: bool):
        self.name, self.precision, self._builds = name, precision, builds

    def prepare(self) -> bool:
        return self._builds


class _Predictor:
    def __init__(self, encoder):
        self.encoder = encoder


@pytest.mark.parametrize("name,precision,builds,expected", [
    ("torch-fp32", "fp32", True, ("torch", "fp32")),
    ("torch-bf16", "bf16", True, ("torch", "bf16")),
    ("openvino-f32", "fp32", True, ("openvino", "fp32")),
    ("openvino-bf16", "bf16", True, ("openvino", "bf16")),
    ("openvino-bf16", "bf16", False, ("torch", "bf16")),  # could not be built: its torch fallback ran
])
def test_encoder_provenance_names_what_ran_after_any_fallback(name, precision, builds, expected):
    got = encoder_provenance(_Predictor(_Encoder(name, precision, builds)))
    assert (got.engine, got.precision) == expected


def test_encoder_provenance_of_real_predictors(small_model):
    from interformer.predictor import Predictor

    for precision in ("fp32", "bf16"):
        predictor = Predictor(small_model, device="cpu", encode_precision=precision)
        assert encoder_provenance(predictor) == EncoderProvenance("torch", precision)


def test_an_older_table_gets_the_columns_and_its_rows_read_as_version_1_unknown_engine(tmp_path):
    old_schema = pa.schema([f for f in FEATURE_SCHEMA if f.name not in PROVENANCE])
    old_rows = feature_rows([_item("a", 0, (256, 1024)), _item("b", 1)], "fp", "float32").select(old_schema.names)
    db = lancedb.connect(str(tmp_path / "db"))
    db.create_table("features", data=old_rows, schema=old_schema)
    db.create_table("features_errors", schema=ERROR_SCHEMA)

    reader = FeatureReader(str(tmp_path / "db"), "fp", refresh_interval_s=0)
    old = reader.get_record("a")  # a reader takes the table as it is
    assert (old.feature_version, old.encode_engine, old.encode_precision) == (None, None, None)
    store = FeatureStore(str(tmp_path / "db"))  # a writer adds the columns, all null
    FeatureStore(str(tmp_path / "db"))
    assert set(PROVENANCE) <= set(lance.dataset(store.features_uri).schema.names)
    assert store.add(feature_rows([_item("c", 2)], "fp", "float32", EncoderProvenance("torch", "bf16"))) == 1
    written = write_feature_fragments(store.features_uri, feature_rows(
        [_item("d", 3)], "fp", "float32", EncoderProvenance("openvino", "fp32")))  # the encode job's way
    assert store.commit_fragments(written).added == [("d", "fp")]
    assert store.provenance("fp") == {
        "a": RowProvenance(None, None, None, (256, 1024)),
        "b": RowProvenance(None, None, None, (64, 96)),
        "c": RowProvenance(FEATURE_VERSION, "torch", "bf16", (64, 96)),
        "d": RowProvenance(FEATURE_VERSION, "openvino", "fp32", (64, 96)),
    }
    record = reader.get_record("d")
    assert (record.feature_version, record.encode_engine, record.encode_precision) == (FEATURE_VERSION, "openvino",
                                                                                        "fp32")
    assert store.provenance("other") == {}


# Another Arrow type for a column: each is a type some tool or an older version could plausibly have written.
_OTHER_TYPES = [pa.binary(), pa.large_string(), pa.string(), pa.int64(), pa.int32(), pa.float32(), pa.float64(),
                pa.list_(pa.int64()), pa.large_list(pa.int32()), pa.timestamp("ms", tz="UTC"), pa.timestamp("us")]


def _swap(schema: pa.Schema, name: str, new_type: pa.DataType) -> pa.Schema:
    return pa.schema([pa.field(f.name, new_type, f.nullable) if f.name == name else f for f in schema])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["features", "errors"]), data=st.data())
def test_a_table_with_one_column_of_another_type_is_refused_at_open_naming_it(tmp_path_factory, which, data):
    schema = FEATURE_SCHEMA if which == "features" else ERROR_SCHEMA
    column = data.draw(st.sampled_from(schema.names))
    new_type = data.draw(st.sampled_from([t for t in _OTHER_TYPES if not t.equals(schema.field(column).type)
                                          and not (pa.types.is_list(t) and pa.types.is_list(schema.field(column).type))
                                          ]))
    root = str(tmp_path_factory.mktemp("db"))
    db = lancedb.connect(root)
    db.create_table("features", schema=_swap(FEATURE_SCHEMA, column, new_type) if which == "features"
                    else FEATURE_SCHEMA)
    db.create_table("features_errors", schema=_swap(ERROR_SCHEMA, column, new_type) if which == "errors"
                    else ERROR_SCHEMA)
    with pytest.raises(FeatureStoreError) as e:
        FeatureStore(root)
    message = str(e.value)
    assert repr(column) in message and str(new_type) in message and str(schema.field(column).type) in message


def test_schema_type_mismatches_lists_every_changed_column_and_ignores_list_item_names():
    swapped = _swap(_swap(FEATURE_SCHEMA, "features", pa.binary()), "level_shapes", pa.list_(pa.int64()))
    assert schema_type_mismatches(swapped, FEATURE_SCHEMA) == [
        ("level_shapes", pa.list_(pa.int64()), pa.list_(pa.int32())), ("features", pa.binary(), pa.large_binary())]
    renamed_item = _swap(FEATURE_SCHEMA, "level_shapes", pa.list_(pa.field("element", pa.int32())))
    assert schema_type_mismatches(renamed_item, FEATURE_SCHEMA) == []
    assert schema_type_mismatches(FEATURE_SCHEMA, FEATURE_SCHEMA) == []


def test_a_table_of_the_expected_types_opens_and_the_error_says_what_to_do(tmp_path):
    FeatureStore(str(tmp_path / "ok"))  # a new table, then again
    FeatureStore(str(tmp_path / "ok"))
    db = lancedb.connect(str(tmp_path / "bad"))
    db.create_table("features", schema=_swap(FEATURE_SCHEMA, "features", pa.binary()))
    with pytest.raises(FeatureStoreError, match="column 'features' is binary, this code writes large_binary"):
        FeatureStore(str(tmp_path / "bad"))
