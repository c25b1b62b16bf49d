"""Dispatch output formats: one frozen, keyword-only class per layout.

A dispatcher declares the class it returns (``BaseDispatcher.output_class``); the experts
runner has one consumer per class and returns, per class, what ``combine`` expects:

=========================  ==============================  ===================================
output class               rows the experts receive         experts return (``expert_output``)
=========================  ==============================  ===================================
StandardDispatchOutput     ``[R, H]`` rows, pairs grouped   ``[R, H]`` weighted sum of the
                           by ``pair_order``                row's local experts
DeepEPNormalOutput         ``[R, H]`` received rows,        ``[R, H]`` weighted sum of the
                           per-expert counts on the host    row's local experts
DeepEPLowLatencyOutput     ``[E_local, cap * ep, H]``       ``[E_local, cap * ep, H]`` each
                           masked by ``masked_m``           expert's output, *unweighted*
                                                            (combine applies the weights)
=========================  ==============================  ===================================

Shape names: ``R`` rows on this rank, ``H`` hidden, ``K`` columns per token, ``E_local``
experts on this rank, ``cap`` low-latency capacity per source rank, ``ep`` EP ranks. Expert ids
in every output are *local* (``0 <= id < E_local``); ``-1`` means "computed elsewhere" and
carries weight 0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Tuple

import torch

from moe_a2a.dispatchers.errors import DispatcherError


class DispatchFormat(str, enum.Enum):
    """The name of an output class (messages, JSON summaries)."""

    STANDARD = "standard"
    DEEPEP_NORMAL = "deepep_normal"
    DEEPEP_LOW_LATENCY = "deepep_low_latency"


@dataclass(frozen=True, kw_only=True)
class DispatchOutput:
    """Base of every format.

    Attributes:
        hidden_states: the rows the experts receive (shape per subclass). With FP8 payloads
            (``scales`` set) the dtype is ``torch.float8_e4m3fn``.
        scales: FP8 payloads only: per-128-channel float32 scales, ``[*rows, H // 128]``
            (the rows' leading shape); None for unquantised payloads.
        handle: dispatcher-private state that ``combine`` needs; opaque to everyone else.
    """

    format: ClassVar[DispatchFormat]

    hidden_states: torch.Tensor
    scales: Optional[torch.Tensor] = None
    handle: Any = None

    def expected_expert_output_shape(self) -> Tuple[int, ...]:
        """The shape ``combine`` expects from the experts for this output."""
        return tuple(self.hidden_states.shape)

    def check_expert_output(self, expert_output: torch.Tensor, who: str) -> None:
        """Raise ``DispatcherError`` unless ``expert_output`` has the expected shape."""
        want = self.expected_expert_output_shape()
        if tuple(expert_output.shape) != want:
            raise DispatcherError(
                f"{who}: expert_output has shape {tuple(expert_output.shape)}; a "
                f"{type(self).__name__} expects {list(want)} from the experts "
                f"({self._expert_output_meaning})")
        if not expert_output.dtype.is_floating_point:
            raise DispatcherError(f"{who}: expert_output has dtype {expert_output.dtype}; "
                                  f"expected a floating dtype")

    _expert_output_meaning: ClassVar[str] = "one row per dispatched row"


@dataclass(frozen=True, kw_only=True)
class StandardDispatchOutput(DispatchOutput):
    """Rows with their local experts, pairs grouped by expert (``none``, ``alltoall``).

    Attributes:
        hidden_states: ``[R, H]`` the rows, the input's dtype.
        topk_ids: ``[R, K]`` int64 local expert ids; ``-1`` = computed on another rank.
        topk_weights: ``[R, K]`` float32 router weights (0 where ``topk_ids == -1``).
        tokens_per_expert: ``[E_local]`` int64 (row, k) pairs per local expert.
        pair_order: ``[R * K]`` int64 indices into ``topk_ids.flatten()`` (``row * K + k``): the
            first ``P = tokens_per_expert.sum()`` are the routed-here pairs grouped by local
            expert (stable within an expert), the rest are the ``-1`` pairs. With
            ``tokens_per_expert`` it is the grouped-GEMM layout; building it needs no
            device-to-host read.
    """

    format: ClassVar[DispatchFormat] = DispatchFormat.STANDARD

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    pair_order: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.hidden_states.shape[0])

    @property
    def num_local_experts(self) -> int:
        return int(self.tokens_per_expert.shape[0])


@dataclass(frozen=True, kw_only=True)
class DeepEPNormalOutput(DispatchOutput):
    """DeepEP normal-mode dispatch (``Buffer.dispatch``): received rows in source-rank order.

    Attributes:
        hidden_states: ``[R, H]`` received rows (bf16, or FP8 with ``scales [R, H // 128]``).
        topk_ids: ``[R, K]`` int64 local expert ids (DeepEP's ``recv_topk_idx``); ``-1`` =
            an expert on another rank.
        topk_weights: ``[R, K]`` float32 (DeepEP's ``recv_topk_weights``).
        num_recv_tokens_per_expert: ``E_local`` host ints, (row, k) pairs per local expert as
            DeepEP returns them (``num_recv_tokens_per_expert_list``), so nobody re-counts.
    """

    format: ClassVar[DispatchFormat] = DispatchFormat.DEEPEP_NORMAL

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    num_recv_tokens_per_expert: Tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_recv_tokens_per_expert",
                           tuple(int(n) for n in self.num_recv_tokens_per_expert))

    @property
    def num_rows(self) -> int:
        return int(self.hidden_states.shape[0])

    @property
    def num_local_experts(self) -> int:
        return len(self.num_recv_tokens_per_expert)


@dataclass(frozen=True, kw_only=True)
class DeepEPLowLatencyOutput(DispatchOutput):
    """DeepEP low-latency dispatch (``Buffer.low_latency_dispatch``): a masked layout.

    Attributes:
        hidden_states: ``[E_local, cap * ep, H]``: expert ``e``'s rows are
            ``hidden_states[e, :masked_m[e]]``; the rest is padding (never read). bf16, or FP8
            with ``scales [E_local, cap * ep, H // 128]``.
        masked_m: ``[E_local]`` int32 valid rows per local expert (DeepEP's
            ``packed_recv_count``), on the device.
        expected_m: a host hint of the typical rows per expert, for masked grouped GEMMs.
    """

    format: ClassVar[DispatchFormat] = DispatchFormat.DEEPEP_LOW_LATENCY
    _expert_output_meaning: ClassVar[str] = (
        "each local expert's unweighted output in the masked layout; combine applies weights")

    masked_m: torch.Tensor
    expected_m: int

    @property
    def num_local_experts(self) -> int:
        return int(self.hidden_states.shape[0])


@dataclass(frozen=True, kw_only=True)
class CombineInput:
    """Expert results to send back.

    Attributes:
        expert_output: what the experts return for ``dispatch_output``'s class (see the
            module table); the dispatch output's dtype (or bf16 for FP8 payloads).
        dispatch_output: the output these results belong to.
    """

    expert_output: torch.Tensor
    dispatch_output: DispatchOutput


__all__ = [
    "CombineInput",
    "DeepEPLowLatencyOutput",
    "DeepEPNormalOutput",
    "DispatchFormat",
    "DispatchOutput",
    "StandardDispatchOutput",
]
