"""SD-VAE latent pipeline on a tiny randomly initialised AutoencoderKL saved to a temp folder (no download)."""
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import load_config
from engine.cli.latents import main
from engine.data.dataset import build_dataset
from engine.data.latents import (EDM2_RAW_MEAN, EDM2_RAW_STD, LatentNorm, decode_file, encode_dataset,
                                 encode_edm2_zip, load_vae)
from engine.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Seven 16x16 RGB images in two class folders (ImageNet layout)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = root / ("n001" if i < 4 else "n002")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_encode_writes_shards_merged_arrays_and_manifest(vae_dir, images, tmp_path):
    out = encode_dataset(vae_dir, images, tmp_path / "lat", batch=3, norm="edm2", shard_size=4)
    meta = json.loads((out / "latents.json").read_text())
    assert meta["shards"] == ["latents-00000.npy", "latents-00001.npy"] and meta["count"] == 7
    assert [len(np.load(out / s)) for s in meta["shards"]] == [4, 3]
    merged = np.load(out / "latents.npy")
    assert merged.shape == (7, 4, 2, 2) and merged.dtype == np.float32
    np.testing.assert_array_equal(merged[4:], np.load(out / "latents-00001.npy"))
    np.testing.assert_array_equal(np.load(out / "labels.npy"), [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.load(out / "labels-00001.npy"), [1, 1, 1])
    # The engine's npy source reads the merged arrays as they are.
    ds = build_dataset("npy", str(out / "latents.npy"), resolution=2, channels=4, labels_path=str(out / "labels.npy"))
    assert len(ds) == 7 and ds.num_classes == 2
    # Latents are the normalised posterior mean, and decode inverts the recorded normalisation.
    vae = load_vae(vae_dir)
    pixels = torch.from_numpy(np.asarray(Image.open(images / "n001" / "0.png"), dtype=np.float32)).permute(2, 0, 1)
    with torch.no_grad():
        raw = vae.encode(pixels[None] / 127.5 - 1).latent_dist.mean
    expected = (raw - torch.tensor(EDM2_RAW_MEAN).view(1, 4, 1, 1)) * (0.5 / torch.tensor(EDM2_RAW_STD).view(1, 4, 1, 1))
    torch.testing.assert_close(torch.from_numpy(merged[:1]), expected, atol=1e-5, rtol=1e-4)
    raw_all = LatentNorm.from_json(meta).denormalize(torch.from_numpy(merged))
    np.testing.assert_allclose(meta["raw_mean"], raw_all.mean(dim=(0, 2, 3)).numpy(), atol=1e-4)


def test_norms_round_trip_and_decode_writes_pngs(vae_dir, images, tmp_path):
    z = torch.randn(2, 4, 3, 3)
    for kind in ("sd", "edm2"):
        norm = LatentNorm.named(kind)
        torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    torch.testing.assert_close(LatentNorm.named("sd").normalize(z), z * 0.18215)
    out = encode_dataset(vae_dir, images, tmp_path / "lat", batch=4, norm="sd", merge=False)
    assert not (out / "latents.npy").exists()
    pngs = decode_file(vae_dir, out / "latents-00000.npy", tmp_path / "png", batch=5)
    files = sorted(pngs.glob("*.png"))
    assert len(files) == 7 and Image.open(files[0]).size == (16, 16)


def test_resolution_crops_and_resizes(vae_dir, tmp_path, capsys):
    root = tmp_path / "odd"
    root.mkdir()
    Image.new("RGB", (40, 24), (255, 0, 0)).save(root / "a.png")
    Image.new("RGB", (24, 32), (0, 0, 255)).save(root / "b.png")
    # mixed sizes without --resolution: the command's one-line error naming the odd image, exit code 2
    assert main(["encode", "--vae", str(vae_dir), "--images", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'b.png'" in err
    out = encode_dataset(vae_dir, root, tmp_path / "o", resolution=16)
    assert np.load(out / "latents.npy").shape == (2, 4, 2, 2) and not (out / "labels.npy").exists()


def test_missing_or_incomplete_vae_folder_says_what_to_put_there(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json and diffusion_pytorch_model") as caught:
        load_vae(tmp_path / "nope")
    assert isinstance(caught.value, UserError)          # what the commands print as one line
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path / "vae")
    # The command prints each as one line "error: ..." and exits 2: first the missing latents, then the VAE.
    decode = ["decode", "--vae", str(tmp_path / "nope"), "--latents", str(tmp_path / "x.npy"),
              "--out", str(tmp_path / "o")]
    assert main(decode) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --latents") and err.count("\n") == 1 and "does not exist" in err
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 2, 2), np.float32))
    assert main(decode) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: VAE folder") and err.count("\n") == 1 and "does not exist" in err


def test_edm2_latent_zip_written_and_read_back_exactly(vae_dir, images, tmp_path):
    """EDM2's latent zip: one float32 [8, h, w] entry (raw posterior mean, then std) per image, dataset.json labels;
    data.source=zip reads it as the EDM2-normalised mean, the same latents the npy route gives."""
    out = encode_edm2_zip(vae_dir, images, tmp_path / "img-sd.zip", batch=3, progress=False)
    names = [f"00000/img{i:08d}.npy" for i in range(7)]
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == names + ["dataset.json"]
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        labels = json.loads(archive.read("dataset.json"))["labels"]
        raw = np.stack([np.load(io.BytesIO(archive.read(n))) for n in names])
    assert labels == [[n, int(i >= 4)] for i, n in enumerate(names)]
    assert raw.shape == (7, 8, 2, 2) and raw.dtype == np.float32 and (raw[:, 4:] > 0).all()
    vae = load_vae(vae_dir)
    pixels = torch.from_numpy(np.asarray(Image.open(images / "n002" / "6.png"), dtype=np.float32)).permute(2, 0, 1)
    with torch.no_grad():
        posterior = vae.encode(pixels[None] / 127.5 - 1).latent_dist
    torch.testing.assert_close(torch.from_numpy(raw[6:]), torch.cat([posterior.mean, posterior.std], 1),
                               atol=1e-5, rtol=1e-4)
    data = build_dataset("zip", str(out), resolution=2, channels=4, num_classes=2)
    shift, scale = torch.tensor(EDM2_RAW_MEAN).view(1, 4, 1, 1), torch.tensor([0.5 / s for s in EDM2_RAW_STD])
    assert torch.equal(data.images, (torch.from_numpy(raw[:, :4]) - shift) * scale.view(1, 4, 1, 1))
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    merged = np.load(encode_dataset(vae_dir, images, tmp_path / "lat", batch=3, norm="edm2") / "latents.npy")
    torch.testing.assert_close(data.images, torch.from_numpy(merged), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="--norm edm2"):
        encode_edm2_zip(vae_dir, images, tmp_path / "x.zip", norm="sd")
    with pytest.raises(ConfigError, match="must end in .zip"):
        encode_edm2_zip(vae_dir, images, tmp_path / "x")


def test_paper_configs_name_their_latent_norm(root):
    """The latent configs' sigma_data matches the normalisation they document (edm2 -> 0.5)."""
    cfg = load_config(root / "configs" / "paper" / "imagenet512_edm2xxl_pre.yaml")
    assert cfg.data.channels == 4 and cfg.model.sigma_data == 0.5
