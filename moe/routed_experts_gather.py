"""Gather strategies of routed-experts capture: ``none``, ``early``, ``late``.

Each layer call reports the ids it routed with a ``RowSpan``: the rows ``[start, stop)`` of this
DP rank's batch, and whether the call was ``scattered`` over the attention-TP ranks (each routed
a disjoint ``tensor_split`` slice, sizes ``split_sizes``) or replicated (every attention-TP rank
routed the DP rank's whole batch). A fused backend may run some steps scattered and others
(its fallback) replicated, so strategies decide per call.

A strategy owns both the gather and the slicing: after ``end_step`` the device cache rows
``[0, T)`` hold this DP rank's batch, in order, for every layer, on every attention-TP rank.

* ``none``: no collective. Valid when no call is scattered (replicated layout, or attention-TP
  size 1); a scattered call is an error, since the other ranks' rows are missing.
* ``early``: one all-gather over attention-TP per scattered layer call, into a preallocated
  buffer (shapes fixed per batch size: capturable in a CUDA graph).
* ``late``: each scattered call keeps its local slice; ``end_step`` gathers every layer's
  slices in one all-gather (one collective per step; not inside a captured graph).

Uneven splits (``tensor_split`` gives the first ranks one row more) are padded to the largest
slice on the wire and compacted when written.
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from moe_a2a.dispatchers.collectives import gather_into
from moe_a2a.dispatchers.groups import CommGroups
from moe_a2a.errors import MoeA2AError
from moe_a2a.step import RowSpan

GATHER_STRATEGIES = ("none", "early", "late")


class GatherStrategy:
    """Writes each layer's routed ids into the rows of this DP rank's batch.

    Args:
        device_cache: ``[M, L, K]`` int32, the capturer's per-step cache (M = the most tokens of
            one DP rank in a step); rows ``[0, T)`` are written.
        groups: this process's groups (``attn_tp_group`` is gathered over).
        layer_ids: the model layer id of each cache column (for messages).

    Attributes:
        collectives: all-gathers issued so far (for benchmarks and tests).
    """

    name: ClassVar[str] = ""

    def __init__(self, device_cache: torch.Tensor, groups: CommGroups,
                 layer_ids: Optional[Sequence[int]] = None) -> None:
        self.cache = device_cache
        self.groups = groups
        self.layer_ids = tuple(layer_ids) if layer_ids is not None else tuple(
            range(int(device_cache.shape[1])))
        self.collectives = 0
        # the largest slice one attention-TP rank routes in a step of M tokens
        self.max_split = -(-int(device_cache.shape[0]) // max(1, groups.attn_tp_size))

    def begin_step(self, num_tokens: int) -> None:
        """A step of ``num_tokens`` rows starts."""

    def observe(self, column: int, ids: torch.Tensor, rows: RowSpan) -> None:
        """``ids [rows.num_rows, K]`` routed by this rank for ``rows`` of the layer in cache
        column ``column``."""
        raise NotImplementedError

    def end_step(self) -> None:
        """Every layer has been observed: finish the rows of the step."""

    def _write_replicated(self, column: int, ids: torch.Tensor, rows: RowSpan) -> None:
        self.cache[rows.start:rows.stop, column] = ids


class NoGather(GatherStrategy):
    """Every call routed the DP rank's whole batch: write the rows where they belong."""

    name = "none"

    def observe(self, column: int, ids: torch.Tensor, rows: RowSpan) -> None:
        if rows.scattered:
            raise MoeA2AError(
                f"routed-experts gather 'none': layer {self.layer_ids[column]} routed only rows "
                f"[{rows.start}, {rows.stop}) of {rows.num_tokens} on this attention-TP rank "
                f"(scattered over {len(rows.split_sizes)} ranks), so the other ranks' rows would "
                f"be missing; fix: --routed-experts-gather early or late (auto picks one)")
        self._write_replicated(column, ids, rows)


class EarlyGather(GatherStrategy):
    """One all-gather over attention-TP per scattered layer call."""

    name = "early"

    def __init__(self, device_cache: torch.Tensor, groups: CommGroups,
                 layer_ids: Optional[Sequence[int]] = None) -> None:
        super().__init__(device_cache, groups, layer_ids)
        k = int(device_cache.shape[2])
        world = max(1, groups.attn_tp_size)
        self._send = device_cache.new_zeros((self.max_split, k))
        self._recv = device_cache.new_zeros((world * self.max_split, k))

    def observe(self, column: int, ids: torch.Tensor, rows: RowSpan) -> None:
        if not rows.scattered:
            self._write_replicated(column, ids, rows)
            return
        biggest = max(rows.split_sizes)
        if biggest == 0:  # every rank of the group knows it: all skip alike
            return
        send = self._send[:biggest]
        send[:rows.num_rows] = ids
        recv = self._recv[:len(rows.split_sizes) * biggest]
        gather_into(recv, send, self.groups.attn_tp_group)
        self.collectives += 1
        for start, stop, block in _blocks(recv, biggest, rows.split_sizes):
            self.cache[start:stop, column] = block


class LateGather(GatherStrategy):
    """Scattered calls keep their slice; one all-gather of every layer at the end of the step."""

    name = "late"

    def __init__(self, device_cache: torch.Tensor, groups: CommGroups,
                 layer_ids: Optional[Sequence[int]] = None) -> None:
        super().__init__(device_cache, groups, layer_ids)
        _, layers, k = (int(s) for s in device_cache.shape)
        world = max(1, groups.attn_tp_size)
        self._local = device_cache.new_zeros((self.max_split, layers, k))
        self._recv = device_cache.new_zeros((world * self.max_split, layers, k))
        self._scattered: List[int] = []
        self._split: Optional[Tuple[int, ...]] = None

    def begin_step(self, num_tokens: int) -> None:
        self._scattered = []
        self._split = None

    def observe(self, column: int, ids: torch.Tensor, rows: RowSpan) -> None:
        if not rows.scattered:
            self._write_replicated(column, ids, rows)
            return
        if self._split is not None and self._split != rows.split_sizes:
            raise MoeA2AError(
                f"routed-experts gather 'late': layer {self.layer_ids[column]} split the rows as "
                f"{list(rows.split_sizes)} but an earlier layer as {list(self._split)}; every "
                f"layer of a step must route the same batch")
        self._split = rows.split_sizes
        self._local[:rows.num_rows, column] = ids
        self._scattered.append(column)

    def end_step(self) -> None:
        if not self._scattered or self._split is None:
            return
        biggest = max(self._split)
        if biggest == 0:
            return
        recv = self._recv[:len(self._split) * biggest]
        gather_into(recv, self._local[:biggest], self.groups.attn_tp_group)
        self.collectives += 1
        columns = sorted(set(self._scattered))
        index = (None if len(columns) == self.cache.shape[1]
                 else torch.tensor(columns, device=self.cache.device))
        for start, stop, block in _blocks(recv, biggest, self._split):
            if index is None:  # every layer scattered (the usual case): one copy per rank
                self.cache[start:stop] = block
            else:
                self.cache[start:stop, index] = block[:, index]


def _blocks(gathered: torch.Tensor, biggest: int, split: Sequence[int]):
    """``(start, stop, rows)`` of each rank's block in a gather padded to ``biggest`` rows."""
    start = 0
    for r, size in enumerate(split):
        if size:
            yield start, start + size, gathered[r * biggest: r * biggest + size]
        start += size


_BY_NAME: Dict[str, Type[GatherStrategy]] = {c.name: c for c in (NoGather, EarlyGather, LateGather)}


def make_gather(name: str, device_cache: torch.Tensor, groups: CommGroups,
                layer_ids: Optional[Sequence[int]] = None) -> GatherStrategy:
    """The strategy ``--routed-experts-gather`` names (already resolved: never ``auto``)."""
    cls = _BY_NAME.get(name)
    if cls is None:
        raise MoeA2AError(f"routed-experts gather {name!r} is not one of "
                          f"{', '.join(GATHER_STRATEGIES)}; fix: resolve the server arguments "
                          f"(server_args.resolve turns auto into one of them)")
    return cls(device_cache, groups, layer_ids)


__all__ = ["EarlyGather", "GATHER_STRATEGIES", "GatherStrategy", "LateGather", "NoGather",
           "make_gather"]
