"""The README's model example runs as written, and does what its comments say.

It runs with a freshly saved small checkpoint whose class bias is centred (tests/backend_support.py), so
that its masks are neither empty nor full and the checks below can tell a right answer from a wrong one.
"""
from __future__ import annotations

import os
import re

import numpy as np
from backend_support import make_checkpoint

from conftest import ROOT
from interformer import Predictor, load_model
from interformer.clicks import Click
from interformer.features import ImageFeatures


def readme_model_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Use the model from Python.*?```python\n(.*?)```", text, re.S).group(1)


def test_readme_model_example_runs(tmp_path):
    ckpt = make_checkpoint(tmp_path / "interformer_light.pth")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        scope: dict = {}
        code = readme_model_example().replace('"interformer_light.pth"', repr(str(ckpt)))
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    image, mask, result, session, feats = (scope[k] for k in ("image", "mask", "result", "session", "feats"))
    h, w = image.shape[:2]
    # the mask is the original size, boolean, the probabilities thresholded at 0.5, and not trivial
    assert mask.shape == (h, w) and mask.dtype == bool
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(mask, result.prob > 0.5)
    assert result.clicks == (Click(200, 300, True), Click(60, 80, False))
    # undo went back to the state after the first click: the same mask as a session given that click alone
    assert session.clicks == [Click(200, 300, True)]
    fresh = Predictor(load_model(ckpt), device="cpu").session(feats)
    np.testing.assert_array_equal(session.result.mask, fresh.add_click(200, 300, True).mask)
    # two clicks replayed in a new session give the two-click mask (the state is the click list)
    np.testing.assert_array_equal(fresh.replay(result.clicks).mask, mask)
    # what the feature store keeps: 3.75 fp16 values per padded pixel, that rebuild the features
    hp, wp = feats.geometry.padded_size
    flat, shapes = scope["flat"], scope["shapes"]
    assert hp % 32 == 0 and wp % 32 == 0 and hp >= h and wp >= w
    assert flat.dtype == np.float16 and flat.size == int(3.75 * hp * wp)
    rebuilt = ImageFeatures.from_flat(flat, shapes, feats.geometry)
    for a, b in zip(rebuilt.pyramid, feats.pyramid):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-3)
