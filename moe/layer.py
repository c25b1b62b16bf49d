"""The expert-parallel MoE layer: router → observers → dispatcher → experts → combine.

``EPMoE`` owns the token layout around the dispatcher, as declared by the backend spec:

* ``replicated`` backends get the DP rank's whole batch (identical on the attention-TP
  ranks); the dispatcher itself gathers across DP ranks and reduce-scatters back.
* ``scattered`` backends get a disjoint slice per attention-TP rank; the layer splits the
  batch before routing (each token is routed once) and all-gathers the outputs afterwards.

The layer never picks another dispatcher than the one the backend names: building checks
availability first (the real reason on failure) and the dispatcher's declared layout after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Sequence

import torch

from moe_a2a.backends import BackendSpec, check_availability
from moe_a2a.dispatchers import BaseDispatcher, CombineInput, DispatcherSetup, TopK
from moe_a2a.dispatchers.collectives import all_gather_known_sizes
from moe_a2a.errors import MoeA2AError
from moe_a2a.experts import ReferenceExperts, SharedExpert
from moe_a2a.parallel import ParallelContext
from moe_a2a.routing import RouterConfig, route
from moe_a2a.weights import MoEWeights


class TopKObserver(Protocol):
    """Sees the router's logical choice of every layer (routed-experts capture, EPLB stats)."""

    def observe(self, layer_id: int, topk: TopK) -> None: ...


def dispatcher_options(args: Any) -> Dict[str, Any]:
    """Backend-specific dispatcher settings from the resolved server arguments."""
    return {
        "deepep_mode": args.deepep_mode,
        "deepep_config": args.deepep_config,
        "deepep_num_max_dispatch_tokens_per_rank": args.deepep_num_max_dispatch_tokens_per_rank,
        "mega_moe_num_max_tokens_per_rank": args.mega_moe_num_max_tokens_per_rank,
    }


def split_sizes(num_tokens: int, parts: int) -> list:
    """Sizes of ``torch.tensor_split(x, parts)``: the first ``num_tokens % parts`` get one more."""
    base, extra = divmod(num_tokens, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def build_dispatcher(spec: BackendSpec, setup: DispatcherSetup) -> BaseDispatcher:
    """Build the dispatcher the backend names, or fail with the real reason (no fallback)."""
    ok, reason = check_availability(spec, setup.device.type)
    if not ok:  # the reason already carries the install hint
        raise MoeA2AError(f"--moe-a2a-backend {spec.name} cannot run on {setup.device.type}: {reason}")
    cls = spec.load_dispatcher_class()
    dispatcher = cls(setup)
    if not isinstance(dispatcher, cls) or not isinstance(dispatcher, BaseDispatcher):
        raise MoeA2AError(
            f"backend {spec.name!r}: {spec.dispatcher_path} built a {type(dispatcher).__name__}, "
            f"not the {cls.__name__} (a dispatchers.BaseDispatcher) the backend names"
        )
    built_layout = dispatcher.token_layout
    if built_layout is not None and built_layout != spec.token_layout:
        raise MoeA2AError(
            f"backend {spec.name!r} declares token_layout={spec.token_layout!r} but its dispatcher "
            f"{type(dispatcher).__name__} handles {built_layout!r}: fix the registration"
        )
    return dispatcher


@dataclass
class EPMoE:
    """One MoE layer sharded over expert-parallel ranks.

    Use ``EPMoE.build`` (global weights) or ``EPMoE.from_hf`` (a transformers MoE block).
    ``forward(hidden [T, H])`` takes this DP rank's tokens, identical on every attention-TP
    rank of it, and returns ``[T, H]`` (routed + shared experts), identical there too.
    """

    layer_id: int
    spec: BackendSpec
    ctx: ParallelContext
    router: RouterConfig
    gate: torch.Tensor                      # [E, H] float32 router weight
    correction_bias: Optional[torch.Tensor]  # [E] float32 or None
    dispatcher: BaseDispatcher
    experts: ReferenceExperts
    shared: Optional[SharedExpert]
    observers: Sequence[TopKObserver] = ()

    @classmethod
    def build(cls, weights: MoEWeights, router: RouterConfig, args: Any, ctx: ParallelContext, *,
              layer_id: int = 0, dtype: torch.dtype = torch.float32,
              observers: Sequence[TopKObserver] = ()) -> "EPMoE":
        spec = args.backend_spec
        groups = ctx.groups
        setup = DispatcherSetup(groups=groups, num_experts=router.num_experts, top_k=router.top_k,
                                hidden_size=weights.gate.shape[1], dtype=dtype, device=ctx.device,
                                options=dispatcher_options(args))
        dispatcher = build_dispatcher(spec, setup)
        local = weights.shard(setup.placement, groups.moe_tp_rank, groups.moe_tp_size)
        local = local.to(ctx.device, dtype)
        shared = None
        if weights.shared is not None:
            shared = SharedExpert(weights.shared.to(ctx.device, dtype))
        bias = weights.correction_bias
        return cls(layer_id=layer_id, spec=spec, ctx=ctx, router=router,
                   gate=weights.gate.to(ctx.device, torch.float32),
                   correction_bias=None if bias is None else bias.to(ctx.device, torch.float32),
                   dispatcher=dispatcher, experts=ReferenceExperts(local), shared=shared,
                   observers=tuple(observers))

    @classmethod
    def from_hf(cls, block: torch.nn.Module, args: Any, ctx: ParallelContext, **kwargs: Any) -> "EPMoE":
        """From transformers' DeepseekV3MoE, Qwen3MoeSparseMoeBlock or MixtralSparseMoeBlock."""
        from moe_a2a.hf import extract_moe

        weights, router = extract_moe(block)
        return cls.build(weights, router, args, ctx, **kwargs)

    @property
    def scattered(self) -> bool:
        return self.spec.token_layout == "scattered" and self.ctx.groups.attn_tp_size > 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        groups = self.ctx.groups
        if self.scattered:
            sizes = split_sizes(hidden.shape[0], groups.attn_tp_size)
            x = torch.split(hidden, sizes)[groups.attn_tp_rank]
        else:
            x = hidden
        logits = x.float() @ self.gate.t()
        topk = route(logits, self.router, self.correction_bias)
        for observer in self.observers:
            observer.observe(self.layer_id, topk)
        dispatched = self.dispatcher.dispatch(x, topk)
        expert_out = self.experts(dispatched)
        out = self.dispatcher.combine(CombineInput(expert_out, dispatched))
        if self.shared is not None:
            out = out + self.shared(x)
        if self.scattered:
            out = all_gather_known_sizes(out, sizes, groups.attn_tp_group)
        return out

    __call__ = forward
