"""Polygons (pipeline/polygons.py, as connectors/protocol.py answers them) in a real Label Studio 1.23.2: imported as a prediction and as an
annotation, read back unchanged, and exported by Label Studio's own COCO converter into polygons that
pycocotools decodes to the source mask within the reported IoU."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.datasets import grabcut
from connectors.protocol import Prompt, polygon_results
from pipeline.polygons import mask_to_polygons

pytestmark = pytest.mark.slow

POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image">
    <Label value="object" background="#00FF00"/>
  </PolygonLabels>
</View>"""


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / max(1, np.count_nonzero(a | b))


def test_polygons_import_and_export_back_through_label_studio(label_studio, shared_dir):
    refs = grabcut(shared_dir / "data" / "GrabCut")
    gts = [(r.sample_id, r.load().gt == 1) for r in refs]
    name, gt = next((n, g) for n, g in gts if mask_to_polygons(g).holes)  # an object with holes
    polys = mask_to_polygons(gt)
    prompt = Prompt(clicks=(), label="object", brush_name="poly", image_name="image", original_size=gt.shape,
                    output_type="polygonlabels")
    regions = polygon_results(polys.label_studio_points(), prompt, score=0.5)  # what the backend answers
    client = label_studio.client()
    project = client.projects.create(title="polygons", label_config=POLYGON_CONFIG)
    (tid,) = client.projects.import_tasks(id=project.id, return_task_ids=True,
                                          request=[{"data": {"image": f"/data/local-files/?d={name}.jpg"}}]).task_ids
    client.predictions.create(task=tid, result=regions, model_version="polygons", score=0.5)
    client.annotations.create(id=tid, result=regions)
    (pred,) = client.predictions.list(task=tid)
    for sent, got in zip(regions, [dict(r) for r in pred.result]):
        assert got["type"] == "polygonlabels" and got["value"]["points"] == sent["value"]["points"]

    raw = b"".join(client.projects.exports.download_sync(id=project.id, export_type="COCO"))
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        coco = json.loads(z.read(next(n for n in z.namelist() if n.endswith(".json"))))
    (image,) = coco["images"]
    h, w = image["height"], image["width"]
    assert (h, w) == gt.shape
    segmentation = [poly for a in coco["annotations"] for poly in a["segmentation"]]
    assert len(coco["annotations"]) == len(regions)
    exported = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))) > 0
    assert _iou(exported, gt) >= 0.98 and _iou(exported, gt) == pytest.approx(polys.iou, abs=0.005)
