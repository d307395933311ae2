"""jobs/preannotate.py from a COCO prompt file to a COCO file of masks, on real benchmark images.

Prompts are coarse versions of GrabCut/Berkeley ground truth (tests/preannotate_support.py); features
come from a real LanceDB table; the first run spreads the images over two workers of a private local
Ray. Every delivered mask must be the model's own mask for the clicks the report says were made.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from preannotate_support import SIZE, load_preannotate_job, prepare_store

from interformer.clicks import Click
from pipeline.encoding import EncoderSpec, build_predictor
from pipeline.faults import FAULT_ENV
from pipeline.feature_store import FeatureReader, FeatureStore
from pipeline.metrics import iou
from pipeline.prompts import RETRYABLE, coco_prompts, decode_rle, read_coco_file

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "preannotate.py"



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preannotate")
    store = prepare_store(tmp)
    fx = store["fx"]
    prompts = coco_prompts(read_coco_file(str(fx.coco_path)), str(fx.image_root))
    objects = {int(o.key.split(":")[1]): o for j in prompts.images for o in j.objects}
    return {**store, "objects": objects, "job": load_preannotate_job("preannotate_job")}


def args(env, run_dir: str, *extra: str, db: str = "db") -> list[str]:
    fx = env["fx"]
    return ["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--db", str(env["tmp"] / db),
            "--checkpoint", str(env["ckpt"]), "--run-dir", str(env["tmp"] / run_dir), "--max-clicks", "4", *extra]


def run_inline(env, run_dir: str, *extra: str, db: str = "db") -> tuple[int, dict]:
    rc = env["job"].main(args(env, run_dir, *extra, db=db))
    return rc, json.loads((env["tmp"] / run_dir / "summary.json").read_text())


def fork_first_run(env, first_run, name: str, with_db: bool = False) -> dict:
    """A private copy of the first run's folder (and, for a test that adds features, of the table).

    Tests that run the job again work on such a copy, so no test sees what another one wrote, in any order.
    """
    shutil.copytree(env["tmp"] / "run", env["tmp"] / name)
    out = env["tmp"] / f"{name}.json"
    out.write_text(first_run["annotations_text"])
    db = "db"
    if with_db:
        db = f"{name}-db"
        shutil.copytree(env["tmp"] / "db", env["tmp"] / db)
    return {"run_dir": name, "out": out, "db": db}


def reference_masks(env):
    """The model's mask for given clicks, computed here from the stored features (one model for all calls)."""
    predictor = build_predictor(EncoderSpec(checkpoint=str(env["ckpt"])), device="cpu")
    reader = FeatureReader(str(env["tmp"] / "db"), predictor.fingerprint)

    def mask(image_id: str, clicks: list[Click], box=None) -> np.ndarray:
        result = predictor.session(reader.get(image_id), box=box).replay(clicks).mask
        if box is None:
            return result
        left, up, right, bottom = box  # a box prompt's mask is bounded by its region, as in the backend
        bounded = np.zeros_like(result)
        bounded[up:bottom, left:right] = result[up:bottom, left:right]
        return bounded

    return mask


def report(env, run_dir: str) -> dict[str, dict]:
    with open(env["tmp"] / run_dir / "report.csv") as f:
        return {row["key"]: row for row in csv.DictReader(f)}


def ledger_objects(env, run_dir: str) -> dict[str, dict]:
    out = {}
    for line in (env["tmp"] / run_dir / "ledger.jsonl").read_text().splitlines():
        for o in json.loads(line)["result"]["objects"]:
            out[o["key"]] = o
    return out


@pytest.fixture(scope="module")
def first_run(env):
    """The Ray run (two workers); later tests read its outputs and run again in the same folder."""
    out = env["tmp"] / "masks.json"
    cmd = [sys.executable, str(JOB), *args(env, "run", "--coco-out", str(out), "--workers", "2", "--num-cpus", "2")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Everything the tests read is taken now: later tests run the job again, but only in copies of this folder.
    return {"out": out, "annotations_text": out.read_text(), "stdout": done.stdout,
            "summary": json.loads((env["tmp"] / "run" / "summary.json").read_text()),
            "report": report(env, "run"), "ledger": ledger_objects(env, "run")}


def test_coco_results_load_and_hold_the_models_masks(env, first_run):
    from pycocotools.coco import COCO

    fx = env["fx"]
    first_out = env["tmp"] / "first-masks.json"
    first_out.write_text(first_run["annotations_text"])
    coco = COCO(str(first_out))
    anns = coco.loadAnns(coco.getAnnIds())
    good = {k for k in fx.kinds if fx.image_of[k] != fx.unencoded}
    assert sorted(int(a["source_key"].split(":")[1]) for a in anns) == sorted(good)
    assert first_run["summary"]["workers"] == 2
    assert "preannotate summary" in first_run["stdout"]
    done = first_run["ledger"]
    reference = reference_masks(env)
    for a in anns:
        key = int(a["source_key"].split(":")[1])
        info = coco.loadImgs(a["image_id"])[0]
        assert info["file_name"] == fx.image_of[key] and (info["height"], info["width"]) == SIZE
        mask = coco.annToMask(a).astype(bool)
        assert mask.shape == SIZE and a["area"] == int(mask.sum())
        assert a["prompt"] == fx.kinds[key] and a["model_version"].startswith("interformer-small-small-")
        assert coco.loadCats(a["category_id"])[0]["name"] == ("object", "background_thing", "cat")[
            {1: 0, 2: 1, 3: 2}[a["category_id"]]]
        prompt = env["objects"][key]
        clicks = [Click(*c) for c in done[a["source_key"]]["clicks"]]
        assert 1 <= len(clicks) == a["clicks"] <= 4
        if prompt.kind != "mask":
            assert clicks == list(prompt.clicks)
        expected = reference(fx.image_of[key], clicks, box=prompt.box)
        np.testing.assert_array_equal(mask, expected)
        if prompt.coarse is not None:
            assert a["iou_prompt"] == pytest.approx(iou(decode_rle(prompt.coarse).astype(np.int8), mask), abs=1e-5)
        else:
            assert a["iou_prompt"] is None
    assert any(0 < coco.annToMask(a).sum() < SIZE[0] * SIZE[1] for a in anns)


def test_the_click_simulator_follows_the_coarse_mask(env, first_run):
    done = first_run["ledger"]
    for key, obj in env["objects"].items():
        if obj.kind != "mask" or obj.image_id == env["fx"].unencoded:
            continue
        result = done[obj.key]
        row, col, positive = result["clicks"][0]
        assert positive == 1 and decode_rle(obj.coarse)[row, col], "the first click lies inside the coarse mask"
        # it stops at the target IoU (0.9) or after --max-clicks 4, and keeps the best mask seen
        assert len(result["clicks"]) <= result["steps"] <= 4
        assert result["steps"] == 4 or result["iou"] >= 0.9


def test_every_object_is_reported_with_its_outcome(env, first_run):
    fx = env["fx"]
    rows = first_run["report"]
    for key, reason in fx.bad.items():
        assert rows[f"coco:{key}"]["reason"] == reason, rows[f"coco:{key}"]
        assert rows[f"coco:{key}"]["detail"]
    for key in fx.kinds:
        row = rows[f"coco:{key}"]
        if fx.image_of[key] == fx.unencoded:
            assert (row["status"], row["reason"]) == ("failed", "no_features")
            assert "--encode-missing" in row["detail"]
        else:
            assert row["status"] == "ok" and int(row["clicks"]) >= 1 and float(row["score"]) > 0
    s = first_run["summary"]
    assert s["segmented"] == len(fx.kinds) - 2 and s["reasons"]["no_features"] == 3
    assert "failed" in first_run["stdout"] and "no_features 3" in first_run["stdout"]


def test_an_image_that_kills_every_worker_fails_alone_and_a_rerun_retries_it(env, first_run):
    """An image whose worker dies each time (out of memory, a crash in native code) is that image's failure
    (`worker_died`, named in the report), the other images and the COCO file are done; a rerun tries it again."""
    poison = sorted(i for i in env["fx"].images if i != env["fx"].unencoded)[0]
    out = env["tmp"] / "poison.json"
    cmd = [sys.executable, str(JOB), *args(env, "poison", "--coco-out", str(out), "--workers", "2",
                                           "--num-cpus", "2")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, FAULT_ENV: f"segment {poison}:exit"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads((env["tmp"] / "poison" / "summary.json").read_text())
    rows = report(env, "poison")
    died = {k for k, r in rows.items() if r["reason"] == "worker_died"}
    assert died and {rows[k]["image_id"] for k in died} == {poison}
    assert s["reasons"]["worker_died"] == len(died) and not s["interrupted"]
    def by_object(text: str) -> dict:
        return {a["source_key"]: {k: v for k, v in a.items() if k != "id"} for a in json.loads(text)["annotations"]}

    reference = by_object(first_run["annotations_text"])
    assert by_object(out.read_text()) == {k: a for k, a in reference.items() if k not in died}

    rc, s = run_inline(env, "poison", "--coco-out", str(out), "--workers", "0")
    assert rc == 0 and s["computed_images"] == 3 and "worker_died" not in s["reasons"]
    assert by_object(out.read_text()) == reference


def test_a_rerun_redoes_only_what_could_not_be_done(env, first_run):
    run = fork_first_run(env, first_run, "rerun")
    rc, s = run_inline(env, run["run_dir"], "--coco-out", str(run["out"]), "--workers", "0")
    assert rc == 0
    assert s["done_before"] == first_run["summary"]["images"] - 2  # the unencoded and the missing image
    assert s["computed_images"] == 2
    assert s["reasons"] == first_run["summary"]["reasons"]  # the same two images fail the same way again
    assert json.loads(run["out"].read_text())["annotations"] == json.loads(first_run["annotations_text"])["annotations"]


def test_missing_images_are_encoded_on_the_fly_when_asked(env, first_run):
    fx = env["fx"]
    run = fork_first_run(env, first_run, "encode-missing", with_db=True)
    engines = env["tmp"] / "engines-encode-missing"
    rc, s = run_inline(env, run["run_dir"], "--coco-out", str(run["out"]), "--workers", "0", "--encode-missing",
                       "--encode-engine", "openvino", "--engine-cache", str(engines), db=run["db"])
    assert rc == 0 and s["encoded_on_the_fly"] == 1 and s["computed_images"] == 2
    assert len(list(engines.glob("*/encoder_v1_*.xml"))) == 1  # encoded by the runtime, not a fallback
    rows = report(env, run["run_dir"])
    assert rows["coco:9006"]["reason"] == "image_unreadable"
    assert all(rows[f"coco:{k}"]["status"] == "ok" for k in fx.kinds)
    fp = FeatureStore(str(env["tmp"] / run["db"]), "features")
    assert fx.unencoded in fp.existing_ids(s["fingerprint"])
    # the shared table is untouched: other tests still see the image as unencoded
    assert fx.unencoded not in FeatureStore(str(env["tmp"] / "db"), "features").existing_ids(s["fingerprint"])


def test_an_image_over_the_encode_memory_budget_fails_clearly_and_is_not_stored(env, first_run):
    """--encode-missing with an image whose attention would need more than --max-encode-memory: the image's
    objects fail as image_unreadable naming too_large and the --max-side that fits (retried by a later run
    with a larger budget), never an internal error; the other images are segmented."""
    fx = env["fx"]
    run = fork_first_run(env, first_run, "encode-too-large", with_db=True)
    rc, s = run_inline(env, run["run_dir"], "--coco-out", str(run["out"]), "--workers", "0", "--encode-missing",
                       "--max-encode-memory", "0.00001", db=run["db"])
    rows = report(env, run["run_dir"])
    too_large = [rows[f"coco:{k}"] for k in fx.kinds if fx.image_of[k] == fx.unencoded]
    assert too_large and all(r["reason"] == "image_unreadable" and "too_large" in r["detail"]
                             and "--max-side" in r["detail"] for r in too_large)
    assert "internal_error" not in s["reasons"]
    fp = FeatureStore(str(env["tmp"] / run["db"]), "features")
    assert fx.unencoded not in fp.existing_ids(s["fingerprint"])


def test_results_format_loads_against_the_prompt_file(env, first_run):
    from pycocotools.coco import COCO

    out = env["tmp"] / "results.json"
    rc, _ = run_inline(env, "run-results", "--coco-out", str(out), "--coco-format", "results", "--workers", "0",
                       "--use", "box")
    assert rc == 0
    gt = COCO(str(env["fx"].coco_path))
    dt = gt.loadRes(str(out))
    anns = dt.loadAnns(dt.getAnnIds())
    assert anns and all(a["prompt"] == "box" and a["clicks"] == 1 for a in anns)
    for a in anns:
        info = gt.loadImgs(a["image_id"])[0]
        assert dt.annToMask(a).shape == (info["height"], info["width"])
        assert a["area"] == dt.annToMask(a).sum()


def test_a_run_with_other_settings_in_the_same_folder_is_refused(env, first_run, capsys):
    rc = env["job"].main(args(env, "run", "--coco-out", str(env["tmp"] / "x.json"), "--target-iou", "0.5"))
    assert rc == 2 and "other settings" in capsys.readouterr().err  # a refusal, not "nothing segmented" (1)


def test_a_killed_run_resumes_and_delivers_every_object_once(env):
    run_dir = env["tmp"] / "killed"
    out = env["tmp"] / "killed.json"
    cmd = [sys.executable, str(JOB), *args(env, "killed", "--coco-out", str(out), "--workers", "0",
                                           "--target-iou", "1.0")]
    cmd[cmd.index("--max-clicks") + 1] = "20"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = run_dir / "ledger.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists() and ledger.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # images finished for good at the kill (an image without features is recorded too, and redone on resume)
    records = [json.loads(line) for line in ledger.read_text().split("\n")[:-1]]  # whole lines only
    done_at_kill = sum(all(o["reason"] not in RETRYABLE for o in r["result"]["objects"]) for r in records)
    assert not out.exists()
    rc, s = run_inline(env, "killed", "--coco-out", str(out), "--workers", "0", "--target-iou", "1.0",
                       "--max-clicks", "20")
    assert rc == 0
    assert s["done_before"] == done_at_kill and s["computed_images"] == s["images"] - done_at_kill
    annotations = json.loads(out.read_text())["annotations"]
    keys = [a["source_key"] for a in annotations]
    fx = env["fx"]
    steps = {k: o["steps"] for k, o in ledger_objects(env, "killed").items() if o["status"] == "ok"}
    assert all(steps[a["source_key"]] == (20 if a["prompt"] == "mask" else len(env["objects"][
        int(a["source_key"].split(":")[1])].clicks)) for a in annotations)
    stored = FeatureStore(str(env["tmp"] / "db"), "features").existing_ids(s["fingerprint"])
    assert sorted(keys) == sorted(f"coco:{k}" for k in fx.kinds if fx.image_of[k] in stored)


def test_help_explains_every_option_and_bad_combinations_are_refused(env, capsys):
    job = env["job"]
    with pytest.raises(SystemExit) as e:
        job.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--coco", "--ls-project", "--push", "--coco-out", "--target-iou", "--max-clicks", "--encode-missing",
                   "--encode-engine", "--workers", "--address", "--run-dir", "--model-version", "--image-url", "--storage-option"):
        assert option in text
    refused = [
        [],  # no prompts
        ["--coco", "p.json"],  # nothing to write
        ["--coco", "p.json", "--push"],  # no project to push into
        ["--ls-project", "3", "--coco-out", "o.json", "--coco-format", "results"],  # LS tasks have no COCO ids
        ["--coco", "p.json", "--coco-out", "o.json", "--target-iou", "1.5"],
        ["--coco", "p.json", "--coco-out", "o.json", "--image-url", "/x/{nope}"],
        ["--coco", "p.json", "--coco-out", "o.json", "--checkpoint", "/does/not/exist.pth"],
    ]
    for argv in refused:
        with pytest.raises(SystemExit) as e:
            job.parse_args(argv)
        assert e.value.code == 2, argv


def test_an_unreadable_prompt_file_is_a_clear_error(env, capsys):
    """A missing --coco is a usage error at parse time (tests/test_preannotate_outputs.py); one that exists but
    is not JSON is this one line."""
    bad = env["tmp"] / "not-json.json"
    bad.write_bytes(b"\xff{ not json")
    rc = env["job"].main(["--coco", str(bad), "--coco-out", str(env["tmp"] / "o.json"),
                          "--db", str(env["tmp"] / "db"), "--checkpoint", str(env["ckpt"]),
                          "--run-dir", str(env["tmp"] / "nope-run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "is not valid JSON" in err and "Traceback" not in err
