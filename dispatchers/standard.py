"""The standard (replicated-layout) dispatcher: backend ``none`` and the megamoe fallback.

Every rank holds the same tokens: the DP rank's batch, or under DP attention the DP-global
batch (all DP ranks' batches, gathered in dispatch, rows ordered by DP rank). Each rank
computes only its local experts (global ids owned by other EP ranks become ``-1``, weight 0);
with ``moe_tp_size > 1`` the ranks of one moe-TP group hold the same experts, each a slice of
the intermediate dimension, so their outputs are partial sums too. ``combine`` therefore sums
the partial outputs over *all* ranks of the world:

* without DP attention: one ``all_reduce`` over ``world_group``;
* under DP attention: a variable-size reduce-scatter over ``attn_dp_group`` (each DP rank
  keeps its own rows, summed over the ranks sharing its ``attn_tp_rank``) followed by an
  ``all_reduce`` over ``attn_tp_group``; the two groups tile the world, so together they sum
  over every rank, and each rank ends with its DP rank's rows only.

Communication per step: none on one rank; without DP attention one all-reduce; under DP
attention two all-gathers (hidden; ids+weights packed into one float32 tensor) in dispatch, one
reduce-scatter and one all-reduce in combine. The DP ranks' sizes come from the step's agreed
``BatchInfo`` (one exchange per step, not per layer), so dispatch and combine read nothing from
the device and the layer can run inside a CUDA graph; only a batch that was not agreed costs a
size exchange with a host read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from moe_a2a.dispatchers.base import BaseDispatcher, DispatcherSetup
from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.outputs import CombineInput, StandardDispatchOutput
from moe_a2a.dispatchers.checks import check_dispatch_inputs, check_packable, combine_handle
from moe_a2a.dispatchers.collectives import (
    all_gather_known_sizes,
    all_reduce,
    exchange_sizes,
    pack_topk,
    reduce_scatter_known_sizes,
    unpack_topk,
)

__all__ = ["StandardDispatcher", "StandardHandle"]


@dataclass(frozen=True)
class StandardHandle:
    """What ``StandardDispatcher.combine`` needs from ``dispatch``.

    Attributes:
        num_tokens: ``T``, rows this rank passed to ``dispatch`` (and gets back).
        dp_sizes: under DP attention, every DP rank's ``T`` in DP-rank order; ``None`` otherwise.
    """

    num_tokens: int
    dp_sizes: Optional[Tuple[int, ...]] = None


class StandardDispatcher(BaseDispatcher):
    """Replicated layout; local experts only; partial sums reduced over the world."""

    output_class = StandardDispatchOutput
    token_layout = "replicated"

    def __init__(self, setup: DispatcherSetup) -> None:
        super().__init__(setup)
        check_packable(setup.num_experts)
        self.groups = setup.groups

    def dispatch(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                 batch: BatchInfo) -> StandardDispatchOutput:
        """Gather the DP batches (under DP attention) and mask the experts of other EP ranks.

        Args:
            hidden_states: ``[T, H]`` this DP rank's tokens, any float dtype; identical on the
                attention-TP ranks of the DP rank. ``T`` may be 0.
            topk: ``ids [T, K]`` int64 global physical expert ids (``-1`` = no expert in this
                column), ``weights [T, K]`` float32.
            batch: the step's facts; when agreed, its ``dp_num_tokens`` are the DP ranks' sizes.
        Returns:
            ``StandardDispatchOutput`` with ``R = T`` rows, or under DP attention
            ``R = sum over DP ranks of T`` rows in DP-rank order: ``hidden_states [R, H]``
            (input dtype), ``topk_ids [R, K]`` int64 local ids (``-1`` = expert on another
            EP rank, or no expert), ``topk_weights [R, K]`` float32 (0 where the id is ``-1``),
            ``tokens_per_expert [E_local]`` int64, ``pair_order [R*K]`` int64.
        """
        check_dispatch_inputs(hidden_states, topk, self.setup.hidden_size)
        g = self.groups
        num_tokens = int(hidden_states.shape[0])
        top_k = int(topk.ids.shape[1])
        ids = topk.ids.to(torch.int64)
        weights = topk.weights.to(torch.float32)
        dp_sizes = None
        if g.dp_attention and g.attn_dp_group is not None:
            dp_sizes = self._dp_sizes(num_tokens, batch, hidden_states.device)
            hidden_states = all_gather_known_sizes(hidden_states, dp_sizes, g.attn_dp_group)
            packed = all_gather_known_sizes(pack_topk(ids, weights), dp_sizes, g.attn_dp_group)
            ids, weights = unpack_topk(packed, top_k)
        local_ids = self.placement.to_local(ids)
        local_weights = torch.where(local_ids >= 0, weights, torch.zeros_like(weights))
        return self._standard_output(hidden_states, local_ids, local_weights,
                                     StandardHandle(num_tokens=num_tokens, dp_sizes=dp_sizes))

    def _dp_sizes(self, num_tokens: int, batch: BatchInfo, device: torch.device) -> Tuple[int, ...]:
        g = self.groups
        sizes = batch.dp_num_tokens
        if sizes is not None:  # batch.agreed
            if len(sizes) != g.dp_size or sizes[g.dp_rank] != num_tokens:
                raise DispatcherError(
                    f"StandardDispatcher: the step's BatchInfo gives DP sizes {list(sizes)} but "
                    f"this DP rank ({g.dp_rank} of {g.dp_size}) dispatches {num_tokens} tokens; "
                    f"fix: agree the batch with this rank's token count (the replicated layout "
                    f"dispatches the whole DP batch)")
            return tuple(sizes)
        if batch.capturing:
            raise DispatcherError(
                "StandardDispatcher under DP attention inside a CUDA graph needs the DP sizes "
                "from an agreed BatchInfo (exchanging them reads the device); fix: agree the "
                "batch before capture (MoEStack.begin_step)")
        return tuple(exchange_sizes(num_tokens, g.attn_dp_group, device))

    def combine(self, combine_input: CombineInput, *, batch: BatchInfo) -> torch.Tensor:
        """Sum the partial outputs over every rank; keep this DP rank's rows.

        Args:
            combine_input: ``expert_output [R, H]`` this rank's partial result per dispatched
                row (local experts, this rank's slice of the intermediate dim, weights
                applied); not modified.
        Returns:
            ``[T, H]`` in ``expert_output``'s dtype, the rows this rank dispatched.
        """
        handle = combine_handle(combine_input, StandardHandle, "StandardDispatcher")
        out = combine_input.expert_output
        g = self.groups
        if handle.dp_sizes is not None:
            mine = reduce_scatter_known_sizes(out, handle.dp_sizes, g.attn_dp_group)
            if mine.data_ptr() == out.data_ptr():
                mine = mine.clone()
            return all_reduce(mine, g.attn_tp_group)
        if g.world_group is None:
            return out
        return all_reduce(out.clone(memory_format=torch.contiguous_format), g.world_group)
