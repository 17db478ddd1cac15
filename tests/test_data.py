"""Data sources, their one-line errors, and the resumable sampler."""

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from engine.data import DataError, ImageDataset, InfiniteSampler, build_dataset


def _write_png(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def gray_folder(tmp_path):
    """Five 16×16 grayscale PNGs in nested folders, plus files the loader must skip; returns (root, pixels in sorted order)."""
    rng = np.random.default_rng(0)
    names = ["b/img_1.png", "a/img_0.png", "img_3.png", "b/c/img_2.PNG", "a/img_4.png"]
    pixels = {name: rng.integers(0, 256, (16, 16), dtype=np.uint8) for name in names}
    root = tmp_path / "images"
    for name, value in pixels.items():
        _write_png(root / name, value)
    (root / "README.txt").write_text("not an image")
    _write_png(root / "__MACOSX" / "img_9.png", np.zeros((16, 16), np.uint8))
    return root, [pixels[name] for name in sorted(names)]


def _raises_data_error(*must_contain, **build_kwargs) -> str:
    with pytest.raises(DataError) as caught:
        build_dataset(**build_kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in must_contain:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


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


def test_digits_bad_config():
    _raises_data_error("data.channels=3", source="digits", channels=3)
    _raises_data_error("data.split='test'", "heldout", source="digits", split="test")
    _raises_data_error("data.path", source="digits", path="/somewhere")


# --- user sources round trip ---

def test_folder_round_trip_sorted_recursive(gray_folder):
    root, pixels = gray_folder
    data = build_dataset("folder", str(root))
    expected = torch.from_numpy(np.stack(pixels)).float()[:, None] / 127.5 - 1.0
    assert len(data) == 5 and data.labels is None
    assert torch.equal(data.images, expected)
    image, label = data[2]
    assert image.shape == (1, 16, 16) and label == -1


def test_folder_rgb_and_jpeg(tmp_path):
    ramp = np.arange(16, dtype=np.uint8) * 16
    rgb = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1)  # smooth: JPEG-friendly
    _write_png(tmp_path / "x.png", rgb)
    Image.fromarray(rgb).save(tmp_path / "y.jpg", quality=95)
    data = build_dataset("folder", str(tmp_path), channels=3)
    assert data.images.shape == (2, 3, 16, 16)
    assert torch.equal(data.images[0], torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert (data.images[1] - data.images[0]).abs().mean() < 0.05  # lossy, but the same picture


def test_zip_round_trip_matches_folder(gray_folder, tmp_path):
    root, _ = gray_folder
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(root.rglob("*"), reverse=True):  # stored out of order on purpose
            if file.is_file():
                handle.write(file, file.relative_to(root).as_posix())
    assert torch.equal(build_dataset("zip", str(archive)).images, build_dataset("folder", str(root)).images)


def test_npy_round_trip_both_layouts_with_labels(tmp_path):
    latents = np.random.default_rng(2).normal(size=(6, 4, 8, 8)).astype(np.float32) * 3  # latents: kept as stored
    labels = np.array([0, 3, 1, 1, 2, 0])
    np.save(tmp_path / "nchw.npy", latents)
    np.save(tmp_path / "nhwc.npy", latents.transpose(0, 2, 3, 1))
    np.save(tmp_path / "labels.npy", labels)
    nchw = build_dataset("npy", str(tmp_path / "nchw.npy"), resolution=8, channels=4,
                         labels_path=str(tmp_path / "labels.npy"))
    nhwc = build_dataset("npy", str(tmp_path / "nhwc.npy"), resolution=8, channels=4, layout="NHWC")
    assert torch.equal(nchw.images, torch.from_numpy(latents)) and torch.equal(nhwc.images, nchw.images)
    assert nchw.labels.tolist() == labels.tolist() and nchw.num_classes == 4
    assert nchw[1][1] == 3


def test_labels_apply_to_image_folders_in_sorted_order(gray_folder, tmp_path):
    root, _ = gray_folder
    np.save(tmp_path / "labels.npy", np.arange(5))
    data = build_dataset("folder", str(root), labels_path=str(tmp_path / "labels.npy"))
    images, labels = data.gather(torch.tensor([4, 0]))
    assert labels.tolist() == [4, 0] and torch.equal(images[1], data.images[0])


# --- bad input: one line that names the file or key ---

def test_unknown_source_lists_valid_ones():
    _raises_data_error("'imagenet'", "digits, folder, zip, npy", source="imagenet")


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    _raises_data_error(f"data.path '{missing}' does not exist", "folder of", source="folder", path=missing)
    _raises_data_error(missing, ".zip", source="zip", path=missing)
    _raises_data_error(missing, ".npy", source="npy", path=missing)
    _raises_data_error("data.path is required", source="folder")


def test_wrong_resolution_and_channels_name_the_file(tmp_path):
    _write_png(tmp_path / "img_000.png", np.zeros((16, 16), np.uint8))
    _write_png(tmp_path / "img_012.png", np.zeros((32, 32, 3), np.uint8))
    _raises_data_error("img_012.png is 32×32 RGB", "data.resolution=16, data.channels=1", "resize",
                       source="folder", path=str(tmp_path))
    message = _raises_data_error("img_000.png is 16×16 grayscale", "data.channels=3",
                                 source="folder", path=str(tmp_path), channels=3)
    assert "img_012" not in message


def test_corrupt_and_unsupported_images_name_the_file(tmp_path):
    _write_png(tmp_path / "good.png", np.zeros((16, 16), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    _raises_data_error("broken.png cannot be read", source="folder", path=str(tmp_path))
    (tmp_path / "broken.png").unlink()
    truncated = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(truncated[: len(truncated) // 2])
    _raises_data_error("cut.png cannot be read", source="folder", path=str(tmp_path))
    (tmp_path / "cut.png").unlink()
    Image.new("RGBA", (16, 16)).save(tmp_path / "alpha.png")
    _raises_data_error("alpha.png has image mode RGBA", source="folder", path=str(tmp_path))


def test_empty_folder_and_bad_zip(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _raises_data_error("contains no .png/.jpg images", source="folder", path=str(tmp_path / "empty"))
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    _raises_data_error("fake.zip' is not a readable zip", source="zip", path=str(tmp_path / "fake.zip"))
    _raises_data_error("is not a folder", source="folder", path=str(tmp_path / "fake.zip"))
    with zipfile.ZipFile(tmp_path / "bad_member.zip", "w") as handle:
        handle.writestr("digits/x.png", b"garbage")
    _raises_data_error("bad_member.zip:digits/x.png cannot be read", source="zip",
                       path=str(tmp_path / "bad_member.zip"))


def test_bad_npy_arrays(tmp_path):
    def npy(name, array):
        np.save(tmp_path / name, array)
        return str(tmp_path / name)

    _raises_data_error("rank3.npy has shape (2, 16, 16)", "4-d", source="npy",
                       path=npy("rank3.npy", np.zeros((2, 16, 16), np.float32)))
    _raises_data_error("shape.npy", "[3, 16, 16]", "data.channels=1", source="npy",
                       path=npy("shape.npy", np.zeros((2, 3, 16, 16), np.float32)))
    _raises_data_error("[16, 16, 1]", "data.layout", source="npy",
                       path=npy("hwc.npy", np.zeros((2, 16, 16, 1), np.float32)))
    _raises_data_error("uint8", source="npy", path=npy("ints.npy", np.zeros((2, 1, 16, 16), np.uint8)))
    _raises_data_error("NaN", source="npy", path=npy("nan.npy", np.full((2, 1, 16, 16), np.nan, np.float32)))
    _raises_data_error("data.layout 'CHWN'", source="npy", layout="CHWN",
                       path=npy("ok.npy", np.zeros((2, 1, 16, 16), np.float32)))
    (tmp_path / "text.npy").write_text("hello")
    _raises_data_error("text.npy' cannot be read as a .npy", source="npy", path=str(tmp_path / "text.npy"))


def test_bad_labels(tmp_path):
    images = tmp_path / "x.npy"
    np.save(images, np.zeros((3, 1, 16, 16), np.float32))
    np.save(tmp_path / "two.npy", np.array([0, 1]))
    np.save(tmp_path / "float.npy", np.array([0.0, 1.0, 2.0]))
    _raises_data_error("two.npy has 2 labels but the data has 3", source="npy", path=str(images),
                       labels_path=str(tmp_path / "two.npy"))
    _raises_data_error("float.npy", "integer", source="npy", path=str(images),
                       labels_path=str(tmp_path / "float.npy"))
    _raises_data_error("data.labels_path", "missing.npy", source="npy", path=str(images),
                       labels_path=str(tmp_path / "missing.npy"))
    _raises_data_error("data.split='heldout'", source="npy", path=str(images), split="heldout")


# --- the infinite sampler ---

def _draw(sampler, count):
    return [next(sampler) for _ in range(count)]


def test_sampler_is_seeded_and_covers_each_epoch_once():
    first = torch.cat([b.indices for b in _draw(InfiniteSampler(10, 4, seed=3), 5)])
    second = torch.cat([b.indices for b in _draw(InfiniteSampler(10, 4, seed=3), 5)])
    other_seed = torch.cat([b.indices for b in _draw(InfiniteSampler(10, 4, seed=4), 5)])
    assert torch.equal(first, second) and not torch.equal(first, other_seed)
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:20].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:20])  # a new permutation each epoch


def test_sampler_resumes_exactly_mid_epoch_even_with_another_batch_size():
    sampler = InfiniteSampler(1500, 128, seed=7, random_flip=True)
    _draw(sampler, 5)  # 640 items: mid-epoch
    state = sampler.state_dict()
    assert (state["epoch"], state["index"]) == (0, 640)
    expected = _draw(sampler, 20)  # crosses two epoch boundaries
    resumed = InfiniteSampler(1500, 128, seed=0, random_flip=True)
    resumed.load_state_dict(state)
    for want, got in zip(expected, _draw(resumed, 20)):
        assert torch.equal(want.indices, got.indices) and torch.equal(want.flip, got.flip)
    other_batch = InfiniteSampler(1500, 64, random_flip=True)
    other_batch.load_state_dict(state)
    assert torch.equal(torch.cat([b.indices for b in _draw(other_batch, 40)]),
                       torch.cat([b.indices for b in expected]))


def test_sampler_rejects_a_state_from_other_data():
    with pytest.raises(DataError, match="1500 items but the dataset has 1400"):
        InfiniteSampler(1400, 8).load_state_dict(InfiniteSampler(1500, 8).state_dict())


def test_random_flip_mirrors_chosen_images():
    dataset = build_dataset("digits")
    sampler = InfiniteSampler(len(dataset), 256, seed=1, random_flip=True)
    batch = next(sampler)
    assert 0 < batch.flip.sum() < 256
    images, labels = dataset.gather(*batch)
    originals = dataset.images[batch.indices]
    assert torch.equal(images[batch.flip], originals[batch.flip].flip(-1))
    assert torch.equal(images[~batch.flip], originals[~batch.flip])
    assert torch.equal(labels, dataset.labels[batch.indices])
    assert next(InfiniteSampler(10, 4)).flip is None


def test_image_dataset_checks_label_count():
    with pytest.raises(DataError, match="3 labels for 2 images"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(3))


# --- data.on_corrupt ---

def test_on_corrupt_skip_uses_the_next_readable_file_and_counts(tmp_path, capsys):
    pixels = [np.full((16, 16), 10 * i, np.uint8) for i in range(5)]
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as handle:
        for i, value in enumerate(pixels):
            _write_png(tmp_path / f"p{i}.png", value)
            handle.write(tmp_path / f"p{i}.png", f"x/p{i}.png")
        handle.writestr("x/p1b.png", b"garbage")           # sorts between p1 and p2
        handle.writestr("x/p4b.png", b"garbage")           # last: wraps round to the first readable file
    _raises_data_error("mixed.zip:x/p1b.png cannot be read", source="zip", path=str(tmp_path / "mixed.zip"))
    data = build_dataset("zip", str(tmp_path / "mixed.zip"), on_corrupt="skip")
    assert len(data) == 7 and [s.split(":")[-1] for s in data.skipped] == ["x/p1b.png", "x/p4b.png"]
    expected = [pixels[i] for i in (0, 1, 2, 2, 3, 4, 0)]
    assert torch.equal(data.images[:, 0], torch.from_numpy(np.stack(expected)).float() / 127.5 - 1)
    assert "2 skipped" in capsys.readouterr().err
    # Wrong sizes are a config error, not corruption: they fail under skip too.
    _write_png(tmp_path / "sized" / "big.png", np.zeros((32, 32), np.uint8))
    _raises_data_error("big.png is 32×32", source="folder", path=str(tmp_path / "sized"), on_corrupt="skip")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "a.png").write_bytes(b"nope")
    _raises_data_error("unreadable", source="folder", path=str(tmp_path / "allbad"), on_corrupt="skip")
    _raises_data_error("data.on_corrupt 'ignore'", source="digits", on_corrupt="ignore")
