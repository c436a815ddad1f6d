"""What the training commands share: the usage error they report, backend selection, the
dataset, an epoch's batches, and the argparse value types (bench/ takes them too)."""
import argparse
import contextlib
import math
import os
import tempfile
from pathlib import Path

from ra_kernels import backend
from ra_kernels.data import load_cifar


DEFAULT_DATA_DIR = "data"


class UsageError(Exception):
    """A problem the user can fix (options, data, checkpoint): reported in one line, exit 2."""


BACKEND_HELP = ("auto: $RA_BACKEND when it is set, else cuda when CuPy sees a GPU, else numpy (the CPU "
                "reference ops); interpret runs the Triton kernels in Triton's interpreter, for testing only "
                "(slow) (default: %(default)s)")


PRECISION_HELP = ("tf32: float32 storage, matrix products with TF32 inputs; ieee: float32 throughout; bf16: "
                  "activations and their gradients stored as bfloat16 and multiplied on bfloat16 tensor "
                  "cores, with parameters, their gradients, batch-norm statistics, the loss and SGD in float32 "
                  "(cuda and interpret backends). Every precision accumulates in float32. The numpy backend "
                  "computes in float32 whatever tf32 or ieee says (default: %(default)s)")


@contextlib.contextmanager
def output_lock(path, option="--out"):
    """Hold an exclusive lock on the directory ``path`` for the block (flock: released when the
    process ends, however it ends). A second run into the same folder would interleave its files
    with the first's and make each print claims about the other's: UsageError. A file system
    without locks (some network ones) runs the block unguarded."""
    import fcntl
    folder = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{option} {path}: another run is writing there (it holds the folder's lock): wait "
                             f"for it to end, or choose another {option}") from None
        except OSError:
            pass
        yield
    finally:
        os.close(folder)


def select_precision(name):
    """Make ``name`` (one of backend.PRECISIONS) the precision of the current backend's ops;
    UsageError where that backend cannot run it."""
    if name == "bf16" and backend.get_backend() == "numpy":
        raise UsageError("--precision bf16 runs on the cuda and interpret backends: the numpy backend stores "
                         "float32 (a new run: give --precision tf32; a resumed run keeps its precision: give "
                         "--backend interpret, which is slow, or resume it on a GPU)")
    backend.set_precision(name)
    return name


def select_backend(name):
    """Make ``name`` ('auto', the rule of backend.default_backend, or a backend) the current
    backend; return the backend's name."""
    try:
        backend.set_backend(None if name == "auto" else name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(str(error)) from None
    return backend.get_backend()


def prepare_output_dir(path, option="--out"):
    """Create the directory ``path`` if needed and prove that files can be written in it, before
    any data is loaded or any step trained; UsageError, naming ``option``, when not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a directory")
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{option} {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot write files there ({error})") from None
    return path


def load_dataset(name, data_dir, download):
    try:
        return load_cifar(name, data_dir, download=download)
    except (RuntimeError, ValueError, OSError) as error:
        raise UsageError(f"cannot load {name} from {data_dir}: {error}") from None


class DataError(Exception):
    """Reading the data failed in the middle of a run (a file that cannot be read or decoded)."""


@contextlib.contextmanager
def epoch_batches(loader, epoch, start_batch=0):
    """The loader's batches for one epoch, its generator closed however the loop ends. An error
    raised by the loader (OSError, ValueError) comes out as DataError, so that a run can tell it
    from an error of its own steps."""
    generator = loader.epoch(epoch, start_batch)

    def batches():
        while True:
            try:
                batch = next(generator)
            except StopIteration:
                return
            except (OSError, ValueError) as error:
                raise DataError(str(error)) from error
            yield batch

    try:
        yield batches()
    finally:
        generator.close()


def counted(n: int, noun: str, plural: str = "") -> str:
    """"1 epoch", "2 epochs", "1,281,167 images": a count and its noun, plural (``plural``, else the
    noun and an s) but for one."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


# --------------------------------------------------------------------------- argparse value types

def number(text, kind):
    """``kind(text)`` (int or float), or an argparse error in words (argparse's own would name the
    type function)."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None


def nonempty_path(text):
    """A file or folder name as given; an argparse error when it is empty (an empty --out would write
    into the current folder, an empty file name would be reported as ".")."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def positive_int(text):
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text):
    value = number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text):
    value = number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def fraction(text):
    value = number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value
