"""Polygon -> mask (pipeline/polygons.py::rasterize, polygons_rle): any polygon gives a mask or a clear
PolygonError, within bounded memory, and the same mask pycocotools gives wherever pycocotools is safe.

The property runs in a child process under a memory limit: a segfault or an out-of-memory kill there fails the
test instead of killing pytest (pycocotools' rasteriser casts coordinates to int and samples every edge at 5x).
"""
from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from pipeline.polygons import MAX_POLYGON_WORK, PolygonError, clip_polygon, rasterize
from pipeline.prompts import DEGENERATE_POLYGON, PromptError, polygons_to_rle

MEMORY_LIMIT = 3 << 30  # bytes of address space for the child process

HUGE = [1e5, 1e8, 3e9, 1e12, 1e300, 1.7e308]
coordinate = st.one_of(
    st.floats(-80, 80),
    st.sampled_from([0.0, 5.0, 40.0, 60.0]),
    st.floats(-5000, 5000),
    st.sampled_from(HUGE + [-v for v in HUGE] + [math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
)
polygon = st.lists(coordinate, min_size=0, max_size=16)
sizes = st.tuples(st.integers(1, 30), st.integers(1, 40))


def _pycocotools(polys: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    h, w = size
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))) > 0


def _safe_for_pycocotools(polys: list[list[float]], size: tuple[int, int]) -> bool:
    """Small finite coordinates and a short perimeter: pycocotools itself may be run as the reference."""
    flat = [v for p in polys for v in p]
    return all(math.isfinite(v) and abs(v) <= 5000 for v in flat) and all(len(p) >= 6 and len(p) % 2 == 0
                                                                           for p in polys)


def _near_edges(polys: list[np.ndarray], size: tuple[int, int], within: float) -> np.ndarray:
    """Pixels whose centre lies within `within` pixels of an edge of the polygons."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    c = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    near = np.zeros(h * w, dtype=bool)
    for xy in polys:
        a, b = xy, np.roll(xy, -1, axis=0)
        d = b - a
        t = np.clip(((c[:, None, :] - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0, 1)
        dist = np.linalg.norm(c[:, None, :] - (a + t[..., None] * d), axis=-1).min(axis=1)
        near |= dist <= within
    return near.reshape(h, w)


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.lists(polygon, min_size=1, max_size=3), sizes)
def _property(polys, size):
    """A mask of the image's size or PolygonError; pycocotools' own mask where that is safe to compute, except
    on the edges of polygons clipped to the frame (pycocotools rounds a clipped edge's ends differently)."""
    try:
        mask = rasterize(polys, size)
    except PolygonError as e:
        assert str(e)
        return
    assert mask.shape == size and mask.dtype == bool
    if _safe_for_pycocotools(polys, size):
        want = _pycocotools(polys, size)
        h, w = size
        arrays = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polys]
        far = [xy for xy in arrays if not ((xy >= -(h + w)).all() and (xy[:, 0] <= w + h + w).all()
                                           and (xy[:, 1] <= h + h + w).all())]
        if not far:
            assert np.array_equal(mask, want)  # as given: bit-identical to pycocotools
        else:
            clipped = [c for c in (clip_polygon(xy, size) for xy in far) if len(c) >= 3]
            differ = mask != want
            assert not (differ & ~_near_edges(clipped, size, 1.5)).any()


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _in_child(call: str) -> subprocess.CompletedProcess:
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", f"import test_polygon_rasterize as t; {call}"], cwd=here, env=env,
                          preexec_fn=_limit_memory, capture_output=True, text=True, timeout=300)


def test_any_polygon_gives_a_mask_or_a_clear_error_in_bounded_memory():
    done = _in_child("t._property(); t._audited(); print('ok')")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-3000:])


def _audited() -> None:
    """The reported cases (each segfaulted or took gigabytes) and a 1M-point zig-zag across a 1080p image."""
    for c in HUGE:
        mask = rasterize([[0, 0, c, 0, c, c]], (400, 600))
        assert int(mask.sum()) == int(_pycocotools([[0, 0, 1e4, 0, 1e4, 1e4]], (400, 600)).sum())
        rle, outside = polygons_to_rle([[0, 0, c, 0, c, c]], (400, 600))
        assert outside
    zigzag = np.zeros((500_000, 2, 2))
    zigzag[:, 0] = [0, 0]
    zigzag[:, 1] = [1920, 0]
    zigzag[:, :, 1] += np.arange(500_000)[:, None] * 1080 / 500_000
    try:
        rasterize([zigzag.reshape(-1).tolist()], (1080, 1920))
    except PolygonError as e:
        assert "too complex" in str(e)
    else:
        raise AssertionError("a 1M-point zig-zag across a 1080p image was rasterised")


def test_too_complex_polygons_are_refused_before_rasterising():
    many = [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0] * (MAX_POLYGON_WORK // 3 + 1)]
    with pytest.raises(PolygonError, match="too complex: .* vertices"):
        rasterize(many, (10, 10))
    long = [[0.0, 0.0, 30.0, 0.0] * 200_000 + [30.0, 30.0]]
    with pytest.raises(PolygonError, match="too complex: .* perimeter"):
        rasterize(long, (40, 40))
    with pytest.raises(PromptError) as e:
        polygons_to_rle(long, (40, 40))
    assert e.value.reason == DEGENERATE_POLYGON and "too complex" in e.value.detail


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=6, max_size=20).filter(lambda v: len(v) % 2 == 0), sizes)
def test_clipping_keeps_every_point_inside_the_frame(flat, size):
    """The clipped polygon lies in the frame and covers the same points inside it (even-odd rule)."""
    from matplotlib.path import Path as MplPath

    h, w = size
    xy = np.asarray(flat).reshape(-1, 2)
    clipped = clip_polygon(xy, size)
    if len(clipped):
        assert (clipped[:, 0] >= -1).all() and (clipped[:, 0] <= w + 1).all()
        assert (clipped[:, 1] >= -1).all() and (clipped[:, 1] <= h + 1).all()
    rng = np.random.default_rng(len(flat))
    points = rng.uniform([-0.9, -0.9], [w + 0.9, h + 0.9], size=(200, 2))

    def even_odd(poly: np.ndarray) -> np.ndarray:
        if len(poly) < 3:
            return np.zeros(len(points), dtype=bool)
        x, y = poly[:, 0], poly[:, 1]
        x2, y2 = np.roll(x, -1), np.roll(y, -1)
        px, py = points[:, :1], points[:, 1:]
        straddle = (y > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            cross_x = x + (py - y) * (x2 - x) / (y2 - y)
        return ((straddle & (px < cross_x)).sum(axis=1) % 2).astype(bool)

    inside, after = even_odd(xy), even_odd(clipped)
    # points within a hair of an edge may flip by rounding; every other point keeps its side
    margin = np.array([MplPath(np.vstack([xy, xy[:1]])).contains_point(p, radius=1e-6) !=
                       MplPath(np.vstack([xy, xy[:1]])).contains_point(p, radius=-1e-6) for p in points])
    assert np.array_equal(inside[~margin], after[~margin])
