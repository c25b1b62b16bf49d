"""The expert-parallel MoE layer: router → observers → remap → dispatcher (or fused) → experts
→ combine.

``EPMoE`` owns the token layout around the communication path, as the backend declares it:

* ``replicated`` paths get the DP rank's whole batch (identical on the attention-TP ranks);
  the dispatcher itself gathers across DP ranks and reduce-scatters back.
* ``scattered`` paths get a disjoint slice per attention-TP rank: the layer splits the batch
  before routing (each token is routed once) and all-gathers the outputs afterwards.

A fused backend (``FusedMoE``) runs the steps its capacity holds; the others run the spec's
fallback backend with the ordinary experts. The choice is made per step from the agreed
``BatchInfo``, so every rank takes the same path and collectives stay matched.

The layer never builds another backend than the one named: building checks availability
first (the real reason on failure), then that the class keeps the spec's contract.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union, cast

import torch

from moe_a2a.backends import BackendSpec, ensure_available, get_backend
from moe_a2a.dispatchers import (
    BaseDispatcher,
    BatchInfo,
    CombineInput,
    Communicator,
    DispatcherSetup,
    ForwardMode,
    FusedMoE,
    PhysicalTopK,
    ResourceOwner,
    agree_batch,
)
from moe_a2a.dispatchers.collectives import all_gather_known_sizes
from moe_a2a.errors import MoeA2AError
from moe_a2a.experts import LocalExperts, SharedExpert
from moe_a2a.parallel import ParallelContext
from moe_a2a.remap import IdentityRemap, TopKRemap
from moe_a2a.routing import RouterConfig, route
from moe_a2a.runners import select_runner
from moe_a2a.server_args import ServerArgs
from moe_a2a.step import RowSpan, StepContext, StepObserver, split_sizes
from moe_a2a.weights import MoEWeights

Backend = Union[BaseDispatcher, FusedMoE]

#: The names the layer counts steps under (``EPMoE.path_counts``).
PATHS = ("dispatch", "fused", "fallback")


class Communicators:
    """The per-process communicators of one model: one per backend, closed together.

    ``MoEStack`` owns one; a layer built alone owns a private one.
    """

    def __init__(self) -> None:
        self._by_backend: Dict[str, Communicator] = {}

    def get(self, spec: BackendSpec, cls: Type[ResourceOwner], setup: DispatcherSetup) -> Communicator:
        """The communicator of ``spec`` (built on first use with ``cls.communicator_class``)."""
        comm = self._by_backend.get(spec.name)
        if comm is None:
            comm = cls.communicator_class(setup.comm_setup())
            self._by_backend[spec.name] = comm
        return comm

    def __len__(self) -> int:
        return len(self._by_backend)

    def items(self):
        return self._by_backend.items()

    def close(self) -> None:
        for comm in self._by_backend.values():
            comm.close()

    def __enter__(self) -> "Communicators":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build_backend(spec: BackendSpec, setup: DispatcherSetup, communicators: Communicators) -> Backend:
    """Build the dispatcher or fused backend ``spec`` names, or fail with the real reason."""
    ensure_available(spec, setup.device.type)  # the real reason, with the install hint
    cls = spec.load_dispatcher_class()
    comm = communicators.get(spec, cls, setup)
    built = cls(DispatcherSetup(**{**_fields(setup), "communicator": comm}))
    expected = FusedMoE if spec.fused_experts else BaseDispatcher
    if not isinstance(built, cls) or not isinstance(built, expected):
        raise MoeA2AError(
            f"backend {spec.name!r}: {spec.dispatcher_path} built a {type(built).__name__}, "
            f"not the {cls.__name__} (a {expected.__name__}) the backend names")
    layout = built.token_layout
    if layout is not None and layout != spec.token_layout:
        raise MoeA2AError(
            f"backend {spec.name!r} declares token_layout={spec.token_layout!r} but "
            f"{type(built).__name__} handles {layout!r}: fix the registration")
    return built


def _fields(setup: DispatcherSetup) -> Dict[str, Any]:
    return {name: getattr(setup, name) for name in setup.__dataclass_fields__}


class EPMoE(torch.nn.Module):
    """One MoE layer sharded over expert-parallel ranks.

    Use ``EPMoE.build`` (global weights), ``EPMoE.from_hf`` (a transformers MoE block), or
    ``MoEStack.build`` for a model's layers (one communicator, one step for all of them).
    ``forward(hidden [T, H])`` takes this DP rank's tokens, identical on every attention-TP
    rank of it, and returns ``[T, H]`` (routed + shared experts), identical there too.

    Parameters (``state_dict``): ``gate [E, H]`` float32, ``correction_bias [E]`` (buffer, when
    the router has one), ``experts.w_gate/w_up/w_down`` (this rank's shard), ``shared.*``.
    """

    def __init__(self, *, layer_id: int, spec: BackendSpec, ctx: ParallelContext,
                 router: RouterConfig, gate: torch.Tensor, correction_bias: Optional[torch.Tensor],
                 remap: TopKRemap, dispatcher: Optional[BaseDispatcher],
                 fused: Optional[FusedMoE], experts: LocalExperts,
                 shared: Optional[SharedExpert], communicators: Communicators,
                 owns_communicators: bool, fused_capacity: Optional[int] = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.spec = spec
        self.ctx = ctx
        self.router = router
        self.gate = torch.nn.Parameter(gate, requires_grad=False)
        if correction_bias is not None:
            self.register_buffer("correction_bias", correction_bias)
        else:
            self.correction_bias = None
        self.remap = remap
        self.dispatcher = dispatcher
        self.fused = fused
        self.fused_capacity = fused_capacity
        self.experts = experts
        self.shared = shared
        self.communicators = communicators
        self._owns_communicators = owns_communicators
        self.observers: Sequence[StepObserver] = ()
        self._step_provider: Optional[Callable[[], Optional[StepContext]]] = None
        self.path_counts: Dict[str, int] = {p: 0 for p in PATHS}

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def build(cls, weights: MoEWeights, router: RouterConfig, args: ServerArgs,
              ctx: ParallelContext, *, layer_id: int = 0, dtype: torch.dtype = torch.float32,
              communicators: Optional[Communicators] = None, remap: Optional[TopKRemap] = None,
              runner: Any = None, observers: Sequence[StepObserver] = ()) -> "EPMoE":
        """Build one layer from global weights.

        Args:
            weights: the layer's global weights (every rank passes the same).
            router: the routing rule (``router.num_experts == weights.num_experts``).
            args: the resolved server arguments (the backend, its settings, the sizes).
            ctx: this process's parallel context.
            layer_id: the layer's index (observers and EPLB key on it).
            dtype: activation and expert dtype (the router stays float32).
            communicators: the model's communicators (``MoEStack`` passes its own); None
                builds private ones that the layer owns.
            remap: logical → physical ids (EPLB, fused shared columns); identity by default.
            runner: the experts runner; by default the one ``--moe-runner-backend`` selects.
            observers: observers of a layer used without a stack.
        """
        if not isinstance(args, ServerArgs):
            raise MoeA2AError(f"EPMoE.build needs resolved ServerArgs (moe_a2a.server_args."
                              f"resolve), got {type(args).__name__}")
        if router.num_experts != weights.num_logical_experts:
            raise MoeA2AError(
                f"router.num_experts={router.num_experts} but the weights hold "
                f"{weights.num_logical_experts} experts: build both from the same expert count")
        spec = args.backend_spec
        groups = ctx.groups
        owns = communicators is None
        communicators = communicators if communicators is not None else Communicators()
        remap = remap if remap is not None else IdentityRemap(router.num_experts)
        if remap.num_physical_experts != weights.num_experts:
            raise MoeA2AError(
                f"layer {layer_id}: the remap places {remap.num_physical_experts} physical "
                f"experts but the weights hold {weights.num_experts}; fix: give the weights of "
                f"every physical expert (EPLB replicas included)")
        setup = DispatcherSetup(groups=groups, num_experts=remap.num_physical_experts,
                                top_k=router.top_k + remap.extra_columns,
                                hidden_size=weights.hidden_size, dtype=dtype, device=ctx.device,
                                settings=args.backend_settings)
        local = weights.shard(setup.placement, groups.moe_tp_rank, groups.moe_tp_size)
        if runner is None:
            runner = select_runner(args.moe_runner_backend, ctx.device, dtype)
        experts = LocalExperts(local.to(ctx.device, dtype), runner)
        dispatcher: Optional[BaseDispatcher] = None
        fused: Optional[FusedMoE] = None
        capacity: Optional[int] = None
        if spec.fused_experts:
            fused = cast(FusedMoE, build_backend(spec, setup, communicators))  # type checked there
            fused.prepare_weights(experts.weights())
            rule = spec.fused_capacity
            if rule is not None:
                capacity = int(getattr(args.backend_settings, rule.setting))
            if spec.fallback is not None:
                fallback = get_backend(spec.fallback)
                fb_setup = DispatcherSetup(**{**_fields(setup), "settings": fallback.default_settings()})
                dispatcher = _as_dispatcher(build_backend(fallback, fb_setup, communicators), fallback)
        else:
            dispatcher = _as_dispatcher(build_backend(spec, setup, communicators), spec)
        shared = None
        if weights.shared is not None:
            shared = SharedExpert(weights.shared.to(ctx.device, dtype))
        bias = weights.correction_bias if router.has_correction_bias else None
        layer = cls(layer_id=layer_id, spec=spec, ctx=ctx, router=router,
                    gate=weights.gate.to(ctx.device, torch.float32),
                    correction_bias=None if bias is None else bias.to(ctx.device, torch.float32),
                    remap=remap, dispatcher=dispatcher, fused=fused, experts=experts,
                    shared=shared, communicators=communicators, owns_communicators=owns,
                    fused_capacity=capacity)
        layer.observers = tuple(observers)
        return layer

    @classmethod
    def from_hf(cls, block: torch.nn.Module, args: ServerArgs, ctx: ParallelContext,
                **kwargs: Any) -> "EPMoE":
        """From transformers' DeepseekV3MoE, Qwen3MoeSparseMoeBlock or MixtralSparseMoeBlock
        (build one with ``moe_a2a.hf.build_hf_block`` or load it from a checkpoint)."""
        from moe_a2a.hf import extract_moe

        weights, router = extract_moe(block)
        return cls.build(weights, router, args, ctx, **kwargs)

    def attach(self, step_provider: Callable[[], Optional[StepContext]],
               observers: Sequence[StepObserver]) -> None:
        """Called by ``MoEStack``: read the step from it, report to its observers (the stack's
        own list, so observers added to the stack later are seen too)."""
        self._step_provider = step_provider
        self.observers = observers

    def get_moe_weights(self) -> List[torch.Tensor]:
        """Views of this rank's routed expert slots ``[w_gate, w_up, w_down]`` (each
        ``[slots, ...]``), without the fused shared-expert slots: what EPLB moves."""
        routed = self.experts.num_local_experts - getattr(self.remap, "shared_slots_per_rank", 0)
        return [w.data[:routed] for w in (self.experts.w_gate, self.experts.w_up, self.experts.w_down)]

    def close(self) -> None:
        """Release the communicators if this layer owns them (a stack closes its own)."""
        if self._owns_communicators:
            self.communicators.close()

    # ---- forward ---------------------------------------------------------------------------

    @property
    def scattered(self) -> bool:
        """The dispatcher path splits tokens over attention-TP ranks."""
        return self.spec.token_layout == "scattered" and self.ctx.groups.attn_tp_size > 1

    def _step(self, num_tokens: int) -> StepContext:
        step = self._step_provider() if self._step_provider is not None else None
        if step is not None:
            if step.batch.num_tokens != num_tokens:
                raise MoeA2AError(
                    f"layer {self.layer_id} got {num_tokens} tokens but the step was begun with "
                    f"{step.batch.num_tokens}; fix: pass this DP rank's whole batch to "
                    f"MoEStack.begin_step and to every layer")
            return step
        # a layer used alone agrees its batch per call (one small collective)
        batch = agree_batch(self.ctx.groups, num_tokens=num_tokens,
                            forward_mode=ForwardMode.PREFILL, device=self.ctx.device)
        return StepContext(index=-1, batch=batch, groups=self.ctx.groups)

    def uses_fused_path(self, batch: BatchInfo) -> bool:
        """Whether this step takes the fused path (identical on every rank)."""
        if self.fused is None:
            return False
        if self.fused_capacity is None or self.dispatcher is None:
            return True
        batch.require_agreed(f"backend {self.spec.name}'s capacity rule")
        scattered = self.fused.token_layout == "scattered"
        need = batch.max_tokens_per_rank(self.ctx.groups.attn_tp_size, scattered)
        return need <= self.fused_capacity

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[1] != self.gate.shape[1]:
            raise MoeA2AError(f"layer {self.layer_id}: hidden has shape {tuple(hidden.shape)}; "
                              f"expected [T, {self.gate.shape[1]}]")
        groups = self.ctx.groups
        step = self._step(int(hidden.shape[0]))
        fused = self.fused if self.uses_fused_path(step.batch) else None
        dispatcher = self.dispatcher
        run: Callable[..., torch.Tensor]
        if fused is not None:
            path, layout, run = "fused", fused.token_layout, fused.forward
        else:
            if dispatcher is None:
                raise MoeA2AError(f"backend {self.spec.name} has no fallback for a step above its "
                                  f"capacity {self.fused_capacity}")
            path = "fallback" if self.fused is not None else "dispatch"
            layout = dispatcher.token_layout or self.spec.token_layout
            run = functools.partial(self._dispatch_and_combine, dispatcher)
        if layout == "scattered" and groups.attn_tp_size > 1:
            rows = RowSpan.slice_of(int(hidden.shape[0]), groups.attn_tp_size, groups.attn_tp_rank)
        else:
            rows = RowSpan.replicated(int(hidden.shape[0]))
        x = hidden[rows.start:rows.stop]
        logits = x.float() @ self.gate.t()
        topk = route(logits, self.router, self.correction_bias)
        for observer in self.observers:
            observer.observe(self.layer_id, topk, rows, step)
        physical = self.remap.to_physical(topk, self.layer_id)
        out = run(x, physical, batch=step.batch)
        self._check_output(out, x, path)
        self.path_counts[path] += 1
        if self.shared is not None:
            out = out + self.shared(x)
        if rows.scattered:
            out = all_gather_known_sizes(out, rows.split_sizes, groups.attn_tp_group)
        return out

    def _dispatch_and_combine(self, dispatcher: BaseDispatcher, x: torch.Tensor,
                              physical: PhysicalTopK, *, batch: BatchInfo) -> torch.Tensor:
        dispatched = dispatcher.dispatch(x, physical, batch=batch)
        expert_out = self.experts(dispatched)
        return dispatcher.combine(
            CombineInput(expert_output=expert_out, dispatch_output=dispatched), batch=batch)

    def _check_output(self, out: Any, x: torch.Tensor, path: str) -> None:
        """The combine (or fused) result must be exactly ``[T, H]`` in x's dtype and device."""
        who = (f"backend {self.spec.name} ({type(self.fused if path == 'fused' else self.dispatcher).__name__}"
               f", {path} path) in layer {self.layer_id}")
        if not isinstance(out, torch.Tensor):
            raise MoeA2AError(f"{who} returned a {type(out).__name__}, not a tensor")
        problems: List[str] = []
        if tuple(out.shape) != tuple(x.shape):
            problems.append(f"shape {tuple(out.shape)} instead of {tuple(x.shape)}")
        if out.dtype != x.dtype:
            problems.append(f"dtype {out.dtype} instead of {x.dtype}")
        if out.device != x.device:
            problems.append(f"device {out.device} instead of {x.device}")
        if problems:
            raise MoeA2AError(f"{who} returned {', '.join(problems)}: combine must return one "
                              f"row per dispatched token in the input's dtype and device")


def _as_dispatcher(built: Backend, spec: BackendSpec) -> BaseDispatcher:
    if not isinstance(built, BaseDispatcher):
        raise MoeA2AError(f"backend {spec.name!r} must be a dispatcher (BaseDispatcher), got "
                          f"{type(built).__name__}")
    return built


__all__ = ["Communicators", "EPMoE", "PATHS", "build_backend", "split_sizes"]
