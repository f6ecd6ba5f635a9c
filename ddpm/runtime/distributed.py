"""Data-parallel training across processes: who this process is, and the few collectives the loop needs.

The ranks come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or, inside a SLURM job started
by submitit with several tasks, from submitit's view of the SLURM environment. One process is world size 1
and never touches torch.distributed.
"""

import dataclasses
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ddpm.config.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, samples and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _submitit_num_tasks() -> int:
    """How many tasks the submitit job this process belongs to has (1 outside submitit)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 1
    from submitit import JobEnvironment

    return JobEnvironment().num_tasks


def init_distributed(device: torch.device) -> Ranks:
    """Joins the process group when started as one of several ranks; returns this process's ranks.

    NCCL on GPU (one GPU per rank, `rank_device`'s, made current and named to NCCL so that its communicator
    starts now, bound to that GPU, rather than lazily at the first collective), gloo on CPU. Gloo (also the
    stop-flag group beside NCCL) finds its interface from the node's hostname: on nodes with several network
    interfaces, name the one between nodes with GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME).
    """
    if "RANK" not in os.environ and _submitit_num_tasks() > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            own_gpu = rank_device(device, ranks)
            torch.cuda.set_device(own_gpu)
            dist.init_process_group(backend="nccl", device_id=own_gpu)
        else:
            dist.init_process_group(backend="gloo")
        backend = dist.get_backend()
        log.info("rank %d of %d (%s, local rank %d)", ranks.rank, world_size, backend, ranks.local_rank)
    return ranks


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per rank: cuda:LOCAL_RANK where the process sees every GPU of its node, cuda:0 where it sees one
    (SLURM's --gpus-per-task or cgroup-constrained devices give each task its own); the CPU stays the CPU."""
    if device.type != "cuda" or not ranks.distributed:
        return device
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if ranks.local_rank >= visible:
        raise ConfigError(
            f"local rank {ranks.local_rank} has no GPU of its own: this process sees {visible} GPU(s); start one "
            "task per GPU (hydra.launcher.tasks_per_node = gpus_per_node)"
        )
    return torch.device("cuda", ranks.local_rank)


def running_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers that training changes (BatchNorm's running mean, variance and batch count): only these differ
    between ranks that see different data. The rest (the schedule, the EMA's counters, fixed filter taps) are
    equal on every rank by construction."""
    return [
        buffer
        for layer in module.modules()
        if getattr(layer, "track_running_stats", False)
        for buffer in layer.buffers(recurse=False)
    ]


def share_running_statistics(module: torch.nn.Module, ranks: Ranks) -> None:
    """Every rank takes rank 0's running statistics (the ones its checkpoints hold). DDP does so before each
    forward pass, after which each rank's own batch moves them again: this makes the replicas equal at the end."""
    if ranks.distributed:
        for buffer in running_statistics(module):
            dist.broadcast(buffer, src=0)


def data_parallel(module: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """`module` wrapped for data parallelism across the ranks (as it is in one process). DDP broadcasts rank
    0's buffers before every forward pass unless told not to: only running statistics need it (BatchNorm then
    normalizes with each rank's own share of the batch, as DDP without SyncBatchNorm does)."""
    if not ranks.distributed:
        return module
    return DistributedDataParallel(
        module,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=bool(running_statistics(module)),
    )


def local_batch_size(global_batch: int, ranks: Ranks) -> int:
    """trainer.batch_size is the global batch: each rank takes an equal share."""
    if global_batch % ranks.world_size:
        raise ConfigError(
            f"trainer.batch_size={global_batch} is the global batch and must divide evenly among "
            f"{ranks.world_size} ranks"
        )
    return global_batch // ranks.world_size


def sum_across_ranks(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.distributed:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any of them (so all ranks take the same branch)."""
    if not ranks.distributed:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_to_main(value: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's `value` as a list on rank 0 (None elsewhere); [value] in one process."""
    if not ranks.distributed:
        return [value]
    gathered = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
