"""Input checks shared by the dispatchers (host metadata only, never a device read)."""

from __future__ import annotations

import torch

from moe_a2a.dispatchers.batch import PhysicalTopK
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.outputs import CombineInput
from moe_a2a.dispatchers.collectives import MAX_PACKED_EXPERT_ID


def check_dispatch_inputs(hidden_states: torch.Tensor, topk: PhysicalTopK, hidden_size: int) -> None:
    """Shape checks shared by the dispatchers (host metadata only, no device read)."""
    if hidden_states.dim() != 2:
        raise DispatcherError(
            f"hidden_states has shape {tuple(hidden_states.shape)}; expected [T, H] "
            f"(flatten batch and sequence dims first)"
        )
    if hidden_states.shape[1] != hidden_size:
        raise DispatcherError(
            f"hidden_states has hidden size {hidden_states.shape[1]} but the dispatcher was "
            f"built for hidden_size={hidden_size}; fix: build it with the model's hidden size"
        )
    ids, weights = topk.ids, topk.weights
    if ids.dim() != 2 or tuple(weights.shape) != tuple(ids.shape):
        raise DispatcherError(
            f"topk.ids {tuple(ids.shape)} and topk.weights {tuple(weights.shape)} must both "
            f"be [T, K]"
        )
    if ids.shape[0] != hidden_states.shape[0]:
        raise DispatcherError(
            f"topk covers {ids.shape[0]} tokens but hidden_states has {hidden_states.shape[0]} "
            f"rows; fix: route exactly the tokens you dispatch"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DispatcherError(f"topk.ids has dtype {ids.dtype}; expected an integer dtype (int64)")


def check_packable(num_experts: int) -> None:
    if num_experts >= MAX_PACKED_EXPERT_ID:
        raise DispatcherError(
            f"num_experts={num_experts}: expert ids travel as float32 and must stay below "
            f"2**24={MAX_PACKED_EXPERT_ID}; fix: use fewer experts per layer"
        )


def combine_handle(combine_input: CombineInput, cls: type, name: str):
    """The ``cls`` handle of the dispatch output, after checking ``expert_output``'s shape."""
    if not isinstance(combine_input, CombineInput):
        raise DispatcherError(f"{name}.combine needs a CombineInput, got "
                              f"{type(combine_input).__name__}")
    dispatched = combine_input.dispatch_output
    handle = getattr(dispatched, "handle", None)
    if not isinstance(handle, cls):
        raise DispatcherError(
            f"{name}.combine got a {type(dispatched).__name__} with handle "
            f"{type(handle).__name__}; fix: pass the output that this dispatcher's dispatch() "
            f"returned"
        )
    dispatched.check_expert_output(combine_input.expert_output, f"{name}.combine")
    return handle
