"""What the training commands share: the usage error they report, backend selection, the
dataset, and an epoch's batches."""
import contextlib

from ra_kernels import backend
from ra_kernels.data import load_cifar


class UsageError(Exception):
    """A problem the user can fix (options, data, checkpoint): reported in one line, exit 2."""


def select_backend(name):
    """Make ``name`` ('auto' or a backend) the current backend; return the backend's name."""
    chosen = ("cuda" if backend.gpu_available() else "numpy") if name == "auto" else name
    try:
        backend.set_backend(chosen)
    except RuntimeError as error:
        raise UsageError(str(error)) from None
    return chosen


def load_dataset(name, data_dir, download):
    try:
        return load_cifar(name, data_dir, download=download)
    except (RuntimeError, ValueError, OSError) as error:
        raise UsageError(f"cannot load {name} from {data_dir}: {error}") from None


@contextlib.contextmanager
def epoch_batches(loader, epoch, start_batch=0):
    """The loader's batches for one epoch, its generator closed however the loop ends."""
    generator = loader.epoch(epoch, start_batch)
    try:
        yield generator
    finally:
        generator.close()
