"""Rank functions for the ``moe-a2a bench`` tests (run on the shared gloo pools)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

import v2_backends
from moe_a2a.backends import register_backend
from moe_a2a.bench import BenchPlan, bench_on_group
from moe_a2a.dispatchers.alltoall import AllToAllDispatcher
from moe_a2a.run_plan import ModelShape
from moe_a2a.server_args import resolve


class DoubledCombine(AllToAllDispatcher):
    """Moves tokens like ``alltoall`` but returns twice the right answer (a wrong backend)."""

    def combine(self, combine_input, *, batch):
        return super().combine(combine_input, batch=batch) * 2


def register_test_backends() -> None:
    """The contract-v2 test backends and a wrong one (idempotent)."""
    v2_backends.register_all()
    register_backend("test_wrong", DoubledCombine, token_layout="scattered", ep_policy="tp",
                     devices=("cpu",), description="test: a backend with a wrong combine")


def bench_case(rank: int, world: int, backends: List[Dict[str, Any]], sizes, **plan_kw) -> Dict[str, Any]:
    """``bench_on_group`` on this pool: ``backends`` lists each backend's server arguments."""
    register_test_backends()
    args = [resolve(env={}, tp_size=world, **kw) for kw in backends]
    plan = BenchPlan(backends=tuple(a.moe_a2a_backend for a in args),
                     args_json=tuple(a.to_json() for a in args),
                     shape=ModelShape(num_experts=4 * world, top_k=3, hidden_size=32,
                                      intermediate_size=16, n_group=1, topk_group=1),
                     num_tokens=tuple(sizes), progress=False, **plan_kw)
    return bench_on_group(plan, rank, world, torch.device("cpu"))
