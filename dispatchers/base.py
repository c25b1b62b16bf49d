"""Dispatcher interface (contract v2).

A dispatcher moves this rank's tokens to the ranks that own their experts and the results
back. It is a thin per-layer view of the process's :class:`Communicator` (which owns the
buffers), declares the output class it returns, and receives the step's agreed facts as
``batch=`` (``BatchInfo``). Fused backends (dispatch + experts + combine in one kernel)
implement :class:`moe_a2a.dispatchers.fused.FusedMoE` instead.

Shape names used across the package:

* ``T``  tokens this rank holds before dispatch (its attention batch, or its slice of it)
* ``H``  hidden size, ``K`` top-k columns, ``E`` global (physical) experts,
  ``E_local = E // ep_size`` experts on this rank
* ``R``  rows a dispatcher hands to the experts on this rank
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, Optional, Tuple, Type, TypeVar

import torch

from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK, TopK
from moe_a2a.dispatchers.communicator import CommSetup, Communicator
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.dispatchers.requirements import KernelRequirements
from moe_a2a.dispatchers.outputs import (
    CombineInput,
    DeepEPLowLatencyOutput,
    DeepEPNormalOutput,
    DispatchFormat,
    DispatchOutput,
    StandardDispatchOutput,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous placement: physical expert ``e`` lives on EP rank ``e // E_local``."""

    num_experts: int
    ep_size: int
    ep_rank: int

    def __post_init__(self) -> None:
        if self.num_experts <= 0 or self.ep_size <= 0 or self.num_experts % self.ep_size:
            raise DispatcherError(
                f"num_experts={self.num_experts} cannot be split evenly over ep_size={self.ep_size}: "
                f"choose num_experts divisible by ep_size (or change ep_size)"
            )
        if not 0 <= self.ep_rank < self.ep_size:
            raise DispatcherError(f"ep_rank={self.ep_rank} is outside [0, ep_size={self.ep_size})")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_local_expert(self) -> int:
        return self.ep_rank * self.num_local_experts

    def to_local(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` global ids (``-1`` allowed) → local ids, ``-1`` where another rank owns it."""
        mine = torch.div(topk_ids, self.num_local_experts, rounding_mode="floor").eq(self.ep_rank)
        return torch.where(mine, topk_ids - self.first_local_expert, -1)  # -1 ids floor to -1


@dataclass(frozen=True, kw_only=True)
class DispatcherSetup:
    """Everything one layer's dispatcher (or fused backend) needs to be built.

    Attributes:
        groups: this process's groups.
        num_experts: physical experts over all ranks (``E``).
        top_k: columns per token the router hands over (routed + fused shared).
        hidden_size: ``H``.
        dtype: activation dtype.
        device: this process's device.
        settings: the backend's typed settings (``BackendSpec.settings`` instance), or None.
        communicator: the process's communicator for this backend; None builds a private one
            that the dispatcher owns and closes (convenient for a lone layer or a test).
    """

    groups: CommGroups
    num_experts: int
    top_k: int
    hidden_size: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    settings: Any = None
    communicator: Optional[Communicator] = None

    @property
    def placement(self) -> ExpertPlacement:
        return ExpertPlacement(self.num_experts, self.groups.ep_size, self.groups.ep_rank)

    def comm_setup(self) -> CommSetup:
        return CommSetup(groups=self.groups, device=self.device, num_experts=self.num_experts,
                         top_k=self.top_k, hidden_size=self.hidden_size, dtype=self.dtype,
                         settings=self.settings)


def _order_by_expert(local_ids: torch.Tensor, num_local_experts: int):
    flat = local_ids.reshape(-1)
    key = flat.remainder(num_local_experts + 1)  # -1 ("not here") becomes E_local: sorted last
    return torch.argsort(key, stable=True), key


def pair_order_by_expert(local_ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """``[R*K]`` int64: the (row, k) pairs of ``local_ids [R, K]`` grouped by local expert
    (stable), the ``-1`` pairs last; ``pair_order`` of ``group_pairs_by_expert``."""
    return _order_by_expert(local_ids, num_local_experts)[0]


def group_pairs_by_expert(local_ids: torch.Tensor, num_local_experts: int):
    """Group the (row, k) pairs by local expert, without a device-to-host sync.

    Args:
        local_ids: ``[R, K]`` int64 local expert ids, ``-1`` = not here.
    Returns:
        ``(pair_order [R*K] int64, tokens_per_expert [E_local] int64)``, see
        ``StandardDispatchOutput``.
    """
    order, key = _order_by_expert(local_ids, num_local_experts)
    # scatter_add, not bincount: bincount sizes its output from max(key), a device read
    counts = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return order, counts[:num_local_experts]


def localize_topk(ids: torch.Tensor, weights: torch.Tensor, dest_rank: torch.Tensor,
                  num_local_experts: int):
    """Rows sent to ``dest_rank`` (one per row): the receiver's local ids, ``-1`` with weight 0
    where the expert lives elsewhere (or the column is ``-1``).

    Args:
        ids: ``[N, K]`` int64 global ids; ``weights``: ``[N, K]`` float32;
        dest_rank: ``[N]`` int64 destination EP rank of each row.
    Returns:
        ``(local_ids [N, K] int64, local_weights [N, K] float32)``.
    """
    # the owner of id e is e // E_local; -1 ids floor to -1, which is no rank. Five kernels:
    # on GPUs the host launch time of these small ops is most of a decode-size dispatch.
    mine = torch.div(ids, num_local_experts, rounding_mode="floor").eq(dest_rank.unsqueeze(1))
    local = torch.where(mine, ids.remainder(num_local_experts), -1)
    return local, torch.where(mine, weights, 0.0)


class Pending(Generic[T]):
    """The result of an ``*_async`` call: ``wait()`` returns it (once computed)."""

    def __init__(self, compute: Callable[[], T]) -> None:
        self._compute: Optional[Callable[[], T]] = compute
        self._value: Optional[T] = None

    @classmethod
    def ready(cls, value: T) -> "Pending[T]":
        pending: Pending[T] = cls(lambda: value)
        pending.wait()
        return pending

    @property
    def done(self) -> bool:
        return self._compute is None

    def wait(self) -> T:
        if self._compute is not None:
            self._value = self._compute()
            self._compute = None
        return self._value  # type: ignore[return-value]


class ResourceOwner:
    """Shared by dispatchers and fused backends: the communicator, owned or shared."""

    communicator_class: ClassVar[Type[Communicator]] = Communicator

    def _attach(self, setup: DispatcherSetup) -> None:
        self.setup = setup
        self.placement = setup.placement
        comm = setup.communicator
        self._owns_comm = comm is None
        if comm is None:
            comm = self.communicator_class(setup.comm_setup())
        elif not isinstance(comm, self.communicator_class):
            raise DispatcherError(
                f"{type(self).__name__} needs a {self.communicator_class.__name__}, got a "
                f"{type(comm).__name__}; fix: build the communicator from the same backend")
        comm.check_serves(setup.groups, setup.device, type(self).__name__)
        self.comm = comm

    @classmethod
    def check_runnable(cls, device: str) -> Tuple[bool, str]:
        """``(ok, reason)``: can this class run on ``device`` here (beyond the spec's data)?"""
        return True, ""

    @classmethod
    def kernel_requirements(cls, settings: Any) -> Optional["KernelRequirements"]:
        """The shapes and dtypes this class's kernels accept with ``settings`` (None = any)."""
        return None

    def close(self) -> None:
        """Close the communicator if this object owns it (a shared one is the stack's)."""
        if getattr(self, "_owns_comm", False):
            self.comm.close()


class BaseDispatcher(ResourceOwner, abc.ABC):
    """Moves tokens to the ranks that own their experts, and the results back.

    ``dispatch`` takes this rank's tokens in the layout its backend declares
    (``token_layout``) and ``combine`` returns ``[T, H]`` in the same order. A rank with
    ``T == 0`` is normal: it still takes part in every collective.

    Class attributes:
        output_class: the ``DispatchOutput`` subclass ``dispatch`` returns (checked when the
            backend is registered or loaded).
        communicator_class: the ``Communicator`` subclass that owns this backend's buffers.
        token_layout: ``"replicated"`` / ``"scattered"`` (None = any); the layer refuses to
            build when it contradicts the backend spec.
    """

    output_class: ClassVar[Type[DispatchOutput]]
    token_layout: ClassVar[Optional[str]] = None

    def __init__(self, setup: DispatcherSetup) -> None:
        self._attach(setup)

    @property
    def format(self) -> DispatchFormat:
        return self.output_class.format

    @abc.abstractmethod
    def dispatch(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                 batch: BatchInfo) -> DispatchOutput:
        """Args:
            hidden_states: ``[T, H]`` this rank's tokens.
            topk: the routing choice for those ``T`` tokens (global physical ids).
            batch: the step's agreed facts.
        Returns:
            an instance of ``output_class``.
        """

    @abc.abstractmethod
    def combine(self, combine_input: CombineInput, *, batch: BatchInfo) -> torch.Tensor:
        """Returns ``[T, H]``: for each input token, the sum of its experts' weighted outputs."""

    def dispatch_async(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                       batch: BatchInfo) -> Pending[DispatchOutput]:
        """Start ``dispatch``; ``wait()`` gives its output. The default runs it synchronously;
        a backend with asynchronous kernels overrides this to overlap with other work."""
        return Pending.ready(self.dispatch(hidden_states, topk, batch=batch))

    def combine_async(self, combine_input: CombineInput, *,
                      batch: BatchInfo) -> Pending[torch.Tensor]:
        """Start ``combine``; ``wait()`` gives ``[T, H]`` (synchronous by default)."""
        return Pending.ready(self.combine(combine_input, batch=batch))

    def _standard_output(self, hidden_states: torch.Tensor, local_ids: torch.Tensor,
                         local_weights: torch.Tensor, handle: Any) -> StandardDispatchOutput:
        """Group the rows' pairs by local expert and wrap everything in the standard format."""
        pair_order, tokens_per_expert = group_pairs_by_expert(
            local_ids, self.placement.num_local_experts)
        return StandardDispatchOutput(hidden_states=hidden_states, topk_ids=local_ids,
                                      topk_weights=local_weights,
                                      tokens_per_expert=tokens_per_expert,
                                      pair_order=pair_order, handle=handle)


__all__ = [
    "BaseDispatcher",
    "BatchInfo",
    "CombineInput",
    "DeepEPLowLatencyOutput",
    "DeepEPNormalOutput",
    "DispatchFormat",
    "DispatchOutput",
    "DispatcherError",
    "DispatcherSetup",
    "ExpertPlacement",
    "Pending",
    "PhysicalTopK",
    "ResourceOwner",
    "StandardDispatchOutput",
    "TopK",
    "group_pairs_by_expert",
    "localize_topk",
    "pair_order_by_expert",
]
