"""The encode job's commit protocol under injected faults, on real LanceDB tables: a stop or a process death
before, at and after every step, a repeated commit, concurrent writers, and a table an older version left
with duplicate rows. Rows are counted with lancedb directly; the invariant is: every image whose rows were
staged is stored exactly once per encoder, and every failed input is in the errors table with its reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lance
import lancedb
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer.features import ImageFeatures, ImageGeometry, pyramid_shapes
from pipeline.encoding import write_stage
from pipeline.faults import FAULT_ENV, FAULT_EXIT_CODE, InjectedFault, reset_fault_counts
from pipeline.feature_store import EncodedImage, FeatureStore, feature_rows, write_feature_fragments
from pipeline.staged_commits import CommitTimer, StagedCommitter, StagedRecord, read_staged, stage

FP = "small:random-0123456789:max_side=None:div=32"
STEPS = ("staged", "checked", "committed", "errors_recorded", "unstaged")
ROOT = Path(__file__).resolve().parents[1]


def _item(image_id: str, seed: int = 0) -> EncodedImage:
    padded = (64, 64)
    gen = torch.Generator().manual_seed(seed)
    feats = ImageFeatures(tuple(torch.randn(1, *s, generator=gen) for s in pyramid_shapes(padded)),
                          ImageGeometry((64, 64), (64, 64), padded, 1.0))
    return EncodedImage(image_id, f"/data/{image_id}", f"{seed:064x}", feats)


def _rows(ids: list[str], fp: str = FP) -> pa.Table:
    return feature_rows([_item(i, n) for n, i in enumerate(ids)], fp, "float16")


def _stage(store: FeatureStore, ids: list[str], errors: list[tuple[str, str, str, str]] = ()) -> None:
    fragments = write_feature_fragments(store.features_uri, _rows(ids)) if ids else []
    stage(StagedCommitter(store).uri, StagedRecord(fragments, list(errors), FP))


def _stored(db: Path, fp: str = FP) -> list[str]:
    """The image ids of the feature table, one entry per row, read with lancedb itself."""
    table = lancedb.connect(str(db)).open_table("features").to_arrow()
    return sorted(i for i, f in zip(table.column("image_id").to_pylist(), table.column("fingerprint").to_pylist())
                  if f == fp)


def _errors(db: Path) -> dict[str, str]:
    table = lancedb.connect(str(db)).open_table("features_errors").to_arrow()
    return dict(zip(table.column("image_id").to_pylist(), table.column("reason").to_pylist()))


@pytest.fixture(autouse=True)
def _no_fault(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    reset_fault_counts()


def test_a_repeated_commit_adds_nothing(tmp_path):
    """The original bug: the same fragments committed twice (a stop between the commit and the clearing of the
    committer's list). The second commit finds the fragment in the table and adds no row."""
    store = FeatureStore(str(tmp_path / "db"))
    frags = write_feature_fragments(store.features_uri, _rows(["a", "b", "c"]))
    first = store.commit_fragments(frags)
    again = store.commit_fragments(frags)
    assert sorted(first.added) == [("a", FP), ("b", FP), ("c", FP)]
    assert again.added == [] and sorted(again.recommitted) == sorted(first.added)
    assert again.version == first.version  # nothing was committed at all
    assert _stored(tmp_path / "db") == ["a", "b", "c"]


@pytest.mark.parametrize("step", STEPS)
def test_a_stop_at_any_step_then_a_later_commit_stores_each_image_once(tmp_path, monkeypatch, step):
    """A stop (KeyboardInterrupt, as SIGTERM raises it in the job) at each step; the job's `finally` (or the next
    run) commits again: every staged image once, the failed input recorded with its reason, nothing left staged."""
    db = tmp_path / "db"
    store = FeatureStore(str(db))
    _stage(store, ["a", "b"], [("bad.png", "/data/bad.png", "truncated", "data ends early")])
    _stage(store, ["c"])
    monkeypatch.setenv(FAULT_ENV, f"{step}:raise")
    committer = StagedCommitter(store)
    with pytest.raises(InjectedFault):
        committer.commit_staged()
    monkeypatch.delenv(FAULT_ENV)
    committer.commit_staged()  # the same committer, as the job's final commit does
    StagedCommitter(FeatureStore(str(db))).commit_staged()  # and a later run's recovery
    assert _stored(db) == ["a", "b", "c"]
    assert _errors(db) == {"bad.png": "truncated"}
    assert read_staged(committer.uri) == []
    assert committer.tally.stored == {("a", FP), ("b", FP), ("c", FP)}  # counted once, as the summary shows


_COMMIT_IN_A_CHILD = """
import sys
from pipeline.feature_store import FeatureStore
from pipeline.staged_commits import StagedCommitter
StagedCommitter(FeatureStore(sys.argv[1])).commit_staged()
"""


@pytest.mark.parametrize("step", ["checked", "committed", "unstaged"])
def test_a_process_killed_at_a_step_is_completed_by_the_next_one(tmp_path, step):
    """The committing process dies (os._exit, no cleanup at all) before, right after and well after the Lance
    commit; the next process's commit leaves each image stored once."""
    db = tmp_path / "db"
    store = FeatureStore(str(db))
    _stage(store, ["a", "b"], [("gone.jpg", "/data/gone.jpg", "unreadable", "no such file")])
    env = {**os.environ, FAULT_ENV: f"{step}:exit", "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", _COMMIT_IN_A_CHILD, str(db)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == FAULT_EXIT_CODE, child.stderr[-2000:]
    assert _stored(db) == ([] if step == "checked" else ["a", "b"])
    StagedCommitter(FeatureStore(str(db))).commit_staged()
    assert _stored(db) == ["a", "b"]
    assert _errors(db) == {"gone.jpg": "unreadable"}


def test_concurrent_writers_of_the_same_images_store_each_once(tmp_path):
    """Two writers (threads released at once) commit different fragments holding the same and overlapping ids,
    round after round: the compare-and-swap commit lets exactly one row per id through."""
    store = FeatureStore(str(tmp_path / "db"))
    other = FeatureStore(str(tmp_path / "db"))
    expected: list[str] = []
    for round_ in range(4):
        ids_a = [f"r{round_}-{i}" for i in range(0, 4)]
        ids_b = [f"r{round_}-{i}" for i in range(2, 6)]  # two shared with writer a
        expected += [f"r{round_}-{i}" for i in range(6)]
        frags = {"a": write_feature_fragments(store.features_uri, _rows(ids_a)),
                 "b": write_feature_fragments(store.features_uri, _rows(ids_b))}
        barrier = threading.Barrier(2)
        outcomes = {}

        def commit(name: str, s: FeatureStore) -> None:
            barrier.wait()
            outcomes[name] = s.commit_fragments(frags[name])

        threads = [threading.Thread(target=commit, args=("a", store)), threading.Thread(target=commit, args=("b", other))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        added = outcomes["a"].added + outcomes["b"].added
        assert sorted(added) == sorted((i, FP) for i in set(ids_a) | set(ids_b))
    assert _stored(tmp_path / "db") == sorted(expected)
    reader = store.reader(FP)
    for image_id in expected:
        assert reader.get(image_id).geometry.padded_size == (64, 64)


def test_a_table_with_duplicates_from_an_older_version_is_repaired(tmp_path):
    """Rows doubled the way the old driver did it (the same fragments appended twice) are found and removed,
    keeping one row per (image_id, fingerprint); removing again finds nothing."""
    db = tmp_path / "db"
    store = FeatureStore(str(db))
    store.add(_rows(["keep"]))
    frags = write_feature_fragments(store.features_uri, _rows(["x", "y"]))
    for _ in range(2):
        ds = store.dataset()
        lance.LanceDataset.commit(store.features_uri, lance.LanceOperation.Append(
            [lance.fragment.FragmentMetadata.from_json(f.metadata) for f in frags]), read_version=ds.version)
    assert _stored(db) == ["keep", "x", "x", "y", "y"] and store.duplicates(FP) == 2
    assert store.remove_duplicates(FP) == 2
    assert _stored(db) == ["keep", "x", "y"] and store.duplicates(FP) == 0
    assert store.remove_duplicates(FP) == 0
    assert store.reader(FP).get("x").geometry.padded_size == (64, 64)


def test_a_write_task_killed_before_staging_leaves_nothing_visible(tmp_path, monkeypatch):
    """A write task that dies after writing its fragment but before staging it (a lost node): the fragment stays
    invisible; Ray runs the task again, and its images are stored once."""
    store = FeatureStore(str(tmp_path / "db"))
    staging = StagedCommitter(store).uri
    batch = _rows(["p", "q"]).append_column("reason", pa.nulls(2, pa.string())).append_column(
        "detail", pa.nulls(2, pa.string()))
    monkeypatch.setenv(FAULT_ENV, "written:raise")
    with pytest.raises(InjectedFault):
        write_stage(batch, store.features_uri, staging, FP)
    StagedCommitter(store).commit_staged()
    assert _stored(tmp_path / "db") == []
    monkeypatch.delenv(FAULT_ENV)
    write_stage(batch, store.features_uri, staging, FP)  # the retried task
    StagedCommitter(store).commit_staged()
    assert _stored(tmp_path / "db") == ["p", "q"]


def test_the_commit_timer_commits_without_waiting_for_results(tmp_path):
    """Staged work is committed by the timer alone (no result handed to the driver), and `stop` commits the rest."""
    db = tmp_path / "db"
    store = FeatureStore(str(db))
    committer = StagedCommitter(store)
    timer = CommitTimer(committer, 0.05).start()
    _stage(store, ["t1"])
    deadline = time.monotonic() + 120  # a bound on a hang, not a speed requirement
    while read_staged(committer.uri):
        assert time.monotonic() < deadline, "the timer never committed the staged record"
        time.sleep(0.02)
    assert _stored(db) == ["t1"]
    _stage(store, ["t2"])
    timer.stop()
    assert _stored(db) == ["t1", "t2"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True),
                               st.sampled_from((None,) + STEPS)), min_size=1, max_size=4))
def test_any_sequence_of_writes_and_interrupted_commits_is_exactly_once(tmp_path_factory, plan):
    """Property: batches of (possibly repeated) ids staged, each followed by a commit stopped at any step or not
    at all; after a final commit every id written is stored exactly once."""
    db = tmp_path_factory.mktemp("prop") / "db"
    store = FeatureStore(str(db))
    written: set[str] = set()
    for ids, fault in plan:
        _stage(store, ids)
        written.update(ids)
        reset_fault_counts()
        os.environ[FAULT_ENV] = f"{fault}:raise" if fault else ""
        try:
            StagedCommitter(store).commit_staged()
        except InjectedFault:
            pass
        finally:
            os.environ.pop(FAULT_ENV, None)
    StagedCommitter(store).commit_staged()
    assert _stored(db) == sorted(written)


def test_a_staged_fragment_whose_files_are_gone_is_not_committed(tmp_path):
    """A record left behind by a run whose data files were deleted since (a table removed by hand): committing it
    would point the table at missing files. It is dropped; its images are simply not stored (a rerun encodes them)."""
    db = tmp_path / "db"
    store = FeatureStore(str(db))
    _stage(store, ["lost"])
    _stage(store, ["kept"])
    (lost,) = [f for _, r in read_staged(StagedCommitter(store).uri) for f in r.fragments if f.image_ids == ("lost",)]
    for data_file in lost.data_files():
        (db / "features.lance" / "data" / data_file).unlink()
    committer = StagedCommitter(store)
    committer.commit_staged()
    assert _stored(db) == ["kept"] and committer.tally.stored == {("kept", FP)}
    assert read_staged(committer.uri) == []
    assert store.reader(FP).get("kept").geometry.padded_size == (64, 64)


def _wait(predicate, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s  # a bound on a hang, not a speed requirement
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_committers_of_one_table_both_finish_when_one_unstages_what_the_other_read(tmp_path, monkeypatch):
    """Two encode runs on one table: B reads the staged records and holds; A commits and unstages them; B goes on.
    B must neither crash on the records A already deleted nor store anything twice."""
    from pipeline.faults import FAULT_DIR_ENV

    store = FeatureStore(str(tmp_path / "db"))
    _stage(store, ["a", "b"])
    _stage(store, ["c"], errors=[("bad", "/data/bad", "unreadable", "truncated file")])
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULT_ENV, "staged:hold")
    monkeypatch.setenv(FAULT_DIR_ENV, str(faults))
    b = StagedCommitter(FeatureStore(str(tmp_path / "db")))
    outcome: dict = {}

    def commit_b():
        try:
            outcome["records"] = b.commit_staged()
        except BaseException as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=commit_b)
    thread.start()
    _wait(lambda: list(faults.glob("held-*")), "committer B to hold after reading the staged records")
    monkeypatch.delenv(FAULT_ENV)  # A (this thread) passes the fault point without holding
    a = StagedCommitter(store)
    assert a.commit_staged() == 2 and read_staged(a.uri) == []
    (faults / "release").touch()
    thread.join(120)
    assert "error" not in outcome, f"committer B failed: {outcome.get('error')!r}"
    assert outcome["records"] == 2
    assert _stored(tmp_path / "db") == ["a", "b", "c"]
    assert _errors(tmp_path / "db") == {"bad": "unreadable"}
    assert read_staged(a.uri) == []


def test_the_commit_timer_goes_on_after_a_failed_tick_and_stop_raises_only_when_the_last_commit_fails(tmp_path):
    """A tick that fails (here: a staged record that cannot be read) is logged and retried at the next tick: the
    timer keeps committing for the rest of the run, and `stop` raises only if its own final commit fails."""
    db = tmp_path / "db"
    store = FeatureStore(str(db))
    committer = StagedCommitter(store)
    Path(committer.uri).mkdir(parents=True)
    broken = Path(committer.uri) / "0-broken.json"
    broken.write_text("{not json")
    timer = CommitTimer(committer, 0.05).start()
    _wait(lambda: getattr(timer, "failed_ticks", 0) >= 2 or not timer._thread.is_alive(), "two failed ticks")
    assert timer._thread.is_alive(), "the first failed tick stopped the timer for the rest of the run"
    broken.unlink()
    _stage(store, ["t1"])
    _wait(lambda: not read_staged(committer.uri), "a tick after the failures to commit")
    assert _stored(db) == ["t1"]
    _stage(store, ["t2"])
    timer.stop()  # earlier failed ticks are not raised: their work was committed later
    assert _stored(db) == ["t1", "t2"]

    last = CommitTimer(committer, 60.0).start()
    broken.write_text("{not json")
    with pytest.raises(ValueError):
        last.stop()
