"""Several training processes through torchrun: DistributedDataParallel, NCCL on GPUs, gloo on CPUs.

``torchrun --nproc_per_node N -m training.cli all ...`` starts N copies of the same command; each
finds its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Without
those variables (a plain ``petriage-train``) there is one process and nothing here does anything.

What is split and what is not, so that N processes compute what one would:

- each stage-1 step's batch (full slices and crops) is divided between the ranks, each drawing its
  share from its own random stream; DDP averages the gradients, so a step sees ``batch_size`` slices
  in all whatever N is (batch norms use each rank's share: their statistics, not the gradient, differ);
- stage 2 divides each batch of studies between the ranks the same way;
- the cache, feature extraction, validation, checkpoints, logs and the report are rank 0's; the other
  ranks wait at a barrier and read what it wrote (a resumed run reads the same ``stage1_last.pt`` on
  every rank), and the validation figure that decides "best" is broadcast from rank 0.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from training import TrainingError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def ranks() -> Ranks:
    """This process's place among torchrun's processes (one process when not under torchrun)."""
    if not dist.is_available() or not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device_setting: str) -> Ranks:
    """Join torchrun's process group once (NCCL when CUDA is used, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return ranks()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    cuda = device_setting in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return ranks()


def device_for(setting: str) -> torch.device:
    """cuda:LOCAL_RANK under torchrun on GPUs, else what the setting asks."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' asked for, but torch sees no CUDA device")
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", ranks().local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if ranks().active:
        dist.barrier()


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank."""
    if not ranks().active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())


def mean_over_ranks(values: list[float]) -> list[float]:
    """Each value averaged over the ranks (the epoch's losses for the log)."""
    if not ranks().active:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / ranks().world).tolist()


def share(n: int, r: Ranks | None = None) -> int:
    """This rank's part of n items split as evenly as possible (the first ranks take the remainder)."""
    r = r or ranks()
    return n // r.world + (1 if r.rank < n % r.world else 0)


def wrap(model: torch.nn.Module, device: torch.device, some_unused: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several processes.

    ``some_unused``: a step may leave parameters without a gradient (stage 2's slice head when no slice
    label is known); DDP then looks for them after each forward pass instead of waiting for them."""
    if not ranks().active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=some_unused)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def finish() -> None:
    """Leave the process group together: every process waits for the others (rank 0 may still be
    evaluating), drops what still holds the group (DDP reducers sit in reference cycles) and destroys it
    while the interpreter is whole. A process that left the group's threads to interpreter teardown was
    seen to abort ("terminate called without an active exception", SIGABRT) under load."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
