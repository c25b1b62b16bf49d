"""One GPU: the grouped-GEMM runner against the reference, and a layer inside a CUDA graph
(marked ``gpu``: skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from moe_a2a.experts import ReferenceExperts
from moe_a2a.parallel import ParallelSizes, make_parallel_context
from moe_a2a.reference import reference_moe
from moe_a2a.routing import RouterConfig
from moe_a2a.runners import GroupedMMExperts
from moe_a2a.server_args import resolve
from moe_a2a.stack import MoEStack
from moe_a2a.weights import MoEWeights

pytestmark = pytest.mark.gpu

E, H, I = 32, 256, 128


def _stack(runner):
    device = torch.device("cuda", 0)
    args = resolve(env={}, moe_a2a_backend="none", tp_size=1)
    ctx = make_parallel_context(ParallelSizes.from_server_args(args), 0, device)
    router = RouterConfig(num_experts=E, top_k=8, scoring="sigmoid", n_group=4, topk_group=2,
                          renormalize=True, routed_scaling_factor=2.5, has_correction_bias=True)
    weights = MoEWeights.random(E, H, I, I, seed=3, dtype=torch.bfloat16, with_correction_bias=True)
    return MoEStack.build([weights.to(device)], router, args, ctx, dtype=torch.bfloat16,
                          runner=runner), weights, router


def test_grouped_mm_matches_reference_on_cuda():
    x = torch.randn(300, H, device="cuda").to(torch.bfloat16)
    outs = []
    for runner in (ReferenceExperts(), GroupedMMExperts()):
        stack, weights, router = _stack(runner)
        outs.append(stack(x).float() - x.float())
    ref = reference_moe(x.float().cpu(), weights, router).output
    scale = ref.abs().max().item()
    for out in outs:
        assert (out.cpu() - ref).abs().max().item() <= 3e-2 * max(1.0, scale)


def test_layer_in_a_cuda_graph():
    stack, weights, router = _stack(GroupedMMExperts())
    layer = stack.layers[0]
    x = torch.randn(128, H, device="cuda").to(torch.bfloat16)
    with stack.step(128):
        eager = layer(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with stack.step(128, capturing=True):
        with torch.cuda.stream(stream):
            layer(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
