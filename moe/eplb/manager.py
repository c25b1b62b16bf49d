"""The EPLB manager: every ``--eplb-rebalance-num-iterations`` forwards, re-place the experts.

A ``StepObserver`` after the recorder: at the end of every N-th step (on every rank, so the
collectives match) it dumps the recorder (one all-reduce), computes a new placement from the
window's logical counts, keeps it only for the layers where it lowers the most loaded GPU's
load (so a rebalance never makes a layer worse for the counts it saw), moves the weights of
the layers that changed (``transfer``), switches the dispatch tables and empties the window.
Outputs do not change: every slot holds an exact copy of its logical expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.eplb.dispatch import ReplicaDispatch
from moe_a2a.eplb.location import ExpertLocation, utilization
from moe_a2a.eplb.recorder import ExpertDistributionRecorder
from moe_a2a.eplb.transfer import changed_layers, move_expert_weights, plan_moves
from moe_a2a.errors import MoeA2AError
from moe_a2a.step import StepContext, StepObserver


@dataclass(frozen=True, kw_only=True)
class RebalanceReport:
    """One rebalance, as every rank saw it.

    Attributes:
        forward: forwards counted when it ran.
        window_steps: steps in the recorder window it used.
        utilization_before: the window's utilisation under the placements in force.
        utilization_predicted: the window's counts under the new placement.
        layers_changed: layers whose placement changed.
        slots_received: slots this rank received from another rank.
        skipped: why nothing changed (no tokens, no better placement), else None.
    """

    forward: int
    window_steps: int
    utilization_before: float
    utilization_predicted: float
    layers_changed: Tuple[int, ...]
    slots_received: int
    skipped: Optional[str] = None


def better_location(current: ExpertLocation, counts: torch.Tensor, *, algorithm: str,
                    num_groups: Optional[int], num_nodes: int) -> ExpertLocation:
    """The rebalanced placement for ``counts [L, E]``, per layer only where it lowers the
    maximum GPU load (the others keep ``current``)."""
    proposed = ExpertLocation.from_counts(counts, current.num_physical_experts, current.ep_size,
                                          algorithm=algorithm, num_groups=num_groups,
                                          num_nodes=num_nodes)
    now = current.gpu_load(counts).max(dim=1).values
    then = proposed.gpu_load(counts).max(dim=1).values
    better = [int(i) for i in (then < now).nonzero().flatten()]
    return current.with_layers(proposed, better) if better else current


class EPLBManager(StepObserver):
    """Rebalances every ``every`` forwards (see the module docstring).

    Args:
        recorder: the stack's recorder (started here).
        replicas: the replica dispatch the layers' remaps read (updated in place).
        groups: this process's groups (EP group for the weight transfer).
        every: forwards between rebalances.
        algorithm / num_groups / num_nodes: the rebalance algorithm and its layout.
        layers_per_chunk: layers per weight all-to-all (None: all at once).
    """

    def __init__(self, *, recorder: ExpertDistributionRecorder, replicas: ReplicaDispatch,
                 groups: CommGroups, every: int, algorithm: str = "auto",
                 num_groups: Optional[int] = None, num_nodes: int = 1,
                 layers_per_chunk: Optional[int] = None) -> None:
        if every < 1:
            raise MoeA2AError(f"eplb rebalance interval {every} must be >= 1 forward")
        self.recorder = recorder
        self.replicas = replicas
        self.groups = groups
        self.every = every
        self.algorithm = algorithm
        self.num_groups = num_groups
        self.num_nodes = num_nodes
        self.layers_per_chunk = layers_per_chunk
        self.forwards = 0
        self.reports: List[RebalanceReport] = []
        self._layers: Sequence = ()
        recorder.start()

    def attach(self, layers: Sequence) -> None:
        """The layers whose weights move (``MoEStack.layers``, layer ``i`` at index ``i``)."""
        self._layers = list(layers)

    def on_step_end(self, step: StepContext) -> None:
        self.forwards += 1
        if self.forwards % self.every == 0:
            self.rebalance()

    def rebalance(self) -> RebalanceReport:
        """Rebalance now (collective: every rank calls it at the same point)."""
        if not self._layers:
            raise MoeA2AError("EPLBManager.rebalance: no layers attached; fix: call "
                              "EPLBRuntime.attach(stack) after building the stack")
        dump = self.recorder.dump()
        current = self.replicas.location
        counts = dump.logical_count
        before = dump.mean_utilization
        if int(counts.sum()) == 0:
            report = self._report(dump.num_steps, before, before, (), 0, "no tokens recorded")
        else:
            new = better_location(current, counts, algorithm=self.algorithm,
                                  num_groups=self.num_groups, num_nodes=self.num_nodes)
            predicted = float(utilization(new.gpu_load(counts)).mean())
            layers = changed_layers(current, new)
            received = self._move(current, new, layers) if layers else 0
            if layers:
                self.replicas.update(new)
            report = self._report(dump.num_steps, before, predicted, layers, received,
                                  None if layers else "no placement lowers the busiest GPU's load")
        self.recorder.reset()
        self.reports.append(report)
        return report

    def _move(self, old: ExpertLocation, new: ExpertLocation, layers: Tuple[int, ...]) -> int:
        g = self.groups
        views = {i: self._layers[i].get_moe_weights() for i in layers}
        received = move_expert_weights(views, plan_moves(old, new, layers), ep_rank=g.ep_rank,
                                       ep_size=g.ep_size, group=g.ep_group,
                                       layers_per_chunk=self.layers_per_chunk)
        for i in layers:  # a fused kernel keeps its own prepared copy of the weights
            fused = getattr(self._layers[i], "fused", None)
            if fused is not None:
                fused.prepare_weights(self._layers[i].experts.weights())
        return received

    def _report(self, steps: int, before: float, predicted: float, layers: Tuple[int, ...],
                received: int, skipped: Optional[str]) -> RebalanceReport:
        return RebalanceReport(forward=self.forwards, window_steps=steps,
                               utilization_before=before, utilization_predicted=predicted,
                               layers_changed=layers, slots_received=received, skipped=skipped)


__all__ = ["EPLBManager", "RebalanceReport", "better_location"]
