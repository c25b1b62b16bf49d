"""The torch-native all-to-all dispatcher (backend ``alltoall``): scattered layout.

Each rank holds a disjoint slice of tokens. ``dispatch`` sends every token once to each EP
rank that owns at least one of its experts; ``combine`` sends each received row's expert
output back and sums the returns per token at the origin.

Per step, over the EP group (which must be the whole world: ``ep_size == tp_size``,
``moe_tp_size == 1``):

* dispatch: one ``all_to_all_single`` of ``[W]`` int64 counts (started asynchronously; on CPU,
  where the host already has the send counts, the send side is built while it travels),
  **one** device-to-host read (send and receive splits together), one exact-split
  ``all_to_all_single`` of the hidden states and one of the metadata (receiver-local ids and
  weights packed as float32), the two in flight together;
* combine: one exact-split ``all_to_all_single`` back, then an fp32 ``index_add_`` in the
  original token order.

Send order is rank-major, token order within a destination rank, so the receiver's rows are
ordered by source rank, then by the source's token order. All index building is vectorised
(cumsum/scatter over the ``[T, W]`` destination mask); no Python loop runs per token.

Buffers reused across steps and layers (grow-only, owned by the process's communicator), so
that a steady-state step allocates no fresh memory for the rows it moves (on CPU a fresh large
tensor costs a page fault per page on first touch, which at thousands of tokens per rank costs
as much as the all-to-all itself): the ``[2W]`` int64 count buffer (the send counts and the
received counts sit side by side, so one ``tolist()`` reads both), the ``arange`` index grids,
the send buffer of ``dispatch``, the buffer ``combine`` receives the returned rows in, and the
fp32 accumulator of ``combine`` when the output dtype is not fp32. The received rows handed to
the experts live in a buffer *leased* from the communicator and given back by ``combine``:
valid until the ``combine`` of their dispatch returns (clone them to keep them longer); two
dispatches in flight at once hold two leases, so overlapping micro-batches stay safe. The
metadata and the output of ``combine`` are always fresh tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from moe_a2a.dispatchers.base import BaseDispatcher, DispatcherSetup, localize_topk
from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK
from moe_a2a.dispatchers.communicator import BufferLease
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.outputs import CombineInput, StandardDispatchOutput
from moe_a2a.dispatchers.collectives import all_to_all_counts, all_to_all_v, pack_topk, unpack_topk
from moe_a2a.dispatchers.checks import check_dispatch_inputs, check_packable, combine_handle

__all__ = ["AllToAllDispatcher", "AllToAllHandle", "AllToAllLayoutError"]


class AllToAllLayoutError(DispatcherError):
    """The process-group layout does not fit the all-to-all dispatcher."""


@dataclass(frozen=True)
class AllToAllHandle:
    """What ``AllToAllDispatcher.combine`` needs from ``dispatch``.

    Attributes:
        num_tokens: ``T``, tokens this rank dispatched (rows ``combine`` returns).
        send_token_index: ``[S]`` int64, the origin token (``0 <= t < T``) of each sent row,
            in send order (grouped by destination rank, token order within a rank).
        send_splits: rows sent to each EP rank (``sum = S``); equals, per destination, the
            number of this rank's tokens with at least one expert there.
        recv_splits: rows received from each EP rank (``sum = R``).
        lease: the communicator lease holding the received rows, released by ``combine``
            (None: nothing to give back).
    """

    num_tokens: int
    send_token_index: torch.Tensor
    send_splits: Tuple[int, ...]
    recv_splits: Tuple[int, ...]
    lease: Optional[BufferLease] = None

    @property
    def num_sent(self) -> int:
        return sum(self.send_splits)

    @property
    def num_received(self) -> int:
        return sum(self.recv_splits)


class AllToAllDispatcher(BaseDispatcher):
    """Exact-split ``all_to_all_single`` over the EP group (gloo or nccl).

    Raises:
        AllToAllLayoutError: ``moe_tp_size != 1`` or ``ep_size != world_size``.
    """

    output_class = StandardDispatchOutput
    token_layout = "scattered"

    def __init__(self, setup: DispatcherSetup) -> None:
        g = setup.groups
        if g.moe_tp_size != 1 or g.ep_size != g.world_size:
            raise AllToAllLayoutError(
                f"the alltoall dispatcher needs ep_size == tp_size and moe_tp_size == 1, got "
                f"tp_size={g.world_size}, ep_size={g.ep_size}, moe_tp_size={g.moe_tp_size}; "
                f"fix: run with --ep-size {g.world_size} (the alltoall backend derives "
                f"ep_size from tp_size when --ep-size is not given)"
            )
        super().__init__(setup)
        check_packable(setup.num_experts)
        self.groups = g
        self.group = g.ep_group
        self.ep_size = g.ep_size

    # -- reusable buffers (the communicator's, shared by every layer) -----------------------

    def _count_buffer(self, device: torch.device) -> torch.Tensor:
        return self.comm.scratch("alltoall.counts", 2 * self.ep_size, torch.int64, device)

    def _rows(self, key: str, rows: int, hidden: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
        """A reused ``[rows, hidden]`` scratch (never handed to the caller)."""
        return self.comm.scratch(key, rows * hidden, dtype, device).view(rows, hidden)

    # -- dispatch / combine -------------------------------------------------------------

    def dispatch(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                 batch: BatchInfo) -> StandardDispatchOutput:
        """Send each token once to every EP rank that owns one of its experts.

        Args:
            hidden_states: ``[T, H]`` this rank's own tokens (scattered layout), any dtype;
                ``T`` may be 0.
            topk: ``ids [T, K]`` int64 global physical expert ids in ``[0, E)``, ``-1`` = no
                expert in this column (ignored); ``weights [T, K]`` float32.
            batch: the step's facts (not needed: the exact splits are exchanged per call).
        Returns:
            ``StandardDispatchOutput`` with ``R`` received rows ordered by source
            rank, then by the source's token order: ``hidden_states [R, H]`` (input dtype;
            it lives in a buffer that ``combine`` recycles: valid until the ``combine`` of
            this dispatch returns, clone it to keep it longer), ``topk_ids [R, K]`` int64 ids
            local to this rank (``-1`` = expert on another rank or no expert),
            ``topk_weights [R, K]`` float32 (0 where the id is ``-1``),
            ``tokens_per_expert [E_local]`` int64, ``pair_order [R*K]`` int64; the handle is an
            ``AllToAllHandle``.
        """
        check_dispatch_inputs(hidden_states, topk, self.setup.hidden_size)
        device = hidden_states.device
        world = self.ep_size
        e_local = self.placement.num_local_experts
        num_tokens, top_k = (int(s) for s in topk.ids.shape)
        hidden = int(hidden_states.shape[1])
        ids = topk.ids.to(device=device, dtype=torch.int64)
        weights = topk.weights.to(device=device, dtype=torch.float32)

        # [T, K] destination rank of each column (W = dropped: -1 floors to -1, which wraps to
        # W); [T, W] mask of the ranks each token goes to
        dest = torch.div(ids, e_local, rounding_mode="floor").remainder_(world + 1)
        hit = torch.zeros(num_tokens, world + 1, dtype=torch.bool, device=device)
        hit.scatter_(1, dest, True)
        hit = hit[:, :world]

        counts = self._count_buffer(device)
        send_counts, recv_counts = counts[:world], counts[world:]
        torch.sum(hit, dim=0, out=send_counts)
        exchange = all_to_all_counts(send_counts, self.group, out=recv_counts, async_op=True)
        send = None
        if device.type == "cpu":  # the host has the send counts: build the send meanwhile
            send = self._build_send(hidden_states, ids, weights, hit, send_counts,
                                    int(send_counts.sum()))
        exchange.wait()
        host = counts.tolist()  # the step's one device-to-host read
        send_splits, recv_splits = tuple(host[:world]), tuple(host[world:])
        num_recv = sum(recv_splits)
        if send is None:
            send = self._build_send(hidden_states, ids, weights, hit, send_counts,
                                    sum(send_splits))
        send_token, meta, send_hidden = send

        # the rows arrive in a leased buffer (given back by combine), so that steady-state
        # steps touch no fresh memory; the small metadata travels at the same time
        lease = self.comm.lease("alltoall.recv", num_recv * hidden, hidden_states.dtype, device)
        recv_meta = all_to_all_v(meta, recv_splits, send_splits, self.group, async_op=True)
        recv_hidden = all_to_all_v(send_hidden, recv_splits, send_splits, self.group,
                                   out=lease.buffer.view(num_recv, hidden))
        recv_ids, recv_weights = unpack_topk(recv_meta.wait(), top_k)
        handle = AllToAllHandle(num_tokens=num_tokens, send_token_index=send_token,
                                send_splits=send_splits, recv_splits=recv_splits, lease=lease)
        return self._standard_output(recv_hidden, recv_ids, recv_weights, handle)

    def _build_send(self, hidden_states: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    hit: torch.Tensor, send_counts: torch.Tensor,
                    num_send: int):
        """The send side of ``dispatch``, from local facts only.

        Args:
            hit: ``[T, W]`` bool, where the token goes to the rank.
            send_counts: ``[W]`` int64 (on the device), ``num_send`` its sum (on the host).
        Returns:
            ``(send_token [S] int64 origin token per sent row, meta [S, 2K] float32 packed
            receiver-local ids and weights, send_hidden [S, H] in a reused send buffer)``,
            rows in rank-major, then token order.
        """
        device = hidden_states.device
        num_tokens, world = int(hit.shape[0]), int(hit.shape[1])
        e_local = self.placement.num_local_experts
        # slot of each (token, rank) pair: rank offset + rank-local order (an exclusive cumsum
        # down the tokens); pairs not sent go to a dump slot. One scatter of the flat pair index
        # t * W + r gives both the token and the rank of every slot.
        first = torch.cumsum(send_counts, 0).sub_(send_counts).sub_(1)  # rank offset - 1
        slot = torch.where(hit, torch.cumsum(hit, dim=0).add_(first), num_send)
        pair = torch.empty(num_send + 1, dtype=torch.int64, device=device)
        pair.scatter_(0, slot.reshape(-1), self.comm.arange(num_tokens * world, device))
        pair = pair[:num_send]
        send_token = torch.div(pair, world, rounding_mode="floor")
        send_rank = pair - send_token * world

        # metadata as the receiver needs it: its local ids (-1 elsewhere), weights zeroed
        local, row_weights = localize_topk(ids.index_select(0, send_token),
                                           weights.index_select(0, send_token), send_rank, e_local)
        meta = pack_topk(local, row_weights)
        send_hidden = self._rows("alltoall.send", num_send, int(hidden_states.shape[1]),
                                 hidden_states.dtype, device)
        torch.index_select(hidden_states, 0, send_token, out=send_hidden)
        return send_token, meta, send_hidden

    def combine(self, combine_input: CombineInput, *, batch: BatchInfo) -> torch.Tensor:
        """Return each row's output to its origin and sum per token in token order.

        Args:
            combine_input: ``expert_output [R, H]``, per received row the weighted sum of
                this rank's experts for it; not modified.
        Returns:
            ``[T, H]`` in ``expert_output``'s dtype (accumulated in fp32, or fp64 for fp64
            input); tokens routed nowhere (all ids ``-1``) are zero. The dispatch's received
            rows are recycled once this returns.
        """
        handle = combine_handle(combine_input, AllToAllHandle, "AllToAllDispatcher")
        out = combine_input.expert_output
        hidden = int(out.shape[1])
        returned = self._rows("alltoall.returned", handle.num_sent, hidden, out.dtype, out.device)
        all_to_all_v(out, handle.send_splits, handle.recv_splits, self.group, out=returned)
        if handle.lease is not None:
            handle.lease.release()  # the experts and the send above were its last readers
        acc_dtype = torch.promote_types(out.dtype, torch.float32)
        if acc_dtype == out.dtype:  # the accumulator is the result: never a reused buffer
            acc = torch.zeros(handle.num_tokens, hidden, dtype=acc_dtype, device=out.device)
            return acc.index_add_(0, handle.send_token_index, returned)
        acc = self._rows("alltoall.accumulator", handle.num_tokens, hidden, torch.float32,
                         out.device).zero_()
        acc.index_add_(0, handle.send_token_index, returned.to(torch.float32))
        return acc.to(out.dtype)
