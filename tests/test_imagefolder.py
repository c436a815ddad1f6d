"""ImageNet-style folders (ra_kernels/imagefolder.py) on generated images: scanning, the errors a
user meets, decoding every mode to RGB, and the two crops."""
import math

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


def test_a_cmyk_jpeg_keeps_its_colour(tmp_path, rng):
    # Pure cyan in CMYK is (0, 255, 255) in RGB; JPEG's loss stays within a few levels on a flat image.
    path = _save(tmp_path / "cyan.jpg", rng, size=(40, 30), mode="CMYK", color=(255, 0, 0, 0))
    pixels = np.asarray(imagefolder.decode_rgb(path)).astype(int)
    assert np.abs(pixels - [0, 255, 255]).max() <= 6


@pytest.mark.parametrize("damage, message", [
    ("empty class", r"n01443537: an empty class folder"),
    ("text file", r"notes.txt: not an image file"),
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
