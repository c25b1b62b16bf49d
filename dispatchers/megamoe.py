"""The ``megamoe`` backend: DeepGEMM's fused Mega-MoE kernel as a ``FusedMoE``.

Not built yet: this release lands the fused-path seam (``FusedMoE``, the spec's fallback and
capacity rule decided per step on every rank). Until the kernel lands, building it raises a
clear error and ``moe-a2a backends`` reports it as not built.
"""

from __future__ import annotations

from typing import Tuple

import torch

from moe_a2a.dispatchers.base import DispatcherSetup
from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.fused import FusedMoE, LocalExpertWeightsLike

NOT_BUILT = ("the megamoe backend is not built in this release (the DeepGEMM Mega-MoE kernel "
             "comes with the 'DeepEP and Mega-MoE backends' capability); use --moe-a2a-backend "
             "none meanwhile")


class MegaMoE(FusedMoE):
    """DeepGEMM Mega-MoE: fused dispatch + expert GEMMs + combine (not built yet)."""

    @classmethod
    def check_runnable(cls, device: str) -> Tuple[bool, str]:
        return False, NOT_BUILT

    def __init__(self, setup: DispatcherSetup) -> None:
        raise DispatcherError(NOT_BUILT)

    def prepare_weights(self, weights: LocalExpertWeightsLike) -> None:
        raise DispatcherError(NOT_BUILT)

    def forward(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                batch: BatchInfo) -> torch.Tensor:
        raise DispatcherError(NOT_BUILT)
