"""Which replica a token's column goes to (``--ep-dispatch-algorithm``).

* ``static``: each rank uses a fixed table, logical expert → its *nearest* replica: one on the
  same GPU if there is one (the lowest slot), else one on the same node, else any; the ranks
  that have no replica on their GPU are spread evenly (round robin, rotated per expert) over
  the candidates, so a replicated hot expert does not send everyone to its first copy.
* ``dynamic``: a replica drawn per (token, column) from a counter-based hash of the seed, the
  step, the layer, the row and the column: uniform over the replicas, reproducible.

Under the replicated layout (backend ``none``) every attention-TP rank routes the same rows and
computes only its own experts: a column must name the same replica on all of them or it is
computed twice (or not at all). There the choice depends on the row, never on the rank:
``static`` spreads rows round robin over the replicas, ``dynamic`` hashes without the rank.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from moe_a2a.eplb.hashing import hash_index, salt
from moe_a2a.eplb.location import ExpertLocation
from moe_a2a.errors import MoeA2AError

DISPATCH_ALGORITHMS = ("static", "dynamic")


def static_dispatch_table(location: ExpertLocation, ep_rank: int, *, num_nodes: int = 1) -> torch.Tensor:
    """``[L, E]`` int64: the physical slot rank ``ep_rank`` sends each logical expert to.

    Every rank computes its own row from the same placement; the rules above make the rows
    of all ranks together spread evenly over the replicas.
    """
    ep = location.ep_size
    if num_nodes < 1 or ep % num_nodes:
        raise MoeA2AError(f"static dispatch: ep {ep} cannot be split over {num_nodes} nodes")
    if not 0 <= ep_rank < ep:
        raise MoeA2AError(f"static dispatch: ep_rank {ep_rank} is outside [0, {ep})")
    per_gpu = location.num_local_physical_experts
    per_node = ep // num_nodes
    table = location.logical_to_all_physical[:, :, 0].clone()
    counts = location.replica_counts
    experts = location.num_logical_experts
    for layer, expert in (counts > 1).nonzero().tolist():
        slots: List[int] = location.logical_to_all_physical[layer, expert, :counts[layer, expert]].tolist()
        gpus = [s // per_gpu for s in slots]
        if ep_rank in gpus:
            table[layer, expert] = slots[gpus.index(ep_rank)]
            continue
        node = ep_rank // per_node
        near = [s for s, g in zip(slots, gpus) if g // per_node == node]
        if near:  # spread the node's ranks without a local copy over the node's copies
            peers = [r for r in range(node * per_node, (node + 1) * per_node) if r not in gpus]
        else:     # no copy on this node: spread the ranks of such nodes over every copy
            near = slots
            nodes_with = {g // per_node for g in gpus}
            peers = [r for r in range(ep) if r // per_node not in nodes_with]
        turn = peers.index(ep_rank) + layer * experts + expert
        table[layer, expert] = near[turn % len(near)]
    return table


class ReplicaDispatch:
    """Logical → physical routed ids for every layer of one process, by one algorithm.

    Args:
        location: the placement (replaced by ``update`` after a rebalance).
        algorithm: ``static`` or ``dynamic``.
        per_rank: each token is routed by exactly one rank (scattered layout): choices may
            depend on the rank (nearest replica). False under the replicated layout.
        ep_rank: this process's EP rank.
        num_nodes: nodes the EP ranks are spread over (``static``'s "same node").
        seed: folded into ``dynamic``'s hash.
        device: where the tables live (the layers' device).
    """

    location: ExpertLocation
    all_physical: torch.Tensor       # [L, E, R_max], set by update
    counts: torch.Tensor             # [L, E]
    table: Optional[torch.Tensor]    # [L, E]: static per-rank table, else None

    def __init__(self, location: ExpertLocation, *, algorithm: str, per_rank: bool, ep_rank: int,
                 num_nodes: int = 1, seed: int = 0, device: torch.device = torch.device("cpu")) -> None:
        if algorithm not in DISPATCH_ALGORITHMS:
            raise MoeA2AError(f"ep dispatch algorithm {algorithm!r} is unknown: use one of "
                              f"{', '.join(DISPATCH_ALGORITHMS)}")
        self.algorithm = algorithm
        self.per_rank = per_rank
        self.ep_rank = ep_rank
        self.num_nodes = num_nodes
        self.seed = seed
        self.device = device
        self.update(location)

    def update(self, location: ExpertLocation) -> None:
        """Use a new placement (after a rebalance). The device tables keep their shapes and
        addresses (updated in place), so a captured CUDA graph reads the new placement."""
        # [L, E, R_max]: R_max = 1 + redundant, the most replicas one expert can get
        width = location.num_physical_experts - location.num_logical_experts + 1
        padded = torch.nn.functional.pad(location.logical_to_all_physical,
                                         (0, width - location.logical_to_all_physical.shape[2]),
                                         value=-1)
        tables = {"all_physical": padded, "counts": location.replica_counts}  # [L, E, R_max], [L, E]
        if self.algorithm == "static" and self.per_rank:
            tables["table"] = static_dispatch_table(location, self.ep_rank, num_nodes=self.num_nodes)
        old: Optional[ExpertLocation] = getattr(self, "location", None)
        first = old is None
        if old is not None and tuple(location.physical_to_logical.shape) != \
                tuple(old.physical_to_logical.shape):
            raise MoeA2AError("ReplicaDispatch.update: a new placement must keep the layers and "
                              "physical experts of the old one")
        for name, value in tables.items():
            if first:
                setattr(self, name, value.to(self.device))
            else:
                getattr(self, name).copy_(value)
        if first and "table" not in tables:
            self.table = None
        self.location = location

    @property
    def num_physical_experts(self) -> int:
        return self.location.num_physical_experts

    def __call__(self, ids: torch.Tensor, layer_id: int, step_index: int) -> torch.Tensor:
        """``[T, K]`` int64 logical ids → ``[T, K]`` int64 physical slots (no host read)."""
        if self.table is not None:
            return self.table[layer_id][ids]
        num_tokens, top_k = ids.shape
        counts = self.counts[layer_id][ids]                                         # [T, K]
        rows = torch.arange(num_tokens, device=ids.device).unsqueeze(1)
        if self.algorithm == "static":  # replicated layout: round robin by row (and expert)
            pick = (rows + ids) % counts
        else:
            keys = (self.seed, step_index, layer_id, self.ep_rank if self.per_rank else -1)
            cols = torch.arange(top_k, device=ids.device).unsqueeze(0)
            pick = hash_index(rows * top_k + cols, salt(keys)) % counts
        return self.all_physical[layer_id][ids, pick]


__all__ = ["DISPATCH_ALGORITHMS", "ReplicaDispatch", "static_dispatch_table"]
