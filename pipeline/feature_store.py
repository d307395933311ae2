"""The feature store: one LanceDB table of encoded images, one row per (image_id, encoder fingerprint).

Layout (a LanceDB database folder or object-store prefix, default `./lancedb`):
  <root>/<table>.lance          features: ids, provenance, geometry, the flat pyramid (see FEATURE_SCHEMA)
  <root>/<table>_errors.lance   inputs that could not be encoded, with the reason (see ERROR_SCHEMA)

The pyramid is stored as `large_binary` (the bytes of `ImageFeatures.to_flat`) with Lance's page
compression switched off: of the layouts measured (bench/bench_feature_store.py --compare-layouts)
it is the fastest to fetch that also holds any image size and both storage dtypes in one column.
Reads go through pylance directly (the LanceDB query builder adds a few ms per fetch) with a BTREE
index on `image_id`.

`exif_orientation` (added after the first tables were made) is the EXIF orientation tag of the image file (1..8,
1 when it has none, pipeline/orientation.py): the features are of the stored pixel grid, and the tag tells the
Label Studio boundary how a browser turns it. Rows stored before it existed hold null (unknown). A table made
before the column existed is given it (all null, a metadata-only schema change) when a `FeatureStore` opens
it; readers take a table with or without it.

`feature_version`, `encode_engine` and `encode_precision` (added later, in the same way) say what computed a row:
the encoder code's FEATURE_VERSION (interformer.modeling.interformer), "torch" or "openvino", "fp32" or "bf16".
None of them is in the fingerprint: the encode job finds rows an older version computed differently at their
geometry, or another precision computed, and encodes them again when asked. Null: stored before they were
recorded (version 1, engine and precision unknown).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import fs as pafs
import torch
from lance.commit import CommitConflictError
from lance.file import LanceFileReader
from lance.fragment import FragmentMetadata, write_fragments

from interformer.features import STORAGE_DTYPES, ImageFeatures, ImageGeometry, flat_to_float32, levels_of
from interformer.modeling.interformer import FEATURE_VERSION

from .faults import fault_point
from .table_names import check_table_name

log = logging.getLogger(__name__)

DEFAULT_ROOT = "lancedb"
DEFAULT_TABLE = "features"

_NO_COMPRESSION = {"lance-encoding:compression": "none"}

# Where the features sit in the original image: sizes before and after the resize and the padding.
GEOMETRY_FIELDS = [
    pa.field("original_height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("resized_height", pa.int32()),
    pa.field("resized_width", pa.int32()),
    pa.field("padded_height", pa.int32()),
    pa.field("padded_width", pa.int32()),
    pa.field("scale", pa.float64()),
]

FEATURE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("content_sha256", pa.string()),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        *GEOMETRY_FIELDS,
        pa.field("level_shapes", pa.list_(pa.int32())),  # [C, h, w] of each level, flattened
        pa.field("features", pa.large_binary(), metadata=_NO_COMPRESSION),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("exif_orientation", pa.int32()),  # 1..8; null: stored before the tag was recorded
        pa.field("feature_version", pa.int32()),  # FEATURE_VERSION of the code that encoded it; null: 1
        pa.field("encode_engine", pa.string()),  # "torch" / "openvino"; null: unknown
        pa.field("encode_precision", pa.string()),  # "fp32" / "bf16"; null: unknown
    ]
)
# Columns added to FEATURE_SCHEMA after tables were made with it: a writer adds them (all null) to an older table.
ADDED_COLUMNS = ("exif_orientation", "feature_version", "encode_engine", "encode_precision")

ERROR_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("reason", pa.string()),  # short code, see pipeline.images.REASONS
        pa.field("detail", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

_META_COLUMNS = [f.name for f in FEATURE_SCHEMA if f.name != "features"]
_IDENTITY_COLUMNS = ["image_id", "fingerprint", "content_sha256", "created_at"]
_COMMIT_ATTEMPTS = 12


@dataclass(frozen=True)
class Origin:
    """Where a stored row's features came from: the uri and the sha256 of the encoded bytes, and the file's EXIF
    orientation tag recorded with them (None: stored before the tag was recorded)."""

    uri: str | None
    sha256: str | None
    exif_orientation: int | None = None


@dataclass(frozen=True)
class EncoderProvenance:
    """What ran the encoder for a row: engine ("torch" / "openvino") and precision ("fp32" / "bf16"); None:
    unknown."""

    engine: str | None = None
    precision: str | None = None


def encoder_provenance(predictor) -> EncoderProvenance:
    """The engine and precision a Predictor's encoder runs at, after any fallback (an OpenVINO encoder that
    could not be built runs torch at the same precision; one asked for bf16 on a CPU without it runs f32).
    Call it after encoding: on an encoder not built yet it builds it."""
    encoder = predictor.encoder
    ran = encoder.prepare()
    engine = str(encoder.name).split("-", 1)[0] if ran else "torch"
    return EncoderProvenance(engine, encoder.precision)


@dataclass(frozen=True)
class RowProvenance:
    """What computed one stored row, and the padded size it was computed at (what decides whether an older
    feature version differs, interformer.modeling.interformer.stale_reason)."""

    feature_version: int | None
    engine: str | None
    precision: str | None
    padded_size: tuple[int, int]


class FeatureStoreError(RuntimeError):
    """The table is missing, unreadable or holds rows that break the store's invariants."""


class UnknownImageError(KeyError):
    """No features for this image id and encoder fingerprint."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown image"


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image ready to be stored."""

    image_id: str
    uri: str
    content_sha256: str
    features: ImageFeatures
    exif_orientation: int | None = None  # the file's EXIF orientation tag (1..8); None: not read


@dataclass(frozen=True)
class StoredFeatures:
    """One row read back: the features and their provenance."""

    image_id: str
    uri: str
    content_sha256: str
    fingerprint: str
    dtype: str
    created_at: datetime
    features: ImageFeatures
    exif_orientation: int | None = None  # 1..8; None: stored before the encoder recorded it
    feature_version: int | None = None  # None: stored before versions were recorded (version 1)
    encode_engine: str | None = None  # None: unknown
    encode_precision: str | None = None  # None: unknown


# (content_sha256, created_at, exif_orientation): tells a row from one stored again under its id, and from itself
# before an in-place update of what a reader keeps next to its features (`FeatureStore.fill_exif_orientation`)
RowIdentity = tuple[str, datetime, "int | None"]


def row_identity(record: StoredFeatures) -> RowIdentity:
    """The identity of a row read back (compare with `FeatureReader.identities`)."""
    return (record.content_sha256, record.created_at, record.exif_orientation)


def sql_string(value: str) -> str:
    """A SQL string literal for Lance filters (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def parse_storage_options(items: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE strings (the jobs' repeatable --storage-option) -> the storage options LanceDB/Lance take;
    ValueError names the first malformed item."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option expects KEY=VALUE, got {item!r}")
        options[key] = value
    return options


def table_uri(root: str, table: str) -> str:
    """Where LanceDB keeps `table` under the database `root` (local folder or object-store URI)."""
    if "://" in root:
        return f"{root.rstrip('/')}/{table}.lance"
    return os.path.join(os.path.abspath(root), f"{table}.lance")


_RUST_LOCATION = re.compile(r",\s*/\S+\.rs:\d+:\d+")


def is_not_found(error: BaseException) -> bool:
    """Whether an error of opening a table means only that it does not exist (yet): Lance and LanceDB say
    "... was not found"; a table that exists but cannot be read (no permission, an IO error, a damaged
    manifest, a file where the folder should be) is another error."""
    return isinstance(error, FileNotFoundError) or (isinstance(error, ValueError) and "was not found" in str(error))


def lance_reason(error: BaseException) -> str:
    """An error's message without the Rust source locations Lance appends to it (and LanceDB's prefix)."""
    text = _RUST_LOCATION.sub("", str(error)).strip()
    return text.removeprefix("lance error: ") or type(error).__name__


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a table uri (object-store credentials come from the environment)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def stored_ids_by_fingerprint(root: str, table: str = DEFAULT_TABLE,
                               storage_options: dict | None = None) -> dict[str, set[str]]:
    """encoder fingerprint -> the image ids stored for it, read without writing: a reader (training) never
    creates, migrates or indexes a table, so a mistyped path is a FeatureStoreError, not a new empty table."""
    uri = table_uri(root, table)
    try:
        ds = lance.dataset(uri, storage_options=storage_options)
    except (OSError, ValueError, RuntimeError) as e:
        if not is_not_found(e):
            raise FeatureStoreError(f"the feature table {uri} exists but cannot be read: {lance_reason(e)}") from None
        raise FeatureStoreError(f"no feature table at {uri} ({type(e).__name__}); encode images into it first "
                                "(jobs/encode.py --db ... --table ...)") from None
    columns = ds.to_table(columns=["fingerprint", "image_id"])
    found: dict[str, set[str]] = {}
    for fingerprint, image_id in zip(columns.column("fingerprint").to_pylist(), columns.column("image_id").to_pylist()):
        found.setdefault(fingerprint, set()).add(image_id)
    return found


def feature_rows(items: Sequence[EncodedImage], fingerprint: str, dtype: str = "float16",
                 encoder: EncoderProvenance = EncoderProvenance()) -> pa.Table:
    """Arrow rows (FEATURE_SCHEMA) for encoded images, pyramid serialised with `to_flat(dtype)`. The rows record
    this code's FEATURE_VERSION (the features were computed by it) and `encoder`'s engine and precision
    (`encoder_provenance(predictor)`; left null when not given)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    cols: dict[str, list] = {name: [] for name in FEATURE_SCHEMA.names}
    now = datetime.now(timezone.utc)
    for item in items:
        flat, shapes = item.features.to_flat(dtype)
        g = item.features.geometry
        cols["image_id"].append(item.image_id)
        cols["uri"].append(item.uri)
        cols["content_sha256"].append(item.content_sha256)
        cols["fingerprint"].append(fingerprint)
        cols["dtype"].append(dtype)
        cols["original_height"].append(g.original_size[0])
        cols["original_width"].append(g.original_size[1])
        cols["resized_height"].append(g.resized_size[0])
        cols["resized_width"].append(g.resized_size[1])
        cols["padded_height"].append(g.padded_size[0])
        cols["padded_width"].append(g.padded_size[1])
        cols["scale"].append(float(g.scale))
        cols["level_shapes"].append([int(v) for shp in shapes for v in shp])
        cols["features"].append(flat.tobytes())
        cols["created_at"].append(now)
        cols["exif_orientation"].append(item.exif_orientation)
        cols["feature_version"].append(FEATURE_VERSION)
        cols["encode_engine"].append(encoder.engine)
        cols["encode_precision"].append(encoder.precision)
    return pa.table(cols, schema=FEATURE_SCHEMA)


def error_rows(errors: Iterable[tuple[str, str, str, str]], fingerprint: str) -> pa.Table:
    """Arrow rows (ERROR_SCHEMA) from (image_id, uri, reason, detail) tuples."""
    now = datetime.now(timezone.utc)
    errors = list(errors)
    return pa.table(
        {
            "image_id": [e[0] for e in errors],
            "uri": [e[1] for e in errors],
            "fingerprint": [fingerprint] * len(errors),
            "reason": [e[2] for e in errors],
            "detail": [e[3] for e in errors],
            "created_at": [now] * len(errors),
        },
        schema=ERROR_SCHEMA,
    )


def row_to_features(row: dict) -> StoredFeatures:
    """Rebuild a StoredFeatures from one row (a dict of python values, FEATURE_SCHEMA columns)."""
    dtype = row["dtype"]
    if dtype not in STORAGE_DTYPES:
        raise FeatureStoreError(f"row for {row['image_id']!r} has unknown dtype {dtype!r}")
    shapes = np.asarray(row["level_shapes"], dtype=np.int64).reshape(-1, 3).tolist()
    geometry = ImageGeometry(
        (row["original_height"], row["original_width"]),
        (row["resized_height"], row["resized_width"]),
        (row["padded_height"], row["padded_width"]),
        row["scale"],
    )
    return StoredFeatures(
        image_id=row["image_id"],
        uri=row["uri"],
        content_sha256=row["content_sha256"],
        fingerprint=row["fingerprint"],
        dtype=dtype,
        created_at=row["created_at"],
        features=_unflatten(row["features"], dtype, shapes, geometry),
        exif_orientation=row.get("exif_orientation"),
        feature_version=row.get("feature_version"),
        encode_engine=row.get("encode_engine"),
        encode_precision=row.get("encode_precision"),
    )


def schema_type_mismatches(actual: pa.Schema, expected: pa.Schema) -> list[tuple[str, pa.DataType, pa.DataType]]:
    """(column, its type, the expected type) for each column of `expected` that `actual` holds under another
    Arrow type (list types compare their item types, not the item field's name). Such a table opens but
    refuses every append."""
    return [(f.name, actual.field(f.name).type, f.type) for f in expected
            if f.name in actual.names and not _same_type(actual.field(f.name).type, f.type)]


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    list_kinds = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    for is_kind in list_kinds:
        if is_kind(a) or is_kind(b):
            return is_kind(a) and is_kind(b) and _same_type(a.value_type, b.value_type) and (
                not pa.types.is_fixed_size_list(a) or a.list_size == b.list_size)
    return a.equals(b)


def _unflatten(data, dtype: str, shapes: list[list[int]], geometry: ImageGeometry) -> ImageFeatures:
    """`ImageFeatures.from_flat` for bytes or an Arrow buffer, converted with torch: one fp32 copy split
    into per-level views. About 40x faster than numpy's astype here, which makes up most of a fetch."""
    flat = np.frombuffer(data, dtype=STORAGE_DTYPES[dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only Arrow memory: only read, then copied
        source = torch.from_numpy(flat)
    try:
        values = flat_to_float32(source, dtype, shapes)
    except ValueError as e:
        raise FeatureStoreError(str(e)) from None
    return ImageFeatures(tuple(levels_of(values, shapes)), geometry)


@dataclass(frozen=True)
class WrittenFragment:
    """A Lance fragment written but not committed: its metadata (JSON), the encoder and the image ids of
    its rows, in order. What `FeatureStore.commit_fragments` needs to commit it exactly once."""

    metadata: str
    fingerprint: str
    image_ids: tuple[str, ...]
    nbytes: int = 0

    def data_files(self) -> list[str]:
        return [f["path"] for f in json.loads(self.metadata).get("files", [])]

    def to_dict(self) -> dict:
        return {"metadata": self.metadata, "fingerprint": self.fingerprint, "image_ids": list(self.image_ids),
                "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: dict) -> "WrittenFragment":
        return cls(d["metadata"], d["fingerprint"], tuple(d["image_ids"]), int(d.get("nbytes") or 0))


@dataclass
class CommitOutcome:
    """What a commit did with each (image_id, fingerprint) pair of its fragments: `added` (made visible
    now), `recommitted` (its fragment was committed before: a repeated commit, nothing added) or `present`
    (stored by other rows: left out)."""

    version: int
    added: list[tuple[str, str]] = field(default_factory=list)
    recommitted: list[tuple[str, str]] = field(default_factory=list)
    present: list[tuple[str, str]] = field(default_factory=list)


def write_feature_fragments(uri: str, rows: pa.Table, storage_options: dict | None = None) -> list[WrittenFragment]:
    """Write rows as new data files of the table at `uri` WITHOUT committing them; returns what
    `FeatureStore.commit_fragments` needs. Uncommitted files are invisible to readers, so a writer killed
    before the commit leaves no partial rows. One fragment per encoder fingerprint in `rows`."""
    written = []
    for fp in sorted(set(rows.column("fingerprint").to_pylist())) if rows.num_rows else []:
        part = rows.filter(pc.equal(rows.column("fingerprint"), fp)).cast(FEATURE_SCHEMA)
        fragments = write_fragments(part, uri, schema=FEATURE_SCHEMA, storage_options=storage_options,
                                    max_rows_per_file=max(1, part.num_rows))
        ids = part.column("image_id").to_pylist()
        start = 0
        for f in fragments:  # rows go to fragments in order
            meta = f.to_json()
            n = int(meta["physical_rows"])
            nbytes = sum(int(d.get("file_size_bytes") or 0) for d in meta.get("files", []))
            written.append(WrittenFragment(json.dumps(meta), fp, tuple(ids[start : start + n]), nbytes))
            start += n
    return written


class FeatureStore:
    """The features table and its errors table under one LanceDB root; creates both on first use."""

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        table: str = DEFAULT_TABLE,
        storage_options: dict | None = None,
    ):
        self.root = root
        self.table_name = table
        self.storage_options = dict(storage_options) if storage_options else None
        self.features_uri = table_uri(root, table)
        self.errors_uri = table_uri(root, table + "_errors")
        import lancedb  # here, not at module level: readers need only pylance, and lancedb takes seconds to import
        from lancedb.index import BTree

        try:
            check_table_name(table)
        except ValueError as e:
            raise FeatureStoreError(str(e)) from None
        self._db = lancedb.connect(root, storage_options=self.storage_options)
        schemas = {table: FEATURE_SCHEMA, table + "_errors": ERROR_SCHEMA}
        # Every table that exists is opened and checked before anything is created or migrated: a database
        # refused here is left exactly as it was (no new table beside it, no column added to a foreign one).
        found = {name: self._open_checked(name, schema) for name, schema in schemas.items()}
        try:
            self._features = self._create_or_migrate(table, FEATURE_SCHEMA, found[table])
            self._errors = self._create_or_migrate(table + "_errors", ERROR_SCHEMA, found[table + "_errors"])
            self._ensure_id_index(BTree)
        except FeatureStoreError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise FeatureStoreError(f"cannot prepare the feature tables under {root}: {lance_reason(e)}") from None

    def _ensure_id_index(self, btree: type, attempts: int = 5) -> None:
        """Create the BTree index on image_id unless the table has it. Two first runs on a new table race here:
        Lance refuses the later CreateIndex (a commit conflict), so a failure re-reads the table at its latest
        version before checking again, and retries while the index is still missing."""
        for attempt in range(attempts):
            if self._has_id_index():
                return
            try:
                self._features.create_index("image_id", config=btree(), replace=False)
                return
            except (RuntimeError, ValueError):  # another process committed an index (or anything) in between
                self._features.checkout_latest()
                if attempt == attempts - 1 and not self._has_id_index():
                    raise

    def _has_id_index(self) -> bool:
        return any(list(idx.columns) == ["image_id"] for idx in self._features.list_indices())

    def _open_checked(self, name: str, schema: pa.Schema):
        """The table `name` if it exists (None if not), checked against `schema` without changing it:
        FeatureStoreError when it cannot be read or is not a table of ours."""
        try:
            table = self._db.open_table(name)
        except (OSError, RuntimeError, ValueError) as e:
            if is_not_found(e):
                return None
            raise FeatureStoreError(f"table {name!r} under {self.root} cannot be opened: {lance_reason(e)} (is "
                                    "--db a LanceDB database folder? use another --db or --table)") from None
        self._check_schema(name, table.schema, schema)
        return table

    def _check_schema(self, name: str, actual: pa.Schema, schema: pa.Schema) -> None:
        """FeatureStoreError unless `actual` has every column of `schema` under its type; the ADDED_COLUMNS
        may be missing (an older table of ours, given them by `_create_or_migrate`)."""
        missing = [f.name for f in schema if f.name not in actual.names and f.name not in ADDED_COLUMNS]
        if missing:
            raise FeatureStoreError(
                f"table {name!r} under {self.root} exists with another schema (missing columns {missing}); "
                "use another --table or --db"
            )
        wrong = schema_type_mismatches(actual, schema)
        if wrong:
            raise FeatureStoreError(
                f"table {name!r} under {self.root} exists with another schema: "
                + "; ".join(f"column {n!r} is {have}, this code writes {want}" for n, have, want in wrong)
                + " (use another --table or --db, or recreate the table)"
            )

    def _create_or_migrate(self, name: str, schema: pa.Schema, table):
        """Create the table when `table` is None, else give a checked older table the ADDED_COLUMNS it lacks."""
        if table is None:
            table = self._db.create_table(name, schema=schema, exist_ok=True)
            self._check_schema(name, table.schema, schema)  # another process may have made it meanwhile
        added = [f for f in schema if f.name in ADDED_COLUMNS and f.name not in table.schema.names]
        if added:
            self._add_columns(table_uri(self.root, name), added)
            table = self._db.open_table(name)
        return table

    def _add_columns(self, uri: str, fields: list[pa.Field], attempts: int = 5) -> None:
        """Give a table made before `fields` were part of its schema those columns, all null (Lance schema
        evolution: no data is rewritten). Writers opening the table together race here: a failed change is
        checked again on the latest version."""
        for attempt in range(attempts):
            ds = lance.dataset(uri, storage_options=self.storage_options)
            todo = [f for f in fields if f.name not in ds.schema.names]
            if not todo:
                return
            try:
                ds.add_columns(todo)
                return
            except (OSError, ValueError, RuntimeError):  # another writer changed the table meanwhile
                if attempt == attempts - 1:
                    raise

    def check_writable(self) -> None:
        """Stage and delete a small file in the features table's folder, as a write task stages its data: a
        FeatureStoreError when the storage refuses it (read-only, no permission, full), so that a job finds
        out before it encodes anything rather than when it writes the first rows."""
        filesystem, base = _filesystem(self.features_uri)
        probe = f"{base}/.write-probe-{uuid.uuid4().hex}.tmp"
        try:
            with filesystem.open_output_stream(probe) as out:
                out.write(b"probe")
            filesystem.delete_file(probe)
        except (OSError, pa.ArrowException) as e:
            raise FeatureStoreError(f"cannot write to the feature table {self.features_uri}: {e}") from None

    def dataset(self) -> lance.LanceDataset:
        """The features table as a pylance dataset at its latest version."""
        return lance.dataset(self.features_uri, storage_options=self.storage_options)

    def existing_ids(self, fingerprint: str) -> set[str]:
        """Ids that already have features for this fingerprint."""
        table = self.dataset().to_table(columns=["image_id"], filter=f"fingerprint = {sql_string(fingerprint)}")
        return set(table.column("image_id").to_pylist())

    def dtypes(self, fingerprint: str) -> dict[str, int]:
        """Row count per storage dtype for one encoder fingerprint (the dtype is chosen per row)."""
        column = self.dataset().to_table(columns=["dtype"], filter=f"fingerprint = {sql_string(fingerprint)}")
        return dict(Counter(column.column("dtype").to_pylist()))

    def origins(self, fingerprint: str) -> dict[str, Origin]:
        """image id -> the uri and sha256 of the bytes its stored features (for this fingerprint) came from."""
        columns = ["image_id", "uri", "content_sha256", "exif_orientation"]
        table = self.dataset().to_table(columns=columns, filter=f"fingerprint = {sql_string(fingerprint)}")
        return {i: Origin(u, h, t) for i, u, h, t in zip(*(table.column(c).to_pylist() for c in columns))}

    def fill_exif_orientation(self, tags: dict[str, int], fingerprint: str) -> int:
        """Record the EXIF orientation tag of rows (of this fingerprint) stored before it was recorded (null), read
        from their unchanged source: a Lance update of that column, no re-encode; a row that has a tag keeps it.
        Returns how many rows were updated."""
        updated = 0
        by_tag: dict[int, list[str]] = {}
        for image_id, tag in tags.items():
            by_tag.setdefault(int(tag), []).append(image_id)
        for tag, ids in sorted(by_tag.items()):
            for chunk in _chunks(sorted(ids), 500):
                where = (f"fingerprint = {sql_string(fingerprint)} AND exif_orientation IS NULL AND "
                         f"image_id IN ({', '.join(map(sql_string, chunk))})")
                result = self.dataset().update({"exif_orientation": str(tag)}, where=where)
                updated += int(result["num_rows_updated"] if isinstance(result, dict) else result.num_rows_updated)
        return updated

    def provenance(self, fingerprint: str) -> dict[str, RowProvenance]:
        """image id -> what computed its stored row (for this fingerprint) and at which padded size."""
        columns = ["image_id", "feature_version", "encode_engine", "encode_precision", "padded_height", "padded_width"]
        table = self.dataset().to_table(columns=columns, filter=f"fingerprint = {sql_string(fingerprint)}")
        i, v, e, p, h, w = (table.column(c).to_pylist() for c in columns)
        return {i[n]: RowProvenance(v[n], e[n], p[n], (h[n], w[n])) for n in range(table.num_rows)}

    def remove(self, image_ids: Iterable[str], fingerprint: str) -> int:
        """Delete the rows of these ids for one fingerprint (features to be encoded again); returns how many.
        Each chunk is one committed delete: a run killed between them leaves some rows, which the next run
        finds changed again, and never a second row of an id."""
        removed = 0
        ds = self.dataset()
        for chunk in _chunks(sorted(set(image_ids)), 1000):
            where = f"fingerprint = {sql_string(fingerprint)} AND image_id IN ({', '.join(map(sql_string, chunk))})"
            removed += ds.count_rows(where)
            ds.delete(where)
        return removed

    def count(self, fingerprint: str | None = None) -> int:
        """Number of feature rows, for one fingerprint or all."""
        ds = self.dataset()
        return ds.count_rows(f"fingerprint = {sql_string(fingerprint)}") if fingerprint else ds.count_rows()

    def fingerprints(self) -> dict[str, int]:
        """Row count per encoder fingerprint in the table."""
        column = self.dataset().to_table(columns=["fingerprint"]).column("fingerprint").to_pylist()
        counts: dict[str, int] = {}
        for fp in column:
            counts[fp] = counts.get(fp, 0) + 1
        return counts

    def add(self, rows: pa.Table) -> int:
        """Store feature rows, skipping (image_id, fingerprint) pairs already stored (and repeats within
        `rows`); returns the number of rows added. Exactly once, like `commit_fragments`."""
        if rows.num_rows == 0:
            return 0
        rows = rows.cast(FEATURE_SCHEMA)
        seen: set[tuple[str, str]] = set()
        keep = []
        for n, key in enumerate(zip(rows.column("image_id").to_pylist(), rows.column("fingerprint").to_pylist())):
            if key not in seen:
                seen.add(key)
                keep.append(n)
        written = write_feature_fragments(self.features_uri, rows.take(keep), self.storage_options)
        return len(self.commit_fragments(written).added)

    def commit_fragments(self, fragments: Sequence[WrittenFragment]) -> CommitOutcome:
        """Make written fragments visible, exactly once per (image_id, fingerprint), in one atomic commit.

        Idempotent: a fragment already in the table (a repeated commit) is skipped, and so are rows whose
        (image_id, fingerprint) the table already holds (a fragment holding some of them is rewritten
        without them). The check and the commit are one compare-and-swap: the commit is a Lance `Merge`
        listing every fragment of the version the check read, which Lance refuses when any other commit
        landed in between (CommitConflictError); the check then runs again on the new version."""
        for attempt in range(_COMMIT_ATTEMPTS):
            ds = self.dataset()
            current = [f.metadata for f in ds.get_fragments()]
            in_table = {d.path for m in current for d in m.files}
            outcome = CommitOutcome(ds.version)
            fresh = []
            for f in fragments:
                if set(f.data_files()) & in_table:  # committed before: a repeated commit
                    outcome.recommitted.extend((i, f.fingerprint) for i in f.image_ids)
                elif self._data_files_exist(f):  # else lost (the table was deleted): its images stay to do
                    fresh.append(f)
            taken = self._stored_keys(ds, {(i, f.fingerprint) for f in fresh for i in f.image_ids})
            new: list[FragmentMetadata] = []
            for f in fresh:
                keys = [(i, f.fingerprint) for i in f.image_ids]
                dup = {k for k in keys if k in taken}
                outcome.present.extend(k for k in keys if k in dup)
                if len(dup) < len(keys):
                    new.extend(self._without(f, {k[0] for k in dup}) if dup else [FragmentMetadata.from_json(f.metadata)])
                    outcome.added.extend(k for k in keys if k not in dup)
                    taken.update(keys)
            fault_point("checked")
            if not new:
                return outcome
            try:
                committed = lance.LanceDataset.commit(
                    self.features_uri, lance.LanceOperation.Merge(current + new, ds.lance_schema),
                    read_version=ds.version, storage_options=self.storage_options,
                )
            except CommitConflictError:  # another writer committed since the check: check again
                time.sleep(min(2.0, 0.01 * 2**attempt) * (0.5 + np.random.random()))
                continue
            fault_point("committed")
            outcome.version = committed.version
            return outcome
        raise FeatureStoreError(
            f"could not commit to {self.features_uri}: {_COMMIT_ATTEMPTS} attempts met a concurrent commit"
        )

    def _data_files_exist(self, fragment: WrittenFragment) -> bool:
        filesystem, base = _filesystem(self.features_uri)
        infos = filesystem.get_file_info([f"{base}/data/{name}" for name in fragment.data_files()])
        return all(i.type == pafs.FileType.File for i in infos)

    def _stored_keys(self, ds: lance.LanceDataset, keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of the (image_id, fingerprint) pairs the table version `ds` holds."""
        found: set[tuple[str, str]] = set()
        for fp in {k[1] for k in keys}:
            for chunk in _chunks(sorted(i for i, f in keys if f == fp), 500):
                table = ds.to_table(
                    columns=["image_id"],
                    filter=f"fingerprint = {sql_string(fp)} AND image_id IN ({', '.join(map(sql_string, chunk))})",
                )
                found.update((i, fp) for i in table.column("image_id").to_pylist())
        return found

    def _without(self, fragment: WrittenFragment, drop: set[str]) -> list[FragmentMetadata]:
        """Rewrite an uncommitted fragment without the rows of `drop` (ids another fragment stored first)."""
        parts = []
        for name in fragment.data_files():
            reader = LanceFileReader(f"{self.features_uri}/data/{name}", storage_options=self.storage_options)
            parts.append(reader.read_all().to_table())
        rows = pa.concat_tables(parts)
        rows = rows.filter(pc.invert(pc.is_in(rows.column("image_id"), pa.array(sorted(drop), pa.string()))))
        rewritten = write_feature_fragments(self.features_uri, rows, self.storage_options)
        return [FragmentMetadata.from_json(f.metadata) for f in rewritten]

    def duplicates(self, fingerprint: str | None = None) -> int:
        """Rows beyond the first of an (image_id, fingerprint): 0 unless written by a version of this code
        before the exactly-once commit, or by hand."""
        return len(self._extra_rows(fingerprint))

    def remove_duplicates(self, fingerprint: str | None = None) -> int:
        """Delete every row beyond the first (lowest row address) of each (image_id, fingerprint); returns
        how many. Safe to run concurrently: every process picks the same rows to keep."""
        extra = self._extra_rows(fingerprint)
        ds = self.dataset()
        for chunk in _chunks(sorted(extra), 1000):
            ds.delete(f"_rowaddr IN ({', '.join(map(str, chunk))})")
        return len(extra)

    def _extra_rows(self, fingerprint: str | None) -> list[int]:
        where = f"fingerprint = {sql_string(fingerprint)}" if fingerprint else None
        table = self.dataset().to_table(columns=["image_id", "fingerprint"], filter=where, with_row_address=True)
        first: dict[tuple[str, str], int] = {}
        extra = []
        keys = zip(table.column("image_id").to_pylist(), table.column("fingerprint").to_pylist())
        for key, addr in zip(keys, table.column("_rowaddr").to_pylist()):
            kept = first.get(key)
            if kept is None:
                first[key] = addr
            else:
                extra.append(max(kept, addr))
                first[key] = min(kept, addr)
        return extra

    def optimize_index(self) -> None:
        """Fold rows appended since the index was built into the image_id BTREE index."""
        self.dataset().optimize.optimize_indices()

    def record_errors(self, rows: pa.Table) -> None:
        """Insert or replace error rows keyed by (image_id, fingerprint), at the table's latest version (another
        process may have written since this store was opened: a stale view would insert a second row)."""
        if rows.num_rows == 0:
            return
        self._errors.checkout_latest()
        (
            self._errors.merge_insert(["image_id", "fingerprint"])
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(rows.cast(ERROR_SCHEMA))
        )

    def clear_errors(self, image_ids: Iterable[str], fingerprint: str) -> None:
        """Drop error rows of images that have since been encoded with this fingerprint (at the table's latest
        version, so that a row another process recorded since this store was opened goes too)."""
        self._errors.checkout_latest()
        for chunk in _chunks(sorted(set(image_ids)), 500):
            self._errors.delete(
                f"fingerprint = {sql_string(fingerprint)} AND image_id IN ({', '.join(map(sql_string, chunk))})"
            )

    def errors(self, fingerprint: str | None = None) -> pa.Table:
        """The errors table, for one fingerprint or all."""
        ds = lance.dataset(self.errors_uri, storage_options=self.storage_options)
        return ds.to_table(filter=f"fingerprint = {sql_string(fingerprint)}" if fingerprint else None)

    def reader(self, fingerprint: str, **kwargs) -> "FeatureReader":
        """A FeatureReader on this store's features table for one encoder fingerprint."""
        return FeatureReader(self.root, fingerprint, table=self.table_name, storage_options=self.storage_options, **kwargs)


class FeatureReader:
    """Fast fetch of one image's features by id, for one encoder fingerprint. Open once per process.

    Rows written after the reader opened become visible: the reader moves to the latest table version
    when a fetch misses (at most once per `miss_refresh_s` seconds) and before any fetch once
    `refresh_interval_s` has passed since its last check. It only ever returns rows whose fingerprint
    equals `fingerprint`. A table that does not exist yet is opened on a later call (a fetch is a miss,
    UnknownImageError). A table that exists but cannot be read (no permission, an IO error, a damaged manifest)
    is not a miss: every read raises FeatureStoreError with the reason until it can be read again, so a caller
    tells a storage fault from an image not encoded yet; the constructor only logs it.
    """

    def __init__(
        self,
        root: str,
        fingerprint: str,
        *,
        table: str = DEFAULT_TABLE,
        storage_options: dict | None = None,
        refresh_interval_s: float = 5.0,
        miss_refresh_s: float = 0.05,
    ):
        if not fingerprint:
            raise ValueError("a FeatureReader needs the encoder fingerprint of the features it may return")
        self.uri = table_uri(root, table)
        self.fingerprint = fingerprint
        self.storage_options = dict(storage_options) if storage_options else None
        self.refresh_interval_s = refresh_interval_s
        self.miss_refresh_s = miss_refresh_s
        self._ds: lance.LanceDataset | None = None
        self._fault: str | None = None  # why the table, which exists, cannot be read now
        self._checked_at = float("-inf")
        self._miss_refreshed_at = float("-inf")
        try:
            self._open()
        except FeatureStoreError as e:
            log.warning("%s; every fetch fails until it can be read", e)

    @property
    def version(self) -> int | None:
        """The table version this reader sees (None while the table does not exist or cannot be read)."""
        return self._ds.version if self._ds is not None else None

    def refresh(self) -> None:
        """Move to the latest committed version now."""
        self._checked_at = time.monotonic()
        if self._ds is None:
            self._open()
            return
        try:
            self._ds.checkout_latest()
        except (OSError, ValueError, RuntimeError):  # deleted (then not yet again) or unreadable now: open anew
            self._open()

    def refresh_if_due(self) -> int | None:
        """Move to the latest version when `refresh_interval_s` has passed since the last check (as a fetch
        does); the version seen afterwards. A caller that caches features compares versions to learn when
        rows may have been replaced (`identities`)."""
        if time.monotonic() - self._checked_at >= self.refresh_interval_s:
            self.refresh()
        return self.version

    def identities(self, image_ids: Iterable[str]) -> dict[str, RowIdentity]:
        """The identity (content hash, creation time, EXIF tag) of the row `get` returns for each id, at the
        version this reader sees; ids with no row for this encoder are left out. One indexed query per 500 ids:
        a cache re-checks what it holds when the version moves (a re-encoded image keeps its id, not its row;
        a legacy row whose tag `--check-content` filled in keeps both, not its tag)."""
        found: dict[str, RowIdentity] = {}
        self._raise_fault()
        if self._ds is None:
            return found
        for chunk in _chunks(sorted(set(image_ids)), 500):
            where = f"image_id IN ({', '.join(map(sql_string, chunk))})"
            try:
                table = self._ds.to_table(columns=self._identity_columns(), filter=where)
            except (OSError, ValueError):  # a file of an old version removed by compaction: read the latest
                self.refresh()
                table = self._ds.to_table(columns=self._identity_columns(), filter=where)
            for row in table.to_pylist():
                if row["fingerprint"] != self.fingerprint:
                    continue
                ident = (row["content_sha256"], row["created_at"], row.get("exif_orientation"))
                known = found.get(row["image_id"])
                if known is None or ident[1] > known[1]:  # the newest, as `get` picks
                    found[row["image_id"]] = ident
        return found

    def _identity_columns(self) -> list[str]:
        """The columns of a row identity this table has (a table made before the tag column reads it as null)."""
        return _IDENTITY_COLUMNS + [c for c in ("exif_orientation",) if c in self._ds.schema.names]

    def get(self, image_id: str) -> ImageFeatures:
        """The image's features (fp32 tensors on CPU); UnknownImageError if this encoder has none for it."""
        return self.get_record(image_id).features

    def get_record(self, image_id: str) -> StoredFeatures:
        """Like `get`, with the row's provenance (uri, content hash, dtype, creation time)."""
        now = time.monotonic()
        if now - self._checked_at >= self.refresh_interval_s:
            self.refresh()
        self._raise_fault()
        row = self._fetch(image_id)
        if row is None and time.monotonic() - self._miss_refreshed_at >= self.miss_refresh_s:
            self._miss_refreshed_at = time.monotonic()
            self.refresh()
            row = self._fetch(image_id)
        if row is None:
            raise UnknownImageError(self._miss_message(image_id))
        if row["fingerprint"] != self.fingerprint:
            raise FeatureStoreError(f"internal error: fetched a row of encoder {row['fingerprint']!r}")
        return row_to_features(row)

    def __contains__(self, image_id: str) -> bool:
        try:
            self.get_record(image_id)
        except UnknownImageError:
            return False
        return True

    def _open(self) -> None:
        """Open the table: one that does not exist (yet) leaves the reader empty; one that exists but cannot be
        read raises FeatureStoreError (and so does every read, `_raise_fault`, until an open succeeds)."""
        self._try_open()
        self._raise_fault()

    def _try_open(self) -> None:
        self._checked_at = time.monotonic()
        try:
            self._ds = lance.dataset(self.uri, storage_options=self.storage_options)
            self._fault = None
        except (OSError, ValueError, RuntimeError) as e:
            self._ds = None
            self._fault = None if is_not_found(e) else lance_reason(e)

    def _raise_fault(self) -> None:
        """FeatureStoreError while the table exists but could not be read at the last open; it is opened again
        first (at most every `miss_refresh_s`), so a repaired table is read at once."""
        if self._fault is not None and time.monotonic() - self._checked_at >= self.miss_refresh_s:
            self._try_open()
        if self._fault is not None:
            raise FeatureStoreError(f"the feature table {self.uri} exists but cannot be read: {self._fault}")

    def _fetch(self, image_id: str) -> dict | None:
        if self._ds is None:
            return None
        # Filtering on image_id alone is answered by the BTREE index in one step; adding the fingerprint to
        # the SQL filter doubles the fetch time (a two-stage plan). An id has rows for few encoders, so
        # the fingerprint is checked here.
        where = f"image_id = {sql_string(image_id)}"
        try:
            table = self._ds.to_table(filter=where)
        except (OSError, ValueError):
            # A file of an old version may have been removed by compaction/cleanup: retry on the latest.
            self.refresh()
            table = self._ds.to_table(filter=where)
        rows = table.select([c for c in _META_COLUMNS if c in table.column_names]).to_pylist()
        mine = [i for i, r in enumerate(rows) if r["fingerprint"] == self.fingerprint]
        if not mine:
            return None
        newest = max(mine, key=lambda i: rows[i]["created_at"])  # >1 only if two jobs raced
        row = rows[newest]
        row["features"] = table.column("features")[newest].as_buffer()  # zero-copy
        return row

    def _miss_message(self, image_id: str) -> str:
        if self._ds is None:
            return f"no features for image {image_id!r}: the feature table {self.uri} does not exist yet"
        others = self._ds.to_table(columns=["fingerprint"], filter=f"image_id = {sql_string(image_id)}")
        found = sorted(set(others.column("fingerprint").to_pylist()))
        if found:
            return (
                f"image {image_id!r} has no features for encoder {self.fingerprint!r}; "
                f"it was encoded only by {found} (re-run jobs/encode.py with this model)"
            )
        return f"image {image_id!r} is not in the feature table {self.uri} (encoder {self.fingerprint!r})"


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
