"""CIFAR-10 and CIFAR-100: the official files, download, noisy labels, augmentation and batching.

Files: the official "python version" of each dataset, as its archive extracts
it into ``data_dir``::

    data_dir/cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    data_dir/cifar-100-python/     train, test, meta

Each batch file is a pickle of a dict: ``b"data"`` uint8 (N, 3072), each row
the R, G and B planes (1,024 bytes each) of a 32x32 image, and the labels
(``b"labels"``, ``b"fine_labels"`` for CIFAR-100) as N ints. N is taken from the
files: a subset with fewer images per file loads the same way.
:func:`load_cifar` downloads and extracts the official archive when the files
are missing, after checking its MD5.

Batches: :class:`BatchLoader` yields (x, y) per epoch, x float32 NHWC normalised
and, in training, augmented by :func:`augment` (pad 4, random 32x32 crop,
horizontal flip), y int64, both arrays of the current backend. Every random
choice (order, crops, flips, label noise) comes from NumPy generators seeded
from (seed, stream, epoch, batch), so a run resumed mid-epoch sees exactly the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import pickle
import posixpath
import queue
import shutil
import sys
import tarfile
import tempfile
import threading
import urllib.request
import zlib
from pathlib import Path

import numpy as np

import reference

from . import backend
from .kernels import augment as augment_kernels

DATASETS = ("cifar10", "cifar100")

#: Pixels of zero padding on each side before the random 32x32 crop (the paper's recipe).
PAD = 4
#: Seconds urllib waits for the server at each step of the download (connect, each read).
DOWNLOAD_TIMEOUT_S = 60

_ROW_BYTES = 3 * 32 * 32  # one image in a batch file: the R, G and B planes of 32x32

# The streams of random numbers drawn from one seed, each its own NumPy generator.
_ORDER_STREAM, _AUGMENT_STREAM, _NOISE_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one dataset comes from and how its extracted files are laid out."""
    title: str
    url: str
    md5: str  # of the archive at url
    folder: str  # the folder the archive extracts, inside data_dir
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: bytes  # in each batch file
    names_key: bytes  # in the meta file: the class names, in label order
    num_classes: int

    @property
    def archive(self) -> str:
        """The archive's file name."""
        return posixpath.basename(self.url)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the loader reads, inside ``folder``."""
        return (*self.train_files, *self.test_files, self.meta_file)


SOURCES = {
    "cifar10": Source(
        title="CIFAR-10", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", labels_key=b"labels", names_key=b"label_names", num_classes=10),
    "cifar100": Source(
        title="CIFAR-100", url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
        train_files=("train",), test_files=("test",),
        meta_file="meta", labels_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100),
}


@dataclasses.dataclass
class CifarData:
    """One dataset in host memory.

    train_images, test_images: uint8 (N, 32, 32, 3), NHWC, C-contiguous NumPy arrays.
    train_labels, test_labels: int64 (N,). class_names: in label order.
    mean, std: float32 (3,), per channel over every pixel of the training images,
    in [0, 1] units (pixel / 255); std is the population one (divided by the count).
    """
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------- loading

def load_cifar(name: str, data_dir, download: bool = True) -> CifarData:
    """Load ``name`` ("cifar10" or "cifar100") from ``data_dir``.

    ``data_dir`` holds the extracted folder (``cifar-10-batches-py`` or
    ``cifar-100-python``), or is that folder. When files are missing, the archive
    is extracted from ``data_dir/<archive name>`` if it is there, else (with
    ``download``) downloaded from the official address first; either way its MD5
    is checked before anything is extracted. A failure to get the files raises a
    RuntimeError naming the address and where to put the files by hand; a file
    that is there but corrupt or truncated raises a ValueError naming it.
    """
    source = _source(name)
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise ValueError(f"{data_dir} is a file, not a directory: give the directory that holds (or is to "
                         f"hold) {source.folder}")
    folder = _find_folder(source, data_dir)
    if folder is None:
        _fetch(source, data_dir, download)
        folder = data_dir / source.folder
    train_images, train_labels = _read_split(source, folder, source.train_files)
    test_images, test_labels = _read_split(source, folder, source.test_files)
    mean, std = _channel_mean_std(train_images)
    return CifarData(train_images=train_images, train_labels=train_labels, test_images=test_images,
                     test_labels=test_labels, class_names=_read_class_names(source, folder),
                     mean=mean, std=std, name=name)


def _source(name) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return SOURCES[name]


def _find_folder(source, data_dir):
    """The folder holding every file of ``source``: data_dir/<folder> or data_dir itself; None if neither."""
    for folder in (data_dir / source.folder, data_dir):
        if all((folder / f).is_file() for f in source.files):
            return folder
    return None


def _where_to_put_files(source, data_dir) -> str:
    return (f"To provide the files by hand, download {source.url} (MD5 {source.md5}) and either put it "
            f"at {data_dir / source.archive} or extract it in {data_dir}, so that "
            f"{data_dir / source.folder} holds {', '.join(source.files)}.")


def _fetch(source, data_dir, download):
    """Make data_dir/<folder> hold every file of ``source``, from the archive, downloaded if need be."""
    archive = data_dir / source.archive
    if archive.is_file():
        _check_md5(source, archive, data_dir, f"{archive} is there but")
    elif not download:
        raise RuntimeError(f"{source.title} not found in {data_dir} and download=False. "
                           + _where_to_put_files(source, data_dir))
    else:
        try:
            _download(source, archive)
        except (OSError, http.client.HTTPException) as error:
            # OSError: no network (URLError), a timeout, an unwritable directory;
            # HTTPException: a malformed response. (A transfer cut short fails the MD5 check.)
            raise RuntimeError(f"could not download {source.title} from {source.url} "
                               f"({type(error).__name__}: {error}). "
                               + _where_to_put_files(source, data_dir)) from error
    try:
        _extract(source, archive, data_dir)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:  # a damaged gzip stream
        raise RuntimeError(f"could not extract {archive} ({type(error).__name__}: {error}). "
                           + _where_to_put_files(source, data_dir)) from error


def _download(source, archive):
    """Download the archive to a temporary file beside ``archive``, check its MD5, rename it into place.

    Nothing is left behind on failure.
    """
    archive.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {source.title} from {source.url} to {archive}", file=sys.stderr, flush=True)
    handle, partial = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, \
                urllib.request.urlopen(source.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        _check_md5(source, Path(partial), archive.parent, f"{source.url} was downloaded (and deleted) but")
        os.replace(partial, archive)
    finally:
        Path(partial).unlink(missing_ok=True)


def _check_md5(source, path, data_dir, context):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != source.md5:
        raise RuntimeError(f"{context} its MD5 is {digest.hexdigest()}, expected {source.md5}: a truncated "
                           f"or different file. " + _where_to_put_files(source, data_dir))


def _extract(source, archive, data_dir):
    """Extract the files the loader reads, and only those, into data_dir/<folder>.

    Each is written to a temporary file there and renamed into place, so a failure
    leaves whole files or none. Target paths come from ``source``, never from the
    archive's member names, so no member can write outside data_dir; a needed member
    that is not a regular file (a link, say) is an error.
    """
    destination = data_dir / source.folder
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = {posixpath.normpath(m.name): m for m in tar.getmembers()}
        for name in source.files:
            member = members.get(f"{source.folder}/{name}")
            if member is None or not member.isfile():
                raise RuntimeError(f"{archive} holds no regular file {source.folder}/{name}. "
                                   + _where_to_put_files(source, data_dir))
            handle, partial = tempfile.mkstemp(dir=destination, prefix=f".{name}.", suffix=".part")
            try:
                with os.fdopen(handle, "wb") as out, tar.extractfile(member) as data:
                    shutil.copyfileobj(data, out, 1 << 20)
                os.replace(partial, destination / name)
            finally:
                Path(partial).unlink(missing_ok=True)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR files hold (dicts, lists, bytes, ints, NumPy arrays) and nothing else.

    A pickle may name any Python callable to run; a file in data_dir is not trusted that far.
    """
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which no CIFAR file holds")
        return super().find_class(module, name)


def _read_pickle(path: Path, required_keys):
    """The dict pickled in ``path`` (bytes keys, as the official files were written by Python 2)."""
    with open(path, "rb") as f:
        try:
            content = _CifarUnpickler(f, encoding="bytes").load()
        except Exception as error:  # a damaged pickle fails in many ways, none naming the file
            raise ValueError(f"{path} is corrupt or truncated ({type(error).__name__}: {error}); "
                             f"replace it with the official file") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a CIFAR file: it holds a {type(content).__name__}, expected a dict")
    missing = [k for k in required_keys if k not in content]
    if missing:
        raise ValueError(f"{path} is not a CIFAR file: keys {missing} are missing")
    return content


def _read_split(source, folder, files):
    """Images uint8 (N, 32, 32, 3) and labels int64 (N,) of ``files``, concatenated in order."""
    rows, labels = [], []
    for name in files:
        path = folder / name
        content = _read_pickle(path, [b"data", source.labels_key])
        data, file_labels = content[b"data"], np.asarray(content[source.labels_key])
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == _ROW_BYTES):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{path}: b'data' must be uint8 (N, {_ROW_BYTES}), got {got}")
        if file_labels.shape != (len(data),) or (file_labels.size and file_labels.dtype.kind not in "iu"):
            raise ValueError(f"{path}: {source.labels_key!r} must hold {len(data)} integers (one per "
                             f"row of b'data'), got {file_labels.dtype} {file_labels.shape}")
        if file_labels.size and not (0 <= file_labels.min() and file_labels.max() < source.num_classes):
            raise ValueError(f"{path}: labels must lie in [0, {source.num_classes}), got "
                             f"{file_labels.min()} .. {file_labels.max()}")
        rows.append(data)
        labels.append(file_labels.astype(np.int64))
    planes = np.concatenate(rows).reshape(-1, 3, 32, 32)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), np.concatenate(labels)


def _read_class_names(source, folder):
    path = folder / source.meta_file
    names = _read_pickle(path, [source.names_key])[source.names_key]
    if not (isinstance(names, list) and len(names) == source.num_classes
            and all(isinstance(n, (bytes, str)) for n in names)):
        raise ValueError(f"{path}: {source.names_key!r} must list {source.num_classes} class names")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def _channel_mean_std(images):
    """Per-channel mean and population std of uint8 (N, H, W, C) images in [0, 1] units: float32 (C,) each.

    Computed in float64 from each channel's histogram of the 256 pixel values: exact
    up to float64 rounding, with no float copy of the images (1.2 GB for CIFAR's training set).
    """
    values = np.arange(256) / 255.0
    counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256)
                       for c in range(images.shape[-1])]).astype(np.float64)  # (C, 256)
    total = counts.sum(axis=1)
    mean = counts @ values / total
    var = (counts * (values - mean[:, None]) ** 2).sum(axis=1) / total
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


# --------------------------------------------------------------------------- noisy labels

def corrupt_labels(labels, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """A copy of ``labels`` (int64 (N,)) with exactly round(fraction * N) of them made wrong.

    The positions are drawn uniformly without replacement; each drawn label is
    replaced by a class drawn uniformly from the ``num_classes - 1`` *other*
    classes, so every drawn label ends up wrong and ``fraction`` is exactly the
    fraction of wrong labels (the paper's noise level: its confusion matrix keeps a
    label with probability 1 - fraction and moves it to each other class with
    probability fraction / (num_classes - 1)). Drawing from all classes instead
    would leave about 1/num_classes of the drawn labels right. round() is Python's
    (halves to even). Reproducible from ``seed``; ``labels`` is not modified.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"corrupt_labels: labels must be a 1-D integer array, "
                         f"got {labels.dtype} {labels.shape}")
    backend.check_int("corrupt_labels", "num_classes", num_classes, 2)
    backend.check_int("corrupt_labels", "seed", seed, 0)
    fraction = backend.check_float("corrupt_labels", "fraction", fraction, 0.0, 1.0)
    if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        raise ValueError(f"corrupt_labels: labels must lie in [0, {num_classes}), "
                         f"got {labels.min()} .. {labels.max()}")
    noisy, fraction = labels.astype(np.int64), float(fraction)
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    chosen = rng.choice(len(noisy), size=round(fraction * len(noisy)), replace=False)
    noisy[chosen] = (noisy[chosen] + rng.integers(1, num_classes, size=len(chosen))) % num_classes
    return noisy


# --------------------------------------------------------------------------- augmentation

def augment(images, crop_offsets, flips, mean, std, pad: int = PAD):
    """Pad, crop, flip and normalise a batch: float32 (B, H, W, C), an array of the current backend.

    images: uint8 (B, H, W, C) C-contiguous array of the current backend (32x32x3 for CIFAR).
    crop_offsets: integer (B, 2), (oy, ox) in [0, 2 * pad]. flips: bool or integer (B,).
    mean, std: (C,), used as float32. The small arguments may be NumPy arrays on
    any backend; given as NumPy their values are checked, while device arrays are
    not read back (an offset out of range there reads zero padding, never memory
    outside the image).

    out[b, i, j, c] = (padded[b, i + oy, j' + ox, c] / 255 - mean[c]) / std[c] in
    float32, each operation rounded to nearest, with j' = W - 1 - j where flips[b]
    else j, and padded the image with ``pad`` rows and columns of zeros (0 before
    normalisation) on each side. Evaluation (no crop, no flip): offsets all ``pad``,
    flips 0. numpy backend: ``reference.augment``; cuda and interpret: one Triton kernel
    (``kernels/augment.py``); both give the same bits.
    """
    _check_augment_args(images, crop_offsets, flips, mean, std, pad)
    return backend.choose(reference, augment_kernels).augment(images, crop_offsets, flips, mean, std, pad)


def _check_augment_args(images, crop_offsets, flips, mean, std, pad):
    backend.check_array("augment", "images", images)
    if images.dtype != np.uint8:
        raise TypeError(f"augment: images must be uint8, got {images.dtype}")
    if images.ndim != 4 or not images.flags.c_contiguous:
        raise ValueError(f"augment: images must be C-contiguous (B, H, W, C), got shape {tuple(images.shape)}"
                         f"{'' if images.flags.c_contiguous else ', not contiguous'}")
    backend.check_int("augment", "pad", pad, 0)
    batch, _, _, channels = images.shape
    for name, a, shape, kinds in (("crop_offsets", crop_offsets, (batch, 2), "iu"),
                                  ("flips", flips, (batch,), "biu"),
                                  ("mean", mean, (channels,), "f"), ("std", std, (channels,), "f")):
        if not (isinstance(a, np.ndarray) or backend.is_cupy_array(a)):
            raise TypeError(f"augment: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
        if tuple(a.shape) != shape or a.dtype.kind not in kinds:
            raise ValueError(f"augment: {name} must have shape {shape} and a dtype of kind {kinds!r} "
                             f"for images {tuple(images.shape)}, got {a.dtype} {tuple(a.shape)}")
    if isinstance(crop_offsets, np.ndarray) and crop_offsets.size and \
            not (crop_offsets.min() >= 0 and crop_offsets.max() <= 2 * pad):
        raise ValueError(f"augment: crop_offsets must lie in [0, {2 * pad}] for pad={pad}, "
                         f"got {crop_offsets.min()} .. {crop_offsets.max()}")
    if isinstance(std, np.ndarray) and not (std > 0).all():
        raise ValueError(f"augment: std must be positive, got {std}")


# --------------------------------------------------------------------------- batches

class EpochLoader:
    """What every loader shares: epochs of mini-batches in a seeded order, prepared ahead by a
    background thread, finished on the device by :func:`augment`. Subclasses say where the
    images of a batch come from (:meth:`_crops`) and how much padding ``pad`` their offsets
    refer to: :class:`BatchLoader` (in-memory arrays: CIFAR) and
    ``ra_kernels.imagefolder.ImageFolderLoader`` (decoded JPEGs: ImageNet).

    count: images in the split; channels: of each image; labels: integer (N,); mean, std: (C,)
    for the normalisation, in [0, 1] units (pixel / 255, as :class:`CifarData` gives them: see
    :func:`augment`). train=True: each epoch visits the images in a permutation drawn from
    (seed, epoch), and batch k of an epoch is cropped and flipped with draws from (seed, epoch,
    k); train=False: the images in order, centred, no flip. drop_last (default: train) drops the
    last partial batch. prefetch: how many prepared batches may wait for the caller (the thread
    prepares one more meanwhile).

    shard = (rank, ranks): this process's part of a data-parallel job (ra_kernels/distributed.py).
    In training, batch k of an epoch is the rank-th slice of ``batch_size`` images of a global
    batch of ``ranks * batch_size``, drawn (order, crops, flips) exactly as one process with
    that batch size would draw it: the ranks' batches together are that process's batch. In
    evaluation each rank takes every ranks-th image from its rank on, in batches of batch_size.
    """
    #: Zero padding around each image before the crop at the batch's offsets (see augment).
    pad = 0

    def __init__(self, count, channels, labels, batch_size, mean, std, train, seed, drop_last=None, prefetch=2,
                 shard=(0, 1)):
        name = type(self).__name__
        labels = np.asarray(labels)
        if labels.shape != (count,) or (labels.size and labels.dtype.kind not in "iu"):
            raise ValueError(f"{name}: labels must be integers of shape ({count},), "
                             f"got {labels.dtype} {labels.shape}")
        backend.check_int(name, "batch_size", batch_size, 1)
        backend.check_int(name, "seed", seed, 0)
        backend.check_int(name, "prefetch", prefetch, 1)
        self.count, self.labels = count, labels.astype(np.int64)
        self.mean, self.std = (np.asarray(a, dtype=np.float32) for a in (mean, std))
        if self.mean.shape != (channels,) or self.std.shape != (channels,) or not (self.std > 0).all():
            raise ValueError(f"{name}: mean and std must have shape ({channels},), std positive, "
                             f"got {self.mean} and {self.std}")
        # Pixel-unit statistics (125.3, 63.0) would normalise every image to about -2: no error, no
        # training. A mean of values in [0, 1] lies in [0, 1].
        if not ((self.mean >= 0) & (self.mean <= 1)).all():
            raise ValueError(f"{name}: mean and std are in [0, 1] units (pixel / 255), so the mean lies in [0, 1]; "
                             f"got mean {self.mean} (pixel units? divide mean and std by 255)")
        self.batch_size, self.seed, self.prefetch = batch_size, seed, prefetch
        self.train = backend.check_flag(name, "train", train)
        self.drop_last = self.train if drop_last is None else backend.check_flag(name, "drop_last", drop_last)
        self.rank, self.ranks = shard
        if not (isinstance(self.ranks, int) and self.ranks >= 1 and 0 <= self.rank < self.ranks):
            raise ValueError(f"{name}: shard must be (rank, ranks) with 0 <= rank < ranks, got {shard!r}")
        if self.train and self.ranks > 1 and not self.drop_last:
            raise ValueError(f"{name}: training on {self.ranks} ranks drops the last partial batch (drop_last)")
        if len(self) == 0:
            raise ValueError(f"{name}: {count} images make no batch of {batch_size}"
                             f"{' with drop_last' if self.drop_last else ''}")

    def checksum(self) -> int:
        """A CRC-32 of what the loader serves, every rank's part: its labels and its images (as
        :meth:`_images_checksum` identifies them), so that a resumed run can tell that the data
        changed even when its size did not."""
        return self._images_checksum(zlib.crc32(self.labels.tobytes()))

    def _images_checksum(self, crc: int) -> int:
        raise NotImplementedError

    def __len__(self):
        """Batches per epoch (this rank's)."""
        if self.train:
            images, per_batch = self.count, self.batch_size * self.ranks
        else:
            images, per_batch = len(range(self.rank, self.count, self.ranks)), self.batch_size
        full, partial = divmod(images, per_batch)
        return full + (partial > 0 and not self.drop_last)

    def epoch(self, epoch_index: int, start_batch: int = 0):
        """An iterator over the batches ``start_batch``, ... of epoch ``epoch_index``: (x, y) each.

        x: float32 (B, H, W, C), normalised (and augmented in training); y: int64 (B,);
        both arrays of the current backend, fresh for each batch. The batches are
        those an iteration from batch 0 would yield from ``start_batch`` on.

        A daemon thread prepares the next ``prefetch`` batches while the caller
        works: the host gather, the transfer to the device and the augmentation. On
        cuda it launches on the CuPy stream that is current when iteration starts, so
        its work is ordered with the caller's on that stream and no array is read back
        (so do not capture a CUDA graph on that stream while iterating: the loader's
        launches would be recorded in it). The thread stops when the iteration ends or
        is abandoned (break, an exception, KeyboardInterrupt). Keep the backend
        unchanged while iterating.
        """
        where = f"{type(self).__name__}.epoch"
        backend.check_int(where, "epoch_index", epoch_index, 0)
        backend.check_int(where, "start_batch", start_batch, 0)
        if start_batch > len(self):
            raise ValueError(f"{where}: start_batch {start_batch} is past the {len(self)} batches "
                             f"of an epoch")
        return self._batches(epoch_index, start_batch)

    def _batches(self, epoch_index, start_batch):
        order = (np.random.default_rng([self.seed, _ORDER_STREAM, epoch_index]).permutation(self.count)
                 if self.train else np.arange(self.rank, self.count, self.ranks))
        mean, std = backend.asarray(self.mean), backend.asarray(self.std)

        def prepare(batch_index):
            return self._stage(self._host_batch(order, epoch_index, batch_index), mean, std)

        batch_indices = range(start_batch, len(self))
        with _Prefetcher(prepare, batch_indices, self.prefetch, _launch_context()) as prepared:
            yield from prepared

    def _host_batch(self, order, epoch_index, batch_index):
        """This rank's part of batch ``batch_index`` on the host: NumPy (images uint8 (B, H, W, C),
        labels int64 (B,), crop offsets int32 (B, 2), flips int8 (B,))."""
        if not self.train:
            indices = order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]
            images, offsets = self._crops(indices, None)
            return images, self.labels[indices], offsets, np.zeros(len(indices), np.int8)
        span = self.batch_size * self.ranks
        indices = order[batch_index * span:(batch_index + 1) * span]
        # Every rank draws for the whole global batch, then takes its slice: the same draws as one
        # process with the global batch.
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, epoch_index, batch_index])
        draws = self._draws(len(indices), rng)
        flips = rng.integers(0, 2, size=len(indices), dtype=np.int8)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        images, offsets = self._crops(indices[mine], draws[mine])
        return images, self.labels[indices[mine]], offsets, flips[mine]

    def _draws(self, count, rng):
        """The random choices of ``count`` training crops, drawn from the NumPy generator ``rng``:
        an array with one entry (or row) per image."""
        raise NotImplementedError

    def _crops(self, indices, draws):
        """(images uint8 (B, H, W, C), crop offsets int32 (B, 2)) of the images ``indices``: the
        training crops ``draws`` (from :meth:`_draws`), or the evaluation view when None."""
        raise NotImplementedError

    def _stage(self, batch, mean, std):
        """(x, y) on the backend from a host batch: images and labels transferred, x augmented."""
        images, labels, offsets, flips = batch
        return augment(backend.asarray(images), offsets, flips, mean, std, self.pad), backend.asarray(labels)


class BatchLoader(EpochLoader):
    """Mini-batches of images held in memory (CIFAR): images uint8 (N, H, W, C) NumPy array, the
    rest as for :class:`EpochLoader`. Training crops are random offsets into the image padded by
    PAD; evaluation takes the centre, the image itself."""
    pad = PAD

    def __init__(self, images, labels, batch_size, mean, std, train, seed, drop_last=None, prefetch=2,
                 shard=(0, 1)):
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4):
            got = (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray)
                   else type(images).__name__)
            raise TypeError(f"BatchLoader: images must be a uint8 (N, H, W, C) NumPy array, got {got}")
        super().__init__(len(images), images.shape[-1], labels, batch_size, mean, std, train, seed, drop_last,
                         prefetch, shard)
        self.images = np.ascontiguousarray(images)

    def _images_checksum(self, crc):
        return zlib.crc32(self.images, crc)  # the pixels (150 MB for CIFAR: a tenth of a second)

    def _draws(self, count, rng):
        return rng.integers(0, 2 * PAD + 1, size=(count, 2), dtype=np.int32)  # crop offsets

    def _crops(self, indices, draws):
        offsets = draws if draws is not None else np.full((len(indices), 2), PAD, np.int32)
        return self.images[indices], offsets


def _launch_context():
    """A context that makes another thread launch where the calling thread does now.

    cuda: CuPy's current device and stream (both are per thread in CuPy); elsewhere nothing.
    """
    if backend.get_backend() != "cuda":
        return contextlib.nullcontext()
    cupy = backend.xp()
    device, stream = cupy.cuda.Device(), cupy.cuda.get_current_stream()

    @contextlib.contextmanager
    def on_caller_device_and_stream():
        with device, stream:
            yield

    return on_caller_device_and_stream()


class _Prefetcher:
    """``with _Prefetcher(produce, indices, depth, context) as results:`` iterates produce(i) for each index.

    A daemon thread computes the results in order, at most ``depth`` ahead of the
    consumer, inside ``context``. An exception in produce is raised in the consumer.
    Leaving the ``with`` block, however, stops the thread and waits for it.
    """
    _END = object()

    def __init__(self, produce, indices, depth, context):
        self._produce, self._indices, self._context = produce, indices, context
        self._results = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="EpochLoader-prefetch", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self._consume()

    def __exit__(self, *exc_info):
        self._stop.set()
        with contextlib.suppress(queue.Empty):  # unblock a pending put at once
            self._results.get_nowait()
        self._thread.join()

    def _run(self):
        try:
            with self._context:
                for index in self._indices:
                    if self._stop.is_set() or not self._put((self._produce(index), None)):
                        return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put((None, error))
            return
        self._put(self._END)

    def _put(self, item) -> bool:
        """Queue ``item`` unless stopped first; False if stopped."""
        while not self._stop.is_set():
            try:
                self._results.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _consume(self):
        while (item := self._results.get()) is not self._END:
            result, error = item
            if error is not None:
                raise error
            yield result
