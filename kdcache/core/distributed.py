"""Process-group helpers for runs started with ``torchrun`` (or as one plain process).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_from_env` joins the
process group they describe (gloo on CPU, NCCL on CUDA) and is a no-op in a plain process, so
every command runs the same code with one process or many.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist() -> Dist:
    """Rank, world size and local rank as ``torchrun`` describes them (0, 1, 0 otherwise)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(device: torch.device | None = None) -> Dist:
    """Join the process group ``torchrun`` set up (once); returns this process's place in it."""
    d = env_dist()
    if d.enabled and not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(d.local_rank)  # before NCCL touches a device
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return d


def local_device(device: torch.device, d: Dist) -> torch.device:
    """One GPU per process under torchrun: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and d.enabled and device.index is None:
        return torch.device("cuda", d.local_rank)
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank (a failed rank stops the others)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params) -> None:
    """All-reduce and average the gradients of ``params`` (those DDP does not manage)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per-rank sums of training terms -> their mean over ranks (same keys on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.cpu().tolist()))


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a plain process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def replicas_equal(params) -> bool:
    """True when every rank holds bit-identical ``params`` (a module's parameters, or any list of
    tensors: the student's and the KD adapters' — what DDP and :func:`average_gradients` promise
    after each optimizer step); compares a SHA-256 of each rank's tensors. Buffers are left out:
    BatchNorm's running statistics are updated by each rank's own last forward."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    h = hashlib.sha256()
    for t in params:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = gather_objects(h.hexdigest())
    return len(set(digests)) == 1


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics), so that all of them
    validate the model rank 0 saves (each rank's last training forward updated its own)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)

