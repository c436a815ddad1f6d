"""Train a Residual Attention Network on CIFAR-10/100, or evaluate a checkpoint.

    python -m train.cifar [options]             # also installed as ra-train
    python -m train.cifar --eval-only runs/attention56-cifar10/last.npz

Defaults are the paper's recipe: SGD with Nesterov momentum 0.9, weight decay
1e-4, batch 64, learning rate 0.1 divided by 10 at 64k and 96k of 160k
iterations (40% and 60% of the run when ``--epochs`` is given), pad-4 random
crops and horizontal flips. Each epoch ends with an evaluation on the test set.

Files in ``--out DIR``:

* ``metrics.csv``: one row per epoch, columns :data:`train.run.METRICS_COLUMNS`: the
  epoch (1-based), iterations done, training loss, accuracy and top-5 accuracy
  (over the epoch's batches, as trained), the same three on the test set, the
  learning rate of the epoch's last step, wall-clock seconds of the run so far
  (training and evaluation, summed over resumed sessions), and training images
  per second over the epoch.
* ``curves.png``: losses, accuracies and the learning rate per epoch.
* ``last.npz``: a checkpoint at each epoch end and where Ctrl-C stopped.
* ``best.npz``: the checkpoint of the epoch with the highest test accuracy. It
  is chosen on the test set, so its accuracy is optimistic: the number to
  report is the last epoch's test accuracy.

The loop, the files and the resume are train/run.py's, shared with train.imagenet. A checkpoint
(train/checkpoint.py: weights, optimizer state, the training totals of the epoch in progress)
carries a JSON ``meta`` record: format, version, kind and model (ra_kernels/npzfile.py), then args,
num_classes, class_names (a resume on other classes is refused), module (the command that trains it,
named in the resume hint), world_size (the processes of the run: a resume needs as many),
batches_per_epoch, the position (epoch and batch of the next step, iteration), seconds, the epoch's
training images and seconds so far, history (the metrics rows), best, and normalization (the
per-channel mean and std the inputs were normalised by: a resume, --eval-only and train.masks use
these, not the statistics of whatever training images --data-dir holds then) and data_checksum (a
CRC-32 of the training images and labels: a resume on other data is refused). Every random draw of a
run (initial weights, label noise, the order and augmentation of each batch) is a function of
``--seed`` and the position, so the seed and the position are its whole random state, and
``--resume`` repeats exactly what an uninterrupted run would have done (bit for bit on the numpy
backend).

Loss and accuracy stay on the device during training: each step adds its loss
and correct predictions into a small device array, read once per
``--log-every`` steps (docs/design.md §6); that read also guards against
divergence. On cuda each training and evaluation step is one CUDA graph after
two eager warm-up steps (ra_kernels/steps.py; ``--no-cuda-graph`` turns that off).
``--precision bf16`` stores the activations as bfloat16, with float32 parameters, statistics,
loss and SGD (docs/design.md §8); a resumed run keeps its precision.

Exit codes: 0 done; 1 the loss became NaN or Inf; 2 bad usage, or data or a
checkpoint that cannot be read; 3 (under mpirun) a rank failed or hung; 130 stopped by
Ctrl-C or SIGTERM. ``mpirun -n N`` trains with N processes (train/run.py, docs/design.md §10).
"""
import argparse
import functools
import math
import sys
from pathlib import Path

from ra_kernels import distributed
from ra_kernels.data import DATASETS, BatchLoader, corrupt_labels
from ra_kernels.models import MIN_STAGE_WIDTH, MODELS, ResidualAttentionNet
from ra_kernels.optim import PAPER_ITERATIONS, SCHEDULES
from train import run
from train.checkpoint import data_of, model_from_checkpoint, normalization
from train.common import (DEFAULT_DATA_DIR, UsageError, counted, fraction, load_dataset, nonempty_path,
                          positive_int)


def _stage_width(text):
    value = positive_int(text)
    if value < MIN_STAGE_WIDTH:
        raise argparse.ArgumentTypeError(f"expected at least {MIN_STAGE_WIDTH} channels (a unit's bottleneck has a "
                                         f"quarter of them), got {text}")
    return value


class Cifar(run.Task):
    name, module = "ra-train", "train.cifar"
    network = ResidualAttentionNet
    resume_may_change = ("data_dir", "no_download", "backend", "log_every", "no_cuda_graph",
                         "collective_timeout")
    eval_only_options = ("eval_only", "data_dir", "no_download", "dataset", "limit_test", "batch_size", "backend",
                         "precision", "no_cuda_graph")

    def build_parser(self):
        return build_parser()

    def default_out(self, args):
        return str(Path("runs") / f"{args.model}-{args.dataset}")

    def dataset(self, args):
        return args.dataset

    def training_data(self, args, shard):
        with distributed.world().local_first():  # under mpirun, one download per machine
            data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
        num_classes = len(data.class_names)
        train_images, train_labels = data.train_images[:args.limit_train], data.train_labels[:args.limit_train]
        test_images, test_labels = data.test_images[:args.limit_test], data.test_labels[:args.limit_test]
        if args.noisy_labels:
            train_labels = corrupt_labels(train_labels, args.noisy_labels, num_classes, args.seed)
        run.check_enough_images(len(train_labels), len(test_labels), args.batch_size, shard)
        train_loader = BatchLoader(train_images, train_labels, args.batch_size, data.mean, data.std, train=True,
                                   seed=args.seed, shard=shard)
        test_loader = BatchLoader(test_images, test_labels, args.batch_size, data.mean, data.std, train=False,
                                  seed=args.seed, shard=shard)
        return train_loader, test_loader, data.class_names

    def default_epochs(self, batches_per_epoch):
        return math.ceil(PAPER_ITERATIONS / batches_per_epoch)

    def schedule(self, args, total_iterations):
        return SCHEDULES[args.schedule](args.lr, total_iterations)

    def build_model(self, args, num_classes):
        return MODELS[args.model](num_classes=num_classes, stem=args.stem, widths=tuple(args.widths),
                                  attention=args.attention, residual_attention=not args.naive_attention,
                                  seed=args.seed)

    def evaluation(self, args, explicit, checkpoint, path):
        model = model_from_checkpoint(checkpoint, path, self.network)
        dataset, data_dir = data_of(checkpoint, *(getattr(args, dest) if dest in explicit else None
                                                   for dest in ("dataset", "data_dir")))
        data = load_dataset(dataset, data_dir, download=not args.no_download)
        if len(data.class_names) != model.config["num_classes"]:
            raise UsageError(f"{path} classifies {model.config['num_classes']} classes, {dataset} has "
                             f"{len(data.class_names)}: choose the matching --dataset")
        images, labels = data.test_images[:args.limit_test], data.test_labels[:args.limit_test]
        loader = BatchLoader(images, labels, args.batch_size, *normalization(checkpoint, data), train=False, seed=0)
        return model, loader, f"{counted(len(labels), 'image')} of {dataset}"


TASK = Cifar()


EPILOG = run.EPILOG + """\
examples:
  python -m train.cifar --model attention92 --dataset cifar10 --out runs/a92
  python -m train.cifar --out runs/a92 --resume
  python -m train.cifar --eval-only runs/a92/last.npz
  python -m train.cifar --limit-train 2048 --limit-test 512 --epochs 2 --out runs/quick
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m train.cifar",
        description="Train a Residual Attention Network (Wang et al., CVPR 2017) on CIFAR-10 or CIFAR-100, "
                    "or evaluate a checkpoint. The defaults are the paper's recipe.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=list(MODELS), default="attention56",
                       help="network: attention56, 92, 128, 164, 236 have 1, 2, 3, 4, 6 attention modules "
                            "per stage; attention452 has 6 with p, t, r = 2, 4, 3 (default: %(default)s)")
    model.add_argument("--stem", type=positive_int, default=16, metavar="C",
                       help="channels of the first convolution (default: %(default)s, the paper's)")
    model.add_argument("--widths", type=_stage_width, nargs=3, default=[64, 128, 256], metavar="C",
                       help="channels of the three stages (default: 64 128 256, the paper's); narrower "
                            "networks make quick runs")
    run.add_attention_options(model)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="cifar10",
                      help="CIFAR-10 (10 classes) or CIFAR-100 (100 fine classes); 50,000 training and 10,000 "
                           "test images each (default: %(default)s)")
    data.add_argument("--data-dir", type=nonempty_path, default=DEFAULT_DATA_DIR, metavar="DIR",
                      help="directory holding the dataset in its official Python format (the extracted "
                           "cifar-10-batches-py/ or cifar-100-python/, or that folder itself); missing files are "
                           "downloaded there, MD5-checked (default: %(default)s)")
    data.add_argument("--no-download", action="store_true",
                      help="fail instead of downloading when the dataset is not in --data-dir")
    data.add_argument("--limit-train", type=positive_int, metavar="N",
                      help="train on the first N training images only (quick runs)")
    data.add_argument("--limit-test", type=positive_int, metavar="N",
                      help="evaluate on the first N test images only (quick runs)")
    data.add_argument("--noisy-labels", type=fraction, default=0.0, metavar="FRACTION",
                      help="replace this fraction of the training labels by wrong classes, drawn from --seed "
                           "(the paper's noisy-label experiment); test labels stay clean (default: 0)")
    run.add_training_options(
        parser, TASK, batch_size=64,
        epochs_help="epochs to train (default: as many as make the paper's 160k iterations, e.g. 205 for 50,000 "
                    "images at batch 64)",
        paper_schedule_help="--lr divided by 10 at 40%% and 60%% of the run (the paper's 64k and 96k of 160k "
                            "iterations, scaled to --epochs)",
        out_default="runs/<model>-<dataset>")
    return parser


#: main(argv=None, after_step=None): parse ``argv`` (default sys.argv[1:]), train or evaluate; returns
#: the exit code. ``after_step``: see :meth:`train.run.Run.train`.
main = functools.partial(run.main, TASK)


if __name__ == "__main__":
    sys.exit(main())
