"""ImageNet-style folders (ra_kernels/imagefolder.py) on generated images: scanning, the errors a
user meets, decoding every mode to RGB, and the two crops."""
import math
import os
import struct
import tracemalloc
import warnings

import numpy as np
import pytest

from ra_kernels import imagefolder

Image = pytest.importorskip("PIL.Image", reason="decoding needs Pillow")

CLASSES = ["n01440764", "n01443537", "n01484850"]


def _save(path, rng, size=(37, 29), mode="RGB", color=None):
    """An image of ``size`` (width, height) in ``mode``, random pixels or one ``color``, saved by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    else:
        image = Image.new(mode, size, color)
    image.save(path, quality=95) if path.suffix.lower() in (".jpeg", ".jpg") else image.save(path)
    return path


@pytest.fixture
def folder(tmp_path, rng):
    """root/train and root/val with 3 classes: odd sizes, a grayscale and a CMYK JPEG, a PNG."""
    for split, per_class in (("train", 3), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                _save(tmp_path / split / name / f"{name}_{i}.JPEG", rng, size=(31 + 7 * i, 23 + 5 * c))
    _save(tmp_path / "train" / CLASSES[0] / "gray.jpg", rng, mode="L")
    _save(tmp_path / "train" / CLASSES[1] / "cmyk.JPEG", rng, mode="CMYK")
    _save(tmp_path / "train" / CLASSES[2] / "drawn.png", rng)
    return tmp_path


def test_scan_numbers_classes_and_images_in_sorted_order(folder):
    train, val = imagefolder.scan_imagenet(folder)
    assert train.class_names == val.class_names == tuple(CLASSES)
    assert len(train) == 3 * 3 + 3 and len(val) == 3 * 2
    for split in (train, val):
        assert split.labels.dtype == np.int64
        for path, label in zip(split.paths, split.labels):
            assert path.parent.name == CLASSES[label]
        assert list(split.paths) == sorted(split.paths)  # class folders sorted, then names


def test_packed_paths_behave_as_a_tuple_of_paths(tmp_path, rng):
    # Names of varied length, some not ASCII (several UTF-8 bytes a character) or not even UTF-8
    # (a byte 0xff, which Python's file functions give as the surrogate \udcff), over 3 folders.
    folders = [tmp_path / name for name in CLASSES]
    folder_of = np.sort(rng.integers(0, len(folders), 300))
    odd = ["", "é", "\udcff"]
    names = [f"{odd[rng.integers(3)]}{CLASSES[f]}_{rng.integers(10 ** int(rng.integers(0, 6)))}.JPEG"
             for f in folder_of]
    want = tuple(folders[f] / name for f, name in zip(folder_of, names))
    paths = imagefolder.ImagePaths(folders, folder_of, names)
    assert len(paths) == len(want) and list(paths) == list(want)
    assert repr(paths) == f"ImagePaths({len(want)} images in 3 folders)"
    assert [paths[i] for i in range(-len(want), len(want))] == [want[i] for i in range(-len(want), len(want))]
    for index in (len(want), -len(want) - 1):
        with pytest.raises(IndexError):
            paths[index]
    step = int(rng.integers(1, 5))
    assert list(paths[7:-3:step]) == list(want[7:-3:step]) and list(paths[::-1]) == list(want[::-1])
    order = rng.permutation(len(want))
    assert list(paths.take(order)) == [want[i] for i in order] and list(paths.take([])) == []
    with pytest.raises(IndexError):
        paths.take([0, len(want)])


def test_packed_paths_checksum_names_not_where_the_folder_lies(tmp_path, rng):
    folder_of = np.sort(rng.integers(0, len(CLASSES), 50))
    names = [f"{CLASSES[f]}_{i}.JPEG" for i, f in enumerate(folder_of)]

    def checksum(root, names=names, folder_of=folder_of):
        return imagefolder.ImagePaths([root / name for name in CLASSES], folder_of, names).checksum()
    reference_sum = checksum(tmp_path / "a")
    assert checksum(tmp_path / "moved" / "elsewhere") == reference_sum       # --data-dir may move
    renamed = list(names)
    renamed[int(rng.integers(len(names)))] += "x"
    assert checksum(tmp_path / "a", renamed) != reference_sum
    assert checksum(tmp_path / "a", names[:-1], folder_of[:-1]) != reference_sum
    assert checksum(tmp_path / "a", list(reversed(names))) != reference_sum


def test_names_that_are_not_utf8_are_read_and_summed_as_bytes(tmp_path, rng):
    """A Linux file name is bytes: a class folder or an image whose name is not UTF-8 (os.fsdecode
    gives it lone surrogates, which str.encode refuses) is scanned, read and checksummed."""
    odd = os.fsdecode(b"n\xff03")
    for split in ("train", "val"):
        for name in (CLASSES[0], odd):
            _save(tmp_path / split / name / os.fsdecode(b"img\xfe.JPEG"), rng)
    train, _ = imagefolder.scan_imagenet(tmp_path)
    assert train.class_names == tuple(sorted([CLASSES[0], odd]))
    assert imagefolder.decode_rgb(train.paths[1]).size == (37, 29)
    renamed = imagefolder.ImagePaths([tmp_path / "t" / CLASSES[0], tmp_path / "t" / os.fsdecode(b"n\xfe03")],
                                     np.array([0, 1]), [os.fsdecode(b"img\xfe.JPEG")] * 2)
    assert train.paths.checksum() != renamed.checksum()

def test_packed_paths_hold_little_memory(tmp_path):
    """A Path object takes about 320 bytes once used: 0.41 GB for ImageNet in every process.
    Packed, an image costs its name's UTF-8 bytes and 8 for its end (the folder indices are the
    caller's labels)."""
    n = 5000
    labels, names = np.arange(n) // 1000, [f"n{i // 1000:08d}_{i}.JPEG" for i in range(n)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        paths = imagefolder.ImagePaths([tmp_path / f"n{c:08d}" for c in range(5)], labels, names)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(paths) == n
    assert held <= sum(map(len, names)) + 8 * n + 8192, f"{held / n:.1f} bytes an image"


def test_every_mode_decodes_to_rgb(folder):
    train, _ = imagefolder.scan_imagenet(folder)
    for path in train.paths:
        image = imagefolder.decode_rgb(path)
        assert image.mode == "RGB"
        with Image.open(path) as original:
            assert image.size == original.size
    gray = imagefolder.decode_rgb(folder / "train" / CLASSES[0] / "gray.jpg")
    pixels = np.asarray(gray).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_a_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path, rng):
    from PIL import Image
    pixels = rng.integers(0, 65536, (23, 31)).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    decoded = np.asarray(imagefolder.decode_rgb(tmp_path / "deep.png"))
    assert decoded.shape == (23, 31, 3)
    for channel in range(3):  # was 255 wherever the 16-bit value passed 255
        np.testing.assert_array_equal(decoded[..., channel], pixels >> 8)

def test_a_cmyk_jpeg_keeps_its_colour(tmp_path, rng):
    # Pure cyan in CMYK is (0, 255, 255) in RGB; JPEG's loss stays within a few levels on a flat image.
    path = _save(tmp_path / "cyan.jpg", rng, size=(40, 30), mode="CMYK", color=(255, 0, 0, 0))
    pixels = np.asarray(imagefolder.decode_rgb(path)).astype(int)
    assert np.abs(pixels - [0, 255, 255]).max() <= 6


@pytest.mark.parametrize("damage, message", [
    ("empty class", r"n01443537: an empty class folder"),
    ("text file", r"notes.txt: not an image file"),
    ("broken link", r"gone.JPEG: a symbolic link to .*elsewhere.JPEG, which does not exist"),
    ("missing val class", r"val: its class folders differ from the training split's: missing n01484850"),
    ("extra val class", r"val: its class folders differ from the training split's: extra n99999999"),
    ("no val", r"val: no such folder"),
    ("no classes", r"train: no class folders in it"),
])
def test_a_damaged_folder_is_a_clear_error(folder, rng, damage, message):
    if damage == "empty class":
        for path in (folder / "train" / CLASSES[1]).iterdir():
            path.unlink()
    elif damage == "text file":
        (folder / "train" / CLASSES[2] / "notes.txt").write_text("not a picture")
    elif damage == "broken link":
        (folder / "train" / CLASSES[2] / "gone.JPEG").symlink_to(folder / "elsewhere.JPEG")
    elif damage == "missing val class":
        for path in (folder / "val" / CLASSES[2]).iterdir():
            path.unlink()
        (folder / "val" / CLASSES[2]).rmdir()
    elif damage == "extra val class":
        _save(folder / "val" / "n99999999" / "x.JPEG", rng)
    elif damage == "no val":
        for path in (folder / "val").rglob("*.JPEG"):
            path.unlink()
        for name in CLASSES:
            (folder / "val" / name).rmdir()
        (folder / "val").rmdir()
    else:
        empty = folder / "elsewhere" / "train"
        empty.mkdir(parents=True)
        folder = folder / "elsewhere"
    with pytest.raises(ValueError, match=message):
        imagefolder.scan_imagenet(folder)


@pytest.mark.parametrize("damage", ["truncated", "not a jpeg"])
def test_a_corrupt_image_is_named(folder, damage):
    path = folder / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"GIF89a" + data[6:])
    with pytest.raises(imagefolder.CorruptImage, match=f"{path.name}: cannot decode the image"):
        imagefolder.decode_rgb(path)


@pytest.mark.parametrize("width, height, bomb_warning", [(60000, 60000, "error"), (10000, 10000, "error"),
                                                        (10000, 10000, "ignore")],
                         ids=["past twice the limit", "past the limit", "past the limit, warning ignored"])
def test_an_image_claiming_too_many_pixels_is_corrupt(folder, width, height, bomb_warning):
    """A damaged header can claim billions of pixels (seed 1367929184 of the test above: its
    "not a jpeg" GIF claimed 59807x71916, and Pillow's DecompressionBombError escaped the loader).
    Past Pillow's limit it is a corrupt image: above twice the limit Pillow raises; between, it
    only warns (an exception where warnings are errors, as in this suite) and would then allocate
    the pixels. A GIF header with one frame of that size."""
    path = folder / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG"
    path.write_bytes(b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
                     + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;")
    with warnings.catch_warnings():
        warnings.simplefilter(bomb_warning, Image.DecompressionBombWarning)
        with pytest.raises(imagefolder.CorruptImage, match=f"{path.name}: cannot decode the image .*pixels.*"
                                                           "MAX_IMAGE_PIXELS; raise that if the image is real"):
            imagefolder.decode_rgb(path)


def test_random_resized_crops_cover_their_ranges(rng):
    """Over many draws: every box inside the image, area fractions filling [0.08, 1] and aspect
    ratios [3/4, 4/3] (to the rounding of a side), the same boxes from the same seed."""
    seed = int(rng.integers(1 << 30))
    height, width = 375, 500
    boxes = [imagefolder.random_resized_crop_box(height, width, np.random.default_rng([seed, i]))
             for i in range(2000)]
    again = [imagefolder.random_resized_crop_box(height, width, np.random.default_rng([seed, i])) for i in range(5)]
    assert again == boxes[:5]
    tops, lefts, hs, ws = np.array(boxes).T
    assert (tops >= 0).all() and (lefts >= 0).all() and (tops + hs <= height).all() and (lefts + ws <= width).all()
    fractions, aspects = hs * ws / (height * width), ws / hs
    slack = 1 / min(hs.min(), ws.min())  # rounding a side to whole pixels
    assert fractions.min() >= 0.08 * (1 - 2 * slack) - 1e-9 and fractions.max() <= 1
    assert fractions.min() < 0.1 and fractions.max() > 0.9  # the whole range is drawn
    assert aspects.min() >= 3 / 4 * (1 - 2 * slack) and aspects.max() <= 4 / 3 * (1 + 2 * slack)
    assert math.log(aspects.max() / aspects.min()) > 0.9 * math.log(16 / 9)


def test_random_resized_crop_of_a_thin_image_falls_back_to_a_central_crop(rng):
    # 1000 x 20: no crop with an aspect in [3/4, 4/3] and area >= 8% fits, so the fallback takes
    # the widest allowed aspect, 4/3, centred: 20 high, 27 wide.
    assert imagefolder.random_resized_crop_box(20, 1000, rng) == (0, (1000 - 27) // 2, 20, 27)
    assert imagefolder.random_resized_crop_box(1000, 20, rng) == ((1000 - 27) // 2, 0, 27, 20)


def test_crops_resize_to_the_network_input():
    # A 400 x 300 image, red over (60..340, 10..290), blue around it. The validation view resizes it
    # to 341 x 256 and takes x 58..282, y 16..240 there: x 68..330, y 19..281 of the original,
    # inside the red by 8 pixels, farther than bilinear resizing reaches. A training crop inside the
    # red is red, one in a blue corner blue.
    image = Image.new("RGB", (400, 300), (0, 0, 255))
    image.paste((255, 0, 0), (60, 10, 340, 290))
    view = imagefolder.validation_view(image)
    assert view.shape == (224, 224, 3) and view.dtype == np.uint8
    assert (view == [255, 0, 0]).all()
    red = imagefolder.crop_resized(image, (40, 90, 220, 220), 224)
    blue = imagefolder.crop_resized(image, (0, 0, 8, 50), 224)
    assert red.shape == blue.shape == (224, 224, 3)
    assert (red == [255, 0, 0]).all() and (blue == [0, 0, 255]).all()


# --------------------------------------------------------------------------- the loader

def _normalised(view, mean=imagefolder.IMAGENET_MEAN, std=imagefolder.IMAGENET_STD):
    """(view / 255 - mean) / std, each operation rounded to float32 (augment's definition)."""
    pixels = view.astype(np.float32) / np.float32(255)
    return (pixels - np.float32(mean)) / np.float32(std)


def _epoch(loader, epoch=0, start=0):
    return [(np.asarray(x), np.asarray(y)) for x, y in loader.epoch(epoch, start)]


def test_evaluation_batches_are_the_normalised_validation_views(folder):
    _, val = imagefolder.scan_imagenet(folder)
    loader = imagefolder.ImageFolderLoader(val, 32, batch_size=4, train=False, seed=0, workers=3)
    batches = _epoch(loader)
    assert [len(y) for _, y in batches] == [4, 2]  # evaluation keeps the last partial batch
    x, y = (np.concatenate(parts) for parts in zip(*batches))
    assert x.dtype == np.float32 and x.shape == (len(val), 32, 32, 3)
    assert (y == val.labels).all()
    for i, path in enumerate(val.paths):
        want = _normalised(imagefolder.validation_view(imagefolder.decode_rgb(path), 37, 32))
        assert np.array_equal(x[i], want), path


def test_training_batches_are_a_function_of_seed_and_position(folder, rng):
    train, _ = imagefolder.scan_imagenet(folder)
    seed = int(rng.integers(1 << 30))

    def loader(seed, workers):
        return imagefolder.ImageFolderLoader(train, 32, batch_size=5, train=True, seed=seed, workers=workers)
    first = _epoch(loader(seed, 4), epoch=1)
    assert len(first) == len(train) // 5  # training drops the partial batch
    again = _epoch(loader(seed, 1), epoch=1, start=1)  # one worker, resumed at batch 1: the same bits
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first[1:], again))
    other_epoch, other_seed = _epoch(loader(seed, 4), epoch=2), _epoch(loader(seed + 1, 4), epoch=1)
    assert not np.array_equal(first[0][0], other_epoch[0][0]) and not np.array_equal(first[0][0], other_seed[0][0])
    labels = np.concatenate([y for _, y in first])
    assert sorted(labels.tolist()) != labels.tolist() or len(set(labels)) == 1  # shuffled
    x = np.concatenate([x for x, _ in first])
    low, high = _normalised(np.uint8([0, 255]).repeat(3).reshape(2, 1, 3)).reshape(2, 3)
    assert x.shape == (len(labels), 32, 32, 3) and (x >= low).all() and (x <= high).all()


def test_a_corrupt_image_is_replaced_by_the_next_of_its_class_with_a_warning(folder):
    _, val = imagefolder.scan_imagenet(folder)
    broken = val.paths[2]  # the first image of class 1, whose stand-in is val.paths[3]
    broken.write_bytes(broken.read_bytes()[:200])
    loader = imagefolder.ImageFolderLoader(val, 32, batch_size=6, train=False, seed=0, workers=2)
    with pytest.warns(imagefolder.CorruptImageWarning, match=f"{broken.name}: cannot decode") as caught:
        (x, y), = _epoch(loader)
        _epoch(loader)  # warned once per file, not per epoch
    assert len(caught) == 1 and loader.corrupt == [broken]
    assert (y == val.labels).all() and np.array_equal(x[2], x[3]) and not np.array_equal(x[1], x[3])
    val.paths[3].write_bytes(b"not a picture at all")
    with pytest.raises(imagefolder.CorruptImage, match=f"{CLASSES[1]}: every image of the class is corrupt"), \
            pytest.warns(imagefolder.CorruptImageWarning, match=val.paths[3].name):
        _epoch(loader)


def test_a_file_that_cannot_be_read_is_an_error_not_a_stand_in(folder):
    """A read failure may pass (a network disk, a moved file): replacing the image would make the
    batches depend on it, so it stops the iteration, naming the file, and nothing is remembered."""
    _, val = imagefolder.scan_imagenet(folder)
    moved = val.paths[4].rename(val.paths[4].with_suffix(".moved"))
    loader = imagefolder.ImageFolderLoader(val, 32, batch_size=6, train=False, seed=0, workers=2)
    with pytest.raises(FileNotFoundError, match=val.paths[4].name):
        _epoch(loader)
    moved.rename(val.paths[4])
    (x, _), = _epoch(loader)
    assert loader.corrupt == [] and not np.array_equal(x[4], x[5])


def test_loader_arguments_are_checked(folder):
    train, _ = imagefolder.scan_imagenet(folder)
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        imagefolder.ImageFolderLoader(train, 32, batch_size=2, train=True, seed=0, workers=0)
    with pytest.raises(ValueError, match="size must be an integer >= 1, got 0"):
        imagefolder.ImageFolderLoader(train, 0, batch_size=2, train=True, seed=0)
    loader = imagefolder.ImageFolderLoader(train, np.int64(32), batch_size=2, train=True, seed=0, workers=np.int64(1))
    assert (loader.size, loader.workers) == (32, 1) and type(loader.size) is int
    with pytest.raises(ValueError, match="12 images make no batch of 13"):
        imagefolder.ImageFolderLoader(train, 32, batch_size=13, train=True, seed=0)
