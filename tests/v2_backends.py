"""CPU test backends that prove the contract-v2 seams over gloo (not kernels, real movement).

* ``test_deepep_normal``: exact-split all-to-all that hands the experts a
  ``DeepEPNormalOutput`` (received rows + per-expert counts on the host).
* ``test_deepep_ll``: the masked low-latency layout ``[E_local, cap * ep, H]`` with
  ``masked_m``; the experts return unweighted per-expert outputs and combine weighs them.
* ``test_fused``: a ``FusedMoE`` in plain torch (all-gather over the EP group, local experts,
  reduce-scatter back) with a capacity that sends over-cap steps to the ``none`` fallback.

``register_all()`` registers them (idempotent, so every spawned rank can call it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

from moe_a2a.backends import CapacityRule, DeepEPSettings, MegaMoESettings, register_backend
from moe_a2a.dispatchers import (
    BatchInfo,
    CombineInput,
    Communicator,
    DeepEPLowLatencyOutput,
    DeepEPNormalOutput,
    DispatcherError,
    FusedMoE,
    PhysicalTopK,
)
from moe_a2a.dispatchers.alltoall import AllToAllDispatcher, AllToAllHandle
from moe_a2a.dispatchers.checks import combine_handle
from moe_a2a.dispatchers.collectives import (
    all_gather_known_sizes,
    all_to_all_v,
    exchange_sizes,
    reduce_scatter_known_sizes,
)

#: Communicators built, per process (a test counts them).
BUILT: List[Communicator] = []


class CountingCommunicator(Communicator):
    def __init__(self, setup) -> None:
        super().__init__(setup)
        BUILT.append(self)


class NormalLayoutDispatcher(AllToAllDispatcher):
    """The all-to-all's movement, the DeepEP normal output format."""

    output_class = DeepEPNormalOutput
    communicator_class = CountingCommunicator

    def _standard_output(self, hidden_states, local_ids, local_weights, handle):
        e_local = self.placement.num_local_experts
        flat = local_ids.reshape(-1)
        counts = torch.bincount(flat[flat >= 0], minlength=e_local)[:e_local].tolist()
        return DeepEPNormalOutput(hidden_states=hidden_states, topk_ids=local_ids,
                                  topk_weights=local_weights, num_recv_tokens_per_expert=counts,
                                  handle=handle)


@dataclass(frozen=True)
class LowLatencyHandle:
    inner: AllToAllHandle
    rows: torch.Tensor      # [P] received row of each (expert, slot) pair
    experts: torch.Tensor   # [P] local expert
    slots: torch.Tensor     # [P] slot within the expert
    weights: torch.Tensor   # [P] router weight of the pair
    num_rows: int


class LowLatencyLayoutDispatcher(AllToAllDispatcher):
    """Rows laid out per local expert in a fixed ``[E_local, cap * ep, H]`` buffer."""

    output_class = DeepEPLowLatencyOutput

    def dispatch(self, hidden_states, topk: PhysicalTopK, *, batch: BatchInfo):
        cap = self.setup.settings.num_max_dispatch_tokens_per_rank
        if hidden_states.shape[0] > cap:
            raise DispatcherError(
                f"test_deepep_ll: {hidden_states.shape[0]} tokens exceed the capacity {cap}; "
                f"fix: raise --deepep-num-max-dispatch-tokens-per-rank")
        rows = super().dispatch(hidden_states, topk, batch=batch)  # a StandardDispatchOutput
        e_local = self.placement.num_local_experts
        width = cap * self.ep_size
        x = rows.hidden_states.new_zeros((e_local, width, rows.hidden_states.shape[1]))
        p = int(rows.tokens_per_expert.sum())
        pairs = rows.pair_order[:p]
        k = rows.topk_ids.shape[1]
        pair_rows = torch.div(pairs, k, rounding_mode="floor")
        experts = rows.topk_ids.reshape(-1)[pairs]
        starts = torch.cumsum(rows.tokens_per_expert, 0) - rows.tokens_per_expert
        slots = torch.arange(p) - starts[experts]
        x[experts, slots] = rows.hidden_states[pair_rows]
        handle = LowLatencyHandle(inner=rows.handle, rows=pair_rows, experts=experts, slots=slots,
                                  weights=rows.topk_weights.reshape(-1)[pairs],
                                  num_rows=rows.hidden_states.shape[0])
        return DeepEPLowLatencyOutput(hidden_states=x, masked_m=rows.tokens_per_expert.to(torch.int32),
                                      expected_m=max(1, p // max(1, e_local)), handle=handle)

    def combine(self, combine_input: CombineInput, *, batch: BatchInfo) -> torch.Tensor:
        h = combine_handle(combine_input, LowLatencyHandle, "LowLatencyLayoutDispatcher")
        y = combine_input.expert_output
        per_row = torch.zeros(h.num_rows, y.shape[2], dtype=torch.float32)
        per_row.index_add_(0, h.rows, y[h.experts, h.slots].float() * h.weights[:, None])
        back = all_to_all_v(per_row.to(y.dtype), h.inner.send_splits, h.inner.recv_splits, self.group)
        out = torch.zeros(h.inner.num_tokens, y.shape[2], dtype=torch.float32)
        out.index_add_(0, h.inner.send_token_index, back.float())
        return out.to(y.dtype)


class TorchFusedMoE(FusedMoE):
    """A fused routed-experts layer in plain torch: gather, compute local experts, reduce back."""

    token_layout = "scattered"

    def prepare_weights(self, weights) -> None:
        share = self.setup.settings.fix_memory
        self.weights = weights if share else type(weights)(
            weights.placement, weights.moe_tp_rank, weights.moe_tp_size,
            weights.w_gate.clone(), weights.w_up.clone(), weights.w_down.clone())
        self.shares_storage = weights.w_gate.data_ptr() == self.weights.w_gate.data_ptr()

    def forward(self, hidden_states, topk: PhysicalTopK, *, batch: BatchInfo) -> torch.Tensor:
        cap = self.setup.settings.num_max_tokens_per_rank
        if hidden_states.shape[0] > cap:  # the layer must never call us above the cap
            raise DispatcherError(f"test_fused: {hidden_states.shape[0]} tokens > cap {cap}")
        g = self.setup.groups
        sizes = exchange_sizes(hidden_states.shape[0], g.ep_group, hidden_states.device)
        x = all_gather_known_sizes(hidden_states, sizes, g.ep_group)
        ids = all_gather_known_sizes(topk.ids, sizes, g.ep_group)
        w = all_gather_known_sizes(topk.weights, sizes, g.ep_group)
        local = self.placement.to_local(ids)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        wt = self.weights
        for e in range(self.placement.num_local_experts):
            rows, cols = torch.nonzero(local == e, as_tuple=True)
            if rows.numel():
                xe = x[rows].to(wt.w_gate.dtype)
                y = F.linear(F.silu(F.linear(xe, wt.w_gate[e])) * F.linear(xe, wt.w_up[e]), wt.w_down[e])
                out.index_add_(0, rows, y.float() * w[rows, cols, None])
        return reduce_scatter_known_sizes(out, sizes, g.ep_group).to(hidden_states.dtype)


def register_all() -> None:
    """Register the three test backends (idempotent)."""
    register_backend("test_deepep_normal", NormalLayoutDispatcher, token_layout="scattered",
                     ep_policy="tp", devices=("cpu",), description="test: DeepEP normal layout")
    register_backend("test_deepep_ll", LowLatencyLayoutDispatcher, token_layout="scattered",
                     ep_policy="tp", devices=("cpu",), description="test: DeepEP LL layout",
                     settings=DeepEPSettings,
                     settings_fields={"num_max_dispatch_tokens_per_rank":
                                      "deepep_num_max_dispatch_tokens_per_rank"})
    register_backend("test_fused", TorchFusedMoE, token_layout="scattered", ep_policy="tp",
                     fused_experts=True, devices=("cpu",), description="test: fused plain torch",
                     settings=MegaMoESettings,
                     settings_fields={"num_max_tokens_per_rank": "mega_moe_num_max_tokens_per_rank",
                                      "fix_memory": "mega_moe_fix_memory"},
                     capacities=(CapacityRule("num_max_tokens_per_rank", batches="captured",
                                              over_capacity="fallback"),),
                     fallback="none")
