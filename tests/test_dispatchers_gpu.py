"""The dispatcher checks over nccl, one process per GPU (marked ``gpu``: skipped without CUDA).

Without pytest, on a GPU machine: ``python tests/dispatcher_checks.py 2 4``.
"""

from __future__ import annotations

import pytest
import torch

import dispatcher_checks as checks


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_dispatchers_over_nccl(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, found {torch.cuda.device_count()}")
    assert len(checks.run_nccl(world)) == world
