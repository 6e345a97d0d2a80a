"""One model trained by several processes: torchrun and DistributedDataParallel (DDP).

    torchrun --nproc_per_node 2 -m prn fit --dataset mvtec --root /data/mvtec --category bottle

torchrun starts N copies of ``prn`` and gives each, in its environment, its RANK, LOCAL_RANK,
WORLD_SIZE and where to meet the others (MASTER_ADDR, MASTER_PORT). prn joins that process group
the first time it trains (``setup``: gloo on the CPU, NCCL on CUDA) and from there:

- the global batch (cfg.training.batch_size) is split across ranks: rank r takes slots r, r + N, ... of
  the batch one process would train on (``BalancedBatchSampler``), so the normal / extended /
  simulated / seen shares are kept and the weights are one process's, up to float rounding;
- rank 0 computes the prototypes (k-means) once and sends them to the others;
- DDP averages the gradients of the trainable head; the frozen encoder takes no part;
- rank 0 alone makes the run folder, writes checkpoints, metrics, calibration and reports; the
  others learn the run folder, config and split from it (``share_run``) and wait for it at the
  end (``barrier``).

When a rank fails, torchrun stops the others and names the one that failed first; prn writes
that rank's message where torchrun reads it (``record_failure``). A collective that waits longer
than PRN_DIST_TIMEOUT seconds (default 1800) for a peer fails instead of hanging.

Outside torchrun (WORLD_SIZE unset or 1) every function here does nothing, so a single process
runs the code it always ran.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from prn.config import PRNConfig
from prn.data.split import Split
from prn.errors import PRNError, UsageError

TIMEOUT_ENV = "PRN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
LINGER_S = 30.0  # how long a rank stopped by a peer's failure waits for torchrun to end it


class PeerFailure(PRNError):
    """A collective failed: another process of the run stopped, or did not answer in time."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one model."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0     # rank on this machine
    local_size: int = 1     # processes on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer "
                         f"(torchrun sets it; unset it to train in one process)") from None


def world() -> World:
    """The processes of this run, from torchrun's environment; one process is rank 0 of 1."""
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process group "
                         f"(need 0 <= RANK < WORLD_SIZE)")
    local_rank = _env_int("LOCAL_RANK", rank)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    return World(rank, size, local_rank, local_size)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a container's
    or taskset's limit), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def is_main() -> bool:
    return world().is_main


def rank_label() -> str:
    """" (rank r of n)" for messages of a process among several; "" for a single process."""
    try:
        w = world()
    except UsageError:
        return ""
    return f" ({w})" if w.distributed else ""


def check_batch(batch_size: int, w: World) -> None:
    """The global batch must split into equal shares, one per process."""
    if batch_size % w.size:
        step = math.lcm(w.size, 4)
        raise UsageError(f"batch_size {batch_size} does not split evenly over {w.size} processes; "
                         f"use a multiple of {step}, e.g. {step * max(1, round(batch_size / step))}")


def timeout_seconds() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise UsageError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join this torchrun launch's process group (once per process) and return this rank's
    place and device. With device "cuda" (no index) local rank r takes GPU r mod the GPU count;
    an explicit "cuda:N" puts every rank on that GPU. In one process: (rank 0 of 1, device)."""
    w = world()
    if not w.distributed:
        return w, device
    shared_gpu = False
    if device.type == "cuda":
        count = torch.cuda.device_count()
        shared_gpu = device.index is not None or w.local_size > count
        if device.index is None:
            device = torch.device("cuda", w.local_rank % count)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not dist.is_available():
            raise UsageError("this build of torch has no torch.distributed; train in one process")
        # NCCL wants one GPU per process; gloo also moves CUDA tensors, so ranks sharing a GPU
        # (the GPU check runs two on one) use it.
        nccl = device.type == "cuda" and not shared_gpu
        dist.init_process_group("nccl" if nccl else "gloo", timeout=timedelta(seconds=timeout_seconds()),
                                device_id=device if nccl else None)
        atexit.register(_shutdown)
    return w, device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _collective(what: str):
    """Turns the error of a collective (gloo/NCCL raise RuntimeError when a peer's connection
    closes or the timeout passes) into a PeerFailure that says what happened."""
    try:
        yield
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise PeerFailure(f"{what}: lost another process of this run (it stopped, or did not answer "
                          f"within {timeout_seconds():g} s: {lines[0] if lines else type(exc).__name__}); "
                          f"torchrun's summary names the process that failed") from exc


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if _active():
        with _collective("waiting for the other processes"):
            dist.barrier()


def broadcast_text(text: str | None) -> str:
    """Rank 0's ``text`` on every rank, sent as UTF-8 bytes in a tensor (nothing is pickled)."""
    if not _active():
        return text
    device = _comm_device()
    data = (torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).to(device) if dist.get_rank() == 0
            else None)
    length = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    with _collective("receiving the run from rank 0"):
        dist.broadcast(length, src=0)
        if data is None:
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        dist.broadcast(data, src=0)
    return data.cpu().numpy().tobytes().decode()


def share_run(run_dir: Path | None, split: Split | None,
              cfg: PRNConfig) -> tuple[Path, Split, PRNConfig]:
    """Rank 0's run folder, split and config (as it wrote them) on every rank, sent as JSON, so
    the other ranks need neither a shared file system nor to split the data themselves."""
    if not _active():
        return run_dir, split, cfg
    text = None
    if dist.get_rank() == 0:
        text = json.dumps({"run_dir": str(run_dir), "split": split.to_dict(), "config": cfg.to_dict()})
    data = json.loads(broadcast_text(text))
    if dist.get_rank() == 0:
        return run_dir, split, cfg
    return Path(data["run_dir"]), Split.from_dict(data["split"]), PRNConfig.from_dict(data["config"])


def share_buffers(module: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Rank 0's buffers whose names start with one of ``prefixes`` (what rank 0 alone fitted:
    the prototypes) copied into ``module`` on every rank. Shapes go first, since the other ranks'
    buffers are still empty; ``module.load_state_dict`` then takes the tensors."""
    if not _active():
        return
    device, main = _comm_device(), dist.get_rank() == 0
    received = {}
    for name, buf in module.state_dict().items():
        if not name.startswith(prefixes):
            continue
        shape = torch.zeros(9, dtype=torch.int64)
        if main:
            shape[0] = buf.dim()
            shape[1:1 + buf.dim()] = torch.tensor(buf.shape, dtype=torch.int64)
        shape = shape.to(device)
        with _collective("receiving the prototypes from rank 0"):
            dist.broadcast(shape, src=0)
            dims = shape[1:1 + int(shape[0])].tolist()
            data = buf.contiguous().to(device) if main else torch.empty(dims, dtype=buf.dtype, device=device)
            dist.broadcast(data, src=0)
        received[name] = data.cpu()
    if not main:
        module.load_state_dict(received, strict=False)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes train it, else ``model``.

    DDP reduces the gradients of parameters that require them, which in PRN are the head's (the
    encoder is frozen). Its buffers (the encoder's batch-norm statistics, kept in eval mode, and
    the prototypes) are equal on every rank and never change while training, so they are not
    broadcast at every step. Every head parameter takes part in the loss, so the costlier
    find_unused_parameters is not needed."""
    if not _active():
        return model
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.14 renamed the switch; both keep the sync at construction, which is harmless here
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else "broadcast_buffers")
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})


def sync_batch_norm(model: nn.Module, exclude: str = "encoder") -> nn.Module:
    """On CUDA: the batch-norm layers of ``model``'s children other than ``exclude`` (the frozen
    encoder, whose timm layers fuse an activation that conversion would drop) become
    SyncBatchNorm, so each normalises over the global batch as one process would. PyTorch has
    no CPU kernels for it: on the CPU every rank normalises its own share, which is why CPU runs
    match one process only up to that (tests/test_distributed.py)."""
    for name, child in list(model.named_children()):
        if name != exclude:
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return model


def average_buffers(module: nn.Module, suffixes: tuple[str, ...], exclude: str = "encoder.") -> None:
    """Replace the buffers whose names end with one of ``suffixes`` (batch-norm running
    statistics), outside ``exclude`` (the frozen encoder), by their mean over the ranks, so that
    every rank, and rank 0's checkpoint, holds statistics of all the data, not of its shares."""
    if not _active():
        return
    for name, buf in module.named_buffers():
        if name.endswith(suffixes) and not name.startswith(exclude) and buf.is_floating_point():
            buf.copy_(mean_over_ranks(buf))


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over the ranks (``values`` itself in one process)."""
    if not _active():
        return values
    out = values.detach().clone().to(_comm_device())
    with _collective("adding up over the processes"):
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``values`` (n_r, d), rank 0's first, as one (sum of n_r, d) tensor on
    every rank (``values`` itself in one process). Ranks may hold different numbers of rows: each
    sends its rows padded to the longest, with its count (tensors only, nothing pickled)."""
    if not _active():
        return values
    device, size = _comm_device(), dist.get_world_size()
    rows = values.detach().to(device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    with _collective("gathering rows from the processes"):
        dist.all_gather(counts, torch.tensor([len(rows)], dtype=torch.int64, device=device))
        longest = max(int(c.item()) for c in counts)
        padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
        padded[:len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded)
    return torch.cat([part[:int(c.item())] for part, c in zip(parts, counts)]).to(values.device)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks (``values`` itself in one process)."""
    return sum_over_ranks(values) / dist.get_world_size() if _active() else values


def report_failure(exc: BaseException) -> None:
    """Under torchrun, write this rank's error where torchrun reads it, so its summary quotes
    the message ("Root Cause") rather than an exit code alone. A rank stopped by another's
    failure (PeerFailure) writes nothing and waits up to LINGER_S for torchrun to end it:
    torchrun names the failure it sees first, which should be the other's. Nothing outside
    torchrun."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    if isinstance(exc, PeerFailure):
        time.sleep(LINGER_S)
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
    ErrorHandler().record_exception(exc)
