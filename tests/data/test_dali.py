"""data.loader=dali (engine/data/dali.py): CPU-only DALI pipelines give exactly the torch loader's batches.

DALI is part of `make setup` (the [dali] extra), so these tests run rather than skip."""

import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import Config, load_config
from engine.data.dali import build_dali_dataset
from engine.data.dataset import build_dataset, build_training_data
from engine.data.sampler import InfiniteSampler
from engine.errors import ConfigError, DataError
from engine.trainer.batches import BatchPlan

RES = 8


def _pixels(seed, count, channels):
    shape = (RES, RES) if channels == 1 else (RES, RES, channels)
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


@pytest.fixture
def rgb_folder(tmp_path):
    """Eleven RGB images in nested folders: PNGs plus one JPEG (index 3 in sorted order)."""
    root = tmp_path / "rgb"
    for i, pixels in enumerate(_pixels(0, 11, 3)):
        name = root / ("a" if i % 2 else "b") / (f"img_{i:02d}.jpg" if i == 3 else f"img_{i:02d}.png")
        name.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(name, quality=95)
    return root


@pytest.fixture
def gray_zip(tmp_path):
    archive = tmp_path / "gray.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for i, pixels in enumerate(_pixels(1, 9, 1)):
            path = tmp_path / f"g{i}.png"
            Image.fromarray(pixels).save(path)
            handle.write(path, f"digits/{i % 3}/g{i}.png")
    return archive


def _draw(torch_data, dali_data, seed, batch, steps):
    """The batches both loaders give for the same sampler stream (flips on)."""
    sampler = InfiniteSampler(len(torch_data), seed=seed, random_flip=True)
    for step in range(steps):
        sampled = sampler.draw(step * batch, batch)
        yield sampled, torch_data.gather(*sampled), dali_data.gather(*sampled)


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b), (a - b).abs().max()


def test_folder_png_exact_jpeg_close_same_order_with_flips(rgb_folder):
    torch_data = build_dataset("folder", str(rgb_folder), resolution=RES, channels=3)
    dali_data = build_dali_dataset("folder", str(rgb_folder), resolution=RES, channels=3, device_id=None)
    assert len(dali_data) == len(torch_data) == 11 and dali_data.device == torch.device("cpu")
    flipped = 0
    for sampled, (want, _), (got, labels) in _draw(torch_data, dali_data, seed=3, batch=4, steps=6):  # >2 epochs
        png = sampled.indices != 3
        _same(got[png], want[png])
        torch.testing.assert_close(got, want, atol=2 / 127.5, rtol=0)     # the JPEG: decoders may round apart
        assert labels is None and got.min() >= -1 and got.max() <= 1
        flipped += int(sampled.flip.sum())
    assert 0 < flipped < 24
    # The same seed gives the same stream again; another seed another one.
    again = [b for _, _, (b, _) in _draw(torch_data, dali_data, seed=3, batch=4, steps=2)]
    other = [b for _, _, (b, _) in _draw(torch_data, dali_data, seed=4, batch=4, steps=2)]
    first = [b for _, _, (b, _) in _draw(torch_data, dali_data, seed=3, batch=4, steps=2)]
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    assert not all(torch.equal(a, b) for a, b in zip(other, first))


def test_zip_grayscale_with_labels(gray_zip, tmp_path):
    labels = np.arange(9, dtype=np.int64) % 4
    np.save(tmp_path / "labels.npy", labels)
    kwargs = dict(resolution=RES, channels=1, labels_path=str(tmp_path / "labels.npy"))
    torch_data = build_dataset("zip", str(gray_zip), **kwargs)
    dali_data = build_dali_dataset("zip", str(gray_zip), device_id=None, **kwargs)
    assert dali_data.num_classes == torch_data.num_classes == 4
    for _, (want, want_labels), (got, got_labels) in _draw(torch_data, dali_data, seed=0, batch=5, steps=4):
        _same(got, want)
        assert torch.equal(got_labels, want_labels)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_npy_rows_as_stored_with_flips(tmp_path, layout):
    latents = np.random.default_rng(2).standard_normal((13, 4, RES, RES))     # float64, cast to float32
    np.save(tmp_path / "lat.npy", latents if layout == "NCHW" else latents.transpose(0, 2, 3, 1))
    kwargs = dict(resolution=RES, channels=4, layout=layout)
    torch_data = build_dataset("npy", str(tmp_path / "lat.npy"), **kwargs)
    dali_data = build_dali_dataset("npy", str(tmp_path / "lat.npy"), device_id=None, **kwargs)
    for _, (want, _), (got, _) in _draw(torch_data, dali_data, seed=1, batch=6, steps=3):
        _same(got, want)
    assert dali_data.samples_read == 18


@pytest.mark.parametrize("source", ["folder", "npy"])
def test_ranks_decode_only_their_slice_through_the_batch_plan(rgb_folder, tmp_path, source):
    """BatchPlan.job on ranks 0 and 1 of 2: each rank's DALI source decodes only its slice, and the slices
    concatenate to the global batch, items step·batch … of the seeded stream."""
    path = str(rgb_folder)
    if source == "npy":
        np.save(tmp_path / "x.npy", np.random.default_rng(5).standard_normal((11, 3, RES, RES)).astype(np.float32))
        path = str(tmp_path / "x.npy")
    torch_data = build_dataset(source, path, resolution=RES, channels=3)
    cfg = Config()
    cfg.train.batch_size, cfg.train.seed, cfg.data.xflip = 6, 7, True
    stream = InfiniteSampler(len(torch_data), seed=7, random_flip=True)
    flipped = 0
    for step in range(3):                                      # 18 items: crosses the 11-item epoch boundary
        slices = []
        for rank in range(2):
            data = build_dali_dataset(source, path, resolution=RES, channels=3, device_id=None)
            job = BatchPlan(data, cfg, 2, torch.device("cpu")).job(step, 0, rank)
            assert job.batch.keys() == {"images"}                  # unlabeled: num_classes = 0
            slices.append(job.batch["images"])
            assert data.samples_read == 3
        sampled = stream.draw(step * 6, 6)
        want, _ = torch_data.gather(*sampled)
        png = sampled.indices != 3
        _same(torch.cat(slices)[png], want[png])
        torch.testing.assert_close(torch.cat(slices), want, atol=2 / 127.5, rtol=0)   # the JPEG, decoded apart
        flipped += int(sampled.flip.sum())
    assert 0 < flipped < 18


def _corrupt_folder(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i, pixels in enumerate(_pixels(4, 8, 1)):
        Image.fromarray(pixels).save(root / f"img_{i}.png")
    (root / "img_2.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")           # garbage after the signature
    data = (root / "img_6.png").read_bytes()
    (root / "img_6.png").write_bytes(data[: len(data) // 2])                      # truncated: header fine
    (root / "img_7.png").write_bytes(b"not an image at all")
    return root


def test_corrupt_files_fail_by_name_or_are_skipped_like_torch(tmp_path):
    root = _corrupt_folder(tmp_path)
    with pytest.raises(DataError, match="img_2.png cannot be read"):
        build_dataset("folder", str(root), resolution=RES)
    dali_fail = build_dali_dataset("folder", str(root), resolution=RES, device_id=None)
    for bad in (2, 6, 7):
        with pytest.raises(DataError, match=f"img_{bad}.png cannot be read") as caught:
            dali_fail.gather(torch.tensor([0, bad, 1]))
        assert "\n" not in str(caught.value)
    torch.testing.assert_close(dali_fail.gather(torch.tensor([0, 1]))[0],
                               build_dataset("folder", str(root), resolution=RES, on_corrupt="skip").images[:2])

    np.save(tmp_path / "labels.npy", np.arange(8, dtype=np.int64))
    kwargs = dict(resolution=RES, on_corrupt="skip", labels_path=str(tmp_path / "labels.npy"))
    torch_data = build_dataset("folder", str(root), **kwargs)
    dali_data = build_dali_dataset("folder", str(root), device_id=None, **kwargs)
    assert len(torch_data) == len(dali_data) == 8 and torch_data.skipped == [str(root / f"img_{i}.png") for i in (2, 6, 7)]
    # Each bad file stands in for the next readable one, cyclically: 2 -> 3, 6 -> 7 -> 0.
    assert torch_data.labels.tolist() == [0, 1, 3, 3, 4, 5, 0, 0]
    for _, (want, want_labels), (got, got_labels) in _draw(torch_data, dali_data, seed=0, batch=5, steps=4):
        _same(got, want)
        assert torch.equal(got_labels, want_labels)
    assert sorted(dali_data.skipped) == torch_data.skipped     # DALI counts them as it meets them


def test_config_key_errors_and_missing_dali(tmp_path, rgb_folder, monkeypatch):
    cfg = load_config(None, ["data.source=folder", f"data.path={rgb_folder}", f"data.resolution={RES}",
                             "data.channels=3", "data.loader=dali"])
    dataset = build_training_data(cfg.data)
    assert type(dataset).__name__ == "DaliImageDataset" and len(dataset) == 11
    with pytest.raises(ConfigError, match="data.loader"):
        load_config(None, ["data.loader=pillow"])
    with pytest.raises(ConfigError, match="data.on_corrupt"):
        load_config(None, ["data.on_corrupt=ignore"])
    with pytest.raises(DataError, match="set data.loader=torch"):
        build_dali_dataset("digits", None)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)          # as if DALI were not installed
    with pytest.raises(DataError, match=r"pip install -e '.\[dali\]'") as caught:
        build_training_data(cfg.data)
    assert "\n" not in str(caught.value)
