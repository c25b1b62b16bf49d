"""Rank-pool checks of the contract-v2 seams (module-level functions, importable by name)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

import v2_backends
from moe_a2a.dispatchers import DispatcherError, ForwardMode, agree_batch
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.routing import RouterConfig
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.weights import MoEWeights


def _router(num_experts: int) -> RouterConfig:
    return RouterConfig(num_experts=num_experts, top_k=2, scoring="sigmoid", renormalize=True,
                        routed_scaling_factor=1.5, has_correction_bias=True)


def _x(seed: int, dp_rank: int, n: int, hidden: int) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed * 31 + dp_rank))


def run_stack_cases(rank: int, world: int, cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each case: a MoEStack of ``layers`` layers on a test backend, steps of per-DP-rank
    batches; returns the error against the single-process reference and what was built."""
    v2_backends.register_all()
    results = []
    for case in cases:
        args = resolve(env={}, **case["args"])
        ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
        experts = case.get("experts", 8)
        router = _router(experts)
        weights = [MoEWeights.random(experts, 16, 8, 8, seed=i, with_correction_bias=True)
                   for i in range(case.get("layers", 1))]
        before = len(v2_backends.BUILT)
        stack = MoEStack.build(weights, router, args, ctx)
        g = ctx.groups
        worst, scale = 0.0, 0.0
        paths = []
        for step, sizes in enumerate(case["dp_batches"]):
            n = sizes[g.dp_rank]
            x = _x(step, g.dp_rank, n, 16)
            counts = dict(stack.path_counts())
            with stack.step(n, ForwardMode(case.get("mode", "prefill"))):
                h = x
                for layer, w in zip(stack.layers, weights):
                    out = layer(h)
                    if n:
                        ref, _ = reference_moe(h, w, router)
                        worst = max(worst, float((out - ref).abs().max()))
                        scale = max(scale, float(ref.abs().max()))
                    h = h + out
            now = stack.path_counts()
            paths.append(sorted(p for p in now if now[p] > counts.get(p, 0)))
        fused = stack.layers[0].fused
        results.append({
            "name": case["name"], "err": worst, "scale": scale, "paths": paths,
            "communicators": len(stack.communicators),
            "counting_communicators": len(v2_backends.BUILT) - before,
            "output": stack.layers[0].dispatcher.output_class.__name__
            if stack.layers[0].dispatcher is not None else None,
            "shares_storage": getattr(fused, "shares_storage", None),
        })
        stack.close()
    return results


def check_agree_batch(rank: int, world: int) -> Dict[str, Any]:
    """agree_batch over tp 4 / dp 2: DP sizes and modes agreed; attention-TP disagreement fails."""
    args = resolve(env={}, moe_a2a_backend="none", tp_size=world, ep_size=world, dp_size=2,
                   enable_dp_attention=True)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
    g = ctx.groups
    n = [5, 0][g.dp_rank]
    mode = [ForwardMode.DECODE, ForwardMode.DECODE][g.dp_rank]
    batch = agree_batch(g, num_tokens=n, forward_mode=mode)
    out = {"dp": batch.dp_num_tokens, "modes": [m.value for m in batch.dp_forward_modes],
           "any_prefill": batch.any_prefill, "max_per_rank": batch.max_tokens_per_rank(2)}
    try:  # attention-TP rank 1 of DP rank 0 claims another batch
        agree_batch(g, num_tokens=n + (1 if rank == 1 else 0))
    except DispatcherError as exc:
        out["error"] = str(exc)
    return out


def check_subgroup_jobs(rank: int, world: int) -> Dict[str, Any]:
    """Two independent MoE jobs (tp 2 each) in one 4-rank world, built on sub-groups."""
    job = [0, 1] if rank < 2 else [2, 3]
    args = resolve(env={}, moe_a2a_backend="alltoall", tp_size=2)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"),
                                ranks=job)
    weights = MoEWeights.random(8, 16, 8, 0, seed=7 + job[0], with_correction_bias=True)
    router = _router(8)
    stack = MoEStack.build([weights], router, args, ctx)
    x = _x(job[0], 0, 6, 16)
    with stack.step(6):
        out = stack.layers[0](x)
    ref, _ = reference_moe(x, weights, router)
    stack.close()
    return {"local_rank": ctx.groups.rank, "err": float((out - ref).abs().max())}
