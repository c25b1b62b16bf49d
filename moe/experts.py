"""Reference experts in plain torch: SwiGLU over this rank's local experts.

``ReferenceExperts`` consumes a ``DispatchOutput`` and returns, per dispatched row, the
router-weighted sum of that row's local experts: ``[R, H]`` in the dispatch output's dtype.
Each format has its own consumer method (``_CONSUMERS``); the grouped-pair layout
(``pair_order`` + ``tokens_per_expert``) serves ``standard`` and ``alltoall``. DeepEP formats
slot in by adding a method and a table entry.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from moe_a2a.dispatchers.base import DispatchFormat, DispatchOutput
from moe_a2a.errors import MoeA2AError
from moe_a2a.weights import LocalExpertWeights, SharedExpertWeights


class UnsupportedDispatchFormat(MoeA2AError):
    """The experts have no consumer for this dispatch format (yet)."""


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``[N, H] → [N, H]``: ``w_down @ (silu(w_gate @ x) * (w_up @ x))`` (weights ``[I, H]``,
    ``[I, H]``, ``[H, I]``), computed in ``x``'s dtype."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class ReferenceExperts:
    """This rank's routed experts.

    Args:
        weights: the local experts (``E_local`` experts, ``I_local`` slice). With
            ``moe_tp_size > 1`` the outputs are partial sums over the intermediate slice,
            to be summed across the moe-TP group (the dispatcher's combine does it).
    """

    def __init__(self, weights: LocalExpertWeights) -> None:
        self.weights = weights

    @property
    def num_local_experts(self) -> int:
        return self.weights.num_local_experts

    def forward(self, dispatch_output: DispatchOutput) -> torch.Tensor:
        """Args:
            dispatch_output: rows ``hidden_states [R, H]``, local ``topk_ids [R, K]`` (``-1`` =
                elsewhere), ``topk_weights [R, K]`` float32, ``pair_order [R*K]``,
                ``tokens_per_expert [E_local]``.
        Returns:
            ``[R, H]`` in ``hidden_states``' dtype: ``sum_k topk_weights[r, k] * expert(x_r)``
            over the row's local pairs; rows with no local expert are zeros. Expert math runs
            in the weights' dtype, the weighted sum accumulates in float32.
        """
        consumer = self._CONSUMERS.get(DispatchFormat(dispatch_output.format))
        if consumer is None:
            supported = ", ".join(f.value for f in self._CONSUMERS)
            raise UnsupportedDispatchFormat(
                f"ReferenceExperts cannot consume dispatch format {DispatchFormat(dispatch_output.format).value!r} "
                f"yet (supported: {supported}); use a backend producing one of those formats"
            )
        return consumer(self, dispatch_output)

    __call__ = forward

    def _forward_grouped_pairs(self, out: DispatchOutput) -> torch.Tensor:
        """Standard / alltoall: pairs grouped by local expert through ``pair_order``."""
        x = out.hidden_states
        w = self.weights
        rows, k = out.topk_ids.shape if out.topk_ids.dim() == 2 else (-1, -1)
        if x.dim() != 2 or x.shape[1] != w.hidden_size or rows != x.shape[0]:
            raise MoeA2AError(
                f"dispatch output has hidden_states {tuple(x.shape)} and topk_ids {tuple(out.topk_ids.shape)}; "
                f"expected [R, {w.hidden_size}] and [R, K]"
            )
        if tuple(out.tokens_per_expert.shape) != (w.num_local_experts,):
            raise MoeA2AError(
                f"tokens_per_expert has shape {tuple(out.tokens_per_expert.shape)}; this rank holds "
                f"{w.num_local_experts} local experts (num_experts and ep_size must match the weights)"
            )
        result = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        counts = out.tokens_per_expert.tolist()  # one device-to-host read per call
        pairs = out.pair_order[:sum(counts)]  # the routed-here pairs, grouped by expert
        if pairs.numel() == 0:
            return result.to(x.dtype)
        pair_rows = torch.div(pairs, k, rounding_mode="floor")
        pair_weights = out.topk_weights.reshape(-1).index_select(0, pairs).float()
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

    _CONSUMERS: Dict[DispatchFormat, Callable[["ReferenceExperts", DispatchOutput], torch.Tensor]] = {
        DispatchFormat.STANDARD: _forward_grouped_pairs,
        DispatchFormat.ALLTOALL: _forward_grouped_pairs,
    }


class SharedExpert:
    """The shared expert on ``[T, H]`` tokens (SwiGLU in the weights' dtype).

    Returns ``[T, H]`` in the input's dtype; with sharded weights
    (``SharedExpertWeights.shard``) the result is a partial sum.
    """

    def __init__(self, weights: SharedExpertWeights) -> None:
        self.weights = weights

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weights
        if hidden.dim() != 2 or hidden.shape[1] != w.hidden_size:
            raise MoeA2AError(
                f"shared expert input has shape {tuple(hidden.shape)}; expected [T, {w.hidden_size}]"
            )
        return swiglu(hidden.to(w.w_gate.dtype), w.w_gate, w.w_up, w.w_down).to(hidden.dtype)

    __call__ = forward


__all__ = ["ReferenceExperts", "SharedExpert", "UnsupportedDispatchFormat", "swiglu"]
