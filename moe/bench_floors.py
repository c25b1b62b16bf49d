"""The two floors ``moe-a2a bench`` times beside every backend, in plain torch (no library code).

* **Floor (a)**, the least work any all-to-all must do: one gather of the rows into the send
  buffer (each token once per destination rank that owns one of its experts), two raw
  ``all_to_all_single`` calls carrying exactly those rows there and back, and one weighted
  scatter-add back into token order. Everything that depends only on the routing (the send
  order, the splits, each row's weight) is computed when the floor is built, outside the
  timed region, including the exchange of the counts. The buffers of the moved rows are
  allocated once; only the result is a fresh tensor (as a layer's output must be).
* **Floor (b)**, the replicated alternative: all-gather the hidden states of every rank, then
  reduce-scatter ``[W * T, H]`` back to ``[T, H]`` (what ``none`` moves under DP attention).

Both are deliberately written with ``torch`` and ``torch.distributed`` calls only, so that a
bug or a slowdown in the library cannot move its own yardstick. The one concession is the
wire dtype on gloo, which (depending on the torch release) has no bfloat16: data movement then
views bfloat16 as float16 (same bytes) and the reduction runs in float32.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives; older releases have only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _on_gloo(group) -> bool:
    return str(dist.get_backend(group)).lower() == "gloo"


def _wire(x: torch.Tensor, gloo: bool) -> torch.Tensor:
    return x.view(torch.float16) if gloo and x.dtype == torch.bfloat16 else x


class FloorA:
    """One gather, two exact-split all-to-alls, one weighted scatter-add.

    Args:
        hidden: ``[T, H]`` this rank's tokens (any float dtype; not modified).
        topk_ids: ``[T, K]`` int64 global physical expert ids, ``-1`` = no expert.
        topk_weights: ``[T, K]`` float32.
        num_local_experts: ``E_local``; expert ``e`` lives on rank ``e // E_local``.
        group: the process group (every rank of it owns ``E_local`` experts).
    """

    def __init__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_local_experts: int, group=None) -> None:
        self.group = group
        self.hidden = hidden
        self.gloo = _on_gloo(group)
        world = dist.get_world_size(group)
        device = hidden.device
        num_tokens = int(hidden.shape[0])
        dest = torch.where(topk_ids >= 0, topk_ids // num_local_experts,
                           torch.full_like(topk_ids, world))
        # [T, W + 1] weight per (token, destination rank); column W collects the -1 ids
        per_rank = torch.zeros(num_tokens, world + 1, dtype=torch.float32, device=device)
        per_rank.scatter_add_(1, dest, topk_weights.float())
        hit = torch.zeros(num_tokens, world + 1, dtype=torch.bool, device=device)
        hit.scatter_(1, dest, True)
        hit, per_rank = hit[:, :world], per_rank[:, :world]
        # rank-major send order, token order within a rank
        rank_of, token_of = torch.nonzero(hit.t(), as_tuple=True)
        self.send_index = token_of.contiguous()                         # [S] int64
        self.row_weight = per_rank[token_of, rank_of].unsqueeze(1).to(hidden.dtype)  # [S, 1]
        send_counts = hit.sum(dim=0).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        self.send_splits: List[int] = send_counts.tolist()
        self.recv_splits: List[int] = recv_counts.tolist()
        hidden_size = int(hidden.shape[1])
        # the moved rows' buffers are allocated once (the floor allocates only its result)
        self.send = hidden.new_empty(sum(self.send_splits), hidden_size)
        self.recv = hidden.new_empty(sum(self.recv_splits), hidden_size)
        self.back = hidden.new_empty(sum(self.send_splits), hidden_size)

    @property
    def rows_sent(self) -> int:
        return sum(self.send_splits)

    def __call__(self) -> torch.Tensor:
        """``[T, H]``: per token, its rows weighted by the sum of its experts' weights on each
        destination rank (the experts are the identity), summed in token order."""
        torch.index_select(self.hidden, 0, self.send_index, out=self.send)
        dist.all_to_all_single(_wire(self.recv, self.gloo), _wire(self.send, self.gloo),
                               output_split_sizes=self.recv_splits,
                               input_split_sizes=self.send_splits, group=self.group)
        dist.all_to_all_single(_wire(self.back, self.gloo), _wire(self.recv, self.gloo),
                               output_split_sizes=self.send_splits,
                               input_split_sizes=self.recv_splits, group=self.group)
        out = torch.zeros_like(self.hidden)
        return out.index_add_(0, self.send_index, self.back.mul_(self.row_weight))


class FloorB:
    """All-gather of the hidden states, reduce-scatter back (equal ``T`` on every rank).

    Args:
        hidden: ``[T, H]`` this rank's tokens (not modified).
        group: the process group.
    """

    def __init__(self, hidden: torch.Tensor, group=None) -> None:
        self.group = group
        self.hidden = hidden
        self.gloo = _on_gloo(group)
        world = dist.get_world_size(group)
        num_tokens, hidden_size = (int(s) for s in hidden.shape)
        # gloo may lack bfloat16/float16 reductions: reduce those in float32 there
        self.reduce_dtype: Optional[torch.dtype] = (
            torch.float32 if self.gloo and hidden.element_size() < 4 else None)
        self.gathered = hidden.new_empty(world * num_tokens, hidden_size)  # allocated once

    def __call__(self) -> torch.Tensor:
        """``[T, H]``: the sum over ranks of each rank's copy of this rank's rows
        (``W * hidden`` here, since every rank gathered the same rows)."""
        _all_gather(_wire(self.gathered, self.gloo), _wire(self.hidden, self.gloo), group=self.group)
        src = self.gathered if self.reduce_dtype is None else self.gathered.to(self.reduce_dtype)
        out = torch.empty(self.hidden.shape, dtype=src.dtype, device=src.device)
        _reduce_scatter(out, src, group=self.group)
        return out if self.reduce_dtype is None else out.to(self.hidden.dtype)


__all__ = ["FloorA", "FloorB"]
