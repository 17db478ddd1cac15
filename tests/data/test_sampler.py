"""The training stream (engine/data/sampler.py): item k of an InfiniteSampler depends only on (seed, k), so
any split of the stream into draws gives the same items and flips, and a run's position is its only data state."""

import pytest
import torch

from engine.data.sampler import InfiniteSampler
from engine.errors import DataError


def _chunked(sampler, start, sizes):
    """Consecutive draws of ``sizes`` from ``start``, concatenated: (indices, flip or None)."""
    indices, flips = [], []
    for size in sizes:
        batch = sampler.draw(start, size)
        indices.append(batch.indices)
        flips.append(batch.flip)
        start += size
    return torch.cat(indices), None if flips[0] is None else torch.cat(flips)


def test_sampler_is_seeded_and_covers_each_epoch_once():
    first = InfiniteSampler(10, seed=3).draw(0, 20).indices
    second = InfiniteSampler(10, seed=3).draw(0, 20).indices
    other_seed = InfiniteSampler(10, seed=4).draw(0, 20).indices
    assert first.dtype == torch.int64 and first.shape == (20,)
    assert torch.equal(first, second) and not torch.equal(first, other_seed)
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:20].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:20])  # a new permutation each epoch
    # many epochs of a bigger dataset: every epoch is a permutation, and no two are the same
    epochs = InfiniteSampler(1500, seed=7).draw(0, 1500 * 5).indices.view(5, 1500)
    assert all(torch.equal(e.sort().values, torch.arange(1500)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == 5


def test_split_draws_equal_one_draw_across_epoch_boundaries():
    """draw(a, n) + draw(a + n, m) == draw(a, n + m): a resumed run, another batch size or another split of
    the batch over ranks sees the same stream, from the position alone."""
    sampler = InfiniteSampler(1500, seed=7, random_flip=True)
    whole = sampler.draw(640, 20 * 128)                        # from mid-epoch 0 across two epoch boundaries
    assert whole.indices.shape == whole.flip.shape == (2560,)
    for sizes in ([128] * 20, [64] * 40, [860, 1, 1699], [1500, 1060], [7] * 365 + [5]):
        indices, flip = _chunked(sampler, 640, sizes)
        assert torch.equal(indices, whole.indices) and torch.equal(flip, whole.flip), sizes[:3]
    # a fresh sampler (a resumed run: no state to restore) gives the same items at the same position
    fresh = InfiniteSampler(1500, seed=7, random_flip=True).draw(640 + 1000, 300)
    assert torch.equal(fresh.indices, whole.indices[1000:1300]) and torch.equal(fresh.flip, whole.flip[1000:1300])
    # the order of the calls does not matter: a far-ahead draw first, then an early one
    ahead = InfiniteSampler(1500, seed=7, random_flip=True)
    late, early = ahead.draw(640 + 2000, 100), ahead.draw(640, 100)
    assert torch.equal(late.indices, whole.indices[2000:2100]) and torch.equal(early.indices, whole.indices[:100])
    assert torch.equal(late.flip, whole.flip[2000:2100]) and torch.equal(early.flip, whole.flip[:100])
    # another seed is another stream
    assert not torch.equal(InfiniteSampler(1500, seed=8, random_flip=True).draw(640, 2560).indices, whole.indices)


def test_flips_are_seeded_bits_per_epoch():
    sampler = InfiniteSampler(1000, seed=1, random_flip=True)
    batch = sampler.draw(0, 3000)
    assert batch.flip.dtype == torch.bool and 0.45 < batch.flip.float().mean().item() < 0.55
    epochs = batch.flip.view(3, 1000)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert torch.equal(InfiniteSampler(1000, seed=1, random_flip=True).draw(0, 3000).flip, batch.flip)
    assert not torch.equal(InfiniteSampler(1000, seed=2, random_flip=True).draw(0, 3000).flip, batch.flip)
    # flips ride along with the indices: turning them off changes no index
    plain = InfiniteSampler(1000, seed=1).draw(0, 3000)
    assert plain.flip is None and torch.equal(plain.indices, batch.indices)


def test_sampler_rejects_empty_data_and_bad_ranges():
    with pytest.raises(DataError, match="empty"):
        InfiniteSampler(0)
    sampler = InfiniteSampler(10)
    for start, count in ((-1, 4), (0, 0)):
        with pytest.raises(ValueError, match="start must be >= 0 and count >= 1"):
            sampler.draw(start, count)
