"""Moving expert weights between EP ranks when the placement changes.

Every rank computes the same plan from the old and the new placement: each new slot is filled
from a copy on the same rank when it has one (no traffic), else from a rank that held the
expert (the holders take turns, so one rank does not serve every copy). The weights then move
in one exact-split ``all_to_all_single`` per chunk of layers over the EP group (the ranks with
the same moe-TP slice), each expert as one row ``[w_gate | w_up | w_down]`` of this rank's
slice. Only layers whose placement changed take part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from moe_a2a.dispatchers.collectives import all_to_all_v
from moe_a2a.eplb.location import ExpertLocation
from moe_a2a.errors import MoeA2AError


@dataclass(frozen=True)
class SlotMove:
    """Fill local slot ``slot`` of rank ``dst`` in ``layer`` from local slot ``src_slot`` of
    rank ``src`` (the same rank: a local copy)."""

    layer: int
    dst: int
    slot: int
    src: int
    src_slot: int


def plan_moves(old: ExpertLocation, new: ExpertLocation, layers: Sequence[int]) -> List[SlotMove]:
    """One ``SlotMove`` per slot of ``layers`` in the new placement (identical on every rank)."""
    if (old.num_physical_experts, old.ep_size) != (new.num_physical_experts, new.ep_size):
        raise MoeA2AError("plan_moves: the placements differ in size; a rebalance keeps P and ep")
    per_gpu = new.num_local_physical_experts
    moves: List[SlotMove] = []
    for layer in layers:
        new_row = new.physical_to_logical[layer].tolist()
        holders: Dict[int, List[int]] = {}
        for slot, expert in enumerate(old.physical_to_logical[layer].tolist()):
            holders.setdefault(expert, []).append(slot)
        for physical, expert in enumerate(new_row):
            dst, slot = divmod(physical, per_gpu)
            copies = holders[expert]
            here = [s for s in copies if s // per_gpu == dst]
            source = here[0] if here else copies[(dst + slot + layer) % len(copies)]
            moves.append(SlotMove(layer=layer, dst=dst, slot=slot, src=source // per_gpu,
                                  src_slot=source % per_gpu))
    return moves


def move_expert_weights(views: Dict[int, Sequence[torch.Tensor]], moves: Sequence[SlotMove], *,
                        ep_rank: int, ep_size: int, group, layers_per_chunk: Optional[int] = None) -> int:
    """Execute ``moves`` in place (collective over the EP ``group``: every rank calls it).

    Args:
        views: layer → this rank's routed slot views ``[w_gate, w_up, w_down]``, each
            ``[slots, ...]`` (``EPMoE.get_moe_weights``), overwritten with the new placement.
        moves: ``plan_moves`` output (all ranks').
        layers_per_chunk: layers per all-to-all (None: all at once); bounds the buffer size.
    Returns:
        the number of slots this rank received from another rank.
    """
    layers = sorted({m.layer for m in moves})
    chunk = layers_per_chunk or max(1, len(layers))
    received = 0
    for start in range(0, len(layers), chunk):
        part = set(layers[start:start + chunk])
        received += _move_chunk(views, [m for m in moves if m.layer in part], ep_rank, ep_size, group)
    return received


def _move_chunk(views: Dict[int, Sequence[torch.Tensor]], moves: Sequence[SlotMove], me: int,
                ep_size: int, group) -> int:
    sends = sorted((m for m in moves if m.src == me and m.dst != me), key=lambda m: (m.dst, m.layer, m.slot))
    recvs = sorted((m for m in moves if m.dst == me and m.src != me), key=lambda m: (m.src, m.layer, m.slot))
    some = next(iter(views.values()))
    width = sum(w[0].numel() for w in some)
    dtype, device = some[0].dtype, some[0].device

    def row(layer: int, slot: int) -> torch.Tensor:
        return torch.cat([w[slot].reshape(-1) for w in views[layer]])

    send = (torch.stack([row(m.layer, m.src_slot) for m in sends]) if sends
            else torch.empty(0, width, dtype=dtype, device=device))
    send_splits = [sum(1 for m in sends if m.dst == r) for r in range(ep_size)]
    recv_splits = [sum(1 for m in recvs if m.src == r) for r in range(ep_size)]
    got = all_to_all_v(send, recv_splits, send_splits, group)
    # build every changed layer's new slots before writing any (local copies may permute)
    fresh: Dict[int, List[torch.Tensor]] = {}
    for layer in sorted({m.layer for m in moves if m.dst == me}):
        fresh[layer] = [torch.empty_like(w) for w in views[layer]]
    for m in moves:
        if m.dst == me and m.src == me:
            for new, old in zip(fresh[m.layer], views[m.layer]):
                new[m.slot].copy_(old[m.src_slot])
    for index, m in enumerate(recvs):
        offset = 0
        for new in fresh[m.layer]:
            n = new[m.slot].numel()
            new[m.slot].copy_(got[index, offset:offset + n].view_as(new[m.slot]))
            offset += n
    for layer, tensors in fresh.items():
        for view, new in zip(views[layer], tensors):
            view.copy_(new)
    return len(recvs)


def changed_layers(old: ExpertLocation, new: ExpertLocation) -> Tuple[int, ...]:
    return tuple(int(i) for i in (~old.same_as(new)).nonzero().flatten())


__all__ = ["SlotMove", "changed_layers", "move_expert_weights", "plan_moves"]
