"""Rank-pool checks of routed-experts capture (module-level functions, importable by name).

Each case builds a ``MoEStack`` with capture on, runs steps of per-DP-rank batches with KV
slots, and returns this rank's host rows for every slot it wrote, the rows the single-process
reference router expects there (as plain lists), and counters. The test compares them.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.routed_experts import capture_sizes
from moe_a2a.routing import RouterConfig
from moe_a2a.run_capture import RouterOracle, compare_rows
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.weights import MoEWeights

HIDDEN = 16


def _router(num_experts: int, top_k: int) -> RouterConfig:
    n_group = 4 if num_experts % 4 == 0 and num_experts // 4 >= 2 else 1
    return RouterConfig(num_experts=num_experts, top_k=top_k, scoring="sigmoid",
                        n_group=n_group, topk_group=max(1, n_group // 2) if n_group > 1 else 1,
                        renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)


def _layers(case: Dict[str, Any]):
    """(weights, routers, oracles) of the case's layers; DeepseekV3 blocks when ``hf`` is set."""
    n = case.get("layers", 2)
    if case.get("hf"):
        from moe_a2a.hf import build_hf_block, example_hf_config, extract_moe, load_hf_config

        blocks = [build_hf_block(load_hf_config(example_hf_config(case["hf"])), seed=5 + i)
                  for i in range(n)]
        pairs = [extract_moe(b) for b in blocks]
        return ([w for w, _ in pairs], [r for _, r in pairs],
                [RouterOracle(None, None, b) for b in blocks])
    router = _router(case.get("experts", 16), case.get("top_k", 4))
    # kernel backends take the shapes and dtypes their kernels accept (DeepEP: bf16, hidden 2048)
    weights = [MoEWeights.random(router.num_experts, case.get("hidden", HIDDEN), 8, 8, seed=i,
                                 with_correction_bias=True, dtype=case.get("dtype", torch.float32))
               for i in range(n)]
    return weights, [router] * n, [RouterOracle(w, router, None) for w in weights]


def _slots(dp_rank: int, step: int, n: int) -> torch.Tensor:
    """Distinct slots per (DP rank, step), out of order: ``(dp_rank * 16 + step) * 64 + perm``."""
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(step * 7 + dp_rank))[:n]
    return (dp_rank * 16 + step) * 64 + perm


def run_capture_cases(rank: int, world: int, cases: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    results = []
    for case in cases:
        if case.get("emulate"):
            from moe_a2a.testing import emulate_kernels

            with emulate_kernels():
                results.append(_run_case(rank, case))
        else:
            results.append(_run_case(rank, case))
    return results


def _run_case(rank: int, case: Dict[str, Any]) -> Dict[str, Any]:
    if case.get("register_test_backends"):
        import v2_backends

        v2_backends.register_all()
    args = resolve(env={}, enable_return_routed_experts=True, **case["args"])
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
    g = ctx.groups
    weights, routers, oracles = _layers(case)
    batches = case["dp_batches"]
    most = max(max(sizes) for sizes in batches)
    sizes = capture_sizes(args, num_token_slots=64 * 16 * g.dp_size, max_step_tokens=max(1, most))
    dtype = case.get("dtype", torch.float32)
    stack = MoEStack.build(weights, routers, args, ctx, capture=sizes, dtype=dtype)
    cap = stack.routed_experts
    written, expected, scores = [], [], []
    collectives = []
    for step, dp_sizes in enumerate(batches):
        n = dp_sizes[g.dp_rank]
        gen = torch.Generator().manual_seed(step * 31 + g.dp_rank)
        h = torch.randn(n, weights[0].hidden_size, generator=gen).to(dtype)
        slots = _slots(g.dp_rank, step, n)
        before = cap.collectives
        with stack.step(n, token_slots=slots):
            for column, (layer, oracle) in enumerate(zip(stack.layers, oracles)):
                if n:
                    expected.append((slots, column, oracle(h)))
                h = h + layer(h)
        collectives.append(cap.collectives - before)
        written.append(slots)
    slots = torch.cat(written) if written else torch.zeros(0, dtype=torch.int64)
    # one request over every written slot, in order
    req_to_token = torch.cat([slots, torch.tensor([-1])]).unsqueeze(0)
    got = cap.get_topk(0, slots.numel() + 1, req_to_token)
    want = torch.full_like(got, -1, dtype=torch.int64)
    score = torch.zeros(got.shape[0], got.shape[1], routers[0].num_experts)
    position = {int(s): i for i, s in enumerate(slots.tolist())}
    ordered = True
    for step_slots, column, ref in expected:
        rows = torch.tensor([position[int(s)] for s in step_slots.tolist()], dtype=torch.int64)
        want[rows, column] = ref.ids
        score[rows, column] = ref.scores
        ordered = ref.ordered
    counts = compare_rows(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]),
                          score.reshape(-1, score.shape[-1]), ordered)
    paths = stack.path_counts()
    stack.close()
    return {"name": case["name"], "gather": args.routed_experts_gather,
            "attn_tp_size": g.attn_tp_size, "dp_rank": g.dp_rank, "counts": counts,
            "rows": got.tolist(), "collectives": collectives, "paths": paths,
            "unwritten": cap.host_cache[(64 * 16 * g.dp_size) - 1].tolist()}


def check_refused_together(rank: int, world: int) -> str:
    """A step too big for the device cache on one DP rank only: every rank refuses it (the
    sizes are agreed), so no rank is left waiting in a layer's collective."""
    from moe_a2a.errors import MoeA2AError

    args = resolve(env={}, enable_return_routed_experts=True, moe_a2a_backend="alltoall",
                   tp_size=4, dp_size=2, enable_dp_attention=True)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), rank, torch.device("cpu"))
    weights, routers, _ = _layers({"layers": 1})
    stack = MoEStack.build(weights, routers, args, ctx,
                           capture=capture_sizes(args, num_token_slots=64, max_step_tokens=4))
    n = 6 if ctx.groups.dp_rank == 1 else 2
    try:
        stack.begin_step(n, token_slots=torch.arange(n))
    except MoeA2AError as exc:
        return str(exc)
    finally:
        stack.close()
    return "not refused"
