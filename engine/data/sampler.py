"""The order in which training sees the data: a pure function of the seed and the position in the stream."""
from typing import NamedTuple

import numpy as np
import torch

from engine.errors import DataError


class SampledBatch(NamedTuple):
    """Indices into the dataset and, with random_flip, which of them to mirror (else None)."""
    indices: torch.Tensor
    flip: torch.Tensor | None


class InfiniteSampler:
    """The training stream: epoch after epoch, each a seeded permutation of the dataset (with flip bits).

    Item k of the stream depends only on (seed, k): :meth:`draw` returns items start .. start + count − 1, so
    any process finds any micro-batch from its position alone (a resumed run, a producer running ahead, a
    teacher rank), and the position is the only data state a run has — the number of images trained on.
    Each epoch's permutation and flip bits depend only on (seed, epoch).
    """

    def __init__(self, num_items: int, seed: int = 0, random_flip: bool = False):
        if num_items < 1:
            raise DataError("the dataset is empty: nothing to sample")
        self.num_items = num_items
        self.seed = seed
        self.random_flip = random_flip
        self._epoch_order = None  # (epoch, permutation, flip bits) of the last epoch used

    def draw(self, start: int, count: int) -> SampledBatch:
        """Items ``start`` .. ``start + count − 1`` of the stream (crossing epochs as needed)."""
        if start < 0 or count < 1:
            raise ValueError(f"draw(start={start}, count={count}): start must be >= 0 and count >= 1")
        indices, flips = [], []
        position, end = start, start + count
        while position < end:
            epoch, index = divmod(position, self.num_items)
            permutation, flip = self._order(epoch)
            take = min(end - position, self.num_items - index)
            indices.append(permutation[index:index + take])
            flips.append(flip[index:index + take])
            position += take
        flip = torch.from_numpy(np.concatenate(flips)) if self.random_flip else None
        return SampledBatch(torch.from_numpy(np.concatenate(indices)), flip)

    def _order(self, epoch: int):
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_order = (epoch, rng.permutation(self.num_items), rng.random(self.num_items) < 0.5)
        return self._epoch_order[1:]
