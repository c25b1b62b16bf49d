"""Helpers for testing code built on moe-a2a on a CPU: a reusable pool of gloo ranks, and
importable emulations of the ``deep_ep`` / ``deep_gemm`` kernel packages.

The pytest fixture ``emulated_kernels`` lives in ``moe_a2a.testing.pytest_plugin`` (add
``pytest_plugins = ["moe_a2a.testing.pytest_plugin"]`` to a ``conftest.py``).
"""

from moe_a2a.testing.distributed import RankFailed, RankPool
from moe_a2a.testing.kernel_emulation import (
    EMULATED_PACKAGES,
    EmulationInfo,
    emulate_kernels,
)

__all__ = ["EMULATED_PACKAGES", "EmulationInfo", "RankFailed", "RankPool", "emulate_kernels"]
