"""Dispatcher interface and its frozen metadata.

Shape names used across the package:

* ``T``  tokens this rank holds before dispatch (its attention batch, or its slice of it)
* ``H``  hidden size, ``K`` top-k, ``E`` global (physical) routed experts,
  ``E_local = E // ep_size`` experts on this rank
* ``R``  rows a dispatcher hands to the experts on this rank

Expert ids in a dispatch output are *local* (``0 <= id < E_local``); ``-1`` means
"this (row, k) pair is computed elsewhere" and carries weight 0 for this rank.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import torch

from moe_a2a.dispatchers.groups import CommGroups


class DispatchFormat(str, enum.Enum):
    STANDARD = "standard"
    ALLTOALL = "alltoall"
    DEEPEP_NORMAL = "deepep_normal"
    DEEPEP_LL = "deepep_ll"


@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous placement: physical expert ``e`` lives on EP rank ``e // E_local``."""

    num_experts: int
    ep_size: int
    ep_rank: int

    def __post_init__(self) -> None:
        if self.num_experts <= 0 or self.ep_size <= 0 or self.num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={self.num_experts} cannot be split evenly over ep_size={self.ep_size}: "
                f"choose num_experts divisible by ep_size (or change ep_size)"
            )
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={self.ep_rank} is outside [0, ep_size={self.ep_size})")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_local_expert(self) -> int:
        return self.ep_rank * self.num_local_experts

    def to_local(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` global ids (``-1`` allowed) → local ids, ``-1`` where another rank owns it."""
        local = topk_ids - self.first_local_expert
        mine = (topk_ids >= 0) & (local >= 0) & (local < self.num_local_experts)
        return torch.where(mine, local, torch.full_like(local, -1))


@dataclass(frozen=True)
class TopK:
    """The router's choice for ``T`` tokens.

    Attributes:
        ids: ``[T, K]`` int64 global physical expert ids; ``-1`` = no expert in this column.
        weights: ``[T, K]`` float32 weights (routed scaling factor already applied).
    """

    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])


@dataclass(frozen=True)
class DispatcherSetup:
    """Everything a dispatcher needs to be built; created once per layer stack.

    ``options`` carries backend-specific settings taken from the resolved server
    arguments (e.g. ``deepep_mode``, capacities); each dispatcher documents its keys.
    """

    groups: CommGroups
    num_experts: int
    top_k: int
    hidden_size: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def placement(self) -> ExpertPlacement:
        return ExpertPlacement(self.num_experts, self.groups.ep_size, self.groups.ep_rank)


@dataclass(frozen=True)
class DispatchOutput:
    """What the experts consume.

    Attributes:
        format: which dispatcher produced it.
        hidden_states: ``[R, H]`` activations, the dispatcher's dtype.
        topk_ids: ``[R, K]`` int64 local expert ids, ``-1`` = computed on another rank.
        topk_weights: ``[R, K]`` float32 router weights (0 where ``topk_ids == -1``).
        tokens_per_expert: ``[E_local]`` int64, number of (row, k) pairs per local expert.
        pair_order: ``[R * K]`` int64 indices into ``topk_ids.flatten()`` (``row * K + k``):
            the first ``P = tokens_per_expert.sum()`` are the routed-here pairs grouped by local
            expert (stable within an expert), the rest are the ``-1`` pairs. With
            ``tokens_per_expert`` it is the grouped-GEMM layout; computing it needs no
            device-to-host read (``P`` is known once a consumer reads the counts).
        handle: dispatcher-private state that ``combine`` needs; opaque to everyone else.
    """

    format: DispatchFormat
    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    pair_order: torch.Tensor
    handle: Any = None

    @property
    def num_rows(self) -> int:
        return int(self.hidden_states.shape[0])


def group_pairs_by_expert(local_ids: torch.Tensor, num_local_experts: int):
    """Group the (row, k) pairs by local expert, without a device-to-host sync.

    Args:
        local_ids: ``[R, K]`` int64 local expert ids, ``-1`` = not here.
    Returns:
        ``(pair_order [R*K] int64, tokens_per_expert [E_local] int64)``, see ``DispatchOutput``.
    """
    flat = local_ids.reshape(-1)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_local_experts))  # "not here" last
    order = torch.argsort(key, stable=True)
    tokens_per_expert = torch.bincount(key, minlength=num_local_experts + 1)[:num_local_experts]
    return order, tokens_per_expert


@dataclass(frozen=True)
class CombineInput:
    """Expert results to send back.

    Attributes:
        expert_output: ``[R, H]`` per dispatched row, the weighted sum over that row's
            local experts (weights already applied), same dtype as the dispatch output.
        dispatch_output: the ``DispatchOutput`` these rows came from.
    """

    expert_output: torch.Tensor
    dispatch_output: DispatchOutput


class BaseDispatcher(abc.ABC):
    """Moves tokens to the ranks that own their experts, and the results back.

    ``dispatch`` takes this rank's tokens in the layout its backend declares
    (``token_layout``) and ``combine`` returns ``[T, H]`` in the same order. A rank with
    ``T == 0`` is normal: it still takes part in every collective.
    """

    format: DispatchFormat
    # The layout this class implements ("replicated" / "scattered"); None = any. EPMoE refuses
    # to build when it contradicts the backend spec that named the class.
    token_layout: ClassVar[Optional[str]] = None

    def __init__(self, setup: DispatcherSetup) -> None:
        self.setup = setup
        self.placement = setup.placement

    def _dispatch_output(self, hidden_states: torch.Tensor, local_ids: torch.Tensor,
                         local_weights: torch.Tensor, handle: Any) -> DispatchOutput:
        """Group the rows' pairs by local expert and wrap everything in a ``DispatchOutput``."""
        pair_order, tokens_per_expert = group_pairs_by_expert(
            local_ids, self.placement.num_local_experts)
        return DispatchOutput(format=self.format, hidden_states=hidden_states, topk_ids=local_ids,
                              topk_weights=local_weights, tokens_per_expert=tokens_per_expert,
                              pair_order=pair_order, handle=handle)

    @abc.abstractmethod
    def dispatch(self, hidden_states: torch.Tensor, topk: TopK) -> DispatchOutput:
        """Args:
            hidden_states: ``[T, H]`` this rank's tokens.
            topk: the router's choice for those ``T`` tokens (global physical ids).
        """

    @abc.abstractmethod
    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        """Returns ``[T, H]``: for each input token, the sum of its experts' weighted outputs."""

    def options(self) -> Mapping[str, Any]:
        return self.setup.options


class DispatcherError(ValueError):
    """A user-fixable dispatcher problem (bad sizes, unsupported layout, mismatched inputs).

    The message names the value(s) seen, the constraint, and how to fix it.
    """
