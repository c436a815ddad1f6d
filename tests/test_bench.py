"""The benchmark harness without a GPU: both dry runs, the PyTorch twin of the network, the
layer shapes taken from the models, the agreement check, the timing loop and the reports.

The dry runs are what CI runs (PyTorch absent there: its side is skipped). The PyTorch twin is
checked where torch is importable (a CPU build is enough); those tests skip cleanly otherwise.
"""
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import common
from bench import kernels as bench_kernels
from bench import ptxas as bench_ptxas
from bench import step as bench_step
import reference
from ra_kernels import backend, models
from ra_kernels import functional as F
from ra_kernels.autograd import Tensor
from ra_kernels.kernels import attention as attention_kernels
from ra_kernels.nn import BatchNorm2d, Conv2d, ConvBnRelu

RESULTS = Path(bench_kernels.__file__).parent / "RESULTS.md"


def _seed(rng):
    return str(int(rng.integers(1 << 31)))


def test_kernels_dry_run_checks_every_family_and_times_nothing(rng, capsys):
    before = RESULTS.read_text()
    assert bench_kernels.main(["--dry-run", "--seed", _seed(rng)]) == 0
    out = capsys.readouterr().out
    for family in bench_kernels.FAMILIES:
        assert f"| {family} " in out, family
    tables = [line for line in out.splitlines() if line.startswith("### ")]
    assert len(tables) == 2 * 1 + 2          # 2 precisions x 1 batch, then a summary per precision
    assert all(common.NO_TIMING in line for line in tables)
    cells = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "µs" not in line
             and not line.startswith("| op ")]
    # Layer rows: op, layer, uses, 10 timing columns, an error per comparison side (the reference,
    # and PyTorch where it is installed). Summary rows: op, then a ratio per model.
    layer_rows = [c[4:14] for c in cells if len(c) > 5]
    summary_rows = [c[2:-1] for c in cells if len(c) == 5]
    assert len(summary_rows) == 2 * (len(bench_kernels.FAMILIES) + 1) and len(layer_rows) > len(summary_rows)
    assert all(cell.strip() == "-" for row in layer_rows + summary_rows for cell in row)  # no time anywhere
    assert RESULTS.read_text() == before


def test_step_dry_run_agrees_and_times_nothing(rng, capsys):
    before = RESULTS.read_text()
    assert bench_step.main(["--dry-run", "--seed", _seed(rng)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    row = next(line for line in lines if line.startswith("| attention56 (tiny)"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["ours captured img/s"] == cells["ours eager img/s"] == "-"  # no images/s
    assert cells["captured = eager"] == "-"                                 # checked on the GPU only
    assert float(cells["err ours"]) < 1e-4 and "err numpy float32 (yardstick)" in cells
    assert common.NO_TIMING in out and RESULTS.read_text() == before


def test_step_report_puts_bf16_beside_tf32():
    """The GPU run's tables from made-up timings (the numbers are the test's, not measurements):
    images/s and ratios per precision, then each side's bf16 speed-up and memory."""
    def ms(median):
        return common.Timing(median, median, median, 10)

    times = {"tf32": {"ours captured": ms(40.0), "ours eager": ms(80.0), "PyTorch eager": ms(60.0)},
             "bf16": {"ours captured": ms(25.0), "ours eager": ms(64.0), "PyTorch eager": ms(30.0)}}
    memory = {"tf32": {"ours eager": 800 * 2**20, "PyTorch eager": 1000 * 2**20},
              "bf16": {"ours eager": 400 * 2**20, "PyTorch eager": 700 * 2**20}}
    row = {"model": "attention56", "batch": 64, "errors": {"ours": 1e-3}, "yardstick": "PyTorch eager",
           "times": times, "memory": memory, "variants": ["PyTorch eager"], "identical": {"tf32": True, "bf16": True}}
    text = re.sub(" +", " ", bench_step.report([row], ["tf32", "bf16"], dry_run=False))  # without the padding
    assert "images/s, TF32" in text and "images/s, BF16" in text
    assert "| attention56 | 64 | 1,600 | 800 | 1,067 | 2.00 | 1.50 | yes |" in text       # 64 / 40 ms, ...
    assert "| attention56 | 64 | 2,560 | 1,000 | 2,133 | 2.56 | 1.20 | yes |" in text     # 64 / 25 ms, ...
    assert "| attention56 | 64 | ours captured | 1.60 | - | - | - |" in text               # 40 / 25 ms
    assert "| attention56 | 64 | ours eager | 1.25 | 800 | 400 | 0.50 |" in text
    assert "| attention56 | 64 | PyTorch eager | 2.00 | 1,000 | 700 | 0.70 |" in text


def test_step_times_pytorch_under_bfloat16_autocast(rng):
    """The PyTorch side of a bf16 timing: forward and loss under autocast, the SGD in float32
    (on the CPU here; the GPU run does the same on cuda); the same network as in float32.

    Compared by the logits, not the loss: at initialisation any network's loss is near ln 10. At
    batch 8 (batch norms of the 1x1 levels over 8 values; batch 2 amplifies rounding through them
    far more) the bf16 logits differ from float32's by 0.09 in relative L2 (median of 200 draws,
    largest 0.23); another network's logits differ by 1.0 to 1.4 (40 draws). 0.5 lies between."""
    torch = pytest.importorskip("torch")
    batch = 8
    model = common.build_model("attention56", dry_run=True, seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((batch, common.DRY_RUN_IMAGE, common.DRY_RUN_IMAGE, 3)).astype(np.float32)
    labels = rng.integers(0, common.NUM_CLASSES, batch).astype(np.int64)
    logits_of = {}
    for bf16 in (False, True):
        trainer = bench_step.TorchTrainer(torch, model, "cpu", bf16=bf16)
        logits, loss = trainer.step(*trainer.inputs(x, labels))
        assert logits.dtype == (torch.bfloat16 if bf16 else torch.float32) and np.isfinite(float(loss.detach()))
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainer.net.parameters())
        logits_of[bf16] = logits.detach().float().numpy()
    difference = np.linalg.norm(logits_of[True] - logits_of[False]) / np.linalg.norm(logits_of[False])
    assert 0 < difference < 0.5, difference


def test_step_check_holds_each_side_to_the_yardstick(rng):
    def results(scale=1.0):
        return {"logits": truth["logits"] * scale, "loss": truth["loss"],
                "gradients": {k: v * scale for k, v in truth["gradients"].items()},
                "state after the update": truth["state after the update"]}

    truth = {"logits": rng.standard_normal((4, 10)), "loss": np.array(2.3),
             "gradients": {"a.weight": rng.standard_normal((3, 3)), "b.gamma": rng.standard_normal(3)},
             "state after the update": {"a.weight": rng.standard_normal((3, 3)), "b.running_var": rng.random(3)}}
    sides = {"ours": results(1 + 5e-3), "yardstick": results(1 + 1e-3)}
    errors = bench_step.check("step", sides, truth, "yardstick")
    assert errors["ours"] == pytest.approx(5e-3) and errors["yardstick"] == pytest.approx(1e-3)
    with pytest.raises(common.AgreementError, match=r"step: .*ours logits 2\.00e-02 > 1\.00e-02.*ours gradients"):
        bench_step.check("step", dict(sides, ours=results(1.02)), truth, "yardstick")
    with pytest.raises(common.AgreementError, match=r"yardstick logits 2\.00e-01 > 1\.00e-01"):
        bench_step.check("step", {"ours": results(1.2), "yardstick": results(1.2)}, truth, "yardstick")
    renamed = results()
    renamed["gradients"] = {"a.weight": truth["gradients"]["a.weight"], "b.beta": truth["gradients"]["b.gamma"]}
    with pytest.raises(common.AgreementError, match="ours has other parameter and buffer names"):
        bench_step.check("step", dict(sides, ours=renamed), truth, "yardstick")


def test_layers_come_from_the_model_and_scale_with_the_batch():
    with backend.use_backend("numpy"):
        model = models.attention56()
    layers = bench_kernels.model_layers(model, 32)
    modules = [m for _, m in model.named_modules()]
    fused_parts = {id(p) for m in modules if isinstance(m, ConvBnRelu) for p in (m.conv, m.bn)}

    def calls(family):
        return sum(n for layer, n in layers.items() if layer.family == family)

    assert calls("conv_bn_relu") == sum(isinstance(m, ConvBnRelu) for m in modules)
    assert calls("conv2d") == sum(isinstance(m, Conv2d) and id(m) not in fused_parts for m in modules)
    assert calls("batch_norm") == sum(isinstance(m, BatchNorm2d) and id(m) not in fused_parts for m in modules)
    assert calls("max_pool2d") == 3 + 2 + 1 and calls("attention_mix") == 3
    assert calls("upsample_bilinear") == 3 + 2 + 1                   # one per level, the last without skip
    sgd = next(layer for layer in layers if layer.family == "sgd_step")
    assert sgd.at_batch(64)["param"] == (sum(int(np.prod(p.shape)) for p in model.parameters()),)
    stem = next(layer for layer in layers if layer.family == "conv2d")
    assert stem.at_batch(64) == {"x": (64, 32, 32, 3), "w": (3, 3, 3, 16)}
    assert stem.label() == "32x32x3 → 32x32x16, 3x3/1"
    assert dict(stem.options) == {"stride": 1, "padding": 1}
    assert F.conv2d.__name__ == "conv2d"  # the recording wrappers are gone


def test_a_wrong_kernel_fails_the_agreement_check_loudly(rng, monkeypatch):
    layer = bench_kernels.Layer("attention_mix", (("mask_logits", (1, 4, 4, 8)), ("trunk", (1, 4, 4, 8))),
                                (("residual", True), ("from_logits", True)))
    session = common.Session(dry_run=True, torch=None, rng=rng)
    with backend.use_backend("interpret"):
        right = bench_kernels.run_layer(layer, {"attention56": 1}, 2, "ieee", session)
        assert right.errors["reference"] < 1e-6 and right.times == {}
        mix = attention_kernels.attention_mix
        # (1 + M) * t with M from a sigmoid off by a factor 2 in its argument: plausible, and wrong
        monkeypatch.setattr(attention_kernels, "attention_mix",
                            lambda m, t, residual, from_logits: mix(2 * m, t, residual, from_logits))
        with pytest.raises(common.AgreementError, match=r"attention_mix 4x4x8 at batch 2, ieee: ours against "
                                                        r"reference: .*\by\b.*dmask_logits"):
            bench_kernels.run_layer(layer, {"attention56": 1}, 2, "ieee", session)


def test_agreement_check_names_every_array_that_differs(rng):
    truth = {"y": rng.standard_normal(100), "dx": rng.standard_normal(100), "dw": rng.standard_normal(10)}
    close = {k: v * (1 + 1e-5) for k, v in truth.items()}
    assert common.check_agreement("op", close, truth, 1e-3) == pytest.approx(1e-5, rel=1e-6)
    wrong = dict(close, dx=close["dx"] * 1.1, dw=np.full(10, np.nan))
    with pytest.raises(common.AgreementError, match=r"op: .*dx 1\.0\de-01, dw inf"):
        common.check_agreement("op", wrong, truth, 1e-3)
    with pytest.raises(common.AgreementError, match="y inf"):
        common.check_agreement("op", {"dx": truth["dx"], "dw": truth["dw"]}, truth, 1e-3)


def test_graph_time_ms_divides_each_replay_by_the_calls_it_holds():
    class GraphClock(HostClock):
        """Capture records the calls; a replay sleeps 1 ms per call it holds."""
        def __init__(self):
            super().__init__()
            self.captured = self.replays = 0

        def side_stream(self):
            return contextlib.nullcontext()

        def capture(self, fn, calls):
            results = [fn() for _ in range(calls)]
            self.captured += calls

            def replay():
                self.replays += 1
                time.sleep(1e-3 * calls)
            return replay, results

    clock, calls = GraphClock(), []
    timing = common.graph_time_ms(lambda: calls.append(1), clock, calls=4, replays=5, warmup=2)
    assert len(calls) == 2 + 4 and clock.captured == 4 and clock.replays == 1 + 5 and timing.reps == 5
    assert 1.0 <= timing.q25 <= timing.median <= timing.q75 < 5.0   # per call, not per replay
    assert clock.flushes == 0                                         # device time: no L2 flush


class HostClock:
    """A stand-in for a CUDA clock: host time, flushes counted."""

    def __init__(self):
        self.flushes = 0

    def record(self):
        return time.perf_counter()

    def elapsed_ms(self, start, end):
        return (end - start) * 1e3

    def synchronize(self):
        pass

    def flush_l2(self):
        self.flushes += 1


def test_time_ms_repeats_within_its_budget_and_flushes_before_each_repetition():
    clock = HostClock()
    calls = []
    timing = common.time_ms(lambda: (calls.append(1), time.sleep(0.002)), clock, warmup=2, budget_ms=60,
                            min_reps=5, max_reps=1000)
    assert 5 <= timing.reps <= 30 and clock.flushes == timing.reps
    assert len(calls) == 2 + 3 + timing.reps                  # warm-up, estimate, repetitions
    assert 2.0 <= timing.q25 <= timing.median <= timing.q75 and timing.median < 20
    fast = common.time_ms(lambda: None, HostClock(), budget_ms=60, min_reps=5, max_reps=50)
    assert fast.reps == 50


def _kineto_trace(rng, steps: int, launches: dict):
    """A made-up kineto trace of ``steps`` steps, each launching ``launches`` (name -> count) in a
    random order with random durations and gaps, the host's events (API calls, operators) around
    them; returns the events and what a profile must make of them: (launches, µs) per step by name."""
    device, t, totals = [], rng.uniform(0, 1e6), {name: 0.0 for name in launches}
    for _ in range(steps):
        for name in rng.permutation([name for name, n in launches.items() for _ in range(n)]):
            duration = rng.uniform(0.5, 50.0)
            category = "gpu_memcpy" if name.startswith("Memcpy") else "gpu_memset" if name.startswith("Memset") \
                else "kernel"
            device.append({"ph": "X", "cat": category, "name": str(name), "ts": t, "dur": duration})
            totals[name] += duration
            t += duration + rng.uniform(0.0, 20.0)
    first, last = device[0]["ts"], device[-1]["ts"] + device[-1]["dur"]  # the host's events lie around them
    host = [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": first - 30.0, "dur": 5.0},
            {"ph": "X", "cat": "cpu_op", "name": "aten::add_", "ts": last + 10.0, "dur": 300.0},
            {"ph": "i", "cat": "Trace", "name": "PyTorch Profiler", "ts": first - 100.0}]
    events = list(rng.permutation(device + host))
    return events, {name: (n, totals[name] / steps) for name, n in launches.items()}


def test_kernel_profile_sums_each_kernels_device_time_per_step(rng):
    steps = int(rng.integers(2, 5))
    launches = {"conv2d_fwd_kernel": int(rng.integers(1, 6)), "bn_finalize_kernel": int(rng.integers(1, 6)),
                "cupy_copy__float32_float32": 1, "Memcpy DtoD (Device -> Device)": 1, "Memset (Device)": 2}
    events, expected = _kineto_trace(rng, steps, launches)
    profile = common.summarize_trace(events, steps)
    assert profile.kernels.keys() == expected.keys()     # the host's events are not device work
    for name, (n, us) in expected.items():
        assert profile.kernels[name][0] == pytest.approx(n, rel=1e-12)
        assert profile.kernels[name][1] == pytest.approx(us, rel=1e-12)
    assert profile.launches == pytest.approx(sum(launches.values()), rel=1e-12)
    assert profile.busy_ms == pytest.approx(sum(us for _, us in expected.values()) / 1e3, rel=1e-12)
    ranked = sorted(expected, key=lambda name: -expected[name][1])
    assert [name for name, _, _ in profile.top(2)] == ranked[:2]
    with pytest.raises(RuntimeError, match="no device work"):
        common.summarize_trace([e for e in events if e["cat"] in ("cuda_runtime", "cpu_op", "Trace")], steps)


def test_kernel_profile_records_only_the_steps_after_a_warm_one(rng, tmp_path):
    """The profiler's plumbing with a stand-in for torch.profiler that 'sees' a kernel per call made
    while it records: the warm call is not counted, the export is read back, the clock is synced."""
    recording, seen, syncs = [False], [], []

    class Profiler:
        def __init__(self, activities):
            assert activities == ["CUDA"]

        def __enter__(self):
            recording[0] = True
            return self

        def __exit__(self, *exc):
            recording[0] = False

        def export_chrome_trace(self, path):
            Path(path).write_text(json.dumps({"traceEvents": seen}))

    def step():
        if recording[0]:
            seen.append({"cat": "kernel", "name": "sgd_step_kernel", "ts": 10.0 * len(seen), "dur": 4.0})

    torch = SimpleNamespace(profiler=SimpleNamespace(profile=Profiler, ProfilerActivity=SimpleNamespace(CUDA="CUDA")),
                            cuda=SimpleNamespace(is_available=lambda: True))
    clock = SimpleNamespace(synchronize=lambda: syncs.append(recording[0]))
    steps = int(rng.integers(2, 6))
    profile = common.kernel_profile(torch, step, clock, steps=steps)
    assert len(seen) == steps and syncs == [False, True]  # synced after the warm call and before the stop
    assert profile.kernels == {"sgd_step_kernel": (1.0, 4.0)}


def test_kernel_profile_runs_torch_profiler(torch):
    """The real torch.profiler path: on a GPU a CUDA add is seen as a kernel; without one, a clear
    error rather than a profile of nothing."""
    on_gpu = torch.cuda.is_available()
    x = torch.ones(1024, device="cuda" if on_gpu else "cpu")
    clock = SimpleNamespace(synchronize=torch.cuda.synchronize if on_gpu else lambda: None)
    if on_gpu:
        profile = common.kernel_profile(torch, lambda: x.add_(1), clock, steps=2)
        assert profile.launches >= 1 and profile.busy_ms > 0
        assert float(x[0]) == 4.0                              # the warm call and two recorded ones ran
    else:
        with pytest.raises(RuntimeError, match="needs a CUDA build of PyTorch and a GPU"):
            common.kernel_profile(torch, lambda: x.add_(1), clock, steps=2)


def test_a_profile_that_cannot_run_leaves_a_reason_not_a_failure():
    calls = []
    session = SimpleNamespace(torch=SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False)))
    late = bench_step._profile(session, lambda: calls.append(1), None, until=time.monotonic() - 1)
    assert late == "no profile: time ran short" and not calls
    failed = bench_step._profile(session, lambda: calls.append(1), None, until=math.inf)
    assert failed.startswith("no profile: RuntimeError: a kernel profile needs a CUDA build of PyTorch")

def test_step_report_shows_where_the_device_time_goes():
    """The profile tables from made-up profiles (not measurements): each side's kernels and busy
    time against its step, the costliest kernels of our captured step and of a PyTorch side (a long
    cuDNN name shortened), and a failed profile's reason."""
    def ms(median):
        return common.Timing(median, median, median, 10)

    names = [f"kernel_{i}" for i in range(bench_step.PROFILE_TOP + 2)]
    ours = common.KernelProfile({name: (2.0, 100.0 * (i + 1)) for i, name in enumerate(names)})
    row = {"model": "attention92", "batch": 64, "errors": {"ours": 1e-3}, "yardstick": "PyTorch eager",
           "times": {"tf32": {"ours captured": ms(10.0), "ours eager": ms(40.0), "PyTorch eager": ms(20.0)}},
           "memory": {}, "variants": ["PyTorch eager"], "identical": {"tf32": True},
           "profiles": {"ours captured": ours, "PyTorch eager": "no profile: RuntimeError: CUPTI"}}
    cudnn = "sm90_xmma_wgrad_implicit_gemm_indexed_tf32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize" + "x" * 200
    theirs = common.KernelProfile({cudnn: (4.0, 500.0), "elementwise_kernel": (8.0, 100.0)})
    with_theirs = re.sub(" +", " ", bench_step.report([dict(row, profiles=dict(row["profiles"], **{
        "PyTorch eager": theirs}))], ["tf32"], dry_run=False))
    assert "PyTorch eager, by kernel" in with_theirs and "| elementwise_kernel | 8 | 100 | 17% |" in with_theirs
    shown = cudnn[:bench_step.KERNEL_NAME_CHARS - 1] + "…"
    assert f"| {shown} | 4 | 500 | 83% |" in with_theirs and cudnn[:bench_step.KERNEL_NAME_CHARS] not in with_theirs
    text = re.sub(" +", " ", bench_step.report([row], ["tf32"], dry_run=False))
    assert "PyTorch eager, by kernel" not in text
    # images/s: 64 / 10 ms, 64 / 40 ms, 64 / 20 ms; then each other side's time over ours captured
    assert "| attention92 | 64 | 6,400 | 1,600 | 3,200 | 4.00 | 2.00 | yes | 1.0e-03 |" in text
    assert "Where the step's time goes on the device, TF32" in text
    assert "| attention92 | 64 | ours captured | 10.00 | 24 | 7.80 | 78% |" in text   # 12 x 2; 100 x 78 µs
    assert "ours captured, by kernel" in text
    assert "| attention92 | 64 | PyTorch eager | 20.00 | no profile: RuntimeError: CUPTI | - | - |" in text
    assert "| kernel_11 | 2 | 1,200 | 15% |" in text and "| kernel_2 | 2 | 300 | 4% |" in text
    assert "| (2 others) | 4 | 300 | 4% |" in text and "| kernel_1 |" not in text   # kernel_0 and kernel_1
    del row["profiles"]
    assert "Where the step's time goes" not in bench_step.report([row], ["tf32"], dry_run=False)


def _timing(ms):
    return common.Timing(ms, ms, ms, 20)


def test_reports_from_measured_numbers(tmp_path):
    """The GPU-only report path (tables, summary, chart, RESULTS.md, JSON), fed made-up timings."""
    layers = bench_kernels.benchmark_layers(["attention56"], dry_run=True)
    conv = next((layer, uses) for layer, uses in layers if layer.family == "conv2d")
    sgd = next((layer, uses) for layer, uses in layers if layer.family == "sgd_step")
    results = [
        bench_kernels.LayerResult(*conv, 64, "tf32", {"PyTorch": 1e-4},
                                  {("ours", "fwd"): _timing(1.0), ("PyTorch", "fwd"): _timing(2.0),
                                   ("ours", "fwd+bwd"): _timing(3.0), ("PyTorch", "fwd+bwd"): _timing(1.5)}),
        bench_kernels.LayerResult(*sgd, 64, "tf32", {"PyTorch": 1e-7},
                                  {("ours", "fwd"): _timing(0.5), ("PyTorch", "fwd"): _timing(0.25)})]
    ceilings = common.Ceilings(4e12, {"ieee": 50e12, "tf32": 400e12, "bf16": 800e12})
    table = bench_kernels.layer_table(results, ["attention56"], ceilings)
    conv_row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert conv_row[3:9] == ["1,000.0", "2,000.0", "2.00", "3,000.0", "1,500.0", "0.50"]   # µs
    assert conv_row[9].endswith("GB/s") and conv_row[10].endswith("%")   # the stem conv is memory-bound
    summary = bench_kernels.summary_table(results, ["attention56"], [64])
    uses = conv[1]["attention56"]
    all_row = summary.splitlines()[-1]
    assert all_row.split("|")[2].strip() == f"{(uses * 1.5 + 0.25) / (uses * 3.0 + 0.5):.2f}"
    args = SimpleNamespace(out=tmp_path, budget_ms=100.0, command="python -m bench.kernels")
    session = common.Session(dry_run=False, torch=None, rng=np.random.default_rng(0))
    bench_kernels.write_report(args, session, ceilings, results, [table, summary])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## bench.kernels" in text and table in text and "![PyTorch / ours per layer](charts/kernels-" in text
    chart = next((tmp_path / "charts").glob("*.png"))
    assert chart.read_bytes()[:4] == b"\x89PNG"
    raw = json.loads(chart.with_suffix(".json").read_text())
    assert raw["results"][0]["times_ms"]["ours fwd"]["median"] == 1.0 and raw["ceilings"]["copy_bytes_per_s"] == 4e12
    chart.unlink()
    assert bench_kernels.main(["--chart-from", str(chart.with_suffix(".json"))]) == 0 and chart.exists()


def _tf32(a):
    """float32 ``a`` rounded to TF32's 10 mantissa bits, as the tensor cores read it."""
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def test_relu_layers_are_compared_away_from_the_kink(rng):
    """TF32 rounding of the inputs alone (what a correct TF32 kernel does) moves the gradients of
    conv_bn_relu by about 1e-2 through ReLUs that flip at the kink (as ours and cuDNN's did on the
    H200); with dy zeroed near the kink the same rounding is what it is without a ReLU, ~2e-4."""
    layer = bench_kernels.Layer("conv_bn_relu", (("x", (1, 16, 16, 64)), ("w", (1, 1, 64, 16)), ("gamma", (16,)),
                                                 ("beta", (16,)), ("running_mean", (16,)), ("running_var", (16,))),
                                (("stride", 1), ("padding", 0), ("relu", True)))
    host, dy = bench_kernels.draw_inputs(layer, 64, rng)
    family, options = bench_kernels.FAMILIES["conv_bn_relu"], dict(layer.options)

    def gradients(inputs, dy):
        side = bench_kernels.OurSide(family, reference, bench_kernels._float64(inputs), options,
                                     dy.astype(np.float64))
        return side.results()

    rounded = dict(host, x=_tf32(host["x"]), w=_tf32(host["w"]))
    kinked = common.check_agreement("kinks", gradients(rounded, dy), gradients(host, dy), 1.0)
    away = bench_kernels.away_from_relu_kink(layer, host, dy)
    assert 0.4 < np.mean(away == dy) < 0.6          # dy is kept where the ReLU passes (about half)
    assert kinked > 3e-3
    assert common.check_agreement("away", gradients(rounded, away), gradients(host, away), 1e-3) < 1e-3
    no_relu = bench_kernels.Layer(layer.family, layer.shapes, (("stride", 1), ("padding", 0), ("relu", False)))
    assert bench_kernels.away_from_relu_kink(no_relu, host, dy) is dy


# --------------------------------------------------------------------------- the GPU run, dry

def test_gpu_check_dry_run_runs_every_stage(rng, tmp_path, capsys):
    from bench import gpu_check

    before = RESULTS.read_text()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--seed", _seed(rng)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| stage"):]
    for stage in gpu_check.STAGE_NAMES:
        assert f"| {stage} " in table, stage
    assert "FAILED" not in table and "skipped: not enough" not in table
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.log", "summary.md", "tests.xml",
                                                    "train_metrics_tf32.csv", "kernels.json"}
    assert gpu_check._junit_results(tmp_path / "tests.xml")["counts"]["passed"] > 0
    records = json.loads((tmp_path / "kernels.json").read_text())["results"]
    assert {r["family"] for r in records} == set(bench_kernels.FAMILIES) and not any(r["times_ms"] for r in records)
    summary = (tmp_path / "summary.md").read_text()
    assert "### step" in summary and "### imagenet" in summary and "JPEGs at 120x90" in summary
    assert RESULTS.read_text() == before


def test_gpu_check_names_a_subset_copy_that_lands_where_it_looks(monkeypatch, tmp_path):
    """Without the CIFAR-10 subset the training stage names the copy to make, and that command, run
    from a repository root beside ../shared, puts the subset where find_cifar_subset looks first (a
    bare ``cp -r ... data/`` into a missing data/ made data/ the subset itself, and a GPU run's
    training stage found nothing)."""
    import subprocess

    from bench import gpu_check

    (tmp_path / "shared" / "data" / "cifar10-subset" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    subprocess.run(["bash", "-c", common.CIFAR_SUBSET_COPY], cwd=tmp_path / "repo", check=True)
    first = tmp_path / "repo" / common.CIFAR_SUBSET_CANDIDATES[0].relative_to(common.REPO)
    assert common.find_cifar_subset(first) == first
    monkeypatch.setattr(common, "find_cifar_subset", lambda given: None)
    args = gpu_check.parse_args(["--out", str(tmp_path / "out")])
    assert common.CIFAR_SUBSET_COPY in gpu_check.stage_train(args)["line"]
    given = gpu_check.parse_args(["--out", str(tmp_path / "out2"), "--data", str(tmp_path / "nowhere")])
    line = gpu_check.stage_train(given)["line"]  # the folder asked for, not the default one
    assert line.startswith(f"--data {tmp_path / 'nowhere'}: no CIFAR-10 subset there") and "mkdir" not in line


def test_gpu_check_plans_the_imagenet_step_in_the_full_run_only():
    from bench import gpu_check

    full, quick = gpu_check.parse_args([]), gpu_check.parse_args(["--quick"])
    assert "imagenet56:64:tf32" in gpu_check.warm_jobs(full) and "imagenet56:64:ieee" in gpu_check.warm_jobs(full)
    assert not any(job.startswith("imagenet") for job in gpu_check.warm_jobs(quick))
    assert next(s for s in gpu_check.STAGES if s.name == "imagenet").quick_limit_s == 0


def test_gpu_check_step_stage_starts_a_configuration_only_if_it_fits_and_keeps_what_it_did(monkeypatch, tmp_path):
    """A configuration cut by the stage's limit would lose every timing, so the next one starts only
    if one as long as the longest so far fits before the deadline; and after each configuration the
    result so far is written, for the parent to keep should the stage be stopped. A fake clock: each
    configuration takes 40 s, the deadline is 90 s away (a limit of 100 s less the report's margin)."""
    from bench import gpu_check
    from bench import step as bench_step

    now = [0.0]
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    args.limit, args.result, written = 100.0, tmp_path / "step.json", []

    def run_config(name, batch, options, session):
        now[0] += 40.0
        return {"model": name, "batch": batch, "times": {}, "identical": {}, "profiles": {}}

    def write_result(args, result):
        written.append(result["line"])

    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(gpu_check, "_write_result", write_result)
    monkeypatch.setattr(bench_step, "run_config", run_config)
    monkeypatch.setattr(bench_step, "report", lambda *args: "")
    monkeypatch.setattr(gpu_check, "_session", lambda args: SimpleNamespace(dry_run=False))
    result = gpu_check.stage_step(args)
    assert now[0] == 80.0   # two configurations: a third would have ended at 120 s
    assert result["line"].endswith("not run (time): attention92 b128, attention56 b128")
    assert written == ["1 configuration(s) agree (dry run: no timing)", "2 configuration(s) agree (dry run: no timing)"]


def test_gpu_check_keeps_what_a_stopped_stage_had_written(tmp_path, monkeypatch):
    """A stage stopped at its limit is a failure; what it had written of its result (its line and
    report, the timings in it) is kept, and without a result the line says only that it stopped."""
    from bench import gpu_check

    args = gpu_check.parse_args(["--out", str(tmp_path)])
    args.work = tmp_path
    log = gpu_check.Log(tmp_path / "gpu_check.log")
    stage = next(s for s in gpu_check.STAGES if s.name == "step")

    def child(args, *extra):   # writes a result as the step stage does after a configuration, then hangs
        path = extra[extra.index("--result") + 1]
        partial = {"ok": True, "line": "56 b64 6,400 img/s", "report": "the table"}
        return [sys.executable, "-c", f"import json, time; open({path!r}, 'w').write(json.dumps({partial!r})); "
                                      f"time.sleep(60)"]

    monkeypatch.setattr(gpu_check, "_child_command", child)
    result = gpu_check.run_stage(stage, 3.0, args, log)
    assert not result["ok"] and result["report"] == "the table"
    assert result["line"] == "stopped at its time limit (3 s); before that: 56 b64 6,400 img/s"
    (tmp_path / "step.json").unlink()
    monkeypatch.setattr(gpu_check, "_child_command", lambda args, *extra: [sys.executable, "-c", "import time; "
                                                                                             "time.sleep(60)"])
    assert gpu_check.run_stage(stage, 2.0, args, log)["line"] == "stopped at its time limit (2 s)"


def test_the_imagenet_networks_are_benchmarked_at_their_size_and_never_in_a_dry_run():
    from bench import step as bench_step

    assert common.model_input("imagenet56", False) == (224, 1000)
    assert common.model_input("attention56", True) == (common.DRY_RUN_IMAGE, common.NUM_CLASSES)
    with pytest.raises(ValueError, match="imagenet92 has no dry-run version"):
        common.build_model("imagenet92", dry_run=True)
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--dry-run", "--models", "imagenet56"])


def test_gpu_check_reads_failures_and_their_seeds(tmp_path):
    from bench import gpu_check

    (tmp_path / "r.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok[cuda]"/>'
        '<testcase classname="tests.test_a" name="test_bad[cuda]"><properties><property name="seed" value="42"/>'
        '</properties><failure message="AssertionError: 2 != 3&#10;more">trace</failure></testcase>'
        '<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase></testsuite></testsuites>')
    results = gpu_check._junit_results(tmp_path / "r.xml")
    assert results["counts"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1}
    assert results["failed"] == [{"test": "tests.test_a::test_bad[cuda]", "seed": "42",
                                  "message": "AssertionError: 2 != 3"}]


# --------------------------------------------------------------------------- the PyTorch twin

TINY = dict(modules_per_stage=1, stem=4, widths=(8, 16, 32), num_classes=5)


@pytest.fixture
def torch():
    """PyTorch on one thread (skip without it): these are milliseconds of work, and OpenMP's waiting
    threads made them a hundred times slower beside another busy test worker on 2 cores."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def _tiny_cifar(variant, seed):
    return models.ResidualAttentionNet(**TINY, **variant, seed=seed), 16


def _imagenet56(variant, seed):
    return models.imagenet_attention56(num_classes=5, **variant, seed=seed), 64


def _float64_step(model, x, labels):
    """One training step's logits, loss, parameter gradients, and parameters and running statistics
    after it (numpy backend, float64), copied, keyed by name."""
    for p in model.parameters():
        p.grad = None
    logits = model(Tensor(x))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    out = {"logits": logits.data, "loss": loss.data, **model.state_dict()}
    out.update((f"grad {name}", p.grad) for name, p in model.named_parameters())
    return {name: np.array(value) for name, value in out.items()}


@pytest.mark.parametrize("network, variant", [(_tiny_cifar, dict()), (_tiny_cifar, dict(residual_attention=False)),
                                              (_tiny_cifar, dict(attention="channel")),
                                              (_tiny_cifar, dict(attention="spatial")), (_imagenet56, dict())],
                         ids=["ARL", "NAL", "channel", "spatial", "imagenet56"])
def test_torch_model_gives_our_logits_gradients_and_statistics(torch, rng, network, variant):
    """float64 on both sides (our numpy backend, PyTorch on the CPU), training mode, same weights and
    batch. The two differ only in summation order, so they agree to float64 rounding as this
    instance carries it. Mostly that is ~1e-12 of each array's scale, but some instances carry it
    much further: in the tiny network a mask head's position where one ReLU alone is on, with a
    small value v, sends its feature a gradient that is exactly zero (the channel or spatial
    normalisation after it does not see that feature's scale), computed as rounding of size
    1/v; that noise reaches the mask branch's batch-norm gradients, and 3 draws in 1,100 of the
    channel variant were 1.4e-9 to 2.3e-9 apart (one CI failure at the fixed bound 1e-9). So a
    yardstick measures the instance: the largest difference between our step and our step on the
    input moved by one ulp, over three moves; each array must agree within 1e-9 + 8 x that.
    On those 3 draws the twin's difference was 0.2 to 2.3 x the yardstick. Any difference in the
    computation is orders of magnitude beyond both. The whole ImageNet Attention-56 at 64x64 too:
    its 7x7 stem, Caffe's ceil-mode pools, 2048 channels."""
    from bench import torch_model

    model, image = network(variant, int(rng.integers(1 << 30)))
    model = model.astype(np.float64)
    net = torch_model.from_ours(model)
    initial = {name: value.copy() for name, value in model.state_dict().items()}
    x, labels = rng.standard_normal((3, image, image, 3)), rng.integers(0, 5, 3)
    ours = _float64_step(model, x, labels)
    yardstick = dict.fromkeys(ours, 0.0)
    for _ in range(3):
        moved = _float64_step(model.load_state_dict(initial), x * (1 + np.finfo(np.float64).eps
                                                                    * rng.choice([-1.0, 1.0], x.shape)), labels)
        yardstick = {name: max(yardstick[name], common.relative_error(moved[name], ours[name])) for name in ours}
    torch_logits = net(torch_model.to_torch(torch.from_numpy(x), "nhwc"))
    torch_loss = torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels))
    torch_loss.backward()
    grads, state = torch_model.as_ours(net, "grad"), torch_model.as_ours(net)
    assert set(grads) == {n for n, _ in model.named_parameters()} and set(state) == set(model.state_dict())
    theirs = {"logits": torch_logits.detach().numpy(), "loss": torch_loss.detach().numpy(), **state,
              **{f"grad {name}": value for name, value in grads.items()}}
    for name in ours:  # parameters, and the running statistics just updated, too
        error, bound = common.relative_error(ours[name], theirs[name]), 1e-9 + 8 * yardstick[name]
        assert error <= bound, f"{name}: {error:.2e} from PyTorch, past {bound:.2e} (yardstick {yardstick[name]:.2e})"


def test_torch_model_refuses_a_state_that_does_not_fit(torch):
    from bench import torch_model

    with backend.use_backend("numpy"):
        state = models.ResidualAttentionNet(**TINY).state_dict()
    net = torch_model.ResidualAttentionNet(**TINY)
    with pytest.raises(KeyError, match="without a value: .*stem.weight"):
        torch_model.load_our_state(net, {k: v for k, v in state.items() if k != "stem.weight"})
    with pytest.raises(ValueError, match="classifier.weight"):
        torch_model.load_our_state(net, dict(state, **{"classifier.weight": np.zeros((32, 6), np.float32)}))
    assert torch.equal(torch_model.load_our_state(net, state).stem.weight,
                       torch.from_numpy(state["stem.weight"]).permute(3, 2, 0, 1))


def test_loader_benchmark_dry_run_decodes_and_writes_nothing(capsys):
    from bench import loader as bench_loader

    before = RESULTS.read_text()
    assert bench_loader.main(["--dry-run", "--backend", "numpy", "--workers", "1", "2"]) == 0
    line = capsys.readouterr().out
    assert "32 JPEGs at 120x90" in line and "1 thread " in line and "2 threads " in line
    assert "not a benchmark" in line and RESULTS.read_text() == before


def test_ptxas_audit_groups_launches_by_specialisation(rng):
    # Two conv_bn_relu forwards of one shape and one of another: their conv launches make two
    # specialisations (counted 2 and 1), the batch-norm applies are not matrix products and are
    # left out, and the summary adds the launches up per kernel.
    from ra_kernels import launch
    from ra_kernels.kernels import conv

    def forward(c_out):
        x = backend.asarray(rng.standard_normal((2, 6, 6, 16)).astype(np.float32))
        w = backend.asarray(rng.standard_normal((3, 3, 16, c_out)).astype(np.float32))
        bn = [backend.asarray(np.ones(c_out, np.float32)) for _ in range(4)]
        conv.conv_bn_relu(x, w, *bn, 1, 1)

    with backend.use_backend("interpret"), launch.record_launches(run=False) as calls:
        forward(32), forward(32), forward(64)
    rows = bench_ptxas.audit(calls)
    assert [(name, n) for name, _, n, _ in rows] == [("conv2d_fwd_kernel", 2), ("conv2d_fwd_kernel", 1)]
    assert [consts["BLOCK_N"] for _, consts, _, _ in rows] == [32, 64]
    assert all(0 < report.registers <= 255 for *_, report in rows)
    (total,) = bench_ptxas.summary(rows)
    assert total[:3] == ["conv2d_fwd_kernel", 3, 2]
    assert total[3] == max(report.registers for *_, report in rows)
    with pytest.raises(SystemExit) as usage:
        bench_ptxas.main(["--batch", "1"])
    assert usage.value.code == 2


@pytest.mark.parametrize("command, argv, says", [
    ("kernels", ["--dry-run", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
    ("step", ["--budget-ms", "nan"], "argument --budget-ms: expected a finite number > 0, got nan"),
    ("gpu_check", ["--dry-run", "--budget-s", "0"], "argument --budget-s: expected a finite number > 0, got 0"),
    ("allreduce", ["--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    ("gpu_check", ["--dry-run", "--out", "A_FILE"], "--out A_FILE is a file, not a directory"),
    ("loader", ["--out", "A_FILE/results"], "--out A_FILE/results: cannot write files there"),
    ("step", ["--out", "A_FILE"], "--out A_FILE is a file, not a directory"),
    ("kernels", ["--chart-from", "A_FILE.json"], "--chart-from A_FILE.json: no such file"),
    ("loader", ["--dry-run", "--data", "A_FILE"], "--data A_FILE: no CIFAR-10 subset there")])
def test_bench_options_are_refused_before_anything_is_measured(tmp_path, capsys, command, argv, says):
    """Bad values, and an --out where the results could not be written, stop a benchmark at once: on
    a lent GPU they used to surface after the measurements (or as NaN rows in RESULTS.md)."""
    import importlib
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    module = importlib.import_module(f"bench.{command}")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args([arg.replace("A_FILE", str(a_file)) for arg in argv])
    assert exit_info.value.code == 2
    assert says.replace("A_FILE", str(a_file)) in capsys.readouterr().err


@pytest.mark.parametrize("command", ["loader", "allreduce"])
def test_a_backend_that_cannot_run_is_an_error_in_words(command, monkeypatch, capsys):
    import importlib
    monkeypatch.setattr(backend, "gpu_available", lambda: False)  # as on this CPU, on any machine
    module = importlib.import_module(f"bench.{command}")
    if command == "allreduce":  # as under mpiexec: the backend is chosen after the job is seen
        monkeypatch.setattr(module.distributed, "world", lambda: SimpleNamespace(distributed=True))
    with backend.use_backend(backend.get_backend()):  # whatever the command selects is undone after
        assert module.main(["--dry-run", "--backend", "cuda"]) == 2
    assert f"python -m bench.{command}: error: backend 'cuda' needs CuPy and a GPU" in capsys.readouterr().err
