"""FEATURE_VERSION: the version of the encoder's function, recorded per row, and the registry of what each bump
changed (interformer.modeling.interformer).

The golden test pins the current version to digests of the features of fixed seeded images at several patch-grid
shapes. WHEN IT FAILS after a code change, that change altered the features stored rows hold: bump FEATURE_VERSION,
add a FeatureChange whose `affects(grid, window)` is True exactly for the grids whose digests changed (the
failure lists them), and regenerate the golden values (`python tests/test_feature_version.py` prints them). The
encode job then finds the rows of older versions at those geometries stale (reported, `--strict` fails,
`--reencode-changed` encodes them again) without touching the others. Never update the digests alone: that
would serve the old rows as if they were current.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interformer.modeling.vit as vit_module
from interformer.config import LIGHT, SMALL, ViTConfig
from interformer.modeling.interformer import (
    FEATURE_CHANGES,
    FEATURE_VERSION,
    FeatureChange,
    InterFormer,
    patch_grid,
    stale_reason,
)
from interformer.predictor import Predictor

# (height, width) of the input images: square, non-square, the training token count on a non-square grid, odd
# sizes, per window: 4 (train_size 64: 16 tokens, cheap) and Light's 32 (1024 tokens).
SHAPES = {
    64: [(64, 64), (32, 128), (128, 32), (96, 64), (45, 77), (30, 250)],
    512: [(256, 1024), (200, 300)],
}

GOLDEN_VERSION = 2
GOLDEN = {  # train_size:HxW -> per pyramid level: mean, std, 4 projections (see _digest)
    "64:64x64": [
        [0.1206013823, 0.2319618951, -0.05103452429, -0.6388764933, 0.08639165672, -0.279840209],
        [0.0387543827, 0.1604957381, -0.03049807339, 0.08570338181, 0.05374365514, 0.061169473],
        [0.02816269132, 0.1648259522, -0.06799518355, 0.3559657811, 0.01329954953, 0.1185928685],
        [0.04255430161, 0.1492421998, 0.1932153292, -0.001330405035, 0.2043174595, -0.1027074847],
    ],
    "64:32x128": [
        [0.1206044487, 0.232086772, -0.02674116962, -0.6383467489, 0.06848140802, -0.278161143],
        [0.03809832801, 0.1620270355, -0.03170760886, 0.1889650117, 0.06530322254, 0.088939163],
        [0.0250303492, 0.1673018607, -0.1631269233, 0.2107753818, 0.1267909297, 0.09181560782],
        [0.0412818776, 0.1564609891, 0.1770030514, 0.04537738791, 0.057723658, -0.01709355828],
    ],
    "64:128x32": [
        [0.1206637616, 0.2320824935, -0.0650947369, -0.6212235678, 0.1017650551, -0.2815773813],
        [0.03923765292, 0.1618287284, 0.003311390044, 0.04266981524, -0.0893767422, 0.05791704092],
        [0.02431623803, 0.1570196663, -0.04182905728, 0.2181413802, 0.1348566785, 0.002309764342],
        [0.04002576496, 0.150445152, 0.01797630321, -0.01060711765, 0.1688554381, -0.08271263379],
    ],
    "64:96x64": [
        [0.1205558607, 0.2320269374, -0.171217148, 0.2626456505, 0.348652332, -0.0875148401],
        [0.03750793169, 0.1609619048, 0.0232991681, -0.1400096833, 0.05516883875, -0.005653581415],
        [0.02440010549, 0.1614425984, 0.1237459452, 0.09649725866, 0.0007619003133, 0.1452278014],
        [0.03519680372, 0.1525923036, 0.4737946729, -0.2187598156, 0.0599833064, -0.1293673967],
    ],
    "64:45x77": [
        [0.1206488281, 0.2321166012, -0.1745205106, 0.2563822222, 0.3488737678, -0.05869455405],
        [0.03796925045, 0.1631450646, -0.0938401794, -0.1789818878, -0.03877786712, 0.07834380356],
        [0.02596701674, 0.1693843008, -0.2011687282, 0.04255189995, 0.1127473518, -0.03046072564],
        [0.03969896435, 0.1552963463, 0.2868208713, -0.2495406077, 0.1263011315, -0.144806687],
    ],
    "64:30x250": [
        [0.1205074196, 0.2321273902, -0.1710434044, 0.3451566424, -0.002158046065, 0.3962665255],
        [0.0369342815, 0.1608964039, 0.2245286254, 0.1139469397, -0.01408504855, -0.002334158984],
        [0.02550156955, 0.1682111396, 0.3117484526, 0.2498036972, -0.1369841107, 0.2020327842],
        [0.03849900796, 0.1517235618, -0.07308670879, 0.2759331669, 0.2340538005, -0.3091150203],
    ],
    "512:256x1024": [
        [0.1206041655, 0.2321718575, 0.1652832863, -0.309720303, 0.08341886137, 0.169664786],
        [0.03667741133, 0.1622234926, 0.1538292542, 0.195608783, 0.1176303427, -0.1627054652],
        [0.02459368304, 0.1650802885, -0.2326304849, 0.05031187478, 0.1018209093, 0.01112515216],
        [0.03706252503, 0.1517143889, -0.09192050535, 0.04725573426, -0.00121920417, -0.01814687036],
    ],
    "512:200x300": [
        [0.120629834, 0.2321748826, -0.08692468299, -0.2254827165, 0.03346435485, 0.4210084028],
        [0.03726653762, 0.1624760584, 0.01441696031, 0.03499202125, -0.1896687026, -0.07971183971],
        [0.02410966942, 0.1640205637, -0.09622012993, 0.2510185182, 0.1264073442, -0.07348540844],
        [0.03768165153, 0.1532532212, 0.180754566, 0.06100801837, 0.1208602652, 0.2100772601],
    ],
}


def _predictor(train_size: int) -> Predictor:
    """A narrow model whose every backbone parameter (position tables and relative-bias tables included) is
    drawn from a fixed seed, so that any change to how they are used shows in the features."""
    cfg = replace(SMALL, name="golden", vit=ViTConfig(embed_dim=32, depth=2, num_heads=2, train_size=train_size))
    model = InterFormer(cfg)
    gen = torch.Generator().manual_seed(20261203)
    with torch.no_grad():
        for _, p in sorted(model.backbone.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return Predictor(model, device="cpu")


def _image(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(h * 10007 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _digest(level: torch.Tensor, seed: int) -> list[float]:
    """Mean, standard deviation and 4 projections on fixed random directions of one pyramid level: any change
    of the values moves the projections; fp32 rounding across machines stays far below the tolerance."""
    x = level.double().flatten()
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(4, x.numel(), generator=gen, dtype=torch.float64) / x.numel() ** 0.5
    return [float(x.mean()), float(x.std())] + [float(v) for v in dirs @ x]


def digests() -> dict[str, list[list[float]]]:
    out = {}
    for train_size, shapes in SHAPES.items():
        predictor = _predictor(train_size)
        for h, w in shapes:
            feats = predictor.encode(_image(h, w))
            out[f"{train_size}:{h}x{w}"] = [_digest(p, n) for n, p in enumerate(feats.pyramid)]
    return out


def _differs(a: list[list[float]], b: list[list[float]]) -> bool:
    return not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_the_features_of_fixed_inputs_are_those_of_feature_version_2():
    """See the module docstring for what to do when this fails."""
    assert GOLDEN_VERSION == FEATURE_VERSION, (
        "FEATURE_VERSION was bumped: regenerate GOLDEN (python tests/test_feature_version.py) and set GOLDEN_VERSION")
    got = digests()
    changed = sorted(k for k in GOLDEN if _differs(got[k], GOLDEN[k]))
    assert set(got) == set(GOLDEN) and not changed, (
        f"the encoder's features changed at {changed} (train_size:HxW): bump FEATURE_VERSION and register which "
        "geometries changed (interformer.modeling.interformer.FEATURE_CHANGES)")


def test_the_golden_digests_see_the_version_2_change_exactly_where_the_registry_says(monkeypatch):
    """Undo commit bfec509 (resize the tables unless the grid IS the training grid): the digests change at the
    geometries version 2's entry names and nowhere else, so the registry describes the change it records."""
    monkeypatch.setattr(vit_module, "keeps_training_tables", lambda grid, window: tuple(grid) == (window, window))
    old = digests()
    change = next(c for c in FEATURE_CHANGES if c.version == 2)
    for key, value in old.items():
        train_size, size = key.split(":")
        h, w = map(int, size.split("x"))
        vit = ViTConfig(train_size=int(train_size))
        padded = (-(-h // 32) * 32, -(-w // 32) * 32)
        assert _differs(value, GOLDEN[key]) == change.affects(patch_grid(padded, vit), vit.window), key


def _old_rule(grid, window):  # before bfec509: the tables are used unresized only on the training grid itself
    return tuple(grid) == (window, window)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 80), w=st.integers(1, 80), window=st.integers(1, 40))
def test_version_2_affects_exactly_the_grids_where_the_old_and_new_table_rules_differ(h, w, window):
    change = next(c for c in FEATURE_CHANGES if c.version == 2)
    assert change.affects((h, w), window) == (_old_rule((h, w), window) != vit_module.keeps_training_tables((h, w), window))


def test_stale_reason_for_each_version_and_geometry():
    vit = LIGHT.vit  # window 32, patch 16
    assert stale_reason(None, (256, 1024), vit).startswith("feature version 1 < 2 at 1024x256 (WxH)")
    assert stale_reason(1, (1024, 256), vit) is not None and stale_reason(1, (128, 2048), vit) is not None
    for version in (2, FEATURE_VERSION, FEATURE_VERSION + 1):  # current, and newer rows: never stale here
        assert stale_reason(version, (256, 1024), vit) is None
    for padded in ((512, 512), (256, 512), (512, 1024), (224, 320)):  # unaffected sizes stay current
        assert stale_reason(None, padded, vit) is None


def test_stale_reason_walks_the_registry_in_version_order():
    everything = FeatureChange(FEATURE_VERSION, "everything changed", lambda grid, window: True)
    future = FeatureChange(FEATURE_VERSION + 1, "not this code's", lambda grid, window: True)
    changes = FEATURE_CHANGES + (future, everything)
    assert "everything changed" in stale_reason(FEATURE_VERSION - 1, (64, 64), SMALL.vit, changes)
    assert stale_reason(FEATURE_VERSION, (64, 64), SMALL.vit, changes) is None
    assert "bfec509" in stale_reason(None, (256, 1024), SMALL.vit, changes)


if __name__ == "__main__":
    print(json.dumps(digests(), indent=None).replace("], \"", "],\n    \""))
