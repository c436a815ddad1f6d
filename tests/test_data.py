"""ra_kernels.data: CIFAR files, download, noisy labels, augmentation and batches.

The datasets here are small fixtures each test writes in the official format
(pickles with bytes keys, R/G/B planes per row), with a number of images per
file that no loader could assume; the real CIFAR-10 subset in ../shared/data is
read when it is present. Downloads come from an HTTP server on 127.0.0.1 serving
a temporary directory. The augmentation kernel (interpret backend; cuda too on a
GPU) must equal the NumPy version bit for bit: both compute
(u8 / 255 - mean) / std in float32 with each operation rounded to nearest
(the kernel uses div_rn and has no multiply to fuse), so there is nothing to tolerate.
"""
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import pickle
import re
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from ra_kernels import aot, backend, data
from ra_kernels import functional as F
from ra_kernels.autograd import Tensor
from ra_kernels.kernels import augment as augment_kernels

SUBSET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-subset"

# Images per file: uneven and far from the official 10,000, so N must come from the files.
FIXTURE_SIZES = {"cifar10": ([7, 3, 6, 1, 5], [5]), "cifar100": ([13], [4])}


# --------------------------------------------------------------------------- fixtures

def _write_pickle(path, content):
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def _write_cifar(directory, name, rng):
    """Write a small ``name`` dataset in the official layout under directory/<folder>.

    Returns {"train": (rows, labels), "test": (rows, labels)}: the uint8 (N, 3072)
    rows and the labels as written, concatenated in file order.
    """
    source = data.SOURCES[name]
    folder = directory / source.folder
    folder.mkdir(parents=True)
    written = {}
    for split, files, sizes in (("train", source.train_files, FIXTURE_SIZES[name][0]),
                                ("test", source.test_files, FIXTURE_SIZES[name][1])):
        rows, labels = [], []
        for file, size in zip(files, sizes, strict=True):
            file_rows = rng.integers(0, 256, size=(size, 3072), dtype=np.uint8)
            file_labels = rng.integers(0, source.num_classes, size=size).tolist()
            _write_pickle(folder / file, {b"batch_label": b"fixture", source.labels_key: file_labels,
                                          b"data": file_rows, b"filenames": [b"x.png"] * size})
            rows.append(file_rows)
            labels += file_labels
        written[split] = (np.concatenate(rows), np.array(labels))
    names = [f"class {i}".encode() for i in range(source.num_classes)]
    _write_pickle(folder / source.meta_file, {source.names_key: names, b"num_vis": 3072})
    return written


def _archive(tmp_path, name, rng):
    """A tar.gz of a fixture laid out as the official archive; returns (path, written, md5)."""
    origin = tmp_path / "origin"
    written = _write_cifar(origin, name, rng)
    path = tmp_path / "served" / data.SOURCES[name].archive
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(origin / data.SOURCES[name].folder, arcname=data.SOURCES[name].folder)
    return path, written, hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler):
    """An HTTP server on 127.0.0.1 with ``handler`` in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL."""
    (tmp_path / "served").mkdir(exist_ok=True)
    with _serving(functools.partial(_QuietHandler, directory=str(tmp_path / "served"))) as url:
        yield url


class _CutShortHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1,000,000 bytes, sends 1,000, closes: a transfer cut short."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.write(b"x" * 1000)
        self.close_connection = True

    def log_message(self, *args):
        pass


def _closed_port_url():
    """A URL on 127.0.0.1 where nothing listens: the connection is refused, as without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def _serve_from(monkeypatch, name, url, md5):
    monkeypatch.setitem(data.SOURCES, name, dataclasses.replace(data.SOURCES[name], url=url, md5=md5))


def _files_under(directory):
    """Every path under ``directory``, relative to it ([] when it does not exist)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def _check_loaded(loaded, written, name):
    """A load against its fixture: shapes, dtypes, N, labels, plane -> NHWC layout, statistics."""
    source = data.SOURCES[name]
    assert loaded.name == name and loaded.num_classes == source.num_classes
    assert loaded.class_names == [f"class {i}" for i in range(source.num_classes)]
    for split in ("train", "test"):
        rows, labels = written[split]
        images, got_labels = getattr(loaded, f"{split}_images"), getattr(loaded, f"{split}_labels")
        assert images.shape == (len(rows), 32, 32, 3) and images.dtype == np.uint8
        assert images.flags.c_contiguous
        assert got_labels.dtype == np.int64
        assert got_labels.min() >= 0 and got_labels.max() < source.num_classes
        np.testing.assert_array_equal(got_labels, labels)
        # pixel (y, x) of channel c is byte c*1024 + y*32 + x of its row
        n, y, x, c = np.meshgrid(*(np.arange(k) for k in (len(rows), 32, 32, 3)), indexing="ij")
        np.testing.assert_array_equal(images, rows[n, c * 1024 + y * 32 + x])
    scaled = loaded.train_images / 255.0
    assert loaded.mean.dtype == np.float32 and loaded.std.dtype == np.float32
    # float64 statistics rounded once to float32: within one float32 rounding (2**-24 relative)
    np.testing.assert_allclose(loaded.mean, scaled.mean(axis=(0, 1, 2)), rtol=2 ** -24)
    np.testing.assert_allclose(loaded.std, scaled.std(axis=(0, 1, 2)), rtol=2 ** -24)


# --------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name", data.DATASETS)
def test_load_fixture(tmp_path, rng, name):
    written = _write_cifar(tmp_path, name, rng)
    _check_loaded(data.load_cifar(name, tmp_path, download=False), written, name)
    # the extracted folder itself may be given as data_dir
    _check_loaded(data.load_cifar(name, tmp_path / data.SOURCES[name].folder, download=False), written, name)


@pytest.mark.skipif(not SUBSET.is_dir(), reason=f"the real CIFAR-10 subset is not at {SUBSET}")
def test_real_cifar10_subset():
    loaded = data.load_cifar("cifar10", SUBSET, download=False)
    assert loaded.train_images.shape == (5085, 32, 32, 3) and loaded.test_images.shape == (1017, 32, 32, 3)
    assert loaded.train_labels.shape == (5085,) and loaded.test_labels.shape == (1017,)
    for labels in (loaded.train_labels, loaded.test_labels):
        assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    assert loaded.class_names[:3] == ["airplane", "automobile", "bird"] and len(loaded.class_names) == 10
    # The full training set's statistics are (0.4914, 0.4822, 0.4465) and (0.2470, 0.2435, 0.2616);
    # 5,085 images estimate them to about 0.003 (image means spread about 0.12 / sqrt(5085)).
    np.testing.assert_allclose(loaded.mean, [0.4914, 0.4822, 0.4465], atol=0.015)
    np.testing.assert_allclose(loaded.std, [0.2470, 0.2435, 0.2616], atol=0.015)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar1'.*cifar10, cifar100"):
        data.load_cifar("cifar1", tmp_path)


def test_missing_files_without_download(tmp_path):
    data_dir = tmp_path / "nothing here"
    with pytest.raises(RuntimeError, match="download=False") as info:
        data.load_cifar("cifar100", data_dir, download=False)
    message = str(info.value)
    for part in (str(data_dir / "cifar-100-python"), "train, test, meta", data.SOURCES["cifar100"].url,
                 str(data_dir / "cifar-100-python.tar.gz")):
        assert part in message
    assert not data_dir.exists()


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(os.urandom(2000))


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but nothing a CIFAR file may make the loader call


# (file, how it is damaged, what the error says besides the path)
CORRUPTIONS = [
    ("data_batch_2", _truncated, "corrupt or truncated"),
    ("test_batch", _garbage, "corrupt or truncated"),
    ("data_batch_1", lambda p: _write_pickle(p, {b"data": _RunsCode()}), "getcwd"),
    ("data_batch_3", lambda p: _write_pickle(p, [1, 2]), "expected a dict"),
    ("data_batch_4", lambda p: _write_pickle(p, {b"data": np.zeros((2, 3072), np.uint8)}), "missing"),
    ("data_batch_5", lambda p: _write_pickle(p, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
     "uint8 \\(N, 3072\\)"),
    ("data_batch_5", lambda p: _write_pickle(p, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
     "must hold 2 integers"),
    ("test_batch", lambda p: _write_pickle(p, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
     "must lie in \\[0, 10\\)"),
    ("batches.meta", lambda p: _write_pickle(p, {b"label_names": [b"cat", b"dog"]}),
     "must list 10 class names"),
]


@pytest.mark.parametrize("file, damage, says", CORRUPTIONS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPTIONS)])
def test_corrupt_file_is_named(tmp_path, rng, file, damage, says):
    _write_cifar(tmp_path, "cifar10", rng)
    path = tmp_path / "cifar-10-batches-py" / file
    damage(path)
    with pytest.raises(ValueError, match=says) as info:
        data.load_cifar("cifar10", tmp_path, download=False)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- download

def test_download_checks_md5_and_extracts(tmp_path, rng, http_server, monkeypatch):
    archive, written, md5 = _archive(tmp_path, "cifar10", rng)
    _serve_from(monkeypatch, "cifar10", f"{http_server}/{archive.name}", md5)
    data_dir = tmp_path / "data"
    _check_loaded(data.load_cifar("cifar10", data_dir), written, "cifar10")
    source = data.SOURCES["cifar10"]
    assert _files_under(data_dir) == sorted([archive.name, source.folder]
                                            + [f"{source.folder}/{f}" for f in source.files])
    assert (data_dir / archive.name).read_bytes() == archive.read_bytes()


def test_download_with_wrong_md5_leaves_nothing(tmp_path, rng, http_server, monkeypatch):
    archive, _, md5 = _archive(tmp_path, "cifar100", rng)
    expected = hashlib.md5(b"the official archive").hexdigest()
    _serve_from(monkeypatch, "cifar100", f"{http_server}/{archive.name}", expected)
    data_dir = tmp_path / "data"
    with pytest.raises(RuntimeError, match=f"its MD5 is {md5}, expected {expected}") as info:
        data.load_cifar("cifar100", data_dir)
    assert f"{http_server}/{archive.name}" in str(info.value) and str(data_dir) in str(info.value)
    assert _files_under(data_dir) == []


def test_unreachable_address_says_where_to_put_files(tmp_path, monkeypatch):
    url = _closed_port_url()
    _serve_from(monkeypatch, "cifar10", url, data.SOURCES["cifar10"].md5)
    data_dir = tmp_path / "data"
    with pytest.raises(RuntimeError, match="could not download CIFAR-10") as info:
        data.load_cifar("cifar10", data_dir)
    message = str(info.value)
    for part in (url, str(data_dir / "cifar-10-batches-py"), "data_batch_1, data_batch_2",
                 str(data_dir / "cifar-10-python.tar.gz"), data.SOURCES["cifar10"].md5):
        assert part in message
    assert _files_under(data_dir) == []


def test_download_cut_short(tmp_path, monkeypatch):
    with _serving(_CutShortHandler) as url:
        _serve_from(monkeypatch, "cifar10", f"{url}/cifar-10-python.tar.gz", data.SOURCES["cifar10"].md5)
        with pytest.raises(RuntimeError, match="downloaded \\(and deleted\\) but its MD5 is .* a truncated"):
            data.load_cifar("cifar10", tmp_path / "data")
    assert _files_under(tmp_path / "data") == []


def test_archive_in_data_dir_is_used_without_network(tmp_path, rng, monkeypatch):
    archive, written, md5 = _archive(tmp_path, "cifar10", rng)
    _serve_from(monkeypatch, "cifar10", _closed_port_url(), md5)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / archive.name).write_bytes(archive.read_bytes())
    _check_loaded(data.load_cifar("cifar10", data_dir, download=False), written, "cifar10")


def test_truncated_archive_in_data_dir(tmp_path, rng, monkeypatch):
    archive, _, md5 = _archive(tmp_path, "cifar10", rng)
    _serve_from(monkeypatch, "cifar10", _closed_port_url(), md5)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / archive.name).write_bytes(archive.read_bytes()[:-100])
    says = f"{re.escape(str(data_dir / archive.name))} is there but its MD5 is .*expected {md5}"
    with pytest.raises(RuntimeError, match=says):
        data.load_cifar("cifar10", data_dir)
    assert _files_under(data_dir) == [archive.name]


def test_archive_members_cannot_escape_or_link(tmp_path, rng, monkeypatch):
    # The archive's member names never choose where files go: a member naming a path
    # outside is ignored, and a needed file given as a symbolic link is refused.
    origin = tmp_path / "origin"
    _write_cifar(origin, "cifar10", rng)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for file in data.SOURCES["cifar10"].files[:-1]:
            tar.add(origin / "cifar-10-batches-py" / file, arcname=f"cifar-10-batches-py/{file}")
        tar.add(origin / "cifar-10-batches-py" / "test_batch", arcname="cifar-10-batches-py/../../escaped")
        link = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    _serve_from(monkeypatch, "cifar10", _closed_port_url(), hashlib.md5(archive.read_bytes()).hexdigest())
    data_dir = tmp_path / "a" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / archive.name).write_bytes(archive.read_bytes())
    with pytest.raises(RuntimeError, match="holds no regular file cifar-10-batches-py/batches.meta"):
        data.load_cifar("cifar10", data_dir)
    assert not list(tmp_path.rglob("escaped"))
    assert not (data_dir / "cifar-10-batches-py" / "batches.meta").exists()


# --------------------------------------------------------------------------- noisy labels

def test_corrupt_labels_changes_exactly_the_fraction(rng):
    labels = rng.integers(0, 10, size=1000)
    seed = int(rng.integers(2 ** 31))
    noisy = data.corrupt_labels(labels, 0.37, 10, seed)
    assert noisy.dtype == np.int64 and noisy.shape == labels.shape
    assert (noisy != labels).sum() == 370 and noisy.min() >= 0 and noisy.max() < 10
    np.testing.assert_array_equal(noisy, data.corrupt_labels(labels, 0.37, 10, seed))
    other = data.corrupt_labels(labels, 0.37, 10, seed + 1)
    assert not np.array_equal(noisy != labels, other != labels)
    assert np.array_equal(labels, labels.copy())  # the input is untouched (a copy came back)
    assert noisy is not labels


def test_corrupt_labels_extremes_and_rounding(rng):
    labels = rng.integers(0, 3, size=3000)
    np.testing.assert_array_equal(data.corrupt_labels(labels, 0.0, 3, 7), labels)
    everything = data.corrupt_labels(labels, 1.0, 3, 7)
    assert (everything != labels).all()
    # Uniform over the two other classes: each gets 1,500 of 3,000 on average, binomial
    # standard deviation 27; 200 is over 7 of them.
    moved_up = ((everything - labels) % 3 == 1).sum()
    assert abs(moved_up - 1500) < 200
    assert (data.corrupt_labels(np.arange(5) % 2, 0.5, 2, 7) != np.arange(5) % 2).sum() == 2  # round(2.5) = 2


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), "0.3", True])
def test_corrupt_labels_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction must be a (finite )?number( in \\[0, 1\\])?, got"):
        data.corrupt_labels(np.zeros(4, np.int64), fraction, 10, 0)


def test_corrupt_labels_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\)"):
        data.corrupt_labels(np.array([0, 10]), 0.5, 10, 0)


# --------------------------------------------------------------------------- augmentation

@pytest.fixture(params=["numpy", "interpret", pytest.param("cuda", marks=pytest.mark.gpu)])
def any_backend(request):
    with backend.use_backend(request.param):
        yield request.param


def _augment(images, offsets, flips, mean, std, pad=data.PAD):
    """data.augment on the current backend from host arrays; the result on the host."""
    return backend.to_numpy(data.augment(backend.asarray(images), offsets, flips, mean, std, pad))


def _random_case(rng, shape, pad):
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    offsets = rng.integers(0, 2 * pad + 1, size=(shape[0], 2)).astype(np.int32)
    flips = rng.integers(0, 2, size=shape[0]).astype(bool)
    mean = rng.uniform(0.3, 0.6, shape[-1]).astype(np.float32)
    std = rng.uniform(0.2, 0.3, shape[-1]).astype(np.float32)
    return images, offsets, flips, mean, std


@pytest.mark.parametrize("shape, pad", [((5, 32, 32, 3), 4), ((3, 7, 5, 2), 2), ((1, 32, 32, 3), 0)])
def test_kernel_matches_numpy_exactly(triton_backend, rng, shape, pad):
    case = _random_case(rng, shape, pad)
    got = _augment(*case, pad=pad)
    with backend.use_backend("numpy"):
        want = _augment(*case, pad=pad)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, want)


def test_kernel_divides_with_round_to_nearest():
    # Exact agreement on a GPU rests on both divisions compiling to IEEE round-to-nearest
    # (div.rn.f32, not the div.full.f32 of Triton's "/", off by up to 2 ulp) and on no
    # float multiply-add being fused; the PTX shows it without a GPU.
    kernel_fn = augment_kernels.augment_kernel
    ptx = aot.compile_kernel(kernel_fn, kernel_fn.aot_specs[0], 90).asm["ptx"]
    assert set(re.findall(r"\bdiv\.[a-z0-9.]+", ptx)) == {"div.rn.f32"}
    assert not re.findall(r"\b(?:fma|mul)\.[a-z.]*f32", ptx)


def test_numpy_matches_the_formula(rng):
    # The NumPy version against the contract's formula, written out one element at a time.
    images, offsets, flips, mean, std = _random_case(rng, (2, 32, 32, 3), 4)
    got = _augment(images, offsets, flips, mean, std)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for b, i, j, c in zip(*(rng.integers(0, n, 200) for n in (2, 32, 32, 3))):
        source_j = 31 - j if flips[b] else j
        value = np.float32(padded[b, i + offsets[b, 0], source_j + offsets[b, 1], c])
        assert got[b, i, j, c] == (value / np.float32(255) - mean[c]) / std[c]


def test_crops_stay_inside_the_padded_image(any_backend):
    # Every (oy, ox) and flip, on images whose pixels say where they are: channel 0 holds
    # the row + 1, channel 1 the column + 1, channel 2 the image + 1 (0 = padding).
    pad, size = data.PAD, 32
    offsets = np.array([(oy, ox) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)] * 2, np.int32)
    flips = np.repeat([0, 1], len(offsets) // 2).astype(np.int8)
    batch = len(offsets)
    images = np.empty((batch, size, size, 3), np.uint8)
    images[..., 0] = np.arange(1, size + 1)[None, :, None]
    images[..., 1] = np.arange(1, size + 1)[None, None, :]
    images[..., 2] = np.arange(1, batch + 1)[:, None, None]
    out = _augment(images, offsets, flips, np.zeros(3, np.float32), np.ones(3, np.float32))
    where = np.rint(out * 255).astype(int)  # exact: k/255 in float32 times 255 rounds back to k
    rows = np.arange(size)[None, :] + offsets[:, :1] - pad  # (B, 32): source row of each output row
    columns = np.where(flips[:, None] == 1, np.arange(size)[::-1], np.arange(size)) + offsets[:, 1:] - pad
    inside = (((rows >= 0) & (rows < size))[:, :, None] & ((columns >= 0) & (columns < size))[:, None, :])
    np.testing.assert_array_equal(where[..., 0], np.where(inside, rows[:, :, None] + 1, 0))
    np.testing.assert_array_equal(where[..., 1], np.where(inside, columns[:, None, :] + 1, 0))
    np.testing.assert_array_equal(where[..., 2], np.where(inside, np.arange(1, batch + 1)[:, None, None], 0))
    # each crop keeps at least (32 - pad) x (32 - pad) pixels of its image, and all of it when centred
    assert (inside.sum(axis=(1, 2)) >= (size - pad) ** 2).all()
    assert inside[(offsets == pad).all(axis=1)].all()


def test_flips_flip(any_backend, rng):
    images, offsets, _, mean, std = _random_case(rng, (4, 32, 32, 3), data.PAD)
    plain = _augment(images, offsets, np.zeros(4, bool), mean, std)
    flipped = _augment(images, offsets, np.ones(4, bool), mean, std)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
    centred = np.full((4, 2), data.PAD, np.int32)
    normalised = (images.astype(np.float32) / np.float32(255) - mean) / std
    np.testing.assert_array_equal(_augment(images, centred, np.zeros(4, bool), mean, std), normalised)
    np.testing.assert_array_equal(_augment(images, centred, np.ones(4, bool), mean, std),
                                  normalised[:, :, ::-1])


def _bad(images=None, offsets=None, flips=None, mean=None, std=None, pad=4):
    return dict(images=np.zeros((2, 32, 32, 3), np.uint8) if images is None else images,
                crop_offsets=np.zeros((2, 2), np.int32) if offsets is None else offsets,
                flips=np.zeros(2, bool) if flips is None else flips,
                mean=np.zeros(3, np.float32) if mean is None else mean,
                std=np.ones(3, np.float32) if std is None else std, pad=pad)


BAD_AUGMENT_ARGS = [
    (_bad(images=np.zeros((2, 32, 32, 3), np.float32)), TypeError, "images must be uint8, got float32"),
    (_bad(images=np.zeros((2, 32, 32, 6), np.uint8)[..., :3]), ValueError, "not contiguous"),
    (_bad(images=np.zeros((2, 32, 32), np.uint8)), ValueError, "C-contiguous \\(B, H, W, C\\)"),
    (_bad(images=[[0]]), TypeError, "must be a NumPy array on the numpy backend, got a builtins.list"),
    (_bad(offsets=np.zeros((3, 2), np.int32)), ValueError, "crop_offsets must have shape \\(2, 2\\)"),
    (_bad(offsets=np.full((2, 2), 9, np.int32)), ValueError, "crop_offsets must lie in \\[0, 8\\]"),
    (_bad(offsets=np.zeros((2, 2), np.float32)), ValueError, "crop_offsets must have shape"),
    (_bad(flips=np.zeros(3, bool)), ValueError, "flips must have shape \\(2,\\)"),
    (_bad(mean=np.zeros(4, np.float32)), ValueError, "mean must have shape \\(3,\\)"),
    (_bad(std=np.zeros(3, np.float32)), ValueError, "std must be positive"),
    (_bad(pad=-1), ValueError, "pad must be an integer >= 0"),
]


@pytest.mark.parametrize("kwargs, error, says", BAD_AUGMENT_ARGS)
def test_augment_rejects_bad_input(kwargs, error, says):
    with pytest.raises(error, match=says):
        data.augment(**kwargs)


# --------------------------------------------------------------------------- batches

def _indexed_images(rng, n):
    """Random images with their index as the label, so a batch says which images it holds."""
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), np.arange(n)


def _loader(images, labels, **kwargs):
    defaults = dict(batch_size=4, mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32),
                    train=True, seed=3)
    return data.BatchLoader(images, labels, **{**defaults, **kwargs})


def _epoch(loader, epoch_index, start_batch=0):
    return [(backend.to_numpy(x), backend.to_numpy(y)) for x, y in loader.epoch(epoch_index, start_batch)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_training_batches(rng):
    images, labels = _indexed_images(rng, 23)
    loader = _loader(images, labels)
    assert len(loader) == 5  # 23 // 4, the partial batch dropped
    batches = _epoch(loader, 1)
    assert len(batches) == 5
    seen = np.concatenate([y for _, y in batches])
    assert len(np.unique(seen)) == 20 and not np.array_equal(seen, np.arange(20))  # a permutation's prefix
    # every x is its image (y) cropped and flipped somehow: find it among all 162 ways
    ways = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (0, 1)]
    offsets = np.array([w[:2] for w in ways], np.int32)
    flips = np.array([w[2] for w in ways], np.int8)
    draws = set()
    for x, y in batches:
        assert x.dtype == np.float32 and x.shape == (4, 32, 32, 3) and y.dtype == np.int64
        for image, index in zip(x, y):
            candidates = _augment(np.repeat(images[index][None], len(ways), 0), offsets, flips,
                                  loader.mean, loader.std)
            matches = np.flatnonzero((candidates == image).all(axis=(1, 2, 3)))
            assert len(matches) >= 1
            draws.add(matches[0])
    assert len(draws) > 5  # the draws vary (20 images on 162 ways)


def test_same_seed_same_batches_and_resume(rng):
    images, labels = _indexed_images(rng, 23)
    batches = _epoch(_loader(images, labels), 1)
    _assert_same_batches(_epoch(_loader(images, labels), 1), batches)
    _assert_same_batches(_epoch(_loader(images, labels), 1, start_batch=3), batches[3:])
    assert _epoch(_loader(images, labels), 1, start_batch=5) == []
    for other in (_epoch(_loader(images, labels), 2), _epoch(_loader(images, labels, seed=4), 1)):
        assert not all(np.array_equal(xa, xb) for (xa, _), (xb, _) in zip(other, batches))


def test_evaluation_batches(rng):
    images, labels = _indexed_images(rng, 10)
    loader = _loader(images, labels, train=False)
    assert len(loader) == 3  # the last partial batch kept
    batches = _epoch(loader, 0)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)
    normalised = (images.astype(np.float32) / np.float32(255) - loader.mean) / loader.std
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), normalised)
    assert len(_loader(images, labels, train=False, drop_last=True)) == 2
    assert len(_loader(images, labels, train=True, drop_last=False)) == 3


def test_batches_equal_on_every_backend(triton_backend, rng):
    # The caller launches kernels of its own between batches, as training does, while the
    # prefetch thread augments the next ones.
    images, labels = _indexed_images(rng, 7)
    for train in (True, False):
        loader = _loader(images, labels, batch_size=3, train=train)
        got = []
        for x, y in loader.epoch(0):
            got.append((backend.to_numpy(x), backend.to_numpy(y)))
            np.testing.assert_array_equal(backend.to_numpy(F.relu(Tensor(x)).data), np.maximum(got[-1][0], 0))
        with backend.use_backend("numpy"):
            _assert_same_batches(got, _epoch(loader, 0))


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "EpochLoader-prefetch"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("leave", ["break", "exception", "keyboard interrupt"])
def test_prefetch_thread_stops_when_iteration_is_abandoned(rng, leave):
    images, labels = _indexed_images(rng, 40)
    loader = _loader(images, labels, prefetch=2)
    raised = {"break": None, "exception": _Stop, "keyboard interrupt": KeyboardInterrupt}[leave]
    try:
        for _ in loader.epoch(0):
            assert _prefetch_threads()
            if raised is None:
                break
            raise raised
    except (_Stop, KeyboardInterrupt):
        pass
    assert not _prefetch_threads()


def test_error_while_preparing_reaches_the_caller(rng, monkeypatch):
    images, labels = _indexed_images(rng, 12)

    def broken_augment(*args, **kwargs):
        raise _Stop("the augmentation failed")

    monkeypatch.setattr(data, "augment", broken_augment)
    with pytest.raises(_Stop, match="the augmentation failed"):
        _epoch(_loader(images, labels), 0)
    assert not _prefetch_threads()


@pytest.mark.parametrize("kwargs, says", [
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(batch_size=11), "10 images make no batch of 11 with drop_last"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(prefetch=0), "prefetch must be an integer >= 1"),
    (dict(std=np.zeros(3, np.float32)), "std positive"),
    (dict(mean=np.float32([125.3, 123.0, 113.9]), std=np.float32([63.0, 62.1, 66.7])),
     "in \\[0, 1\\] units \\(pixel / 255\\).*got mean \\[125.3 +123. +113.9\\]"),
    (dict(train="no"), "train must be True or False, got 'no'"),
    (dict(drop_last=1), "drop_last must be True or False, got 1"),
    (dict(labels=np.arange(9)), "labels must be integers of shape \\(10,\\)"),
])
def test_loader_rejects_bad_arguments(rng, kwargs, says):
    images, labels = _indexed_images(rng, 10)
    with pytest.raises(ValueError, match=says):
        _loader(images, kwargs.pop("labels", labels), **kwargs)


def test_loader_checksum_sees_one_pixel_or_one_label(rng):
    images, labels = _indexed_images(rng, 10)
    checksum = _loader(images, labels).checksum()
    assert _loader(images.copy(), labels.copy(), train=False, shard=(1, 2)).checksum() == checksum  # all ranks'
    pixel = images.copy()
    pixel[tuple(rng.integers(0, n) for n in images.shape)] ^= 1
    label = labels.copy()
    label[int(rng.integers(10))] += 1
    assert _loader(pixel, labels).checksum() != checksum and _loader(images, label).checksum() != checksum

def test_epoch_rejects_bad_arguments(rng):
    loader = _loader(*_indexed_images(rng, 10))
    with pytest.raises(ValueError, match="start_batch 3 is past the 2 batches"):
        loader.epoch(0, start_batch=3)
    with pytest.raises(ValueError, match="epoch_index must be an integer >= 0"):
        loader.epoch(-1)


@pytest.mark.parametrize("ranks", [2, 3])
def test_sharded_batches_are_the_one_process_batch_in_slices(rng, ranks):
    """Data parallelism: in training, rank r's batch k is the r-th slice of what one process with
    the global batch draws (images, crops, flips); in evaluation the ranks split the images, each
    taking every ranks-th from its rank on, together all of them once."""
    images, labels = _indexed_images(rng, 29)
    whole = _epoch(_loader(images, labels, batch_size=4 * ranks), 2, start_batch=1)
    parts = [_epoch(_loader(images, labels, shard=(r, ranks)), 2, start_batch=1) for r in range(ranks)]
    assert all(len(part) == len(whole) == 29 // (4 * ranks) - 1 for part in parts)
    for k, (x, y) in enumerate(whole):
        _assert_same_batches([(x, y)], [(np.concatenate([part[k][0] for part in parts]),
                                         np.concatenate([part[k][1] for part in parts]))])
    seen = [np.concatenate([y for _, y in _epoch(_loader(images, labels, train=False, shard=(r, ranks)), 0)])
            for r in range(ranks)]
    assert [s.tolist() for s in seen] == [list(range(r, 29, ranks)) for r in range(ranks)]
    with pytest.raises(ValueError, match="shard must be"):
        _loader(images, labels, shard=(ranks, ranks))
    with pytest.raises(ValueError, match="drops the last partial batch"):
        _loader(images, labels, shard=(0, ranks), drop_last=False)
