"""The model-level runner: the MoE layers of one model, their communicators and the step.

``MoEStack`` owns what exists once per model and process: the communicators (one per
backend, shared by every layer), the observers (routed-experts capture, the EPLB recorder)
and the step. An engine calls ``begin_step`` once per forward (one small agreement across
ranks), runs its layers — attention in between is the engine's — and calls ``end_step``::

    stack = MoEStack.build(layer_weights, router, args, ctx, dtype=torch.bfloat16)
    with stack.step(num_tokens=hidden.shape[0], forward_mode=ForwardMode.DECODE):
        for layer in stack.layers:
            hidden = hidden + layer(hidden)
    stack.close()
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union, cast

import torch

from moe_a2a.dispatchers import ForwardMode, agree_batch
from moe_a2a.errors import MoeA2AError
from moe_a2a.layer import Communicators, EPMoE
from moe_a2a.parallel import ParallelContext
from moe_a2a.remap import TopKRemap
from moe_a2a.routed_experts import CaptureSizes, RoutedExpertsCapturer
from moe_a2a.routing import RouterConfig
from moe_a2a.server_args import ServerArgs
from moe_a2a.step import StepContext, StepObserver
from moe_a2a.weights import MoEWeights


class MoEStack(torch.nn.Module):
    """The MoE layers of one model on this rank, with one communicator per backend.

    Attributes:
        layers: the ``EPMoE`` layers (a ``ModuleList``).
        communicators: the per-process communicators the layers share.
        observers: step observers (capture, EPLB recorder), in call order.
        routed_experts: the routed-experts capturer (first observer), or None.
    """

    def __init__(self, layers: Sequence[EPMoE], *, ctx: ParallelContext,
                 communicators: Communicators, observers: Sequence[StepObserver] = (),
                 routed_experts: Optional[RoutedExpertsCapturer] = None) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.ctx = ctx
        self.communicators = communicators
        self.routed_experts = routed_experts
        self.observers: List[StepObserver] = list(observers)
        if routed_experts is not None:  # first: sees every layer before the other observers
            self.observers.insert(0, routed_experts)
        self._step: Optional[StepContext] = None
        self._steps = 0
        for layer in cast(Iterable[EPMoE], self.layers):  # a ModuleList of EPMoE
            if layer.communicators is not communicators:
                raise MoeA2AError(f"layer {layer.layer_id} was built with other communicators "
                                  f"than the stack's; fix: build it with communicators="
                                  f"stack.communicators (MoEStack.build does)")
            layer.attach(self._current, self.observers)

    @classmethod
    def build(cls, layer_weights: Sequence[MoEWeights],
              routers: Union[RouterConfig, Sequence[RouterConfig]], args: ServerArgs,
              ctx: ParallelContext, *, dtype: torch.dtype = torch.float32,
              observers: Sequence[StepObserver] = (),
              remaps: Optional[Sequence[TopKRemap]] = None, runner: Any = None,
              capture: Optional[CaptureSizes] = None) -> "MoEStack":
        """Build every layer (layer ``i`` from ``layer_weights[i]``) over one set of communicators.

        Args:
            layer_weights: each layer's global weights.
            routers: one routing rule for all layers, or one per layer.
            args: the resolved server arguments.
            ctx: this process's parallel context.
            dtype: activation and expert dtype.
            observers: step observers (called in this order).
            remaps: one logical→physical remap per layer (identity by default).
            runner: the experts runner shared by the layers.
            capture: routed-experts buffer sizes (``moe_a2a.routed_experts.capture_sizes``);
                required when ``args.enable_return_routed_experts``, which builds the capturer.
        """
        n = len(layer_weights)
        routers = [routers] * n if isinstance(routers, RouterConfig) else list(routers)
        if len(routers) != n or (remaps is not None and len(remaps) != n):
            raise MoeA2AError(f"MoEStack.build: {n} layers of weights but {len(routers)} routers"
                              + (f" and {len(remaps)} remaps" if remaps is not None else "")
                              + "; fix: give one per layer (or one router for all)")
        communicators = Communicators()
        try:
            layers = [EPMoE.build(w, r, args, ctx, layer_id=i, dtype=dtype,
                                  communicators=communicators, runner=runner,
                                  remap=None if remaps is None else remaps[i])
                      for i, (w, r) in enumerate(zip(layer_weights, routers))]
            capturer = RoutedExpertsCapturer.for_layers(args, ctx, layers, capture)
        except BaseException:
            communicators.close()
            raise
        return cls(layers, ctx=ctx, communicators=communicators, observers=observers,
                   routed_experts=capturer)

    # ---- the step --------------------------------------------------------------------------

    def _current(self) -> Optional[StepContext]:
        return self._step

    @property
    def current_step(self) -> Optional[StepContext]:
        return self._step

    def begin_step(self, num_tokens: int, forward_mode: ForwardMode = ForwardMode.PREFILL, *,
                   token_slots: Optional[torch.Tensor] = None,
                   capturing: bool = False) -> StepContext:
        """Agree this step's batch across every rank (one small all-gather, one host read)
        and tell the observers.

        Args:
            num_tokens: this DP rank's tokens (the rows every layer will get).
            forward_mode: this DP rank's mode.
            token_slots: ``[num_tokens]`` int64 KV-cache slots of the tokens (routed-experts
                capture writes host rows there), or None.
            capturing: the step is captured into / replayed from a CUDA graph.
        """
        if self._step is not None:
            raise MoeA2AError(f"begin_step: step {self._step.index} was not ended; fix: call "
                              f"end_step() once per step (or use `with stack.step(...)`)")
        if token_slots is not None and tuple(token_slots.shape) != (num_tokens,):
            raise MoeA2AError(f"begin_step: token_slots has shape {tuple(token_slots.shape)}; "
                              f"expected [{num_tokens}] (one KV slot per token)")
        batch = agree_batch(self.ctx.groups, num_tokens=num_tokens, forward_mode=forward_mode,
                            capturing=capturing, device=self.ctx.device)
        step = StepContext(index=self._steps, batch=batch, groups=self.ctx.groups,
                           token_slots=token_slots)
        self._steps += 1
        self._step = step
        try:
            for observer in self.observers:
                observer.on_step_begin(step)
        except BaseException:
            self._step = None  # a refused step is not begun
            raise
        return step

    def end_step(self) -> None:
        """Finish the step: observers do their step-level work (gathers, copies, dumps)."""
        step = self._step
        if step is None:
            raise MoeA2AError("end_step: no step was begun; fix: call begin_step() first")
        try:
            for observer in self.observers:
                observer.on_step_end(step)
        finally:
            self._step = None

    @contextmanager
    def step(self, num_tokens: int, forward_mode: ForwardMode = ForwardMode.PREFILL,
             **kwargs: Any) -> Iterator[StepContext]:
        """``begin_step`` … ``end_step`` as a context manager (the step ends on error too)."""
        ctx = self.begin_step(num_tokens, forward_mode, **kwargs)
        try:
            yield ctx
        except BaseException:
            self._step = None  # observers must not finish a broken step
            raise
        self.end_step()

    def forward(self, hidden: torch.Tensor, forward_mode: ForwardMode = ForwardMode.PREFILL,
                **kwargs: Any) -> torch.Tensor:
        """A MoE-only model: one step, ``hidden = hidden + layer(hidden)`` for every layer."""
        with self.step(int(hidden.shape[0]), forward_mode, **kwargs):
            for layer in self.layers:
                hidden = hidden + layer(hidden)
        return hidden

    def path_counts(self) -> dict:
        """Layer calls per path (``dispatch``, ``fused``, ``fallback``), summed over layers."""
        total: dict = {}
        for layer in cast(Iterable[EPMoE], self.layers):
            for path, n in layer.path_counts.items():
                total[path] = total.get(path, 0) + n
        return total

    def close(self) -> None:
        """Release every communicator (buffers); the stack cannot run afterwards."""
        if self.routed_experts is not None:
            self.routed_experts.close()
        self.communicators.close()

    def __enter__(self) -> "MoEStack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["MoEStack"]
