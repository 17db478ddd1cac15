"""cmt-prepare (engine/data/prepare.py, engine/cli/prepare.py): image folders, zips and CIFAR-10's binary batches
become dataset_tool-layout zips or folders that data.source zip/folder reads through the trainer's own path;
ADM's centre crop is exact, nothing half-written is left on a failure, and every bad input is one line."""
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli.prepare import main
from engine.config import load_config
from engine.data import prepare
from engine.data.dataset import build_training_data
from engine.data.prepare import adm_center_crop, prepare_dataset


def _reference_adm_crop(image: Image.Image, size: int) -> np.ndarray:
    """The crop as described (ADM, guided-diffusion's center_crop_arr), written out step by step on arrays."""
    width, height = image.size
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        image = image.resize((width, height), resample=Image.BOX)
    scale = size / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), resample=Image.BICUBIC)
    pixels = np.array(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


def _noise(seed, height, width, channels=3):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def class_folders(tmp_path, write_png):
    """ImageNet's train layout in miniature: three class folders, odd sizes and modes (gray, RGBA, JPEG)."""
    root = tmp_path / "train"
    write_png(root / "n02" / "b_1.png", _noise(1, 37, 53))                  # landscape, no halving at 16
    write_png(root / "n01" / "a_2.png", _noise(2, 23, 70, 1))               # grayscale: widened to RGB
    write_png(root / "n01" / "a_1.png", _noise(3, 130, 67))                 # portrait, halved twice
    (root / "n03").mkdir()
    Image.fromarray(_noise(4, 40, 40, 4)).save(root / "n03" / "c.png")          # RGBA: alpha dropped
    Image.fromarray(_noise(5, 31, 45)).save(root / "n03" / "d.JPEG", quality=90)
    (root / "n03" / "notes.txt").write_text("not an image")
    return root


def test_adm_crop_is_the_described_algorithm_exactly():
    for seed, (height, width), size in [(0, (300, 200), 40), (1, (97, 150), 32), (2, (64, 64), 64), (3, (20, 9), 16),
                                        (4, (1000, 513), 64)]:
        image = Image.fromarray(_noise(seed, height, width))
        got = np.asarray(adm_center_crop(image, size))
        assert got.shape == (size, size, 3)
        np.testing.assert_array_equal(got, _reference_adm_crop(image, size))
    # 300×200 → 150×100 → 75×50 (box), bicubic to 60×40, columns 10..49: checked against a hand-made crop
    image = Image.fromarray(_noise(0, 200, 300))
    halved = image.resize((150, 100), Image.BOX).resize((75, 50), Image.BOX).resize((60, 40), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(adm_center_crop(image, 40)), np.asarray(halved)[:, 10:50])


def test_prepare_class_folders_to_zip_and_train_on_it(class_folders, tmp_path, capsys):
    dest = tmp_path / "img16.zip"
    assert main(["--source", str(class_folders), "--dest", str(dest), "--resolution", "16",
                 "--transform", "adm-crop", "--no-progress"]) == 0
    assert capsys.readouterr().out == f"wrote {dest}: 5 images of 16×16, 3 classes from class folders\n"
    with zipfile.ZipFile(dest) as archive:
        assert archive.namelist() == [f"00000/img0000000{i}.png" for i in range(5)] + ["dataset.json"]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        meta = json.loads(archive.read("dataset.json"))
        written = [np.asarray(Image.open(archive.open(n))) for n in archive.namelist()[:5]]
    assert meta == {"labels": [[f"00000/img0000000{i}.png", c] for i, c in enumerate([0, 0, 1, 2, 2])]}
    sources = ["n01/a_1.png", "n01/a_2.png", "n02/b_1.png", "n03/c.png", "n03/d.JPEG"]     # sorted order
    for pixels, name in zip(written, sources):
        np.testing.assert_array_equal(pixels, _reference_adm_crop(Image.open(class_folders / name).convert("RGB"), 16))
    # The trainer's own path: the config, build_training_data, class-conditional labels checked.
    cfg = load_config(None, ["data.source=zip", f"data.path={dest}", "data.resolution=16", "data.channels=3",
                             "network.num_classes=3"])
    data = build_training_data(cfg.data, cfg.network.num_classes)
    assert data.labels.tolist() == [0, 0, 1, 2, 2]
    expected = torch.from_numpy(np.stack(written)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(data.images, expected)


def test_prepare_flat_folder_resize_to_folder_max_images_unlabeled_deterministic(tmp_path, write_png):
    for i in range(4):
        write_png(tmp_path / "faces" / f"{i:05d}.png", _noise(i, 64, 64))
    write_png(tmp_path / "faces" / "extra.png", _noise(9, 32, 32))           # sorts last: left out by --max-images
    done = prepare_dataset(tmp_path / "faces", tmp_path / "ffhq16", resolution=16, transform="resize",
                           max_images=4, progress=False)
    assert (done.count, done.size, done.num_classes) == (4, (16, 16), None)
    assert json.loads((tmp_path / "ffhq16" / "dataset.json").read_text()) == {"labels": None}
    for i in range(4):
        want = Image.fromarray(_noise(i, 64, 64)).resize((16, 16), Image.LANCZOS)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ffhq16" / f"00000/img0000000{i}.png")),
                                      np.asarray(want))
    # Grayscale output, and the same source twice gives byte-identical zips (fixed order and entry dates).
    first = prepare_dataset(tmp_path / "faces", tmp_path / "a.zip", channels=1, max_images=4, progress=False)
    second = prepare_dataset(tmp_path / "faces", tmp_path / "b.zip", channels=1, max_images=4, progress=False)
    assert first.dest.read_bytes() == second.dest.read_bytes()
    cfg = load_config(None, ["data.source=zip", f"data.path={first.dest}", "data.resolution=64", "data.channels=1"])
    assert build_training_data(cfg.data).images.shape == (4, 1, 64, 64)


def test_prepare_cifar10_binary_batches(tmp_path):
    """CIFAR-10's binary version: records of a label byte and the R, G, B planes (32×32 row-major)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = np.array([6, 9, 9, 4, 1], np.uint8)
    records = np.concatenate([labels[:, None], pixels.transpose(0, 3, 1, 2).reshape(5, -1)], axis=1)
    (tmp_path / "cifar").mkdir()
    records[:3].tofile(tmp_path / "cifar" / "data_batch_1.bin")
    records[3:].tofile(tmp_path / "cifar" / "data_batch_2.bin")
    (tmp_path / "cifar" / "test_batch.bin").write_bytes(b"\0" * 3073)          # not part of the training set
    done = prepare_dataset(tmp_path / "cifar", tmp_path / "cifar10.zip", progress=False)
    assert (done.count, done.num_classes, done.label_origin) == (5, 10, "CIFAR-10 batches")
    cfg = load_config(None, ["data.source=zip", f"data.path={done.dest}", "data.resolution=32", "data.channels=3",
                             "network.num_classes=10"])
    data = build_training_data(cfg.data, 10)
    assert data.labels.tolist() == labels.tolist()
    assert torch.equal(data.images, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
    (tmp_path / "cifar" / "data_batch_2.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="data_batch_2.bin' is 100 bytes, not a whole number of CIFAR-10 records"):
        prepare_dataset(tmp_path / "cifar", tmp_path / "c2.zip", progress=False)


def _one_line_error(capsys, argv, *fragments) -> str:
    try:
        code = main(argv + ["--no-progress"])
    except SystemExit as exit:                     # a bad flag: argparse's exit, as the console script exits
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def test_bad_inputs_are_one_line(tmp_path, write_png, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _one_line_error(capsys, ["--source", str(tmp_path / "empty"), "--dest", str(tmp_path / "o.zip")],
                    "holds no .png/.jpg images")
    _one_line_error(capsys, ["--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "o.zip")], "does not exist")
    write_png(tmp_path / "src" / "a.png", _noise(0, 20, 30))
    write_png(tmp_path / "src" / "b.png", _noise(1, 20, 20))
    _one_line_error(capsys, ["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip")],
                    "b.png is 20×20 but a.png is 30×20", "--resolution")
    _one_line_error(capsys, ["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"), "--resolution", "8"],
                    "--resolution and --transform")
    _one_line_error(capsys, ["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"),
                             "--resolution", "8", "--transform", "resize"], "a.png is 30×20, not square", "adm-crop")
    _one_line_error(capsys, ["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "src" / "out"),
                             "--resolution", "8", "--transform", "adm-crop"], "is inside --source")
    _one_line_error(capsys, ["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"), "--max-images", "0"],
                    "--max-images", "at least 1")
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    _one_line_error(capsys, ["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"),
                             "--resolution", "8", "--transform", "adm-crop"], "'broken.png'", "--skip-unreadable")
    assert main(["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"), "--resolution", "8",
                 "--transform", "adm-crop", "--skip-unreadable", "--no-progress"]) == 0
    assert "2 images of 8×8, unlabeled, 1 unreadable left out (broken.png)" in capsys.readouterr().out
    _one_line_error(capsys, ["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"),
                             "--resolution", "8", "--transform", "adm-crop"], "already exists", "--overwrite")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary left by any failure


def test_interrupted_prepare_leaves_the_old_output_and_no_temporary(tmp_path, write_png, monkeypatch):
    for i in range(5):
        write_png(tmp_path / "src" / f"{i}.png", _noise(i, 24, 24))
    for dest in (tmp_path / "out.zip", tmp_path / "out"):
        old = prepare_dataset(tmp_path / "src", dest, max_images=2, progress=False)
        before = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) if dest.is_dir() else dest.read_bytes()
        calls = []
        real = prepare.adm_center_crop

        def crop_then_interrupt(image, size):
            calls.append(size)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(image, size)

        monkeypatch.setattr(prepare, "adm_center_crop", crop_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset(tmp_path / "src", dest, resolution=8, transform="adm-crop", overwrite=True, progress=False)
        monkeypatch.undo()
        after = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) if dest.is_dir() else dest.read_bytes()
        assert after == before and old.count == 2
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        # With --overwrite a finished run replaces the old output whole.
        assert prepare_dataset(tmp_path / "src", dest, resolution=8, transform="adm-crop", overwrite=True,
                               progress=False).count == 5
