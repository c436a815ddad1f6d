"""The checkpoint of a training run: one .npz read without pickle, written atomically.

``model/<name>`` (parameters and buffers), ``optimizer/<key>`` (SGD.state_dict()),
``train_totals`` ((3,) float32: the training metrics of the epoch in progress, see
ra_kernels.metrics) and ``meta``, a 0-d string holding JSON (train/cifar.py says what
its records are), with the format name and version added here.
"""
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ra_kernels import backend
from ra_kernels.models import ResidualAttentionNet

from .common import UsageError

CHECKPOINT_FORMAT = "ra_kernels.train.cifar checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    """A checkpoint as read back: ``meta`` (the JSON record), host NumPy arrays for the rest."""
    meta: dict
    model_state: dict
    optimizer_state: dict
    train_totals: np.ndarray


def write_checkpoint(path, model, optimizer, train_totals, meta):
    """Write a checkpoint atomically: a temporary file beside ``path``, flushed to disk, then renamed."""
    path = Path(path)
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    arrays.update({f"optimizer/{name}": value for name, value in optimizer.state_dict().items()})
    arrays["train_totals"] = backend.to_numpy(train_totals).copy()
    arrays["meta"] = np.array(json.dumps(dict(meta, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`write_checkpoint`; UsageError when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}  # reads (and CRC-checks) every member now
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UsageError(f"cannot read checkpoint {path}: not a readable .npz file, truncated or corrupt "
                         f"({type(error).__name__}: {error})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
    except (KeyError, ValueError, AttributeError) as error:
        raise UsageError(f"{path} is not a checkpoint of train.cifar (no valid meta record: {error})") from None
    if meta["version"] != CHECKPOINT_VERSION:
        raise UsageError(f"{path} is a version {meta['version']} checkpoint; this program reads version "
                         f"{CHECKPOINT_VERSION}")

    def part(prefix):
        return {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
    return Checkpoint(meta, part("model/"), part("optimizer/"), arrays.get("train_totals"))


def model_from_checkpoint(checkpoint: Checkpoint, path) -> ResidualAttentionNet:
    """The network of a checkpoint, built on the current backend, with its weights loaded."""
    model = ResidualAttentionNet(**checkpoint.meta["model_config"])
    try:
        model.load_state_dict(checkpoint.model_state)
    except (KeyError, ValueError) as error:
        raise UsageError(f"{path}: the weights do not fit the network it describes ({error})") from None
    return model
