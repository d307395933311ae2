"""Frozen-backbone samples from stored features: (pyramid crop, label crop) instead of augmented images.

The ViT ran once per image when the feature table was filled, at native resolution (padded to /32), so no
image-level augmentation is possible; what remains of the recipe is a random crop (aligned to 32 pixels so
every pyramid level is cut exactly) and the object sampler. The ground truth is resized like the image was
(when the encoder used a longest-side limit) and padded with background, as the evaluation pads it.
Sample n is addressed like `SampleStream`: the same (seed, position) always gives the same crop and object.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import PYRAMID_STRIDES
from ..features import ImageFeatures
from .augment import NoObjectError, sample_object
from .data import DataError, TrainSource
from .stream import candidates, has_object, no_object_anywhere, note_no_object

Fetch = Callable[[str], ImageFeatures]


def crop_window(padded_size: tuple[int, int], crop: int, rng: np.random.Generator, align: int = 32
                ) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of at most crop x crop, its corner on the `align` grid."""
    hp, wp = padded_size
    h, w = min(crop, hp), min(crop, wp)
    top = align * int(rng.integers(0, (hp - h) // align + 1))
    left = align * int(rng.integers(0, (wp - w) // align + 1))
    return top, left, h, w


def crop_pyramid(pyramid: Sequence[torch.Tensor], window: tuple[int, int, int, int]) -> list[torch.Tensor]:
    """Cut the same image window out of each level ([1, C, h, w] -> [C, h', w'])."""
    top, left, h, w = window
    return [p[0, :, top // s:(top + h) // s, left // s:(left + w) // s].contiguous()
            for p, s in zip(pyramid, PYRAMID_STRIDES)]


def label_canvas(seg: np.ndarray, feats: ImageFeatures) -> np.ndarray:
    """The segment map on the feature canvas: resized as the image was, padded bottom/right with background."""
    g = feats.geometry
    if seg.shape != tuple(g.original_size):
        raise DataError(f"segment map {seg.shape} does not match the encoded image size {tuple(g.original_size)}")
    if g.resized:
        seg = cv2.resize(seg, (g.resized_size[1], g.resized_size[0]), interpolation=cv2.INTER_NEAREST)
    hp, wp = g.padded_size
    return np.pad(seg, ((0, hp - seg.shape[0]), (0, wp - seg.shape[1])))


class FeatureSampleStream(Dataset):
    """Item n -> (list of 4 pyramid crops [C, h, w], uint8 label [H, W]); `make_fetch()` is called lazily in
    each process to open the feature reader."""

    def __init__(self, source: TrainSource, make_fetch: Callable[[], Fetch], crop_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, max_tries: int = 50) -> None:
        if len(source) == 0:
            raise DataError("the training source is empty")
        self.source, self.make_fetch, self.crop_size = source, make_fetch, crop_size
        self.seed, self.rank, self.world_size, self.max_tries = int(seed), rank, world_size, max_tries
        self._fetch: Fetch | None = None
        self.skipped: set[int] = set()  # images found to have no object

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        p = n * self.world_size + self.rank
        epoch, pos = divmod(p, len(self.source))
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        if self._fetch is None:
            self._fetch = self.make_fetch()
        for index in candidates(permutation, pos, self.skipped):
            key = self.source.key(index)
            feats = self._fetch(key)
            for attempt in range(self.max_tries):
                rng = np.random.default_rng([self.seed, 1, p, attempt])
                _, seg = self.source.load(index, rng)
                if attempt == 0 and not has_object(seg):
                    note_no_object(self.skipped, index, key)
                    break
                canvas = label_canvas(seg.astype(np.int32), feats)
                window = crop_window(feats.geometry.padded_size, self.crop_size, rng)
                top, left, h, w = window
                try:
                    label = sample_object(canvas[top:top + h, left:left + w], rng)
                except NoObjectError:
                    continue
                return crop_pyramid(feats.pyramid, window), torch.from_numpy(label)
            else:
                raise DataError(f"sample {key!r}: its objects fell outside {self.max_tries} random crops in a row")
        raise no_object_anywhere(len(self.source))


def collate_by_size(batch: Sequence[tuple[list[torch.Tensor], torch.Tensor]]):
    """Group samples of equal crop size into micro-batches: [(None, labels [B, H, W], pyramid [B, C, h, w] x 4)]."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, label) in enumerate(batch):
        groups.setdefault(tuple(label.shape), []).append(i)
    out = []
    for idxs in groups.values():
        pyramid = [torch.stack([batch[i][0][lvl] for i in idxs]) for lvl in range(4)]
        out.append((None, torch.stack([batch[i][1] for i in idxs]), pyramid))
    return out
