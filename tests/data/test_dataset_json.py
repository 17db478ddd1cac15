"""Zips and folders in the EDM/StyleGAN dataset_tool layout (engine/data/sources.py, through build_dataset and
build_training_data): dataset.json labels in the right order, `.npy` latent entries, and one line for every
label, size or channel problem."""
import json
import zipfile

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.data.dataset import build_dataset, build_training_data
from engine.errors import CorruptFileError, DataError

RES = 8


def _pixels(seed):
    return np.random.default_rng(seed).integers(0, 256, (RES, RES, 3), dtype=np.uint8)


def _as_tensor(pixels):
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _dataset_tool_layout(root, write_png, count=12, labels=lambda i: (7 * i) % 5):
    """`count` RGB images as dataset_tool.py writes them (1000 per folder; here 5, to span folders) and their
    dataset.json, whose label list is shuffled (order must come from the names, not the list)."""
    names = [f"{i // 5:05d}/img{i:08d}.png" for i in range(count)]
    for i, name in enumerate(names):
        write_png(root / name, _pixels(i))
    table = [[name, labels(i)] for i, name in enumerate(names)]
    np.random.default_rng(0).shuffle(table)
    (root / "dataset.json").write_text(json.dumps({"labels": table}))
    return names


def _zip_folder(root, archive):
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(root.rglob("*"), reverse=True):               # stored out of order on purpose
            if file.is_file():
                handle.write(file, file.relative_to(root).as_posix())
    return archive


def test_dataset_tool_folder_and_zip_read_labels_in_name_order(tmp_path, write_png):
    _dataset_tool_layout(tmp_path / "set", write_png)
    archive = _zip_folder(tmp_path / "set", tmp_path / "set.zip")
    expected = _as_tensor([_pixels(i) for i in range(12)])
    for source, path in (("folder", tmp_path / "set"), ("zip", archive)):
        data = build_dataset(source, str(path), resolution=RES, channels=3, num_classes=5)
        assert torch.equal(data.images, expected)
        assert data.labels.tolist() == [(7 * i) % 5 for i in range(12)] and data.num_classes == 5
    # The trainer's path, both loaders: the same labels (DALI's source is given the dataset.json's).
    for loader in ("torch", "dali"):
        cfg = load_config(None, ["data.source=zip", f"data.path={archive}", f"data.resolution={RES}",
                                 "data.channels=3", "network.num_classes=5", f"data.loader={loader}"])
        data = build_training_data(cfg.data, cfg.network.num_classes)
        images, labels = data.gather(torch.tensor([11, 0, 6]))
        assert labels.tolist() == [2, 0, 2] and torch.equal(images.cpu(), expected[[11, 0, 6]])


def test_null_labels_are_unconditional_data(tmp_path, write_png, raises_data_error):
    _dataset_tool_layout(tmp_path, write_png, count=3)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": None}))
    assert build_dataset("folder", str(tmp_path), resolution=RES, channels=3).labels is None
    raises_data_error("network.num_classes=10 but data.path", "has no labels", "dataset.json", "data.labels_path",
                      source="folder", path=str(tmp_path), resolution=RES, channels=3, num_classes=10)
    (tmp_path / "dataset.json").unlink()                                   # no dataset.json at all: the same
    raises_data_error("has no labels", source="folder", path=str(tmp_path), resolution=RES, channels=3, num_classes=2)
    cfg = load_config(None, ["data.source=folder", f"data.path={tmp_path}", f"data.resolution={RES}",
                             "data.channels=3", "network.num_classes=2", "data.loader=dali"])
    with pytest.raises(DataError, match="has no labels"):
        build_training_data(cfg.data, 2)
    np.save(tmp_path.parent / "labels.npy", np.array([0, 1, 5]))           # data.labels_path still works
    raises_data_error("img00000002.png has label 5, outside [0, 2) for network.num_classes=2", source="folder",
                      path=str(tmp_path), resolution=RES, channels=3, num_classes=2,
                      labels_path=str(tmp_path.parent / "labels.npy"))


def test_label_errors_name_the_file(tmp_path, write_png, raises_data_error):
    names = _dataset_tool_layout(tmp_path, write_png, count=4, labels=lambda i: i)
    kwargs = dict(source="folder", path=str(tmp_path), resolution=RES, channels=3)
    raises_data_error("00000/img00000003.png has label 3, outside [0, 3) for network.num_classes=3", **kwargs,
                      num_classes=3)
    assert build_dataset(**kwargs, num_classes=0).labels.tolist() == [0, 1, 2, 3]   # unconditional: unused
    table = json.loads((tmp_path / "dataset.json").read_text())["labels"]

    def labels_file(value):
        (tmp_path / "dataset.json").write_text(value if isinstance(value, str) else json.dumps(value))

    labels_file({"labels": table + [["00001/img00000099.png", 0]]})
    raises_data_error("dataset.json names '00001/img00000099.png', which is not in the dataset (1 such)", **kwargs)
    labels_file({"labels": [row for row in table if row[0] != names[2]]})
    raises_data_error(f"has no label for '{names[2]}' (1 files unlabeled)", **kwargs)
    labels_file({"labels": [[n, -1 if n == names[1] else 0] for n in names]})
    raises_data_error(f"labels '{names[1]}' -1", "0..K-1", **kwargs)
    labels_file({"labels": [[n, [0.5, 0.5]] for n in names]})
    raises_data_error("has the label entry", "class index", **kwargs)
    labels_file("{not json")
    raises_data_error("dataset.json is not valid JSON", **kwargs)
    labels_file({"labels": table})
    np.save(tmp_path.parent / "labels.npy", np.arange(4))
    raises_data_error("has dataset.json labels and data.labels_path is set too", **kwargs,
                      labels_path=str(tmp_path.parent / "labels.npy"))


def test_mixed_sizes_and_channels_name_two_files(tmp_path, write_png, raises_data_error):
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as handle:
        for name, pixels in [("00000/img00000000.png", _pixels(0)), ("00000/img00000001.png", _pixels(1)),
                             ("00000/img00000002.png", np.zeros((2 * RES, 2 * RES, 3), np.uint8))]:
            write_png(tmp_path / "x.png", pixels)
            handle.write(tmp_path / "x.png", name)
    raises_data_error(f"mixed.zip:00000/img00000002.png is 16×16 RGB but {tmp_path}/mixed.zip:00000/img00000000.png "
                      f"is 8×8 RGB", "share one size", "cmt-prepare", source="zip", path=str(tmp_path / "mixed.zip"),
                      resolution=RES, channels=3)
    write_png(tmp_path / "gray" / "a.png", _pixels(0))
    write_png(tmp_path / "gray" / "b.png", _pixels(1)[..., 0])
    raises_data_error("b.png is 8×8 grayscale but", "a.png is 8×8 RGB", source="folder", path=str(tmp_path / "gray"),
                      resolution=RES, channels=3)
    message = raises_data_error("a.png is 8×8 RGB but data.resolution=8, data.channels=1", source="folder",
                                path=str(tmp_path / "gray"), resolution=RES, channels=1)
    assert "b.png" not in message


def test_npy_entries_as_stored_or_edm2_mean_std(tmp_path, raises_data_error):
    """A folder or zip of one .npy per item: [C,H,W] kept as stored; [2C,H,W] is EDM2's mean ‖ std, read as the
    EDM2-normalised mean (engine/data/latents.py; test_latents.py checks the writer against a VAE)."""
    rng = np.random.default_rng(1)
    items = rng.normal(size=(5, 4, RES, RES)).astype(np.float32)
    with zipfile.ZipFile(tmp_path / "lat.zip", "w") as handle:
        for i, item in enumerate(items):
            np.save(tmp_path / "x.npy", item)
            handle.write(tmp_path / "x.npy", f"00000/img{i:08d}.npy")
        handle.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.npy", i % 2] for i in range(5)]}))
    data = build_dataset("zip", str(tmp_path / "lat.zip"), resolution=RES, channels=4, num_classes=2)
    assert torch.equal(data.images, torch.from_numpy(items)) and data.labels.tolist() == [0, 1, 0, 1, 0]
    (tmp_path / "moments").mkdir()
    for i, item in enumerate(items):
        np.save(tmp_path / "moments" / f"{i}.npy", np.concatenate([item, np.abs(item)]).astype(np.float16))
    data = build_dataset("folder", str(tmp_path / "moments"), resolution=RES, channels=4)
    mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).view(1, 4, 1, 1)
    std = torch.tensor([4.17, 4.62, 3.71, 3.28]).view(1, 4, 1, 1)
    stored = torch.from_numpy(items.astype(np.float16).astype(np.float32))
    torch.testing.assert_close(data.images, (stored - mean) * (0.5 / std), rtol=1e-6, atol=1e-6)
    # Shapes that fit neither reading, mixed shapes, and non-float or broken entries: one line naming the file.
    raises_data_error("holds [8, 8, 8] but data.channels=3", "[3, 8, 8] (or [6, 8, 8]", source="folder",
                      path=str(tmp_path / "moments"), resolution=RES, channels=3)
    (tmp_path / "six").mkdir()
    np.save(tmp_path / "six" / "a.npy", np.zeros((6, RES, RES), np.float32))
    raises_data_error("holds 6 channels, read as EDM2's mean and std of 3-channel", "4-channel", source="folder",
                      path=str(tmp_path / "six"), resolution=RES, channels=3)
    np.save(tmp_path / "moments" / "9.npy", np.zeros((4, 2 * RES, 2 * RES), np.float32))
    raises_data_error("9.npy holds [4, 16, 16] but", "0.npy fitted", "one shape", source="folder",
                      path=str(tmp_path / "moments"), resolution=RES, channels=4)
    np.save(tmp_path / "moments" / "9.npy", np.zeros((4, RES, RES), np.uint8))
    raises_data_error("9.npy holds uint8", "float array [C,H,W]", source="folder", path=str(tmp_path / "moments"),
                      resolution=RES, channels=4)
    (tmp_path / "moments" / "9.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CorruptFileError, match="9.npy cannot be read as a .npy array"):
        build_dataset("folder", str(tmp_path / "moments"), resolution=RES, channels=4)
    assert len(build_dataset("folder", str(tmp_path / "moments"), resolution=RES, channels=4,
                             on_corrupt="skip").skipped) == 1
    np.save(tmp_path / "moments" / "9.npy", np.zeros((4, RES, RES), np.float32))
    (tmp_path / "moments" / "img.png").write_bytes(b"")
    raises_data_error("holds both images (img.png) and .npy files", source="folder", path=str(tmp_path / "moments"),
                      resolution=RES, channels=4)
    cfg = load_config(None, ["data.source=zip", f"data.path={tmp_path / 'lat.zip'}", f"data.resolution={RES}",
                             "data.channels=4", "data.loader=dali"])
    with pytest.raises(DataError, match="holds .npy files: set data.loader=torch"):
        build_training_data(cfg.data)
