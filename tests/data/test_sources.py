"""Reading data files (engine/data/sources.py, through build_dataset): folders, zips and .npy arrays round
trip exactly, and every bad file or key fails with one line that names it."""

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.dataset import build_dataset
from engine.data.sources import decode_image
from engine.errors import CorruptFileError, DataError



@pytest.fixture
def gray_folder(tmp_path, write_png):
    """Five 16×16 grayscale PNGs in nested folders, plus files the loader must skip; returns (root, pixels in sorted order)."""
    rng = np.random.default_rng(0)
    names = ["b/img_1.png", "a/img_0.png", "img_3.png", "b/c/img_2.PNG", "a/img_4.png"]
    pixels = {name: rng.integers(0, 256, (16, 16), dtype=np.uint8) for name in names}
    root = tmp_path / "images"
    for name, value in pixels.items():
        write_png(root / name, value)
    (root / "README.txt").write_text("not an image")
    write_png(root / "__MACOSX" / "img_9.png", np.zeros((16, 16), np.uint8))
    return root, [pixels[name] for name in sorted(names)]



# --- user sources round trip ---

def test_folder_round_trip_sorted_recursive(gray_folder):
    root, pixels = gray_folder
    data = build_dataset("folder", str(root))
    expected = torch.from_numpy(np.stack(pixels)).float()[:, None] / 127.5 - 1.0
    assert len(data) == 5 and data.labels is None
    assert torch.equal(data.images, expected)
    images, labels = data.gather(torch.tensor([2]))
    assert images.shape == (1, 1, 16, 16) and torch.equal(images[0], expected[2]) and labels is None


def test_folder_rgb_and_jpeg(tmp_path, write_png):
    ramp = np.arange(16, dtype=np.uint8) * 16
    rgb = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1)  # smooth: JPEG-friendly
    write_png(tmp_path / "x.png", rgb)
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
    assert nchw.gather(torch.tensor([1]))[1].tolist() == [3]


def test_labels_apply_to_image_folders_in_sorted_order(gray_folder, tmp_path):
    root, _ = gray_folder
    np.save(tmp_path / "labels.npy", np.arange(5))
    data = build_dataset("folder", str(root), labels_path=str(tmp_path / "labels.npy"))
    images, labels = data.gather(torch.tensor([4, 0]))
    assert labels.tolist() == [4, 0] and torch.equal(images[1], data.images[0])


# --- bad input: one line that names the file or key ---

def test_missing_path(tmp_path, raises_data_error):
    missing = str(tmp_path / "nope")
    raises_data_error(f"data.path '{missing}' does not exist", "folder of", source="folder", path=missing)
    raises_data_error(missing, ".zip", source="zip", path=missing)
    raises_data_error(missing, ".npy", source="npy", path=missing)
    raises_data_error("data.path is required", source="folder")


def test_wrong_resolution_and_channels_name_the_file(tmp_path, write_png, raises_data_error):
    write_png(tmp_path / "img_000.png", np.zeros((16, 16), np.uint8))
    write_png(tmp_path / "img_012.png", np.zeros((32, 32, 3), np.uint8))
    raises_data_error("img_012.png is 32×32 RGB", "data.resolution=16, data.channels=1", "resize",
                       source="folder", path=str(tmp_path))
    message = raises_data_error("img_000.png is 16×16 grayscale", "data.channels=3",
                                 source="folder", path=str(tmp_path), channels=3)
    assert "img_012" not in message


def test_corrupt_and_unsupported_images_name_the_file(tmp_path, write_png, raises_data_error):
    write_png(tmp_path / "good.png", np.zeros((16, 16), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    raises_data_error("broken.png cannot be read", source="folder", path=str(tmp_path))
    (tmp_path / "broken.png").unlink()
    truncated = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(truncated[: len(truncated) // 2])
    raises_data_error("cut.png cannot be read", source="folder", path=str(tmp_path))
    (tmp_path / "cut.png").unlink()
    Image.new("RGBA", (16, 16)).save(tmp_path / "alpha.png")
    raises_data_error("alpha.png has image mode RGBA", source="folder", path=str(tmp_path))


def test_empty_folder_and_bad_zip(tmp_path, raises_data_error):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    raises_data_error("contains no .png/.jpg images", source="folder", path=str(tmp_path / "empty"))
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    raises_data_error("fake.zip' is not a readable zip", source="zip", path=str(tmp_path / "fake.zip"))
    raises_data_error("is not a folder", source="folder", path=str(tmp_path / "fake.zip"))
    with zipfile.ZipFile(tmp_path / "bad_member.zip", "w") as handle:
        handle.writestr("digits/x.png", b"garbage")
    raises_data_error("bad_member.zip:digits/x.png cannot be read", source="zip",
                       path=str(tmp_path / "bad_member.zip"))


def test_bad_npy_arrays(tmp_path, raises_data_error):
    def npy(name, array):
        np.save(tmp_path / name, array)
        return str(tmp_path / name)

    raises_data_error("rank3.npy has shape (2, 16, 16)", "4-d", source="npy",
                       path=npy("rank3.npy", np.zeros((2, 16, 16), np.float32)))
    raises_data_error("shape.npy", "[3, 16, 16]", "data.channels=1", source="npy",
                       path=npy("shape.npy", np.zeros((2, 3, 16, 16), np.float32)))
    raises_data_error("[16, 16, 1]", "data.layout", source="npy",
                       path=npy("hwc.npy", np.zeros((2, 16, 16, 1), np.float32)))
    raises_data_error("uint8", source="npy", path=npy("ints.npy", np.zeros((2, 1, 16, 16), np.uint8)))
    raises_data_error("NaN", source="npy", path=npy("nan.npy", np.full((2, 1, 16, 16), np.nan, np.float32)))
    (tmp_path / "text.npy").write_text("hello")
    raises_data_error("text.npy' cannot be read as a .npy", source="npy", path=str(tmp_path / "text.npy"))


def test_bad_labels(tmp_path, raises_data_error):
    images = tmp_path / "x.npy"
    np.save(images, np.zeros((3, 1, 16, 16), np.float32))
    np.save(tmp_path / "two.npy", np.array([0, 1]))
    np.save(tmp_path / "float.npy", np.array([0.0, 1.0, 2.0]))
    raises_data_error("two.npy has 2 labels but the data has 3", source="npy", path=str(images),
                       labels_path=str(tmp_path / "two.npy"))
    raises_data_error("float.npy", "integer", source="npy", path=str(images),
                       labels_path=str(tmp_path / "float.npy"))
    raises_data_error("data.labels_path", "missing.npy", source="npy", path=str(images),
                       labels_path=str(tmp_path / "missing.npy"))
    raises_data_error("data.split='heldout'", source="npy", path=str(images), split="heldout")


def test_decode_image_header_check_reads_mode_and_size_only(tmp_path, write_png):
    """decode=False (what the DALI loader runs before handing the bytes over) checks mode and size without
    decoding the pixels: a truncated body passes it, a wrong size does not; the full decode fails by name."""
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)   # noise: a body to cut
    write_png(tmp_path / "ok.png", pixels)
    opener = lambda: open(tmp_path / "ok.png", "rb")
    assert decode_image("ok.png", opener, 16, 1, decode=False) is None
    assert torch.equal(decode_image("ok.png", opener, 16, 1), torch.from_numpy(pixels)[None].float() / 127.5 - 1)
    with pytest.raises(DataError, match="ok.png is 16×16 grayscale but data.resolution=8"):
        decode_image("ok.png", opener, 8, 1, decode=False)
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cut = lambda: open(tmp_path / "cut.png", "rb")
    assert decode_image("cut.png", cut, 16, 1, decode=False) is None
    with pytest.raises(CorruptFileError, match="cut.png cannot be read"):
        decode_image("cut.png", cut, 16, 1)
