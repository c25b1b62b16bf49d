"""Single-process oracle: one MoE layer with no dispatcher, all math in float32.

Deliberately written apart from ``moe_a2a.experts``: it loops over the *global* experts and
finds each one's tokens with a mask over ``[T, K]`` (no ``pair_order``, no shared ``swiglu``),
so a bug in one path shows up as a mismatch against the other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_a2a.errors import MoeA2AError
from moe_a2a.routing import LogicalTopK, RouterConfig, route
from moe_a2a.weights import MoEWeights


class ReferenceOutput(NamedTuple):
    """``output [T, H]`` float32 (routed + shared) and the router's ``topk`` (logical ids)."""

    output: torch.Tensor
    topk: LogicalTopK


def reference_moe(hidden: torch.Tensor, weights: MoEWeights, router: RouterConfig) -> ReferenceOutput:
    """Route, run the routed experts and the shared expert, sum.

    Args:
        hidden: ``[T, H]`` any float dtype (upcast to float32); ``T == 0`` is fine.
        weights: global weights (upcast to float32 for the math).
        router: routing rule; ``router.num_experts`` must equal ``weights.num_experts``.
    Returns:
        ``(out [T, H] float32, TopK)`` where ``TopK`` holds global ids ``[T, K]`` int64 and
        weights ``[T, K]`` float32, exactly what ``moe_a2a.routing.route`` gives.
    """
    if hidden.dim() != 2 or hidden.shape[1] != weights.hidden_size:
        raise MoeA2AError(f"hidden has shape {tuple(hidden.shape)}; expected [T, {weights.hidden_size}]")
    if router.num_experts != weights.num_experts:
        raise MoeA2AError(
            f"router.num_experts={router.num_experts} but the weights hold {weights.num_experts} "
            f"experts: build both from the same expert count"
        )
    x = hidden.float()
    logits = torch.matmul(x, weights.gate.float().transpose(0, 1))
    bias = weights.correction_bias if router.has_correction_bias else None
    if router.has_correction_bias and bias is None:
        raise MoeA2AError(
            "router.has_correction_bias=True but weights.correction_bias is None: "
            "create the weights with with_correction_bias=True or set has_correction_bias=False"
        )
    topk = route(logits, router, None if bias is None else bias.float())
    out = torch.zeros_like(x)
    for e in range(weights.num_experts):
        token_idx, col = torch.nonzero(topk.ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        xe = x[token_idx]
        g = xe @ weights.w_gate[e].float().transpose(0, 1)
        u = xe @ weights.w_up[e].float().transpose(0, 1)
        ye = (g * torch.sigmoid(g) * u) @ weights.w_down[e].float().transpose(0, 1)
        out.index_add_(0, token_idx, ye * topk.weights[token_idx, col].unsqueeze(1))
    if weights.shared is not None:
        s = weights.shared
        g = x @ s.w_gate.float().transpose(0, 1)
        u = x @ s.w_up.float().transpose(0, 1)
        out = out + (g * torch.sigmoid(g) * u) @ s.w_down.float().transpose(0, 1)
    return ReferenceOutput(out, topk)


__all__ = ["ReferenceOutput", "reference_moe"]
