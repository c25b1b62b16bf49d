"""Dispatchers: move tokens to the ranks that own their experts and back (torch only).

Optional kernels (``deep_ep``, ``deep_gemm``) are imported lazily inside the dispatchers
that need them, never at package import.
"""

from moe_a2a.dispatchers.base import (
    BaseDispatcher,
    CombineInput,
    DispatcherSetup,
    DispatchFormat,
    DispatchOutput,
    ExpertPlacement,
    TopK,
)
from moe_a2a.dispatchers.groups import CommGroups

__all__ = [
    "BaseDispatcher",
    "CombineInput",
    "CommGroups",
    "DispatcherSetup",
    "DispatchFormat",
    "DispatchOutput",
    "ExpertPlacement",
    "TopK",
]
