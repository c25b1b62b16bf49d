"""Multi-process EPLB checks (run on the shared rank pools): every layer's output against the
single-process reference while the placement changes, weights move and Waterfill places the
shared expert. Each function takes ``(rank, world_size, ...)`` and returns plain data."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch

from moe_a2a.eplb import EPLBConfig, build_eplb_stack
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.routing import RouterConfig
from moe_a2a.server_args import resolve
from moe_a2a.weights import MoEWeights


def _router(case: Dict[str, Any]) -> RouterConfig:
    return RouterConfig(num_experts=case.get("num_experts", 16), top_k=case.get("top_k", 4),
                        scoring="sigmoid", n_group=case.get("n_group", 4),
                        topk_group=case.get("topk_group", 2), renormalize=True,
                        routed_scaling_factor=2.5, has_correction_bias=True)


def skewed_weights(case: Dict[str, Any], router: RouterConfig, layer: int) -> MoEWeights:
    weights = MoEWeights.random(router.num_experts, case.get("hidden", 32), case.get("intermediate", 16),
                                case.get("shared_intermediate", 16), seed=100 + layer,
                                with_correction_bias=True)
    hot = case.get("hot", ())
    if hot:  # biases selection (not weights) towards a few experts: skewed load
        bias = weights.correction_bias.clone()
        bias[list(hot)] += case.get("skew", 2.0)
        weights = dataclasses.replace(weights, correction_bias=bias)
    return weights


def run_eplb_case(rank: int, world_size: int, case: Dict[str, Any]) -> Dict[str, Any]:
    """Build the EPLB stack, run ``case["batches"]`` steps; report errors and EPLB facts."""
    args = resolve(env={}, **case["args"])
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
    router = _router(case)
    layers = case.get("num_layers", 2)
    weights = [skewed_weights(case, router, i) for i in range(layers)]
    config = EPLBConfig.from_server_args(args, **case.get("config", {}))
    stack, eplb = build_eplb_stack(weights, router, args, ctx, config=config)
    if eplb.recorder is not None and not eplb.recorder.recording:
        eplb.recorder.start()  # without EPLB the user starts it
    g = ctx.groups
    worst = 0.0
    before_p2l = None if eplb.location is None else eplb.location.physical_to_logical.clone()
    remote = [0]
    if eplb.state.shared is not None:  # count shared columns placed on another rank
        place = eplb.state.shared_ranks

        def counting(routed, layer_id):
            ranks = place(routed, layer_id)
            remote[0] += int((ranks != g.ep_rank).sum())
            return ranks

        eplb.state.shared_ranks = counting
    for step, sizes in enumerate(case["batches"]):
        n = sizes[g.dp_rank]
        gen = torch.Generator().manual_seed(7 * step + g.dp_rank)
        h = torch.randn(n, weights[0].hidden_size, generator=gen)
        with stack.step(n):
            for layer, w in zip(stack.layers, weights):
                out = layer(h)
                if n:
                    ref = reference_moe(h, w, router).output
                    worst = max(worst, float((out - ref).abs().max()) / (1e-4 * max(1.0, float(ref.abs().max()))))
                h = h + out
    result: Dict[str, Any] = {"worst_ratio": worst, "remote_shared": remote[0],
                              "weights_match": _weights_match(stack, eplb, weights, g.ep_rank)}
    if eplb.manager is not None:
        result["reports"] = [dataclasses.asdict(r) for r in eplb.manager.reports]
    if eplb.location is not None:
        result["p2l_changed"] = bool((eplb.location.physical_to_logical != before_p2l).any())
        result["p2l"] = eplb.location.physical_to_logical.tolist()
    if eplb.recorder is not None:
        dump = eplb.recorder.dump()
        result["utilization_now"] = dump.mean_utilization
        result["count_total"] = int(dump.logical_count.sum())
    stack.close()
    return result


def waterfill_exactly_once(rank: int, world_size: int, case: Dict[str, Any]) -> List[int]:
    """Shared columns per EP rank over the group: every token's shared expert placed once."""
    import torch.distributed as dist

    from moe_a2a.eplb.waterfill import waterfill_ranks

    per_rank = case["num_experts"] // world_size
    gen = torch.Generator().manual_seed(rank)
    n = case["tokens"][rank]
    hot = torch.tensor(case["hot"])
    ids = torch.where(torch.rand(n, case["top_k"], generator=gen) < 0.7,
                      hot[torch.randint(len(hot), (n, case["top_k"]), generator=gen)],
                      torch.randint(case["num_experts"], (n, case["top_k"]), generator=gen))
    chosen = waterfill_ranks(ids, routed_per_rank=per_rank, ep_size=world_size, ep_rank=rank,
                             group=dist.group.WORLD, dynamic=case["dynamic"], min_batch=case["min_batch"])
    assert chosen.shape == (n,) and bool(((chosen >= 0) & (chosen < world_size)).all())
    again = waterfill_ranks(ids, routed_per_rank=per_rank, ep_size=world_size, ep_rank=rank,
                            group=dist.group.WORLD, dynamic=case["dynamic"], min_batch=case["min_batch"])
    assert torch.equal(chosen, again), "waterfill is not deterministic"
    dest = torch.div(ids, per_rank, rounding_mode="floor")
    load = torch.zeros(world_size, dtype=torch.int64)
    load.scatter_add_(0, dest.reshape(-1), torch.ones(dest.numel(), dtype=torch.int64))
    shared = torch.zeros(world_size, dtype=torch.int64)
    shared.scatter_add_(0, chosen, torch.ones_like(chosen))
    both = torch.stack([load, shared])
    dist.all_reduce(both)
    return both.tolist()


def _weights_match(stack, eplb, weights, ep_rank: int) -> bool:
    """Every local routed slot holds its logical expert's (moe-TP sliced) weights."""
    location = eplb.location
    for layer, w in zip(stack.layers, weights):
        local = layer.get_moe_weights()[0]               # [slots, I_local, H]
        n, part = local.shape[0], local.shape[1]
        mtp = stack.ctx.groups.moe_tp_rank
        for slot in range(n):
            expert = slot + ep_rank * n
            if location is not None:
                expert = int(location.physical_to_logical[layer.layer_id, ep_rank * n + slot])
            if not torch.equal(local[slot], w.w_gate[expert, mtp * part:(mtp + 1) * part]):
                return False
    return True
