"""Figures of a checkpoint's attention masks: ``python -m train.masks CHECKPOINT --out DIR``.

For each of the first ``--images`` test images, ``DIR/masks_<i>.png``: the
input image, then for every attention module in forward order the mean over
channels of its mask M, upsampled bilinearly (corners aligned, as the network
upsamples) from the module's resolution (32, 16 or 8) to 32x32. The network
runs in eval mode (batch-norm running statistics), as at test time. For
"mixed" attention M lies in (0, 1); each panel has its own colour scale.
"""
import argparse
import sys

import numpy as np
from tqdm import tqdm

import reference
from ra_kernels import backend
from ra_kernels.data import DATASETS, BatchLoader
from train.checkpoint import data_of, model_from_checkpoint, normalization, read_checkpoint
from train.common import (BACKEND_HELP, UsageError, counted, epoch_batches, load_dataset, nonempty_path, positive_int,
                          prepare_output_dir, select_backend)

IMAGE_SIZE = (32, 32)
FIGURE_BATCH = 64  # images per forward pass


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m train.masks",
        description="Draw the attention masks of a train.cifar checkpoint over a few test images: one PNG per "
                    "image with the input and, per attention module, its mask averaged over channels and "
                    "upsampled to 32x32.")
    parser.add_argument("checkpoint", type=nonempty_path,
                        help="a last.npz or best.npz written by train.cifar, or weights written by Module.save")
    parser.add_argument("--out", type=nonempty_path, required=True, metavar="DIR", help="directory for masks_<i>.png")
    parser.add_argument("--images", type=positive_int, default=4, metavar="N",
                        help="how many test images, the first N of the test set, at most its size "
                             "(default: %(default)s)")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="whose test images to draw (default: the checkpoint's dataset; for a weights "
                             "file, the CIFAR of its number of classes)")
    parser.add_argument("--data-dir", type=nonempty_path, metavar="DIR",
                        help="where the dataset is (default: the --data-dir the checkpoint was trained with, "
                             "or data for a weights file)")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading when the dataset is not in the data directory")
    parser.add_argument("--backend", choices=("auto",) + backend.BACKENDS, default="auto", help=BACKEND_HELP)
    return parser


def channel_mean_masks(masks):
    """{name: mask (N, H, W, C)} -> {name: float32 (N, 32, 32)}: the mean over channels, upsampled."""
    upsampled = {}
    for name, mask in masks.items():
        mean = mask.astype(np.float32).mean(axis=-1, keepdims=True)  # (N, H, W, 1)
        resized, _ = reference.upsample_bilinear(mean, IMAGE_SIZE)
        upsampled[name] = resized[..., 0]
    return upsampled


def write_figures(images, labels, class_names, masks, out, first=0):
    """One PNG per image, ``out/masks_<first + i>.png``: images uint8 (N, 32, 32, 3), labels (N,),
    masks from channel_mean_masks of the same N images (``first`` numbers the files only). Yields
    each path as it is written.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for i, (image, label) in enumerate(zip(images, labels)):
        fig, axes = plt.subplots(1, 1 + len(masks), figsize=(2.6 * (1 + len(masks)), 2.8), squeeze=False)
        axes = axes[0]
        axes[0].imshow(image)
        axes[0].set_title(f"input: {class_names[label]}", fontsize=9)
        for ax, (name, mask) in zip(axes[1:], masks.items()):
            shown = ax.imshow(mask[i], cmap="viridis")
            ax.set_title(name, fontsize=9)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        path = out / f"masks_{first + i}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        yield path


def main(argv=None) -> int:
    """Returns the exit code: 0, or 2 for bad usage or an unreadable checkpoint or dataset."""
    args = build_parser().parse_args(argv)
    try:
        out = prepare_output_dir(args.out)
        checkpoint = read_checkpoint(args.checkpoint)
        select_backend(args.backend)
        model = model_from_checkpoint(checkpoint, args.checkpoint)
        dataset, data_dir = data_of(checkpoint, args.dataset, args.data_dir)
        data = load_dataset(dataset, data_dir, download=not args.no_download)
        if args.images > len(data.test_labels):
            raise UsageError(f"--images {args.images}: the test set of {dataset} has {len(data.test_labels)} images")
    except UsageError as error:
        print(f"train.masks: error: {error}", file=sys.stderr)
        return 2
    images, labels = data.test_images[:args.images], data.test_labels[:args.images]
    loader = BatchLoader(images, labels, FIGURE_BATCH, *normalization(checkpoint, data), train=False, seed=0)
    model.eval()
    with epoch_batches(loader, 0) as batches, tqdm(total=args.images, unit="image", leave=False) as bar:
        for first, (x, _) in zip(range(0, args.images, FIGURE_BATCH), batches):
            masks = channel_mean_masks(model.attention_masks(x))
            last = first + x.shape[0]
            for written in write_figures(images[first:last], labels[first:last], data.class_names, masks, out, first):
                tqdm.write(str(written))
                bar.update()  # per figure, as each is written (a batch is up to FIGURE_BATCH of them)
    numbers = (p.stem.removeprefix("masks_") for p in out.glob("masks_*.png"))
    earlier = sorted(f"masks_{n}.png" for n in numbers if not n.isdigit() or int(n) >= args.images)
    if earlier:  # not this run's: left alone, but not to be mistaken for it
        print(f"note: {out} also holds {', '.join(earlier[:3])}{' ...' if len(earlier) > 3 else ''} from an earlier "
              f"run ({counted(len(earlier), 'file')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
