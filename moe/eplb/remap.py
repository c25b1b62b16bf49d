"""EPLB's ``TopKRemap``: logical ids → replicas → fused shared columns, per layer.

One ``RemapState`` per process holds what every layer reads (the dispatch tables, the step
index that seeds ``dynamic`` choices, the shared-column policy); each layer gets a thin
``EPLBRemap`` view. The state is a ``StepObserver``: register it with the stack
(``EPLBRuntime.observers`` does) so that it sees the step index.

Stages, in order (each optional):

1. replica dispatch (``ReplicaDispatch``): logical ``[T, K]`` → physical routed ids in
   ``[0, P_routed)``;
2. shared columns (``fuse_shared_experts``): ``S`` columns appended, routed ids interleaved;
   the column's rank is this rank (``own``, scattered layouts), the row's rank ``row % ep``
   (``spread``, the replicated layout) or Waterfill's choice (``waterfill``, scattered only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from moe_a2a.dispatchers.batch import PhysicalTopK
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.eplb.dispatch import ReplicaDispatch
from moe_a2a.eplb.hashing import salt
from moe_a2a.eplb.shared import fuse_shared_experts
from moe_a2a.eplb.waterfill import MIN_BATCH_FOR_BALANCE, waterfill_ranks
from moe_a2a.errors import MoeA2AError
from moe_a2a.routing import LogicalTopK
from moe_a2a.step import StepContext, StepObserver

SHARED_PLACEMENTS = ("own", "spread", "waterfill")


@dataclass(frozen=True, kw_only=True)
class SharedColumns:
    """How the fused shared expert is appended.

    Attributes:
        num_shared: ``S`` shared slots per rank (columns per token).
        weight: the columns' weight (1.0 with this library's router, see ``shared``).
        placement: ``own``, ``spread`` or ``waterfill`` (module docstring).
        waterfill_dynamic: Waterfill sums loads over the EP group (one all-reduce per layer).
        min_batch: Waterfill keeps batches smaller than this on their own rank.
    """

    num_shared: int = 1
    weight: float = 1.0
    placement: str = "own"
    waterfill_dynamic: bool = False
    min_batch: int = MIN_BATCH_FOR_BALANCE

    def __post_init__(self) -> None:
        if self.placement not in SHARED_PLACEMENTS:
            raise MoeA2AError(f"shared column placement {self.placement!r} is unknown: use one of "
                              f"{', '.join(SHARED_PLACEMENTS)}")
        if self.num_shared < 1:
            raise MoeA2AError(f"num_shared={self.num_shared} must be >= 1")


class RemapState(StepObserver):
    """Per-process EPLB remap state, shared by every layer's ``EPLBRemap``.

    Args:
        groups: this process's groups (EP rank and group; Waterfill's all-reduce).
        num_routed_experts: ``P_routed`` physical routed experts (``E`` without EPLB).
        replicas: the replica dispatch, or None (physical = logical).
        shared: the fused shared columns, or None.
        per_rank: each token is routed by exactly one rank (scattered layout).
        seed: folded into hashed choices.
    """

    def __init__(self, *, groups: CommGroups, num_routed_experts: int,
                 replicas: Optional[ReplicaDispatch] = None, shared: Optional[SharedColumns] = None,
                 per_rank: bool, seed: int = 0) -> None:
        if num_routed_experts % groups.ep_size:
            raise MoeA2AError(f"{num_routed_experts} physical routed experts cannot be split over "
                              f"ep {groups.ep_size}")
        if shared is not None and not per_rank and shared.placement != "spread":
            raise MoeA2AError(
                f"fused shared columns placed {shared.placement!r} need each token routed by one "
                f"rank (a scattered backend such as alltoall or deepep); under the replicated "
                f"layout every attention-TP rank routes the same rows: use placement 'spread'")
        if replicas is not None and replicas.num_physical_experts != num_routed_experts:
            raise MoeA2AError(f"the replica dispatch places {replicas.num_physical_experts} "
                              f"experts, not {num_routed_experts}")
        self.groups = groups
        self.num_routed_experts = num_routed_experts
        self.replicas = replicas
        self.shared = shared
        self.per_rank = per_rank
        self.seed = seed
        self.step_index = 0

    def on_step_begin(self, step: StepContext) -> None:
        self.step_index = step.index

    @property
    def shared_slots_per_rank(self) -> int:
        return 0 if self.shared is None else self.shared.num_shared

    @property
    def num_physical_experts(self) -> int:
        return self.num_routed_experts + self.groups.ep_size * self.shared_slots_per_rank

    def remaps(self, num_layers: int) -> List["EPLBRemap"]:
        return [EPLBRemap(self) for _ in range(num_layers)]

    def shared_ranks(self, routed: torch.Tensor, layer_id: int) -> torch.Tensor:
        """``[T]`` int64: the rank computing each token's shared expert."""
        g, shared = self.groups, self.shared
        if shared is None:
            raise MoeA2AError("RemapState.shared_ranks: no fused shared columns")
        if shared.placement == "own":
            return torch.full((routed.shape[0],), g.ep_rank, dtype=torch.int64, device=routed.device)
        if shared.placement == "spread":  # the same on every rank that routes the row
            return torch.arange(routed.shape[0], device=routed.device) % g.ep_size
        return waterfill_ranks(routed, routed_per_rank=self.num_routed_experts // g.ep_size,
                               ep_size=g.ep_size, ep_rank=g.ep_rank, group=g.ep_group,
                               dynamic=shared.waterfill_dynamic, min_batch=shared.min_batch,
                               salt_value=salt((self.seed, layer_id)))

    def to_physical(self, topk: LogicalTopK, layer_id: int) -> PhysicalTopK:
        ids = topk.ids
        if self.replicas is not None:
            ids = self.replicas(ids, layer_id, self.step_index)
        if self.shared is None:
            return PhysicalTopK(ids=ids, weights=topk.weights)
        fused = fuse_shared_experts(ids, topk.weights,
                                    num_physical_routed_experts=self.num_routed_experts,
                                    ep_size=self.groups.ep_size,
                                    target_rank=self.shared_ranks(ids, layer_id),
                                    num_shared=self.shared.num_shared,
                                    shared_weight=self.shared.weight)
        return PhysicalTopK(ids=fused.dispatch_ids, weights=fused.dispatch_weights)


class EPLBRemap:
    """One layer's ``TopKRemap`` (a view of the process's ``RemapState``).

    Attributes:
        num_physical_experts: ``P_routed + ep * S`` slots dispatchers place.
        extra_columns: ``S`` fused shared columns per token.
        shared_slots_per_rank: ``S`` (``EPMoE.get_moe_weights`` leaves these slots out).
    """

    def __init__(self, state: RemapState) -> None:
        self.state = state
        self.num_physical_experts = state.num_physical_experts
        self.extra_columns = state.shared_slots_per_rank
        self.shared_slots_per_rank = state.shared_slots_per_rank

    def to_physical(self, topk: LogicalTopK, layer_id: int) -> PhysicalTopK:
        return self.state.to_physical(topk, layer_id)


__all__ = ["EPLBRemap", "RemapState", "SHARED_PLACEMENTS", "SharedColumns"]
