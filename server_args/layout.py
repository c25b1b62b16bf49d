"""Rank math in one place: which rank belongs to which attention and MoE group.

``ParallelLayout`` is torch-free and frozen. ``ServerArgs.layout`` builds it from the resolved
sizes; the model side (``moe_a2a.parallel``) creates its process groups from
``layout_groups()``. Ranks are numbered ``0 .. tp_size-1``:

- attention: ``attn_dp_size`` groups of ``attn_tp_size`` consecutive ranks
  (``rank = attn_dp_rank * attn_tp_size + attn_tp_rank``);
- MoE: ``ep_size`` groups of ``moe_tp_size`` consecutive ranks that split each of their
  experts by the intermediate dimension (``rank = moe_ep_rank * moe_tp_size + moe_tp_rank``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from moe_a2a.server_args.errors import ConfigError

# The four group kinds of ``layout_groups()`` (documented in ``moe_a2a.dispatchers.groups``).
GROUP_KINDS = ("attn_tp", "attn_dp", "moe_tp", "ep")


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


@dataclass(frozen=True)
class ParallelLayout:
    """The three sizes that fix every rank's place; everything else is derived.

    Attributes:
        tp_size: ranks of one model replica (the MoE job).
        attn_dp_size: attention data-parallel groups (dp_size under DP attention, else 1).
        ep_size: expert-parallel groups; each holds ``num_experts / ep_size`` experts.

    Raises:
        ConfigError: a size below 1, or tp_size not divisible by attn_dp_size or ep_size.
    """

    tp_size: int
    attn_dp_size: int = 1
    ep_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tp_size", "attn_dp_size", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if self.tp_size % self.attn_dp_size:
            raise ConfigError(
                f"tp_size={self.tp_size} is not divisible by the attention dp size "
                f"{self.attn_dp_size}: choose --dp-size dividing --tp-size (one of "
                f"{_divisors(self.tp_size)})")
        if self.tp_size % self.ep_size:
            raise ConfigError(
                f"tp_size={self.tp_size} is not divisible by ep_size={self.ep_size}: "
                f"choose --ep-size dividing --tp-size (one of {_divisors(self.tp_size)})")

    @property
    def attn_tp_size(self) -> int:
        """Ranks of one attention-TP group (they hold one DP rank's tokens)."""
        return self.tp_size // self.attn_dp_size

    @property
    def moe_tp_size(self) -> int:
        """Ranks that split one expert by its intermediate dimension."""
        return self.tp_size // self.ep_size

    def sizes(self) -> Dict[str, int]:
        """The derived sizes, as ``moe-a2a config`` reports them."""
        return {"attn_dp_size": self.attn_dp_size, "attn_tp_size": self.attn_tp_size,
                "moe_tp_size": self.moe_tp_size}

    def _rank(self, rank: int) -> int:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.tp_size:
            raise ConfigError(f"rank {rank!r} is outside 0..{self.tp_size - 1} (tp_size="
                              f"{self.tp_size}); fix: pass a rank of this job")
        return rank

    def attn_dp_rank(self, rank: int) -> int:
        """Which attention-DP group ``rank`` is in."""
        return self._rank(rank) // self.attn_tp_size

    def attn_tp_rank(self, rank: int) -> int:
        """``rank``'s position inside its attention-TP group."""
        return self._rank(rank) % self.attn_tp_size

    def moe_ep_rank(self, rank: int) -> int:
        """Which expert-parallel group (set of experts) ``rank`` serves."""
        return self._rank(rank) // self.moe_tp_size

    def moe_tp_rank(self, rank: int) -> int:
        """``rank``'s slice of the intermediate dimension inside its expert group."""
        return self._rank(rank) % self.moe_tp_size

    def layout_groups(self) -> Dict[str, List[List[int]]]:
        """Rank lists of every group kind: ``attn_tp``, ``attn_dp``, ``moe_tp``, ``ep``.

        Group ``i`` of ``attn_tp`` holds the ranks with ``attn_dp_rank == i`` in attn_tp order;
        ``attn_dp`` group ``j`` the ranks with ``attn_tp_rank == j``; likewise ``moe_tp`` (by
        ``moe_ep_rank``) and ``ep`` (by ``moe_tp_rank``).
        """
        tp, atp, mtp = self.tp_size, self.attn_tp_size, self.moe_tp_size
        return {
            "attn_tp": [list(range(d * atp, (d + 1) * atp)) for d in range(self.attn_dp_size)],
            "attn_dp": [list(range(t, tp, atp)) for t in range(atp)],
            "moe_tp": [list(range(e * mtp, (e + 1) * mtp)) for e in range(self.ep_size)],
            "ep": [list(range(m, tp, mtp)) for m in range(mtp)],
        }

    @classmethod
    def from_server_args(cls, args) -> "ParallelLayout":
        """The layout of resolved ``ServerArgs`` (``args.layout``)."""
        return cls(tp_size=args.tp_size, attn_dp_size=args.attn_dp_size, ep_size=args.ep_size)

    def split(self, tokens: int, scattered: bool) -> int:
        """The most tokens one rank's kernel receives from a DP rank's batch of ``tokens``:
        scattered layouts split it over the attention-TP ranks (the fullest rank counts)."""
        return -(-tokens // self.attn_tp_size) if scattered else tokens
