"""Data parallelism over processes: MPI starts them and talks on CPUs, NCCL sums on GPUs.

    mpirun -n 4 python -m train.cifar ...      # 4 processes, one GPU each (or 4 CPU processes)

:func:`world` is the group this process belongs to: a :class:`World` of size 1 unless the process
was started by an MPI launcher (``mpirun``/``mpiexec`` set PMI_SIZE, OMPI_COMM_WORLD_SIZE or
PMIX_RANK) and mpi4py imports. Each rank trains on its own shard of every batch
(``data.EpochLoader(shard=...)``) with the same initial weights (drawn from the same seed), and
after each backward pass :class:`DataParallel` averages over the ranks, in place:

* the optimizer's flat gradient buffer (one all-reduce), so every rank takes the same SGD step
  and the parameters stay identical, bit for bit;
* the batch-norm running statistics, held as views of one flat buffer (a second, small
  all-reduce). Batch norm normalises each rank's half with that half's own statistics, as the
  paper's multi-GPU Caffe did; the running estimates become the mean of the ranks' updates, which
  is the running average of the ranks' batch statistics. Every rank then holds the same model,
  so rank 0's checkpoint is the whole state, and a resumed run is exact.

The sum is MPI's ``Allreduce`` on host arrays (numpy and interpret backends) and NCCL's
``allReduce`` on CuPy arrays (cuda), launched on the current stream, so that it is recorded in a
captured step like any kernel; the NCCL communicator's id travels from rank 0 over MPI. The mean
is the sum divided by the size, on every rank alike. A rank's GPU is its rank among the
processes of its machine (MPI's shared-memory split).

A failed rank must not leave the others waiting forever: a launcher usually kills the rest when
one process dies; :class:`Watchdog` covers the rest (a rank that hangs, a launcher that waits).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numpy as np

from . import backend

#: Environment variables by which MPI launchers (MPICH's Hydra, Open MPI, PMIx) announce a job.
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
#: Those of them that give the job's size.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


class World:
    """The processes of a data-parallel job. ``rank``, ``size``, ``local_rank`` (among the ranks on
    this machine); ``comm`` is MPI's COMM_WORLD (None for a single process started without MPI)."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = 0 if comm is None else comm.Get_rank()
        self.size = 1 if comm is None else comm.Get_size()
        self.local_rank, self._local = 0, None
        if comm is not None:
            from mpi4py import MPI
            self._local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
            self.local_rank = self._local.Get_rank()
        self._nccl = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def select_device(self):
        """On cuda, make GPU ``local_rank`` this process's device (before anything is allocated), or
        the only GPU it sees when a launcher gives each process its own (CUDA_VISIBLE_DEVICES).
        RuntimeError when two processes of this machine would share a GPU, or NCCL is missing."""
        if backend.get_backend() != "cuda":
            return
        cupy = backend.xp()
        count = cupy.cuda.runtime.getDeviceCount()
        index = 0 if count == 1 else self.local_rank  # one GPU seen: the launcher gave each process its own
        bus = cupy.cuda.Device(index).pci_bus_id if index < count else None
        if self.distributed:
            buses = self._local.allgather(bus)  # every rank of the machine takes part, so that all raise alike
            if None in buses or len(set(buses)) < len(buses):
                raise RuntimeError(f"{len(buses)} processes on this machine and {count} GPU(s) for them: start at "
                                   f"most one process per GPU")
            if not getattr(_nccl(), "available", False):
                raise RuntimeError("data-parallel training on GPUs sums with NCCL, which CuPy cannot load: "
                                   "pip install nvidia-nccl-cu12 (or -cu13, as your CuPy)")
        cupy.cuda.Device(index).use()

    def allreduce_mean(self, array):
        """Replace ``array`` (contiguous float32 of the backend) by its mean over the ranks, in place."""
        if not self.distributed:
            return array
        if backend.is_cupy_array(array):
            self._nccl_communicator().allReduce(array.data.ptr, array.data.ptr, array.size, _nccl().NCCL_FLOAT32,
                                                _nccl().NCCL_SUM, backend.xp().cuda.get_current_stream().ptr)
        else:
            from mpi4py import MPI
            self.comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        array /= self.size
        return array

    def sum_host(self, values) -> np.ndarray:
        """The sum over the ranks of the host array ``values`` (every rank gets it)."""
        values = np.ascontiguousarray(values)
        if not self.distributed:
            return values
        from mpi4py import MPI
        total = np.empty_like(values)
        self.comm.Allreduce(values, total, op=MPI.SUM)
        return total

    @contextlib.contextmanager
    def local_first(self):
        """A block that the first rank of each machine runs before the machine's other ranks start
        it: a download or a cache written once per disk, then read by the rest. An error in the
        first rank leaves the others waiting: it must stop the job (World.abort)."""
        if self.distributed and self.local_rank != 0:
            self._local.Barrier()
        yield
        if self.distributed and self.local_rank == 0:
            self._local.Barrier()

    def disagreeing(self, value):
        """None when every rank passes the same ``value`` (what must not differ between the ranks:
        the options, the data, a checksum of the model), else (the first rank whose value differs
        from rank 0's, its value, rank 0's value). Every rank gets the same answer."""
        if not self.distributed:
            return None
        values = self.comm.allgather(value)
        return next(((rank, v, values[0]) for rank, v in enumerate(values) if v != values[0]), None)

    def gather_host(self, values) -> np.ndarray | None:
        """The host arrays ``values`` of every rank stacked in rank order, on rank 0 (None on the others)."""
        if not self.distributed:
            return np.asarray(values)[None]
        gathered = self.comm.gather(np.asarray(values), root=0)
        return None if gathered is None else np.stack(gathered)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (every rank gets the same answer)."""
        return bool(self.sum_host(np.array([int(flag)], np.int64))[0]) if self.distributed else bool(flag)

    #: Seconds an aborting rank waits for its launcher to forward what it printed: MPI_Abort tears
    #: the job down, and output still on its way was seen lost (MPICH's Hydra, 1 run in 12).
    ABORT_GRACE_S = 0.5

    def abort(self, code: int):
        """Stop every rank of the job now (MPI_Abort), or this process when alone."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.distributed:
            time.sleep(self.ABORT_GRACE_S)
            self.comm.Abort(code)
        os._exit(code)

    def _nccl_communicator(self):
        if self._nccl is None:
            nccl = _nccl()
            unique_id = nccl.get_unique_id() if self.rank == 0 else None
            unique_id = self.comm.bcast(unique_id, root=0) if self.comm is not None else unique_id
            self._nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        return self._nccl


def _nccl():
    from cupy.cuda import nccl
    return nccl


_WORLD = None


def world() -> World:
    """This process's World, made at the first call: MPI's COMM_WORLD when an MPI launcher started
    the process (and mpi4py imports), else a World of one."""
    global _WORLD
    if _WORLD is None:
        comm = None
        if any(name in os.environ for name in LAUNCHER_VARIABLES):
            try:
                from mpi4py import MPI
                comm = MPI.COMM_WORLD
            except ImportError:
                # A launcher of one process (a batch system may announce every job) needs no MPI.
                if max(int(os.environ.get(name, 1)) for name in SIZE_VARIABLES) > 1:
                    raise RuntimeError("started by an MPI launcher with several processes, but mpi4py is not "
                                       "installed: pip install -e '.[mpi]'") from None
        _WORLD = World(comm)
    return _WORLD


class DataParallel:
    """The exchange of one training step: ``exchange()`` averages ``optimizer``'s flat gradient
    buffer and ``model``'s batch-norm running statistics over ``world``'s ranks, in place.

    Building it moves the model's float32 buffers into one flat buffer (each buffer becomes a view
    of it, as SGD does with parameters), so the statistics travel in one all-reduce. Build it after
    converting dtypes and loading weights into place is fine (``load_state_dict`` copies in place).
    """

    def __init__(self, model, optimizer, world: World):
        self.world, self.optimizer = world, optimizer
        buffers = [(module, name, array) for _, module in model.named_modules()
                   for name, array in module._buffers.items()]
        dtypes = {str(array.dtype) for *_, array in buffers} - {"float32"}
        if dtypes:
            raise TypeError(f"DataParallel: the model's buffers must be float32, not {', '.join(sorted(dtypes))}")
        sizes = [array.size for *_, array in buffers]
        self.flat_statistics = backend.xp().empty(sum(sizes), dtype=np.float32)
        offset = 0
        for (module, name, array), size in zip(buffers, sizes):
            view = self.flat_statistics[offset:offset + size]
            view[...] = array.reshape(-1)
            module._buffers[name] = view.reshape(array.shape)
            offset += size

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank contributes to the step's all-reduces (float32)."""
        return 4 * (self.optimizer.flat_grads.size + self.flat_statistics.size)

    def exchange(self):
        self.world.allreduce_mean(self.optimizer.flat_grads)
        self.world.allreduce_mean(self.flat_statistics)


class Watchdog:
    """Stops the whole job when this rank makes no progress for ``timeout_s`` seconds.

    ``beat()`` after every step (training or evaluation); a daemon thread checks the time since the
    last beat every second and, past ``timeout_s``, says so on stderr and aborts every rank (an MPI
    collective waits forever for a rank that died or hangs; MPI calls release the GIL, so the
    thread runs). ``timeout_s`` must exceed the longest step, evaluation or checkpoint write: a
    rank waits in the next collective while rank 0 writes. Until the first beat the limit is
    FIRST_STEP_FACTOR times longer: the first step compiles every kernel, on every rank at once.
    ``longer_timeout_hint``: how the user asks for a longer timeout, for the message.
    """
    FIRST_STEP_FACTOR = 3

    def __init__(self, world: World, timeout_s: float, exit_code: int = 1,
                 longer_timeout_hint: str = "a longer timeout"):
        self.world, self.timeout_s, self.exit_code = world, timeout_s, exit_code
        self.longer_timeout_hint = longer_timeout_hint
        self._last, self._beaten, self._stop = time.monotonic(), False, threading.Event()
        self._thread = threading.Thread(target=self._watch, name="Watchdog", daemon=True)

    def __enter__(self):
        self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()

    def beat(self):
        self._last, self._beaten = time.monotonic(), True

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            limit = self.timeout_s * (1 if self._beaten else self.FIRST_STEP_FACTOR)
            if time.monotonic() - self._last > limit:
                # It cannot tell which: on cuda a collective is queued, not waited for, so a rank that
                # waits on its peers and one whose own step is slow look the same from here.
                print(f"rank {self.world.rank}: no step completed in {limit:g} s: another rank has failed "
                      f"or hangs (its own error, if any, is above), or a step, evaluation or checkpoint write "
                      f"takes longer than that (then give {self.longer_timeout_hint}); stopping every rank",
                      file=sys.stderr, flush=True)
                self.world.abort(self.exit_code)
