"""SD-VAE latents: encode a dataset once to `.npy` shards or an EDM2 latent zip, decode latent samples back to images.

    cmt-latents encode --vae VAE_DIR --images DIR_or_ZIP --out OUT_DIR --batch 64 [--norm edm2]
    cmt-latents encode --vae VAE_DIR --images img512.zip --out img512-sd.zip --format edm2-zip
    cmt-latents decode --vae VAE_DIR --latents FILE.npy --out PNG_DIR --batch 64

The VAE is diffusers' ``AutoencoderKL`` read from a local folder (``config.json`` +
``diffusion_pytorch_model.safetensors``; EDM2 and the CMT authors use ``stabilityai/sd-vae-ft-mse``), since
nothing is downloaded at run time. Latents are the posterior mean (EDM2 re-samples mean + std·ε every time
it reads an image; a fixed array cannot, which removes that small augmentation), normalised one of two ways:

- ``sd``: ``z · 0.18215`` (the VAE config's ``scaling_factor``): the DiT / SiT / MeanFlow convention, used by
  ``configs/paper/imagenet256_*`` (their σ_data-free flow matching expects roughly unit-variance latents);
- ``edm2``: per channel ``(z − mean)·(0.5 / std)`` with EDM2's published statistics of ImageNet-512 latents,
  so the data has std σ_data = 0.5 as the EDM parameterisation assumes: used by ``configs/paper/imagenet512_*``.

``OUT_DIR`` receives ``latents-NNNNN.npy`` / ``labels-NNNNN.npy`` shards of ``--shard-size`` items (a streaming
reader can take them one at a time), ``latents.json`` (the normalisation, so ``decode`` can invert it, plus
per-channel statistics measured on this data) and, unless ``--no-merge``, ``latents.npy`` + ``labels.npy``:
the single arrays ``data.source: npy`` reads (``data.path`` / ``data.labels_path``).

``--format edm2-zip`` writes EDM2's latent dataset instead: an uncompressed zip of one ``.npy`` per image
(``00000/img00000000.npy``, ...) plus ``dataset.json`` labels, the layout EDM2's README describes ("ZIP archives
containing uncompressed PNG or NPY files, along with a metadata file dataset.json"). Each entry is float32
[2C, h, w]: the raw (unnormalised) posterior mean of the C latent channels, then their standard deviation, so a
reader may draw mean + std·ε per use as EDM2 does. ``data.source: zip`` reads such a zip (and EDM2's own) by
:func:`read_latent_entry`: entries of 2·data.channels channels are taken as mean ‖ std and give the mean,
normalised with EDM2's statistics (``edm2`` above); entries of data.channels channels are used as stored.

Labels come from a ``dataset.json`` beside the images (``{"labels": [["rel/path.png", 3], ...]}``, the
EDM/StyleGAN dataset convention) or else from class sub-folders (ImageNet's ``nXXXXXXXX/`` layout, indexed in
sorted order); with neither the set is unlabeled.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image

from engine.data.prepare import DatasetWriter, ImageSource, output_name
from engine.data.sources import decode_array
from engine.errors import ConfigError, DataError, MissingFileError

SD_SCALE = 0.18215
# EDM2's statistics of SD-VAE (ft-mse) latents of ImageNet-512, before scaling, and its target std (= σ_data).
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_STD = 0.5
NORMS = ("sd", "edm2")
VAE_HINT = ("put a diffusers AutoencoderKL there: config.json and diffusion_pytorch_model.safetensors (e.g. the "
            "files of stabilityai/sd-vae-ft-mse, downloaded on a machine with network access and copied here)")


def load_vae(vae_dir: str | Path, device: str | torch.device = "cpu"):
    """diffusers' AutoencoderKL from a local folder, in eval mode; one-line errors when it is missing."""
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir)
    if not vae_dir.is_dir():
        raise MissingFileError(f"VAE folder '{vae_dir}' does not exist: {VAE_HINT}")
    if not (vae_dir / "config.json").is_file():
        raise MissingFileError(f"VAE folder '{vae_dir}' has no config.json: {VAE_HINT}")
    if not any((vae_dir / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise MissingFileError(f"VAE folder '{vae_dir}' has no diffusion_pytorch_model.safetensors: {VAE_HINT}")
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"VAE folder '{vae_dir}' could not be loaded ({first}): {VAE_HINT}") from None
    return vae.to(device).eval().requires_grad_(False)


class LatentNorm:
    """The affine map raw VAE latent ↔ training latent: ``normalize(z) = (z − shift)·scale`` per channel."""

    def __init__(self, kind: str, scale, shift):
        self.kind = kind
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.shift = torch.as_tensor(shift, dtype=torch.float32).reshape(1, -1, 1, 1)

    @classmethod
    def named(cls, kind: str, vae_scaling_factor: float = SD_SCALE, channels: int = 4) -> "LatentNorm":
        if kind == "sd":
            return cls("sd", [vae_scaling_factor] * channels, [0.0] * channels)
        if kind == "edm2":
            if channels != len(EDM2_RAW_MEAN):
                raise ConfigError(f"norm 'edm2' has statistics for 4-channel SD latents, the VAE gives {channels}")
            return cls("edm2", [EDM2_FINAL_STD / s for s in EDM2_RAW_STD], list(EDM2_RAW_MEAN))
        raise ConfigError(f"unknown latent norm '{kind}': choose one of {', '.join(NORMS)}")

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift.to(z)) * self.scale.to(z)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale.to(x) + self.shift.to(x)

    def to_json(self) -> dict:
        return {"norm": self.kind, "scale": self.scale.flatten().tolist(), "shift": self.shift.flatten().tolist()}

    @classmethod
    def from_json(cls, meta: dict) -> "LatentNorm":
        return cls(meta["norm"], meta["scale"], meta["shift"])


_EDM2_NORM = LatentNorm.named("edm2")


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, norm: LatentNorm) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] → normalised latents [B, C, H/8, W/8] (the posterior mean)."""
    param = next(vae.parameters())
    raw = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean
    return norm.normalize(raw.float()).cpu()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, norm: LatentNorm) -> torch.Tensor:
    """Normalised latents → pixels in [-1, 1]."""
    param = next(vae.parameters())
    raw = norm.denormalize(latents.float()).to(param.device, param.dtype)
    return vae.decode(raw).sample.float().clamp(-1, 1).cpu()


def load_pixels(source: ImageSource, index: int, resolution: int | None) -> torch.Tensor:
    """Image `index` as [3, H, W] in [-1, 1]; centre-cropped to a square and resized when `resolution`."""
    img = source.open(index)
    if resolution is not None:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


def read_latent_entry(name: str, open_bytes: Callable[[], BinaryIO], resolution: int, channels: int,
                      like: str | None = None) -> torch.Tensor:
    """One `.npy` item of a latent zip or folder → float32 [channels, resolution, resolution] (module docstring):
    2·channels channels (EDM2's mean ‖ std) give the EDM2-normalised mean, `channels` channels are kept as stored.
    like: an earlier entry that fitted, named beside a misfit (mixed shapes)."""
    array = decode_array(name, open_bytes)
    c, h, w = array.shape
    if (h, w) == (resolution, resolution) and c in (channels, 2 * channels):
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if c == channels:
            return tensor
        if channels != len(EDM2_RAW_MEAN):
            raise DataError(f"{name} holds {c} channels, read as EDM2's mean and std of {channels}-channel latents, "
                            f"but EDM2's statistics are for 4-channel SD-VAE latents: store normalised latents "
                            f"of data.channels={channels} channels instead")
        return _EDM2_NORM.normalize(tensor[None, :channels])[0]
    if like is not None:
        raise DataError(f"{name} holds {list(array.shape)} but {like} fitted data.channels={channels}, "
                        f"data.resolution={resolution}: every entry of one dataset must have one shape")
    raise DataError(f"{name} holds {list(array.shape)} but data.channels={channels}, data.resolution={resolution} "
                    f"expect [{channels}, {resolution}, {resolution}] (or [{2 * channels}, {resolution}, "
                    f"{resolution}]: EDM2's mean and std): fix the config")


# --------------------------------------------------------------------------------------------------
# Encode / decode a whole set
# --------------------------------------------------------------------------------------------------
def encode_dataset(vae_dir, images, out_dir, *, batch: int = 32, norm: str = "edm2", resolution: int | None = None,
                   shard_size: int = 50_000, merge: bool = True, device: str = "cpu") -> Path:
    """Encode every image under `images` into shards in `out_dir` (see the module docstring); returns out_dir."""
    if batch < 1 or shard_size < 1:
        raise ConfigError("--batch and --shard-size must be positive")
    source = ImageSource(images)
    vae = load_vae(vae_dir, device)
    latent_norm = LatentNorm.named(norm, float(vae.config.scaling_factor), int(vae.config.latent_channels))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, buffer, written = [], [], 0
    count, total, total_sq = 0, 0.0, 0.0   # raw-latent statistics per channel

    def flush(part: np.ndarray):
        nonlocal written
        k = len(shards)
        np.save(out_dir / f"latents-{k:05d}.npy", part)
        if source.labels is not None:
            np.save(out_dir / f"labels-{k:05d}.npy", source.labels[written:written + len(part)])
        shards.append(f"latents-{k:05d}.npy")
        written += len(part)

    for _, pixels in _pixel_batches(source, batch, resolution):
        x = encode_images(vae, pixels, latent_norm)
        raw = latent_norm.denormalize(x).double()
        count += raw.numel() // raw.shape[1]
        total = total + raw.sum(dim=(0, 2, 3))
        total_sq = total_sq + raw.square().sum(dim=(0, 2, 3))
        pending = torch.cat([*buffer, x])
        while len(pending) >= shard_size:
            flush(pending[:shard_size].numpy())
            pending = pending[shard_size:]
        buffer = [pending]
    if len(buffer[0]):
        flush(buffer[0].numpy())
    mean = total / count
    meta = {**latent_norm.to_json(), "vae": str(vae_dir), "images": str(images), "count": len(source),
            "shape": list(x.shape[1:]), "labeled": source.labels is not None, "shards": shards,
            "raw_mean": mean.tolist(), "raw_std": (total_sq / count - mean.square()).sqrt().tolist()}
    (out_dir / "latents.json").write_text(json.dumps(meta, indent=2))
    if merge:
        merged = np.lib.format.open_memmap(out_dir / "latents.npy", mode="w+", dtype=np.float32,
                                           shape=(len(source), *meta["shape"]))
        at = 0
        for name in shards:
            part = np.load(out_dir / name, mmap_mode="r")
            merged[at:at + len(part)] = part
            at += len(part)
        merged.flush()
        if source.labels is not None:
            np.save(out_dir / "labels.npy", source.labels)
    return out_dir


def encode_edm2_zip(vae_dir, images, out_zip, *, batch: int = 32, norm: str = "edm2", resolution: int | None = None,
                    device: str = "cpu", progress: bool = True) -> Path:
    """Encode every image under `images` into EDM2's latent zip at `out_zip` (module docstring): one float32
    [2C, h, w] entry of raw posterior mean ‖ std per image, and dataset.json labels; written under a temporary
    name and renamed at the end, so `out_zip` is never half-written. Returns out_zip."""
    if norm != "edm2":
        raise ConfigError("--format edm2-zip stores EDM2's raw mean and std, normalised with EDM2's statistics "
                          "when read: use --norm edm2 (the default), or --format npy for the sd normalisation")
    if batch < 1:
        raise ConfigError("--batch must be positive")
    out_zip = Path(out_zip)
    if out_zip.suffix.lower() != ".zip":
        raise ConfigError(f"--out '{out_zip}' must end in .zip for --format edm2-zip")
    source = ImageSource(images)
    vae = load_vae(vae_dir, device)
    param = next(vae.parameters())
    from tqdm import tqdm
    bar = tqdm(total=len(source), desc="encode", unit="img", file=sys.stderr, mininterval=2.0, dynamic_ncols=True,
               disable=not progress)
    labels = []
    with DatasetWriter(out_zip) as out:
        for start, pixels in _pixel_batches(source, batch, resolution):
            with torch.no_grad():
                posterior = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
            moments = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy()
            for offset, item in enumerate(moments):
                index = start + offset
                buffer = io.BytesIO()
                np.save(buffer, item)
                out.add(output_name(index, ".npy"), buffer.getvalue())
                if source.labels is not None:
                    labels.append([output_name(index, ".npy"), int(source.labels[index])])
            bar.update(len(moments))
        bar.close()
        out.commit(labels if source.labels is not None else None)
    return out_zip


def _pixel_batches(source: ImageSource, batch: int, resolution: int | None):
    """(first index, pixels [B, 3, H, W] in [-1, 1]) for each batch of `source`, all of one size a VAE can take."""
    shape = None
    for start in range(0, len(source), batch):
        pixels = [load_pixels(source, i, resolution) for i in range(start, min(start + batch, len(source)))]
        if shape is None:
            shape = pixels[0].shape
        bad = next((start + i for i, p in enumerate(pixels) if p.shape != shape), None)
        if bad is not None:
            raise DataError(f"'{source.names[bad]}' is {tuple(pixels[bad - start].shape[1:])}, the first image "
                            f"{tuple(shape[1:])}: pass --resolution to centre-crop and resize all images")
        if shape[1] % 8 or shape[2] % 8:
            raise DataError(f"images are {tuple(shape[1:])}; the SD-VAE needs sides divisible by 8: pass --resolution")
        yield start, torch.stack(pixels)


def decode_file(vae_dir, latents_path, out_dir, *, batch: int = 32, norm: str | None = None,
                device: str = "cpu") -> Path:
    """Decode a .npy of normalised latents [N, C, h, w] to PNGs `000000.png` ... in `out_dir`.

    The normalisation is read from `latents.json` beside the file (written by ``encode``) unless `norm`
    names one; with neither the call fails rather than guess (a wrong scale gives plausible-looking garbage).
    """
    latents_path = Path(latents_path)
    if not latents_path.is_file():
        raise MissingFileError(f"--latents '{latents_path}' does not exist: pass a .npy of latents [N, C, h, w]")
    array = np.load(latents_path, mmap_mode="r", allow_pickle=False)
    if array.ndim != 4:
        raise DataError(f"'{latents_path}' has shape {array.shape}; decode needs latents [N, C, h, w]")
    vae = load_vae(vae_dir, device)
    manifest = latents_path.parent / "latents.json"
    if norm is not None:
        latent_norm = LatentNorm.named(norm, float(vae.config.scaling_factor), int(vae.config.latent_channels))
    elif manifest.is_file():
        latent_norm = LatentNorm.from_json(json.loads(manifest.read_text()))
    else:
        raise DataError(f"no latents.json beside '{latents_path}': pass --norm ({' or '.join(NORMS)}) to say how "
                        "the latents were normalised")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(array), batch):
        pixels = decode_latents(vae, torch.from_numpy(np.array(array[start:start + batch])), latent_norm)
        for i, img in enumerate(pixels):
            arr = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(out_dir / f"{start + i:06d}.png")
    return out_dir
