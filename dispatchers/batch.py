"""Per-step facts (and their agreement across ranks) and the routing choice a dispatcher receives.

* :class:`PhysicalTopK` — what dispatchers see: global *physical* expert ids (after EPLB's
  logical→physical remap and after fused shared-expert columns were appended).
* :class:`BatchInfo` — the step's facts (forward mode, token counts), agreed across every
  rank once per step (:func:`agree_batch`), passed to
  ``dispatch(..., batch=...)``. ``auto`` modes and per-step capacity rules decide from it, so
  every rank decides the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from moe_a2a.dispatchers.errors import DispatcherError


class ForwardMode(str, enum.Enum):
    """What a DP rank's batch does in this step."""

    PREFILL = "prefill"  # prompt tokens (prefill / extend chunks)
    DECODE = "decode"    # one new token per running request
    MIXED = "mixed"      # prefill and decode tokens in one batch
    IDLE = "idle"        # no tokens on this DP rank (it still joins every collective)

    @property
    def prefills(self) -> bool:
        return self in (ForwardMode.PREFILL, ForwardMode.MIXED)


_MODES: Tuple[ForwardMode, ...] = tuple(ForwardMode)


@dataclass(frozen=True, kw_only=True)
class BatchInfo:
    """The facts of one forward step, as one DP rank sees them.

    Attributes:
        forward_mode: this DP rank's batch (``IDLE`` when it has no tokens).
        num_tokens: tokens of this DP rank's batch, before any attention-TP split.
        dp_num_tokens: every DP rank's ``num_tokens`` in DP-rank order, or None when the step
            was not agreed across ranks (then only local facts are known).
        dp_forward_modes: every DP rank's mode, in DP-rank order (None when not agreed).
        capturing: the step is captured into (or replayed from) a CUDA graph: shapes are
            fixed and no host synchronisation may happen.
    """

    forward_mode: ForwardMode
    num_tokens: int
    dp_num_tokens: Optional[Tuple[int, ...]] = None
    dp_forward_modes: Optional[Tuple[ForwardMode, ...]] = None
    capturing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "forward_mode", ForwardMode(self.forward_mode))
        if not isinstance(self.num_tokens, int) or self.num_tokens < 0:
            raise DispatcherError(f"BatchInfo.num_tokens={self.num_tokens!r} must be an int >= 0")
        if (self.dp_num_tokens is None) != (self.dp_forward_modes is None):
            raise DispatcherError("BatchInfo: dp_num_tokens and dp_forward_modes are agreed "
                                  "together; fix: give both or neither (use agree_batch)")
        if self.dp_num_tokens is not None and self.dp_forward_modes is not None:
            sizes = tuple(int(n) for n in self.dp_num_tokens)
            modes = tuple(ForwardMode(m) for m in self.dp_forward_modes)
            if len(sizes) != len(modes) or not sizes or any(n < 0 for n in sizes):
                raise DispatcherError(
                    f"BatchInfo: dp_num_tokens={sizes} and dp_forward_modes={modes} must list "
                    f"one entry per DP rank (counts >= 0)")
            object.__setattr__(self, "dp_num_tokens", sizes)
            object.__setattr__(self, "dp_forward_modes", modes)

    @classmethod
    def single(cls, num_tokens: int, forward_mode: ForwardMode = ForwardMode.PREFILL) -> "BatchInfo":
        """The agreed facts of a job with one DP rank (nothing to exchange)."""
        mode = ForwardMode.IDLE if num_tokens == 0 else ForwardMode(forward_mode)
        return cls(forward_mode=mode, num_tokens=num_tokens, dp_num_tokens=(num_tokens,),
                   dp_forward_modes=(mode,))

    @property
    def agreed(self) -> bool:
        return self.dp_num_tokens is not None

    @property
    def dp_size(self) -> int:
        return len(self.dp_num_tokens) if self.dp_num_tokens is not None else 1

    @property
    def max_num_tokens(self) -> int:
        """The largest DP rank's batch (DP-global when agreed, else this rank's)."""
        return max(self.dp_num_tokens) if self.dp_num_tokens is not None else self.num_tokens

    @property
    def global_num_tokens(self) -> int:
        return sum(self.dp_num_tokens) if self.dp_num_tokens is not None else self.num_tokens

    @property
    def any_prefill(self) -> bool:
        """Some DP rank prefills in this step (``auto`` modes pick prefill kernels then)."""
        modes = self.dp_forward_modes if self.dp_forward_modes is not None else (self.forward_mode,)
        return any(m.prefills for m in modes)

    def require_agreed(self, what: str) -> None:
        if not self.agreed:
            raise DispatcherError(
                f"{what} decides per step from facts every rank must share, but this BatchInfo "
                f"was not agreed across ranks; fix: build it with "
                f"moe_a2a.dispatchers.agree_batch (MoEStack.begin_step does) or BatchInfo.single")

    def max_tokens_per_rank(self, attn_tp_size: int = 1, scattered: bool = True) -> int:
        """The most tokens one rank's kernel receives from the router in this step.

        Scattered layouts split each DP rank's batch over its ``attn_tp_size`` ranks
        (``torch.tensor_split`` sizes: the first rank gets the ceiling).
        """
        top = self.max_num_tokens
        return -(-top // attn_tp_size) if scattered else top


@dataclass(frozen=True)
class PhysicalTopK:
    """The routing choice dispatchers see, for ``T`` tokens.

    Attributes:
        ids: ``[T, K]`` int64 global *physical* expert ids in ``[0, E_physical)``; ``-1`` = no
            expert in this column. Fused shared-expert columns, when present, are the last ones.
        weights: ``[T, K]`` float32 weights (routed scaling factor applied; 0 where ``-1``).
    """

    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])


#: The name dispatchers used before routing stages became types.
TopK = PhysicalTopK



# --------------------------------------------------------------------------- agreement

_MODE_CODE = {mode: i for i, mode in enumerate(_MODES)}


def agree_batch(groups, *, num_tokens: int, forward_mode: ForwardMode = ForwardMode.PREFILL,
                capturing: bool = False, device: Optional[torch.device] = None) -> BatchInfo:
    """Agree the step's facts across every rank: one small all-gather and one host read.

    Call once per step (``MoEStack.begin_step`` does), on every rank of the world, with this
    DP rank's batch. The attention-TP ranks of a DP rank must report the same batch; a
    disagreement is an error naming the ranks (it would silently mis-route tokens otherwise).

    Args:
        groups: this process's ``CommGroups``.
        num_tokens: this DP rank's tokens (before any attention-TP split).
        forward_mode: this DP rank's mode (``IDLE`` is implied by ``num_tokens == 0``).
        device: where the small tensor lives (a CUDA device for nccl).
    Returns:
        an agreed ``BatchInfo`` (identical ``dp_*`` fields on every rank).
    """
    from moe_a2a.dispatchers.collectives import gather_into

    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise DispatcherError(f"agree_batch: num_tokens={num_tokens!r} must be an int >= 0")
    mode = ForwardMode.IDLE if num_tokens == 0 else ForwardMode(forward_mode)
    if groups.world_group is None:
        return BatchInfo(forward_mode=mode, num_tokens=num_tokens, dp_num_tokens=(num_tokens,),
                         dp_forward_modes=(mode,), capturing=capturing)
    world, atp = groups.world_size, groups.attn_tp_size
    mine = torch.tensor([num_tokens, _MODE_CODE[mode]], dtype=torch.int64, device=device)
    everyone = torch.empty(2 * world, dtype=torch.int64, device=device)
    gather_into(everyone, mine, groups.world_group)
    rows = everyone.view(world, 2).tolist()  # the step's one host read
    for rank, row in enumerate(rows):
        lead = rows[(rank // atp) * atp]
        if row != lead:
            raise DispatcherError(
                f"agree_batch: ranks {(rank // atp) * atp} and {rank} share DP rank "
                f"{rank // atp} but report different batches ({lead[0]} tokens/"
                f"{_MODES[lead[1]].value} vs {row[0]}/{_MODES[row[1]].value}); fix: give every "
                f"attention-TP rank of a DP rank the same batch")
    lead_rows = rows[::atp]
    return BatchInfo(forward_mode=mode, num_tokens=num_tokens,
                     dp_num_tokens=tuple(r[0] for r in lead_rows),
                     dp_forward_modes=tuple(_MODES[r[1]] for r in lead_rows), capturing=capturing)


__all__ = ["BatchInfo", "ForwardMode", "PhysicalTopK", "TopK", "agree_batch"]
