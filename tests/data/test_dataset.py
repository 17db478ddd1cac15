"""The in-memory dataset (engine/data/dataset.py): the embedded digits and their fixed splits, ImageDataset's
gather with flips, and data.on_corrupt=skip."""

import zipfile

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from engine.data.dataset import ImageDataset, build_dataset
from engine.data.sampler import InfiniteSampler
from engine.errors import DataError




# --- the embedded digits ---

def test_digits_split_sizes_ranges_and_labels():
    train = build_dataset("digits")
    heldout = build_dataset("digits", split="heldout")
    assert (len(train), len(heldout)) == (1500, 297)
    assert train.images.shape == (1500, 1, 16, 16) and train.images.dtype == torch.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert heldout.images.min() >= -1.0 and heldout.images.max() <= 1.0
    assert train.num_classes == 10 and set(train.labels.tolist()) == set(range(10))
    assert set(heldout.labels.tolist()) == set(range(10))


def test_digits_split_is_a_partition_of_the_native_digits():
    native = load_digits()
    train = build_dataset("digits", resolution=8)
    heldout = build_dataset("digits", resolution=8, split="heldout")
    ours = torch.cat([train.images, heldout.images]).reshape(1797, 64)
    ours = torch.cat([ours, torch.cat([train.labels, heldout.labels])[:, None].float()], 1)
    expected = torch.from_numpy(native.images.reshape(1797, 64) / 8.0 - 1.0).float()
    expected = torch.cat([expected, torch.from_numpy(native.target)[:, None].float()], 1)
    assert torch.equal(_sorted_rows(ours), _sorted_rows(expected))


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order, to compare two sets of rows regardless of order."""
    return rows[np.lexsort(rows.numpy().T[::-1])]


def test_digits_are_deterministic_and_resolution_is_configurable():
    first, second = build_dataset("digits", resolution=32), build_dataset("digits", resolution=32)
    assert first.images.shape == (1500, 1, 32, 32)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_digits_bad_config(raises_data_error):
    raises_data_error("data.channels=3", source="digits", channels=3)
    raises_data_error("data.resolution=4", "8×8", source="digits", resolution=4)
    raises_data_error("data.path", source="digits", path="/somewhere")


# --- ImageDataset ---

def test_image_dataset_checks_label_count():
    with pytest.raises(DataError, match="3 labels for 2 images"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(3))
    with pytest.raises(DataError, match=r"\[N,C,H,W\], got shape \(2, 4, 4\)"):
        ImageDataset(torch.zeros(2, 4, 4))
    data = ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 4], dtype=torch.int32))
    assert (len(data), data.channels, data.resolution, data.num_classes) == (2, 3, 4, 5)
    assert data.images.dtype == torch.float32 and data.labels.dtype == torch.int64


def test_random_flip_mirrors_chosen_images():
    dataset = build_dataset("digits")
    sampler = InfiniteSampler(len(dataset), seed=1, random_flip=True)
    batch = sampler.draw(0, 256)
    assert 0 < batch.flip.sum() < 256
    images, labels = dataset.gather(*batch)
    originals = dataset.images[batch.indices]
    assert torch.equal(images[batch.flip], originals[batch.flip].flip(-1))
    assert torch.equal(images[~batch.flip], originals[~batch.flip])
    assert torch.equal(labels, dataset.labels[batch.indices])
    assert InfiniteSampler(10).draw(0, 4).flip is None
    unflipped, _ = dataset.gather(batch.indices)                   # no flip argument: as stored
    assert torch.equal(unflipped, originals)


# --- data.on_corrupt ---

def test_on_corrupt_skip_uses_the_next_readable_file_and_counts(tmp_path, capsys, write_png, raises_data_error):
    pixels = [np.full((16, 16), 10 * i, np.uint8) for i in range(5)]
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as handle:
        for i, value in enumerate(pixels):
            write_png(tmp_path / f"p{i}.png", value)
            handle.write(tmp_path / f"p{i}.png", f"x/p{i}.png")
        handle.writestr("x/p1b.png", b"garbage")           # sorts between p1 and p2
        handle.writestr("x/p4b.png", b"garbage")           # last: wraps round to the first readable file
    raises_data_error("mixed.zip:x/p1b.png cannot be read", source="zip", path=str(tmp_path / "mixed.zip"))
    data = build_dataset("zip", str(tmp_path / "mixed.zip"), on_corrupt="skip")
    assert len(data) == 7 and [s.split(":")[-1] for s in data.skipped] == ["x/p1b.png", "x/p4b.png"]
    expected = [pixels[i] for i in (0, 1, 2, 2, 3, 4, 0)]
    assert torch.equal(data.images[:, 0], torch.from_numpy(np.stack(expected)).float() / 127.5 - 1)
    assert "2 skipped" in capsys.readouterr().err
    # Wrong sizes are a config error, not corruption: they fail under skip too.
    write_png(tmp_path / "sized" / "big.png", np.zeros((32, 32), np.uint8))
    raises_data_error("big.png is 32×32", source="folder", path=str(tmp_path / "sized"), on_corrupt="skip")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "a.png").write_bytes(b"nope")
    raises_data_error("unreadable", source="folder", path=str(tmp_path / "allbad"), on_corrupt="skip")
