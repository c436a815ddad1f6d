"""What the training commands share: one run's loop, its files, its resume and its entry point.

``train.cifar`` and ``train.imagenet`` each describe their task (a :class:`Task`: options, data,
network, schedule); :func:`main` parses a command line and trains, resumes or evaluates. The
files of a run, its checkpoint's record and its exit codes are the same for both (the
commands' docstrings describe them).
"""
import argparse
import contextlib
import csv
import json
import math
import signal
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ra_kernels import backend, distributed, npzfile
from ra_kernels.distributed import DataParallel
from ra_kernels.imagefolder import CorruptImageWarning
from ra_kernels.metrics import TOTALS
from ra_kernels.models import ATTENTIONS
from ra_kernels.optim import SCHEDULES, SGD, linear_scaling
from ra_kernels.steps import EvalStep, TrainStep
from train.checkpoint import normalization, read_checkpoint, write_checkpoint
from train.common import (BACKEND_HELP, PRECISION_HELP, DataError, UsageError, counted, epoch_batches,
                          non_negative_float, non_negative_int, nonempty_path, output_lock, positive_float,
                          positive_int, prepare_output_dir, select_backend, select_precision)

METRICS_COLUMNS = ("epoch", "iteration", "train_loss", "train_accuracy", "train_top5_accuracy", "test_loss",
                   "test_accuracy", "test_top5_accuracy", "lr", "seconds", "images_per_second")

EXIT_DIVERGED, EXIT_USAGE, EXIT_PEER_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130
#: What a run writes into --out besides last.npz, always after it.
RUN_FILES = ("best.npz", "metrics.csv", "curves.png")

#: Data-parallel runs: the epochs over which the learning rate ramps up to its scaled value.
WARMUP_EPOCHS = 5

#: The start of every training command's --help epilog: its files and exit codes.
EPILOG = """\
outputs in --out DIR:
  metrics.csv  one row per epoch: epoch, iteration, train_loss, train_accuracy,
               train_top5_accuracy, test_loss, test_accuracy, test_top5_accuracy, lr,
               seconds (of the run so far), images_per_second (training)
  curves.png   loss, accuracy (top-1 and top-5) and learning rate per epoch
  last.npz     checkpoint at every epoch end and where Ctrl-C stopped (--resume continues it)
  best.npz     checkpoint of the epoch with the best test accuracy, for convenience: it is
               picked on the test set, so its accuracy is optimistic. The accuracy to report
               is the LAST epoch's, which the run prints at the end.

Ctrl-C stops after the current step, writes last.npz and exits with code 130; run the same
command with --resume to continue exactly where it stopped. A NaN or Inf loss (checked
every --log-every steps and at each epoch end) stops the run with code 1 and leaves the
last good checkpoint in place. Bad options, unreadable data or checkpoints: code 2 (data that
fails in the middle of a run: last.npz is written first, and --resume continues; under mpirun
the failing rank stops every rank at once, and --resume continues from the last checkpoint).
A file of the run that cannot be written (a full disk): code 2, the files written before it
stand, and --resume continues from the last checkpoint (and rewrites metrics.csv and curves.png).
Under mpirun a rank that fails stops every rank (code 3, or its own), one that hangs too, after
--collective-timeout seconds. SIGTERM stops a run as Ctrl-C does.

"""


class Diverged(Exception):
    """The loss became NaN or Inf."""


class OutputError(Exception):
    """A file of the run could not be written (a full disk, a quota): the files written before it stand."""


class Task:
    """What a training command says about its task; :func:`main` and :class:`Run` do the rest.

    Attributes: ``name`` (the command's name in messages, "ra-train"), ``module`` ("train.cifar"),
    ``resume_may_change`` (the options a resumed run may change besides --out and --resume:
    where the data is and how the run is watched, nothing that changes what it computes) and
    ``eval_only_options`` (those --eval-only takes, itself first), ``network`` (the class of the
    networks it trains).
    """
    name = module = network = None
    resume_may_change = eval_only_options = ()

    def build_parser(self) -> argparse.ArgumentParser:
        raise NotImplementedError

    def default_out(self, args) -> str:
        """--out when not given."""
        raise NotImplementedError

    def dataset(self, args) -> str:
        """The data's name in words, for the run's first line."""
        raise NotImplementedError

    def training_data(self, args, shard):
        """(training loader, test loader, class names) for a run, the loaders of this process's
        ``shard`` = (rank, ranks) (data.EpochLoader); UsageError when the data cannot be read."""
        raise NotImplementedError

    def default_epochs(self, batches_per_epoch) -> int:
        """Epochs when --epochs is not given: the paper's iterations."""
        raise NotImplementedError

    def schedule(self, args, total_iterations):
        """iteration -> learning rate (ra_kernels.optim)."""
        raise NotImplementedError

    def build_model(self, args, num_classes):
        raise NotImplementedError

    def evaluation(self, args, explicit, checkpoint, path):
        """--eval-only: (model with the checkpoint's weights, test loader, what was evaluated in
        words) on the current backend."""
        raise NotImplementedError


# --------------------------------------------------------------------------- command line

def add_attention_options(group):
    """--attention and --naive-attention, the paper's ablation switches, into an option group."""
    group.add_argument("--attention", choices=ATTENTIONS, default="mixed",
                       help="mask activation: mixed (sigmoid), channel (L2 norm over channels) or spatial "
                            "(sigmoid of standardised maps), the paper's ablation (default: %(default)s)")
    group.add_argument("--naive-attention", action="store_true",
                       help="output M * T (the paper's naive attention learning) instead of (1 + M) * T "
                            "(attention residual learning)")


def add_training_options(parser, task, batch_size, epochs_help, paper_schedule_help, out_default):
    """The option groups every training command has: "optimisation" (the paper's SGD, at
    ``batch_size`` by default) and "run" (backend, precision, files, resume, evaluation)."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, metavar="N", help=epochs_help)
    optim.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N",
                       help="images per step, training and evaluation (default: %(default)s, the paper's); "
                            "training drops the last incomplete batch of an epoch")
    optim.add_argument("--lr", type=non_negative_float, default=0.1, metavar="LR",
                       help="initial learning rate (default: %(default)s)")
    optim.add_argument("--schedule", choices=list(SCHEDULES), default="paper",
                       help=f"paper: {paper_schedule_help}; cosine: cosine decay from --lr to 0 "
                            f"(default: %(default)s)")
    optim.add_argument("--momentum", type=non_negative_float, default=0.9, metavar="M",
                       help="SGD momentum (default: %(default)s)")
    optim.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                       help="Nesterov momentum (default: on)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=1e-4, metavar="WD",
                       help="L2 penalty added to the gradients (default: %(default)s)")
    optim.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                       help="seeds the initial weights, the data order and augmentation (and train.cifar's label "
                            "noise); the same seed on the same backend repeats a run (default: %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--backend", choices=("auto",) + backend.BACKENDS, default="auto", help=BACKEND_HELP)
    run.add_argument("--precision", choices=backend.PRECISIONS, default="tf32", help=PRECISION_HELP)
    run.add_argument("--no-cuda-graph", action="store_true",
                     help="on cuda, launch every kernel of every step from Python; by default each training "
                          "and evaluation step is captured as one CUDA graph after two eager steps and replayed "
                          "(the same kernels in the same order: the same results, without the host's launch "
                          "cost). Other backends are always eager")
    run.add_argument("--out", type=nonempty_path, metavar="DIR",
                     help=f"directory for metrics.csv, curves.png, last.npz and best.npz (default: {out_default})")
    run.add_argument("--resume", action="store_true",
                     help=f"continue the run in --out from its last.npz, exactly where it stopped; it keeps "
                          f"its settings (only {_flags(task.resume_may_change)} may change)")
    run.add_argument("--eval-only", type=nonempty_path, metavar="CHECKPOINT",
                     help=f"print the test accuracy (top-1 and top-5) and loss of CHECKPOINT (a last.npz or "
                          f"best.npz, or weights written by Module.save) and exit, on any backend; only "
                          f"{_flags(task.eval_only_options[1:])} may be given with it")
    run.add_argument("--collective-timeout", type=positive_float, default=600.0, metavar="S",
                     help="under mpirun: stop every rank when this one completes no step for S seconds (another "
                          "rank failed or hangs); longer than the slowest step, evaluation or checkpoint write "
                          "(default: %(default)s)")
    run.add_argument("--log-every", type=positive_int, default=50, metavar="N",
                     help="read the training loss and accuracy back from the device every N steps, for the "
                          "progress bar and the divergence check (default: %(default)s)")


def _flags(dests):
    """"--a, --b and --c" of argparse destinations."""
    flags = [_flag(dest) for dest in dests]
    return ", ".join(flags[:-1]) + " and " + flags[-1] if len(flags) > 1 else "".join(flags)


def _explicit_options(task, argv):
    """The destinations of the options given on the command line, with their values."""
    parser, unset = task.build_parser(), object()
    # argparse fills in a default only where the namespace has no value yet.
    given = parser.parse_args(argv, argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))}))
    return {dest: value for dest, value in vars(given).items() if value is not unset}


def _flag(dest):
    """The command-line option of an argparse destination: "data_dir" -> "--data-dir"."""
    return "--" + dest.replace("_", "-")


def _as_json(value):
    return json.loads(json.dumps(value))


def _resumed_args(task, args, explicit, saved):
    """The checkpoint's arguments, with those of ``task.resume_may_change`` given on the command line
    (``explicit``) taken from there, and --out and --resume."""
    may_change = task.resume_may_change + ("out", "resume")
    # A checkpoint from before an option existed ran at that option's default (--precision tf32).
    saved = {**_as_json(vars(task.build_parser().parse_args([]))), **saved}
    conflicts = [f"{_flag(dest)} {_as_json(value)!r} (the run has {saved.get(dest)!r})"
                 for dest, value in explicit.items()
                 if dest not in may_change and _as_json(value) != saved.get(dest)]
    if conflicts:
        raise UsageError("a resumed run keeps the settings it started with; these differ: " + "; ".join(conflicts)
                         + ". Only " + ", ".join(map(_flag, task.resume_may_change))
                         + " may change (start a new run in another --out to change the rest)")
    resumed = argparse.Namespace(**dict(saved, out=args.out, resume=True))
    for dest in task.resume_may_change:
        if dest in explicit:
            setattr(resumed, dest, explicit[dest])
    return resumed


# --------------------------------------------------------------------------- pieces of a run

def check_enough_images(count, test_count, batch_size, shard):
    """UsageError unless ``count`` training images make one global batch (ranks x ``batch_size``)
    and every rank has a test image."""
    ranks = shard[1]
    if count < batch_size * ranks:
        batch = f"{batch_size}" if ranks == 1 else f"{ranks} x {batch_size} (one --batch-size per process)"
        raise UsageError(f"{count} training images make no full batch of {batch}: lower --batch-size or raise "
                         f"--limit-train")
    if test_count < ranks:
        raise UsageError(f"{test_count} test images for {ranks} processes: each needs one (raise --limit-test)")


def _differences(ours, theirs):
    """What differs between two ranks' descriptions (Run._description, decoded), in words: each
    option as its flag, the rest by name; values as ``theirs`` against ``ours``, shortened."""
    def short(value):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    options = [f"{_flag(k)} {short(theirs['options'].get(k))} against {short(ours['options'].get(k))}"
               for k in sorted(set(ours["options"]) | set(theirs["options"]))
               if ours["options"].get(k) != theirs["options"].get(k)]
    return options + [f"{key} {short(theirs.get(key))} against {short(ours[key])}" for key in sorted(ours)
                      if key != "options" and ours[key] != theirs.get(key)]


def describe_position(position, batches_per_epoch):
    """Where a run stands, in words: "the start", "end of epoch 3", "epoch 4, after batch 120 of
    781", or "epoch 4, trained, before its evaluation"."""
    if position["batch"] == 0:
        return "the start, before any step" if position["epoch"] == 0 else f"end of epoch {position['epoch']}"
    if position["batch"] == batches_per_epoch:
        return f"epoch {position['epoch'] + 1}, trained, before its evaluation"
    return f"epoch {position['epoch'] + 1}, after batch {position['batch']} of {batches_per_epoch}"


def new_totals():
    """A zeroed metrics accumulator on the current backend (see ra_kernels.metrics)."""
    return backend.xp().zeros(len(TOTALS), dtype=np.float32)


def mean_metrics(totals, world=None):
    """(mean loss, accuracy, top-5 accuracy) from a totals array: one read from the device, summed
    over the ranks of ``world`` (a distributed.World) when given."""
    values = backend.to_numpy(totals)
    if world is not None:
        values = world.sum_host(values)
    loss_sum, correct, count, correct_top5 = (float(v) for v in values)
    return loss_sum / count, correct / count, correct_top5 / count


def evaluate(step, loader, stop=None, world=None, after_step=None):
    """(mean loss, accuracy, top-5 accuracy) over ``loader`` by ``step``, an EvalStep whose totals are
    zeroed first and read once at the end (summed over ``world``'s ranks, each of which evaluates
    its shard); None when ``stop.requested`` turned true on the way. ``after_step()`` after each
    batch. The progress bar is shown on rank 0 only."""
    step.totals.fill(0)
    quiet = world is not None and world.rank != 0
    with epoch_batches(loader, 0) as batches:
        for x, y in tqdm(batches, total=len(loader), desc="test", unit="batch", leave=False, dynamic_ncols=True,
                         disable=quiet):
            step(x, y)
            if after_step is not None:
                after_step()
            if stop is not None and stop.requested:
                return None
    return mean_metrics(step.totals, world)


def format_duration(seconds):
    """A duration in words at a useful precision: "45 s", "12 min", "3.4 h", "6.2 days"."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}" if unit in ("days", "h") else f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


class StopOnInterrupt:
    """Inside the block, Ctrl-C (SIGINT) or SIGTERM (what a batch system, or Open MPI's mpirun on
    Ctrl-C, sends before killing) sets ``requested`` instead of raising, so that the loop stops
    between steps, where model and optimizer are whole and can be saved; a second one raises
    KeyboardInterrupt at once. ``quiet``: say nothing (the ranks of a job but rank 0)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet=False):
        self.requested, self.quiet = False, quiet
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.quiet:
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step to write a checkpoint (Ctrl-C "
                       f"again quits at once, without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def write_metrics_csv(history, path):
    with npzfile.atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history, path):
    """curves.png: loss and accuracy (top-1 solid, top-5 dashed; training and test) and the learning
    rate, per epoch. Rows from before top-5 was recorded have none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for split in ("train", "test"):
        loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], marker=".", label=split)
        line, = acc_ax.plot(epochs, [100 * row[f"{split}_accuracy"] for row in history], marker=".", label=split)
        acc_ax.plot(epochs, [100 * row.get(f"{split}_top5_accuracy", math.nan) for row in history], marker=".",
                    linestyle="--", color=line.get_color(), label=f"{split} top-5")
    rates = [row["lr"] for row in history]
    lr_ax.plot(epochs, rates, marker=".")
    if any(rate > 0 for rate in rates):  # a log scale of nothing but zeros (--lr 0) makes matplotlib warn
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

    Data parallel (started by mpirun; ra_kernels/distributed.py): every rank runs this loop on its
    shard of each batch, with the gradients and running statistics averaged in each step, so
    every rank holds the same model. Decisions are taken together: the metrics are summed over
    the ranks at each reading (so a divergence is seen by all), and a Ctrl-C stops every rank
    after the same step. Only rank 0 writes files and prints. The learning rate follows the
    linear scaling rule for the global batch (ranks x --batch-size), with a warm-up of
    WARMUP_EPOCHS epochs; the number of epochs is the one-process run's.
    """

    def __init__(self, task, args, checkpoint=None):
        # Recorded absolute: --eval-only and train.masks read it from the checkpoint, from any folder.
        args.data_dir = str(Path(args.data_dir).resolve())
        self.task, self.args, self.out = task, args, Path(args.out)
        self.world = distributed.world()
        self.leader = self.world.rank == 0
        self.backend = select_backend(args.backend)
        try:
            self.world.select_device()
        except RuntimeError as error:
            raise UsageError(str(error)) from None
        select_precision(args.precision)
        self.train_loader, self.test_loader, self.class_names = task.training_data(
            args, (self.world.rank, self.world.size))
        self.num_classes = len(self.class_names)
        self.batches_per_epoch = len(self.train_loader)
        self.data_checksum = self.train_loader.checksum()
        if args.epochs is None:  # fixed now, so that the checkpoint (and a resumed run) has the number
            args.epochs = task.default_epochs(self.train_loader.count // args.batch_size)
        total = args.epochs * self.batches_per_epoch
        self.schedule = task.schedule(args, total)
        self.warmup_steps = min(total, WARMUP_EPOCHS * self.batches_per_epoch) if self.world.distributed else 0
        if self.world.distributed:
            self.schedule = linear_scaling(self.schedule, self.world.size, self.warmup_steps)
        self.model = task.build_model(args, self.num_classes)
        self.optimizer = SGD(self.model.parameters(), args.lr, args.momentum, args.weight_decay, args.nesterov)
        self.lr = None  # the value last written into the optimizer
        self._beat = None  # the watchdog's, in a data-parallel run
        self.train_totals = new_totals()
        capture = False if args.no_cuda_graph else None  # None: captured on cuda
        self.data_parallel = DataParallel(self.model, self.optimizer, self.world) if self.world.distributed else None
        self.train_step = TrainStep(self.model, self.optimizer, self.train_totals, capture,
                                    exchange=self.data_parallel and self.data_parallel.exchange)
        self.eval_step = EvalStep(self.model, new_totals(), capture)
        self.position = dict(epoch=0, batch=0, iteration=0, seconds=0.0, epoch_images=0,
                             epoch_train_seconds=0.0)
        self.history, self.best = [], None
        self.last_good = "none yet"
        self.finite_through = 0  # the iteration of the last reading of a finite training loss
        self.saved_at = None  # the iteration last.npz was last written at, by this process
        # The run's length is estimated at the first reading of the metrics; on a GPU that interval
        # includes compiling the kernels, so the second reading estimates it again.
        self._estimates_left = 2 if self.backend == "cuda" else 1
        self.resumed = checkpoint is not None
        if self.resumed:
            self._restore(checkpoint)
        differ = self.world.disagreeing(self._description())
        if differ is not None:
            rank, theirs, ours = differ
            raise UsageError(f"the ranks disagree on the run: rank {rank} has "
                             + "; ".join(_differences(json.loads(ours), json.loads(theirs))) + " (rank 0's second)")
        self._session_start, self._seconds_before = time.perf_counter(), self.position["seconds"]

    def _description(self):
        """What every rank of a job must have alike before it trains, as JSON: options (but --data-dir:
        data may be on local disks), the backend each chose, the data and where the run stands."""
        options = {k: v for k, v in vars(self.args).items() if k != "data_dir"}
        return json.dumps({"options": options, "backend": self.backend, "classes": list(self.class_names),
                           "training images and their checksum": [self.train_loader.count, self.data_checksum],
                           "test images": self.test_loader.count, "position": self.position},
                          sort_keys=True, default=str)

    def _restore(self, checkpoint):
        meta = checkpoint.meta
        ranks = meta.get("world_size", 1)
        if ranks != self.world.size:
            raise UsageError(f"the run was trained by {ranks} process{'es' if ranks > 1 else ''} and this is "
                             f"{self.world.size}: resume it as it ran ("
                             + (f"mpirun -n {ranks} python -m {self.task.module} ..." if ranks > 1
                                else f"python -m {self.task.module} ..., without mpirun") + ")")
        then = meta.get("class_names")  # checkpoints from before it was recorded have none
        if then is not None and list(then) != list(self.class_names):
            missing, extra = sorted(set(then) - set(self.class_names)), sorted(set(self.class_names) - set(then))
            raise UsageError(f"the classes changed since the checkpoint ({len(then)} then, {len(self.class_names)} "
                             f"now" + (f"; missing {', '.join(missing[:5])}" if missing else "")
                             + (f"; new {', '.join(extra[:5])}" if extra else "")
                             + "): resume on the data the run was trained on")
        if meta["batches_per_epoch"] != self.batches_per_epoch:
            raise UsageError(f"the training set changed since the checkpoint: {self.batches_per_epoch} batches "
                             f"per epoch now, {meta['batches_per_epoch']} then (same --data-dir contents?)")
        if meta.get("data_checksum", self.data_checksum) != self.data_checksum:  # none in older checkpoints
            raise UsageError("the training images changed since the checkpoint (as many batches per epoch, but "
                             "other images or labels): resume on the data the run was trained on")
        mean, std = normalization(checkpoint, self.train_loader)  # the run's, whatever --data-dir now gives
        for loader in (self.train_loader, self.test_loader):
            loader.mean, loader.std = mean, std
        self.model.load_state_dict(checkpoint.model_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        totals = checkpoint.train_totals
        if totals.ndim == 2:  # one row per rank
            totals = totals[self.world.rank]
        if totals.shape == (len(TOTALS) - 1,):  # from before top-5 was counted: unknown for this epoch
            totals = np.append(totals, np.float32(np.nan))
        self.train_totals[...] = backend.asarray(totals)
        self.position = {key: meta[key] for key in self.position}
        self.finite_through = self.position["iteration"]
        self.history, self.best = meta["history"], meta["best"]
        self.last_good = self._checkpoint_description()
        if self.leader:
            self._repair_best()
            for name in ("last.npz", *RUN_FILES):  # left by a kill mid-write
                (self.out / (name + ".tmp")).unlink(missing_ok=True)
            if self.history:  # written after last.npz at an epoch end: a crash there leaves them behind it
                self._write_history()

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
        held = self._best_file_record()
        if self.best is None or held == self.best:
            return
        if (self.position["epoch"], self.position["batch"]) != (self.best["epoch"], 0):
            print(f"warning: {self.out / 'best.npz'} does not hold epoch {self.best['epoch']}, the best so far, and "
                  f"cannot be rebuilt (was it removed or replaced?); it is written again when an epoch does better",
                  file=sys.stderr)
            return
        left = ("unwritten" if not (self.out / "best.npz").exists() else "unreadable" if held is None
                else "out of date")
        npzfile.copy(self.out / "last.npz", self.out / "best.npz")
        print(f"repaired {self.out / 'best.npz'}: an interrupted epoch end had left it {left}; it now holds epoch "
              f"{self.best['epoch']}")

    # ----------------------------------------------------------------- helpers

    def _print(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.leader:
            print(*args, **kwargs)

    def _write(self, text):
        """tqdm.write (beside a progress bar), on rank 0 only."""
        if self.leader:
            tqdm.write(text)

    def _seconds(self):
        return self._seconds_before + time.perf_counter() - self._session_start

    def _checkpoint_description(self):
        where = describe_position(self.position, self.batches_per_epoch)
        return f"{self.out / 'last.npz'} ({where}, iteration {self.position['iteration']})"

    def _checked_train_metrics(self):
        """(loss, accuracy, top-5 accuracy) of the epoch's training so far (one device read); Diverged
        if the loss is not finite."""
        loss, accuracy, top5 = mean_metrics(self.train_totals, self.world)
        p = self.position
        if not math.isfinite(loss):
            # The step that diverged is one of those since the last reading: name them and the rates of
            # the updates that made their weights (the one before the first of them included).
            first, last = min(self.finite_through + 1, p["iteration"]), p["iteration"]
            rates = [self.schedule(max(i - 1, 0)) for i in range(first - 1, last + 1)]
            rate = f"{min(rates):g}" if min(rates) == max(rates) else f"{min(rates):g} to {max(rates):g}"
            steps = f"iteration {last}" if first == last else f"one of iterations {first} to {last}"
            where = f"at {steps} (learning rate {rate})"
            raise Diverged(f"the training loss became {loss} in epoch {p['epoch'] + 1}, {where}")
        self.finite_through = p["iteration"]
        return loss, accuracy, top5

    def save(self):
        """Write last.npz, on rank 0: every rank holds the same model. The training totals of the epoch
        in progress are each rank's (of its shard): (ranks, 4) when there are several."""
        self.position["seconds"] = self._seconds()
        meta = dict(self.position, args=vars(self.args), num_classes=self.num_classes,
                    class_names=list(self.class_names), batches_per_epoch=self.batches_per_epoch,
                    world_size=self.world.size, history=self.history, best=self.best,
                    normalization=dict(mean=self.train_loader.mean.tolist(), std=self.train_loader.std.tolist()),
                    data_checksum=self.data_checksum, module=self.task.module)
        totals = self.train_totals
        if self.world.distributed:
            totals = self.world.gather_host(backend.to_numpy(totals))
        if self.leader:
            with self._writing("last.npz"):
                write_checkpoint(self.out / "last.npz", self.model, self.optimizer, totals, meta)
        self.last_good, self.saved_at = self._checkpoint_description(), self.position["iteration"]

    @contextlib.contextmanager
    def _writing(self, name):
        """The block writes the run's file ``name``: its OSError becomes an OutputError naming it."""
        try:
            yield
        except OSError as error:
            raise OutputError(f"writing {self.out / name} failed ({error})") from error

    def _write_history(self):
        """metrics.csv and curves.png from the history (rank 0)."""
        with self._writing("metrics.csv"):
            write_metrics_csv(self.history, self.out / "metrics.csv")
        try:
            with self._writing("curves.png"):
                plot_curves(self.history, self.out / "curves.png")
        except ImportError:
            tqdm.write("matplotlib is not installed: curves.png not written (pip install matplotlib)")

    # ----------------------------------------------------------------- training

    def train(self, after_step=None) -> int:
        """Train to the last epoch; returns the exit code. ``after_step(run)`` is called after
        every step (for tools and tests: they may inspect the run, or interrupt it)."""
        self.out.mkdir(parents=True, exist_ok=True)
        world = self.world
        self._print(f"{self.args.model} ({self.optimizer.flat_params.size:,} parameters) on "
                    f"{self.task.dataset(self.args)}: {counted(self.batches_per_epoch, 'step')} per epoch, "
                    f"{counted(self.args.epochs, 'epoch')}, backend {self.backend}, output in {self.out}"
                    + (f"; {world.size} processes, global batch {world.size * self.args.batch_size}, learning rate "
                       f"{self.args.lr:g} x {world.size} after a warm-up of {counted(self.warmup_steps, 'step')}"
                       if world.distributed else ""))
        if self.resumed:  # at iteration 0 too: a run stopped by its data before its first step
            self._print(f"resuming from {self.last_good}")
        watchdog = (distributed.Watchdog(world, self.args.collective_timeout, EXIT_PEER_FAILED,
                                         "a larger --collective-timeout") if world.distributed
                    else contextlib.nullcontext())
        try:
            try:
                # NumPy's floating-point warnings are silenced: a diverging run would print them at
                # every op, while the loss check reports the divergence once, clearly.
                quiet_numpy = np.errstate(over="ignore", invalid="ignore", divide="ignore")
                with StopOnInterrupt(quiet=not self.leader) as stop, quiet_numpy, watchdog:
                    self._beat = watchdog.beat if world.distributed else None
                    while self.position["epoch"] < self.args.epochs:
                        if self.position["batch"] < self.batches_per_epoch and not self._train_epoch(stop, after_step):
                            return self._interrupted()
                        # The ranks' evaluations differ by a batch: none stops in the middle of its own.
                        test = evaluate(self.eval_step, self.test_loader, None if world.distributed else stop,
                                        world, self._beat)
                        if test is None or world.any(stop.requested):
                            return self._interrupted()
                        self._end_epoch(*test)
                        # A stop asked for during the epoch end's writes: before the next epoch's first step.
                        if self.position["epoch"] < self.args.epochs and world.any(stop.requested):
                            return self._interrupted()
            except DataError as error:  # raised between steps: the model and optimizer are whole
                if world.distributed:  # on this rank alone: the others wait in a collective
                    print(f"{self.task.name}: rank {world.rank}: reading the data failed ({error}); stopping every "
                          f"rank. The last checkpoint is {self.last_good}", file=sys.stderr, flush=True)
                    world.abort(EXIT_USAGE)
                return self._interrupted(f"reading the data failed ({error}); mend it", EXIT_USAGE)
        except Diverged as error:
            self._print(f"{self.task.name}: training diverged: {error}. The parameters are no longer usable and were "
                        f"not saved; the last good checkpoint is {self.last_good}. Try a lower --lr.", file=sys.stderr)
            return EXIT_DIVERGED
        except OutputError as error:  # rank 0's alone (it writes the files): the others wait in a collective
            then = (f"The last checkpoint is {self.last_good}; make room and continue with --resume"
                    if (self.out / "last.npz").exists() else "There is no checkpoint yet: make room and start the "
                    "run again, without --resume")
            self._print(f"{self.task.name}: {error}. {then}.", file=sys.stderr, flush=True)
            if world.distributed:
                world.abort(EXIT_USAGE)
            return EXIT_USAGE
        self._report()
        return 0

    def _train_epoch(self, stop, after_step):
        """Run the epoch's remaining steps; False when Ctrl-C stopped it."""
        p, args = self.position, self.args
        if p["batch"] == 0:
            self.train_totals.fill(0)
            p["epoch_images"], p["epoch_train_seconds"] = 0, 0.0
        bar = tqdm(total=self.batches_per_epoch, initial=p["batch"], desc=f"epoch {p['epoch'] + 1}/{args.epochs}",
                   unit="batch", dynamic_ncols=True, disable=not self.leader)
        started = interval_start = time.perf_counter()
        interval_images = 0
        try:
            with epoch_batches(self.train_loader, p["epoch"], p["batch"]) as batches:
                for x, y in batches:
                    self._step(x, y)
                    p["batch"] += 1
                    p["iteration"] += 1
                    p["epoch_images"] += x.shape[0] * self.world.size  # the job's images: every rank's batch
                    interval_images += x.shape[0] * self.world.size
                    bar.update()
                    if self._beat is not None:
                        self._beat()
                    if after_step is not None:
                        after_step(self)
                    stopping = self.world.any(stop.requested)  # every rank stops after the same step
                    if p["batch"] % args.log_every == 0 or p["batch"] == self.batches_per_epoch or stopping:
                        loss, accuracy, _ = self._checked_train_metrics()  # waits for the device
                        now = time.perf_counter()
                        images_per_second = interval_images / (now - interval_start)
                        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.1%}", lr=f"{self.lr:.3g}",
                                        img_s=f"{images_per_second:.1f}")
                        if self._estimates_left:
                            self._write(self._estimate(images_per_second))
                            self._estimates_left -= 1
                        interval_start, interval_images = now, 0
                    if stopping:
                        return False
        finally:
            bar.close()
            p["epoch_train_seconds"] += time.perf_counter() - started
        return True

    def _estimate(self, images_per_second):
        """The run's remaining length at ``images_per_second``, in words (training steps only)."""
        steps_left = self.args.epochs * self.batches_per_epoch - self.position["iteration"]
        if steps_left == 0:
            return f"at {images_per_second:.1f} images/s; no training steps left, the evaluation follows"
        batch = self.args.batch_size * self.world.size
        epoch = self.batches_per_epoch * batch / images_per_second
        return (f"at {images_per_second:.1f} images/s an epoch trains in about {format_duration(epoch)}; the "
                f"{counted(steps_left, 'step')} left {'takes' if steps_left == 1 else 'take'} about "
                f"{format_duration(steps_left * batch / images_per_second)}, plus the evaluations"
                + (" (this first interval includes compiling the kernels: estimated again at the next reading)"
                   if self._estimates_left == 2 else ""))

    def _step(self, x, y):
        """One SGD step on the batch (x, y); its loss and correct predictions go into train_totals."""
        lr = self.schedule(self.position["iteration"])
        if lr != self.lr:
            self.optimizer.set_lr(lr)
            self.lr = lr
        self.train_step(x, y)

    def _end_epoch(self, test_loss, test_accuracy, test_top5):
        p = self.position
        train_loss, train_accuracy, train_top5 = self._checked_train_metrics()
        if not math.isfinite(test_loss):
            raise Diverged(f"the test loss became {test_loss} after epoch {p['epoch'] + 1}")
        row = dict(epoch=p["epoch"] + 1, iteration=p["iteration"], train_loss=train_loss,
                   train_accuracy=train_accuracy, train_top5_accuracy=train_top5, test_loss=test_loss,
                   test_accuracy=test_accuracy, test_top5_accuracy=test_top5,
                   lr=self.schedule(p["iteration"] - 1), seconds=round(self._seconds(), 3),
                   images_per_second=p["epoch_images"] / max(p["epoch_train_seconds"], 1e-9))
        self.history.append(row)
        improved = self.best is None or test_accuracy > self.best["test_accuracy"]
        if improved:
            self.best = dict(epoch=row["epoch"], test_accuracy=test_accuracy, test_loss=test_loss)
        p["epoch"], p["batch"] = p["epoch"] + 1, 0
        if self.world.distributed:  # the ranks' models must hold the same bits: a broken exchange would not
            crcs = [zlib.crc32(backend.to_numpy(a).view(np.uint8))
                    for a in (self.optimizer.flat_params, self.data_parallel.flat_statistics)]
            if self.world.disagreeing(crcs) is not None:
                raise RuntimeError(f"after epoch {p['epoch']} the ranks' models differ: the gradient exchange is "
                                   f"not giving every rank the same bits")
        self.save()
        if self.leader:
            if improved:  # after last.npz, which names this epoch best: a crash between the two is repaired on resume
                with self._writing("best.npz"):
                    npzfile.copy(self.out / "last.npz", self.out / "best.npz")
            self._write_history()
        self._write(f"epoch {row['epoch']}/{self.args.epochs}: train loss {train_loss:.4f} acc {train_accuracy:.2%}"
                   f" | test loss {test_loss:.4f} acc {test_accuracy:.2%} top-5 {test_top5:.2%} | lr {row['lr']:.3g} | "
                   f"{row['images_per_second']:.1f} img/s")

    def _interrupted(self, why="interrupted", code=EXIT_INTERRUPTED):
        """Write last.npz where the run stands, say ``why`` and how to resume; return ``code``."""
        if self.position["batch"] > 0:  # steps were taken this epoch: a diverged state is not worth saving
            self._checked_train_metrics()
        if self.saved_at != self.position["iteration"]:  # (an epoch end just wrote this very state)
            self.save()
        launch = f"mpirun -n {self.world.size} " if self.world.distributed else ""
        self._print(f"{self.task.name}: {why}; checkpoint written to {self.last_good}. Continue with:\n"
                    f"  {launch}python -m {self.task.module} --out {self.out} --resume", file=sys.stderr)
        return code

    def _report(self):
        if not self.history or not self.leader:
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

def describe_checkpoint(task, checkpoint):
    """What a file holds, in words: where its run stood, or that it is weights only."""
    meta = checkpoint.meta
    if not checkpoint.is_training:
        return f"weights of a {meta['model']['class']} ({meta['model']['config']['attention']} attention)"
    saved = meta["args"]
    return (f"{saved['model']} on {task.dataset(argparse.Namespace(**saved))}, "
            f"{describe_position(meta, meta['batches_per_epoch'])} of a {saved['epochs']}-epoch run "
            f"(iteration {meta['iteration']})")


def evaluate_checkpoint(task, args, explicit) -> int:
    """--eval-only: the test accuracy and loss of a checkpoint or weights file, on the current backend."""
    path = Path(args.eval_only)
    checkpoint = read_checkpoint(path)
    select_backend(args.backend)
    select_precision(args.precision)
    model, loader, what = task.evaluation(args, explicit, checkpoint, path)
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss, accuracy, top5 = evaluate(EvalStep(model, new_totals(), False if args.no_cuda_graph else None),
                                            loader)
    except DataError as error:
        raise UsageError(f"reading the test data failed: {error}") from None
    print(f"{path}: {describe_checkpoint(task, checkpoint)}")
    print(f"test accuracy {accuracy:.2%}  top-5 {top5:.2%}  test loss {loss:.4f}  ({what}, backend "
          f"{backend.get_backend()}, precision {backend.get_precision()})")
    corrupt = getattr(loader, "corrupt", [])
    if corrupt:
        print(f"warning: {len(corrupt)} of those images could not be decoded and were replaced by others of their "
              f"class (named above): these figures are of an altered set", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """In the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does (the help says they act alike),
    until the training loop's own handler (StopOnInterrupt) takes over: before, a SIGTERM while the
    data loaded ended the process with 143 and not a word."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(task, argv=None, after_step=None) -> int:
    """Parse ``argv`` (default sys.argv[1:]) with the task's parser, train or evaluate; returns the
    exit code.

    ``after_step``: see :meth:`Run.train`.
    """
    with _sigterm_as_ctrl_c(), _plain_data_warnings():
        return _main(task, argv, after_step)


@contextlib.contextmanager
def _plain_data_warnings():
    """A warning about the data (a corrupt image skipped, ra_kernels.imagefolder) as one plain line
    above the progress bar: Python's own format adds the library's file and line and echoes its
    source. Set for the block, from whichever thread warns (the loader's workers)."""
    show = warnings.showwarning

    def show_plainly(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CorruptImageWarning):
            tqdm.write(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_plainly
    try:
        yield
    finally:
        warnings.showwarning = show


def _main(task, argv, after_step) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = task.build_parser()
    args = parser.parse_args(argv)
    if args.nesterov and args.momentum == 0:
        parser.error("Nesterov momentum needs --momentum > 0; add --no-nesterov for plain SGD")
    explicit = _explicit_options(task, argv)
    world = distributed.world()
    last = None
    try:
        if world.distributed and args.eval_only is not None:
            raise UsageError("--eval-only runs in one process: start it without mpirun")
        if args.eval_only is not None:
            ignored = [_flag(dest) for dest in explicit if dest not in task.eval_only_options]
            if ignored:
                raise UsageError(f"--eval-only takes the network from the checkpoint and evaluates it; "
                                 f"{', '.join(ignored)} cannot be given with it (only "
                                 f"{', '.join(map(_flag, task.eval_only_options[1:]))})")
            return evaluate_checkpoint(task, args, explicit)
        args.out = args.out or task.default_out(args)
        last = Path(args.out) / "last.npz"
        checkpoint = None
        if args.resume:
            if not last.exists():
                raise UsageError(f"--resume: {last} does not exist, so there is nothing to resume")
            checkpoint = read_checkpoint(last)
            if not checkpoint.is_training:
                raise UsageError(f"--resume: {last} holds weights only, not a training checkpoint")
            trained = checkpoint.meta["model"]["class"]
            if trained != task.network.__name__:  # before its options are read: they are another command's
                command = checkpoint.meta.get("module")
                raise UsageError(f"--resume: {last} trains the network class {trained}, which {task.module} does not"
                                 + (f": resume it with python -m {command} --out {args.out} --resume" if command
                                    else ""))
            args = _resumed_args(task, args, explicit, checkpoint.meta["args"])
        elif last.exists():
            raise UsageError(f"{args.out} already holds a run ({last}): add --resume to continue it, or "
                             f"choose another --out")
        else:  # an epoch end writes last.npz first: these without it are another run's, which a new one would replace
            left = [name for name in RUN_FILES if (Path(args.out) / name).exists()]
            if left:
                raise UsageError(f"{args.out} holds {', '.join(left)} of an earlier run, without its last.npz to "
                                 f"resume: choose another --out, or move them away")
        prepare_output_dir(args.out)
        with output_lock(args.out) if world.rank == 0 else contextlib.nullcontext():  # rank 0 writes the files
            return Run(task, args, checkpoint).train(after_step)
    except UsageError as error:
        rank = f" (rank {world.rank})" if world.distributed else ""
        print(f"{task.name}{rank}: error: {error}", file=sys.stderr, flush=True)
        if world.distributed:  # perhaps on this rank alone: the others would wait for it
            world.abort(EXIT_USAGE)
        return EXIT_USAGE
    except Exception:
        if not world.distributed:
            raise
        # An error on one rank: the others would wait for it in their next collective.
        import traceback
        error = sys.exc_info()[1]
        print(f"{task.name}: rank {world.rank} failed: {type(error).__name__}: {error}; stopping every rank "
              f"(the traceback follows)", file=sys.stderr, flush=True)
        traceback.print_exc()
        world.abort(EXIT_PEER_FAILED)
    except KeyboardInterrupt:
        saved = f"{last} holds the last one" if last is not None and last.exists() else "none was written"
        print(f"{task.name}: stopped by Ctrl-C or SIGTERM where no checkpoint could be written; {saved}",
              file=sys.stderr, flush=True)
        if world.distributed:
            world.abort(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
