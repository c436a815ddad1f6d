"""Images/s of a whole training step, ours against the same network in PyTorch, eager and compiled.

    python -m bench.step                 # GPU: attention56 and attention92 at batch 64 and 128
    python -m bench.step --models imagenet56 --batches 64   # GPU: the ImageNet Attention-56 at 224x224
    python -m bench.step --dry-run       # CPU: interpret backend, tiny models, agreement only

A training step is what the training loop does per batch: zero the gradients, forward, softmax
cross-entropy, backward, one SGD update (the paper's recipe: Nesterov momentum 0.9, weight decay
1e-4, lr 0.1). Ours: ``ra_kernels.steps.TrainStep`` (which also adds the metrics on the device)
with ``ra_kernels.optim.SGD`` (one fused update over flat buffers) on the cuda backend, captured as
one CUDA graph (as train.cifar runs) and eager. PyTorch: ``bench.torch_model`` (the same
architecture, layer for layer) in channels_last with cuDNN autotuning and
``torch.optim.SGD(fused=True)``, eager and under ``torch.compile(mode="max-autotune")`` (which
uses CUDA graphs); its weights and running statistics are copied from ours.

Before timing, one step on each side from the same weights and the same batch is checked, in
IEEE float32 whatever the timing precision: logits, loss, every gradient, and every parameter
and running statistic after the update, each group against a float64 truth (the PyTorch twin
in float64; in a dry run, our numpy backend), within ten times the error of a trusted float32
yardstick (PyTorch eager; in a dry run, our numpy backend) on the same instance (see
``YARDSTICK_FACTOR``). Then each side's step is timed (``common.time_ms``: CUDA events, warm-up,
median) in each of ``--precisions`` and reported as images/s; a ratio is another side's time over
our captured step's in the same precision (above 1, ours is faster). TF32 (as training runs by
default): float32 storage, TF32 products on both sides. bf16: ours with ``precision="bf16"``
(bfloat16 activations, docs/design.md §8), PyTorch under ``torch.autocast(dtype=torch.bfloat16)``
(its standard mixed precision: float32 weights, bfloat16 convolutions and products). The compiled
network compiles during its warm-up (minutes), once per precision. Each side's step memory is
measured too: the device memory a step takes beyond what exists before it (parameters, gradients,
the optimizer's state, the batch), at its peak. On the GPU, our captured and eager steps also run
``IDENTITY_STEPS`` steps from the same weights on the same batches, in each precision: they must
end with the same bits (the command fails otherwise). Last, a table puts each side's bf16 step
beside its TF32 step: speed-up and memory. And in the first precision, each side's step is
profiled (``common.kernel_profile``: torch.profiler, whose CUPTI tracing sees our Triton and CuPy
kernels, those of a graph's replay included): kernels per step, their summed device time beside
the step's time (what is left is the device waiting for the host), and the kernels of our
captured step that take the most device time.

--dry-run: a tiny version of attention56 (the same depth, widths 8/16/32, 8x8 images, batch 4;
``--models`` for others) on the interpret backend, its step taken with batch norm on the running
statistics (see ``run_config``), checked against our numpy backend (reference/) and, with it,
PyTorch on the CPU when it is installed (eager only: compiling needs a C++ toolchain and
minutes); the table is printed with "dry run: no timing" instead of images/s. Nothing is written.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np

import reference
from ra_kernels import backend, models
from ra_kernels.metrics import TOTALS
from ra_kernels.optim import SGD
from ra_kernels.steps import TrainStep
from train.common import non_negative_int, positive_float

from . import common
from .common import DRY_RUN_BATCH, IMAGENET_MODELS, build_model, model_input

#: The paper's CIFAR recipe.
SGD_ARGUMENTS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)

#: A side agrees when, in every group, its error against the float64 truth is at most
#: YARDSTICK_FACTOR times the error of a trusted float32 implementation on the same instance, plus
#: ERROR_FLOOR. A fixed tolerance would not do: at initialisation the float32 gradients of these
#: networks are ill-conditioned (attention56, batch 8, measured against float64: our numpy
#: backend 1.2-1.6e-2, PyTorch on the CPU 0.7-1.4e-2, and 1.1-1.4e-2 apart from each other; the
#: logits agree to 1e-5), so two correct float32 steps differ by a percent. The two measured
#: implementations stayed within 2x of each other; a wrong wiring, weight or update is off by
#: far more than 10x. The floor covers groups the yardstick gets almost exactly. A yardstick more
#: than YARDSTICK_LIMIT off float64 measures nothing (a broken truth, say), and fails the check.
YARDSTICK_FACTOR, ERROR_FLOOR, YARDSTICK_LIMIT = 10.0, 1e-5, 0.1

#: Steps after which our captured and eager steps must hold the same bits (on the GPU).
IDENTITY_STEPS = 10


def _results(logits, loss, gradients: dict, state: dict) -> dict:
    """One step's groups: logits, loss, gradients and "state after the update" (parameters and
    running statistics), the last two keyed by our names."""
    return {"logits": logits, "loss": loss, "gradients": gradients, "state after the update": state}


class ReferenceSGD:
    """``reference.sgd_step`` per parameter, in the parameters' own dtype (ra_kernels.optim.SGD
    takes float32 only; this serves the float64 truth)."""

    def __init__(self, parameters, **hyperparameters):
        self.parameters, self.hyperparameters = list(parameters), hyperparameters
        self.velocities = [np.zeros_like(p.data) for p in self.parameters]

    def zero_grad(self):
        for p in self.parameters:
            p.grad = None

    def step(self):
        for i, p in enumerate(self.parameters):
            p.data, self.velocities[i] = reference.sgd_step(p.data, p.grad, self.velocities[i],
                                                            **self.hyperparameters)


class OurTrainer:
    """Our model and optimizer (``ra_kernels.optim.SGD`` unless given) on the current backend, stepped by
    ``ra_kernels.steps.TrainStep`` (as train.cifar trains; captured as a CUDA graph if ``capture``);
    batch norm in training mode unless ``training`` is False."""

    def __init__(self, model, training=True, optimizer=SGD, capture=False):
        self.model = model.train(training)
        self.optimizer = optimizer(model.parameters(), **SGD_ARGUMENTS)
        self.totals = backend.asarray(np.zeros(len(TOTALS), np.float32))
        self.step = TrainStep(self.model, self.optimizer, self.totals, capture=capture)

    def results(self, x, labels) -> dict:
        """One step's groups (``_results``) as host arrays, from NHWC images x (N, H, W, 3), float32
        (float64 on the numpy backend too), and int64 labels (N,), arrays of the backend."""
        logits, loss = self.step(x, labels)
        return _results(backend.to_numpy(logits), backend.to_numpy(loss),
                        {name: backend.to_numpy(p.grad) for name, p in self.model.named_parameters()},
                        self.model.state_dict())


def captured_equals_eager(fresh, batches) -> bool:
    """Whether our captured step and our eager step, each on a model from ``fresh()``, end with the same
    bits in every parameter, running statistic and velocity after the steps of ``batches`` (the same
    kernels in the same order; docs/design.md §7)."""
    ends = []
    for capture in (False, True):
        trainer = OurTrainer(fresh(), capture=capture)
        for x, labels in batches:
            trainer.step(x, labels)
        ends.append(dict(trainer.model.state_dict(), velocity=backend.to_numpy(trainer.optimizer.velocity)))
    return all(np.array_equal(ends[0][name], ends[1][name]) for name in ends[0])


class TorchTrainer:
    """The PyTorch twin of our model (``torch_model.from_ours``), optionally compiled or in float64,
    with its SGD (fused in float32); with ``bf16``, forward and loss under autocast to bfloat16."""

    def __init__(self, torch, model, device: str, compiled=False, training=True, float64=False, bf16=False):
        from . import torch_model
        self.torch, self.torch_model, self.float64 = torch, torch_model, float64
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
        self.net = torch_model.from_ours(model, device).train(training)
        if float64:
            self.net.double()
        self.forward = torch.compile(self.net, mode="max-autotune") if compiled else self.net
        self.optimizer = torch.optim.SGD(self.net.parameters(), **SGD_ARGUMENTS, fused=not float64)

    def inputs(self, x, labels):
        """Our NHWC images and labels (CuPy or NumPy) as PyTorch tensors sharing their memory
        (the images copied to float64 for a float64 network)."""
        x = self.torch_model.to_torch(self.torch.from_dlpack(x), "nhwc")
        return (x.double() if self.float64 else x), self.torch.from_dlpack(labels)

    def step(self, x, labels):
        self.optimizer.zero_grad()
        with self.autocast:
            logits = self.forward(x)
            loss = self.torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        self.optimizer.step()
        return logits, loss

    def results(self, x, labels) -> dict:
        logits, loss = self.step(*self.inputs(x, labels))
        return _results(logits.detach().cpu().double().numpy(), loss.detach().cpu().double().numpy(),
                        self.torch_model.as_ours(self.net, "grad"), self.torch_model.as_ours(self.net))


def flatten(results: dict) -> dict:
    """Each group as one float64 vector (named arrays concatenated in name order), so that a group's
    relative error weighs every array by its size rather than failing on a near-zero one; "names"
    lists the names."""
    def vector(value):
        if isinstance(value, dict):
            return np.concatenate([np.ravel(value[name]).astype(np.float64) for name in sorted(value)])
        return np.ravel(value).astype(np.float64)

    flat = {group: vector(value) for group, value in results.items()}
    flat["names"] = sorted(n for value in results.values() if isinstance(value, dict) for n in value)
    return flat


def check(what: str, sides: dict, truth: dict, yardstick: str) -> dict:
    """{side: its largest group error against the float64 ``truth``}, every side of ``sides``
    (name -> results) included. AgreementError when names differ, or when in some group a side's
    error exceeds YARDSTICK_FACTOR x the ``yardstick`` side's + ERROR_FLOOR, or the yardstick's
    own error exceeds YARDSTICK_LIMIT."""
    truth = flatten(truth)
    names = truth.pop("names")
    errors = {}
    for side, results in sides.items():
        flat = flatten(results)
        if flat.pop("names") != names:
            raise common.AgreementError(f"{what}: {side} has other parameter and buffer names than the truth")
        errors[side] = {group: common.relative_error(flat[group], value) for group, value in truth.items()}
    def bound(side, group):
        if side == yardstick:
            return YARDSTICK_LIMIT
        return YARDSTICK_FACTOR * errors[yardstick][group] + ERROR_FLOOR

    bad = [f"{side} {group} {e:.2e} > {bound(side, group):.2e}" for side, groups in errors.items()
           for group, e in groups.items() if not e <= bound(side, group)]
    if bad:
        raise common.AgreementError(f"{what}: errors against float64 past {YARDSTICK_FACTOR:g}x {yardstick}'s "
                                    f"+ {ERROR_FLOOR:g} ({YARDSTICK_LIMIT:g} for {yardstick} itself): "
                                    + "; ".join(bad))
    return {side: max(groups.values()) for side, groups in errors.items()}


def run_config(name: str, batch: int, args, session) -> dict:
    """Agreement, then (unless a dry run) images/s of each side, for one model and batch."""
    seed = int(session.rng.integers(1 << 31))
    image, classes = model_input(name, session.dry_run)
    x = session.rng.standard_normal((batch, image, image, 3)).astype(np.float32)
    labels = session.rng.integers(0, classes, batch).astype(np.int64)
    model = build_model(name, session.dry_run, seed)
    initial = model.state_dict()

    def fresh():
        return build_model(name, session.dry_run, seed).load_state_dict(initial)

    device = "cpu" if session.dry_run else "cuda"
    # PyTorch variants: name -> compiled. Compiling on the CPU would need a C++ toolchain and minutes.
    variants = ({} if session.torch is None else {"PyTorch eager": False} if session.dry_run or args.no_compile
                else {"PyTorch eager": False, "PyTorch compile": True})
    x_ours, labels_ours = backend.asarray(x), backend.asarray(labels)
    # The tiny dry-run models give their deepest batch norms 4 values per channel: in training mode
    # their float32 gradients are chaotic (measured over 60 seeds against float64: errors up to 3e-2
    # for our numpy backend and 3e-1 for PyTorch, both correct; one side's error says nothing of
    # the other's). On running statistics the same step agrees to 1e-5 (40 seeds), and that is
    # what the dry run checks; on the GPU the real shapes train.
    training = not session.dry_run

    with common.precision("ieee", session.torch):
        sides = {"ours": OurTrainer(model, training).results(x_ours, labels_ours)}
        if session.dry_run:  # the truth and the yardstick: reference/ in float64 and in float32
            yardstick = "numpy float32"
            with backend.use_backend("numpy"):
                truth = OurTrainer(fresh().astype(np.float64), training, ReferenceSGD).results(
                    x.astype(np.float64), labels)
                sides[yardstick] = OurTrainer(fresh(), training).results(x, labels)
        else:  # the truth and the yardstick: the PyTorch twin in float64 and eager in float32
            yardstick = "PyTorch eager"
            truth = TorchTrainer(session.torch, fresh(), device, training=training, float64=True).results(
                x_ours, labels_ours)
        for variant, compiled in variants.items():
            sides[variant] = TorchTrainer(session.torch, fresh(), device, compiled, training).results(
                x_ours, labels_ours)
        errors = check(f"{name} batch {batch}", sides, truth, yardstick)

    times, memory, identical, profiles = {}, {}, {}, {}
    if not session.dry_run:
        batches = [(backend.asarray(session.rng.standard_normal(x.shape).astype(np.float32)),
                    backend.asarray(session.rng.integers(0, classes, batch).astype(np.int64)))
                   for _ in range(IDENTITY_STEPS)]
        for precision in args.precisions:
            times[precision], memory[precision] = {}, {}
            profiling = args.profile and precision == args.precisions[0]
            with common.precision(precision, session.torch):
                identical[precision] = captured_equals_eager(fresh, batches)
                for side, capture in (("ours captured", True), ("ours eager", False)):
                    trainer = OurTrainer(fresh(), capture=capture)
                    step = functools.partial(trainer.step, x_ours, labels_ours)
                    if not capture:
                        memory[precision][side] = common.our_step_bytes(step)
                    times[precision][side] = common.time_ms(step, session.our_clock, warmup=3,
                                                            budget_ms=args.budget_ms, min_reps=10, max_reps=100)
                    if profiling:
                        profiles[side] = _profile(session, step, session.our_clock, args.profile_until)
                    del trainer, step
                for variant, compiled in variants.items():
                    trainer = TorchTrainer(session.torch, fresh(), device, compiled, bf16=precision == "bf16")
                    step = functools.partial(trainer.step, *trainer.inputs(x_ours, labels_ours))
                    if not compiled:
                        memory[precision][variant] = common.torch_step_bytes(session.torch, step)
                    times[precision][variant] = common.time_ms(step, session.torch_clock, warmup=3,
                                                               budget_ms=args.budget_ms, min_reps=10, max_reps=100)
                    if profiling:
                        profiles[variant] = _profile(session, step, session.torch_clock, args.profile_until)
                    del trainer, step
    return {"model": name, "batch": batch, "errors": errors, "yardstick": yardstick, "times": times,
            "memory": memory, "variants": list(variants), "identical": identical, "profiles": profiles}


def _profile(session, step, clock, until: float):
    """``common.kernel_profile`` of ``step``, or as text why there is none: a profiler that fails (no
    CUPTI in this environment, say) must not lose the timings already made, and a caller with a
    time limit gives ``until`` (``time.monotonic()``) after which no profile starts."""
    if time.monotonic() > until:
        return "no profile: time ran short"
    try:
        return common.kernel_profile(session.torch, step, clock)
    except Exception as error:  # reported in the table, in place of the profile
        return f"no profile: {type(error).__name__}: {error}"


def table(rows: list, dry_run: bool, precision: str) -> str:
    """Images/s per side in ``precision``, each other side's time over our captured step's, whether
    captured and eager steps agree bit for bit, and each side's largest error against float64 (the
    agreement check, in IEEE float32)."""
    others = ["ours eager"] + rows[0]["variants"]
    sides = ["ours captured"] + others
    header = (["model", "batch"] + [f"{side} img/s" for side in sides] + [f"{v} / ours captured" for v in others]
              + ["captured = eager"] + [f"err {side}" + (" (yardstick)" if side == rows[0]["yardstick"] else "")
                                        for side in rows[0]["errors"]])
    body = []
    for row in rows:
        t = row["times"].get(precision, {})
        rates = ["-" if side not in t else f"{row['batch'] / (t[side].median * 1e-3):,.0f}" for side in sides]
        ratios = ["-" if v not in t else f"{t[v].median / t['ours captured'].median:.2f}" for v in others]
        same = {None: "-", True: "yes", False: "NO"}[row["identical"].get(precision)]
        body.append([row["model"] + (" (tiny)" if dry_run else ""), row["batch"]] + rates + ratios + [same]
                    + [f"{e:.1e}" for e in row["errors"].values()])
    return common.markdown_table(header, body)


def precision_table(rows: list) -> str:
    """Per side: its bf16 step's speed-up over its own TF32 step, and the step memory (MiB) of both."""
    sides = ["ours captured", "ours eager"] + rows[0]["variants"]
    header, body = ["model", "batch", "side", "bf16 / TF32 speed-up", "memory TF32 MiB", "memory bf16 MiB",
                    "bf16 / TF32 memory"], []
    for row in rows:
        t, m = row["times"], row["memory"]
        for side in sides:
            speed_up = t["tf32"][side].median / t["bf16"][side].median
            mib = [m[p].get(side) for p in ("tf32", "bf16")]
            body.append([row["model"], row["batch"], side, f"{speed_up:.2f}"]
                        + ["-" if b is None else f"{b / 2**20:,.0f}" for b in mib]
                        + ["-" if None in mib else f"{mib[1] / mib[0]:.2f}"])
    return common.markdown_table(header, body)


#: Kernel names listed per configuration in the profile (the rest are summed on one line).
PROFILE_TOP = 10


#: Longest kernel name a by-kernel table shows: cuDNN's run to hundreds of characters (template
#: arguments), and their start names the kind (wgrad, dgrad, fprop) and tile.
KERNEL_NAME_CHARS = 90


def _by_kernel(profile) -> str:
    """A profile's costliest kernels by name, the rest summed in one row."""
    top = profile.top(PROFILE_TOP)
    rest = [(n, us) for name, (n, us) in profile.kernels.items() if name not in {t[0] for t in top}]
    lines = [[name if len(name) <= KERNEL_NAME_CHARS else name[:KERNEL_NAME_CHARS - 1] + "…", f"{n:g}",
              f"{us:,.0f}", f"{us / 1e3 / profile.busy_ms:.0%}"] for name, n, us in top]
    if rest:
        rest_us = sum(us for _, us in rest)
        lines.append([f"({len(rest)} others)", f"{sum(n for n, _ in rest):g}", f"{rest_us:,.0f}",
                      f"{rest_us / 1e3 / profile.busy_ms:.0%}"])
    return common.markdown_table(["kernel", "launches / step", "µs / step", "share of busy"], lines)


def profile_tables(rows: list, precision: str) -> str:
    """Where each side's step time goes on the device (``common.kernel_profile``): kernels per
    step, their summed device time against the step's time, then the costliest kernels by name of
    our captured step and of each PyTorch side (cuDNN's data and weight gradients beside ours)."""
    header, body, parts = ["model", "batch", "side", "step ms", "kernels / step", "device busy ms",
                           "busy / step"], [], []
    for row in rows:
        for side, profile in row["profiles"].items():
            step_ms = row["times"][precision][side].median
            if isinstance(profile, str):
                body.append([row["model"], row["batch"], side, f"{step_ms:.2f}", profile, "-", "-"])
                continue
            body.append([row["model"], row["batch"], side, f"{step_ms:.2f}", f"{profile.launches:,.0f}",
                         f"{profile.busy_ms:.2f}", f"{profile.busy_ms / step_ms:.0%}"])
        for side in ["ours captured", *row["variants"]]:
            profile = row["profiles"].get(side)
            if isinstance(profile, common.KernelProfile):
                parts.append(f"{row['model']} batch {row['batch']}, {side}, by kernel:\n\n" + _by_kernel(profile))
    return "\n\n".join([common.markdown_table(header, body)] + parts)


def report(rows: list, precisions, dry_run: bool) -> str:
    """The tables of a run: one per precision, then bf16 beside TF32 when both were timed."""
    parts = [f"### Training step, images/s, {p.upper()}"
             + (f" ({common.NO_TIMING}; batch norm on running statistics)" if dry_run else "")
             + "\n\n" + table(rows, dry_run, p) for p in (["ieee"] if dry_run else precisions)]
    if not dry_run and {"tf32", "bf16"} <= set(precisions):
        parts.append("### bf16 against TF32, each side against itself (step memory: peak device memory of "
                     "one eager step beyond parameters, gradients, optimizer state and batch)\n\n"
                     + precision_table(rows))
    if any(row.get("profiles") for row in rows):
        parts.append(f"### Where the step's time goes on the device, {precisions[0].upper()} (torch.profiler: "
                     f"every kernel, copy and fill of {common.PROFILE_STEPS} warm steps, per step; busy / step "
                     f"below 100%: the device waits for the host)\n\n" + profile_tables(rows, precisions[0]))
    return "\n\n".join(parts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=[*models.MODELS, *IMAGENET_MODELS],
                        help="models to train: the CIFAR networks at 32x32, or imagenet56 and imagenet92, the "
                             "ImageNet networks at 224x224 with 1,000 classes (not in a dry run) (default: "
                             "attention56 attention92; attention56 in a dry run, where the interpreter takes "
                             "about 10 s per step of its tiny version)")
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128], help="batch sizes (default: 64 128)")
    parser.add_argument("--precisions", nargs="+", default=["tf32", "bf16"], choices=backend.PRECISIONS,
                        help="precisions to time, both sides: tf32 (float32, TF32 products), ieee (float32 "
                             "throughout), bf16 (ours: bfloat16 activations; PyTorch: autocast to bfloat16) "
                             "(default: tf32 bf16; the agreement check always runs in ieee)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the profile of each side's step by kernel (torch.profiler, in the first "
                             "precision)")
    parser.add_argument("--budget-ms", type=positive_float, default=3000.0,
                        help="device time per timed side; 10 to 100 steps (default: 3000)")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="seed of weights and inputs (default: fresh, printed)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="RESULTS.md is appended here (default: bench/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: interpret backend, tiny models, agreement checks, no timing, nothing written")
    args = parser.parse_args(argv)
    if not args.dry_run:  # nothing is written in a dry run
        common.checked_out(parser, args.out)
    args.command = "python -m bench.step " + " ".join(sys.argv[1:] if argv is None else argv)
    args.profile_until = math.inf
    args.models = args.models or (["attention56"] if args.dry_run else ["attention56", "attention92"])
    if args.dry_run and set(args.models) & set(IMAGENET_MODELS):
        parser.error("--dry-run takes the CIFAR models only: the ImageNet networks have no tiny version")
    if any(b < 2 for b in args.batches):
        parser.error(f"--batches must be at least 2 (batch norm in training), got {args.batches}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    session = common.start_session(args.dry_run, args.seed, args.budget_ms)
    batches = [DRY_RUN_BATCH] if session.dry_run else args.batches
    rows = []
    for name in args.models:
        for batch in batches:
            rows.append(run_config(name, batch, args, session))
            print(f"  {name} b{batch}: agreement ok", file=sys.stderr)
    text = report(rows, args.precisions, session.dry_run)
    print(text)
    if not session.dry_run:
        env = common.environment(session.torch, args.command)
        common.append_results(args.out / "RESULTS.md", f"## bench.step, {env['date']}\n\n"
                              f"{common.describe_environment(env)}\n\nMedian of 10 to 100 steps after 3 warm-up "
                              f"steps; ratio = PyTorch time / ours.\n\n{text}")
        print(f"\nappended to {args.out / 'RESULTS.md'}")
    differ = [f"{row['model']} b{row['batch']} {p}" for row in rows for p, same in row["identical"].items() if not same]
    if differ:
        print(f"captured and eager steps ended with different parameters after {IDENTITY_STEPS} steps: "
              f"{', '.join(differ)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
