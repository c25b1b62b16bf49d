"""Rebalancing: expert loads → a placement of physical replicas on GPUs (DeepSeek-style).

Two greedy steps, applied per layer:

1. **Replicate**: start with one replica per logical expert; while physical slots remain, give
   one more replica to the expert whose load *per replica* is the highest (ties: lowest id).
2. **Pack**: put the replicas (each carrying ``load / replicas`` of its expert) on GPUs, the
   same number per GPU: take them heaviest first and put each on the lightest GPU that still
   has a free slot (ties: lowest GPU).

``deepseek_hierarchical`` first packs the expert groups (``n_group`` contiguous groups of the
router) onto nodes, balanced by group load, then replicates and packs within each node, so
that a token's replicas stay inside its node. ``deepseek`` is the same with one group and one
node. ``auto`` picks the hierarchical form when the groups divide evenly over the nodes.

Every function here is deterministic (no randomness; ties broken by index) and runs on the
CPU in float64: it is called once per rebalance, never inside a forward.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from moe_a2a.errors import MoeA2AError

ALGORITHMS = ("auto", "deepseek", "deepseek_hierarchical")


def choose_algorithm(algorithm: str, num_groups: Optional[int], num_nodes: int) -> str:
    """``auto`` → ``deepseek_hierarchical`` when ``num_groups`` divides over ``num_nodes``,
    else ``deepseek``; an explicit name is returned as is (checked)."""
    if algorithm not in ALGORITHMS:
        raise MoeA2AError(f"eplb algorithm {algorithm!r} is unknown: use one of {', '.join(ALGORITHMS)}")
    if algorithm != "auto":
        return algorithm
    if num_groups is not None and num_groups >= 1 and num_groups % num_nodes == 0:
        return "deepseek_hierarchical"
    return "deepseek"


def replicate(load: torch.Tensor, num_slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spread ``X`` rows of expert loads over ``num_slots`` replicas each.

    Args:
        load: ``[X, N]`` float loads of ``N`` experts (``X`` independent rows, e.g. layers).
        num_slots: replicas per row, ``>= N``.
    Returns:
        ``(slot_expert [X, num_slots] int64, replicas [X, N] int64)``: the expert of each slot
        (slots ``0..N-1`` hold expert ``i`` itself, extra slots follow in the order they were
        granted) and every expert's replica count (``>= 1``).
    """
    rows, n = load.shape
    if num_slots < n:
        raise MoeA2AError(f"replicate: {num_slots} slots cannot hold {n} experts (one replica each)")
    load = load.to(torch.float64)
    replicas = torch.ones(rows, n, dtype=torch.int64)
    slot_expert = torch.empty(rows, num_slots, dtype=torch.int64)
    slot_expert[:, :n] = torch.arange(n)
    row_index = torch.arange(rows)
    for slot in range(n, num_slots):
        hottest = torch.argmax(load / replicas, dim=-1)  # first maximum: lowest id on ties
        slot_expert[:, slot] = hottest
        replicas[row_index, hottest] += 1
    return slot_expert, replicas


def balanced_packing(weight: torch.Tensor, num_packs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Put ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each.

    Args:
        weight: ``[X, n]`` float item weights (``X`` independent rows).
        num_packs: must divide ``n``.
    Returns:
        ``(pack [X, n], position [X, n])`` int64: each item's pack and its position in it.
    """
    rows, n = weight.shape
    if num_packs < 1 or n % num_packs:
        raise MoeA2AError(f"balanced_packing: {n} items cannot fill {num_packs} equal packs")
    per_pack = n // num_packs
    pack = torch.empty(rows, n, dtype=torch.int64)
    position = torch.empty(rows, n, dtype=torch.int64)
    if per_pack == 1:
        pack[:] = torch.arange(n)
        position.zero_()
        return pack, position
    order = torch.sort(weight.to(torch.float64), dim=-1, descending=True, stable=True).indices.tolist()
    values = weight.to(torch.float64).tolist()
    for row in range(rows):
        totals = [0.0] * num_packs
        filled = [0] * num_packs
        for item in order[row]:
            best = min((p for p in range(num_packs) if filled[p] < per_pack), key=totals.__getitem__)
            pack[row, item] = best
            position[row, item] = filled[best]
            totals[best] += values[row][item]
            filled[best] += 1
    return pack, position


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a ``[X, n]`` permutation."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())
    return inv


def rebalance(load: torch.Tensor, num_physical: int, num_gpus: int, *, num_groups: int = 1,
              num_nodes: int = 1) -> torch.Tensor:
    """The hierarchical DeepSeek placement (``num_groups = num_nodes = 1``: the flat one).

    Args:
        load: ``[L, E]`` float loads per layer and logical expert.
        num_physical: ``P`` physical slots per layer, divisible by ``num_gpus``.
        num_gpus: EP ranks (``P / num_gpus`` slots each); divisible by ``num_nodes``.
        num_groups: expert groups (contiguous ids); divides ``E`` and is divisible by
            ``num_nodes``.
        num_nodes: nodes (``num_gpus / num_nodes`` GPUs each).
    Returns:
        ``physical_to_logical [L, P]`` int64: slot ``p`` lives on GPU ``p // (P / num_gpus)``.
    """
    layers, experts = load.shape
    problems: List[str] = []
    if num_groups < 1 or experts % num_groups:
        problems.append(f"{num_groups} groups do not divide {experts} experts")
    if num_nodes < 1 or num_groups % num_nodes:
        problems.append(f"{num_groups} groups cannot be split over {num_nodes} nodes")
    if num_gpus % num_nodes:
        problems.append(f"{num_gpus} GPUs cannot be split over {num_nodes} nodes")
    if num_physical % num_gpus:
        problems.append(f"{num_physical} physical experts cannot be split over {num_gpus} GPUs")
    if num_physical < experts:
        problems.append(f"{num_physical} physical experts cannot hold {experts} logical ones")
    if problems:
        raise MoeA2AError("rebalance: " + "; ".join(problems)
                          + "; fix: use deepseek (flat) or sizes that divide evenly")
    load = load.to(torch.float64).cpu()
    group_size = experts // num_groups
    per_node_experts = experts // num_nodes
    per_node_slots = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes
    per_gpu = num_physical // num_gpus

    # 1. groups → nodes; "node order": a logical numbering where node n holds the
    #    contiguous range [n * per_node_experts, (n + 1) * per_node_experts)
    group_load = load.view(layers, num_groups, group_size).sum(-1)
    node, place = balanced_packing(group_load, num_nodes)
    first = (node * (num_groups // num_nodes) + place) * group_size  # [L, G]
    to_node_order = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)  # [L, E]
    from_node_order = _inverse(to_node_order)

    # 2. replicate inside each node: [L * nodes, per_node_experts] → per_node_slots
    node_load = load.gather(-1, from_node_order).view(-1, per_node_experts)
    slot_expert, replicas = replicate(node_load, per_node_slots)

    # 3. pack each node's replicas onto its GPUs
    replica_load = (node_load / replicas).gather(-1, slot_expert)
    gpu, place = balanced_packing(replica_load, gpus_per_node)
    final_slot = gpu * per_gpu + place              # node-local slot of each replica
    slot_of = _inverse(final_slot)                 # node-local slot → replica
    node_expert = slot_expert.gather(-1, slot_of)  # node-local slot → node-local expert
    offsets = (torch.arange(num_nodes) * per_node_experts).view(1, num_nodes, 1)
    in_node_order = (node_expert.view(layers, num_nodes, per_node_slots) + offsets).flatten(-2)
    return from_node_order.gather(-1, in_node_order)


__all__ = ["ALGORITHMS", "balanced_packing", "choose_algorithm", "rebalance", "replicate"]
