"""jobs/preannotate.py --mask-format polygon on real benchmark images (GrabCut/Berkeley, shrunk).

The same prompts and stored features are run twice, once per format: the masks are the model's in both,
so every COCO polygon annotation must decode (pycocotools) to within IoU 0.98 of the RLE annotation of
the same object, and carry that IoU (also in the report and the summary). A run folder keeps one
format: a rerun with another format or tolerance is refused, one with the same resumes.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from preannotate_support import SIZE, load_preannotate_job, prepare_store

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    store = prepare_store(tmp_path_factory.mktemp("preannotate_polygons"))
    return {**store, "job": load_preannotate_job("preannotate_job_polygons")}


def args(env, run_dir: str, *extra: str) -> list[str]:
    fx = env["fx"]
    return ["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--db", str(env["tmp"] / "db"),
            "--checkpoint", str(env["ckpt"]), "--run-dir", str(env["tmp"] / run_dir), "--max-clicks", "3",
            "--workers", "0", *extra]


def run(env, run_dir: str, *extra: str) -> dict:
    rc = env["job"].main(args(env, run_dir, *extra))
    assert rc == 0
    return json.loads((env["tmp"] / run_dir / "summary.json").read_text())


def report(env, run_dir: str) -> dict[str, dict]:
    with open(env["tmp"] / run_dir / "report.csv") as f:
        return {row["key"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def runs(env):
    """One RLE and one polygon run of the same prompts; tests read them and rerun only in copies."""
    rle_out, poly_out = env["tmp"] / "rle.json", env["tmp"] / "poly.json"
    rle = run(env, "rle", "--coco-out", str(rle_out))
    poly = run(env, "poly", "--coco-out", str(poly_out), "--mask-format", "polygon")
    return {"rle": json.loads(rle_out.read_text()), "poly": json.loads(poly_out.read_text()), "rle_summary": rle,
            "poly_summary": poly, "poly_report": report(env, "poly"),
            "poly_ledger": (env["tmp"] / "poly" / "ledger.jsonl").read_text()}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _coco(doc: dict, path: Path):
    from pycocotools.coco import COCO

    path.write_text(json.dumps(doc))
    return COCO(str(path))


def test_polygon_annotations_decode_to_the_rle_masks_of_the_same_objects(env, runs):
    rle = _coco(runs["rle"], env["tmp"] / "check-rle.json")
    poly = _coco(runs["poly"], env["tmp"] / "check-poly.json")
    rle_anns = {a["source_key"]: a for a in rle.loadAnns(rle.getAnnIds())}
    poly_anns = {a["source_key"]: a for a in poly.loadAnns(poly.getAnnIds())}
    assert sorted(poly_anns) == sorted(k for k, a in rle_anns.items() if a["area"] > 0)  # empty masks: no polygon
    assert len(poly_anns) >= 8
    ious = {}
    for key, a in poly_anns.items():
        seg = a["segmentation"]
        assert isinstance(seg, list) and seg and all(len(p) % 2 == 0 and len(p) >= 6 for p in seg)
        mask = poly.annToMask(a).astype(bool)
        source = rle.annToMask(rle_anns[key]).astype(bool)
        assert mask.shape == SIZE
        ious[key] = _iou(mask, source)
        assert ious[key] >= 0.98, key
        assert a["polygon_iou"] == pytest.approx(ious[key], abs=1e-5)
        assert (a["area"], a["bbox"], a["score"], a["clicks"]) == (
            rle_anns[key]["area"], rle_anns[key]["bbox"], rle_anns[key]["score"], rle_anns[key]["clicks"])
        assert poly.loadImgs(a["image_id"])[0]["file_name"] == rle.loadImgs(rle_anns[key]["image_id"])[0]["file_name"]
    rows = runs["poly_report"]
    for key, value in ious.items():
        assert float(rows[key]["polygon_iou"]) == pytest.approx(value, abs=1e-4)
    s = runs["poly_summary"]
    assert s["mask_format"] == "polygon" and runs["rle_summary"]["polygon_iou_mean"] is None
    assert s["polygon_iou_min"] == pytest.approx(min(ious.values()), abs=1e-4)
    assert s["polygon_iou_mean"] == pytest.approx(np.mean(list(ious.values())), abs=1e-4)
    assert s["segmented"] == runs["rle_summary"]["segmented"]


def test_the_workers_send_polygons_not_masks(runs):
    objects = [o for line in runs["poly_ledger"].splitlines() for o in json.loads(line)["result"]["objects"]]
    ok = [o for o in objects if o["status"] == "ok"]
    assert ok and all(o["rle"] is None and isinstance(o["polygons"], list) and o["polygon_iou"] >= 0.98 for o in ok)


def _copy(env, name: str, source: str) -> str:
    shutil.copytree(env["tmp"] / source, env["tmp"] / name)
    return name


def test_a_run_folder_keeps_one_mask_format(env, runs, capsys):
    out = str(env["tmp"] / "other.json")
    assert env["job"].main(args(env, _copy(env, "rle-then-poly", "rle"), "--coco-out", out,
                                "--mask-format", "polygon")) == 2
    assert "mask_format" in capsys.readouterr().err
    assert env["job"].main(args(env, _copy(env, "poly-then-rle", "poly"), "--coco-out", out)) == 2
    assert "mask_format" in capsys.readouterr().err
    assert env["job"].main(args(env, _copy(env, "poly-then-coarser", "poly"), "--coco-out", out,
                             "--mask-format", "polygon", "--polygon-tolerance", "2")) == 2
    assert "polygon_tolerance" in capsys.readouterr().err
    again_out = env["tmp"] / "poly-again.json"
    s = run(env, _copy(env, "poly-again", "poly"), "--coco-out", str(again_out), "--mask-format", "polygon")
    assert s["done_before"] == runs["poly_summary"]["images"] - 2  # the unencoded and the missing image
    assert s["computed_images"] == 2
    assert json.loads(again_out.read_text())["annotations"] == runs["poly"]["annotations"]


def test_a_coarser_tolerance_gives_fewer_vertices_and_keeps_the_iou_floor(env, runs):
    out = env["tmp"] / "coarse.json"
    s = run(env, "coarse", "--coco-out", str(out), "--mask-format", "polygon", "--polygon-tolerance", "3")
    coarse = {a["source_key"]: a for a in json.loads(out.read_text())["annotations"]}
    fine = {a["source_key"]: a for a in runs["poly"]["annotations"]}
    assert sorted(coarse) == sorted(fine)
    vertices = {k: sum(len(p) for p in a["segmentation"]) for k, a in coarse.items()}
    assert sum(vertices.values()) < sum(sum(len(p) for p in a["segmentation"]) for a in fine.values())
    assert s["polygon_iou_min"] >= 0.98  # the tolerance is halved for a mask that would fall below


@pytest.mark.parametrize("extra", [
    ["--mask-format", "svg"],
    ["--mask-format", "polygon", "--polygon-tolerance", "-1"],
    ["--mask-format", "polygon", "--polygon-tolerance", "nan"],
    ["--polygon-tolerance", "2"],  # without polygons
    ["--ls-polygon", "poly"],  # a PolygonLabels tag for RLE masks
    ["--mask-format", "polygon", "--ls-brush", "tag"],
    ["--mask-format", "polygon", "--coco-format", "results"],  # pycocotools' loadRes reads RLE results only
])
def test_bad_polygon_options_are_refused_before_any_work(env, extra, capsys):
    with pytest.raises(SystemExit) as e:
        env["job"].parse_args(["--coco", "p.json", "--coco-out", "o.json", *extra])
    assert e.value.code == 2
    assert "--" in capsys.readouterr().err
