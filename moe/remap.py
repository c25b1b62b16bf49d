"""The one place where logical routing becomes physical: ``LogicalTopK`` → ``PhysicalTopK``.

Two things can separate what the router chose from what dispatchers move:

* EPLB's placement: a logical expert may have several physical replicas (``E_physical =
  E + redundant``), and each token's column is sent to one of them;
* fused shared experts: the shared expert computed as extra top-k columns.

A :class:`TopKRemap` does both for one layer. :class:`IdentityRemap` (no EPLB, no fused
shared columns) keeps ids and weights as they are. Observers (capture, the EPLB recorder) see
the ``LogicalTopK`` before any remap.
"""

from __future__ import annotations

from typing import Protocol

from moe_a2a.dispatchers.batch import PhysicalTopK
from moe_a2a.errors import MoeA2AError
from moe_a2a.routing import LogicalTopK


class TopKRemap(Protocol):
    """Turns one layer's logical choice into physical dispatch ids.

    Attributes:
        num_physical_experts: ``E_physical``, the experts dispatchers place over EP ranks.
        extra_columns: columns appended to every token (fused shared experts); dispatchers
            are built for ``top_k + extra_columns`` columns.
    """

    num_physical_experts: int
    extra_columns: int

    def to_physical(self, topk: LogicalTopK, layer_id: int) -> PhysicalTopK: ...


class IdentityRemap:
    """Physical = logical: no replicas, no fused shared columns."""

    extra_columns = 0

    def __init__(self, num_experts: int) -> None:
        if not isinstance(num_experts, int) or num_experts < 1:
            raise MoeA2AError(f"IdentityRemap: num_experts={num_experts!r} must be an int >= 1")
        self.num_physical_experts = num_experts

    def to_physical(self, topk: LogicalTopK, layer_id: int) -> PhysicalTopK:
        return PhysicalTopK(ids=topk.ids, weights=topk.weights)


__all__ = ["IdentityRemap", "TopKRemap"]
