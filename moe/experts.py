"""Experts: this rank's routed experts and the shared expert, as ``torch.nn.Module``s.

``LocalExperts`` holds the parameters (so ``.to()``, ``state_dict()`` and hooks work) and
runs an *experts runner* on each dispatch output. A runner has one consumer per output class
(``StandardDispatchOutput``, ``DeepEPNormalOutput``, ``DeepEPLowLatencyOutput``) and returns
what that class's ``combine`` expects (see ``moe_a2a.dispatchers.outputs``).

``ReferenceExperts`` is the plain-torch runner: a loop over local experts, SwiGLU in the
weights' dtype, weighted sums accumulated in float32. It is the CPU path and the check for
faster runners. FP8 payloads (an output with ``scales``: DeepEP's e4m3 rows with per-token
128-channel float32 scales) are dequantised first and the runner returns bfloat16, what
DeepEP's combines take.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Type

import torch
import torch.nn.functional as F

from moe_a2a.dispatchers.base import pair_order_by_expert
from moe_a2a.dispatchers.outputs import (
    DeepEPLowLatencyOutput,
    DeepEPNormalOutput,
    DispatchOutput,
    StandardDispatchOutput,
)
from moe_a2a.errors import MoeA2AError
from moe_a2a.weights import LocalExpertWeights, SharedExpertWeights


class UnsupportedDispatchFormat(MoeA2AError):
    """The experts runner has no consumer for this dispatch output class."""


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``[N, H] → [N, H]``: ``w_down @ (silu(w_gate @ x) * (w_up @ x))`` (weights ``[I, H]``,
    ``[I, H]``, ``[H, I]``), computed in ``x``'s dtype."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


# each consumer takes the DispatchOutput subclass it is registered under (Any: Callable is
# contravariant in its arguments, so a subclass-typed consumer is not a Consumer of the base)
Consumer = Callable[["ReferenceExperts", Any, LocalExpertWeights], torch.Tensor]


class ReferenceExperts:
    """The plain-torch experts runner (every non-fused output class)."""

    name = "reference"

    def __call__(self, out: DispatchOutput, weights: LocalExpertWeights) -> torch.Tensor:
        for cls in type(out).__mro__:
            consumer = self._CONSUMERS.get(cls)
            if consumer is not None:
                return consumer(self, out, weights)
        supported = ", ".join(c.__name__ for c in self._CONSUMERS)
        raise UnsupportedDispatchFormat(
            f"{type(self).__name__} cannot consume a {type(out).__name__} (supported: "
            f"{supported}); fix: use a backend producing one of those, or a runner that "
            f"consumes it")

    # -- consumers ---------------------------------------------------------------------------

    def _standard(self, out: StandardDispatchOutput, w: LocalExpertWeights) -> torch.Tensor:
        """Rows ``[R, H]`` with pairs grouped by ``pair_order``: weighted sum per row."""
        x = out.hidden_states
        _check_rows(x, out.topk_ids, w)
        if tuple(out.tokens_per_expert.shape) != (w.num_local_experts,):
            raise MoeA2AError(
                f"tokens_per_expert has shape {tuple(out.tokens_per_expert.shape)}; this rank "
                f"holds {w.num_local_experts} local experts (num_experts and ep_size must match "
                f"the weights)")
        counts = out.tokens_per_expert.tolist()  # one device-to-host read per call
        k = int(out.topk_ids.shape[1])
        pairs = out.pair_order[:sum(counts)]     # the routed-here pairs, grouped by expert
        return _weighted_sum(x, pairs, k, out.topk_weights, counts, w)

    def _deepep_normal(self, out: DeepEPNormalOutput, w: LocalExpertWeights) -> torch.Tensor:
        """Received rows ``[R, H]``; counts come with the output (no re-count). FP8 rows
        (``scales`` set) are dequantised first and the result is bfloat16."""
        x = _dequantized(out.hidden_states, out.scales)
        _check_rows(x, out.topk_ids, w)
        counts = list(out.num_recv_tokens_per_expert)
        if len(counts) != w.num_local_experts:
            raise MoeA2AError(
                f"num_recv_tokens_per_expert lists {len(counts)} experts; this rank holds "
                f"{w.num_local_experts}")
        k = int(out.topk_ids.shape[1])
        pairs = pair_order_by_expert(out.topk_ids, w.num_local_experts)[:sum(counts)]
        return _weighted_sum(x, pairs, k, out.topk_weights, counts, w)

    def _deepep_low_latency(self, out: DeepEPLowLatencyOutput, w: LocalExpertWeights) -> torch.Tensor:
        """Masked ``[E_local, cap * ep, H]``: each expert on its first ``masked_m[e]`` rows,
        unweighted (combine applies the weights); padding rows stay zero. FP8 rows are
        dequantised per expert and the result is bfloat16."""
        x = out.hidden_states
        if x.dim() != 3 or x.shape[0] != w.num_local_experts or x.shape[2] != w.hidden_size:
            raise MoeA2AError(
                f"low-latency hidden_states has shape {tuple(x.shape)}; expected "
                f"[{w.num_local_experts}, cap * ep, {w.hidden_size}]")
        out_dtype = torch.bfloat16 if out.scales is not None else x.dtype
        result = torch.zeros(x.shape, dtype=out_dtype, device=x.device)
        for e, m in enumerate(out.masked_m.tolist()):
            if m:
                rows = x[e, :m] if out.scales is None else _dequantized(x[e, :m], out.scales[e, :m])
                rows = rows.to(w.dtype)
                result[e, :m] = swiglu(rows, w.w_gate[e], w.w_up[e], w.w_down[e]).to(out_dtype)
        return result

    _CONSUMERS: Dict[Type[DispatchOutput], Consumer] = {
        StandardDispatchOutput: _standard,
        DeepEPNormalOutput: _deepep_normal,
        DeepEPLowLatencyOutput: _deepep_low_latency,
    }


def _dequantized(x: torch.Tensor, scales) -> torch.Tensor:
    """FP8 rows with per-128-channel scales (any leading shape) -> bfloat16; unquantised rows
    unchanged. Shared by the runners."""
    if scales is None:
        return x
    from moe_a2a.dispatchers.fp8 import dequantize_per_token

    return dequantize_per_token(x, scales).to(torch.bfloat16)


def _check_rows(x: torch.Tensor, topk_ids: torch.Tensor, w: LocalExpertWeights) -> None:
    rows = topk_ids.shape[0] if topk_ids.dim() == 2 else -1
    if x.dim() != 2 or x.shape[1] != w.hidden_size or rows != x.shape[0]:
        raise MoeA2AError(
            f"dispatch output has hidden_states {tuple(x.shape)} and topk_ids "
            f"{tuple(topk_ids.shape)}; expected [R, {w.hidden_size}] and [R, K]")


def _weighted_sum(x: torch.Tensor, pairs: torch.Tensor, k: int, topk_weights: torch.Tensor,
                  counts, w: LocalExpertWeights) -> torch.Tensor:
    """``[R, H]``: per row, the weighted sum over its (row, k) ``pairs`` (grouped by expert,
    ``counts`` per expert); fp32 accumulation, result in ``x``'s dtype."""
    result = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if pairs.numel() == 0:
        return result.to(x.dtype)
    pair_rows = torch.div(pairs, k, rounding_mode="floor")
    pair_weights = topk_weights.reshape(-1).index_select(0, pairs).float()
    xs = x.index_select(0, pair_rows).to(w.dtype)  # [P, H], grouped by expert
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        end = start + n
        y = swiglu(xs[start:end], w.w_gate[e], w.w_up[e], w.w_down[e])
        result.index_add_(0, pair_rows[start:end], y.float() * pair_weights[start:end, None])
        start = end
    return result.to(x.dtype)


class LocalExperts(torch.nn.Module):
    """This rank's routed experts as parameters, computed by an experts runner.

    Args:
        weights: the local experts (``E_local`` experts, ``I_local`` slice). With
            ``moe_tp_size > 1`` the outputs are partial sums over the intermediate slice,
            summed across the moe-TP group by the dispatcher's combine.
        runner: the experts runner (``ReferenceExperts()`` by default).
    """

    def __init__(self, weights: LocalExpertWeights, runner=None) -> None:
        super().__init__()
        self.placement = weights.placement
        self.moe_tp_rank = weights.moe_tp_rank
        self.moe_tp_size = weights.moe_tp_size
        self.w_gate = torch.nn.Parameter(weights.w_gate, requires_grad=False)
        self.w_up = torch.nn.Parameter(weights.w_up, requires_grad=False)
        self.w_down = torch.nn.Parameter(weights.w_down, requires_grad=False)
        self.runner = runner if runner is not None else ReferenceExperts()

    @property
    def num_local_experts(self) -> int:
        return int(self.w_gate.shape[0])

    def weights(self) -> LocalExpertWeights:
        """A view of the current parameters (follows ``.to()`` and loaded state)."""
        return LocalExpertWeights(self.placement, self.moe_tp_rank, self.moe_tp_size,
                                  self.w_gate, self.w_up, self.w_down)

    def forward(self, dispatch_output: DispatchOutput) -> torch.Tensor:
        return self.runner(dispatch_output, self.weights())


class SharedExpert(torch.nn.Module):
    """The shared expert on ``[T, H]`` tokens (SwiGLU in the weights' dtype).

    Returns ``[T, H]`` in the input's dtype; with sharded weights
    (``SharedExpertWeights.shard``) the result is a partial sum.
    """

    def __init__(self, weights: SharedExpertWeights) -> None:
        super().__init__()
        self.w_gate = torch.nn.Parameter(weights.w_gate, requires_grad=False)
        self.w_up = torch.nn.Parameter(weights.w_up, requires_grad=False)
        self.w_down = torch.nn.Parameter(weights.w_down, requires_grad=False)

    @property
    def hidden_size(self) -> int:
        return int(self.w_gate.shape[1])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise MoeA2AError(
                f"shared expert input has shape {tuple(hidden.shape)}; expected [T, {self.hidden_size}]")
        return swiglu(hidden.to(self.w_gate.dtype), self.w_gate, self.w_up, self.w_down).to(hidden.dtype)


__all__ = ["LocalExperts", "ReferenceExperts", "SharedExpert", "UnsupportedDispatchFormat", "swiglu"]
