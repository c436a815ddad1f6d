"""The one file format of ra_kernels: weights (``Module.save``) and training checkpoints
(``train.cifar``) are both an .npz archive read without pickle and written atomically.

Members: ``model/<name>`` (every parameter and buffer by dotted name), for a training
checkpoint also ``optimizer/<key>`` and ``train_totals``, and ``meta``: a 0-d string of
JSON holding ``format``, ``version``, ``kind`` ("weights" or "training checkpoint") and
``model`` ({"class": ..., "config": ...}, what the network is, so that weights never load
into a network whose same-named parameters mean something else), plus whatever the
writer adds. Version 1 files (training checkpoints of train.cifar before weights shared
the format) are read too: :func:`read` gives their ``meta`` the version 2 fields.
"""
import contextlib
import json
import os
import zipfile

import numpy as np

FORMAT, VERSION = "ra_kernels", 2
KINDS = ("weights", "training checkpoint")
_VERSION1_FORMAT = "ra_kernels.train.cifar checkpoint"


class UnreadableFile(ValueError):
    """The file is missing, truncated, corrupt, or not a file of this format; the message names it."""


@contextlib.contextmanager
def atomic_open(path, mode="wb", **open_options):
    """A file to write (``open(path, mode, **open_options)``) that appears at ``path`` only when
    the block completes.

    It is written beside ``path`` as ``<name>.tmp``, flushed to the disk, then renamed over
    ``path``, and the directory is flushed too: a crash (kill -9, power loss) at any moment
    leaves either the old file or the new one, never a part.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # else open() names the temporary file, which the caller never named
        raise FileNotFoundError(f"cannot write {path}: {folder} is not a folder"
                                + ("" if os.path.exists(folder) else " (it does not exist)"))
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **open_options) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write(path, arrays, meta):
    """Write ``arrays`` (name -> NumPy array) and ``meta`` (a JSON-able dict with ``kind`` and
    ``model``) to ``path`` atomically."""
    if meta.get("kind") not in KINDS or "model" not in meta:
        raise ValueError(f"npzfile.write: meta needs a kind in {KINDS} and a model record, got {sorted(meta)}")
    members = dict(arrays, meta=np.array(json.dumps(dict(meta, format=FORMAT, version=VERSION))))
    with atomic_open(path) as f:
        np.savez(f, **members)


def copy(source, destination):
    """Copy the file ``source`` to ``destination`` atomically."""
    with open(source, "rb") as src, atomic_open(destination) as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)


def _checked_meta(path, text):
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise UnreadableFile(f"{path} is not a file of ra_kernels (its meta record is not valid JSON: "
                             f"{error})") from None
    if meta.get("format") == _VERSION1_FORMAT and meta.get("version") == 1 and \
            isinstance(meta.get("model_config"), dict):
        config = {k: v for k, v in meta["model_config"].items() if k != "seed"}
        meta = dict(meta, kind="training checkpoint", model={"class": "ResidualAttentionNet", "config": config})
    elif meta.get("format") != FORMAT:
        raise UnreadableFile(f"{path} is not a file of ra_kernels (format {meta.get('format')!r})")
    elif meta.get("version") != VERSION:
        raise UnreadableFile(f"{path} is a version {meta.get('version')} file; this ra_kernels reads "
                             f"versions 1 and {VERSION}")
    model = meta.get("model")
    well_formed = (meta.get("kind") in KINDS and isinstance(model, dict) and isinstance(model.get("class"), str)
                   and isinstance(model.get("config", False), (dict, type(None))))  # config: a dict or None
    if not well_formed:
        raise UnreadableFile(f"{path} has a damaged meta record (kind {meta.get('kind')!r}, model {model!r})")
    return meta


def read(path, meta_only=False):
    """(meta, arrays) of the file at ``path``; with ``meta_only``, arrays is empty (only the small
    meta member is read). UnreadableFile, naming the file, when it cannot be."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UnreadableFile(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    if not zipfile.is_zipfile(path):
        raise UnreadableFile(f"cannot read {path}: truncated or corrupt, or not an .npz file at all (it is no "
                             f"zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "meta" not in npz.files:
                raise UnreadableFile(
                    f"{path} is an .npz archive without the meta record of ra_kernels (Module.save files written "
                    f"before weights and checkpoints shared one format have none: load such a file with "
                    f"model.load_state_dict(dict(numpy.load(path))))")
            meta = _checked_meta(path, str(npz["meta"]))
            # Reading every member now also checks each one's CRC.
            arrays = {} if meta_only else {name: npz[name] for name in npz.files if name != "meta"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        if isinstance(error, UnreadableFile):
            raise
        raise UnreadableFile(f"cannot read {path}: truncated or corrupt ({type(error).__name__}: {error})") from None
    return meta, arrays


def members(arrays, prefix):
    """The arrays whose names start with ``prefix``, keyed by the rest of the name."""
    return {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
