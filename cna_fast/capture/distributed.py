"""Data-parallel capture with torch.distributed (torchrun): join the process group, shard the prompts.

Every rank streams every world-size-th prompt of each set and keeps its own moments; the ranks
merge them exactly (Chan, in rank order) at the end, so every rank holds the same statistics.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable

import torch

from ..errors import CNAError


def init_distributed() -> tuple[int, dict | None]:
    """Join the torchrun process group (NCCL with GPUs, gloo without); returns the rank and its device map."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise CNAError("--distributed needs torchrun: torchrun --nproc_per_node=N -m cna_fast discover "
                       "--distributed ...")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), {"": local_rank}
    return dist.get_rank(), None


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks; an error outside an initialized process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CNAError("distributed capture needs torch.distributed initialized: launch with torchrun and call "
                       "torch.distributed.init_process_group (or init_distributed(); the CLI's --distributed does "
                       "both)")
    return dist.get_rank(), dist.get_world_size()


def shard(prompts: Iterable[str], rank: int, world: int) -> Iterable[str]:
    """Every world-th prompt, starting at `rank`."""
    return itertools.islice(prompts, rank, None, world)
