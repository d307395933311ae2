"""The README's model example runs as written (with a freshly saved small checkpoint)."""
from __future__ import annotations

import os
import re

from interformer import save_checkpoint

from conftest import ROOT


def test_readme_model_example_runs(tmp_path, small_model):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## The model: encode once, click many times.*?```python\n(.*?)```", text, re.S).group(1)
    ckpt = tmp_path / "interformer_light.pth"
    save_checkpoint(small_model, ckpt)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        scope: dict = {}
        exec(compile(block.replace('"interformer_light.pth"', repr(str(ckpt))), "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["mask"].shape == scope["image"].shape[:2] and scope["mask"].dtype == bool
    assert len(scope["session"].clicks) == 1
