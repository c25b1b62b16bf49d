"""Dispatchers: move tokens to the ranks that own their experts and back (torch only).

Optional kernels (``deep_ep``, ``deep_gemm``) are imported lazily inside the backends that
need them, never at package import.
"""

from moe_a2a.dispatchers.base import (
    BaseDispatcher,
    DispatcherSetup,
    ExpertPlacement,
    Pending,
    ResourceOwner,
)
from moe_a2a.dispatchers.batch import BatchInfo, ForwardMode, PhysicalTopK, TopK, agree_batch
from moe_a2a.dispatchers.communicator import CommSetup, Communicator
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.fused import FusedMoE
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.dispatchers.outputs import (
    CombineInput,
    DeepEPLowLatencyOutput,
    DeepEPNormalOutput,
    DispatchFormat,
    DispatchOutput,
    StandardDispatchOutput,
)

__all__ = [
    "BaseDispatcher",
    "BatchInfo",
    "CombineInput",
    "CommGroups",
    "CommSetup",
    "Communicator",
    "DeepEPLowLatencyOutput",
    "DeepEPNormalOutput",
    "DispatchFormat",
    "DispatchOutput",
    "DispatcherError",
    "DispatcherSetup",
    "ExpertPlacement",
    "ForwardMode",
    "FusedMoE",
    "Pending",
    "PhysicalTopK",
    "ResourceOwner",
    "StandardDispatchOutput",
    "TopK",
    "agree_batch",
]
