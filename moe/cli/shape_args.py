"""The model-shape flags of ``moe-a2a bench`` (named as ``moe-a2a run``'s)."""

from __future__ import annotations


def add_shape_arguments(group) -> None:
    """``--num-experts --top-k --hidden-size --intermediate-size --n-group --topk-group``,
    with the defaults of ``moe_a2a.run_plan.ModelShape``."""
    from moe_a2a.run_plan import ModelShape

    shape = ModelShape()
    group.add_argument("--num-experts", type=int, default=shape.num_experts, help="routed experts")
    group.add_argument("--top-k", type=int, default=shape.top_k, help="experts per token")
    group.add_argument("--hidden-size", type=int, default=shape.hidden_size,
                       help="hidden size of the tokens")
    group.add_argument("--intermediate-size", type=int, default=shape.intermediate_size,
                       help="per-expert intermediate size (split over moe-TP ranks)")
    group.add_argument("--n-group", type=int, default=None,
                       help="expert groups for grouped top-k (default: adapts to --num-experts)")
    group.add_argument("--topk-group", type=int, default=None,
                       help="groups kept per token (default: adapts to --num-experts/--top-k)")
