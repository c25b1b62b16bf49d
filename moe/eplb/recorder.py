"""The expert distribution recorder: how many tokens each logical expert got, per layer.

A ``StepObserver`` the stack owns. ``observe`` adds one layer's logical ids into the step's
``[L, E]`` device counters (a scatter-add: no host read); ``on_step_end`` files the step into a
window (the last ``buffer_size`` steps, or all of them with ``-1``). ``dump()`` is collective
(every rank calls it): counts are summed over the window and over the ranks.

Each token is counted once: under the replicated layout every attention-TP rank routes the
same rows, so only attention-TP rank 0 counts them; under the scattered layout each rank routes
its own slice and counts it. Fused shared columns never reach the recorder (it sees the
router's ``LogicalTopK``).

Modes: ``stat`` (window sums), ``per_pass`` (also each step's counts), ``per_token`` (also this
rank's routed ids per step and layer, with their rows in the DP batch).

Utilisation: per step, the load the placement in force gives each GPU (each logical expert's
tokens split evenly over its replicas); per layer ``mean / max`` of the window's GPU loads.
1.0 is perfect balance; ``1 / ep`` is one GPU doing everything.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Tuple

import torch

from moe_a2a.dispatchers.collectives import all_reduce
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.eplb.location import ExpertLocation, utilization
from moe_a2a.errors import MoeA2AError
from moe_a2a.routing import LogicalTopK
from moe_a2a.step import RowSpan, StepContext, StepObserver

RECORDER_MODES = ("stat", "per_pass", "per_token")


@dataclass(frozen=True, kw_only=True)
class TokenRecord:
    """``per_token``: one layer's routed ids for the rows this rank counted in one step.

    Attributes:
        step: the step index; layer: the layer id.
        row_start: the first row's index in the DP batch; dp_rank: whose batch.
        ids: ``[n, K]`` int64 logical ids (CPU).
    """

    step: int
    layer: int
    dp_rank: int
    row_start: int
    ids: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class DistributionDump:
    """What ``ExpertDistributionRecorder.dump`` returns (identical on every rank, except
    ``token_records``, which are this rank's own).

    Attributes:
        mode: the recorder mode.
        num_steps: steps in the window.
        logical_count: ``[L, E]`` int64 tokens per logical expert, window and ranks summed.
        gpu_load: ``[L, ep]`` float64 load per GPU under the placements in force.
        utilization: ``[L]`` float64 mean / max of ``gpu_load`` per layer.
        step_counts: ``per_pass``/``per_token``: ``[S, L, E]`` int64 per step (ranks summed).
        token_records: ``per_token``: this rank's ``TokenRecord`` list.
    """

    mode: str
    num_steps: int
    logical_count: torch.Tensor
    gpu_load: torch.Tensor
    utilization: torch.Tensor
    step_counts: Optional[torch.Tensor] = None
    token_records: Tuple[TokenRecord, ...] = ()

    @property
    def mean_utilization(self) -> float:
        """Utilisation averaged over layers (1.0 when nothing was recorded)."""
        return float(self.utilization.mean()) if self.utilization.numel() else 1.0


class ExpertDistributionRecorder(StepObserver):
    """Counts logical expert choices per layer over a window of steps.

    Args:
        num_layers / num_logical_experts: ``L`` and ``E``.
        groups: this process's groups (which rank counts which rows; the dump's all-reduce).
        mode: ``stat``, ``per_pass`` or ``per_token``.
        buffer_size: steps kept (``-1`` or None: unbounded).
        location: returns the placement in force (for GPU loads); None: ``E`` experts split
            contiguously over the EP ranks.
        device: where the counters live.
    """

    def __init__(self, *, num_layers: int, num_logical_experts: int, groups: CommGroups,
                 mode: str = "stat", buffer_size: Optional[int] = None,
                 location: Optional[Callable[[], ExpertLocation]] = None,
                 device: torch.device = torch.device("cpu")) -> None:
        if mode not in RECORDER_MODES:
            raise MoeA2AError(f"expert distribution recorder mode {mode!r} is unknown: use one of "
                              f"{', '.join(RECORDER_MODES)}")
        if buffer_size is not None and buffer_size != -1 and buffer_size < 1:
            raise MoeA2AError(f"recorder buffer size {buffer_size} must be >= 1 or -1 (unbounded)")
        self.num_layers = num_layers
        self.num_logical_experts = num_logical_experts
        self.groups = groups
        self.mode = mode
        self.buffer_size = None if buffer_size in (None, -1) else buffer_size
        self.device = device
        if location is None:
            trivial = ExpertLocation.trivial(num_layers, num_logical_experts, 0, groups.ep_size)
            location = lambda: trivial  # noqa: E731
        self._location = location
        self._share: Optional[Tuple[ExpertLocation, torch.Tensor]] = None  # cached gpu_share()
        self._recording = False
        self._step_counts: Optional[torch.Tensor] = None
        self._step_records: List[TokenRecord] = []
        self._window: Deque[Tuple[torch.Tensor, torch.Tensor, Tuple[TokenRecord, ...]]] = \
            deque(maxlen=self.buffer_size)

    # ---- control ------------------------------------------------------------------------

    @property
    def recording(self) -> bool:
        return self._recording

    def start(self) -> None:
        """Start recording (from the next step). Start, stop and reset on every rank at the
        same step: ``dump`` sums the ranks' windows step by step."""
        self._recording = True

    def stop(self) -> None:
        """Stop recording; the window is kept until ``reset`` or the next ``dump``."""
        self._recording = False

    def reset(self) -> None:
        """Empty the window."""
        self._window.clear()

    @property
    def num_steps(self) -> int:
        return len(self._window)

    # ---- observer -----------------------------------------------------------------------

    def on_step_begin(self, step: StepContext) -> None:
        self._step_counts = None
        self._step_records = []
        if self._recording:
            self._step_counts = torch.zeros(self.num_layers, self.num_logical_experts,
                                            dtype=torch.int64, device=self.device)

    def observe(self, layer_id: int, topk: LogicalTopK, rows: RowSpan, step: StepContext) -> None:
        counts = self._step_counts
        if counts is None or not (rows.scattered or step.groups.attn_tp_rank == 0):
            return  # not recording, or another rank counts these rows
        ids = topk.ids.reshape(-1).to(counts.device)
        counts[layer_id].scatter_add_(0, ids, torch.ones_like(ids))
        if self.mode == "per_token":
            self._step_records.append(TokenRecord(step=step.index, layer=layer_id,
                                                  dp_rank=step.groups.dp_rank,
                                                  row_start=rows.start, ids=topk.ids))

    def on_step_end(self, step: StepContext) -> None:
        counts = self._step_counts
        if counts is None:
            return
        load = self._gpu_load(counts)
        self._window.append((counts, load, tuple(self._step_records)))
        self._step_counts, self._step_records = None, []

    def _gpu_load(self, counts: torch.Tensor) -> torch.Tensor:
        location = self._location()
        if self._share is None or self._share[0] is not location:
            self._share = (location, location.gpu_share().to(counts.device))
        return torch.einsum("le,leg->lg", counts.to(torch.float64), self._share[1])

    # ---- dump ---------------------------------------------------------------------------

    def dump(self) -> DistributionDump:
        """The window, summed over every rank (collective: call it on every rank)."""
        ep = self.groups.ep_size
        layers, experts = self.num_layers, self.num_logical_experts
        steps = len(self._window)
        per_step = self.mode != "stat"
        if steps:
            counts = torch.stack([c for c, _, _ in self._window]).to(torch.float64)   # [S, L, E]
            loads = torch.stack([g for _, g, _ in self._window])                     # [S, L, ep]
        else:
            counts = torch.zeros(0, layers, experts, dtype=torch.float64, device=self.device)
            loads = torch.zeros(0, layers, ep, dtype=torch.float64, device=self.device)
        # one all-reduce (float64 is exact for counts below 2**53)
        if per_step:
            packed = torch.cat([counts.reshape(-1), loads.reshape(-1)])
        else:
            packed = torch.cat([counts.sum(0).reshape(-1), loads.sum(0).reshape(-1)])
        all_reduce(packed, self.groups.world_group)
        packed = packed.cpu()
        if per_step:
            step_counts = packed[:counts.numel()].view(steps, layers, experts).round().to(torch.int64)
            gpu_load = packed[counts.numel():].view(steps, layers, ep).sum(0)
            total = step_counts.sum(0)
        else:
            step_counts = None
            total = packed[:layers * experts].view(layers, experts).round().to(torch.int64)
            gpu_load = packed[layers * experts:].view(layers, ep)
        records: Tuple[TokenRecord, ...] = ()
        if self.mode == "per_token":
            records = tuple(TokenRecord(step=r.step, layer=r.layer, dp_rank=r.dp_rank,
                                        row_start=r.row_start, ids=r.ids.cpu())
                            for _, _, step_records in self._window for r in step_records)
        return DistributionDump(mode=self.mode, num_steps=steps, logical_count=total,
                                gpu_load=gpu_load, utilization=utilization(gpu_load),
                                step_counts=step_counts, token_records=records)


__all__ = ["DistributionDump", "ExpertDistributionRecorder", "RECORDER_MODES", "TokenRecord"]
