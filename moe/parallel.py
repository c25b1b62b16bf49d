"""Parallel context: process groups derived from the resolved sizes, passed explicitly.

The same code runs under ``moe-a2a run`` (spawned local ranks, file/TCP rendezvous) and
under ``torchrun`` (``env://`` rendezvous). Nothing here reads the environment: launch
variables are read once in ``moe_a2a.server_args.launch``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.errors import MoeA2AError
from moe_a2a.server_args.layout import ParallelLayout

if TYPE_CHECKING:
    from moe_a2a.server_args import ServerArgs


#: The job's sizes and rank math (one implementation, in ``moe_a2a.server_args.layout``).
ParallelSizes = ParallelLayout


def _new_groups(rank_lists: Sequence[Sequence[int]], rank: int, backend: Optional[str],
                local_sync: bool, timeout: Optional[datetime.timedelta] = None):
    """Create every group of one kind; return this rank's (None when it is in none, or when
    its group has one rank: size-1 groups communicate nothing and are never created).

    With ``local_sync`` only the members of a group call ``new_group`` for it (a MoE job on a
    sub-group of a larger world); otherwise every rank calls it for every group, in order.
    """
    mine = None
    for ranks in rank_lists:
        if len(ranks) == 1:
            continue
        if local_sync and rank not in ranks:
            continue
        group = dist.new_group(list(ranks), backend=backend, use_local_synchronization=local_sync,
                               timeout=timeout)
        if rank in ranks:
            mine = group
    return mine


def build_comm_groups(sizes: ParallelSizes, rank: int, backend: Optional[str] = None,
                      ranks: Optional[Sequence[int]] = None,
                      timeout_s: Optional[float] = None) -> CommGroups:
    """Create the sub-groups of this process's MoE job.

    Args:
        sizes: the job's sizes (``tp_size`` ranks).
        rank: this process's rank in the default process group.
        backend: torch.distributed backend of the new groups (None: the default group's).
        ranks: the default-group ranks that form this MoE job, in job order (``tp_size`` of
            them); None means the whole default group, which must then have ``tp_size`` ranks.
            With a sub-group only the job's own ranks call this (other jobs of the same world
            build theirs independently).
        timeout_s: how long a collective of the new groups may wait for a peer (None: torch's
            default of 30 min, whatever the default group's timeout is).
    Returns:
        ``CommGroups`` whose ``rank`` is this process's index in the job.
    """
    world = sizes.tp_size
    if ranks is not None:
        ranks = [int(r) for r in ranks]
        if len(ranks) != world or len(set(ranks)) != world:
            raise MoeA2AError(f"ranks={ranks} must list {world} distinct ranks (tp_size={world})")
        if rank not in ranks:
            raise MoeA2AError(f"this process (rank {rank}) is not in ranks={ranks}; fix: build "
                              f"the parallel context only on the job's own ranks")
    if world > 1 or ranks is not None:
        if not dist.is_initialized():
            raise MoeA2AError("torch.distributed is not initialised: call init_distributed() first")
    full_world = ranks is None or ranks == list(range(dist.get_world_size()))
    if ranks is None:
        if world > 1 and dist.get_world_size() != world:
            raise MoeA2AError(
                f"the process group has {dist.get_world_size()} ranks but tp_size={world}: "
                f"launch exactly tp_size processes (e.g. torchrun --nproc-per-node {world}), or "
                f"pass ranks=[...] to build the MoE job on a sub-group"
            )
        ranks = list(range(world))
    local = ranks.index(rank)
    layout = sizes.layout_groups() if world > 1 else {}
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    groups = {kind: _new_groups([[ranks[i] for i in g] for g in lists], rank, backend,
                                local_sync=not full_world, timeout=timeout)
              for kind, lists in layout.items()}
    if world == 1:
        world_group = None
    elif full_world:
        world_group = dist.group.WORLD
    else:
        world_group = dist.new_group(ranks, backend=backend, use_local_synchronization=True,
                                     timeout=timeout)
    atp, mtp = sizes.attn_tp_size, sizes.moe_tp_size
    return CommGroups(
        rank=local,
        world_size=world,
        world_group=world_group,
        ep_rank=local // mtp,
        ep_size=sizes.ep_size,
        ep_group=groups.get("ep"),
        moe_tp_rank=local % mtp,
        moe_tp_size=mtp,
        moe_tp_group=groups.get("moe_tp"),
        attn_tp_rank=local % atp,
        attn_tp_size=atp,
        attn_tp_group=groups.get("attn_tp"),
        dp_rank=local // atp,
        dp_size=sizes.attn_dp_size,
        attn_dp_group=groups.get("attn_dp"),
        dp_attention=sizes.attn_dp_size > 1,
        backend=dist.get_backend() if world > 1 else "none",
    )


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the job: sizes, device and groups."""

    sizes: ParallelSizes
    groups: CommGroups
    device: torch.device

    @property
    def rank(self) -> int:
        return self.groups.rank


def init_distributed(rank: int, world_size: int, *, backend: str, init_method: str,
                     timeout_s: float = 300.0, device: Optional[torch.device] = None) -> None:
    """Join the default process group (no-op for one rank).

    On CUDA, ``device`` binds the process group to this rank's GPU (NCCL otherwise guesses
    the device from the global rank, which is wrong across nodes).
    """
    if world_size == 1 or dist.is_initialized():
        return
    kwargs: Dict[str, Any] = {"device_id": device} if device is not None and device.type == "cuda" else {}
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def make_parallel_context(sizes: ParallelSizes, rank: int, device: torch.device,
                          ranks: Optional[Sequence[int]] = None,
                          timeout_s: Optional[float] = None) -> ParallelContext:
    """This process's context: ``rank`` in the default group; ``ranks`` the job's ranks when
    the MoE job runs on a sub-group of a larger world; ``timeout_s`` the collective timeout of
    the groups it creates (see ``build_comm_groups``)."""
    groups = build_comm_groups(sizes, rank, ranks=ranks, timeout_s=timeout_s)
    return ParallelContext(sizes=sizes, groups=groups, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
