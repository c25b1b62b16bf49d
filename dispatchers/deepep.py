"""The ``deepep`` backend: DeepEP's normal and low-latency kernels (``deep_ep.Buffer``).

Not built yet: this release lands the seams it plugs into (``DeepEPNormalOutput``,
``DeepEPLowLatencyOutput``, ``BatchInfo`` for ``auto``, the per-process communicator that will
own the one ``deep_ep.Buffer``). Until the kernels land, building it raises a clear error and
``moe-a2a backends`` reports it as not built, so a machine that has ``deep_ep`` is never told
to install it.
"""

from __future__ import annotations

from typing import Tuple

import torch

from moe_a2a.dispatchers.base import BaseDispatcher, DispatcherSetup
from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.outputs import CombineInput, DeepEPNormalOutput, DispatchOutput

NOT_BUILT = ("the deepep dispatcher is not built in this release (DeepEP normal/low-latency "
             "kernels come with the 'DeepEP and Mega-MoE backends' capability); use "
             "--moe-a2a-backend alltoall meanwhile")


class DeepEPDispatcher(BaseDispatcher):
    """DeepEP dispatch/combine over one ``deep_ep.Buffer`` per process (not built yet)."""

    output_class = DeepEPNormalOutput  # and DeepEPLowLatencyOutput in low-latency steps
    token_layout = "scattered"

    @classmethod
    def check_runnable(cls, device: str) -> Tuple[bool, str]:
        return False, NOT_BUILT

    def __init__(self, setup: DispatcherSetup) -> None:
        raise DispatcherError(NOT_BUILT)

    def dispatch(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                 batch: BatchInfo) -> DispatchOutput:
        raise DispatcherError(NOT_BUILT)

    def combine(self, combine_input: CombineInput, *, batch: BatchInfo) -> torch.Tensor:
        raise DispatcherError(NOT_BUILT)
