"""SD-VAE latents: encode a dataset once to `.npy` shards, decode latent samples back to images.

    cmt-latents encode --vae VAE_DIR --images DIR_or_ZIP --out OUT_DIR --batch 64 [--norm edm2]
    cmt-latents encode --vae VAE_DIR --images DIR_or_ZIP --out latents.zip --format edm2-zip   # EDM2's zip
    cmt-latents decode --vae VAE_DIR --latents FILE.npy --out PNG_DIR --batch 64

engine/data/latents.py describes the formats and the two normalisations.
"""
from __future__ import annotations


from engine.cli import CommandParser, entry_point
from engine.data.latents import NORMS, decode_file, encode_dataset, encode_edm2_zip


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="images -> normalised latent shards")
    enc.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder")
    enc.add_argument("--images", required=True, help="folder or .zip of .png/.jpg images")
    enc.add_argument("--out", required=True, help="output folder for shards, latents.json, latents.npy")
    enc.add_argument("--batch", type=int, default=32)
    enc.add_argument("--norm", choices=NORMS, default="edm2", help="sd: x 0.18215; edm2: per-channel to std 0.5")
    enc.add_argument("--resolution", type=int, default=None, help="centre-crop and resize images to this side")
    enc.add_argument("--shard-size", type=int, default=50_000)
    enc.add_argument("--no-merge", action="store_true", help="write only the shards, not latents.npy/labels.npy")
    enc.add_argument("--device", default="cpu")
    enc.add_argument("--format", choices=("npy", "edm2-zip"), default="npy",
                     help="npy: shards + latents.npy in the --out folder; edm2-zip: EDM2's latent zip at --out (.zip), "
                          "one raw mean+std .npy per image and dataset.json, read by data.source=zip")
    dec = sub.add_parser("decode", help="normalised latents (.npy) -> PNG images")
    dec.add_argument("--vae", required=True)
    dec.add_argument("--latents", required=True, help=".npy of latents [N, C, h, w]")
    dec.add_argument("--out", required=True, help="output folder for PNGs")
    dec.add_argument("--batch", type=int, default=32)
    dec.add_argument("--norm", choices=NORMS, default=None, help="default: from latents.json beside --latents")
    dec.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.command == "encode" and args.format == "edm2-zip":
        out = encode_edm2_zip(args.vae, args.images, args.out, batch=args.batch, norm=args.norm,
                              resolution=args.resolution, device=args.device)
    elif args.command == "encode":
        out = encode_dataset(args.vae, args.images, args.out, batch=args.batch, norm=args.norm,
                             resolution=args.resolution, shard_size=args.shard_size, merge=not args.no_merge,
                             device=args.device)
    else:
        out = decode_file(args.vae, args.latents, args.out, batch=args.batch, norm=args.norm, device=args.device)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
