"""What the training commands share: the usage error they report, backend selection, the
dataset, and an epoch's batches."""
import contextlib
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


@contextlib.contextmanager
def epoch_batches(loader, epoch, start_batch=0):
    """The loader's batches for one epoch, its generator closed however the loop ends."""
    generator = loader.epoch(epoch, start_batch)
    try:
        yield generator
    finally:
        generator.close()
