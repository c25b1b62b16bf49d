"""Fused shared experts: the shared expert computed as extra top-k columns.

The physical layout interleaves ``S`` shared slots after each EP rank's ``L`` routed slots
(``L = P_routed / ep``), so the dispatchers' contiguous placement still holds::

    rank:        0                         1                      ...  ep-1
    slots:   [r0 .. r(L-1) | s0..s(S-1)] [rL .. r(2L-1) | s0..]  ...
    ids:      0 .. L-1       L..L+S-1     L+S .. 2L+S-1  ...

    routed physical id e      ->  e + (e // L) * S
    shared column j to rank r ->  r * (L + S) + L + j

Every rank holds its own copy of the shared expert in its shared slots; a token's shared
column goes to one rank: its own rank under a scattered layout (no traffic), a row-dependent
rank under the replicated layout (every attention-TP rank must name the same slot), or the
least-loaded rank with Waterfill. A shared expert with ``Is = S * I`` intermediate size is cut
into ``S`` slots of the routed experts' size (SwiGLU is a sum over the intermediate dimension).

Weights: SGLang scales routed outputs by ``routed_scaling_factor`` *after* combine, so its
shared column carries ``1 / routed_scaling_factor``; here the router's weights already include
the factor and nothing scales afterwards, so the column carries 1.0
(``shared_column_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Union

import torch

from moe_a2a.errors import MoeA2AError
from moe_a2a.weights import MoEWeights, SharedExpertWeights


def shared_column_weight(routed_scaling_factor: float, scaled_after_combine: bool = False) -> float:
    """The fused shared column's weight: ``1 / routed_scaling_factor`` when the routed output
    is scaled after combine (SGLang's convention), else 1.0 (this library's router)."""
    if not scaled_after_combine or routed_scaling_factor == 0:
        return 1.0
    return 1.0 / routed_scaling_factor


@dataclass(frozen=True, kw_only=True)
class FusedTopK:
    """Top-k with the shared column(s) appended, in the interleaved physical layout.

    Attributes:
        dispatch_ids: ``[T, K + S]`` int64 interleaved physical ids (``-1`` kept as ``-1``;
            a token with no routed expert gets ``-1`` shared columns too).
        dispatch_weights: ``[T, K + S]`` float32 (0 where the id is ``-1``).
        recorder_ids: ``[T, K]`` int64 routed ids before interleaving (what statistics count;
            the fused columns never appear in them).
    """

    dispatch_ids: torch.Tensor
    dispatch_weights: torch.Tensor
    recorder_ids: torch.Tensor


def interleave_routed(ids: torch.Tensor, routed_per_rank: int, num_shared: int) -> torch.Tensor:
    """Routed physical ids → interleaved ids (``-1`` stays ``-1``)."""
    moved = ids + torch.div(ids, routed_per_rank, rounding_mode="floor") * num_shared
    return torch.where(ids >= 0, moved, ids)


def fuse_shared_experts(topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                        num_physical_routed_experts: int, ep_size: int,
                        target_rank: Union[int, torch.Tensor], num_shared: int = 1,
                        shared_weight: float = 1.0) -> FusedTopK:
    """Append ``num_shared`` shared columns and interleave the routed ids.

    Args:
        topk_ids: ``[T, K]`` int64 physical routed ids in ``[0, P_routed)``, ``-1`` = none.
        topk_weights: ``[T, K]`` float32.
        num_physical_routed_experts: ``P_routed`` (divisible by ``ep_size``).
        ep_size: EP ranks.
        target_rank: the rank computing each token's shared expert: an int (every token) or
            ``[T]`` int64.
        num_shared: ``S`` shared slots per rank.
        shared_weight: the shared columns' weight (see ``shared_column_weight``).
    """
    if num_physical_routed_experts % ep_size:
        raise MoeA2AError(f"{num_physical_routed_experts} physical routed experts cannot be "
                          f"split over ep {ep_size}")
    per_rank = num_physical_routed_experts // ep_size
    num_tokens = int(topk_ids.shape[0])
    device = topk_ids.device
    has_routed = (topk_ids >= 0).any(dim=1, keepdim=True)                       # [T, 1]
    rank = torch.as_tensor(target_rank, dtype=torch.int64, device=device).expand(num_tokens)
    first = (rank * (per_rank + num_shared) + per_rank).unsqueeze(1)            # [T, 1]
    shared_ids = first + torch.arange(num_shared, device=device)                # [T, S]
    shared_ids = torch.where(has_routed, shared_ids, torch.full_like(shared_ids, -1))
    shared_w = torch.where(has_routed, torch.full((num_tokens, num_shared), float(shared_weight),
                                                  dtype=torch.float32, device=device),
                           torch.zeros((), dtype=torch.float32, device=device))
    routed_w = torch.where(topk_ids >= 0, topk_weights.to(torch.float32),
                           torch.zeros((), dtype=torch.float32, device=device))
    return FusedTopK(
        dispatch_ids=torch.cat([interleave_routed(topk_ids, per_rank, num_shared), shared_ids], 1),
        dispatch_weights=torch.cat([routed_w, shared_w], 1),
        recorder_ids=topk_ids)


def _shared_expert(weights: MoEWeights) -> SharedExpertWeights:
    if weights.shared is None:
        raise MoeA2AError("shared-experts fusion needs a shared expert, but the weights have "
                          "none; fix: drop --enforce-shared-experts-fusion (or give one)")
    return weights.shared


def shared_slots_needed(weights: MoEWeights) -> int:
    """``S``: slots of the routed experts' size the shared expert fills (``Is / I``)."""
    shared, routed = _shared_expert(weights).intermediate_size, weights.intermediate_size
    if shared % routed:
        raise MoeA2AError(f"shared-experts fusion cuts the shared expert (intermediate size "
                          f"{shared}) into slots of the routed experts' size {routed}: {shared} "
                          f"is not a multiple of {routed}; fix: use a shared intermediate size "
                          f"that is, or --disable-shared-experts-fusion")
    return shared // routed


def fused_physical_weights(weights: MoEWeights, ep_size: int) -> MoEWeights:
    """Physical routed weights (``P_routed`` slots, see ``MoEWeights.physical``) → the
    interleaved layout with every rank's shared slots; ``shared`` becomes None (it is computed
    as columns), ``physical_to_logical`` marks shared slots ``-1``."""
    num_shared = shared_slots_needed(weights)
    routed = weights.num_experts
    if routed % ep_size:
        raise MoeA2AError(f"{routed} physical routed experts cannot be split over ep {ep_size}")
    per_rank = routed // ep_size
    inter = weights.intermediate_size
    s = _shared_expert(weights)
    shared_gate = s.w_gate.view(num_shared, inter, -1)
    shared_up = s.w_up.view(num_shared, inter, -1)
    shared_down = s.w_down.view(s.w_down.shape[0], num_shared, inter).transpose(0, 1)
    p2l = weights.physical_to_logical
    if p2l is None:
        p2l = torch.arange(routed)
    parts: Dict[str, List[torch.Tensor]] = {"w_gate": [], "w_up": [], "w_down": [], "p2l": []}
    for rank in range(ep_size):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        parts["w_gate"] += [weights.w_gate[rows], shared_gate.to(weights.dtype)]
        parts["w_up"] += [weights.w_up[rows], shared_up.to(weights.dtype)]
        parts["w_down"] += [weights.w_down[rows], shared_down.to(weights.dtype)]
        parts["p2l"] += [p2l[rows], torch.full((num_shared,), -1, dtype=torch.int64)]
    return MoEWeights(gate=weights.gate, correction_bias=weights.correction_bias,
                      w_gate=torch.cat(parts["w_gate"]).contiguous(),
                      w_up=torch.cat(parts["w_up"]).contiguous(),
                      w_down=torch.cat(parts["w_down"]).contiguous(),
                      shared=None, physical_to_logical=torch.cat(parts["p2l"]))


__all__ = ["FusedTopK", "fuse_shared_experts", "fused_physical_weights", "interleave_routed",
           "shared_column_weight", "shared_slots_needed"]
