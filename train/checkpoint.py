"""Training checkpoints in the file format of ra_kernels/npzfile.py, which weights share.

A checkpoint holds ``model/<name>``, ``optimizer/<key>`` (SGD.state_dict()),
``train_totals`` ((4,) float32: the training metrics of the epoch in progress, see
ra_kernels.metrics; (3,) before top-5 was counted) and a ``meta`` record of kind "training
checkpoint" (train/cifar.py says what train/run.py adds). The commands that only need a network (``--eval-only``,
``train.masks``) also take a weights file written by ``Module.save``.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ra_kernels import backend, npzfile
from ra_kernels.models import ResidualAttentionNet

from .common import DEFAULT_DATA_DIR, UsageError

TRAINING = "training checkpoint"


@dataclass
class Checkpoint:
    """A file as read back: ``meta`` (the JSON record), host NumPy arrays for the rest;
    a weights file has no optimizer state and no totals."""
    meta: dict
    model_state: dict
    optimizer_state: dict
    train_totals: np.ndarray

    @property
    def is_training(self):
        return self.meta["kind"] == TRAINING


def write_checkpoint(path, model, optimizer, train_totals, meta):
    """Write a training checkpoint atomically (npzfile.atomic_open)."""
    arrays = {f"model/{name}": value for name, value in model.state_dict().items()}
    arrays.update({f"optimizer/{name}": value for name, value in optimizer.state_dict().items()})
    arrays["train_totals"] = backend.to_numpy(train_totals).copy()
    npzfile.write(path, arrays, dict(meta, kind=TRAINING, model=model.architecture()))


def read_checkpoint(path, meta_only=False) -> Checkpoint:
    """Read a training checkpoint or a weights file; UsageError, naming the file, when it cannot be."""
    try:
        meta, arrays = npzfile.read(path, meta_only)
    except npzfile.UnreadableFile as error:
        raise UsageError(str(error)) from None
    return Checkpoint(meta, npzfile.members(arrays, "model/"), npzfile.members(arrays, "optimizer/"),
                      arrays.get("train_totals"))


def data_of(checkpoint: Checkpoint, dataset=None, data_dir=None):
    """(dataset name, data directory) to evaluate a checkpoint or weights file on: ``dataset`` and
    ``data_dir`` where given, else those of its training run. A weights file records neither: its
    dataset is then the CIFAR of its number of classes, its folder the default one. A recorded folder
    that is gone (moved, or the checkpoint copied to another machine) is a UsageError: the dataset
    is not downloaded into a folder made anew at the old path."""
    saved = checkpoint.meta.get("args", {})
    classes = checkpoint.meta["model"]["config"]["num_classes"]
    dataset = dataset or saved.get("dataset") or {10: "cifar10", 100: "cifar100"}.get(classes)
    if dataset is None:
        raise UsageError(f"a network of {classes} classes was not trained on CIFAR-10 or CIFAR-100: "
                         f"name the dataset (--dataset)")
    if data_dir is None and "data_dir" in saved:
        data_dir = saved["data_dir"]
        if not Path(data_dir).is_dir():
            raise UsageError(f"the run was trained on the data in {data_dir}, which is not there now: give "
                             f"--data-dir (where {dataset} is, or is to be downloaded to)")
    return dataset, data_dir or DEFAULT_DATA_DIR


def normalization(checkpoint: Checkpoint, data):
    """(mean, std), float32 (3,): the per-channel normalisation the network was trained with, as
    the checkpoint records it; for a file without the record (a weights file, a checkpoint from
    before it was kept) ``data``'s (a dataset or a loader: its ``mean`` and ``std``). The data's
    own would differ when --data-dir holds other training images than the run's."""
    saved = checkpoint.meta.get("normalization")
    if saved is None:
        return data.mean, data.std
    return np.asarray(saved["mean"], np.float32), np.asarray(saved["std"], np.float32)


def model_from_checkpoint(checkpoint: Checkpoint, path, network=ResidualAttentionNet):
    """The ``network`` (a class) a checkpoint or weights file describes, built on the current backend,
    with its weights; UsageError when the file holds another class."""
    architecture = checkpoint.meta["model"]
    if architecture["class"] != network.__name__ or architecture["config"] is None:
        raise UsageError(f"{path} holds the weights of a network of class {architecture['class']}, not "
                         f"{network.__name__}")
    model = network(**architecture["config"])
    try:
        model.load_state_dict(checkpoint.model_state)
    except (KeyError, ValueError, TypeError) as error:
        raise UsageError(f"{Path(path)}: the weights do not fit the network it describes ({error})") from None
    return model
