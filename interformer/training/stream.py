"""A deterministic stream of augmented training samples, addressable by sample number.

Sample n of worker `rank` (of `world_size`) sits at global position p = n * world_size + rank; epoch
e = p // len(source) visits the source in a permutation seeded by (seed, e), so workers see disjoint
shards as with a DistributedSampler. Every random choice of the sample (annotation order, augmentation,
object) comes from a generator seeded by (seed, p, attempt). A run resumed at iteration i therefore reads
exactly the samples the uninterrupted run would have read.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .augment import AugmentConfig, NoObjectError, augment
from .data import DataError, TrainSource


class SampleStream(Dataset):
    """Map-style dataset: item n -> (float32 [3, S, S] image, uint8 [S, S] label with 255 = ignore)."""

    def __init__(self, source: TrainSource, cfg: AugmentConfig, seed: int, rank: int = 0, world_size: int = 1,
                 max_tries: int = 50) -> None:
        if len(source) == 0:
            raise DataError("the training source is empty")
        self.source, self.cfg, self.seed = source, cfg, int(seed)
        self.rank, self.world_size, self.max_tries = rank, world_size, max_tries
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self.skipped: set[int] = set()  # images found to have no object

    def __len__(self) -> int:
        return 2 ** 62

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._perm_epoch = epoch
        return self._perm

    def source_index(self, n: int) -> int:
        """Index into the source of sample number n of this worker (before skipping images without an object)."""
        epoch, pos = divmod(n * self.world_size + self.rank, len(self.source))
        return int(self._permutation(epoch)[pos])

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = n * self.world_size + self.rank
        epoch, pos = divmod(p, len(self.source))
        for index in candidates(self._permutation(epoch), pos, self.skipped):
            for attempt in range(self.max_tries):
                rng = np.random.default_rng([self.seed, 1, p, attempt])
                img, seg = self.source.load(index, rng)
                if attempt == 0 and not has_object(seg):
                    note_no_object(self.skipped, index, self.source.key(index))
                    break
                try:
                    x, y = augment(img, seg, self.cfg, rng)
                except NoObjectError:
                    continue
                return torch.from_numpy(x), torch.from_numpy(y)
            else:
                raise DataError(f"sample {self.source.key(index)!r}: its objects fell outside {self.max_tries} random "
                                "crops in a row (objects too small for --crop-size?)")
        raise no_object_anywhere(len(self.source))


def has_object(seg: np.ndarray) -> bool:
    """Whether a segment map holds any object pixel (ids > 0; background 0 and ignore -1 are not objects)."""
    return bool((seg > 0).any())


def candidates(permutation: np.ndarray, pos: int, skipped: set[int]):
    """Source indices to try for position `pos` of an epoch: its own, then the following ones of the same
    permutation (wrapping), leaving out images known to have no object. A function of the data only, so a
    resumed run draws the same replacement."""
    size = len(permutation)
    for step in range(size):
        index = int(permutation[(pos + step) % size])
        if index not in skipped:
            yield index


def note_no_object(skipped: set[int], index: int, key: str) -> None:
    """Record (and report once) an image whose annotations hold no object: it is skipped, not retried."""
    skipped.add(index)
    print(f"[train] skipping {key!r}: it has no object (no annotated pixel inside the image); "
          f"{len(skipped)} image(s) skipped so far by this reader", flush=True)


def no_object_anywhere(size: int) -> DataError:
    return DataError(f"none of the {size} training images has an object (no annotated pixel inside the image)")


class RangeSampler(Sampler[int]):
    """Yields sample numbers start, start + 1, ..., stop - 1 (the DataLoader batches them in order)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)
