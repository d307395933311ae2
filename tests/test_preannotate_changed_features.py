"""A resumed pre-annotation run segments again the images whose feature rows were encoded again since.

Real parts throughout: the COCO prompt fixture (tests/preannotate_support.py), a real LanceDB table, the real
`jobs/encode.py --check-content --reencode-changed` on the image folder after one image's pixels changed
(same size), and the real job run again in the same run folder. Its output must be what a fresh run gives.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from preannotate_support import load_preannotate_job, prepare_store

from pipeline.feature_store import FeatureReader

ROOT = Path(__file__).resolve().parents[1]


def _by_object(path: Path) -> dict[str, dict]:
    """The annotations of a COCO output, by the prompt object they answer."""
    return {a["source_key"]: a for a in json.loads(path.read_text())["annotations"]}


def _encode_again(store: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "INTERFORMER_FAULT"))
           and k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "jobs.encode", str(store["fx"].image_root), "--db",
                           str(store["tmp"] / "db"), "--checkpoint", str(store["ckpt"]), "--num-cpus", "1",
                           "--check-content", "--reencode-changed"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)


def test_a_resumed_run_segments_again_what_was_encoded_again_and_equals_a_fresh_run(tmp_path, capsys):
    store = prepare_store(tmp_path, n_grabcut=2, n_berkeley=1)
    fx, job = store["fx"], load_preannotate_job("preannotate_changed_features_job")

    def run(run_dir: str, out: Path) -> dict:
        rc = job.main(["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--db", str(tmp_path / "db"),
                       "--checkpoint", str(store["ckpt"]), "--run-dir", str(tmp_path / run_dir), "--max-clicks", "3",
                       "--workers", "0", "--coco-out", str(out)])
        assert rc == 0, capsys.readouterr().err[-3000:]
        return json.loads((tmp_path / run_dir / "summary.json").read_text())

    first = run("run", tmp_path / "first.json")
    changed = sorted(i for i in fx.images if i not in (fx.unencoded, fx.missing_file))[0]
    Image.open(fx.image_root / changed).rotate(180).save(fx.image_root / changed)  # same size, other pixels
    ids = list(fx.images)
    before = FeatureReader(str(tmp_path / "db"), first["fingerprint"]).identities(ids)
    encoded = _encode_again(store)
    assert encoded.returncode == 0, encoded.stdout[-2000:] + encoded.stderr[-2000:]
    after = FeatureReader(str(tmp_path / "db"), first["fingerprint"]).identities(ids)
    reencoded = sorted(i for i in before if after.get(i) != before[i])
    assert changed in reencoded

    again = run("run", tmp_path / "again.json")
    said = capsys.readouterr().out
    fresh = run("fresh", tmp_path / "fresh.json")
    assert _by_object(tmp_path / "again.json") == _by_object(tmp_path / "fresh.json")
    assert sorted(g["image_id"] for g in again["features_changed"]) == reencoded
    assert "segmented again: their features were encoded again since" in said
    assert again["segmented"] == fresh["segmented"] and again["reasons"] == fresh["reasons"]
    old, new = _by_object(tmp_path / "first.json"), _by_object(tmp_path / "again.json")
    mine = [k for k, a in new.items() if a["image_id"] == next(
        i["id"] for i in json.loads((tmp_path / "again.json").read_text())["images"] if i["file_name"] == changed)]
    assert mine and any(old[k]["segmentation"] != new[k]["segmentation"] for k in mine)  # the change mattered

    rerun = run("run", tmp_path / "rerun.json")  # nothing changed since: nothing is segmented again
    assert rerun["features_changed"] == [] and _by_object(tmp_path / "rerun.json") == new
