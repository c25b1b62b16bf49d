"""Experts runners: how this rank's routed experts are computed on a dispatch output.

A runner consumes every non-fused output class (``StandardDispatchOutput``,
``DeepEPNormalOutput``, ``DeepEPLowLatencyOutput``) and returns what that class's combine
expects. Selected by ``--moe-runner-backend`` (SGLang's flag):

============  =====================================================================  ==========
name          what it does                                                           runs on
============  =====================================================================  ==========
reference     a loop over local experts in plain torch (``moe_a2a.experts``)         cpu, cuda
grouped_mm    ``torch._grouped_mm``: one grouped GEMM per projection, no host read   cpu, cuda
auto          grouped_mm on CUDA with 16-bit weights, else reference                 cpu, cuda
============  =====================================================================  ==========

``grouped_mm`` never reads the device from the host (offsets are a device cumsum, rows past the
last offset are masked), so a layer that uses it can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type

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
from moe_a2a.experts import ReferenceExperts, UnsupportedDispatchFormat, _dequantized
from moe_a2a.weights import LocalExpertWeights

RUNNER_CHOICES = ("auto", "reference", "grouped_mm")


def _grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[M, K] x [G, N, K]^T`` per group of rows: ``torch._grouped_mm(x, w.mT, offs=offsets)``."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)


class GroupedMMExperts:
    """SwiGLU experts as ``torch._grouped_mm`` calls (gate, up, down): no per-expert loop, at
    most one device-to-host read (the routed-pair count, none inside a CUDA-graph capture);
    math in the weights' dtype, weighted sums accumulated in float32."""

    name = "grouped_mm"

    @classmethod
    def check_runnable(cls, device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
        """``(ok, reason)``: whether ``torch._grouped_mm`` runs here in ``dtype``, found out by
        running a tiny one (what it accepts depends on the torch build and the GPU)."""
        if not hasattr(torch, "_grouped_mm"):
            return False, f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)"
        key = (str(torch.device(device)), dtype)
        if key not in _PROBED:
            _PROBED[key] = _probe(torch.device(device), dtype)
        return _PROBED[key]

    def __call__(self, out: DispatchOutput, weights: LocalExpertWeights) -> torch.Tensor:
        for cls in type(out).__mro__:
            consumer = self._CONSUMERS.get(cls)
            if consumer is not None:
                return consumer(self, out, weights)
        raise UnsupportedDispatchFormat(
            f"GroupedMMExperts cannot consume a {type(out).__name__} (supported: "
            f"{', '.join(c.__name__ for c in self._CONSUMERS)})")

    def _pairs(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               order: torch.Tensor, counts: torch.Tensor, w: LocalExpertWeights,
               num_pairs: Optional[int] = None) -> torch.Tensor:
        """``[R, H]`` weighted sums over the (row, k) pairs, ``order`` grouping them by expert
        (the routed pairs first, ``counts`` per expert; the rest are not computed).

        Work scales with the routed pairs ``P``, not with ``R * K``: under EP most of a row's
        ``K`` pairs belong to other ranks (at ep 8 about three in four), and gathering,
        activating and scattering them cost more than the GEMMs (H200, DeepSeek-V3 shape, ep 8,
        4096 tokens per rank: 16.2 ms for all ``R * K`` pairs, 8.8 ms for the routed ones).
        ``P`` is ``num_pairs`` when the caller knows it on the host, otherwise one
        device-to-host read; inside a CUDA-graph capture (static shapes, no reads) all ``R * K``
        pairs go through the GEMMs, which compute only the routed ones, and the rest are
        zeroed.

        No atomics: router weights are folded into the activations before the down projection
        (it is linear), the outputs are put back in (row, k) order with one index copy and
        summed over k in float32 (on an H200 at 4096 tokens x top-8 this replaced a 3.2 ms
        float32 ``index_add_``).
        """
        rows_total, k = int(topk_ids.shape[0]), int(topk_ids.shape[1])
        if rows_total == 0 or k == 0:
            return torch.zeros(rows_total, x.shape[1], dtype=x.dtype, device=x.device)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        total = rows_total * k
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if num_pairs is None:
            num_pairs = total if capturing else int(offsets[-1])
        if num_pairs == 0:  # nothing routed here
            return torch.zeros(rows_total, x.shape[1], dtype=x.dtype, device=x.device)
        pairs = order[:num_pairs]
        xs = x.index_select(0, torch.div(pairs, k, rounding_mode="floor")).to(w.dtype)
        h = F.silu(_grouped(xs, w.w_gate, offsets)) * _grouped(xs, w.w_up, offsets)
        pair_w = topk_weights.reshape(-1).index_select(0, pairs)
        h = h * pair_w[:, None].to(h.dtype)
        y = _grouped(h, w.w_down, offsets)
        if capturing:  # rows past offsets[-1] were not computed
            routed = torch.arange(num_pairs, device=x.device) < offsets[-1]
            y = y.masked_fill(~routed[:, None], 0)
        # back to (row, k) order; a full permutation overwrites every slot
        per_pair = (torch.empty if num_pairs == total else torch.zeros)(
            total, y.shape[1], dtype=y.dtype, device=y.device)
        per_pair.index_copy_(0, pairs, y)
        return per_pair.view(rows_total, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)

    def _standard(self, out: StandardDispatchOutput, w: LocalExpertWeights) -> torch.Tensor:
        _check(out.hidden_states, w)
        return self._pairs(out.hidden_states, out.topk_ids, out.topk_weights, out.pair_order,
                           out.tokens_per_expert, w)

    def _deepep_normal(self, out: DeepEPNormalOutput, w: LocalExpertWeights) -> torch.Tensor:
        x = _dequantized(out.hidden_states, out.scales)  # FP8 payloads -> bf16
        _check(x, w)
        order = pair_order_by_expert(out.topk_ids, w.num_local_experts)
        counts = torch.tensor(out.num_recv_tokens_per_expert, dtype=torch.int64,
                              device=out.hidden_states.device)
        return self._pairs(x, out.topk_ids, out.topk_weights, order, counts, w,
                           num_pairs=sum(out.num_recv_tokens_per_expert))

    def _deepep_low_latency(self, out: DeepEPLowLatencyOutput, w: LocalExpertWeights) -> torch.Tensor:
        """Batched over experts on the whole masked buffer (padding rows computed, then zeroed)."""
        x = _dequantized(out.hidden_states, out.scales)  # FP8 payloads -> bf16
        if x.dim() != 3 or x.shape[0] != w.num_local_experts or x.shape[2] != w.hidden_size:
            raise MoeA2AError(f"low-latency hidden_states has shape {tuple(x.shape)}; expected "
                              f"[{w.num_local_experts}, cap * ep, {w.hidden_size}]")
        xs = x.to(w.dtype)
        h = F.silu(torch._grouped_mm(xs, w.w_gate.transpose(-2, -1))) * \
            torch._grouped_mm(xs, w.w_up.transpose(-2, -1))
        y = torch._grouped_mm(h, w.w_down.transpose(-2, -1))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < out.masked_m.to(x.device)[:, None]
        return torch.where(valid[:, :, None], y, torch.zeros((), dtype=y.dtype, device=y.device)).to(x.dtype)

    _CONSUMERS: Dict[Type[DispatchOutput], Callable] = {
        StandardDispatchOutput: _standard,
        DeepEPNormalOutput: _deepep_normal,
        DeepEPLowLatencyOutput: _deepep_low_latency,
    }


_PROBED: Dict[Tuple[str, torch.dtype], Tuple[bool, str]] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    try:
        x = torch.ones(32, 32, device=device, dtype=dtype)
        w = torch.ones(2, 32, 32, device=device, dtype=dtype)
        offsets = torch.tensor([16, 32], device=device, dtype=torch.int32)
        torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    except Exception as exc:  # the build or the GPU refuses this dtype: say so, exactly
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return False, (f"torch._grouped_mm refuses {dtype} on {device}: {first}; fix: --dtype "
                       f"bfloat16, or --moe-runner-backend reference")
    return True, ""


def _check(x: torch.Tensor, w: LocalExpertWeights) -> None:
    if x.dim() != 2 or x.shape[1] != w.hidden_size:
        raise MoeA2AError(f"dispatch output has hidden_states {tuple(x.shape)}; expected "
                          f"[R, {w.hidden_size}]")


def select_runner(name: str, device: torch.device, dtype: torch.dtype):
    """The runner ``--moe-runner-backend name`` asks for, or an error saying why it cannot run.

    ``auto`` picks ``grouped_mm`` on CUDA when it can run there, else ``reference`` (on CPU the
    per-expert loop is as fast as the grouped call and exact in every dtype).
    """
    device = torch.device(device)
    if name == "auto":
        ok, _ = GroupedMMExperts.check_runnable(device, dtype)
        return GroupedMMExperts() if device.type == "cuda" and ok else ReferenceExperts()
    if name == "reference":
        return ReferenceExperts()
    if name == "grouped_mm":
        ok, reason = GroupedMMExperts.check_runnable(device, dtype)
        if not ok:
            raise MoeA2AError(f"--moe-runner-backend grouped_mm cannot run on {device}: {reason}")
        return GroupedMMExperts()
    raise MoeA2AError(f"--moe-runner-backend {name!r} is not provided here; choose one of "
                      f"{', '.join(RUNNER_CHOICES)}")


__all__ = ["GroupedMMExperts", "RUNNER_CHOICES", "select_runner"]
