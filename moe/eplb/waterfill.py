"""Waterfill: each token's shared expert computed on the least-loaded EP rank.

With fused shared experts every token carries one more column: its shared expert, which any
rank can compute (each holds a copy in its shared slot). Waterfill picks that rank per token
so that routed + shared work levels out, like water filling the lowest ranks first:

* ``load[r]``: routed (token, column) pairs going to rank ``r``; ``tokens``: shared work to place.
  Static mode uses this rank's own tokens only (local counts, no communication); dynamic mode
  sums the loads and token counts over the EP group (one all-reduce of ``2 * ep`` integers).
* water level ``target = ceil((sum(load) + tokens) / ep)``; deficit ``d[r] = max(target - load[r], 0)``.
* candidate ranks: all of them when every rank is below the level; otherwise this rank and the
  ranks the token already goes to (its row is sent there anyway: no extra traffic), or, when
  none of those is below the level, every rank that is.
* each token draws a candidate with probability proportional to its deficit, from a
  counter-based hash of (row, source rank, layer, seed): deterministic per token. Expected
  shared work on rank ``r`` is at most ``d[r]``.
* no rank below the level, or fewer than ``min_batch`` tokens on this rank: own rank.

Every token has exactly one shared column, so its shared expert is computed exactly once.
Only scattered layouts can use it (each token is routed by one rank). Nothing here reads the
device: the draws are tensor operations.
"""

from __future__ import annotations

import torch

from moe_a2a.dispatchers.collectives import all_reduce
from moe_a2a.eplb.hashing import hash_index, salt

#: Batches smaller than this keep their shared expert on their own rank (SGLang uses 64).
MIN_BATCH_FOR_BALANCE = 64


def waterfill_ranks(ids: torch.Tensor, *, routed_per_rank: int, ep_size: int, ep_rank: int,
                    group=None, dynamic: bool = False, min_batch: int = MIN_BATCH_FOR_BALANCE,
                    salt_value: int = 0) -> torch.Tensor:
    """The rank computing each token's shared expert.

    Args:
        ids: ``[T, K]`` int64 physical routed ids (before interleaving), ``-1`` = none.
        routed_per_rank: ``L``, routed slots per EP rank.
        ep_size / ep_rank: the EP group and this rank's place in it.
        group: the EP process group (dynamic mode; ``None`` with one rank).
        dynamic: sum loads over the EP group (one all-reduce, on every rank, every call).
        min_batch: fewer tokens than this on this rank keep the shared expert local.
        salt_value: folded into the per-token draw (layer, seed).
    Returns:
        ``[T]`` int64 ranks in ``[0, ep_size)``.
    """
    num_tokens = int(ids.shape[0])
    device = ids.device
    dest = torch.where(ids >= 0, torch.div(ids, routed_per_rank, rounding_mode="floor"),
                       torch.full_like(ids, ep_size))                               # [T, K]
    load = torch.zeros(ep_size + 1, dtype=torch.int64, device=device)
    load.scatter_add_(0, dest.reshape(-1), torch.ones_like(dest).reshape(-1))
    load = load[:ep_size]
    tokens = torch.full((), num_tokens, dtype=torch.int64, device=device)
    if dynamic:
        both = torch.zeros(2 * ep_size, dtype=torch.int64, device=device)
        both[:ep_size] = load
        both[ep_size + ep_rank] = num_tokens
        all_reduce(both, group)       # every rank, every call: collectives stay matched
        load, tokens = both[:ep_size], both[ep_size:].sum()
    own = torch.full((num_tokens,), ep_rank, dtype=torch.int64, device=device)
    if num_tokens < min_batch:
        return own
    target = torch.div(load.sum() + tokens + ep_size - 1, ep_size, rounding_mode="floor")
    deficit = (target - load).clamp_min(0)                                           # [ep]
    visited = torch.zeros(num_tokens, ep_size + 1, dtype=torch.bool, device=device)
    visited.scatter_(1, dest, True)
    visited = visited[:, :ep_size]
    visited[:, ep_rank] = True
    allowed = visited | (load.max() <= target)                                       # [T, ep]
    weight = deficit.unsqueeze(0) * allowed                                          # [T, ep]
    total = weight.sum(dim=1, keepdim=True)                                          # [T, 1]
    # no allowed rank below the level: any rank below it (the row travels once more)
    weight = torch.where(total > 0, weight, deficit.unsqueeze(0).expand_as(weight))
    total = weight.sum(dim=1)                                                        # [T]
    rows = torch.arange(num_tokens, device=device)
    draw = hash_index(rows, salt((salt_value, ep_rank))) % total.clamp_min(1)
    chosen = (weight.cumsum(dim=1) > draw.unsqueeze(1)).to(torch.int64).argmax(dim=1)
    return torch.where(total > 0, chosen, own)


__all__ = ["MIN_BATCH_FOR_BALANCE", "waterfill_ranks"]
