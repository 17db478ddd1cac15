"""SD-VAE latents: encode a dataset once to `.npy` shards, decode latent samples back to images.

    cmt-latents encode --vae VAE_DIR --images DIR_or_ZIP --out OUT_DIR --batch 64 [--norm edm2]
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

Labels come from a ``dataset.json`` beside the images (``{"labels": [["rel/path.png", 3], ...]}``, the
EDM/StyleGAN dataset convention) or else from class sub-folders (ImageNet's ``nXXXXXXXX/`` layout, indexed in
sorted order); with neither the set is unlabeled.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.data.sources import is_image_name
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


# --------------------------------------------------------------------------------------------------
# Reading an image set
# --------------------------------------------------------------------------------------------------
class ImageSource:
    """Sorted image names in a folder (recursive) or zip, with their labels, read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"--images '{self.path}' does not exist: pass a folder or .zip of .png/.jpg images")
        if self.path.is_dir():
            self.zip = None
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        else:
            try:
                self.zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise DataError(f"--images '{self.path}' is neither a folder nor a .zip") from None
            names = self.zip.namelist()
        self.names = sorted(n for n in names if is_image_name(n))
        if not self.names:
            raise DataError(f"--images '{self.path}' holds no .png/.jpg images")
        self.labels = self._labels(names)

    def _read(self, name: str) -> bytes:
        return self.zip.read(name) if self.zip is not None else (self.path / name).read_bytes()

    def _labels(self, all_names: list[str]) -> np.ndarray | None:
        if "dataset.json" in all_names:
            table = json.loads(self._read("dataset.json")).get("labels")
            if table is None:
                return None
            by_name = {str(n): int(c) for n, c in table}
            missing = [n for n in self.names if n not in by_name]
            if missing:
                raise DataError(f"dataset.json in '{self.path}' has no label for '{missing[0]}' "
                                f"({len(missing)} images unlabeled): list every image or remove the labels")
            return np.array([by_name[n] for n in self.names], dtype=np.int64)
        folders = [n.split("/")[0] if "/" in n else None for n in self.names]
        if any(f is None for f in folders):
            return None
        classes = {f: i for i, f in enumerate(sorted(set(folders)))}
        return np.array([classes[f] for f in folders], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int, resolution: int | None) -> torch.Tensor:
        """Image `index` as [3, H, W] in [-1, 1]; centre-cropped to a square and resized when `resolution`."""
        name = self.names[index]
        try:
            img = Image.open(io.BytesIO(self._read(name))).convert("RGB")
        except OSError as exc:
            raise DataError(f"'{name}' in '{self.path}' is not a readable image ({exc})") from None
        if resolution is not None:
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return arr.float() / 127.5 - 1.0


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
    shards, buffer, shape, written = [], [], None, 0
    count, total, total_sq = 0, 0.0, 0.0   # raw-latent statistics per channel

    def flush(part: np.ndarray):
        nonlocal written
        k = len(shards)
        np.save(out_dir / f"latents-{k:05d}.npy", part)
        if source.labels is not None:
            np.save(out_dir / f"labels-{k:05d}.npy", source.labels[written:written + len(part)])
        shards.append(f"latents-{k:05d}.npy")
        written += len(part)

    for start in range(0, len(source), batch):
        pixels = [source.load(i, resolution) for i in range(start, min(start + batch, len(source)))]
        if shape is None:
            shape = pixels[0].shape
        bad = next((start + i for i, p in enumerate(pixels) if p.shape != shape), None)
        if bad is not None:
            raise DataError(f"'{source.names[bad]}' is {tuple(pixels[bad - start].shape[1:])}, the first image "
                            f"{tuple(shape[1:])}: pass --resolution to centre-crop and resize all images")
        if shape[1] % 8 or shape[2] % 8:
            raise DataError(f"images are {tuple(shape[1:])}; the SD-VAE needs sides divisible by 8: pass --resolution")
        x = encode_images(vae, torch.stack(pixels), latent_norm)
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
