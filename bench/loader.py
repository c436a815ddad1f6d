"""Images/s of the ImageNet loader: JPEG decoding and cropping in worker threads, as training sees it.

    python -m bench.loader                   # 1,024 JPEGs at 500x375, 1 thread, then every core
    python -m bench.loader --dry-run         # 32 JPEGs at 120x90, nothing written

The images: ``--images`` JPEGs (quality 90) at ImageNet's typical 500x375, written to a temporary
folder of 8 classes. They are photographs when the CIFAR-10 subset is at hand (its 32x32 images
resized to 500x375: real content, smoother than a camera's, so they decode somewhat faster than
ImageNet's), else smooth random fields; the report says which. The loader is
``ra_kernels.imagefolder.ImageFolderLoader`` in training mode at 224x224, batch 256: per image a
decode, a random resized crop and a bilinear resize on the host, then the transfer and the flip
and normalisation kernel on the current backend. The rate is images over the wall-clock time of
the batches that ``--images`` make (at ``--batch`` each) after one warm-up batch, so the device's
share is in it, as in training.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ra_kernels import backend
from ra_kernels.imagefolder import ImageFolderLoader, scan_split
from train.common import non_negative_int

from . import common

#: ImageNet's most common image size (width, height), and the JPEG quality the folder is written at.
JPEG_SIZE, JPEG_QUALITY = (500, 375), 90
CLASSES = 8


def source_images(count, rng, data_dir=None):
    """``count`` uint8 RGB images (H, W, 3) and their origin in words: CIFAR-10 photographs from
    ``data_dir`` (or the usual places), else smooth random fields."""
    found = common.find_cifar_subset(data_dir)
    if found is not None:
        from ra_kernels.data import load_cifar
        images = load_cifar("cifar10", found, download=False).train_images
        # The subset's images in a random order, repeated when more are asked for than it holds.
        return images[np.resize(rng.permutation(len(images)), count)], f"CIFAR-10 photographs from {found}"
    fields = rng.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)  # resized up: smooth colour fields
    return fields, "smooth random fields (no CIFAR-10 subset found)"


def write_folder(directory: Path, images, size=JPEG_SIZE) -> Path:
    """``images`` resized (bicubic) to ``size`` and saved as JPEGs under directory/<class>/, round robin."""
    from PIL import Image
    for i, pixels in enumerate(images):
        folder = directory / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize(size, Image.BICUBIC).save(folder / f"{i:06d}.JPEG", quality=JPEG_QUALITY)
    return directory


def images_per_second(split, workers, batch, batches, size=224) -> float:
    """Training batches of ``split`` through ImageFolderLoader with ``workers`` threads: images/s
    over ``batches`` batches after a warm-up one (which starts the threads)."""
    loader = ImageFolderLoader(split, size, batch, train=True, seed=0, workers=workers)
    if batches + 1 > len(loader):
        raise ValueError(f"{len(split)} images make {len(loader)} batches of {batch}: need {batches + 1}")
    iterator = loader.epoch(0)
    next(iterator)
    started = time.perf_counter()
    for _, (x, _) in zip(range(batches), iterator):
        pass
    backend.to_numpy(x[:1])  # waits for the device
    seconds = time.perf_counter() - started
    iterator.close()
    return batches * batch / seconds


def measure(images: int, batch: int, workers: list, dry_run: bool, seed: int, data_dir=None) -> dict:
    """The loader's rates: {"rates": {workers: images/s}, "origin": ..., "line": ...}."""
    rng = np.random.default_rng(seed)
    pixels, origin = source_images(images, rng, data_dir)
    size = (120, 90) if dry_run else JPEG_SIZE
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        split = scan_split(write_folder(Path(tmp), pixels, size))
        rates = {w: images_per_second(split, w, batch, len(split) // batch - 1, size=32 if dry_run else 224)
                 for w in workers}
    shape = f"{size[0]}x{size[1]}"
    line = (f"{images} JPEGs at {shape} ({origin}), crops to {32 if dry_run else 224}, batch {batch}: "
            + ", ".join(f"{w} thread{'s' if w > 1 else ''} {r:,.0f} images/s" for w, r in rates.items())
            + (" (dry run: small images, not a benchmark)" if dry_run else ""))
    return dict(rates=rates, origin=origin, line=line)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to write and read (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default: %(default)s, the paper's)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="thread counts to measure (default: 1 and min(16, cores))")
    parser.add_argument("--backend", choices=("auto",) + backend.BACKENDS, default="auto",
                        help="where the flip and normalisation run (default: cuda when there is a GPU)")
    parser.add_argument("--data", type=Path, default=None, help="the CIFAR-10 subset (default: the usual places)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the image choice and crops (default: 0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="RESULTS.md is appended here (default: bench/)")
    parser.add_argument("--dry-run", action="store_true", help="32 small JPEGs, batch 8, nothing written")
    args = parser.parse_args(argv)
    if not args.dry_run:  # nothing is written in a dry run
        common.checked_out(parser, args.out)
    if args.data is not None and common.find_cifar_subset(args.data) is None:  # not silently synthetic
        parser.error(f"--data {args.data}: no CIFAR-10 subset there (a cifar-10-batches-py folder)")
    if args.dry_run:
        args.images, args.batch = 32, 8
    args.workers = args.workers or sorted({1, min(16, os.cpu_count() or 1)})
    if args.images < 2 * args.batch or min(args.workers) < 1:
        parser.error(f"--images must give at least two batches of --batch ({args.batch}), --workers >= 1")
    args.command = "python -m bench.loader " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not common.chosen_backend("python -m bench.loader", args.backend):
        return 2
    result = measure(args.images, args.batch, args.workers, args.dry_run, args.seed, args.data)
    print(result["line"])
    if not args.dry_run:
        env = common.environment(common.import_torch(False), args.command)
        common.append_results(args.out / "RESULTS.md", f"## bench.loader, {env['date']}\n\n"
                              f"{common.describe_environment(env)}\n\n{result['line']} (backend "
                              f"{backend.get_backend()}).")
        print(f"\nappended to {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
