"""Train a Residual Attention Network on CIFAR-10/100, or evaluate a checkpoint.

    python -m train.cifar [options]             # also installed as ra-train
    python -m train.cifar --eval-only runs/attention56-cifar10/last.npz

Defaults are the paper's recipe: SGD with Nesterov momentum 0.9, weight decay
1e-4, batch 64, learning rate 0.1 divided by 10 at 64k and 96k of 160k
iterations (40% and 60% of the run when ``--epochs`` is given), pad-4 random
crops and horizontal flips. Each epoch ends with an evaluation on the test set.

Files in ``--out DIR``:

* ``metrics.csv``: one row per epoch, columns :data:`METRICS_COLUMNS`: the
  epoch (1-based), iterations done, training loss and accuracy (over the
  epoch's batches, as trained), test loss and accuracy, the learning rate of
  the epoch's last step, wall-clock seconds of the run so far (training and
  evaluation, summed over resumed sessions), and training images per second
  over the epoch.
* ``curves.png``: losses, accuracies and the learning rate per epoch.
* ``last.npz``: a checkpoint at each epoch end and where Ctrl-C stopped.
* ``best.npz``: the checkpoint of the epoch with the highest test accuracy. It
  is chosen on the test set, so its accuracy is optimistic: the number to
  report is the last epoch's test accuracy.

A checkpoint (train/checkpoint.py: weights, optimizer state, the training
totals of the epoch in progress) carries a JSON ``meta`` record: format,
version, kind and model (ra_kernels/npzfile.py), then args, num_classes,
batches_per_epoch, the position (epoch and batch of the next step, iteration),
seconds, the epoch's training images and seconds so far, history (the metrics
rows) and best. Every random
draw of a run (initial weights, label noise, the order and augmentation of each
batch) is a function of ``--seed`` and the position, so the seed and the
position are its whole random state, and ``--resume`` repeats exactly what an
uninterrupted run would have done (bit for bit on the numpy backend).

Loss and accuracy stay on the device during training: each step adds its loss
and correct predictions into a small device array, read once per
``--log-every`` steps (docs/design.md §6); that read also guards against
divergence. On cuda each training and evaluation step is one CUDA graph after
two eager warm-up steps (ra_kernels/steps.py; ``--no-cuda-graph`` turns that off).
``--precision bf16`` stores the activations as bfloat16, with float32 parameters, statistics,
loss and SGD (docs/design.md §8); a resumed run keeps its precision.

Exit codes: 0 done; 1 the loss became NaN or Inf; 2 bad usage, or data or a
checkpoint that cannot be read; 130 stopped by Ctrl-C.
"""
import argparse
import csv
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ra_kernels import backend
from ra_kernels.data import DATASETS, BatchLoader, corrupt_labels
from ra_kernels.metrics import TOTALS
from ra_kernels.models import ATTENTIONS, MODELS
from ra_kernels.optim import PAPER_ITERATIONS, SCHEDULES, SGD
from ra_kernels.steps import EvalStep, TrainStep
from ra_kernels import npzfile
from train.checkpoint import data_of, model_from_checkpoint, read_checkpoint, write_checkpoint
from train.common import (BACKEND_HELP, DEFAULT_DATA_DIR, PRECISION_HELP, UsageError, epoch_batches, load_dataset,
                          prepare_output_dir, select_backend, select_precision)

METRICS_COLUMNS = ("epoch", "iteration", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                   "lr", "seconds", "images_per_second")
# Options a resumed run may change (besides --out and --resume): where the data is and how the
# run is watched, nothing that changes what it computes (the backend changes only rounding).
RESUME_MAY_CHANGE = ("data_dir", "no_download", "backend", "log_every", "no_cuda_graph")

# The options --eval-only takes: everything else describes a run to train.
EVAL_ONLY_OPTIONS = ("eval_only", "data_dir", "no_download", "dataset", "limit_test", "batch_size", "backend",
                     "precision", "no_cuda_graph")

EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Diverged(Exception):
    """The loss became NaN or Inf."""


# --------------------------------------------------------------------------- command line

def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


EPILOG = """\
outputs in --out DIR:
  metrics.csv  one row per epoch: epoch, iteration, train_loss, train_accuracy, test_loss,
               test_accuracy, lr, seconds (of the run so far), images_per_second (training)
  curves.png   loss, accuracy and learning rate per epoch
  last.npz     checkpoint at every epoch end and where Ctrl-C stopped (--resume continues it)
  best.npz     checkpoint of the epoch with the best test accuracy, for convenience: it is
               picked on the test set, so its accuracy is optimistic. The accuracy to report
               is the LAST epoch's, which the run prints at the end.

Ctrl-C stops after the current step, writes last.npz and exits with code 130; run the same
command with --resume to continue exactly where it stopped. A NaN or Inf loss (checked
every --log-every steps and at each epoch end) stops the run with code 1 and leaves the
last good checkpoint in place. Bad options, unreadable data or checkpoints: code 2.

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
    model.add_argument("--stem", type=_positive_int, default=16, metavar="C",
                       help="channels of the first convolution (default: %(default)s, the paper's)")
    model.add_argument("--widths", type=_positive_int, nargs=3, default=[64, 128, 256], metavar="C",
                       help="channels of the three stages (default: 64 128 256, the paper's); narrower "
                            "networks make quick runs")
    model.add_argument("--attention", choices=ATTENTIONS, default="mixed",
                       help="mask activation: mixed (sigmoid), channel (L2 norm over channels) or spatial "
                            "(sigmoid of standardised maps), the paper's ablation (default: %(default)s)")
    model.add_argument("--naive-attention", action="store_true",
                       help="output M * T (the paper's naive attention learning) instead of (1 + M) * T "
                            "(attention residual learning)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="cifar10",
                      help="CIFAR-10 (10 classes) or CIFAR-100 (100 fine classes); 50,000 training and 10,000 "
                           "test images each (default: %(default)s)")
    data.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                      help="directory holding the dataset in its official Python format (the extracted "
                           "cifar-10-batches-py/ or cifar-100-python/, or that folder itself); missing files are "
                           "downloaded there, MD5-checked (default: %(default)s)")
    data.add_argument("--no-download", action="store_true",
                      help="fail instead of downloading when the dataset is not in --data-dir")
    data.add_argument("--limit-train", type=_positive_int, metavar="N",
                      help="train on the first N training images only (quick runs)")
    data.add_argument("--limit-test", type=_positive_int, metavar="N",
                      help="evaluate on the first N test images only (quick runs)")
    data.add_argument("--noisy-labels", type=_fraction, default=0.0, metavar="FRACTION",
                      help="replace this fraction of the training labels by wrong classes, drawn from --seed "
                           "(the paper's noisy-label experiment); test labels stay clean (default: 0)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_positive_int, metavar="N",
                       help="epochs to train (default: as many as make the paper's 160k iterations, "
                            "e.g. 205 for 50,000 images at batch 64)")
    optim.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                       help="images per step, training and evaluation (default: %(default)s, the paper's); "
                            "training drops the last incomplete batch of an epoch")
    optim.add_argument("--lr", type=_non_negative_float, default=0.1, metavar="LR",
                       help="initial learning rate (default: %(default)s)")
    optim.add_argument("--schedule", choices=list(SCHEDULES), default="paper",
                       help="paper: --lr divided by 10 at 40%% and 60%% of the run (the paper's 64k and 96k of "
                            "160k iterations, scaled to --epochs); cosine: cosine decay from --lr to 0 "
                            "(default: %(default)s)")
    optim.add_argument("--momentum", type=_non_negative_float, default=0.9, metavar="M",
                       help="SGD momentum (default: %(default)s)")
    optim.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                       help="Nesterov momentum (default: on)")
    optim.add_argument("--weight-decay", type=_non_negative_float, default=1e-4, metavar="WD",
                       help="L2 penalty added to the gradients (default: %(default)s)")
    optim.add_argument("--seed", type=_non_negative_int, default=0, metavar="S",
                       help="seeds the initial weights, label noise, data order and augmentation; the same "
                            "seed on the same backend repeats a run (default: %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--backend", choices=("auto",) + backend.BACKENDS, default="auto", help=BACKEND_HELP)
    run.add_argument("--precision", choices=backend.PRECISIONS, default="tf32", help=PRECISION_HELP)
    run.add_argument("--no-cuda-graph", action="store_true",
                     help="on cuda, launch every kernel of every step from Python; by default each training "
                          "and evaluation step is captured as one CUDA graph after two eager steps and replayed "
                          "(the same kernels in the same order: the same results, without the host's launch "
                          "cost). Other backends are always eager")
    run.add_argument("--out", metavar="DIR",
                     help="directory for metrics.csv, curves.png, last.npz and best.npz "
                          "(default: runs/<model>-<dataset>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last.npz, exactly where it stopped; it keeps "
                          "its settings (only --data-dir, --no-download, --backend, --log-every and "
                          "--no-cuda-graph may change)")
    run.add_argument("--eval-only", metavar="CHECKPOINT",
                     help="print the test accuracy and loss of CHECKPOINT (a last.npz or best.npz, or weights "
                          "written by Module.save) and exit, on any backend; only --data-dir, --dataset, "
                          "--no-download, --limit-test, --batch-size, --backend and --no-cuda-graph may be "
                          "given with it")
    run.add_argument("--log-every", type=_positive_int, default=50, metavar="N",
                     help="read the training loss and accuracy back from the device every N steps, for the "
                          "progress bar and the divergence check (default: %(default)s)")
    return parser


def _explicit_options(argv):
    """The destinations of the options given on the command line, with their values."""
    parser, unset = build_parser(), object()
    # argparse fills in a default only where the namespace has no value yet.
    given = parser.parse_args(argv, argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))}))
    return {dest: value for dest, value in vars(given).items() if value is not unset}


def _flag(dest):
    """The command-line option of an argparse destination: "data_dir" -> "--data-dir"."""
    return "--" + dest.replace("_", "-")


def _as_json(value):
    return json.loads(json.dumps(value))


def _resumed_args(args, explicit, saved):
    """The checkpoint's arguments, with those of RESUME_MAY_CHANGE given on the command line
    (``explicit``) taken from there, and --out and --resume."""
    may_change = RESUME_MAY_CHANGE + ("out", "resume")
    # A checkpoint from before an option existed ran at that option's default (--precision tf32).
    saved = {**_as_json(vars(build_parser().parse_args([]))), **saved}
    conflicts = [f"{_flag(dest)} {_as_json(value)!r} (the run has {saved.get(dest)!r})"
                 for dest, value in explicit.items()
                 if dest not in may_change and _as_json(value) != saved.get(dest)]
    if conflicts:
        raise UsageError("a resumed run keeps the settings it started with; these differ: " + "; ".join(conflicts)
                         + ". Only " + ", ".join(map(_flag, RESUME_MAY_CHANGE))
                         + " may change (start a new run in another --out to change the rest)")
    resumed = argparse.Namespace(**dict(saved, out=args.out, resume=True))
    for dest in RESUME_MAY_CHANGE:
        if dest in explicit:
            setattr(resumed, dest, explicit[dest])
    return resumed


# --------------------------------------------------------------------------- checkpoints

# --------------------------------------------------------------------------- pieces of a run

def build_model(args, num_classes):
    return MODELS[args.model](num_classes=num_classes, stem=args.stem, widths=tuple(args.widths),
                              attention=args.attention, residual_attention=not args.naive_attention,
                              seed=args.seed)


def describe_position(position, batches_per_epoch):
    """Where a run stands, in words: "end of epoch 3" or "epoch 4, after batch 120 of 781"."""
    if position["batch"] == 0:
        return f"end of epoch {position['epoch']}"
    return f"epoch {position['epoch'] + 1}, after batch {position['batch']} of {batches_per_epoch}"


def new_totals():
    """A zeroed metrics accumulator on the current backend (see ra_kernels.metrics)."""
    return backend.xp().zeros(len(TOTALS), dtype=np.float32)


def mean_metrics(totals):
    """(mean loss, accuracy) from a totals array: one read from the device."""
    loss_sum, correct, count = (float(v) for v in backend.to_numpy(totals))
    return loss_sum / count, correct / count


def evaluate(step, loader, stop=None):
    """(mean loss, accuracy) over ``loader`` by ``step``, an EvalStep whose totals are zeroed first and
    read once at the end; None when ``stop.requested`` turned true on the way."""
    step.totals.fill(0)
    with epoch_batches(loader, 0) as batches:
        for x, y in tqdm(batches, total=len(loader), desc="test", unit="batch", leave=False, dynamic_ncols=True):
            step(x, y)
            if stop is not None and stop.requested:
                return None
    return mean_metrics(step.totals)


def format_duration(seconds):
    """A duration in words at a useful precision: "45 s", "12 min", "3.4 h", "6.2 days"."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if unit in ("days", "h") else f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


class StopOnInterrupt:
    """Inside the block, Ctrl-C (SIGINT) sets ``requested`` instead of raising, so that the loop
    stops between steps, where model and optimizer are whole and can be saved; a second Ctrl-C
    raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step to write a checkpoint (Ctrl-C again quits at once, "
                   "without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def write_metrics_csv(history, path):
    with npzfile.atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history, path):
    """curves.png: loss and accuracy (training and test) and the learning rate, per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for split in ("train", "test"):
        loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], marker=".", label=split)
        acc_ax.plot(epochs, [100 * row[f"{split}_accuracy"] for row in history], marker=".", label=split)
    lr_ax.plot(epochs, [row["lr"] for row in history], marker=".")
    lr_ax.set_yscale("log")
    for ax, title in ((loss_ax, "cross-entropy loss"), (acc_ax, "accuracy (%)"), (lr_ax, "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.legend()
    fig.tight_layout()
    with npzfile.atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the run

class Run:
    """One training run: data, model, optimizer, schedule, position, and the files in ``out``.

    Position: the next step is batch ``batch`` of epoch ``epoch`` (0-based), after
    ``iteration`` steps in all; ``batch == batches_per_epoch`` means the epoch's
    training is done and its evaluation is not.
    """

    def __init__(self, args, checkpoint=None):
        self.args, self.out = args, Path(args.out)
        self.backend = select_backend(args.backend)
        select_precision(args.precision)
        data = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
        self.num_classes = len(data.class_names)
        train_images, train_labels = data.train_images[:args.limit_train], data.train_labels[:args.limit_train]
        test_images, test_labels = data.test_images[:args.limit_test], data.test_labels[:args.limit_test]
        if args.noisy_labels:
            train_labels = corrupt_labels(train_labels, args.noisy_labels, self.num_classes, args.seed)
        if len(train_labels) < args.batch_size:
            raise UsageError(f"{len(train_labels)} training images make no full batch of {args.batch_size}: "
                             f"lower --batch-size or raise --limit-train")
        self.train_loader = BatchLoader(train_images, train_labels, args.batch_size, data.mean, data.std,
                                        train=True, seed=args.seed)
        self.test_loader = BatchLoader(test_images, test_labels, args.batch_size, data.mean, data.std,
                                       train=False, seed=args.seed)
        self.batches_per_epoch = len(self.train_loader)
        if args.epochs is None:  # fixed now, so that the checkpoint (and a resumed run) has the number
            args.epochs = math.ceil(PAPER_ITERATIONS / self.batches_per_epoch)
        self.schedule = SCHEDULES[args.schedule](args.lr, args.epochs * self.batches_per_epoch)
        self.model = build_model(args, self.num_classes)
        self.optimizer = SGD(self.model.parameters(), args.lr, args.momentum, args.weight_decay, args.nesterov)
        self.lr = None  # the value last written into the optimizer
        self.train_totals = new_totals()
        capture = False if args.no_cuda_graph else None  # None: captured on cuda
        self.train_step = TrainStep(self.model, self.optimizer, self.train_totals, capture)
        self.eval_step = EvalStep(self.model, new_totals(), capture)
        self.position = dict(epoch=0, batch=0, iteration=0, seconds=0.0, epoch_images=0,
                             epoch_train_seconds=0.0)
        self.history, self.best = [], None
        self.last_good = "none yet: it diverged before the first checkpoint"
        # The run's length is estimated at the first reading of the metrics; on a GPU that interval
        # includes compiling the kernels, so the second reading estimates it again.
        self._estimates_left = 2 if self.backend == "cuda" else 1
        if checkpoint is not None:
            self._restore(checkpoint)
        self._session_start, self._seconds_before = time.perf_counter(), self.position["seconds"]

    def _restore(self, checkpoint):
        meta = checkpoint.meta
        if meta["batches_per_epoch"] != self.batches_per_epoch:
            raise UsageError(f"the training set changed since the checkpoint: {self.batches_per_epoch} batches "
                             f"per epoch now, {meta['batches_per_epoch']} then (same --data-dir contents?)")
        self.model.load_state_dict(checkpoint.model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.train_totals[...] = backend.asarray(checkpoint.train_totals)
        self.position = {key: meta[key] for key in self.position}
        self.history, self.best = meta["history"], meta["best"]
        self.last_good = self._checkpoint_description()
        self._repair_best()
        for name in ("last.npz", "best.npz", "metrics.csv", "curves.png"):  # left by a kill mid-write
            (self.out / (name + ".tmp")).unlink(missing_ok=True)

    def _best_file_record(self):
        """The ``best`` record of best.npz itself (the epoch whose end it holds), or None when there is
        no readable best.npz. Only the meta record is read: the arrays are CRC-checked when loaded."""
        try:
            return read_checkpoint(self.out / "best.npz", meta_only=True).meta["best"]
        except UsageError:
            return None

    def _repair_best(self):
        """Make best.npz hold the epoch the checkpoint names best. Epoch ends write last.npz, then copy
        it to best.npz when the epoch is the best so far, so the one file a crash can leave behind is
        a best.npz older than last.npz's record, and then last.npz itself is the best checkpoint."""
        if self.best is None or self._best_file_record() == self.best:
            return
        if (self.position["epoch"], self.position["batch"]) != (self.best["epoch"], 0):
            print(f"warning: {self.out / 'best.npz'} does not hold epoch {self.best['epoch']}, the best so far, and "
                  f"cannot be rebuilt (was it removed or replaced?); it is written again when an epoch does better",
                  file=sys.stderr)
            return
        npzfile.copy(self.out / "last.npz", self.out / "best.npz")
        print(f"repaired {self.out / 'best.npz'}: an interrupted epoch end had left it out of date; it holds "
              f"epoch {self.best['epoch']} again")

    # ----------------------------------------------------------------- helpers

    def _seconds(self):
        return self._seconds_before + time.perf_counter() - self._session_start

    def _checkpoint_description(self):
        where = describe_position(self.position, self.batches_per_epoch)
        return f"{self.out / 'last.npz'} ({where}, iteration {self.position['iteration']})"

    def _checked_train_metrics(self):
        """Read the epoch's training metrics (one device read); Diverged if the loss is not finite."""
        loss, accuracy = mean_metrics(self.train_totals)
        if not math.isfinite(loss):
            p = self.position
            raise Diverged(f"the training loss became {loss} in epoch {p['epoch'] + 1}, by iteration "
                           f"{p['iteration']} (learning rate {self.schedule(max(p['iteration'] - 1, 0)):g})")
        return loss, accuracy

    def save(self):
        self.position["seconds"] = self._seconds()
        meta = dict(self.position, args=vars(self.args), num_classes=self.num_classes,
                    batches_per_epoch=self.batches_per_epoch, history=self.history, best=self.best)
        write_checkpoint(self.out / "last.npz", self.model, self.optimizer, self.train_totals, meta)
        self.last_good = self._checkpoint_description()

    # ----------------------------------------------------------------- training

    def train(self, after_step=None) -> int:
        """Train to the last epoch; returns the exit code. ``after_step(run)`` is called after
        every step (for tools and tests: they may inspect the run, or interrupt it)."""
        self.out.mkdir(parents=True, exist_ok=True)
        print(f"{self.args.model} ({self.optimizer.flat_params.size:,} parameters) on {self.args.dataset}: "
              f"{self.batches_per_epoch} steps per epoch, {self.args.epochs} epochs, backend {self.backend}, "
              f"output in {self.out}")
        if self.position["iteration"] > 0:
            print(f"resuming from {self.last_good}")
        try:
            # NumPy's floating-point warnings are silenced: a diverging run would print them at
            # every op, while the loss check reports the divergence once, clearly.
            with StopOnInterrupt() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                while self.position["epoch"] < self.args.epochs:
                    if self.position["batch"] < self.batches_per_epoch and not self._train_epoch(stop, after_step):
                        return self._interrupted()
                    test = evaluate(self.eval_step, self.test_loader, stop)
                    if test is None:
                        return self._interrupted()
                    self._end_epoch(*test)
        except Diverged as error:
            print(f"ra-train: training diverged: {error}. The parameters are no longer usable and were not "
                  f"saved; the last good checkpoint is {self.last_good}. Try a lower --lr.", file=sys.stderr)
            return EXIT_DIVERGED
        self._report()
        return 0

    def _train_epoch(self, stop, after_step):
        """Run the epoch's remaining steps; False when Ctrl-C stopped it."""
        p, args = self.position, self.args
        if p["batch"] == 0:
            self.train_totals.fill(0)
            p["epoch_images"], p["epoch_train_seconds"] = 0, 0.0
        bar = tqdm(total=self.batches_per_epoch, initial=p["batch"], desc=f"epoch {p['epoch'] + 1}/{args.epochs}",
                   unit="batch", dynamic_ncols=True)
        started = interval_start = time.perf_counter()
        interval_images = 0
        try:
            with epoch_batches(self.train_loader, p["epoch"], p["batch"]) as batches:
                for x, y in batches:
                    self._step(x, y)
                    p["batch"] += 1
                    p["iteration"] += 1
                    p["epoch_images"] += x.shape[0]
                    interval_images += x.shape[0]
                    bar.update()
                    if after_step is not None:
                        after_step(self)
                    if p["batch"] % args.log_every == 0 or p["batch"] == self.batches_per_epoch or stop.requested:
                        loss, accuracy = self._checked_train_metrics()  # waits for the device
                        now = time.perf_counter()
                        images_per_second = interval_images / (now - interval_start)
                        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.1%}", lr=f"{self.lr:.3g}",
                                        img_s=f"{images_per_second:.1f}")
                        if self._estimates_left:
                            tqdm.write(self._estimate(images_per_second))
                            self._estimates_left -= 1
                        interval_start, interval_images = now, 0
                    if stop.requested:
                        return False
        finally:
            bar.close()
            p["epoch_train_seconds"] += time.perf_counter() - started
        return True

    def _estimate(self, images_per_second):
        """The run's remaining length at ``images_per_second``, in words (training steps only)."""
        steps_left = self.args.epochs * self.batches_per_epoch - self.position["iteration"]
        epoch = self.batches_per_epoch * self.args.batch_size / images_per_second
        return (f"at {images_per_second:.1f} images/s an epoch trains in about {format_duration(epoch)}; the "
                f"{steps_left:,} steps left take about "
                f"{format_duration(steps_left * self.args.batch_size / images_per_second)}, plus the evaluations"
                + (" (this first interval includes compiling the kernels: estimated again at the next reading)"
                   if self._estimates_left == 2 else ""))

    def _step(self, x, y):
        """One SGD step on the batch (x, y); its loss and correct predictions go into train_totals."""
        lr = self.schedule(self.position["iteration"])
        if lr != self.lr:
            self.optimizer.set_lr(lr)
            self.lr = lr
        self.train_step(x, y)

    def _end_epoch(self, test_loss, test_accuracy):
        p = self.position
        train_loss, train_accuracy = self._checked_train_metrics()
        if not math.isfinite(test_loss):
            raise Diverged(f"the test loss became {test_loss} after epoch {p['epoch'] + 1}")
        row = dict(epoch=p["epoch"] + 1, iteration=p["iteration"], train_loss=train_loss,
                   train_accuracy=train_accuracy, test_loss=test_loss, test_accuracy=test_accuracy,
                   lr=self.schedule(p["iteration"] - 1), seconds=round(self._seconds(), 3),
                   images_per_second=p["epoch_images"] / max(p["epoch_train_seconds"], 1e-9))
        self.history.append(row)
        improved = self.best is None or test_accuracy > self.best["test_accuracy"]
        if improved:
            self.best = dict(epoch=row["epoch"], test_accuracy=test_accuracy, test_loss=test_loss)
        p["epoch"], p["batch"] = p["epoch"] + 1, 0
        self.save()
        if improved:  # after last.npz, which names this epoch best: a crash between the two is repaired on resume
            npzfile.copy(self.out / "last.npz", self.out / "best.npz")
        write_metrics_csv(self.history, self.out / "metrics.csv")
        try:
            plot_curves(self.history, self.out / "curves.png")
        except ImportError:
            tqdm.write("matplotlib is not installed: curves.png not written (pip install matplotlib)")
        tqdm.write(f"epoch {row['epoch']}/{self.args.epochs}: train loss {train_loss:.4f} acc {train_accuracy:.2%}"
                   f" | test loss {test_loss:.4f} acc {test_accuracy:.2%} | lr {row['lr']:.3g} | "
                   f"{row['images_per_second']:.1f} img/s")

    def _interrupted(self):
        if self.position["batch"] > 0:  # steps were taken this epoch: a diverged state is not worth saving
            self._checked_train_metrics()
        self.save()
        print(f"ra-train: interrupted; checkpoint written to {self.last_good}. Continue with:\n"
              f"  python -m train.cifar --out {self.out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED

    def _report(self):
        if not self.history:
            return
        last = self.history[-1]
        print(f"final test accuracy (last epoch, {last['epoch']}): {last['test_accuracy']:.2%}, "
              f"test loss {last['test_loss']:.4f}")
        best = self._best_file_record()  # what the file holds, whatever happened to the run
        if best is None:
            print("best.npz is missing or unreadable", file=sys.stderr)
            return
        print(f"best.npz holds epoch {best['epoch']} (test accuracy {best['test_accuracy']:.2%}); it was "
              f"picked on the test set, so report the last epoch's accuracy, not that one")


# --------------------------------------------------------------------------- entry points

def describe_checkpoint(checkpoint):
    """What a file holds, in words: where its run stood, or that it is weights only."""
    meta = checkpoint.meta
    if not checkpoint.is_training:
        return f"weights of a ResidualAttentionNet ({meta['model']['config']['attention']} attention)"
    saved = meta["args"]
    return (f"{saved['model']} on {saved['dataset']}, {describe_position(meta, meta['batches_per_epoch'])} of a "
            f"{saved['epochs']}-epoch run (iteration {meta['iteration']})")


def evaluate_checkpoint(args, explicit) -> int:
    """--eval-only: the test accuracy and loss of a checkpoint or weights file, on the current backend."""
    path = Path(args.eval_only)
    checkpoint = read_checkpoint(path)
    select_backend(args.backend)
    select_precision(args.precision)
    model = model_from_checkpoint(checkpoint, path)
    dataset, data_dir = data_of(checkpoint, *(getattr(args, dest) if dest in explicit else None
                                               for dest in ("dataset", "data_dir")))
    data = load_dataset(dataset, data_dir, download=not args.no_download)
    if len(data.class_names) != model.config["num_classes"]:
        raise UsageError(f"{path} classifies {model.config['num_classes']} classes, {dataset} has "
                         f"{len(data.class_names)}: choose the matching --dataset")
    images, labels = data.test_images[:args.limit_test], data.test_labels[:args.limit_test]
    loader = BatchLoader(images, labels, args.batch_size, data.mean, data.std, train=False, seed=0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loss, accuracy = evaluate(EvalStep(model, new_totals(), False if args.no_cuda_graph else None), loader)
    print(f"{path}: {describe_checkpoint(checkpoint)}")
    print(f"test accuracy {accuracy:.2%}  test loss {loss:.4f}  ({len(labels)} images of {dataset}, backend "
          f"{backend.get_backend()}, precision {backend.get_precision()})")
    return 0


def main(argv=None, after_step=None) -> int:
    """Parse ``argv`` (default sys.argv[1:]), train or evaluate; returns the exit code.

    ``after_step``: see :meth:`Run.train`.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nesterov and args.momentum == 0:
        parser.error("Nesterov momentum needs --momentum > 0; add --no-nesterov for plain SGD")
    explicit = _explicit_options(argv)
    try:
        if args.eval_only is not None:
            ignored = [_flag(dest) for dest in explicit if dest not in EVAL_ONLY_OPTIONS]
            if ignored:
                raise UsageError(f"--eval-only takes the network from the checkpoint and evaluates it; "
                                 f"{', '.join(ignored)} cannot be given with it (only "
                                 f"{', '.join(map(_flag, EVAL_ONLY_OPTIONS[1:]))})")
            return evaluate_checkpoint(args, explicit)
        args.out = args.out or str(Path("runs") / f"{args.model}-{args.dataset}")
        last = Path(args.out) / "last.npz"
        checkpoint = None
        if args.resume:
            if not last.exists():
                raise UsageError(f"--resume: {last} does not exist, so there is nothing to resume")
            checkpoint = read_checkpoint(last)
            if not checkpoint.is_training:
                raise UsageError(f"--resume: {last} holds weights only, not a training checkpoint")
            args = _resumed_args(args, explicit, checkpoint.meta["args"])
        elif last.exists():
            raise UsageError(f"{args.out} already holds a run ({last}): add --resume to continue it, or "
                             f"choose another --out")
        prepare_output_dir(args.out)
        return Run(args, checkpoint).train(after_step)
    except UsageError as error:
        print(f"ra-train: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ra-train: stopped by Ctrl-C where no checkpoint could be written; nothing was saved since the "
              "last one", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
