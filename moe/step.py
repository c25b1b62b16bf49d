"""The step: per-forward facts shared by every layer, and the observers that follow it.

A forward step of the model runs every MoE layer once on the same batch. Step-level facts
(the agreed ``BatchInfo``, the KV-cache slots of the batch's tokens) are agreed or given
once, in ``MoEStack.begin_step``, and every layer reads them from the step. Observers
(routed-experts capture, the EPLB recorder) see each layer's *logical* choice together with
where its rows sit in this DP rank's batch, and get ``on_step_begin`` / ``on_step_end`` to do
step-level work (a late all-gather, starting device-to-host copies, a recorder dump).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from moe_a2a.dispatchers.batch import BatchInfo
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.routing import LogicalTopK


def split_sizes(num_tokens: int, parts: int) -> Tuple[int, ...]:
    """Sizes of ``torch.tensor_split(x, parts)``: the first ``num_tokens % parts`` get one more."""
    base, extra = divmod(num_tokens, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """One forward step of the model, as one rank sees it.

    Attributes:
        index: steps begun so far on this stack, minus one (0 for the first).
        batch: the step's facts, agreed across every rank.
        groups: this process's groups.
        token_slots: ``[T]`` int64 KV-cache slot of each token of this DP rank's batch (the
            row index of the routed-experts host cache), or None when the engine gives none.
    """

    index: int
    batch: BatchInfo
    groups: CommGroups
    token_slots: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens


@dataclass(frozen=True, kw_only=True)
class RowSpan:
    """Which rows of this DP rank's batch one layer call routed on this rank.

    Attributes:
        start / stop: the rows ``[start, stop)`` of the DP rank's batch (all of them under the
            replicated layout; this attention-TP rank's slice under the scattered one).
        num_tokens: rows of the DP rank's batch.
        split_sizes: the attention-TP split (one entry per attention-TP rank) when
            ``scattered``, else ``(num_tokens,)``.
        scattered: each attention-TP rank routed a disjoint slice (a gather is needed to see
            the whole batch).
    """

    start: int
    stop: int
    num_tokens: int
    split_sizes: Tuple[int, ...]
    scattered: bool

    @classmethod
    def replicated(cls, num_tokens: int) -> "RowSpan":
        return cls(start=0, stop=num_tokens, num_tokens=num_tokens, split_sizes=(num_tokens,),
                   scattered=False)

    @classmethod
    def slice_of(cls, num_tokens: int, parts: int, index: int) -> "RowSpan":
        sizes = split_sizes(num_tokens, parts)
        start = sum(sizes[:index])
        return cls(start=start, stop=start + sizes[index], num_tokens=num_tokens,
                   split_sizes=sizes, scattered=parts > 1)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


class StepObserver:
    """Sees every layer's logical routing choice; no-op defaults, override what you need.

    Observers must not read the device synchronously inside ``observe`` (it runs inside the
    forward, possibly inside a CUDA graph): queue work, finish it at ``on_step_end``.
    """

    def on_step_begin(self, step: StepContext) -> None:
        """Called once per step, before the first layer."""

    def observe(self, layer_id: int, topk: LogicalTopK, rows: RowSpan, step: StepContext) -> None:
        """Called by every layer with its router's logical choice for ``rows``."""

    def on_step_end(self, step: StepContext) -> None:
        """Called once per step, after the last layer."""


__all__ = ["RowSpan", "StepContext", "StepObserver", "split_sizes"]
