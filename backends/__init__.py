"""MoE all-to-all backends: the registry, backend specs and their capability data.

Everything a model or the resolver needs to know about a backend is data on its
:class:`BackendSpec` (layout, EP policy, modes, devices, requirements); code asks the spec and
never compares names. Importing this package imports neither torch, ``deep_ep`` nor
``deep_gemm``; availability checks import them lazily.
"""

from moe_a2a.backends.availability import (
    BackendAvailability,
    available_backends,
    check_availability,
    ensure_available,
)
from moe_a2a.backends.errors import (
    BackendConflictError,
    BackendEntryPointError,
    BackendError,
    BackendUnavailableError,
    InvalidBackendError,
    ReservedBackendNameError,
    UnknownBackendError,
)
from moe_a2a.backends.names import BUILTIN_NAMES, SGLANG_ONLY_BACKENDS, MoeA2ABackend
from moe_a2a.backends.registry import (
    ENTRY_POINT_GROUP,
    REGISTRY,
    BackendRegistry,
    backend_names,
    entry_point_errors,
    get_backend,
    list_backends,
    load_entry_points,
    register_backend,
    registry_snapshot,
)
from moe_a2a.backends.settings import (
    BackendSettings,
    CapacityRule,
    DeepEPSettings,
    MegaMoESettings,
    NoSettings,
)
from moe_a2a.backends.spec import (
    DEVICES,
    EP_POLICIES,
    TOKEN_LAYOUTS,
    WATERFILL,
    BackendSpec,
    Requirement,
    normalize_name,
)

__all__ = [
    "BUILTIN_NAMES",
    "DEVICES",
    "ENTRY_POINT_GROUP",
    "EP_POLICIES",
    "REGISTRY",
    "SGLANG_ONLY_BACKENDS",
    "TOKEN_LAYOUTS",
    "WATERFILL",
    "BackendAvailability",
    "BackendSettings",
    "CapacityRule",
    "DeepEPSettings",
    "MegaMoESettings",
    "NoSettings",
    "BackendConflictError",
    "BackendEntryPointError",
    "BackendError",
    "BackendRegistry",
    "BackendSpec",
    "BackendUnavailableError",
    "InvalidBackendError",
    "MoeA2ABackend",
    "Requirement",
    "ReservedBackendNameError",
    "UnknownBackendError",
    "available_backends",
    "backend_names",
    "check_availability",
    "ensure_available",
    "entry_point_errors",
    "get_backend",
    "list_backends",
    "load_entry_points",
    "normalize_name",
    "register_backend",
    "registry_snapshot",
]
