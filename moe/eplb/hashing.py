"""A counter-based hash on the device: reproducible "random" choices without a generator.

Choices that several ranks must make identically (a replica under the replicated layout,
Waterfill's rank per token) are a pure function of integers every rank knows (a seed, the
step, the layer, the row, the column). The arithmetic stays below 2**62, so int64 never
overflows, on the CPU and on CUDA alike; no host read, no generator state.
"""

from __future__ import annotations

from typing import Iterable

import torch

_MASK = 0x7FFFFFFF        # values live in [0, 2**31)
_MULT = 0x045D9F3B        # < 2**27: (2**31) * _MULT < 2**58
_COMBINE = 0x9E37         # < 2**16


def _mix(h):
    """31-bit avalanche step; ``h`` is an int64 tensor or a Python int in ``[0, 2**31)``."""
    h = ((h ^ (h >> 16)) * _MULT) & _MASK
    h = ((h ^ (h >> 16)) * _MULT) & _MASK
    return h ^ (h >> 16)


def salt(keys: Iterable[int]) -> int:
    """Fold host integers (seed, step, layer, ...) into one 31-bit salt (pure Python)."""
    h = 0x2545F491
    for key in keys:
        h = _mix(((h * _COMBINE) & _MASK) ^ (int(key) & _MASK))
    return h


def hash_index(index: torch.Tensor, salt_value: int) -> torch.Tensor:
    """``[*]`` int64 non-negative indices → ``[*]`` int64 hashes in ``[0, 2**31)``."""
    h = ((index & _MASK) * _COMBINE) & _MASK
    return _mix(h ^ (salt_value & _MASK))


__all__ = ["hash_index", "salt"]
