"""train.imagenet on the numpy backend, end to end, on a tiny generated ImageNet-style folder.

The folder: three classes of random JPEGs of odd sizes, a grayscale and a CMYK one among them.
The network is the whole ImageNet Attention-56 (29.8 M parameters with 3 classes) at 64x64,
batch 4, two steps an epoch: these tests check the machinery (decoding, crops, checkpoints,
exact resume, evaluation at another size, the errors a user meets), not learning.
"""
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="decoding needs Pillow")
pytest.importorskip("tqdm", reason="the training commands draw their progress bars with tqdm")
from train import imagenet, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["n01440764", "n02102040", "n03888257"]
SIZE, BATCH, STEPS_PER_EPOCH = 64, 4, 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng()  # fresh images each session: the tests hold for any
    for split, per_class in (("train", 3), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                height, width = 45 + 11 * i + 3 * c, 83 - 9 * i
                mode = "L" if (split, c, i) == ("train", 0, 1) else "CMYK" if (split, c, i) == ("val", 2, 0) else "RGB"
                channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
                pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
                path = root / split / name / f"{name}_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path, quality=90)
    return root


def _argv(folder, out, *extra):
    return ["--data-dir", str(folder), "--out", str(out), "--image-size", str(SIZE), "--batch-size", str(BATCH),
            "--limit-train", str(BATCH * STEPS_PER_EPOCH), "--epochs", "1", "--workers", "2", "--backend", "numpy",
            *extra]


def _arrays(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist() if name != "meta.npy"}  # meta holds the timings


@pytest.fixture(scope="module")
def finished_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert imagenet.main(_argv(folder, out)) == 0
    return out


def test_a_run_trains_evaluates_and_writes_its_files(finished_run):
    lines = (finished_run / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == list(run.METRICS_COLUMNS)
    row = dict(zip(run.METRICS_COLUMNS, map(float, lines[1].split(","))))
    assert (row["epoch"], row["iteration"]) == (1, STEPS_PER_EPOCH)
    # Three classes: every label is among the top five, and the top-1 counts are whole images.
    assert row["train_top5_accuracy"] == row["test_top5_accuracy"] == 1
    for accuracy, images in ((row["train_accuracy"], BATCH * STEPS_PER_EPOCH), (row["test_accuracy"], 6)):
        assert abs(accuracy * images - round(accuracy * images)) < 1e-9
    # The paper's milestones (200k, 400k, 500k of 530k) scaled to 2 iterations fall at 0, 1 and 1.
    assert np.isfinite(row["train_loss"]) and row["lr"] == pytest.approx(1e-4)
    assert (finished_run / "best.npz").exists()


def test_an_interrupted_run_resumes_bit_for_bit(folder, finished_run, tmp_path, capsys):
    out = tmp_path / "interrupted"

    def interrupt_after_the_first_step(state):
        if state.position["iteration"] == 1:
            signal.raise_signal(signal.SIGINT)
    assert imagenet.main(_argv(folder, out), after_step=interrupt_after_the_first_step) == run.EXIT_INTERRUPTED
    assert "python -m train.imagenet --out" in capsys.readouterr().err
    assert imagenet.main(["--out", str(out), "--resume"]) == 0
    want, got = _arrays(finished_run / "last.npz"), _arrays(out / "last.npz")
    assert sorted(got) == sorted(want) and all(got[name] == want[name] for name in want)


def test_a_run_resumed_by_the_other_command_is_named(finished_run, capsys):
    from train import cifar
    assert cifar.main(["--out", str(finished_run), "--resume"]) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert (f"{finished_run / 'last.npz'} trains the network class ImageNetAttentionNet, which train.cifar does "
            f"not: resume it with python -m train.imagenet --out {finished_run} --resume") in err
    assert "download" not in err and "classes changed" not in err

def test_eval_only_at_another_size(folder, finished_run, capsys):
    last_row = dict(zip(run.METRICS_COLUMNS, (finished_run / "metrics.csv").read_text().splitlines()[-1].split(",")))
    evaluate = ["--eval-only", str(finished_run / "last.npz"), "--backend", "numpy", "--batch-size", str(BATCH)]
    assert imagenet.main(evaluate) == 0
    printed = capsys.readouterr().out
    # The same weights, images, size (the run's, from the checkpoint) and batches as the epoch's
    # evaluation: the same numbers.
    assert f"test accuracy {float(last_row['test_accuracy']):.2%}" in printed
    assert f"test loss {float(last_row['test_loss']):.4f}  (6 validation images of {folder} at 64x64" in printed
    assert imagenet.main(evaluate + ["--image-size", "96", "--limit-test", "4"]) == 0
    assert f"(4 validation images of {folder} at 96x96" in capsys.readouterr().out


def test_eval_only_on_data_that_fails_is_a_clear_error(folder, finished_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for image in (broken / "val" / CLASSES[1]).iterdir():  # no stand-in left in the class
        image.write_bytes(b"not a JPEG")
    code = imagenet.main(["--eval-only", str(finished_run / "last.npz"), "--data-dir", str(broken),
                          "--backend", "numpy", "--batch-size", str(BATCH)])
    err = capsys.readouterr().err
    assert code == run.EXIT_USAGE, err
    # each corrupt image named once, in one plain line (not Python's file:line and source echo)
    corrupt = [line for line in err.splitlines() if "cannot decode the image" in line]
    assert corrupt and all(line.startswith(f"warning: {broken / 'val' / CLASSES[1]}/") for line in corrupt), err
    assert all(line.endswith("(Pillow cannot identify its format); another image of its class stands in for it")
               for line in corrupt), err
    assert f"error: reading the test data failed: {broken / 'val' / CLASSES[1]}: every image of the class is corrupt" \
        in err and "Traceback" not in err

def test_bad_folders_and_options_are_clear_errors(folder, tmp_path, capsys):
    (tmp_path / "train" / "n1").mkdir(parents=True)
    (tmp_path / "val" / "n1").mkdir(parents=True)
    assert imagenet.main(_argv(tmp_path, tmp_path / "out")) == run.EXIT_USAGE
    assert "n1: an empty class folder" in capsys.readouterr().err
    assert imagenet.main(_argv(folder, tmp_path / "out2", "--limit-train", "3")) == run.EXIT_USAGE
    assert "3 training images make no full batch of 4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        imagenet.main(_argv(folder, tmp_path / "out3", "--image-size", "100"))
    assert exit_info.value.code == run.EXIT_USAGE
    assert "expected a multiple of 32" in capsys.readouterr().err


def test_help_explains_every_option_and_the_defaults_are_the_papers():
    result = subprocess.run([sys.executable, "-m", "train.imagenet", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for action in imagenet.build_parser()._actions:
        assert action.help and action.option_strings[-1] in text
    assert "200k, 400k and 500k" in text and "LAST epoch" in text
    args = imagenet.build_parser().parse_args([])
    assert (args.batch_size, args.lr, args.momentum, args.nesterov, args.weight_decay, args.image_size) == \
           (256, 0.1, 0.9, True, 1e-4, 224)
    assert imagenet.TASK.default_epochs(1_281_167 // 256) == 106
    lr = imagenet.TASK.schedule(args, 530_000)
    assert [lr(i) for i in (0, 199_999, 200_000, 400_000, 500_000, 529_999)] == \
           pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001, 0.0001])


def test_data_that_fails_mid_run_is_checkpointed_and_resumes(folder, tmp_path, capsys):
    """Training files that vanish after the first epoch: the run writes last.npz, names the file and
    exits 2; with the files back, --resume finishes it. A resume on other classes is refused."""
    out, aside = tmp_path / "run", tmp_path / "aside"

    def take_the_training_files_away(state):
        if state.position["iteration"] == 1:  # epoch 1's two batches are prefetched by now
            (folder / "train").rename(aside)
    try:
        code = imagenet.main(_argv(folder, out, "--epochs", "2"), after_step=take_the_training_files_away)
    finally:
        aside.rename(folder / "train")
    err = capsys.readouterr().err
    assert code == run.EXIT_USAGE and "reading the data failed" in err and ".JPEG" in err
    assert "checkpoint written to" in err and "end of epoch 1" in err
    renamed = tmp_path / "renamed"
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            (renamed / split / (name if c else "n00000001")).mkdir(parents=True)
            for image in (folder / split / name).iterdir():
                (renamed / split / (name if c else "n00000001") / image.name).write_bytes(image.read_bytes())
    assert imagenet.main(["--out", str(out), "--resume", "--data-dir", str(renamed)]) == run.EXIT_USAGE
    assert "the classes changed since the checkpoint (3 then, 3 now; missing n01440764; new n00000001)" in \
        capsys.readouterr().err
    assert imagenet.main(["--out", str(out), "--resume"]) == 0
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
