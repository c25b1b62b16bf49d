"""What ``moe-a2a run`` builds and runs, as plain frozen data (no torch import: the CLI
reads the defaults from here without paying for torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

#: ``--seed`` takes any unsigned 64-bit value; per-step and per-layer seeds derive from it
#: modulo 2**63 (what ``torch.Generator.manual_seed`` takes without overflow).
SEED_BITS = 64
_DERIVED_MODULUS = 1 << 63

#: ``--collective-timeout`` default: generous for slow CPU ranks, still finite.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


def derived_seed(seed: int, multiplier: int, offset: int) -> int:
    """``seed * multiplier + offset``, kept in range for ``torch.Generator.manual_seed``
    (unchanged for every seed small enough not to overflow)."""
    return (seed * multiplier + offset) % _DERIVED_MODULUS


@dataclass(frozen=True)
class ModelShape:
    """The layer stack ``moe-a2a run`` builds (DeepSeek-style unless ``hf_config`` is set)."""

    num_experts: int = 16
    top_k: int = 4
    hidden_size: int = 128
    intermediate_size: int = 64
    shared_intermediate_size: int = 64      # one shared expert; 0 = none
    num_layers: int = 2
    n_group: Optional[int] = None           # None = adapt to num_experts/top_k
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 2.5
    hf_config: Optional[str] = None


@dataclass(frozen=True)
class RunPlan:
    """Everything a rank needs; sent to workers as picklable data."""

    args_json: str                 # resolved ServerArgs (workers never re-read the environment)
    shape: ModelShape
    num_tokens: int = 32           # largest batch one DP rank gets in a step
    steps: int = 4
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True
    routing_skew: float = 0.0      # bias the router towards a few experts (EPLB demos)
    routed_experts_output: Optional[str] = None  # JSON file for the captured blobs
    # moe_a2a.testing emulations every rank installs (``--emulate-kernels``), and the compute
    # capability they report off GPU
    emulate_kernels: Tuple[str, ...] = ()
    emulated_capability: Tuple[int, int] = (10, 0)
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S  # process-group timeout
    plugins: Tuple[str, ...] = ()  # --plugin modules, imported on every rank
