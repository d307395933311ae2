"""Fetch latency of one image's features by id, and bytes per image, from a LanceDB feature table.

    python bench/bench_feature_store.py                      # 1000 rows of 512x512 features, fp16
    python bench/bench_feature_store.py --dtype float32 --rows 1000
    python bench/bench_feature_store.py --compare-layouts    # also: which column layout fetches fastest

The table is built once (synthetic features with the exact shapes of a 512x512 image; appended in
batches, so it has several fragments, then the image_id index is updated) and reused on later runs
with the same --db. A fetch is `FeatureReader.get(image_id)`: the indexed lookup, the read, and the
conversion to fp32 torch tensors, i.e. what a click server pays per image.

Two measurements:
  * hot: one process fetches random ids right after the table was written, so the data is in the OS page
    cache (what a click server sees for images it, or a recent encode job, read lately);
  * cold (--cold-fetches N, default 20): a fresh process opens the table and fetches N distinct ids, and
    before its opening and before each fetch the table's files are dropped from the page cache with
    posix_fadvise(DONTNEED) (no root needed; only these files are touched). The first fetch (it also reads
    the index) is reported apart. "Cold-ish": a virtual disk may still be cached by the host.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interformer.features import STORAGE_DTYPES, ImageFeatures, ImageGeometry, pyramid_shapes  # noqa: E402
from pipeline.feature_store import EncodedImage, FeatureStore, feature_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import begin, save  # noqa: E402

FINGERPRINT = "bench:synthetic:max_side=None:div=32"


def synthetic_features(size: int, seed: int) -> ImageFeatures:
    geometry = ImageGeometry((size, size), (size, size), (size, size), 1.0)
    gen = torch.Generator().manual_seed(seed)
    return ImageFeatures(tuple(torch.randn(1, *s, generator=gen) for s in pyramid_shapes(geometry.padded_size)), geometry)


def build(store: FeatureStore, rows: int, size: int, dtype: str, batch: int) -> float:
    """Append `rows` rows in batches; returns the seconds taken."""
    have = store.count(FINGERPRINT)
    t0 = time.perf_counter()
    base = synthetic_features(size, 0)
    for start in range(have, rows, batch):
        items = []
        for i in range(start, min(rows, start + batch)):
            # cheap distinct content per row: roll the base pyramid
            feats = ImageFeatures(tuple(torch.roll(p, i, dims=-1) for p in base.pyramid), base.geometry)
            items.append(EncodedImage(f"img/{i:06d}.jpg", f"/data/img/{i:06d}.jpg", f"{i:064x}", feats))
        store.add(feature_rows(items, FINGERPRINT, dtype))
    store.optimize_index()
    return time.perf_counter() - t0


def measure_reader(store: FeatureStore, rows: int, fetches: int, seed: int = 1) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (all threads of this process) of each fetch. On a loaded machine the wall time
    includes waiting for a core; the CPU time is what a fetch costs."""
    reader = store.reader(FINGERPRINT)
    ids = [f"img/{i:06d}.jpg" for i in random.Random(seed).choices(range(rows), k=fetches)]
    reader.get(ids[0])  # warm up the index and the page cache of one row
    wall, cpu = [], []
    for image_id in ids:
        t0, c0 = time.perf_counter(), time.process_time()
        feats = reader.get(image_id)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert feats.pyramid[0].dtype == torch.float32
    return wall, cpu


def evict_from_page_cache(path: str) -> None:
    """Drop every file under `path` from the OS page cache (clean pages only: the files are synced first)."""
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cached_fraction(path: str) -> float | None:
    """Share of the bytes under `path` resident in the page cache (util-linux `fincore`), None if unavailable."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *files],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pairs = [line.split() for line in out.splitlines() if line.strip()]
    total = sum(int(size) for _, size in pairs)
    return round(sum(int(res) for res, _ in pairs) / total, 4) if total else None


def cold_worker(root: str, table: str, rows: int, fetches: int, seed: int = 3) -> dict:
    """Runs in a fresh process: open the reader and fetch `fetches` distinct ids, each from an evicted cache."""
    store = FeatureStore(root, table=table)
    ids = [f"img/{i:06d}.jpg" for i in random.Random(seed).sample(range(rows), k=fetches)]
    evict_from_page_cache(store.features_uri)
    before = cached_fraction(store.features_uri)
    t0 = time.perf_counter()
    reader = store.reader(FINGERPRINT)
    open_s = time.perf_counter() - t0
    wall = []
    for image_id in ids:
        evict_from_page_cache(store.features_uri)
        t0 = time.perf_counter()
        feats = reader.get(image_id)
        wall.append(time.perf_counter() - t0)
        assert feats.pyramid[0].dtype == torch.float32
    return {"open_ms": round(open_s * 1e3, 2), "first_fetch_ms": round(wall[0] * 1e3, 2),
            "fetch_median_ms": round(statistics.median(wall[1:]) * 1e3, 2),
            "fetch_p90_ms": round(float(np.percentile(wall[1:], 90)) * 1e3, 2), "fetches": fetches,
            "cached_fraction_after_eviction": before}


def measure_cold(workdir: str, table: str, rows: int, fetches: int) -> dict:
    """`cold_worker` in a fresh Python process (nothing of the table in its memory)."""
    done = subprocess.run([sys.executable, __file__, "--cold-worker", workdir, table, str(rows), str(fetches)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the cold-fetch process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def compare_layouts(size: int, rows: int, fetches: int, workdir: str) -> dict[str, tuple[float, float]]:
    """Raw pylance fetch by id (BTREE filter, to a numpy fp16 array) for candidate column layouts."""
    import lance

    n = sum(c * h * w for c, h, w in pyramid_shapes((size, size)))
    base = np.random.default_rng(0).standard_normal(n).astype(np.float16)
    layouts = {
        "list<float16>": pa.field("feat", pa.list_(pa.float16())),
        "large_binary (default compression)": pa.field("feat", pa.large_binary()),
        "large_binary, compression none (chosen)": pa.field(
            "feat", pa.large_binary(), metadata={"lance-encoding:compression": "none"}),
        "blob v2 (read_blobs)": pa.field("feat", pa.large_binary(), metadata={"lance-encoding:blob": "true"}),
    }
    results = {}
    for name, field in layouts.items():
        uri = os.path.join(workdir, f"layout_{len(results)}.lance")
        shutil.rmtree(uri, ignore_errors=True)
        schema = pa.schema([pa.field("image_id", pa.string()), field])
        for start in range(0, rows, 50):
            arrays = [np.roll(base, i) for i in range(start, min(rows, start + 50))]
            if field.type == pa.list_(pa.float16()):
                offsets = pa.array(np.arange(0, (len(arrays) + 1) * n, n, dtype=np.int32))
                col = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(arrays)))
            else:
                col = pa.array([a.tobytes() for a in arrays], pa.large_binary())
            ids = [f"img/{i:06d}" for i in range(start, start + len(arrays))]
            table = pa.table({"image_id": ids, "feat": col}).cast(schema)
            lance.write_dataset(table, uri, schema=schema, mode="append" if start else "create",
                                data_storage_version="2.2")
        ds = lance.dataset(uri)
        ds.create_scalar_index("image_id", "BTREE")
        ds = lance.dataset(uri)
        blob = "blob" in name
        times = []
        for i in random.Random(2).choices(range(rows), k=fetches):
            t0 = time.perf_counter()
            where = f"image_id = 'img/{i:06d}'"
            if blob:
                rowid = ds.to_table(columns=["image_id"], filter=where, with_row_id=True).column("_rowid")[0].as_py()
                arr = np.frombuffer(ds.read_blobs("feat", ids=[rowid])[0][1], np.float16)
            else:
                col = ds.to_table(columns=["image_id", "feat"], filter=where).column("feat").chunk(0)
                arr = col.values.to_numpy() if pa.types.is_list(col.type) else np.frombuffer(col[0].as_buffer(), np.float16)
            times.append(time.perf_counter() - t0)
            assert arr.size == n
        results[name] = (statistics.median(times) * 1e3, float(np.percentile(times, 99)) * 1e3, disk_bytes(uri) / rows)
        shutil.rmtree(uri)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cold-worker"]:
        root, table, rows, fetches = argv[1:5]
        print(json.dumps(cold_worker(root, table, int(rows), int(fetches))))
        return 0
    started = begin()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=None, help="LanceDB folder for the benchmark table (default: a temporary folder, "
                   "removed at the end); an existing table there is reused")
    p.add_argument("--rows", type=int, default=1000, help="rows in the table")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (square images)")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16", help="storage dtype")
    p.add_argument("--batch", type=int, default=50, help="rows per append while building (one fragment each)")
    p.add_argument("--fetches", type=int, default=300, help="random fetches timed")
    p.add_argument("--compare-layouts", action="store_true",
                   help="also time raw fetches for list<float16>, large_binary (compressed / not) and blob v2")
    p.add_argument("--layout-rows", type=int, default=300, help="rows per table in the layout comparison")
    p.add_argument("--cold-fetches", type=int, default=20,
                   help="distinct ids fetched by a fresh process with the table evicted from the page cache "
                   "before each fetch (0: skip)")
    p.add_argument("--json", default=None, help="raw results file (default: bench/results/bench_feature_store-UTC.json)")
    a = p.parse_args(argv)

    workdir = a.db or tempfile.mkdtemp(prefix="bench_fs_")
    try:
        store = FeatureStore(workdir, table=f"bench_{a.size}_{a.dtype}")
        build_s = build(store, a.rows, a.size, a.dtype, a.batch)
        times, cpu = measure_reader(store, a.rows, a.fetches)
        per_image = disk_bytes(store.features_uri) / a.rows
        fragments = len(store.dataset().get_fragments())
        figures = {
            "rows": a.rows, "size": a.size, "dtype": a.dtype, "fragments": fragments,
            "build_s": round(build_s, 1),
            "fetch_median_ms": round(statistics.median(times) * 1e3, 2),
            "fetch_p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2),
            "fetch_cpu_median_ms": round(statistics.median(cpu) * 1e3, 2),
            "load_average_1min": round(os.getloadavg()[0], 1),
            "cpus": os.cpu_count(),
            "bytes_per_image": int(per_image),
        }
        print(f"table: {a.rows} rows of {a.size}x{a.size} features ({a.dtype}), {fragments} fragments, built in {build_s:.1f} s")
        print(f"FeatureReader.get: median {figures['fetch_median_ms']} ms, p99 {figures['fetch_p99_ms']} ms "
              f"over {a.fetches} random ids (CPU time median {figures['fetch_cpu_median_ms']} ms; load average "
              f"{figures['load_average_1min']} on {figures['cpus']} CPUs)")
        print(f"bytes per image on disk: {per_image / 1e6:.2f} MB")
        if a.compare_layouts:
            layouts = compare_layouts(a.size, a.layout_rows, min(a.fetches, 200), workdir)
            figures["layouts"] = {k: {"median_ms": round(m, 2), "p99_ms": round(q, 2), "bytes_per_image": int(b)}
                                  for k, (m, q, b) in layouts.items()}
            print("\n| layout | median ms | p99 ms | MB per image |\n|---|---|---|---|")
            for name, (m, q, b) in layouts.items():
                print(f"| {name} | {m:.2f} | {q:.2f} | {b / 1e6:.2f} |")
        if a.cold_fetches:
            figures["cold"] = cold = measure_cold(workdir, store.table_name, a.rows, a.cold_fetches)
            print(f"cold (fresh process, table evicted from the page cache before each fetch; resident after "
                  f"eviction: {cold['cached_fraction_after_eviction']}): open {cold['open_ms']} ms, first fetch "
                  f"{cold['first_fetch_ms']} ms, then median {cold['fetch_median_ms']} ms, p90 {cold['fetch_p90_ms']} ms")
        save("bench_feature_store", figures, started, a.json)
    finally:
        if a.db is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
