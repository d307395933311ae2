"""A dead evaluation worker (killed for memory, its node lost) is one sample's failure, not the end of the run:
the other samples finish and are recorded. Deterministic fault injection on a real local Ray: one sample's
load ends its worker's process every time it runs. A worker that cannot be built at all (its checkpoint changed
or missing on its node) is not a lost worker: one error naming the cause, no sample retried."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from backend_support import make_checkpoint

from pipeline.actor_pool import WorkerStartError
from pipeline.datasets import SampleRef
from pipeline.evaluation import EvalConfig, read_results
from pipeline.evaluation_run import DatasetSelection, WorkerPlacement, collect_samples, run_evaluation
from pipeline.segmenters import SegmenterSpec


def _dataset(root: Path, stems: tuple[str, ...]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for s in stems:
        cv2.imwrite(str(root / "images" / f"{s}.png"), np.full((8, 8, 3), 9, np.uint8))
        cv2.imwrite(str(root / "masks" / f"{s}.png"), np.eye(8, dtype=np.uint8))
    return root


def test_a_sample_that_kills_its_worker_is_its_own_failure_and_the_others_finish(tmp_path):
    class KillsItsWorker(SampleRef):  # defined here, so Ray ships it by value to the worker
        def load(self, max_pixels=None):
            os._exit(1)  # the worker process dies as if killed for memory

    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds", ("a", "b", "c")))]))
    deadly = KillsItsWorker(*[getattr(refs[1], f.name) for f in dataclasses.fields(refs[1])])
    refs = [refs[0], deadly, refs[2]]
    out = tmp_path / "out"
    outcome = run_evaluation("run", SegmenterSpec("grabcut"), EvalConfig(max_clicks=2), refs, out,
                             WorkerPlacement(workers=1, num_cpus=1))
    assert [key for key, _ in outcome.failures] == [("ds", "b")]
    assert "worker died while running this sample" in outcome.failures[0][1]
    assert sorted(r.sample_id for r in outcome.results) == ["a", "c"]
    assert sorted(r.sample_id for r in read_results(out / "results.jsonl")) == ["a", "c"]


def test_a_checkpoint_changed_after_the_run_started_is_one_error_naming_it_not_a_dead_worker_per_sample(tmp_path):
    ckpt = make_checkpoint(tmp_path / "small.pth")
    spec = SegmenterSpec("checkpoint", str(ckpt), variant="small").pinned()
    with open(ckpt, "ab") as f:  # replaced after the driver pinned it: every worker's constructor raises
        f.write(b"other weights")
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds", ("a", "b", "c", "d")))]))
    with pytest.raises(WorkerStartError, match=f"checkpoint {ckpt} changed after the run started"):
        run_evaluation("run", spec, EvalConfig(max_clicks=2), refs, tmp_path / "out",
                       WorkerPlacement(workers=2, num_cpus=2))
    assert read_results(tmp_path / "out" / "results.jsonl") == []


def test_more_workers_than_the_nodes_hold_are_lowered_not_queued_forever(tmp_path, capsys):
    """--workers 3 on one CPU: Ray would queue two workers, and the samples handed to them, without end."""
    refs = collect_samples(DatasetSelection([str(_dataset(tmp_path / "ds", ("a", "b", "c")))]))
    outcome = run_evaluation("run", SegmenterSpec("grabcut"), EvalConfig(max_clicks=2), refs, tmp_path / "out",
                             WorkerPlacement(workers=3, num_cpus=1))
    assert sorted(r.sample_id for r in outcome.results) == ["a", "b", "c"]
    assert "1 workers, not 3" in capsys.readouterr().out
