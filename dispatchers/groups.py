"""The process groups a dispatcher talks over, as one frozen value.

``moe_a2a.parallel`` creates the groups from the resolved server arguments; dispatchers only
read them. Rank layout over the world (``tp_size`` ranks), following SGLang:

* attention:   ``dp_rank = rank // attn_tp_size``, ``attn_tp_rank = rank % attn_tp_size``
* experts:     ``ep_rank = rank // moe_tp_size``,  ``moe_tp_rank = rank % moe_tp_size``

A size-1 group is ``None``: single-rank code paths issue no collective at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so CPU-only fakes can stand in


@dataclass(frozen=True)
class CommGroups:
    """Ranks and groups of one process.

    Attributes:
        rank / world_size: position in the TP (= world) group.
        world_group: all ranks; partial MoE outputs of the replicated path are summed over it.
        ep_group / ep_rank / ep_size: ranks that split the experts.
        moe_tp_group / moe_tp_rank / moe_tp_size: ranks that split one expert's intermediate dim.
        attn_tp_group / attn_tp_rank / attn_tp_size: ranks that share one DP rank's tokens.
        attn_dp_group / dp_rank / dp_size: ranks with the same ``attn_tp_rank`` across DP ranks
            (one per DP rank); used to gather and scatter DP batches.
        dp_attention: attention is data parallel (``dp_size > 1``).
        backend: torch.distributed backend name (``"gloo"``, ``"nccl"``) or ``"none"``.
    """

    rank: int = 0
    world_size: int = 1
    world_group: Optional[ProcessGroup] = None
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Optional[ProcessGroup] = None
    moe_tp_rank: int = 0
    moe_tp_size: int = 1
    moe_tp_group: Optional[ProcessGroup] = None
    attn_tp_rank: int = 0
    attn_tp_size: int = 1
    attn_tp_group: Optional[ProcessGroup] = None
    dp_rank: int = 0
    dp_size: int = 1
    attn_dp_group: Optional[ProcessGroup] = None
    dp_attention: bool = False
    backend: str = "none"

    @classmethod
    def single(cls) -> "CommGroups":
        """One process, no communication."""
        return cls()
