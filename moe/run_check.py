"""The verdict of ``moe-a2a run``: every layer output against its reference.

A wrong result never passes. Besides the largest error against a dtype tolerance, every layer
call is checked for non-finite values in its input, its output and its reference: ``max``
drops NaN (``max(0.0, nan) == 0.0``), so a NaN output would otherwise pass with "max abs err
0". The first non-finite value found on any rank is reported by step, layer and rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

#: What was non-finite, most telling first: a layer's input (the residual sum of the layers
#: before overflowed the dtype), its output (dispatch, experts or combine produced NaN/inf), or
#: the reference (the oracle itself overflowed: nothing can be compared).
NONFINITE_KINDS = ("input", "output", "reference")


def tolerance(dtype: torch.dtype, scale: float, fp8: bool = False) -> float:
    """Allowed max abs error for outputs of magnitude ``scale`` (``fp8``: some path rounds
    weights and activations to e4m3, 3 mantissa bits, twice per expert)."""
    if fp8:
        return 1e-1 * max(1.0, scale)
    if dtype == torch.float32:
        return 1e-4 * max(1.0, scale)
    return 2.5e-2 * max(1.0, scale)


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite value of the job, and how many layer calls had one, per kind."""

    kind: str          # one of NONFINITE_KINDS
    step: int
    layer: int
    rank: int
    counts: Dict[str, int]

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "layer": self.layer, "rank": self.rank,
                "counts": dict(self.counts)}


def describe_nonfinite(info: Dict[str, Any], dtype: str) -> str:
    """One line for a summary's ``nonfinite`` entry (``NonFinite.to_dict()``)."""
    layer = info["layer"]
    what = {"input": f"the input of layer {layer} (the residual sum of the layers before it) is "
                     f"not finite in {dtype}",
            "output": f"non-finite output (NaN or inf) of layer {layer}",
            "reference": f"the reference output of layer {layer} is not finite, so nothing could "
                         f"be compared"}[info["kind"]]
    counts = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in info["counts"].items() if n)
    return f"{what}, at step {info['step']} on rank {info['rank']} (non-finite layer calls: {counts})"


class OutputCheck:
    """Accumulates one rank's comparisons; :meth:`summary` reduces them over the job."""

    _NONE = -1

    def __init__(self, dtype: torch.dtype, rank: int, world_size: int, *, fp8: bool = False) -> None:
        self.dtype, self.rank, self.world_size, self.fp8 = dtype, rank, world_size, fp8
        self.max_err = self.max_scale = self.worst_ratio = 0.0
        self.counts = {k: 0 for k in NONFINITE_KINDS}
        self.first: Optional[tuple] = None  # (step, layer, kind index)

    def compare(self, step: int, layer: int, x: torch.Tensor, out: torch.Tensor,
                ref: torch.Tensor) -> None:
        """Check one layer call: input ``x [T, H]``, output ``out [T, H]`` (any float dtype)
        and reference ``ref [T, H]`` float32. One host read."""
        out32 = out.float()
        facts = torch.stack([
            torch.isfinite(x).all().float(), torch.isfinite(out32).all().float(),
            torch.isfinite(ref).all().float(),
            (out32 - ref).abs().max().float(), ref.abs().max().float()]).tolist()
        finite = dict(zip(NONFINITE_KINDS, facts[:3]))
        bad = [k for k in NONFINITE_KINDS if not finite[k]]
        for kind in bad:
            self.counts[kind] += 1
        if bad:
            if self.first is None:
                self.first = (step, layer, NONFINITE_KINDS.index(bad[0]))
            return
        err, scale = facts[3], facts[4]
        self.max_err, self.max_scale = max(self.max_err, err), max(self.max_scale, scale)
        self.worst_ratio = max(self.worst_ratio, err / tolerance(self.dtype, scale, self.fp8))

    def summary(self, device: torch.device) -> Dict[str, Any]:
        """The job's verdict, the same on every rank (two small all-reduces when distributed):
        ``passed``, ``max_abs_err``, ``tolerance``, ``nonfinite`` (None or the first one)."""
        maxed = torch.tensor([self.max_err, self.max_scale, self.worst_ratio], dtype=torch.float64)
        # per rank: its first non-finite (step, layer, kind) and its counts; others zero
        table = torch.zeros(self.world_size, 3 + len(NONFINITE_KINDS), dtype=torch.float64)
        first = self.first if self.first is not None else (self._NONE, self._NONE, self._NONE)
        table[self.rank] = torch.tensor([*first, *self.counts.values()], dtype=torch.float64)
        if self.world_size > 1:
            if device.type == "cuda":  # nccl reduces device tensors only
                maxed, table = maxed.to(device), table.to(device)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
            dist.all_reduce(table)
        max_err, max_scale, worst_ratio = maxed.tolist()
        nonfinite = None
        rows = [(int(s), int(layer), r, int(k)) for r, (s, layer, k, *_) in enumerate(table.tolist())
                if s != self._NONE]
        if rows:
            step, layer, rank, kind = min(rows)
            counts = table[:, 3:].sum(dim=0).tolist()
            nonfinite = NonFinite(kind=NONFINITE_KINDS[kind], step=step, layer=layer, rank=rank,
                                  counts={k: int(n) for k, n in zip(NONFINITE_KINDS, counts)})
        return {"passed": worst_ratio <= 1.0 and nonfinite is None,
                "max_abs_err": max_err,
                "tolerance": tolerance(self.dtype, max_scale, self.fp8),
                "nonfinite": None if nonfinite is None else nonfinite.to_dict()}


__all__ = ["NONFINITE_KINDS", "NonFinite", "OutputCheck", "describe_nonfinite", "tolerance"]
