"""Putting EPLB together for one model: placement, remaps, recorder, manager.

``build_eplb_stack`` is ``MoEStack.build`` with EPLB and shared-expert fusion wired in from the
server arguments (or an explicit ``EPLBConfig``)::

    stack, eplb = build_eplb_stack(layer_weights, routers, args, ctx, dtype=torch.bfloat16)
    ...                              # forwards; the manager rebalances every N of them
    eplb.recorder.dump()             # collective: counts and utilisation

It returns ``eplb = None`` when nothing of it is asked for (a plain ``MoEStack``). Layers get
*physical* weights (``MoEWeights.physical``: replicas; fused shared slots interleaved) built
from the global logical ones, and one ``EPLBRemap`` each; the observers (remap state, recorder,
manager) are added to the stack in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from moe_a2a.eplb.dispatch import ReplicaDispatch
from moe_a2a.eplb.location import ExpertLocation, initial_location
from moe_a2a.eplb.manager import EPLBManager
from moe_a2a.eplb.recorder import ExpertDistributionRecorder
from moe_a2a.eplb.remap import RemapState, SharedColumns
from moe_a2a.eplb.shared import fused_physical_weights, shared_column_weight, shared_slots_needed
from moe_a2a.eplb.waterfill import MIN_BATCH_FOR_BALANCE
from moe_a2a.errors import MoeA2AError
from moe_a2a.parallel import ParallelContext
from moe_a2a.routing import RouterConfig
from moe_a2a.step import StepObserver
from moe_a2a.weights import MoEWeights


@dataclass(frozen=True, kw_only=True)
class EPLBConfig:
    """What EPLB does for one model (``from_server_args`` maps the flags).

    Attributes:
        enable_rebalance: ``--enable-eplb``: the manager rebalances.
        num_redundant: ``--ep-num-redundant-experts``.
        algorithm: ``--eplb-algorithm``.
        dispatch_algorithm: ``--ep-dispatch-algorithm`` (``static`` when unset).
        init_location: ``--init-expert-location`` (resolved: trivial, JSON text or a path).
        recorder_mode: ``--expert-distribution-recorder-mode`` (None: no recorder).
        recorder_buffer_size: ``--expert-distribution-recorder-buffer-size`` (None: the
            rebalance interval with EPLB on, else unbounded; -1: unbounded).
        rebalance_every: ``--eplb-rebalance-num-iterations``.
        fuse_shared: ``--enforce-shared-experts-fusion``.
        waterfill / waterfill_dynamic: ``--enable-deepep-waterfill`` /
            ``--deepep-waterfill-dynamic`` (the stage itself runs on any scattered backend).
        waterfill_min_batch: Waterfill keeps smaller batches local.
        num_nodes: nodes the EP ranks span (static dispatch, hierarchical rebalance).
        seed: folded into hashed choices.
        layers_per_chunk: layers per weight all-to-all at a rebalance (None: all).
    """

    enable_rebalance: bool = False
    num_redundant: int = 0
    algorithm: str = "auto"
    dispatch_algorithm: Optional[str] = None
    init_location: str = "trivial"
    recorder_mode: Optional[str] = None
    recorder_buffer_size: Optional[int] = None
    rebalance_every: int = 1000
    fuse_shared: bool = False
    waterfill: bool = False
    waterfill_dynamic: bool = False
    waterfill_min_batch: int = MIN_BATCH_FOR_BALANCE
    num_nodes: int = 1
    seed: int = 0
    layers_per_chunk: Optional[int] = None

    @classmethod
    def from_server_args(cls, args: Any, **overrides: Any) -> "EPLBConfig":
        config = cls(
            enable_rebalance=args.enable_eplb, num_redundant=args.ep_num_redundant_experts,
            algorithm=args.eplb_algorithm, dispatch_algorithm=args.ep_dispatch_algorithm,
            init_location=args.init_expert_location,
            recorder_mode=args.expert_distribution_recorder_mode,
            recorder_buffer_size=args.expert_distribution_recorder_buffer_size,
            rebalance_every=args.eplb_rebalance_num_iterations,
            fuse_shared=args.enforce_shared_experts_fusion or args.enable_deepep_waterfill,
            waterfill=args.enable_deepep_waterfill, waterfill_dynamic=args.deepep_waterfill_dynamic)
        return replace(config, **overrides)

    @property
    def places_experts(self) -> bool:
        """Physical placement differs from the logical one (replicas or a given placement)."""
        return self.enable_rebalance or self.num_redundant > 0 or self.init_location.strip() != "trivial"

    @property
    def active(self) -> bool:
        return self.places_experts or self.fuse_shared or self.recorder_mode is not None


def scattered_routing(args: Any) -> bool:
    """Each token is routed by exactly one rank on every path the backend may take."""
    from moe_a2a.backends import get_backend

    spec = args.backend_spec
    layouts = [spec.token_layout]
    if spec.fallback is not None:
        layouts.append(get_backend(spec.fallback).token_layout)
    return all(layout == "scattered" for layout in layouts)


class EPLBRuntime:
    """The EPLB objects of one model on this rank.

    Attributes:
        config: what was asked for.
        state: the remap state (dispatch tables, shared columns), an observer.
        remaps: one ``EPLBRemap`` per layer.
        recorder: the expert distribution recorder, or None.
        manager: the rebalancing manager, or None.
    """

    def __init__(self, config: EPLBConfig, *, state: RemapState,
                 recorder: Optional[ExpertDistributionRecorder],
                 manager: Optional[EPLBManager], num_layers: int) -> None:
        self.config = config
        self.state = state
        self.remaps = state.remaps(num_layers)
        self.recorder = recorder
        self.manager = manager

    @property
    def location(self) -> Optional[ExpertLocation]:
        """The placement in force (None without replicas)."""
        return None if self.state.replicas is None else self.state.replicas.location

    @property
    def observers(self) -> List[StepObserver]:
        """Add these to the stack, in this order (``build_eplb_stack`` does)."""
        return [o for o in (self.state, self.recorder, self.manager) if o is not None]

    def attach(self, stack: Any) -> None:
        """Give the manager the stack's layers (their weights move at a rebalance)."""
        if self.manager is not None:
            self.manager.attach(stack.layers)

    def physical_weights(self, layer_weights: Sequence[MoEWeights]) -> List[MoEWeights]:
        """Each layer's weights in the physical layout the remaps dispatch to."""
        out = []
        location = self.location
        for layer, weights in enumerate(layer_weights):
            if location is not None:
                weights = weights.physical(location.physical_to_logical[layer])
            if self.state.shared is not None:
                weights = fused_physical_weights(weights, self.state.groups.ep_size)
            out.append(weights)
        return out

    def summary(self) -> Dict[str, Any]:
        """Plain data for a report; dumps the recorder (collective: call on every rank)."""
        out: Dict[str, Any] = {
            "num_physical_experts": self.state.num_routed_experts,
            "dispatch_algorithm": None if self.state.replicas is None else self.state.replicas.algorithm,
            "shared_fusion": None if self.state.shared is None else self.state.shared.placement,
        }
        if self.recorder is not None:
            dump = self.recorder.dump()
            out["recorder_mode"] = self.recorder.mode
            out["utilization_now"] = dump.mean_utilization if dump.num_steps else None
            out["window_steps"] = dump.num_steps
        if self.manager is not None:
            out["rebalances"] = [
                {"forward": r.forward, "window_steps": r.window_steps,
                 "utilization_before": r.utilization_before,
                 "utilization_predicted": r.utilization_predicted,
                 "layers_changed": list(r.layers_changed), "slots_received": r.slots_received,
                 "skipped": r.skipped} for r in self.manager.reports]
        return out


def build_eplb(args: Any, routers: Sequence[RouterConfig], layer_weights: Sequence[MoEWeights],
               ctx: ParallelContext, config: Optional[EPLBConfig] = None) -> Optional[EPLBRuntime]:
    """The EPLB runtime ``config`` (default: from ``args``) asks for, or None."""
    config = config if config is not None else EPLBConfig.from_server_args(args)
    if not config.active:
        return None
    groups = ctx.groups
    num_layers = len(layer_weights)
    experts = routers[0].num_experts
    if any(r.num_experts != experts for r in routers):
        raise MoeA2AError("EPLB needs the same number of routed experts in every layer")
    per_rank = scattered_routing(args)
    replicas = None
    if config.places_experts:
        n_group = routers[0].n_group
        location = initial_location(config.init_location, num_layers=num_layers,
                                    num_logical_experts=experts, num_redundant=config.num_redundant,
                                    ep_size=groups.ep_size, algorithm=config.algorithm,
                                    num_groups=n_group, num_nodes=config.num_nodes)
        replicas = ReplicaDispatch(location, algorithm=config.dispatch_algorithm or "static",
                                   per_rank=per_rank, ep_rank=groups.ep_rank,
                                   num_nodes=config.num_nodes, seed=config.seed, device=ctx.device)
    shared = None
    if config.fuse_shared:
        slots = {shared_slots_needed(w) for w in layer_weights}
        if len(slots) != 1:
            raise MoeA2AError(f"shared-experts fusion needs the same shared expert size in every "
                              f"layer, got {sorted(slots)} slots")
        placement = "waterfill" if config.waterfill else ("own" if per_rank else "spread")
        shared = SharedColumns(num_shared=slots.pop(),
                               weight=shared_column_weight(routers[0].routed_scaling_factor),
                               placement=placement, waterfill_dynamic=config.waterfill_dynamic,
                               min_batch=config.waterfill_min_batch)
    routed = experts + (config.num_redundant if replicas is not None else 0)
    state = RemapState(groups=groups, num_routed_experts=routed, replicas=replicas, shared=shared,
                       per_rank=per_rank, seed=config.seed)
    recorder = manager = None
    mode = config.recorder_mode or ("stat" if config.enable_rebalance else None)
    if mode is not None:
        size = config.recorder_buffer_size
        if size is None and config.enable_rebalance:
            size = config.rebalance_every
        recorder = ExpertDistributionRecorder(
            num_layers=num_layers, num_logical_experts=experts, groups=groups, mode=mode,
            buffer_size=size, device=ctx.device,
            location=(lambda: replicas.location) if replicas is not None else None)
    if config.enable_rebalance:
        if groups.ep_size < 2:
            raise MoeA2AError("EPLB rebalancing needs ep_size > 1 (--enable-eplb)")
        if recorder is None or replicas is None:  # places_experts and mode "stat" give both
            raise MoeA2AError(f"EPLB rebalancing got no {'recorder' if recorder is None else 'replicas'}"
                              f" from {config!r}; this is a bug in moe_a2a.eplb, please report it")
        manager = EPLBManager(recorder=recorder, replicas=replicas, groups=groups,
                              every=config.rebalance_every, algorithm=config.algorithm,
                              num_groups=routers[0].n_group, num_nodes=config.num_nodes,
                              layers_per_chunk=config.layers_per_chunk)
    return EPLBRuntime(config, state=state, recorder=recorder, manager=manager, num_layers=num_layers)


def build_eplb_stack(layer_weights: Sequence[MoEWeights],
                     routers: Union[RouterConfig, Sequence[RouterConfig]], args: Any,
                     ctx: ParallelContext, *, dtype: torch.dtype = torch.float32,
                     observers: Sequence[StepObserver] = (), runner: Any = None,
                     config: Optional[EPLBConfig] = None,
                     capture: Any = None) -> Tuple[Any, Optional[EPLBRuntime]]:
    """``MoEStack.build`` with EPLB / fused shared experts as ``args`` (or ``config``) ask
    (``capture``: routed-experts buffer sizes, passed on to ``MoEStack.build``).

    Returns ``(stack, runtime)``; ``runtime`` is None when nothing was asked for.
    """
    from moe_a2a.stack import MoEStack

    routers = [routers] * len(layer_weights) if isinstance(routers, RouterConfig) else list(routers)
    runtime = build_eplb(args, routers, layer_weights, ctx, config)
    if runtime is None:
        return MoEStack.build(layer_weights, routers, args, ctx, dtype=dtype, observers=observers,
                              runner=runner, capture=capture), None
    stack = MoEStack.build(runtime.physical_weights(layer_weights), routers, args, ctx, dtype=dtype,
                           observers=[*observers, *runtime.observers], remaps=runtime.remaps,
                           runner=runner, capture=capture)
    runtime.attach(stack)
    return stack, runtime


__all__ = ["EPLBConfig", "EPLBRuntime", "build_eplb", "build_eplb_stack", "scattered_routing"]
