"""Backend names: the closed enum of built-ins, and the SGLang names this library lacks."""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from moe_a2a.backends.errors import UnknownBackendError
from moe_a2a.backends.spec import normalize_name

if TYPE_CHECKING:
    from moe_a2a.backends.spec import BackendSpec


class MoeA2ABackend(str, enum.Enum):
    """The built-in backends (closed; custom backends are registry names, not members).

    ``MoeA2ABackend(None)`` is ``NONE`` (SGLang's default), and lookups are normalised:
    ``MoeA2ABackend("DeepEP")`` is ``DEEPEP``.
    """

    NONE = "none"
    ALLTOALL = "alltoall"
    DEEPEP = "deepep"
    MEGAMOE = "megamoe"

    def __str__(self) -> str:  # "deepep", not "MoeA2ABackend.DEEPEP", in messages and f-strings
        return self.value

    @classmethod
    def _missing_(cls, value: Any) -> "MoeA2ABackend":
        if value is None:
            return cls.NONE
        if isinstance(value, str):
            normalised = normalize_name(value)
            for member in cls:
                if member.value == normalised:
                    return member
        raise UnknownBackendError(
            f"{value!r} is not a built-in MoE A2A backend (built-ins: "
            f"{', '.join(m.value for m in cls)}); fix: use one of those, or backends.get_backend() "
            f"for backends registered with register_backend or the 'moe_a2a.backends' entry points"
        )

    @property
    def spec(self) -> "BackendSpec":
        """The registered spec of this built-in."""
        from moe_a2a.backends.registry import get_backend  # lazy: the registry imports this module

        return get_backend(self)


BUILTIN_NAMES = tuple(m.value for m in MoeA2ABackend)

# A2A backends SGLang offers that moe-a2a does not ship: asking for one gets a specific
# message (not "unknown") so that users moving launch scripts over know what happened.
SGLANG_ONLY_BACKENDS: Mapping[str, str] = MappingProxyType({
    "mooncake": "Mooncake EP",
    "nixl": "NIXL EP",
    "mori": "MORI EP (AMD)",
    "ascend_fuseep": "Ascend fused EP (NPU)",
    "flashinfer": "FlashInfer all-to-all",
    "deepep_v2": "DeepEP v2",
    "pplx": "pplx-kernels all-to-all",
    "ascend_tp": "Ascend tensor-parallel MoE (NPU)",          # SGLang 0.5.23
    "flashinfer_megamoe": "FlashInfer Mega-MoE (SM100)",      # SGLang 0.5.23
})
