"""What both benchmarks share: PyTorch on request, the precision switch of both sides, timing with
CUDA events and an L2 flush, the machine's measured ceilings, agreement checks, Markdown output.

Two clocks, both after warm-up calls (Triton compiles, cuDNN autotunes under
``cudnn.benchmark``, allocators fill their pools); the median over repetitions is reported.

* ``time_ms``, launch-inclusive: many repetitions, each preceded by a write of a buffer larger
  than L2 so that no input is still cached, each bracketed by CUDA events recorded on the
  stream its side launches on. A layer that runs for a few microseconds on the device takes
  longer than that to launch from Python, so this measures launching as much as the kernels.
* ``graph_time_ms``, device time: a CUDA graph holding many calls, captured once (CuPy's stream
  capture for ours, ``torch.cuda.CUDAGraph`` for PyTorch) and replayed between two events; the
  time per call is the replay's time over the calls it holds. No Python runs between the
  kernels, so this is what the kernels cost. Inputs stay in L2 across the calls of one graph,
  as a layer's input often is in a training step, where the layer before has just written it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ra_kernels import backend, models
from train.common import UsageError, prepare_output_dir, select_backend

REPO = Path(__file__).resolve().parent.parent
#: Where the CIFAR-10 subset is looked for: a copy carried to the GPU machine, then the shared one.
CIFAR_SUBSET_CANDIDATES = (REPO / "data" / "cifar10-subset", REPO.parent / "shared" / "data" / "cifar10-subset")
#: How the subset reaches the first candidate, from the repository root. The mkdir matters: into a
#: missing data/, ``cp -r`` would make data/ the subset itself (data/cifar-10-batches-py), which
#: no candidate is.
CIFAR_SUBSET_COPY = "mkdir -p data && cp -r ../shared/data/cifar10-subset data/"

#: The benchmarks' models: CIFAR-10 images (32x32) and classes.
IMAGE_SIZE, NUM_CLASSES = 32, 10
#: The whole-step benchmark's ImageNet networks, by name: 224x224 images, 1,000 classes. They
#: have no dry-run version (their widths are the prototxt's; tests/test_bench.py holds them against
#: the PyTorch twin on the CPU).
IMAGENET_MODELS = {"imagenet56": models.imagenet_attention56, "imagenet92": models.imagenet_attention92}
IMAGENET_IMAGE_SIZE, IMAGENET_CLASSES = 224, 1000
#: --dry-run: the named models at these widths (their depth unchanged), on 8x8 images, at batch 4,
#: so that the interpreter gets through them in seconds; 4 values per channel reach the batch
#: norms of the 1x1 mask levels (2 would make batch norm's input gradient zero in exact arithmetic).
DRY_RUN_MODEL = dict(stem=4, widths=(8, 16, 32))
DRY_RUN_IMAGE, DRY_RUN_BATCH = 8, 4

#: Relative L2 error ||ours - theirs|| / ||theirs|| allowed between two implementations of one op
#: (bench.kernels; a whole step is judged otherwise, see bench.step). Expected: float32 lands far
#: under 1e-3, TF32 (10-bit mantissas) near 3e-4 per product; measured on the CPU, every op of attention56's layers at
#: batch 16 in float32 is within 3e-6 of float64. Both sides round independently, and batch norm
#: divides by the batch's standard deviation, which can raise a relative error a few times;
#: 1e-3 (IEEE) and 1e-2 (TF32) leave that margin, while a wrong index, a missed tile or a wrong
#: formula gives errors of order 1.
TOLERANCES = {"ieee": 1e-3, "tf32": 1e-2}

#: Bytes written between timed repetitions: over four times the H200's 60 MB L2.
L2_FLUSH_BYTES = 256 * 2**20

NO_TIMING = "dry run: no timing"


def import_torch(required: bool):
    """The torch module; None when it is not installed and not ``required``."""
    try:
        import torch
    except ImportError:
        if required:
            raise RuntimeError("this benchmark compares against PyTorch, which is not installed: "
                               "pip install -e '.[bench]'") from None
        return None
    return torch


def find_cifar_subset(given=None) -> Path | None:
    """The folder holding the CIFAR-10 subset's cifar-10-batches-py: ``given``, else the first of
    CIFAR_SUBSET_CANDIDATES that has it; None when there is none."""
    for candidate in ([Path(given)] if given else list(CIFAR_SUBSET_CANDIDATES)):
        if (candidate / "cifar-10-batches-py").is_dir() or candidate.name == "cifar-10-batches-py":
            return candidate
    return None


def build_model(name: str, dry_run: bool, seed: int = 0):
    """Our model ``name`` on the current backend: a key of ``ra_kernels.models.MODELS`` for CIFAR-10
    (in its tiny dry-run version when ``dry_run``), or of IMAGENET_MODELS (not in a dry run)."""
    if name in IMAGENET_MODELS:
        if dry_run:
            raise ValueError(f"{name} has no dry-run version: its full widths would take the interpreter "
                             f"minutes (the CIFAR models' tiny versions check the step's plumbing)")
        return IMAGENET_MODELS[name](num_classes=IMAGENET_CLASSES, seed=seed)
    if name not in models.MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join([*models.MODELS, *IMAGENET_MODELS])}")
    return models.MODELS[name](num_classes=NUM_CLASSES, seed=seed, **(DRY_RUN_MODEL if dry_run else {}))


def model_input(name: str, dry_run: bool):
    """(image side, number of classes) of the benchmarks' model ``name``."""
    if name in IMAGENET_MODELS:
        return IMAGENET_IMAGE_SIZE, IMAGENET_CLASSES
    return (DRY_RUN_IMAGE if dry_run else IMAGE_SIZE), NUM_CLASSES


@contextlib.contextmanager
def precision(name: str, torch=None):
    """One of backend.PRECISIONS on both sides: our kernels (``backend.use_precision``) and, when
    given, PyTorch's cuBLAS and cuDNN: float32 products as TF32 for "tf32" and "bf16" (what autocast
    leaves in float32), IEEE for "ieee". PyTorch's autocast itself is the caller's (bench.step)."""
    flags = None
    if torch is not None:
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name != "ieee"
    try:
        with backend.use_precision(name):
            yield
    finally:
        if flags is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# --------------------------------------------------------------------------- agreement

class AgreementError(AssertionError):
    """Two implementations of the same computation disagree beyond the tolerance."""


def relative_error(ours, truth) -> float:
    """||ours - truth|| / ||truth|| in float64 over host arrays of one shape; inf on NaN or a shape mismatch."""
    ours, truth = np.asarray(ours, np.float64), np.asarray(truth, np.float64)
    if ours.shape != truth.shape:
        return float("inf")
    difference = np.linalg.norm(ours - truth)
    scale = np.linalg.norm(truth)
    error = difference / scale if scale > 0 else difference
    return float(error) if np.isfinite(error) else float("inf")


def check_agreement(what: str, ours: dict, truth: dict, tolerance: float) -> float:
    """The largest relative error over the arrays named in ``truth``; AgreementError past ``tolerance``.

    ``ours`` and ``truth`` map names (outputs, gradients, updated state) to host arrays in our
    layouts. A name missing from ``ours`` is an error too.
    """
    errors = {name: relative_error(ours[name], value) if name in ours else float("inf")
              for name, value in truth.items()}
    bad = {name: e for name, e in errors.items() if not e <= tolerance}
    if bad:
        listing = ", ".join(f"{name} {e:.2e}" for name, e in bad.items())
        raise AgreementError(f"{what}: relative error over the tolerance {tolerance:.0e}: {listing}")
    return max(errors.values(), default=0.0)


# --------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and quartiles over ``reps`` repetitions."""
    median: float
    q25: float
    q75: float
    reps: int


class CupyClock:
    """CUDA events and the L2 flush on CuPy's current stream, where our kernels launch."""

    def __init__(self):
        if backend.get_backend() != "cuda":
            raise RuntimeError("CupyClock times the cuda backend; select it first")
        self.cupy = backend.xp()
        self._flush = self.cupy.empty(L2_FLUSH_BYTES, dtype=np.uint8)

    def record(self):
        event = self.cupy.cuda.Event()
        event.record()  # on the current stream
        return event

    def elapsed_ms(self, start, end) -> float:
        return self.cupy.cuda.get_elapsed_time(start, end)

    def synchronize(self):
        self.cupy.cuda.get_current_stream().synchronize()

    def flush_l2(self):
        self._flush.fill(1)

    @contextlib.contextmanager
    def side_stream(self):
        """Run the block on a new stream (stream capture cannot start on the legacy default one)."""
        stream = self.cupy.cuda.Stream(non_blocking=True)
        with stream:
            yield
        stream.synchronize()

    def capture(self, fn, calls: int):
        """(replay, kept): a CUDA graph of ``calls`` calls of ``fn`` captured on the current stream
        (relaxed mode, CuPy's default: the memory pool may still allocate), and the calls' results,
        whose memory the graph writes and so must outlive it."""
        stream = self.cupy.cuda.get_current_stream()
        stream.begin_capture()
        kept = []
        try:
            kept = [fn() for _ in range(calls)]
        finally:
            graph = stream.end_capture()
        return (lambda: graph.launch(stream)), (kept, graph)


class TorchClock:
    """CUDA events and the L2 flush on PyTorch's current stream."""

    def __init__(self, torch):
        self.torch = torch
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def record(self):
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self):
        self.torch.cuda.current_stream().synchronize()

    def flush_l2(self):
        self._flush.fill_(1)

    @contextlib.contextmanager
    def side_stream(self):
        """Run the block on a new stream, ordered after the current one's work and before its later work
        (PyTorch warms up autograd and cuDNN on a side stream before a capture)."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)
        stream.synchronize()

    def capture(self, fn, calls: int):
        """As :meth:`CupyClock.capture`, with ``torch.cuda.graph`` (its own memory pool)."""
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph):
            kept = [fn() for _ in range(calls)]
        return graph.replay, (kept, graph)


def time_ms(fn, clock, warmup: int = 5, budget_ms: float = 100.0, min_reps: int = 20,
            max_reps: int = 500) -> Timing:
    """Time ``fn()`` on ``clock``'s stream: ``warmup`` calls, then as many repetitions as fit in
    ``budget_ms`` of device time (clamped to [min_reps, max_reps]), each after an L2 flush."""
    for _ in range(warmup):
        fn()
    start = clock.record()
    for _ in range(3):
        fn()
    end = clock.record()
    clock.synchronize()
    per_call = max(clock.elapsed_ms(start, end) / 3, 1e-3)
    reps = int(np.clip(budget_ms / per_call, min_reps, max_reps))
    events = []
    for _ in range(reps):
        clock.flush_l2()
        start = clock.record()
        fn()
        events.append((start, clock.record()))
    clock.synchronize()
    times = np.array([clock.elapsed_ms(s, e) for s, e in events])
    q25, median, q75 = np.percentile(times, [25, 50, 75])
    return Timing(float(median), float(q25), float(q75), reps)


def our_step_bytes(step) -> int:
    """Peak device memory of one call of ``step`` (our eager step) beyond what exists before it:
    after a warm call (kernels compiled, anything made on first use made), a call draws from a
    fresh CuPy pool, which grows only when no freed block fits, so its size afterwards is the
    step's peak (to the pool's rounding)."""
    step()
    cupy = backend.xp()
    pool = cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc):
        step()
    cupy.cuda.get_current_stream().synchronize()
    return pool.total_bytes()


def torch_step_bytes(torch, step) -> int:
    """Peak device memory of one call of PyTorch's ``step`` beyond what was allocated before it."""
    step()  # warm: cuDNN's autotuner and lazily made optimizer state allocate on the first call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def graph_time_ms(fn, clock, calls: int = 20, replays: int = 10, warmup: int = 3) -> Timing:
    """Device time of ``fn()``: ``warmup`` calls, then a CUDA graph of ``calls`` calls captured on a
    side stream and replayed ``replays`` times between events (after one untimed replay, which
    uploads the graph); per replay, milliseconds over ``calls``. ``Timing.reps`` counts replays."""
    with clock.side_stream():
        for _ in range(warmup):
            fn()
        clock.synchronize()
        replay, kept = clock.capture(fn, calls)
        replay()
        clock.synchronize()
        events = []
        for _ in range(replays):
            start = clock.record()
            replay()
            events.append((start, clock.record()))
        clock.synchronize()
    times = np.array([clock.elapsed_ms(s, e) for s, e in events]) / calls
    del kept
    q25, median, q75 = np.percentile(times, [25, 50, 75])
    return Timing(float(median), float(q25), float(q75), replays)



# --------------------------------------------------------------------------- where device time goes

#: Device work in a kineto trace (torch.profiler's Chrome export): kernels, copies and fills.
DEVICE_EVENT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class KernelProfile:
    """A step's device work by kernel name: ``kernels`` maps a name to (launches, microseconds) per step."""
    kernels: dict

    @property
    def launches(self) -> float:
        return sum(n for n, _ in self.kernels.values())

    @property
    def busy_ms(self) -> float:
        """Kernels of one stream run one after another, so their durations add up to the busy time."""
        return sum(us for _, us in self.kernels.values()) / 1e3

    def top(self, count: int) -> list:
        """The ``count`` names that take the most device time: (name, launches, microseconds)."""
        ranked = sorted(self.kernels.items(), key=lambda item: -item[1][1])[:count]
        return [(name, n, us) for name, (n, us) in ranked]


def summarize_trace(events, steps: int) -> KernelProfile:
    """The :class:`KernelProfile` of ``steps`` steps from a kineto trace's events (dicts with
    ``cat``, ``name`` and ``dur``, in microseconds). RuntimeError when the trace holds
    no device work (CUPTI saw nothing: a profile that measured nothing must not read as zero)."""
    device = [e for e in events if e.get("cat") in DEVICE_EVENT_CATEGORIES]
    if not device:
        raise RuntimeError("the profiler recorded no device work (no kernel, copy or fill in its trace)")
    kernels = {}
    for event in device:
        n, us = kernels.get(event["name"], (0, 0.0))
        kernels[event["name"]] = (n + 1, us + float(event["dur"]))
    return KernelProfile({name: (n / steps, us / steps) for name, (n, us) in kernels.items()})


#: Steps a profile records (after one warm step).
PROFILE_STEPS = 3


def kernel_profile(torch, fn, clock, steps: int = PROFILE_STEPS) -> KernelProfile:
    """Where the device time of ``fn()`` goes, by kernel: one warm call, then ``steps`` calls under
    torch.profiler, whose CUPTI tracing sees every kernel of the process (ours launched by Triton
    and CuPy as well as PyTorch's, the kernels of a CUDA graph's replay included)."""
    if not torch.cuda.is_available():
        raise RuntimeError("a kernel profile needs a CUDA build of PyTorch and a GPU: torch.profiler reads the "
                           "GPU's kernels through CUPTI")
    fn()
    clock.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            fn()
        clock.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return summarize_trace(events, steps)


# --------------------------------------------------------------------------- sessions

@dataclass
class Session:
    """How a benchmark runs: a dry run (interpret backend, PyTorch on the CPU if installed, no
    clocks) or on the GPU (cuda backend, PyTorch with cuDNN autotuning, one clock per side);
    the random source of the inputs and the device time per timed measurement."""
    dry_run: bool
    torch: object
    rng: np.random.Generator
    budget_ms: float = 100.0
    our_clock: CupyClock | None = None
    torch_clock: TorchClock | None = None


def start_session(dry_run: bool, seed: int | None = None, budget_ms: float = 100.0) -> Session:
    """Select the backend and set PyTorch up; ``seed`` None draws a fresh one (printed)."""
    seed = seed if seed is not None else int.from_bytes(np.random.bytes(4), "little")
    print(f"input seed {seed}")
    if dry_run:
        backend.set_backend("interpret")
        torch = import_torch(required=False)
        if torch is None:
            print("PyTorch is not installed: the PyTorch side is skipped")
        else:
            # Its part of a dry run is milliseconds of work; with more threads, OpenMP's waiting
            # threads were seen to make it a thousand times slower on a busy 2-core machine.
            torch.set_num_threads(1)
        return Session(True, torch, np.random.default_rng(seed), budget_ms)
    if not backend.gpu_available():
        raise SystemExit("this benchmark needs CuPy and an NVIDIA GPU; on a CPU, run it with --dry-run")
    backend.set_backend("cuda")
    torch = import_torch(required=True)
    if not torch.cuda.is_available():
        raise SystemExit("PyTorch does not see the GPU: install a CUDA build of torch (pip install -e '.[bench]')")
    torch.backends.cudnn.benchmark = True
    return Session(False, torch, np.random.default_rng(seed), budget_ms, CupyClock(), TorchClock(torch))


# --------------------------------------------------------------------------- ceilings

@dataclass(frozen=True)
class Ceilings:
    """What this GPU does, measured in this run: copy bandwidth (bytes read + written per
    second) and dense matrix-product rates (FLOP/s) per precision: "ieee" (float32), "tf32", "bf16"."""
    copy_bytes_per_s: float
    matmul_flops: dict

    def describe(self) -> str:
        rates = ", ".join(f"{name} matmul {rate / 1e12:.0f} TFLOP/s" for name, rate in self.matmul_flops.items())
        return f"device-to-device copy {self.copy_bytes_per_s / 1e9:,.0f} GB/s (read + write), {rates}"


def measure_ceilings(torch, clock) -> Ceilings:
    """A 1 GiB device-to-device copy, and 8192^3 matrix products in float32 (IEEE and TF32) and bf16."""
    src = torch.rand(2**28, device="cuda")
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), clock, budget_ms=300)
    copy_rate = 2 * src.numel() * src.element_size() / (copy.median * 1e-3)
    n = 8192
    rates = {}
    for name, dtype in (("ieee", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device="cuda").to(dtype)
        b = torch.randn(n, n, device="cuda").to(dtype)
        with precision("tf32" if name == "tf32" else "ieee", torch):
            timing = time_ms(lambda: a @ b, clock, budget_ms=300, min_reps=10)
        rates[name] = 2 * n**3 / (timing.median * 1e-3)
    return Ceilings(copy_rate, rates)


def roofline(flops: float, nbytes: float, ceilings: Ceilings, matmul_precision: str):
    """(floor in ms, bound) for an op: the larger of its FLOPs at the matmul rate and its bytes at
    the copy rate; ``bound`` says which ("compute" or "memory")."""
    compute = flops / ceilings.matmul_flops[matmul_precision]
    memory = nbytes / ceilings.copy_bytes_per_s
    return (compute * 1e3, "compute") if compute >= memory else (memory * 1e3, "memory")


def achieved(flops: float, nbytes: float, ms: float, bound: str) -> str:
    """The rate of the bounding resource at ``ms`` per call: TFLOP/s (compute) or GB/s (memory)."""
    if bound == "compute":
        return f"{flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s"
    return f"{nbytes / (ms * 1e-3) / 1e9:,.0f} GB/s"


# --------------------------------------------------------------------------- environment and output

def command_output(*command) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(torch, command: str) -> dict:
    """Where and with what a run happened: date, command, versions, commit, GPU and driver."""
    import triton
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": command, "python": platform.python_version(), "numpy": np.__version__,
           "triton": triton.__version__, "backend": backend.get_backend()}
    commit = command_output("git", "rev-parse", "--short", "HEAD")
    if commit:
        dirty = command_output("git", "status", "--porcelain", "--untracked-files=no")
        env["commit"] = commit + (" (with local changes)" if dirty else "")
    if backend.get_backend() == "cuda":
        cupy = backend.xp()
        env["cupy"] = cupy.__version__
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        env["L2"] = f"{props['l2CacheSize'] / 2**20:.0f} MiB"
        env["driver"] = (command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
                         or f"CUDA driver API {cupy.cuda.runtime.driverGetVersion()}")
        env["CUDA runtime"] = str(cupy.cuda.runtime.runtimeGetVersion())
    if torch is not None:
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["torch CUDA"] = str(torch.version.cuda)
            env["cuDNN"] = str(torch.backends.cudnn.version())
    return env


def describe_environment(env: dict) -> str:
    return " · ".join(f"{key}: {value}" for key, value in env.items())


def markdown_table(header, rows) -> str:
    """A Markdown table, columns padded; a column whose cells are all numbers (or '-') is right-aligned."""
    rows = [[str(cell) for cell in row] for row in rows]
    header = [str(cell) for cell in header]

    def numeric(cell):
        try:
            float(cell.split()[0].replace(",", "").rstrip("x%"))
            return True
        except (ValueError, IndexError):
            return cell == "-"

    columns = list(zip(header, *rows))
    widths = [max(len(cell) for cell in column) for column in columns]
    right = [bool(rows) and all(numeric(cell) for cell in column[1:]) for column in columns]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def checked_out(parser, path) -> Path:
    """``path``, the folder a benchmark writes its results into, made and proven writable before
    the minutes of measuring (a failure after them would lose the figures); else a usage error."""
    try:
        return prepare_output_dir(path)
    except UsageError as error:
        parser.error(str(error))


def chosen_backend(prog: str, name: str) -> bool:
    """Select backend ``name`` ("auto" or one of backend.BACKENDS); False, after saying why on
    stderr, where it cannot run (cuda without CuPy or a GPU), for the caller to exit with code 2."""
    try:
        select_backend(name)
        return True
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return False


def append_results(path: Path, markdown: str):
    """Append a section to the results file (created with its parents if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + markdown.rstrip() + "\n")
