"""ImageNet-style folders, scanned and checked; images decoded with Pillow and cropped the standard ways.

Layout: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``, one folder per class,
the same class folders in both splits (ImageNet's validation set sorted into class folders,
as most copies have it). Images are files ending in .JPEG, .jpg, .jpeg or .png (any case).
Classes are numbered in sorted folder-name order, images within a class in sorted name order,
so that a scan of the same folder always gives the same labels.

Crops (host side, uint8 RGB): training takes :func:`random_resized_crop_box` (a random area
fraction and aspect ratio, as Inception and every ImageNet recipe since) resized to 224x224;
evaluation takes :func:`validation_view` (the shorter side resized to 256, the central 224x224).
:class:`ImageFolderLoader` decodes and crops a batch in worker threads (Pillow releases the GIL
while it decodes and resizes), inside the loader's prefetching thread; the flips and the
per-channel normalisation run on the device, in the augmentation kernel CIFAR uses (no padding).

A file that cannot be decoded (truncated, damaged, not what its name says) does not stop a run
of days: the loader warns once, naming it, and takes in its place the next decodable image of
the same class (in name order, wrapping), with the same random crop, so that the label stays
right and the batch stays a function of the seed and the position. A class whose every image is
corrupt is an error, and so is a file that cannot be read at all (missing, no permission, an
I/O error): its bytes may come back, and a stand-in chosen for a passing failure would make
batches depend on it (the training commands checkpoint and stop, naming it).
"""
from __future__ import annotations

import collections.abc
import concurrent.futures
import dataclasses
import io
import math
import operator
import os
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np

from .backend import check_int
from .data import EpochLoader

#: ImageNet's per-channel mean and standard deviation of RGB in [0, 1], the values every
#: ImageNet model since AlexNet's ports normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The endings of image files (compared in lower case).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class CorruptImage(ValueError):
    """An image file that Pillow cannot decode whole (truncated, damaged, or not what its name says)."""


class CorruptImageWarning(UserWarning):
    """A corrupt image was replaced by another of its class (ImageFolderLoader)."""


class ImagePaths(collections.abc.Sequence):
    """The image files of a split, a sequence of Paths held packed: ImageNet's 1.28 M Path objects
    take 0.41 GB in every process (about 320 bytes each once used); here an image costs
    its name's bytes in one buffer and the int64 end of its name there, 28 bytes for
    ImageNet's names (35 MB), besides ``folder_of``, which a scan shares with its int64 labels.
    ``paths[i]`` is ``folders[folder_of[i]] / names[i]``, made when asked."""

    def __init__(self, folders, folder_of, names):
        """folders: Paths; folder_of: per image, the index of its folder in ``folders``; names: per
        image, its file name (str). Names are stored as the file system's bytes (os.fsencode), so
        that a name that is not valid UTF-8 comes back as the same str."""
        encoded = [os.fsencode(name) for name in names]
        self._folders = tuple(folders)
        self._folder_of = np.asarray(folder_of, np.int64)
        self._ends = np.cumsum([len(name) for name in encoded], dtype=np.int64)
        self._names = b"".join(encoded)
        if len(self._folder_of) != len(self._ends):
            raise ValueError(f"ImagePaths: {len(self._folder_of)} folder indices for {len(self._ends)} names")

    def __len__(self):
        return len(self._ends)

    def __repr__(self):
        return f"ImagePaths({len(self)} images in {len(self._folders)} folders)"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        i %= len(self)
        return self._folders[self._folder_of[i]] / self._name(i)

    def _name(self, i):
        start = self._ends[i - 1] if i > 0 else 0
        return os.fsdecode(self._names[start:self._ends[i]])

    def checksum(self, crc: int = 0) -> int:
        """A CRC-32 of the paths below their folders' parent (class folder and file name each,
        wherever the split's root now lies), continuing ``crc``."""
        for part in (b"/".join(os.fsencode(folder.name) for folder in self._folders), self._folder_of.tobytes(),
                     self._ends.tobytes(), self._names):
            crc = zlib.crc32(part, crc)
        return crc

    def take(self, indices):
        """The paths of images ``indices`` (integers, negative from the end), in that order, packed alike."""
        indices = np.arange(len(self))[np.asarray(indices, np.int64).reshape(-1)]  # IndexError when out of range
        return ImagePaths(self._folders, self._folder_of[indices], [self._name(i) for i in indices])


@dataclasses.dataclass(frozen=True)
class ImageFolderSplit:
    """One split of a folder: class names (sorted), image paths (ImagePaths) and their int64 labels."""
    root: Path
    class_names: tuple
    paths: ImagePaths
    labels: np.ndarray

    def __len__(self):
        return len(self.paths)

    def subset(self, indices):
        """The split of images ``indices`` (integers), in that order."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        return ImageFolderSplit(self.root, self.class_names, self.paths.take(indices), self.labels[indices])


def scan_split(folder, class_names=None) -> ImageFolderSplit:
    """The images of ``folder``/<class>/*; ValueError naming the problem when the folder is missing,
    holds no class folders, a class folder holds no image, a file is not an image, or (given the
    training split's ``class_names``) the class folders are not the same."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (expected <root>/train and <root>/val, one folder per class)")
    with os.scandir(folder) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder}: no class folders in it (expected {folder}/<class>/<image>.JPEG)")
    if class_names is not None and tuple(classes) != tuple(class_names):
        missing, extra = sorted(set(class_names) - set(classes)), sorted(set(classes) - set(class_names))
        raise ValueError(f"{folder}: its class folders differ from the training split's: "
                         f"{_listed('missing', missing)}{'; ' if missing and extra else ''}{_listed('extra', extra)}")
    names, labels = [], []
    for label, name in enumerate(classes):
        # os.scandir: the entry types come with the listing, no stat per file (1.28 M of them).
        with os.scandir(folder / name) as entries:
            files = sorted((e.name, e.is_file()) for e in entries if not e.name.startswith("."))
        for file_name, is_file in files:
            path = folder / name / file_name
            if not is_file and os.path.islink(path) and not os.path.exists(path):  # a stat only off the usual path
                raise ValueError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist")
            if not is_file or os.path.splitext(file_name)[1].lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{path}: not an image file (a class folder holds only .JPEG, "
                                 f".jpg, .jpeg or .png files); move it out of {folder}")
        if not files:
            raise ValueError(f"{folder / name}: an empty class folder (every class needs at least one image)")
        names += [file_name for file_name, _ in files]
        labels += [label] * len(files)
    labels = np.array(labels, np.int64)
    paths = ImagePaths([folder / name for name in classes], labels, names)
    return ImageFolderSplit(folder, tuple(classes), paths, labels)


def _listed(what, names, shown=5):
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{what} {', '.join(names[:shown])}{more}"


def scan_imagenet(root):
    """(train, val) splits of ``root``, checked against each other (the same class folders)."""
    train = scan_split(Path(root) / "train")
    return train, scan_split(Path(root) / "val", train.class_names)


#: Pillow's modes of a 16-bit grayscale PNG ("I": 32-bit integers, as some releases load it).
SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_rgb(path):
    """The image at ``path`` as a Pillow RGB image, whatever its mode (grayscale, CMYK, palette,
    alpha are converted); CorruptImage naming the file when its bytes do not decode whole, or when
    its header claims more pixels than Pillow's guard against decompression bombs allows
    (``PIL.Image.MAX_IMAGE_PIXELS``, 89 million: a damaged header, never a photograph; Pillow
    raises above twice that and only warns between, then would allocate gigabytes). A file that
    cannot be read (missing, no permission, an I/O error) raises the OSError of the read: that is
    not the image's fault, and may pass."""
    from PIL import Image, UnidentifiedImageError
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels claimed")
            image.load()  # decodes now: a truncated file fails here, not at a later crop
            if image.mode in SIXTEEN_BIT_GRAY_MODES:  # convert("RGB") would clip at 255: keep the high byte
                high = np.clip(np.asarray(image, np.int64), 0, 65535) >> 8
                return Image.fromarray(high.astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    # the bomb warning arrives as an exception where warnings are errors
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise CorruptImage(f"{path}: cannot decode the image ({error}: past the {Image.MAX_IMAGE_PIXELS:,} pixels "
                           f"of PIL.Image.MAX_IMAGE_PIXELS; raise that if the image is real)") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as error:  # SyntaxError: Pillow's "broken PNG"
        # (Pillow's "cannot identify image file" names the in-memory file it read: <_io.BytesIO at 0x...>)
        why = "Pillow cannot identify its format" if isinstance(error, UnidentifiedImageError) else error
        raise CorruptImage(f"{path}: cannot decode the image ({why})") from None


def random_resized_crop_box(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """(top, left, crop_height, crop_width) of a random crop of a height x width image: an area
    fraction uniform in ``scale`` and an aspect ratio (width / height) log-uniform in ``ratio``,
    tried ``attempts`` times until the crop fits; else the largest central crop whose aspect is
    within ``ratio``. Draws from the NumPy generator ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resized(image, box, size):
    """The ``box`` = (top, left, height, width) of a Pillow image, resized bilinearly to size x size:
    uint8 (size, size, 3)."""
    from PIL import Image
    top, left, h, w = box
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)), np.uint8)


def validation_view(image, resize=256, size=224):
    """The evaluation view of a Pillow image: its shorter side resized to ``resize`` (bilinear),
    then the central size x size: uint8 (size, size, 3)."""
    from PIL import Image
    width, height = image.size
    factor = resize / min(width, height)
    new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
    resized = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), np.uint8)


def evaluation_resize(size):
    """The shorter side an evaluation image is resized to before its central size x size crop:
    256 for 224, in the same proportion for other sizes."""
    return round(size * 256 / 224)


class ImageFolderLoader(EpochLoader):
    """Mini-batches of an ImageFolderSplit at ``size`` x ``size`` (224: the paper's).

    Training: per image a random resized crop (:func:`random_resized_crop_box`, from a generator
    seeded by the batch's draws), then on the device a random flip and the normalisation.
    Evaluation: :func:`validation_view` (resize to :func:`evaluation_resize`, central crop).
    ``workers`` threads decode a batch (default: one per core this process may use, at most 16),
    a pool made for each epoch's iteration. mean, std: (3,) for the normalisation, in [0, 1] units
    (default: ImageNet's). Batches as for ``ra_kernels.data.EpochLoader``; corrupt files as the
    module says (``corrupt`` lists those met so far).
    """

    def __init__(self, split: ImageFolderSplit, size, batch_size, train, seed, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, workers=None, drop_last=None, prefetch=2, shard=(0, 1)):
        super().__init__(len(split), 3, split.labels, batch_size, mean, std, train, seed, drop_last, prefetch,
                         shard)
        self.split, self.size = split, check_int("ImageFolderLoader", "size", size, 1)
        self.workers = (check_int("ImageFolderLoader", "workers", workers, 1) if workers is not None
                        else min(16, len(os.sched_getaffinity(0))))
        self._pool = None
        self._corrupt, self._lock = set(), threading.Lock()
        # The images of each class, in order: where a corrupt one's stand-in is looked for.
        self._class_members = {label: np.flatnonzero(split.labels == label) for label in np.unique(split.labels)}

    @property
    def corrupt(self):
        """The paths of the corrupt images met so far (each replaced by a stand-in), sorted."""
        return sorted(self.split.paths[i] for i in self._corrupt)

    def _batches(self, epoch_index, start_batch):
        # The decoding threads live as long as the iteration: the prefetch thread that uses them is
        # joined before the pool shuts down.
        with concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="ImageFolderLoader") as pool:
            self._pool = pool
            yield from super()._batches(epoch_index, start_batch)

    def _images_checksum(self, crc):
        return self.split.paths.checksum(crc)  # the files by name: reading them all would take hours

    def _draws(self, count, rng):
        return rng.integers(0, 2 ** 63, size=count)  # each image's crop generator's seed

    def _crops(self, indices, draws):
        seeds = draws if draws is not None else [None] * len(indices)
        images = np.stack(list(self._pool.map(self._crop, indices, seeds)))
        return images, np.zeros((len(indices), 2), np.int32)

    def _crop(self, index, seed):
        """The view of image ``index`` (a crop drawn from ``seed``, or the evaluation view when
        None): uint8 (size, size, 3)."""
        image = self._decode(index)
        if seed is None:
            return validation_view(image, evaluation_resize(self.size), self.size)
        box = random_resized_crop_box(image.height, image.width, np.random.default_rng(seed))
        return crop_resized(image, box, self.size)

    def _decode(self, index):
        """Image ``index`` decoded, or, when it is corrupt, the next decodable image of its class."""
        members = self._class_members[self.split.labels[index]]
        start = int(np.searchsorted(members, index))
        for candidate in np.roll(members, -start):
            if candidate in self._corrupt:
                continue
            try:
                image = decode_rgb(self.split.paths[candidate])
            except CorruptImage as error:
                with self._lock:
                    first = candidate not in self._corrupt
                    self._corrupt.add(candidate)
                if first:
                    warnings.warn(f"{error}; another image of its class stands in for it", CorruptImageWarning,
                                  stacklevel=2)
                continue
            return image
        raise CorruptImage(f"{self.split.root / self.split.class_names[self.split.labels[index]]}: every image "
                           f"of the class is corrupt")
