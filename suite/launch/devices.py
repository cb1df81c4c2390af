"""Which GPU a cell trains on when one machine runs several cells at once (``hydra/launcher=gpus``).

The launcher starts ``len(gpus) × train.cells_per_gpu`` worker processes (the other local
parallel launchers, joblib and submitit local, pin their workers the same way when the cells
train on CUDA; their extra workers wait for a free slot). Before its first cell a
worker takes a *device slot*, a lock file of a machine-wide slot folder held with ``flock`` for as
long as the cell trains; slot ``j`` belongs to GPU ``gpus[j % len(gpus)]`` (round robin, so a
sweep with fewer cells than slots spreads over every GPU). The first slot pins the worker:
``CUDA_VISIBLE_DEVICES`` is set to that one GPU before CUDA starts in the process, so the model,
the allocator and cuDNN see only it. Later cells of the same worker take a free slot of the same
GPU (waiting for one if needed). So no GPU ever holds more than ``cells_per_gpu`` cells of the
sweep at once; two sweeps of one user on the machine take the same lock files (named by the GPU
and a place on it), so together they hold at most the larger of their ``cells_per_gpu`` per GPU,
as long as they name the GPUs alike (indices vs UUIDs, ``CUDA_DEVICE_ORDER``) and share a temp
dir. Other users' sweeps and in-process (basic launcher) runs take no slots. A worker that dies
frees its slot with its file descriptor.

``SUITE_FAKE_GPUS`` (a comma list, e.g. ``0,1``) stands in for the detected GPUs so that the
assignment can be tested on a machine without any; cells then still train on the CPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

GPUS_ENV = "SUITE_GPUS"  # the sweep's GPU list, decided once in the main process
FAKE_GPUS_ENV = "SUITE_FAKE_GPUS"
SLOT_DIR_ENV = "SUITE_SLOT_DIR"


def parse_visible_devices(value: str | None, count: int) -> list[str]:
    """The GPUs a process may use, as CUDA names them to its children, given
    ``CUDA_VISIBLE_DEVICES`` and the ``count`` of GPUs CUDA sees: its entries up to the first one
    CUDA would not take (an index, ``GPU-<uuid>`` or ``MIG-<uuid>``; ``-1``, an empty or any other
    entry, e.g. SLURM's ``NoDevFiles``, hides everything after it, as in CUDA), at most
    ``count`` of them; ``0 … count-1`` when it is unset."""
    if value is None:
        return [str(index) for index in range(count)]
    gpus = []
    for entry in (part.strip() for part in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        gpus.append(entry)
    return gpus[:count]


def detect_gpus() -> list[str]:
    """This machine's usable GPUs (``SUITE_FAKE_GPUS`` replaces them in tests)."""
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        return parse_visible_devices(fake, len(fake.split(",")))
    import torch  # only here: the CUDA check below is the main process's, never a worker's

    if not torch.cuda.is_available():
        return []
    return parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())


def sweep_gpus() -> list[str]:
    """The GPU list the main process decided for this sweep (workers read it, never CUDA)."""
    value = os.environ.get(GPUS_ENV)
    return detect_gpus() if value is None else parse_visible_devices(value, len(value.split(",")))


def workers_for(gpus: list[str], cells_per_gpu: int) -> int:
    """How many worker processes keep every GPU busy with ``cells_per_gpu`` cells."""
    return max(1, len(gpus) * cells_per_gpu)


def register_resolver() -> None:
    """``${suite_gpu_workers:K}`` in conf/hydra/launcher/gpus.yaml: the worker count for K cells
    per GPU. Workers resolve it too (from the main process's list, never touching CUDA)."""
    if not OmegaConf.has_resolver("suite_gpu_workers"):
        OmegaConf.register_new_resolver("suite_gpu_workers", _gpu_workers)


def _gpu_workers(cells_per_gpu: int) -> int:
    workers = workers_for(sweep_gpus(), int(cells_per_gpu))
    sweep_size = int(os.environ.get("SUITE_SWEEP_SIZE") or 0)  # set by the sweep's main process
    return min(workers, sweep_size) if sweep_size > 0 else workers


def slot_gpu(slot: int, gpus: list[str]) -> str:
    return gpus[slot % len(gpus)]


def slot_dir() -> Path:
    """Machine-wide (per user), so concurrent sweeps share the per-GPU bound."""
    default = Path(tempfile.gettempdir()) / f"suite-gpu-slots-{os.getuid()}"
    return Path(os.environ.get(SLOT_DIR_ENV, default))


@dataclass
class DeviceSlot:
    """A held slot: ``gpu`` (its CUDA name), ``index`` among ``slots``; release() frees it."""

    gpu: str
    index: int
    slots: int
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def take_slot(
    gpus: list[str],
    cells_per_gpu: int,
    on_gpu: str | None = None,
    folder: Path | None = None,
    poll_s: float = 0.5,
) -> DeviceSlot:
    """Hold a free slot (of GPU ``on_gpu`` if given), waiting until one is free."""
    folder = folder or slot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    slots = len(gpus) * cells_per_gpu
    candidates = [j for j in range(slots) if on_gpu is None or slot_gpu(j, gpus) == on_gpu]
    if not candidates:
        raise ValueError(f"GPU {on_gpu!r} is not among the sweep's GPUs {gpus}")
    waited = False
    while True:
        for index in candidates:
            gpu = slot_gpu(index, gpus)
            # The file is named by the GPU and its place on it, not by the slot number, so sweeps
            # with a different cells_per_gpu still count the same cells on one GPU.
            path = folder / f"gpu-{_file_safe(gpu)}.{index // len(gpus)}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)  # who holds it, for a person looking at the folder
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
            return DeviceSlot(gpu=gpu, index=index, slots=slots, _fd=fd)
        if not waited:
            where = f"GPU {on_gpu}" if on_gpu is not None else "any GPU"
            log.info(
                "waiting for a free slot on %s (%d cell(s) per GPU, all held)", where, cells_per_gpu
            )
            waited = True
        time.sleep(poll_s)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)  # MIG-GPU-<uuid>/1/0 names hold slashes


_pinned_gpu: str | None = None  # this process's GPU, once pinned


def pin_process(slot: DeviceSlot, gpus: list[str], in_main_process: bool) -> None:
    """Make ``slot.gpu`` this process's only CUDA device. In a worker process, which has not
    touched CUDA, that is ``CUDA_VISIBLE_DEVICES``. The sweep's main process (a one-worker sweep
    trains there) already asked CUDA for its devices in preflight, after which the variable is
    no longer read: there the current device is set instead."""
    global _pinned_gpu
    import torch

    if _pinned_gpu is None and not in_main_process and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
    elif _pinned_gpu is None and torch.cuda.is_available():
        torch.cuda.set_device(gpus.index(slot.gpu))
    _pinned_gpu = slot.gpu


def pinned_gpu() -> str | None:
    return _pinned_gpu


def pins_gpus(local_workers: bool, device: str) -> bool:
    """Whether a job pins its process to a GPU: it runs in one of several worker processes on
    this machine (any local parallel launcher, not only ``gpus``), trains on CUDA as its device
    setting lets it choose, and the sweep has GPUs. An explicit ``cuda:N`` is the user's choice."""
    return local_workers and device in ("auto", "cuda") and bool(sweep_gpus())


@contextmanager
def gpu_slot(
    pin: bool, cells_per_gpu: int, in_main_process: bool = False
) -> Iterator[DeviceSlot | None]:
    """Around one job's training: if ``pin``, hold a slot and pin the process to its GPU;
    otherwise nothing (``None``)."""
    if not pin:
        yield None
        return
    gpus = sweep_gpus()
    slot = take_slot(gpus, cells_per_gpu, on_gpu=pinned_gpu())
    try:
        pin_process(slot, gpus, in_main_process)
        yield slot
    finally:
        slot.release()
