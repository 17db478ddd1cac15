"""Prepare a dataset: images as they come → a zip or folder in the EDM/StyleGAN dataset_tool layout, with labels.

    cmt-prepare --source downloads/cifar-10-batches-bin --dest datasets/cifar10-32x32.zip
    cmt-prepare --source downloads/ffhq/images1024x1024 --dest datasets/ffhq-64x64.zip \\
        --resolution 64 --transform resize --labels none
    cmt-prepare --source downloads/imagenet/ILSVRC/Data/CLS-LOC/train --dest datasets/img64.zip \\
        --resolution 64 --transform adm-crop

Train on the result with data.source=zip (or folder) and data.path=DEST. engine/data/prepare.py describes the
layout and the transforms; docs/datasets.md has the command for each data set.
"""
from __future__ import annotations

from engine.cli import CommandParser, entry_point, positive
from engine.data.prepare import LABELS, TRANSFORMS, prepare_dataset


@entry_point
def main(argv=None) -> int:
    p = CommandParser(description=__doc__)
    p.add_argument("--source", required=True,
                   help="folder (recursive; class sub-folders = labels) or .zip of images, or CIFAR-10's binary "
                        "batches folder (data_batch_1.bin ...)")
    p.add_argument("--dest", required=True, help="output: a .zip, or a folder for any other name")
    p.add_argument("--resolution", type=positive, default=None, help="side of the square output images")
    p.add_argument("--transform", choices=TRANSFORMS, default="none",
                   help="resize: Lanczos, square images (CIFAR, FFHQ, AFHQv2); adm-crop: ADM's ImageNet centre "
                        "crop; none: keep the images as they are (default)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 = RGB (default), 1 = grayscale")
    p.add_argument("--labels", choices=LABELS, default="auto",
                   help="auto: from the source's dataset.json, else its class sub-folders; none: unlabeled")
    p.add_argument("--max-images", type=positive, default=None, help="only the first N images in sorted order")
    p.add_argument("--skip-unreadable", action="store_true", help="leave out images that cannot be decoded")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dest")
    p.add_argument("--compress-level", type=int, default=0,
                   help="PNG compression 0-9 (lossless either way); 0, as EDM/EDM2 store images, reads fastest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    done = prepare_dataset(args.source, args.dest, resolution=args.resolution, transform=args.transform,
                           channels=args.channels, labels=args.labels, max_images=args.max_images,
                           skip_unreadable=args.skip_unreadable, overwrite=args.overwrite,
                           compress_level=args.compress_level, progress=not args.no_progress)
    classes = "unlabeled" if done.num_classes is None else f"{done.num_classes} classes from {done.label_origin}"
    shown = ", ".join(done.skipped[:3]) + (", ..." if len(done.skipped) > 3 else "")
    skipped = f", {len(done.skipped)} unreadable left out ({shown})" if done.skipped else ""
    print(f"wrote {done.dest}: {done.count} images of {done.size[0]}×{done.size[1]}, {classes}{skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
