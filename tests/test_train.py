"""The training command line (train.cifar, train.masks) on the numpy backend, end to end.

Most tests train a narrow network (stem 8, widths 16 32 64) on a tiny CIFAR-10
written by the test in the official format (random images: these tests check
the machinery, not learning), a few steps of batch 8, in-process through
``main(argv)``. Learning itself is checked on 64 real images from the CIFAR-10
subset in ../shared/data (skipped when it is absent).
"""
import contextlib
import importlib.util
import io
import json
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ra_kernels.functional as F
from ra_kernels import backend
from ra_kernels.data import BatchLoader, load_cifar
from ra_kernels.metrics import TOTALS, accumulate_metrics
from ra_kernels.models import ResidualAttentionNet
from ra_kernels.optim import SGD

pytest.importorskip("tqdm", reason="train.cifar draws its progress bar with tqdm")
from train import cifar, masks, run  # noqa: E402
from train import common as cifar_common  # noqa: E402

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the figures need matplotlib")

REPO = Path(__file__).resolve().parents[1]
CIFAR10_SUBSET = REPO / ".." / "shared" / "data" / "cifar10-subset"
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_PER_FILE, TEST_IMAGES, BATCH = 8, 16, 8  # 40 training images: 5 steps per epoch
STEPS_PER_EPOCH = 5 * TRAIN_PER_FILE // BATCH


def _write_tiny_cifar10(data_dir, rng):
    """data_dir/cifar-10-batches-py as the official files are laid out (data.py's docstring), small."""
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [(f"data_batch_{i}", TRAIN_PER_FILE) for i in range(1, 6)] + [("test_batch", TEST_IMAGES)]
    for name, n in files:
        content = {b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                   b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode(),
                   b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=2)  # the official files are Python 2 pickles
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CLASS_NAMES]}, f, protocol=2)
    return data_dir


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return _write_tiny_cifar10(tmp_path_factory.mktemp("data"), np.random.default_rng())


def _argv(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--no-download", "--epochs", "2",
            "--batch-size", str(BATCH), "--stem", "8", "--widths", "16", "32", "64", "--backend", "numpy",
            "--seed", "3", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """An uninterrupted 2-epoch run: (its --out directory, what it printed)."""
    out = tmp_path_factory.mktemp("run") / "uninterrupted"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cifar.main(_argv(tiny_data, out)) == 0
    return out, printed.getvalue()


def _checkpoint_arrays(path):
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _meta(path):
    return json.loads(str(_checkpoint_arrays(path)["meta"]))


# --------------------------------------------------------------------------- outputs

@needs_matplotlib
def test_outputs_of_a_run(finished_run):
    out, printed = finished_run
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == list(run.METRICS_COLUMNS)
    rows = [dict(zip(run.METRICS_COLUMNS, map(float, line.split(",")))) for line in lines[1:]]
    assert [(r["epoch"], r["iteration"]) for r in rows] == [(1, STEPS_PER_EPOCH), (2, 2 * STEPS_PER_EPOCH)]
    for r in rows:
        for split in ("train", "test"):  # top-5 of 10 classes counts at least the top-1 hits
            assert 0 <= r[f"{split}_accuracy"] <= r[f"{split}_top5_accuracy"] <= 1
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"])
        assert r["images_per_second"] > 0 and r["lr"] > 0
    # The paper schedule over 10 iterations divides at 4 and 6: the last step of each epoch runs at lr/10, lr/100.
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.001])
    assert rows[1]["seconds"] > rows[0]["seconds"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = _meta(out / "last.npz")
    assert (meta["epoch"], meta["batch"], meta["iteration"]) == (2, 0, 2 * STEPS_PER_EPOCH)
    assert meta["best"]["epoch"] == _meta(out / "best.npz")["epoch"]
    # What is reported is the last epoch's test accuracy, whichever epoch best.npz holds.
    assert f"final test accuracy (last epoch, 2): {rows[1]['test_accuracy']:.2%}" in printed


def test_eval_only_reproduces_the_last_epoch(finished_run, tiny_data, capsys):
    out, _ = finished_run
    last_row = dict(zip(run.METRICS_COLUMNS, (out / "metrics.csv").read_text().splitlines()[-1].split(",")))
    test_loss, test_accuracy, test_top5 = (float(last_row[f"test_{name}"]) for name in ("loss", "accuracy",
                                                                                          "top5_accuracy"))
    assert cifar.main(["--eval-only", str(out / "last.npz"), "--data-dir", str(tiny_data),
                       "--batch-size", str(BATCH), "--backend", "numpy"]) == 0
    printed = capsys.readouterr().out
    assert "end of epoch 2 of a 2-epoch run (iteration 10)" in printed
    # Same weights, same test batches, same backend: the same numbers as printed at the epoch's end.
    assert (f"test accuracy {test_accuracy:.2%}  top-5 {test_top5:.2%}  test loss {test_loss:.4f}  "
            f"({TEST_IMAGES} images") in printed


def test_bfloat16_needs_a_kernel_backend_and_a_resumed_run_keeps_its_precision(finished_run, tiny_data, tmp_path,
                                                                               capsys):
    assert cifar.main(_argv(tiny_data, tmp_path / "bf16", "--precision", "bf16")) == run.EXIT_USAGE
    assert "--precision bf16 runs on the cuda and interpret backends" in capsys.readouterr().err
    assert not (tmp_path / "bf16" / "last.npz").exists()
    out, _ = finished_run
    assert cifar.main(_argv(tiny_data, out, "--resume", "--precision", "bf16")) == run.EXIT_USAGE
    assert "--precision 'bf16' (the run has 'tf32')" in capsys.readouterr().err
    # Where it runs, the option selects the precision of the backend's ops (the network in bfloat16
    # is tested in test_models.py: here a run on the interpreter would take minutes).
    with backend.use_backend("interpret"), backend.use_precision("tf32"):
        assert cifar_common.select_precision("bf16") == "bf16" == backend.get_precision()


@needs_matplotlib
def test_masks_writes_one_png_per_image(finished_run, tiny_data, tmp_path, capsys, monkeypatch):
    out, _ = finished_run
    monkeypatch.setattr(masks, "FIGURE_BATCH", 2)  # two forward passes: the second batch's figures too
    assert masks.main([str(out / "last.npz"), "--out", str(tmp_path / "figures"), "--images", "3",
                       "--data-dir", str(tiny_data), "--backend", "numpy"]) == 0
    written = sorted((tmp_path / "figures").glob("*.png"))
    assert [p.name for p in written] == ["masks_0.png", "masks_1.png", "masks_2.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert "earlier run" not in capsys.readouterr().err
    # Again into the same folder with fewer images: the third figure is the first run's, and said to be.
    assert masks.main([str(out / "last.npz"), "--out", str(tmp_path / "figures"), "--images", "2",
                       "--data-dir", str(tiny_data), "--backend", "numpy"]) == 0
    assert f"note: {tmp_path / 'figures'} also holds masks_2.png from an earlier run (1 file)" \
        in capsys.readouterr().err


def test_channel_mean_masks_are_upsampled_means():
    mask = np.random.default_rng().random((2, 8, 8, 5)).astype(np.float32)
    (resized,) = masks.channel_mean_masks({"stage3.1": mask}).values()
    assert resized.shape == (2, 32, 32)
    # Corner-aligned bilinear resizing keeps the corners.
    np.testing.assert_allclose(resized[:, [0, 0, -1, -1], [0, -1, 0, -1]],
                               mask.mean(-1)[:, [0, 0, -1, -1], [0, -1, 0, -1]], rtol=1e-6)


# --------------------------------------------------------------------------- resume

def _interrupt_at(*iterations):
    """An after_step hook that sends the process SIGINT (Ctrl-C) after the given iterations."""
    def after_step(run):
        if run.position["iteration"] in iterations:
            signal.raise_signal(signal.SIGINT)  # runs the Python handler before returning
    return after_step


def test_interrupted_and_resumed_run_is_bitwise_the_uninterrupted_one(finished_run, tiny_data, tmp_path, capsys):
    # numpy backend: every operation repeats exactly, so an exact resume gives the same bits.
    out = tmp_path / "interrupted"
    argv = _argv(tiny_data, out)
    assert cifar.main(argv, after_step=_interrupt_at(3)) == run.EXIT_INTERRUPTED  # mid-epoch 1
    assert "--resume" in capsys.readouterr().err
    meta = _meta(out / "last.npz")
    assert (meta["epoch"], meta["batch"], meta["iteration"]) == (0, 3, 3)
    assert cifar.main(argv + ["--resume"], after_step=_interrupt_at(7)) == run.EXIT_INTERRUPTED  # mid-epoch 2
    # Resuming needs only --out: the rest comes from the checkpoint (the data too).
    assert cifar.main(["--out", str(out), "--resume"]) == 0
    want, got = _checkpoint_arrays(finished_run[0] / "last.npz"), _checkpoint_arrays(out / "last.npz")
    assert sorted(got) == sorted(want)
    for name in want:
        if name != "meta":
            assert np.array_equal(got[name], want[name]), name
    for row_got, row_want in zip(_meta(out / "last.npz")["history"], _meta(finished_run[0] / "last.npz")["history"]):
        timing = ("seconds", "images_per_second")
        assert {k: v for k, v in row_got.items() if k not in timing} == \
               {k: v for k, v in row_want.items() if k not in timing}


def test_a_checkpoint_from_before_top5_resumes_with_the_count_unknown(finished_run, tiny_data, tmp_path, capsys):
    """Checkpoints written before top-5 was counted hold (3,) training totals: resumed mid-epoch,
    the epoch's top-5 accuracy is unknown (NaN), everything else as before."""
    out = tmp_path / "old"
    assert cifar.main(_argv(tiny_data, out), after_step=_interrupt_at(STEPS_PER_EPOCH + 2)) == run.EXIT_INTERRUPTED
    meta, arrays = run.npzfile.read(out / "last.npz")
    arrays["train_totals"] = arrays["train_totals"][:3]
    run.npzfile.write(out / "last.npz", arrays, meta)
    assert cifar.main(["--out", str(out), "--resume"]) == 0
    lines = (out / "metrics.csv").read_text().splitlines()[1:]
    rows = [dict(zip(run.METRICS_COLUMNS, line.split(","))) for line in lines]
    want = (finished_run[0] / "metrics.csv").read_text().splitlines()[2].split(",")
    assert rows[1]["train_top5_accuracy"] == "nan" and float(rows[0]["train_top5_accuracy"]) >= 0
    assert rows[1]["train_loss"] == want[run.METRICS_COLUMNS.index("train_loss")]


def test_sigterm_stops_a_run_like_ctrl_c(tiny_data, tmp_path, capsys):
    """A batch system (or Open MPI's mpirun on Ctrl-C) sends SIGTERM before killing: the run stops
    after the step with a checkpoint, as for Ctrl-C."""
    out = tmp_path / "terminated"

    def terminate(state):
        if state.position["iteration"] == 2:
            signal.raise_signal(signal.SIGTERM)
    assert cifar.main(_argv(tiny_data, out), after_step=terminate) == run.EXIT_INTERRUPTED
    captured = capsys.readouterr()
    assert "SIGTERM: stopping after this step" in captured.out + captured.err
    assert _meta(out / "last.npz")["iteration"] == 2


@pytest.mark.parametrize("epochs", [1, 2])
def test_ctrl_c_during_an_epoch_ends_writes_stops_before_the_next_step(tiny_data, tmp_path, capsys, monkeypatch,
                                                                      epochs):
    """Ctrl-C while the epoch end writes its files stops the run there, with the epoch's checkpoint
    (it used to take one more step first); after the last epoch the run has ended, and ends well."""
    out = tmp_path / "stopped"
    write_metrics_csv, write_checkpoint, written = run.write_metrics_csv, run.write_checkpoint, []
    monkeypatch.setattr(run, "write_metrics_csv",
                        lambda *a: (signal.raise_signal(signal.SIGINT), write_metrics_csv(*a)))
    monkeypatch.setattr(run, "write_checkpoint", lambda *a: (written.append(a[-1]["iteration"]), write_checkpoint(*a)))
    argv = _argv(tiny_data, out)
    argv[argv.index("--epochs") + 1] = str(epochs)
    code = cifar.main(argv)
    assert _meta(out / "last.npz")["iteration"] == STEPS_PER_EPOCH
    if epochs == 1:
        assert code == 0
    else:
        assert code == run.EXIT_INTERRUPTED
        assert _meta(out / "last.npz")["epoch"] == 1 and _meta(out / "last.npz")["batch"] == 0
    assert written == [STEPS_PER_EPOCH]  # the epoch end's checkpoint, not written a second time on stopping
    capsys.readouterr()


def test_a_run_stopped_by_its_data_before_its_first_step_resumes_and_says_so(tiny_data, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "unread"

    @contextlib.contextmanager
    def unreadable(*args):
        raise cifar_common.DataError("the disk went away")
        yield

    with monkeypatch.context() as patch:
        patch.setattr(run, "epoch_batches", unreadable)
        assert cifar.main(_argv(tiny_data, out)) == run.EXIT_USAGE
    assert _meta(out / "last.npz")["iteration"] == 0
    capsys.readouterr()
    assert cifar.main(["--out", str(out), "--resume"]) == 0
    assert f"resuming from {out / 'last.npz'} (" in capsys.readouterr().out
    assert _meta(out / "last.npz")["iteration"] == 2 * STEPS_PER_EPOCH


def test_a_resumed_run_keeps_its_settings(finished_run, tiny_data, capsys):
    out, _ = finished_run
    assert cifar.main(_argv(tiny_data, out, "--lr", "0.5", "--resume")) == run.EXIT_USAGE
    assert "--lr 0.5 (the run has 0.1)" in capsys.readouterr().err
    assert cifar.main(_argv(tiny_data, out)) == run.EXIT_USAGE  # no --resume: would overwrite the run
    assert "already holds a run" in capsys.readouterr().err


def test_a_new_run_leaves_another_runs_files_alone(finished_run, tiny_data, tmp_path, capsys):
    """A folder with a run's best.npz, metrics.csv or curves.png but no last.npz (moved away, or
    kept from a finished run) is not overwritten by a new run."""
    for kept in run.RUN_FILES:
        out = tmp_path / kept
        out.mkdir()
        (out / kept).write_bytes((finished_run[0] / kept).read_bytes())
        assert cifar.main(_argv(tiny_data, out)) == run.EXIT_USAGE
        assert f"{out} holds {kept} of an earlier run, without its last.npz" in capsys.readouterr().err
        assert (out / kept).read_bytes() == (finished_run[0] / kept).read_bytes()
        assert sorted(p.name for p in out.iterdir()) == [kept]


# --------------------------------------------------------------------------- divergence

def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, capsys):
    out = tmp_path / "diverging"

    def poison_a_weight(run):
        if run.position["iteration"] == STEPS_PER_EPOCH + 2:  # in epoch 2, after epoch 1's checkpoint
            run.model.stem.weight.data[0, 0, 0, 0] = np.nan

    assert cifar.main(_argv(tiny_data, out), after_step=poison_a_weight) == run.EXIT_DIVERGED
    err = capsys.readouterr().err
    # read at the end of epoch 2: the step that diverged is one of its steps (the paper schedule
    # divides 0.1 by 10 at 40% and 60% of the 10 iterations)
    assert (f"training diverged: the training loss became nan in epoch 2, at one of iterations "
            f"{STEPS_PER_EPOCH + 1} to {2 * STEPS_PER_EPOCH} (learning rate 0.001 to 0.01)") in err
    assert f"last good checkpoint is {out / 'last.npz'} (end of epoch 1" in err
    arrays = _checkpoint_arrays(out / "last.npz")
    assert _meta(out / "last.npz")["epoch"] == 1
    assert all(np.isfinite(v).all() for k, v in arrays.items() if k != "meta")
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # the header and epoch 1


def test_divergence_before_any_checkpoint_says_so(tiny_data, tmp_path, capsys):
    out = tmp_path / "huge_lr"
    assert cifar.main(_argv(tiny_data, out, "--lr", "1e30", "--epochs", "1")) == run.EXIT_DIVERGED
    assert "the last good checkpoint is none yet" in capsys.readouterr().err
    assert not (out / "last.npz").exists()


# --------------------------------------------------------------------------- bad input

def _corrupt_copies(last, tmp_path):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    # Bytes flipped inside the first stored array: the zip's CRC check must catch it.
    flipped = tmp_path / "flipped.npz"
    data = bytearray(last.read_bytes())
    with zipfile.ZipFile(last) as z:
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[start:start + 16] = bytes(255 - b for b in data[start:start + 16])
    flipped.write_bytes(bytes(data))
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    pickled = tmp_path / "a-python-object.npz"  # np.load would answer with its allow_pickle note
    pickled.write_bytes(pickle.dumps({"weights": [1, 2]}))
    return truncated, flipped, other, pickled


def test_corrupt_checkpoints_are_clear_errors(finished_run, tiny_data, tmp_path, capsys):
    truncated, flipped, other, pickled = _corrupt_copies(finished_run[0] / "last.npz", tmp_path)
    for path, message in ((truncated, "truncated or corrupt"), (flipped, "truncated or corrupt"),
                          (other, "without the meta record of ra_kernels"), (pickled, "not an .npz file at all"),
                          (tmp_path / "missing.npz", "does not exist")):
        assert cifar.main(["--eval-only", str(path), "--data-dir", str(tiny_data)]) == run.EXIT_USAGE
        err = capsys.readouterr().err
        assert "ra-train: error:" in err and message in err and str(path) in err and "allow_pickle" not in err
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copyfile(truncated, resumed / "last.npz")
    assert cifar.main(_argv(tiny_data, resumed, "--resume")) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot read" in err and "truncated or corrupt" in err and str(resumed / "last.npz") in err


def test_corrupt_data_file_is_a_clear_error(tiny_data, tmp_path, capsys):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    damaged = data_dir / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert cifar.main(_argv(data_dir, tmp_path / "out")) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot load cifar10" in err and str(damaged) in err and "corrupt or truncated" in err


def test_too_few_images_for_a_batch(tiny_data, tmp_path, capsys):
    assert cifar.main(_argv(tiny_data, tmp_path / "out", "--limit-train", "5")) == run.EXIT_USAGE
    assert "5 training images make no full batch of 8" in capsys.readouterr().err


class Killed(BaseException):
    """Stands for kill -9: nothing of the program runs after it (no except, no Ctrl-C handler)."""


@pytest.mark.parametrize("left", ["unwritten", "unreadable"])
def test_a_crash_between_last_and_best_is_repaired_on_resume(finished_run, tiny_data, tmp_path, monkeypatch, capsys,
                                                             left):
    out, real_copy = tmp_path / "crashed", run.npzfile.copy

    def killed_copy(source, destination):
        raise Killed

    monkeypatch.setattr(run.npzfile, "copy", killed_copy)
    with pytest.raises(Killed):  # dies at the end of epoch 1, after last.npz, before best.npz
        cifar.main(_argv(tiny_data, out))
    assert _meta(out / "last.npz")["best"]["epoch"] == 1 and not (out / "best.npz").exists()
    monkeypatch.setattr(run.npzfile, "copy", real_copy)
    if left == "unreadable":  # (a file system that kept a half-written file's name)
        (out / "best.npz").write_bytes(b"PK\x03\x04 cut short")
    assert cifar.main(["--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"repaired {out / 'best.npz'}: an interrupted epoch end had left it {left}; it now holds epoch 1" in printed
    # What the run states is what the file holds, and it is the uninterrupted run's best.npz.
    best = _meta(out / "best.npz")
    assert f"best.npz holds epoch {best['epoch']} " in printed
    assert best["best"] == _meta(finished_run[0] / "best.npz")["best"]
    assert not list(out.glob("*.tmp"))


def test_a_resume_rewrites_the_history_files_a_crash_left_behind(finished_run, tiny_data, tmp_path, capsys):
    """metrics.csv and curves.png follow last.npz at an epoch end: a crash between them (or a user's
    edit) leaves them behind the checkpoint, and a resume, of a finished run too, rewrites them."""
    out = tmp_path / "behind"
    shutil.copytree(finished_run[0], out)
    want = (out / "metrics.csv").read_text()
    (out / "metrics.csv").write_text("\n".join(want.splitlines()[:-1]) + "\n")  # the last epoch's row lost
    (out / "curves.png").unlink()
    assert cifar.main(["--out", str(out), "--resume"]) == 0
    assert (out / "metrics.csv").read_text() == want
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_cannot_be_written_stops_the_run_clearly_and_resumes(finished_run, tiny_data, tmp_path,
                                                                         monkeypatch, capsys):
    out, real_write, writes = tmp_path / "disk-full", run.write_checkpoint, []

    def full_at_the_second_epoch_end(path, *args):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, *args)

    monkeypatch.setattr(run, "write_checkpoint", full_at_the_second_epoch_end)
    assert cifar.main(_argv(tiny_data, out)) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"writing {out / 'last.npz'} failed ([Errno 28] No space left on device)" in err and "Traceback" not in err
    assert f"The last checkpoint is {out / 'last.npz'} (end of epoch 1" in err
    assert _meta(out / "last.npz")["epoch"] == 1 and not list(out.glob("*.tmp"))
    monkeypatch.setattr(run, "write_checkpoint", real_write)
    assert cifar.main(["--out", str(out), "--resume"]) == 0
    want, got = _checkpoint_arrays(finished_run[0] / "last.npz"), _checkpoint_arrays(out / "last.npz")
    assert all(np.array_equal(got[name], want[name]) for name in want if name != "meta")

def test_a_best_npz_that_cannot_be_rebuilt_is_reported(finished_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "removed"
    assert cifar.main(_argv(tiny_data, out), after_step=_interrupt_at(7)) == run.EXIT_INTERRUPTED
    (out / "best.npz").unlink()
    assert cifar.main(["--out", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "does not hold epoch 1, the best so far, and cannot be rebuilt" in captured.err
    # Epoch 2 rewrote best.npz only if it did better; the final statement is the file's either way.
    stated = (f"best.npz holds epoch {_meta(out / 'best.npz')['epoch']} " if (out / "best.npz").exists()
              else "best.npz is missing or unreadable")
    assert stated in captured.out + captured.err


def test_output_folder_is_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    # No dataset at --data-dir and --no-download: a check made after loading would report the data.
    missing_data = tmp_path / "no-data"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    read_only = tmp_path / "read-only"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    for out, message in ((a_file, "is a file, not a directory"), (a_file / "run", "cannot write files there"),
                         (dangling, f"is a symbolic link to {tmp_path / 'gone'}, which does not exist")):
        assert cifar.main(_argv(missing_data, out)) == run.EXIT_USAGE
        assert f"--out {out}" in (err := capsys.readouterr().err) and message in err, err
        assert masks.main([str(a_file), "--out", str(out)]) == 2
        assert f"--out {out}" in (err := capsys.readouterr().err) and message in err, err
    # A read-only folder, as a non-root user meets it (root may write anywhere, so it is simulated).
    read_only.mkdir()

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(cifar_common.tempfile, "NamedTemporaryFile", refuse)
    assert cifar.main(_argv(missing_data, read_only)) == run.EXIT_USAGE
    assert f"--out {read_only}: cannot write files there" in (err := capsys.readouterr().err) and \
        "Permission denied" in err
    assert masks.main([str(a_file), "--out", str(read_only)]) == 2
    assert f"--out {read_only}: cannot write files there" in capsys.readouterr().err


def test_data_dir_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "cifar.tar"
    a_file.write_text("")
    assert cifar.main(_argv(a_file, tmp_path / "out")) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{a_file} is a file, not a directory" in err and "download" not in err


def test_eval_only_refuses_options_it_would_ignore(finished_run, tiny_data, capsys):
    last = finished_run[0] / "last.npz"
    assert cifar.main(["--eval-only", str(last), "--model", "attention92", "--lr", "0.5"]) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--model, --lr cannot be given with it" in err and "--limit-test" in err


def test_weights_files_and_checkpoints_are_one_format(finished_run, tiny_data, tmp_path, capsys):
    last = finished_run[0] / "last.npz"
    model = ResidualAttentionNet(1, stem=8, widths=(16, 32, 64), seed=11).load(last)  # a checkpoint's weights
    for name, value in _checkpoint_arrays(last).items():
        if name.startswith("model/"):
            np.testing.assert_array_equal(model.state_dict()[name[len("model/"):]], value)
    weights = tmp_path / "weights.npz"
    model.save(weights)
    assert cifar.main(["--eval-only", str(weights), "--data-dir", str(tiny_data), "--batch-size", str(BATCH),
                       "--backend", "numpy"]) == 0
    from_weights = capsys.readouterr().out
    assert cifar.main(["--eval-only", str(last), "--data-dir", str(tiny_data), "--batch-size", str(BATCH),
                       "--backend", "numpy"]) == 0
    from_checkpoint = capsys.readouterr().out
    assert "weights of a ResidualAttentionNet (mixed attention)" in from_weights
    assert from_weights.splitlines()[1] == from_checkpoint.splitlines()[1]  # the same accuracy and loss
    out = tmp_path / "resumed-from-weights"
    out.mkdir()
    shutil.copyfile(weights, out / "last.npz")
    assert cifar.main(["--out", str(out), "--resume"]) == run.EXIT_USAGE
    assert "holds weights only, not a training checkpoint" in capsys.readouterr().err


@needs_matplotlib
def test_masks_of_a_weights_file_and_too_many_images(finished_run, tiny_data, tmp_path, capsys):
    weights = tmp_path / "weights.npz"
    ResidualAttentionNet(1, stem=8, widths=(16, 32, 64)).load(finished_run[0] / "last.npz").save(weights)
    args = ["--data-dir", str(tiny_data), "--backend", "numpy", "--out", str(tmp_path / "figures")]
    assert masks.main([str(weights), "--images", str(TEST_IMAGES + 1), *args]) == 2
    assert f"--images {TEST_IMAGES + 1}: the test set of cifar10 has {TEST_IMAGES} images" in capsys.readouterr().err
    assert masks.main([str(weights), "--images", "2", *args]) == 0
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == ["masks_0.png", "masks_1.png"]


def test_backend_auto_follows_ra_backend(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(backend._selected, "backend", None)
    monkeypatch.setenv("RA_BACKEND", "bogus")
    argv = [a for a in _argv(tiny_data, tmp_path / "out") if a not in ("--backend", "numpy")]
    assert cifar.main(argv) == run.EXIT_USAGE
    assert "RA_BACKEND='bogus': unknown backend 'bogus'" in capsys.readouterr().err
    monkeypatch.setenv("RA_BACKEND", "interpret")
    assert cifar_common.select_backend("auto") == "interpret" == backend.get_backend()


def test_the_run_length_is_estimated(finished_run):
    _, printed = finished_run
    # Read at the first reading of the metrics, the epoch's end here: STEPS_PER_EPOCH steps remain.
    estimate = [line for line in printed.splitlines() if "an epoch trains in about" in line]
    assert len(estimate) == 1 and f"the {STEPS_PER_EPOCH} steps left take about" in estimate[0]
    assert f"{STEPS_PER_EPOCH} steps per epoch, 2 epochs, backend numpy" in printed
    assert [run.format_duration(s) for s in (45, 150, 7200 * 1.7, 86400 * 6.2)] == \
        ["45 s", "2 min", "3.4 h", "6.2 days"]


def test_the_last_readings_estimate_says_no_steps_are_left(tiny_data, tmp_path, capsys):
    assert cifar.main(_argv(tiny_data, tmp_path / "one", "--epochs", "1")) == 0
    printed = capsys.readouterr()
    assert "1 epoch, backend numpy" in printed.out
    assert "no training steps left, the evaluation follows" in printed.out + printed.err
    assert "the 0 steps left" not in printed.out + printed.err


def test_curves_of_a_zero_learning_rate_plot_without_a_warning(tmp_path):
    history = [dict(epoch=e, lr=0.0, train_loss=1.0, test_loss=1.0, train_accuracy=0.5, test_accuracy=0.5)
               for e in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Data has no positive values" on a log scale
        run.plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


# --------------------------------------------------------------------------- help

def test_help_explains_every_option():
    result = subprocess.run([sys.executable, "-m", "train.cifar", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    parser = cifar.build_parser()
    for action in parser._actions:  # every option argparse knows, --help included
        assert action.help, f"{action.option_strings} has no help text"
        assert action.option_strings[-1] in text
    for issue_option in ("--model", "--dataset", "--data-dir", "--epochs", "--batch-size", "--lr", "--schedule",
                         "--momentum", "--nesterov", "--weight-decay", "--backend", "--seed", "--out", "--resume",
                         "--eval-only", "--limit-train", "--limit-test", "--noisy-labels", "--precision"):
        assert issue_option in text
    assert "attention56" in text and "attention452" in text and "cifar100" in text
    assert "LAST epoch" in text  # what to report: not best.npz's test accuracy


def test_default_recipe_is_the_papers():
    args = cifar.build_parser().parse_args([])
    assert (args.batch_size, args.lr, args.momentum, args.nesterov, args.weight_decay, args.schedule) == \
           (64, 0.1, 0.9, True, 1e-4, "paper")
    assert (args.model, args.epochs, args.backend) == ("attention56", None, "auto")


# --------------------------------------------------------------------------- learning

@pytest.mark.skipif(not CIFAR10_SUBSET.is_dir(), reason=f"the real CIFAR-10 subset is not at {CIFAR10_SUBSET}")
def test_a_small_network_learns_64_real_images(rng):
    data = load_cifar("cifar10", CIFAR10_SUBSET, download=False)
    loader = BatchLoader(data.train_images[:64], data.train_labels[:64], 8, data.mean, data.std,
                         train=False, seed=0)
    batches = list(loader.epoch(0))
    model = ResidualAttentionNet(1, stem=8, widths=(16, 32, 64), seed=int(rng.integers(2**31)))
    optimizer = SGD(model.parameters(), lr=0.05)
    # The mean loss of each pass over the 64 images. With batch 8 and lr 0.05 it halves
    # after 10 to 14 passes for the seeds tried; 20 passes leave headroom.
    losses = []
    for _ in range(20):
        totals = np.zeros(len(TOTALS), np.float32)
        for x, y in batches:
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            accumulate_metrics(logits.data, y, loss.data, totals)
        losses.append(totals[0] / totals[2])
        if losses[-1] <= losses[0] / 2:
            break
    assert losses[-1] <= losses[0] / 2, f"loss per pass: {np.round(losses, 3)}"


@needs_matplotlib
def test_masks_of_a_network_of_other_classes_take_the_dataset_named(tiny_data, tmp_path, capsys):
    weights = tmp_path / "seven-classes.npz"
    ResidualAttentionNet(1, stem=8, widths=(16, 32, 64), num_classes=7,
                         seed=int(np.random.default_rng().integers(1 << 30))).save(weights)
    args = [str(weights), "--images", "1", "--data-dir", str(tiny_data), "--backend", "numpy",
            "--out", str(tmp_path / "figures")]
    assert masks.main(args) == 2
    assert "a network of 7 classes was not trained on CIFAR-10 or CIFAR-100: name the dataset (--dataset)" in \
        capsys.readouterr().err
    assert masks.main(args + ["--dataset", "cifar10"]) == 0
    assert [p.name for p in (tmp_path / "figures").glob("*.png")] == ["masks_0.png"]


@pytest.mark.parametrize("option, value, message", [
    ("--widths", ["3", "8", "8"], "argument --widths: expected at least 4 channels"),
    ("--epochs", ["1e3"], "argument --epochs: expected an integer, got '1e3'"),
    ("--lr", ["fast"], "argument --lr: expected a number, got 'fast'")])
def test_option_values_are_refused_in_words(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cifar.main(_argv(tmp_path / "no-data", tmp_path / "out", option, *value))
    assert exit_info.value.code == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "_positive" not in err and not (tmp_path / "out").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tiny_data, tmp_path, capsys):
    out = tmp_path / "shared"
    out.mkdir()
    with cifar_common.output_lock(out):  # what a running train.cifar holds (flock: per open file, so in-process too)
        assert cifar.main(_argv(tiny_data, out)) == run.EXIT_USAGE
        assert f"--out {out}: another run is writing there" in capsys.readouterr().err
        assert list(out.iterdir()) == []                     # nothing written, nothing removed
    with cifar_common.output_lock(out):  # released with the block: the lock is free again
        pass


def _with_the_last_training_file_halved(data_dir, copy):
    """A copy of the tiny CIFAR-10 at ``copy`` whose data_batch_5 pixels are halved: the same test
    images and classes, other training images and statistics."""
    shutil.copytree(data_dir, copy)
    batch = copy / "cifar-10-batches-py" / "data_batch_5"
    content = pickle.loads(batch.read_bytes(), encoding="bytes")
    content[b"data"] = content[b"data"] // 2
    batch.write_bytes(pickle.dumps(content, protocol=2))
    return copy


def test_the_normalisation_a_network_was_trained_with_travels_in_its_checkpoint(finished_run, tiny_data, tmp_path,
                                                                                capsys):
    """--eval-only on a --data-dir with the same test images but other training images: the
    statistics of those would normalise differently; the checkpoint's are used."""
    other = _with_the_last_training_file_halved(tiny_data, tmp_path / "other")
    last = finished_run[0] / "last.npz"
    mean, std = (np.float32(_meta(last)["normalization"][key]) for key in ("mean", "std"))
    data = cifar_common.load_dataset("cifar10", str(tiny_data), download=False)
    assert np.array_equal(mean, data.mean) and np.array_equal(std, data.std)      # what the run computed
    printed = []
    for data_dir in (tiny_data, other):
        assert cifar.main(["--eval-only", str(last), "--data-dir", str(data_dir), "--batch-size", str(BATCH),
                           "--backend", "numpy"]) == 0
        printed.append(capsys.readouterr().out.splitlines()[1].split("(")[0])
    assert printed[0] == printed[1]


def test_a_resume_on_other_training_images_is_refused_and_on_the_same_ones_is_exact(tiny_data, tmp_path, capsys):
    """data_batch_5 halved in a copy of the data: with every training image in use the resume is
    refused (as many batches, other images); with --limit-train short of that file it is the run's
    own data, and the resume ends bit for bit on the uninterrupted run, normalised as it was
    trained although the copy's statistics differ."""
    other = _with_the_last_training_file_halved(tiny_data, tmp_path / "other")
    for limit in ([], ["--limit-train", str(4 * TRAIN_PER_FILE)]):
        out = tmp_path / f"run{len(limit)}"
        assert cifar.main(_argv(tiny_data, out, *limit), after_step=_interrupt_at(2)) == run.EXIT_INTERRUPTED
        capsys.readouterr()
        code = cifar.main(["--out", str(out), "--resume", "--data-dir", str(other)])
        if not limit:
            assert code == run.EXIT_USAGE
            assert "the training images changed since the checkpoint (as many batches per epoch" in \
                capsys.readouterr().err
            continue
        assert code == 0
        assert cifar.main(_argv(tiny_data, tmp_path / "uninterrupted", *limit)) == 0
        want, got = (_checkpoint_arrays(folder / "last.npz") for folder in (tmp_path / "uninterrupted", out))
        assert all(np.array_equal(got[name], want[name]) for name in want if name != "meta")


def test_the_data_folder_is_recorded_absolute(tiny_data, tmp_path, monkeypatch, capsys):
    """A run started with a relative --data-dir: --eval-only from another folder finds the data
    through the checkpoint, where a relative path would have sent it to download into a new one."""
    monkeypatch.chdir(tiny_data.parent)
    out = tmp_path / "relative"
    assert cifar.main(_argv(Path(tiny_data.name), out, "--epochs", "1")) == 0
    assert _meta(out / "last.npz")["args"]["data_dir"] == str(tiny_data.resolve())
    monkeypatch.chdir(tmp_path)
    assert cifar.main(["--eval-only", str(out / "last.npz"), "--no-download", "--backend", "numpy"]) == 0
    assert "download" not in capsys.readouterr().err


def test_a_recorded_data_folder_that_is_gone_is_named_not_made_again(tiny_data, tmp_path, capsys):
    """The data moved after training: --eval-only and train.masks say so and ask for --data-dir,
    where they made the old folder again and downloaded the dataset into it."""
    moved = tmp_path / "data"
    shutil.copytree(tiny_data, moved)
    out = tmp_path / "run"
    assert cifar.main(_argv(moved, out, "--epochs", "1")) == 0
    moved.rename(tmp_path / "elsewhere")
    says = f"the run was trained on the data in {moved}, which is not there now: give --data-dir"
    assert cifar.main(["--eval-only", str(out / "last.npz"), "--backend", "numpy"]) == run.EXIT_USAGE
    assert says in capsys.readouterr().err
    assert masks.main([str(out / "last.npz"), "--out", str(tmp_path / "masks"), "--backend", "numpy"]) != 0
    assert says in capsys.readouterr().err
    assert not moved.exists()
    assert cifar.main(["--eval-only", str(out / "last.npz"), "--backend", "numpy", "--data-dir",
                       str(tmp_path / "elsewhere")]) == 0


def test_empty_paths_are_refused(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (_argv(tiny_data, ""), ["--eval-only", ""], _argv("", tmp_path / "out")):
        with pytest.raises(SystemExit) as exited:
            cifar.main(argv)
        assert exited.value.code == run.EXIT_USAGE
        assert "expected a path, got an empty string" in capsys.readouterr().err
    for argv in (["", "--out", "masks"], [str(tmp_path / "last.npz"), "--out", ""]):
        with pytest.raises(SystemExit) as exited:
            masks.main(argv)
        assert exited.value.code == run.EXIT_USAGE
        assert "expected a path, got an empty string" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("epoch, batch, says", [(0, 0, "the start, before any step"), (3, 0, "end of epoch 3"),
                                                (3, 120, "epoch 4, after batch 120 of 781"),
                                                (3, 781, "epoch 4, trained, before its evaluation")])
def test_positions_are_described_as_they_are(epoch, batch, says):
    assert run.describe_position(dict(epoch=epoch, batch=batch), 781) == says


def test_sigterm_before_the_training_loop_stops_in_words(tiny_data, tmp_path, monkeypatch, capsys):
    """SIGTERM while the data loads (before the loop's own handler): exit 130 with a message, as
    Ctrl-C there, where the process used to die with 143 and nothing said."""
    def terminated_while_loading(*args):
        signal.raise_signal(signal.SIGTERM)

    def ignored(*args):  # without the command's handler, SIGTERM must not kill the test process
        pass

    monkeypatch.setattr(cifar.TASK, "training_data", terminated_while_loading)
    previous = signal.signal(signal.SIGTERM, ignored)
    try:
        code = cifar.main(_argv(tiny_data, tmp_path / "out"))
        assert signal.getsignal(signal.SIGTERM) is ignored                 # restored after the command
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == run.EXIT_INTERRUPTED
    assert "stopped by Ctrl-C or SIGTERM where no checkpoint could be written; none was written" in \
        capsys.readouterr().err


def test_ranks_that_disagree_are_told_what_differs():
    ours = dict(options=dict(lr=0.1, seed=3, out="runs/x"), backend="numpy", classes=["a", "b"],
                position=dict(epoch=0))
    theirs = dict(options=dict(lr=0.5, seed=3, out="runs/x"), backend="interpret", classes=["a", "b"],
                  position=dict(epoch=0))
    assert run._differences(ours, theirs) == ["--lr 0.5 against 0.1", 'backend "interpret" against "numpy"']
    theirs = dict(ours, classes=[f"n{i:08d}" for i in range(1000)])
    (said,) = run._differences(ours, theirs)
    assert said.startswith('classes ["n00000000", "n00000001"') and said.endswith('... against ["a", "b"]')


def test_a_write_that_fails_before_any_checkpoint_says_to_start_again(tiny_data, tmp_path, monkeypatch, capsys):
    def full(path, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "write_checkpoint", full)
    assert cifar.main(_argv(tiny_data, tmp_path / "out")) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert "There is no checkpoint yet: make room and start the run again, without --resume" in err
    assert "diverged" not in err and "continue with --resume" not in err
