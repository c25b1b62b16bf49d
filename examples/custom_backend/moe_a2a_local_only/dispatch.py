"""``local_only``: a dispatcher that keeps every token on its own rank.

The dispatcher of docs/custom-backend.md, section 1 (tests/test_backends_docs.py keeps this
module's code identical to that block). It is correct only in a job of one rank
(``--tp-size 1``) and refuses larger jobs when it is built.
"""

import torch

from moe_a2a.backends import register_backend
from moe_a2a.dispatchers import BaseDispatcher, DispatcherError, StandardDispatchOutput
from moe_a2a.dispatchers.base import group_pairs_by_expert


@register_backend(
    "local-only",                      # stored as "local_only"
    token_layout="replicated",         # each rank of the attention-TP group holds all its tokens
    ep_policy="user",                  # ep_size is what the user gave
    modes=("default",),
    cuda_graph_modes=("default",),     # no host synchronisation: capturable
    devices=("cpu", "cuda"),
    description="keeps every token on its rank (jobs of one rank only)",
)
class LocalOnlyDispatcher(BaseDispatcher):
    output_class = StandardDispatchOutput  # the format dispatch() returns (checked at registration)
    token_layout = "replicated"        # optional; EPMoE refuses to build if it contradicts the spec

    def __init__(self, setup):
        super().__init__(setup)
        if setup.groups.world_size != 1:   # a DispatcherError is a ValueError: exit 2 on the CLI
            raise DispatcherError(
                f"backend local_only keeps tokens on their rank, which is only correct in a job "
                f"of one rank, got tp_size={setup.groups.world_size}; fix: pass --tp-size 1, or "
                f"use the none or alltoall backend")

    def dispatch(self, hidden_states, topk, *, batch):   # batch: the step's agreed BatchInfo
        local_ids = self.placement.to_local(topk.ids)    # [T, K] int64, -1 = not on this rank
        weights = torch.where(local_ids >= 0, topk.weights, torch.zeros_like(topk.weights))
        pair_order, tokens_per_expert = group_pairs_by_expert(
            local_ids, self.placement.num_local_experts)
        return StandardDispatchOutput(hidden_states=hidden_states, topk_ids=local_ids,
                                      topk_weights=weights, tokens_per_expert=tokens_per_expert,
                                      pair_order=pair_order)

    def combine(self, combine_input, *, batch):
        # one rank: each row already holds the weighted sum over all of its experts
        return combine_input.expert_output
