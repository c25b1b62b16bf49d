"""moe-a2a: the communication layer of Mixture-of-Experts models under expert parallelism.

Subpackages: ``moe_a2a.backends`` (registry, capability data), ``moe_a2a.dispatchers`` (token
movement), ``moe_a2a.server_args`` (flags, variables, resolution). The model side lives here:
routing, experts, the ``EPMoE`` layer, the parallel context, the command line.

Importing ``moe_a2a`` imports neither torch nor any kernel package: the public names below are
loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

from moe_a2a._version import __version__

# public name -> (module, attribute), imported lazily (PEP 562)
_LAZY: Dict[str, Tuple[str, str]] = {
    "resolve": ("moe_a2a.server_args", "resolve"),
    "ServerArgs": ("moe_a2a.server_args", "ServerArgs"),
    "ConfigError": ("moe_a2a.server_args", "ConfigError"),
    "register_backend": ("moe_a2a.backends", "register_backend"),
    "get_backend": ("moe_a2a.backends", "get_backend"),
    "MoeA2ABackend": ("moe_a2a.backends", "MoeA2ABackend"),
    "EPMoE": ("moe_a2a.layer", "EPMoE"),
    "RouterConfig": ("moe_a2a.routing", "RouterConfig"),
    "MoEWeights": ("moe_a2a.weights", "MoEWeights"),
    "ParallelSizes": ("moe_a2a.parallel", "ParallelSizes"),
    "make_parallel_context": ("moe_a2a.parallel", "make_parallel_context"),
    "MoeA2AError": ("moe_a2a.errors", "MoeA2AError"),
    "encode_routed_experts": ("moe_a2a.routed_experts_wire", "encode_routed_experts"),
    "encode_routed_experts_base64": ("moe_a2a.routed_experts_wire", "encode_routed_experts_base64"),
    "decode_routed_experts": ("moe_a2a.routed_experts_wire", "decode_routed_experts"),
    "decode_routed_experts_pure": ("moe_a2a.routed_experts_wire", "decode_routed_experts_pure"),
    "RoutedExpertsCapturer": ("moe_a2a.routed_experts", "RoutedExpertsCapturer"),
    "capture_sizes": ("moe_a2a.routed_experts", "capture_sizes"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'moe_a2a' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
