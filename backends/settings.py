"""Typed backend settings: each backend's own knobs as a small frozen pydantic model.

The resolver builds a backend's settings from the resolved server arguments through the
spec's ``settings_fields`` (settings attribute -> server-argument field); dispatchers receive
the instance and read its attributes. Capacities and modes are described as data
(:class:`CapacityRule`, ``BackendSpec.mode_setting``) so that the resolver checks any backend,
built-in or third-party, without knowing its name.

Importing this module imports pydantic, never torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

from moe_a2a.backends.errors import InvalidBackendError

# Which batches a capacity must hold (SPEC §3.3 rule 9):
#   "all"      every batch, prefill chunks included (the kernel runs every step);
#   "decode"   the largest decode batch (CUDA-graph batch, running requests / dp);
#   "captured" only CUDA-graph captured batches (eager batches above it take a fallback).
CapacityBatches = Literal["all", "decode", "captured"]
CAPACITY_BATCHES: Tuple[str, ...] = ("all", "decode", "captured")


class BackendSettings(BaseModel):
    """Base of every backend's settings: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NoSettings(BackendSettings):
    """A backend without knobs (``none``, ``alltoall``)."""


class DeepEPSettings(BackendSettings):
    """Knobs of the ``deepep`` backend.

    Attributes:
        mode: ``normal`` (prefill kernels), ``low_latency`` (decode kernels, fixed-size
            buffers) or ``auto`` (normal when any rank prefills, else low_latency).
        config: ``--deepep-config`` parsed: DeepEP ``Config`` overrides for the normal-mode
            kernels (e.g. ``{"normal_dispatch": {...}, "normal_combine": {...}}``), or None.
        num_max_dispatch_tokens_per_rank: low-latency capacity, tokens one rank dispatches.
        fp8_dispatch: move activations as FP8 (e4m3, per-token 128-channel float32 scales) in
            both modes; the experts runner dequantises (no server flag: set it when building
            a ``DispatcherSetup`` yourself).
    """

    mode: Literal["normal", "low_latency", "auto"] = "auto"
    config: Optional[Dict[str, Any]] = None
    num_max_dispatch_tokens_per_rank: int = Field(default=128, ge=1, le=1024)
    fp8_dispatch: bool = False


class MegaMoESettings(BackendSettings):
    """Knobs of the ``megamoe`` backend.

    Attributes:
        num_max_tokens_per_rank: the fused kernel's capacity; a step whose DP-global largest
            per-rank batch exceeds it takes the fallback (standard) path on every rank.
        fix_memory: the fused and fallback paths share one copy of the expert weights.
    """

    num_max_tokens_per_rank: int = Field(default=1024, ge=1)
    fix_memory: bool = True


@dataclass(frozen=True)
class CapacityRule:
    """A per-rank capacity of a backend, as data the resolver and the layer check.

    Attributes:
        setting: the settings attribute holding the capacity (tokens one rank's kernel takes).
        batches: which batches it must hold (see ``CAPACITY_BATCHES``).
        modes: the modes in which the rule applies (None: every mode).
        over_capacity: ``"error"`` (a batch above it is refused, naming the flag) or
            ``"fallback"`` (the step runs the spec's fallback backend instead, on every rank).
    """

    setting: str
    batches: CapacityBatches
    modes: Optional[Tuple[str, ...]] = None
    over_capacity: Literal["error", "fallback"] = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.setting, str) or not self.setting.isidentifier():
            raise InvalidBackendError(
                f"CapacityRule.setting={self.setting!r} must name a settings attribute; "
                f"fix: e.g. CapacityRule('num_max_tokens_per_rank', batches='decode')")
        if self.batches not in CAPACITY_BATCHES:
            raise InvalidBackendError(
                f"CapacityRule.batches={self.batches!r} is not one of {', '.join(CAPACITY_BATCHES)}")
        if self.over_capacity not in ("error", "fallback"):
            raise InvalidBackendError(
                f"CapacityRule.over_capacity={self.over_capacity!r} must be 'error' or 'fallback'")
        if self.modes is not None:
            object.__setattr__(self, "modes", tuple(str(m).lower() for m in self.modes))

    def applies(self, mode: str) -> bool:
        return self.modes is None or mode in self.modes


def is_settings_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BackendSettings)


__all__ = [
    "CAPACITY_BATCHES",
    "BackendSettings",
    "CapacityRule",
    "DeepEPSettings",
    "MegaMoESettings",
    "NoSettings",
    "is_settings_class",
]
