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

    def __len__(self) -> int:
        return 2 ** 62

    def source_index(self, n: int) -> int:
        """Index into the source of sample number n of this worker."""
        p = n * self.world_size + self.rank
        epoch, pos = divmod(p, len(self.source))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.source_index(n)
        p = n * self.world_size + self.rank
        for attempt in range(self.max_tries):
            rng = np.random.default_rng([self.seed, 1, p, attempt])
            img, seg = self.source.load(index, rng)
            try:
                x, y = augment(img, seg, self.cfg, rng)
            except NoObjectError:
                continue
            return torch.from_numpy(x), torch.from_numpy(y)
        raise DataError(f"sample {self.source.key(index)!r}: no object left after {self.max_tries} random crops")


class RangeSampler(Sampler[int]):
    """Yields sample numbers start, start + 1, ..., stop - 1 (the DataLoader batches them in order)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)
