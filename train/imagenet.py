"""Train the paper's ImageNet Attention-56 or -92 on an ImageNet-style folder, or evaluate a checkpoint.

    python -m train.imagenet --data-dir /data/imagenet [options]
    python -m train.imagenet --eval-only runs/imagenet-attention56/last.npz --image-size 320

The folder: ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``, the same class folders
in both (ra_kernels/imagefolder.py checks it and names what is wrong). Images are decoded with
Pillow in ``--workers`` threads inside the loader's prefetching thread; a file that cannot be
decoded is named in a warning and replaced by the next image of its class.

Defaults are the paper's ImageNet recipe as we read its section 4.2: Nesterov SGD, momentum 0.9,
weight decay 1e-4, batch 256, learning rate 0.1 divided by 10 at 200k, 400k and 500k
iterations, stop at 530k (106 epochs of ImageNet's 1,281,167 images at batch 256; the milestones
scale with ``--epochs``); scale and aspect-ratio augmentation (a random resized crop of 8-100%
of the area, aspect 3/4 to 4/3, to 224x224) and horizontal flips; evaluation on the central
224x224 of the image resized to 256. One deviation: the paper subtracts the mean image; we
normalise by ImageNet's per-channel mean and standard deviation, on the device, as for CIFAR.

The run (its files metrics.csv, curves.png, last.npz and best.npz, Ctrl-C and ``--resume``, the
exit codes) is train/run.py's, the same as train.cifar's; top-5 accuracy is in metrics.csv
for both. Every random draw (weights, order, crops, flips) is a function of ``--seed`` and the
position, so a resumed run repeats an uninterrupted one (bit for bit on the numpy backend).
"""
import argparse
import functools
import math
import sys
from pathlib import Path

import numpy as np

from ra_kernels.imagefolder import ImageFolderLoader, scan_imagenet, scan_split
from ra_kernels.models import IMAGENET_MODELS, ImageNetAttentionNet
from ra_kernels.optim import IMAGENET_ITERATIONS, IMAGENET_MILESTONES, SCHEDULES, paper_schedule
from train import run
from train.checkpoint import model_from_checkpoint
from train.common import UsageError, counted, nonempty_path, number, positive_int

DEFAULT_DATA_DIR = "data/imagenet"


def _image_size(text):
    value = number(text, int)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"expected a multiple of 32 (the network halves it five times), got {text}")
    return value


def _subset(count, limit):
    """The indices of ``limit`` of ``count`` images, a random sample drawn across the classes (the
    first ``limit`` of a fixed permutation, in order; a small sample may miss some classes), or all
    of them; the same for every run and seed."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).permutation(count)[:limit])


def _scanned(scan, data_dir):
    try:
        return scan(data_dir)
    except (ValueError, OSError) as error:
        raise UsageError(f"--data-dir {data_dir}: {error}") from None


def _limited(split, limit):
    return split.subset(_subset(len(split), limit))


class ImageNet(run.Task):
    name, module = "ra-train-imagenet", "train.imagenet"
    network = ImageNetAttentionNet
    resume_may_change = ("data_dir", "workers", "backend", "log_every", "no_cuda_graph",
                         "collective_timeout")
    eval_only_options = ("eval_only", "data_dir", "limit_test", "image_size", "batch_size", "workers", "backend",
                         "precision", "no_cuda_graph")

    def build_parser(self):
        return build_parser()

    def default_out(self, args):
        return str(Path("runs") / f"imagenet-{args.model}")

    def dataset(self, args):
        return f"{args.data_dir} at {args.image_size}x{args.image_size}"

    def _loader(self, args, split, train, shard=(0, 1)):
        return ImageFolderLoader(split, args.image_size, args.batch_size, train=train, seed=args.seed,
                                 workers=args.workers, shard=shard)

    def training_data(self, args, shard):
        train, val = _scanned(scan_imagenet, args.data_dir)
        train, val = _limited(train, args.limit_train), _limited(val, args.limit_test)
        run.check_enough_images(len(train), len(val), args.batch_size, shard)
        if shard[0] == 0:
            print(f"{args.data_dir}: {counted(len(train.class_names), 'class', 'classes')}, "
                  f"{counted(len(train), 'training image')} and {counted(len(val), 'validation image')}")
        return self._loader(args, train, True, shard), self._loader(args, val, False, shard), train.class_names

    def default_epochs(self, batches_per_epoch):
        return math.ceil(IMAGENET_ITERATIONS / batches_per_epoch)

    def schedule(self, args, total_iterations):
        if args.schedule == "paper":
            return paper_schedule(args.lr, total_iterations, IMAGENET_ITERATIONS, IMAGENET_MILESTONES)
        return SCHEDULES[args.schedule](args.lr, total_iterations)

    def build_model(self, args, num_classes):
        return IMAGENET_MODELS[args.model](num_classes=num_classes, attention=args.attention,
                                           residual_attention=not args.naive_attention, seed=args.seed)

    def evaluation(self, args, explicit, checkpoint, path):
        saved = checkpoint.meta.get("args", {})
        data_dir = args.data_dir if "data_dir" in explicit else saved.get("data_dir", DEFAULT_DATA_DIR)
        if "image_size" not in explicit:
            args.image_size = saved.get("image_size", args.image_size)
        model = model_from_checkpoint(checkpoint, path, self.network)
        val = _scanned(lambda root: scan_split(Path(root) / "val"), data_dir)  # the training split is not needed
        trained_on = checkpoint.meta.get("class_names")
        if len(val.class_names) != model.config["num_classes"] or trained_on not in (None, list(val.class_names)):
            raise UsageError(f"{path} classifies {model.config['num_classes']} classes"
                             + ("" if trained_on is None else f" ({trained_on[0]} ... {trained_on[-1]})")
                             + f", {data_dir}/val has {len(val.class_names)} ({val.class_names[0]} ... "
                               f"{val.class_names[-1]}): not the classes it was trained on")
        val = _limited(val, args.limit_test)
        return model, self._loader(args, val, False), (f"{counted(len(val), 'validation image')} of {data_dir} at "
                                                       f"{args.image_size}x{args.image_size}")


TASK = ImageNet()

EPILOG = run.EPILOG + """\
examples:
  python -m train.imagenet --data-dir /data/imagenet --model attention92 --out runs/a92-imagenet
  python -m train.imagenet --out runs/a92-imagenet --resume
  python -m train.imagenet --eval-only runs/a92-imagenet/last.npz --image-size 320
  python -m train.imagenet --data-dir /data/imagenet --limit-train 2560 --limit-test 500 --epochs 1
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m train.imagenet",
        description="Train the paper's ImageNet Residual Attention Network (Attention-56 or -92, as the "
                    "official prototxts lay them out) on an ImageNet-style folder, or evaluate a checkpoint. "
                    "The defaults are the paper's recipe.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=list(IMAGENET_MODELS), default="attention56",
                       help="network: attention56 has 1, 1, 1 attention modules in its three stages, attention92 "
                            "1, 2, 3 (default: %(default)s)")
    run.add_attention_options(model)

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=nonempty_path, default=DEFAULT_DATA_DIR, metavar="DIR",
                      help="the folder holding train/<class>/*.JPEG and val/<class>/*.JPEG (.jpg, .jpeg and .png "
                           "too), the same class folders in both (default: %(default)s)")
    data.add_argument("--image-size", type=_image_size, default=224, metavar="S",
                      help="the side of the crops the network sees, a multiple of 32; evaluation resizes the "
                           "shorter side to S x 256/224 first (default: %(default)s, or with --eval-only the "
                           "size the checkpoint was trained at; the paper also tests Attention-92 at 320)")
    data.add_argument("--workers", type=positive_int, metavar="N",
                      help="threads that decode and crop JPEGs (default: one per core, at most 16)")
    data.add_argument("--limit-train", type=positive_int, metavar="N",
                      help="train on N training images only, a fixed random sample across the classes (quick runs)")
    data.add_argument("--limit-test", type=positive_int, metavar="N",
                      help="evaluate on N validation images only, a fixed random sample (quick runs)")
    run.add_training_options(
        parser, TASK, batch_size=256,
        epochs_help="epochs to train (default: as many as make the paper's 530k iterations, 106 for ImageNet's "
                    "1,281,167 images at batch 256)",
        paper_schedule_help="--lr divided by 10 at 200k, 400k and 500k of the paper's 530k iterations (scaled "
                            "to --epochs)",
        out_default="runs/imagenet-<model>")
    return parser


#: main(argv=None, after_step=None): parse ``argv`` (default sys.argv[1:]), train or evaluate; returns
#: the exit code. ``after_step``: see :meth:`train.run.Run.train`.
main = functools.partial(run.main, TASK)


if __name__ == "__main__":
    sys.exit(main())
