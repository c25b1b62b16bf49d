"""Checks ``moe-a2a run`` makes before it starts any rank: what this machine can hold and run.

A request the machine cannot serve (4096 local ranks, ``--num-tokens 1000000000000``) is bad
input: refused up front with an estimate and the fix, instead of an allocator error in a worker.
The figures are estimates ("about"); they refuse only what clearly cannot fit. Nothing here
imports torch (CUDA figures import it lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from moe_a2a.errors import MoeA2AError

#: One local rank's interpreter, torch and process group before any tensor (measured: ~0.3 GiB).
RANK_PROCESS_BYTES = 384 << 20
#: Local CPU ranks per core before the job is more waiting than running.
RANKS_PER_CPU = 4
MIN_LOCAL_RANK_LIMIT = 4

SEED_LIMIT = 1 << 64
MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover - the loop returns


def available_memory() -> Optional[int]:
    """Bytes of host memory available to new processes (Linux ``MemAvailable``), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class ModelSize:
    """What one rank of ``moe-a2a run`` allocates, as sizes (from flags or an HF config)."""

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    shared_intermediate_size: int
    num_layers: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds: ``weights`` (every layer's global weights, its shard and the
    float32 oracle copy) plus ``per_token`` for each token of the largest DP batch."""

    weights: int
    per_token: int
    num_tokens: int

    @property
    def per_rank(self) -> int:
        return RANK_PROCESS_BYTES + self.weights + self.per_token * self.num_tokens

    def max_tokens(self, budget_per_rank: int) -> int:
        return max(0, (budget_per_rank - RANK_PROCESS_BYTES - self.weights) // max(1, self.per_token))


def estimate_memory(size: ModelSize, num_tokens: int, dtype: str, ep_size: int,
                    dp_size: int) -> MemoryEstimate:
    """About what one rank needs (see :class:`MemoryEstimate`)."""
    b = _DTYPE_BYTES.get(dtype, 4)
    e, k, h, i = size.num_experts, size.top_k, size.hidden_size, size.intermediate_size
    per_layer = e * 3 * h * i + 3 * h * size.shared_intermediate_size + e * h + e
    weights = size.num_layers * per_layer * (4 + 2 * b)
    # a token: its input, output, float copies, reference and difference rows; its routed
    # (token, expert) pairs sent, received and through the experts (twice the fair share)
    pairs = min(k, max(1, 2 * k // max(1, ep_size))) * dp_size
    per_token = h * 4 * 10 * dp_size + pairs * (3 * h * b + 3 * i * 4)
    return MemoryEstimate(weights=weights, per_token=per_token, num_tokens=num_tokens)


def check_memory(size: ModelSize, num_tokens: int, dtype: str, ep_size: int, dp_size: int,
                 local_ranks: int, device: str) -> None:
    """Refuse a job whose ranks clearly cannot fit in this machine's memory."""
    est = estimate_memory(size, num_tokens, dtype, ep_size, dp_size)
    if device == "cuda":
        budget, where = _gpu_free_memory(), "free on the smallest visible GPU"
        need, ranks_text = est.per_rank - RANK_PROCESS_BYTES, "one rank per GPU"
    else:
        budget, where = available_memory(), "available on this machine"
        need, ranks_text = est.per_rank * local_ranks, f"{local_ranks} local ranks"
    if budget is None or need <= budget:
        return
    per_rank_budget = budget if device == "cuda" else budget // max(1, local_ranks)
    fits = est.max_tokens(per_rank_budget + (RANK_PROCESS_BYTES if device == "cuda" else 0))
    if fits >= 1:
        fix = f"lower --num-tokens to about {fits} or less"
    else:
        fix = ("the weights alone do not fit: lower --num-layers, --num-experts, --hidden-size "
               "or --intermediate-size" + (", or --tp-size" if device != "cuda" else ""))
    raise MoeA2AError(
        f"--num-tokens {num_tokens} with this model needs about {format_bytes(need)} "
        f"({ranks_text}; per rank about {format_bytes(est.weights)} of weights and "
        f"{format_bytes(est.per_token * num_tokens)} for the tokens) but "
        f"{format_bytes(budget)} is {where}; fix: {fix}")


def local_rank_limit() -> int:
    """How many CPU ranks this machine can run at once: ``RANKS_PER_CPU`` per core (at least
    ``MIN_LOCAL_RANK_LIMIT``), and no more than its available memory holds."""
    by_cpu = max(MIN_LOCAL_RANK_LIMIT, RANKS_PER_CPU * (os.cpu_count() or 1))
    avail = available_memory()
    by_memory = by_cpu if avail is None else max(1, avail // RANK_PROCESS_BYTES)
    return min(by_cpu, by_memory)


def check_local_ranks(tp_size: int, device: str) -> None:
    """Refuse more local ranks than this machine can run, before any is started (CUDA: one
    GPU per rank, checked with the device)."""
    if device == "cuda":
        return
    limit = local_rank_limit()
    if tp_size > limit:
        avail = available_memory()
        mem = f", {format_bytes(avail)} of memory available" if avail is not None else ""
        raise MoeA2AError(
            f"--tp-size {tp_size} would start {tp_size} local rank processes; this machine "
            f"({os.cpu_count() or 1} CPUs{mem}) runs at most {limit} (up to {RANKS_PER_CPU} per "
            f"CPU, about {format_bytes(RANK_PROCESS_BYTES)} each); fix: lower --tp-size to "
            f"{limit} or less, or launch the ranks across machines with torchrun")


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        shown = str(seed) if len(str(seed)) <= 40 else f"{str(seed)[:30]}... ({len(str(seed))} digits)"
        raise MoeA2AError(f"--seed {shown} is out of range: seeds are unsigned 64-bit integers "
                          f"(0..{SEED_LIMIT - 1}); fix: pick a seed in that range")


def check_collective_timeout(seconds: float) -> None:
    if not 0 < seconds <= MAX_COLLECTIVE_TIMEOUT_S:
        raise MoeA2AError(f"--collective-timeout {seconds:g} is invalid: it must be > 0 and at "
                          f"most {MAX_COLLECTIVE_TIMEOUT_S:.0f} s (7 days); fix: give seconds, "
                          f"e.g. 600")


def _gpu_free_memory() -> Optional[int]:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    except (ImportError, RuntimeError):
        return None


__all__ = ["MemoryEstimate", "ModelSize", "available_memory", "check_collective_timeout",
           "check_local_ranks", "check_memory", "check_seed", "estimate_memory",
           "format_bytes", "local_rank_limit"]
