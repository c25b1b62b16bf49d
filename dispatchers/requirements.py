"""What a backend's kernels accept (dtypes, hidden sizes, top-k, EP sizes), as data.

Kernels compiled for fixed shapes fail deep inside a launch when given anything else. A
dispatcher (or fused backend) declares its limits with ``kernel_requirements(settings)``;
the limits are checked when it is built (``DispatcherError`` naming the value, the rule and
the kernel) and by ``moe-a2a run`` before any rank starts, which also picks its demo shape
from them (``default_*``) when the user did not give one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from moe_a2a.dispatchers.errors import DispatcherError

#: Fields a problem can be about (``moe-a2a run`` maps them to its flags).
FIELDS = ("dtype", "hidden_size", "intermediate_size", "top_k", "ep_size", "num_experts")


@dataclass(frozen=True)
class ShapeProblem:
    """One unmet requirement: ``field`` (one of ``FIELDS``), the value seen, the message."""

    field: str
    value: object
    message: str


@dataclass(frozen=True, kw_only=True)
class KernelRequirements:
    """Limits of one backend's kernels.

    Attributes:
        kernels: who sets the limits, for messages (e.g. ``"DeepEP low-latency kernels"``).
        dtypes: activation dtypes accepted (torch names, e.g. ``("bfloat16",)``); None = any.
        hidden_sizes: the only hidden sizes compiled; None = any meeting ``hidden_multiple``.
        hidden_multiple / intermediate_multiple: required divisors.
        max_top_k: most columns per token.
        ep_sizes: EP group sizes supported; None = any of at least ``min_ep_size``.
        min_ep_size: fewest EP ranks.
        max_local_experts: most experts on one rank.
    """

    kernels: str
    dtypes: Optional[Tuple[str, ...]] = None
    hidden_sizes: Optional[Tuple[int, ...]] = None
    hidden_multiple: int = 1
    intermediate_multiple: int = 1
    max_top_k: Optional[int] = None
    ep_sizes: Optional[Tuple[int, ...]] = None
    min_ep_size: int = 1
    max_local_experts: Optional[int] = None

    def problems(self, *, dtype: Optional[torch.dtype] = None, hidden_size: Optional[int] = None,
                 intermediate_size: Optional[int] = None, top_k: Optional[int] = None,
                 ep_size: Optional[int] = None,
                 num_experts: Optional[int] = None) -> List[ShapeProblem]:
        """Every unmet requirement for the values given (None = not checked)."""
        out: List[ShapeProblem] = []
        k = self.kernels
        if dtype is not None and self.dtypes is not None and dtype_name(dtype) not in self.dtypes:
            out.append(ShapeProblem("dtype", dtype_name(dtype),
                                    f"{k} take {' or '.join(self.dtypes)} activations, not "
                                    f"{dtype_name(dtype)}"))
        if hidden_size is not None:
            if self.hidden_sizes is not None and hidden_size not in self.hidden_sizes:
                out.append(ShapeProblem("hidden_size", hidden_size,
                                        f"{k} are compiled for hidden sizes "
                                        f"{', '.join(map(str, self.hidden_sizes))} only, not "
                                        f"{hidden_size}"))
            elif hidden_size % self.hidden_multiple:
                out.append(ShapeProblem("hidden_size", hidden_size,
                                        f"{k} need a hidden size divisible by "
                                        f"{self.hidden_multiple}, not {hidden_size}"))
        if intermediate_size is not None and intermediate_size % self.intermediate_multiple:
            out.append(ShapeProblem("intermediate_size", intermediate_size,
                                    f"{k} need an expert intermediate size divisible by "
                                    f"{self.intermediate_multiple}, not {intermediate_size}"))
        if top_k is not None and self.max_top_k is not None and top_k > self.max_top_k:
            out.append(ShapeProblem("top_k", top_k, f"{k} take at most {self.max_top_k} "
                                                    f"experts per token, not {top_k}"))
        if ep_size is not None and self.ep_sizes is not None and ep_size not in self.ep_sizes:
            out.append(ShapeProblem("ep_size", ep_size,
                                    f"{k} run on EP groups of {', '.join(map(str, self.ep_sizes))} "
                                    f"ranks, not {ep_size}"))
        elif ep_size is not None and ep_size < self.min_ep_size:
            out.append(ShapeProblem("ep_size", ep_size, f"{k} need at least {self.min_ep_size} "
                                                        f"EP ranks, not {ep_size}"))
        if (num_experts is not None and ep_size and self.max_local_experts is not None
                and num_experts // ep_size > self.max_local_experts):
            out.append(ShapeProblem("num_experts", num_experts,
                                    f"{k} hold at most {self.max_local_experts} experts per rank, "
                                    f"not {num_experts // ep_size}"))
        return out

    def check(self, who: str, **values) -> None:
        """Raise ``DispatcherError`` listing every problem of :meth:`problems`."""
        found = self.problems(**values)
        if found:
            raise DispatcherError(f"{who}: " + "; ".join(p.message for p in found)
                                  + "; fix: choose a supported shape/dtype, or another backend")

    def default_dtype(self, preferred: str) -> str:
        return preferred if self.dtypes is None or preferred in self.dtypes else self.dtypes[0]

    def default_hidden_size(self, preferred: int) -> int:
        """The supported hidden size closest above ``preferred`` (or the largest one)."""
        if self.hidden_sizes is not None:
            above = [h for h in sorted(self.hidden_sizes) if h >= preferred]
            return above[0] if above else max(self.hidden_sizes)
        return -(-preferred // self.hidden_multiple) * self.hidden_multiple

    def default_intermediate_size(self, preferred: int) -> int:
        return -(-preferred // self.intermediate_multiple) * self.intermediate_multiple

    def merged(self, other: "KernelRequirements", kernels: str) -> "KernelRequirements":
        """Both sets of limits at once (a mode that may run either kernel)."""
        def both(a, b):
            if a is None or b is None:
                return a if b is None else b
            return tuple(x for x in a if x in b)

        def lowest(a, b):
            return b if a is None else a if b is None else min(a, b)

        return KernelRequirements(
            kernels=kernels, dtypes=both(self.dtypes, other.dtypes),
            hidden_sizes=both(self.hidden_sizes, other.hidden_sizes),
            hidden_multiple=_lcm(self.hidden_multiple, other.hidden_multiple),
            intermediate_multiple=_lcm(self.intermediate_multiple, other.intermediate_multiple),
            max_top_k=lowest(self.max_top_k, other.max_top_k),
            ep_sizes=both(self.ep_sizes, other.ep_sizes),
            min_ep_size=max(self.min_ep_size, other.min_ep_size),
            max_local_experts=lowest(self.max_local_experts, other.max_local_experts))


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


__all__ = ["FIELDS", "KernelRequirements", "ShapeProblem", "dtype_name"]
