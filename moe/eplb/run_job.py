"""What ``moe-a2a run`` adds for EPLB: skewed routing and the ``eplb`` block of the summary."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import torch

from moe_a2a.errors import MoeA2AError
from moe_a2a.weights import MoEWeights

#: Seed stream of the hot experts (apart from the weights' own streams).
_HOT_SEED = 424_242


def hot_experts(num_experts: int, seed: int) -> torch.Tensor:
    """The experts ``--routing-skew`` favours: ``max(1, E // 8)`` of them, seeded."""
    gen = torch.Generator().manual_seed(_HOT_SEED + seed)
    return torch.randperm(num_experts, generator=gen)[:max(1, num_experts // 8)].sort().values


def skew_routing(weights: MoEWeights, skew: float, seed: int) -> MoEWeights:
    """Add ``skew`` to the score-correction bias of the hot experts: the router picks them far
    more often (selection only; the weights of the chosen experts are unbiased scores, so the
    single-process reference, built from the same weights, sees the same routing)."""
    if not math.isfinite(skew) or skew < 0:
        raise MoeA2AError(f"--routing-skew {skew} must be a finite number >= 0 (0 = no skew)")
    if skew == 0:
        return weights
    if weights.correction_bias is None:
        raise MoeA2AError("--routing-skew biases the router's score-correction bias, which this "
                          "model has none of; fix: drop --routing-skew or --hf-config")
    bias = weights.correction_bias.clone()
    bias[hot_experts(weights.num_logical_experts, seed)] += skew
    return dataclasses.replace(weights, correction_bias=bias)


def run_summary(runtime: Any) -> Dict[str, Any]:
    """The ``eplb`` block of the run summary (collective: the recorder dumps).

    ``utilization_before`` is measured over the steps before the first rebalance (initial
    placement), ``utilization_after`` over every step after it (rebalanced placements), each
    window weighted by its steps; None when there was no such step.
    """
    out = runtime.summary()
    reports = out.get("rebalances", [])
    before: Optional[float] = None
    after: Optional[float] = None
    if reports:
        before = reports[0]["utilization_before"]
        windows = [(r["utilization_before"], r["window_steps"]) for r in reports[1:]]
        if out.get("window_steps"):
            windows.append((out["utilization_now"], out["window_steps"]))
        steps = sum(n for _, n in windows)
        if steps:
            after = sum(u * n for u, n in windows) / steps
    elif out.get("window_steps"):
        before = out["utilization_now"]
    out["utilization_before"] = before
    out["utilization_after"] = after
    return out


__all__ = ["hot_experts", "run_summary", "skew_routing"]
