"""Checks that the rank pool runs: EPMoE on real gloo ranks against the single-process oracle.

Every function takes ``(rank, world_size, ...)`` and returns plain data; all ranks build the
same seeded weights and inputs, so each can compute the oracle for its own DP rank's tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch

from moe_a2a.layer import EPMoE
from moe_a2a.stack import MoEStack
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.routing import RouterConfig
from moe_a2a.weights import MoEWeights
from moe_a2a.server_args import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(seed: int, dp_rank: int, num_tokens: int, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 131 + dp_rank)
    return torch.randn(num_tokens, hidden, generator=gen)


def _router(case: Dict[str, Any]) -> RouterConfig:
    return RouterConfig(num_experts=case.get("num_experts", 8), top_k=case.get("top_k", 2),
                        scoring=case.get("scoring", "sigmoid"), n_group=case.get("n_group", 1),
                        topk_group=case.get("topk_group", 1), renormalize=True,
                        routed_scaling_factor=case.get("routed_scaling_factor", 1.5),
                        has_correction_bias=case.get("scoring", "sigmoid") == "sigmoid")


def _weights(case: Dict[str, Any], router: RouterConfig, dtype: torch.dtype) -> MoEWeights:
    weights = MoEWeights.random(router.num_experts, case.get("hidden", 32),
                                case.get("intermediate", 16), case.get("shared_intermediate", 16),
                                seed=case.get("seed", 0), dtype=dtype,
                                with_correction_bias=router.has_correction_bias)
    if case.get("one_expert"):
        # every token's top-1 is expert `one_expert - 1`: its gate row dominates the logits
        gate = torch.zeros_like(weights.gate)
        gate[case["one_expert"] - 1] = 1.0
        weights = dataclasses.replace(weights, gate=gate)
    return weights


def run_layer_cases(rank: int, world_size: int, cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """For each case: build EPMoE, run its steps, return max errors against the oracle."""
    results = []
    for case in cases:
        args = resolve(env={}, **case["args"])
        ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
        dtype = DTYPES[case.get("dtype", "float32")]
        router = _router(case)
        weights = _weights(case, router, dtype)
        standalone = case.get("standalone", False)
        if standalone:  # a lone layer agrees its batch per call
            layer = EPMoE.build(weights, router, args, ctx, dtype=dtype)
            stack = None
        else:
            stack = MoEStack.build([weights], router, args, ctx, dtype=dtype)
            layer = stack.layers[0]
        g = ctx.groups
        worst, scale = 0.0, 0.0
        for step, sizes in enumerate(case["dp_batches"]):
            n = sizes[g.dp_rank]
            x = _inputs(case.get("seed", 0) + step, g.dp_rank, n, weights.gate.shape[1]).to(dtype)
            if stack is not None:
                with stack.step(n):
                    out = layer(x)
            else:
                out = layer(x)
            if out.shape != x.shape:
                raise AssertionError(f"{case['name']}: output {tuple(out.shape)} for input {tuple(x.shape)}")
            if n:
                ref, _ = reference_moe(x.float(), weights, router)
                worst = max(worst, (out.float() - ref).abs().max().item())
                scale = max(scale, ref.abs().max().item())
        (stack or layer).close()
        results.append({"name": case["name"], "max_abs_err": worst, "scale": scale,
                        "format": layer.dispatcher.format.value,
                        "dispatcher": type(layer.dispatcher).__name__,
                        "paths": dict(layer.path_counts),
                        "attn_tp_size": g.attn_tp_size, "moe_tp_size": g.moe_tp_size,
                        "ep_size": g.ep_size, "dp_size": g.dp_size})
    return results


def run_hf_cases(rank: int, world_size: int, cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """EPMoE.from_hf on real ranks against transformers' forward of the same block."""
    from moe_a2a.hf import build_hf_block, hf_forward, load_hf_config

    results = []
    for case in cases:
        args = resolve(env={}, **case["args"])
        ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
        block = build_hf_block(load_hf_config(case["config"]), seed=3, dtype=torch.float32)
        layer = EPMoE.from_hf(block, args, ctx)
        g = ctx.groups
        worst = 0.0
        for step, sizes in enumerate(case["dp_batches"]):
            n = sizes[g.dp_rank]
            x = _inputs(11 + step, g.dp_rank, n, layer.gate.shape[1])
            out = layer(x)
            if n:
                with torch.no_grad():
                    ref = hf_forward(block, x)
                worst = max(worst, (out - ref).abs().max().item())
        results.append({"name": case["name"], "max_abs_err": worst})
    return results
