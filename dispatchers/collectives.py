"""Small collective helpers shared by the dispatchers and the EP layer.

Conventions:

* A group of size 1 is ``None`` (see ``moe_a2a.dispatchers.groups``): every helper then returns
  without issuing any collective. ``None`` is never passed to ``torch.distributed`` (which
  would read it as the *default* group).
* Rows are dim 0. Every helper works with zero rows on some or all ranks: the ranks still
  issue the same collectives in the same order (or, where every rank knows that all sizes
  are zero, all of them skip it alike).
* Sizes that every rank needs are exchanged with one small collective and read to the host
  once (``exchange_sizes``); callers that already know them use the ``*_known_sizes``
  forms, which read nothing from the device.

What the backends support (probed on torch 2.13, gloo, 2 and 4 ranks):

* gloo: ``all_reduce``, ``all_gather`` (equal sizes only: uneven sizes fail with
  "ProcessGroupGloo::allgather: invalid tensor size"), ``all_gather_into_tensor``,
  ``all_to_all_single`` with uneven splits (and zero-row splits), ``reduce_scatter_tensor``
  (gloo's fallback implementation exists since torch 2.2) and, since torch 2.8, list
  ``reduce_scatter`` with uneven sizes (implemented as one all-reduce per rank). All of them
  accept float32, bfloat16, float16, int64 and int32 tensors on 2.13, and zero-size tensors.
  On a 4-rank ``[2048, 1024]`` fp32 probe ``reduce_scatter_tensor`` took about half the time
  of ``all_reduce`` (27 ms vs 54 ms), so the variable-size reduce-scatter uses it on gloo too.
* bfloat16 on gloo is version dependent (older releases fail with "Invalid scalar type",
  pytorch issue #111131). To be independent of the torch version and to sum accurately on the
  CPU test backend, on gloo (only) reductions of floating dtypes narrower than fp32 run in
  fp32 on the wire and the result is rounded once, and data-movement collectives move
  bfloat16 bit-exactly as float16 (a free view; gloo only copies the bytes). gloo has no
  int16 or uint16 ("Invalid scalar type"). On nccl every dtype goes on the wire as is.
* torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to
  ``all_gather_single`` / ``reduce_scatter_single`` (the old names emit a FutureWarning);
  the new names are used where they exist.
* nccl supports all of the above natively; uneven gathers/reduce-scatters are padded to the
  largest size so that one ``*_tensor`` collective moves everything.
* Any other backend (mpi, ucc, custom): the variable-size reduce-scatter falls back to a
  full ``all_reduce`` followed by slicing this rank's rows, which every backend supports.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from moe_a2a.dispatchers.errors import DispatcherError

ProcessGroup = Any

__all__ = [
    "all_gather_known_sizes",
    "all_gather_v",
    "all_reduce",
    "all_to_all_counts",
    "all_to_all_v",
    "exchange_sizes",
    "gather_into",
    "group_backend",
    "group_rank",
    "group_size",
    "pack_topk",
    "reduce_scatter_known_sizes",
    "reduce_scatter_v",
    "unpack_topk",
    "MAX_PACKED_EXPERT_ID",
    "Started",
]

#: Expert ids travel as float32 next to their weights (``pack_topk``); integers up to 2**24
#: are exact in float32.
MAX_PACKED_EXPERT_ID = 2**24

# backends whose reduce_scatter_tensor we use (see the module docstring)
_REDUCE_SCATTER_TENSOR_BACKENDS = ("nccl", "gloo")

# torch 2.13 renamed the single-tensor collectives (the old names warn); older releases
# (this package supports torch >= 2.4) only have the old names
_all_gather_single = getattr(dist, "all_gather_single", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None)


def gather_into(out: torch.Tensor, inp: torch.Tensor, group: ProcessGroup) -> None:
    """All-gather ``inp`` (same shape on every rank) into ``out`` (``[world * N, *]``)."""
    if _all_gather_single is not None:
        _all_gather_single(out, inp, group=group)
    else:
        dist.all_gather_into_tensor(out, inp, group=group)


def _reduce_scatter_into(out: torch.Tensor, inp: torch.Tensor, group: ProcessGroup) -> None:
    if _reduce_scatter_single is not None:
        _reduce_scatter_single(out, inp, group=group)
    else:
        dist.reduce_scatter_tensor(out, inp, group=group)


# --------------------------------------------------------------------------- group facts

def group_size(group: Optional[ProcessGroup]) -> int:
    """Number of ranks in ``group``; ``None`` (a size-1 group) is 1."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank inside ``group``; ``None`` is 0."""
    return 0 if group is None else dist.get_rank(group)


def group_backend(group: Optional[ProcessGroup]) -> str:
    """``"nccl"``, ``"gloo"``, ... for ``group``; ``"none"`` for ``None``."""
    if group is None:
        return "none"
    return str(dist.get_backend(group)).lower()


# --------------------------------------------------------------------------- wire dtypes

def _is_gloo(group: Optional[ProcessGroup]) -> bool:
    return group is not None and group_backend(group) == "gloo"


def _narrow_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def _move_view(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """View used on the wire by data-movement collectives (bf16 → float16, fp8 → uint8 on gloo).

    Gloo only copies the bytes of a gather or all-to-all, so moving bfloat16 as float16 (same
    size; gloo has float16 in every release) is bit-exact. (int16 would not do: gloo has no
    int16 and fails with "Invalid scalar type".)
    """
    if x.dtype == torch.bfloat16 and _is_gloo(group):
        return x.view(torch.float16)
    if x.dtype.is_floating_point and x.element_size() == 1 and _is_gloo(group):
        return x.view(torch.uint8)  # FP8 payloads: gloo has no float8 ("Invalid scalar type")
    return x


def _reduce_dtype(dtype: torch.dtype, group: Optional[ProcessGroup]) -> torch.dtype:
    """dtype used on the wire by reductions (narrow floats → fp32 on gloo)."""
    if _narrow_float(dtype) and _is_gloo(group):
        return torch.float32
    return dtype


def _rows(x: torch.Tensor, what: str) -> int:
    if x.dim() == 0:
        raise DispatcherError(f"{what}: got a 0-d tensor; rows are dim 0, so pass at least [N]")
    return int(x.shape[0])


def _check_sizes(sizes: Sequence[int], group: Optional[ProcessGroup], what: str) -> List[int]:
    sizes = [int(s) for s in sizes]
    world = group_size(group)
    if len(sizes) != world or any(s < 0 for s in sizes):
        raise DispatcherError(
            f"{what}: sizes={sizes} must list one non-negative row count per rank of the "
            f"group ({world} ranks); fix: pass the sizes returned by exchange_sizes()"
        )
    return sizes


# --------------------------------------------------------------------------- sizes

def exchange_sizes(num_rows: int, group: Optional[ProcessGroup],
                   device: Optional[torch.device] = None) -> List[int]:
    """Row counts of every rank of ``group``, in group-rank order.

    One ``all_gather_into_tensor`` of one int64 per rank and one device-to-host read.

    Args:
        num_rows: this rank's row count (``>= 0``).
        device: where the small tensor lives (must be a CUDA device for nccl groups).
    Returns:
        ``[group_size]`` Python ints.
    """
    if num_rows < 0:
        raise DispatcherError(f"exchange_sizes: num_rows={num_rows} must be >= 0")
    if group is None:
        return [int(num_rows)]
    world = group_size(group)
    mine = torch.tensor([int(num_rows)], dtype=torch.int64, device=device)
    everyone = torch.empty(world, dtype=torch.int64, device=device)
    gather_into(everyone, mine, group)
    return everyone.tolist()


# --------------------------------------------------------------------------- gathers

def all_gather_known_sizes(x: torch.Tensor, sizes: Sequence[int],
                           group: Optional[ProcessGroup]) -> torch.Tensor:
    """Concatenate every rank's rows, in group-rank order, when the sizes are known.

    Equal sizes use one ``all_gather_into_tensor``; uneven sizes are padded to the largest
    (gloo cannot gather uneven tensors) and compacted afterwards. No device-to-host read.

    Args:
        x: ``[sizes[rank], *]`` this rank's rows, any dtype.
        sizes: row count of every rank (``exchange_sizes``), identical on all ranks.
    Returns:
        ``[sum(sizes), *]`` same dtype and device as ``x``.
    """
    n = _rows(x, "all_gather_known_sizes")
    if group is None:
        return x
    sizes = _check_sizes(sizes, group, "all_gather_known_sizes")
    rank = group_rank(group)
    if sizes[rank] != n:
        raise DispatcherError(
            f"all_gather_known_sizes: this rank (group rank {rank}) holds {n} rows but "
            f"sizes[{rank}]={sizes[rank]}; fix: pass the sizes exchanged for these tensors"
        )
    world, biggest = len(sizes), max(sizes)
    rest = tuple(x.shape[1:])
    if biggest == 0:  # every rank knows it: all skip the collective alike
        return x.new_empty((0, *rest))
    uniform = all(s == biggest for s in sizes)
    src = x.contiguous()
    if not uniform:
        padded = x.new_zeros((biggest, *rest))
        padded[:n] = x
        src = padded
    out = x.new_empty((world * biggest, *rest))
    gather_into(_move_view(out, group), _move_view(src, group), group)
    if uniform:
        return out
    return torch.cat([out[r * biggest: r * biggest + s] for r, s in enumerate(sizes)])


def all_gather_v(x: torch.Tensor, group: Optional[ProcessGroup],
                 sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Variable-size all-gather along dim 0 (sizes exchanged first unless given).

    Args:
        x: ``[N_rank, *]`` this rank's rows (``N_rank`` may be 0).
        sizes: optional row counts of every rank; exchanged with ``exchange_sizes`` if omitted.
    Returns:
        ``[sum N, *]`` every rank's rows in group-rank order.
    """
    n = _rows(x, "all_gather_v")
    if group is None:
        return x
    if sizes is None:
        sizes = exchange_sizes(n, group, x.device)
    return all_gather_known_sizes(x, sizes, group)


# --------------------------------------------------------------------------- reductions

def all_reduce(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum ``x`` over ``group`` in place and return it; a no-op for ``None``.

    Args:
        x: ``[*]`` any shape; reduced in place (on gloo narrow floats are summed in fp32 and
            written back rounded once).
    """
    if group is None:
        return x
    wire = _reduce_dtype(x.dtype, group)
    if wire == x.dtype and x.is_contiguous():
        dist.all_reduce(x, group=group)
        return x
    tmp = x.to(wire, memory_format=torch.contiguous_format)
    if tmp.data_ptr() == x.data_ptr():
        tmp = tmp.clone()
    dist.all_reduce(tmp, group=group)
    x.copy_(tmp)
    return x


def reduce_scatter_known_sizes(x: torch.Tensor, sizes: Sequence[int],
                               group: Optional[ProcessGroup]) -> torch.Tensor:
    """The reverse of ``all_gather_known_sizes``: sum ``x`` over the group, keep my rows.

    Rank ``r`` receives rows ``[sum(sizes[:r]), sum(sizes[:r+1]))`` of the element-wise sum
    of every rank's ``x``. On nccl and gloo this is one ``reduce_scatter_tensor`` (inputs
    padded to the largest size when uneven); on other backends an ``all_reduce`` of ``x``
    followed by slicing (universally supported, twice the traffic). ``x`` is not modified.

    Args:
        x: ``[sum(sizes), *]`` identical layout on every rank (typically the DP-global batch).
        sizes: row count of every rank, identical on all ranks.
    Returns:
        ``[sizes[rank], *]`` same dtype as ``x`` (new tensor; ``x`` itself when ``group`` is None).
    """
    total = _rows(x, "reduce_scatter_known_sizes")
    if group is None:
        return x
    sizes = _check_sizes(sizes, group, "reduce_scatter_known_sizes")
    if sum(sizes) != total:
        raise DispatcherError(
            f"reduce_scatter_known_sizes: x has {total} rows but sizes={sizes} sum to "
            f"{sum(sizes)}; fix: pass the sizes the rows were gathered with"
        )
    rank = group_rank(group)
    world, biggest = len(sizes), max(sizes)
    rest = tuple(x.shape[1:])
    start = sum(sizes[:rank])
    if biggest == 0:
        return x.new_empty((0, *rest))
    backend = group_backend(group)
    wire = _reduce_dtype(x.dtype, group)
    if backend not in _REDUCE_SCATTER_TENSOR_BACKENDS:
        full = all_reduce(x.clone(memory_format=torch.contiguous_format), group)
        return full[start: start + sizes[rank]]
    if all(s == biggest for s in sizes):
        src = x.to(wire, memory_format=torch.contiguous_format)
    else:
        src = x.new_zeros((world, biggest, *rest), dtype=wire)
        offset = 0
        for r, s in enumerate(sizes):  # one copy per rank, not per row
            src[r, :s] = x[offset: offset + s]
            offset += s
        src = src.view(world * biggest, *rest)
    out = torch.empty((biggest, *rest), dtype=wire, device=x.device)
    _reduce_scatter_into(out, src, group)
    return out[: sizes[rank]].to(x.dtype)


def reduce_scatter_v(x: torch.Tensor, sizes: Sequence[int],
                     group: Optional[ProcessGroup]) -> torch.Tensor:
    """Alias of ``reduce_scatter_known_sizes`` (the reverse of ``all_gather_v``)."""
    return reduce_scatter_known_sizes(x, sizes, group)


# --------------------------------------------------------------------------- all-to-all

class Started(NamedTuple):
    """A collective started with ``async_op``: ``wait()`` it before reading ``result``."""

    result: torch.Tensor
    work: Any  # the torch.distributed work handle, or None when nothing was issued

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.result


def all_to_all_v(x: torch.Tensor, output_split_sizes: Sequence[int],
                 input_split_sizes: Sequence[int], group: Optional[ProcessGroup],
                 out: Optional[torch.Tensor] = None, async_op: bool = False):
    """``all_to_all_single`` with exact (unpadded) splits along dim 0.

    Args:
        x: ``[sum(input_split_sizes), *]`` rows ordered by destination group rank.
        output_split_sizes: rows received from each group rank.
        input_split_sizes: rows sent to each group rank.
        out: optional ``[sum(output_split_sizes), *]`` buffer of ``x``'s dtype to receive into.
        async_op: return a ``Started`` at once (``x`` must stay untouched until its ``wait()``).
    Returns:
        ``[sum(output_split_sizes), *]`` rows ordered by source group rank (a ``Started``
        with ``async_op``).
    """
    n = _rows(x, "all_to_all_v")
    out_splits = _check_sizes(output_split_sizes, group, "all_to_all_v(output_split_sizes)")
    in_splits = _check_sizes(input_split_sizes, group, "all_to_all_v(input_split_sizes)")
    if sum(in_splits) != n:
        raise DispatcherError(
            f"all_to_all_v: x has {n} rows but input_split_sizes={in_splits} sum to "
            f"{sum(in_splits)}; fix: split exactly the rows you send"
        )
    rows_out = sum(out_splits)
    if out is None:
        out = x.new_empty((rows_out, *x.shape[1:]))
    elif tuple(out.shape) != (rows_out, *x.shape[1:]) or out.dtype != x.dtype:
        raise DispatcherError(
            f"all_to_all_v: out buffer is {tuple(out.shape)} {out.dtype}, expected "
            f"{(rows_out, *x.shape[1:])} {x.dtype}"
        )
    if group is None:
        if out_splits != in_splits:
            raise DispatcherError(
                f"all_to_all_v: with one rank the output splits {out_splits} must equal "
                f"the input splits {in_splits}"
            )
        out = out.copy_(x) if out.data_ptr() != x.data_ptr() else out
        return Started(out, None) if async_op else out
    work = dist.all_to_all_single(_move_view(out, group), _move_view(x.contiguous(), group),
                                  output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group, async_op=async_op)
    return Started(out, work) if async_op else out


def all_to_all_counts(send_counts: torch.Tensor, group: Optional[ProcessGroup],
                      out: Optional[torch.Tensor] = None, async_op: bool = False):
    """Exchange per-destination counts: ``recv[r]`` = what rank ``r`` sends to me.

    Args:
        send_counts: ``[group_size]`` int64 rows this rank sends to each group rank.
        out: optional ``[group_size]`` int64 buffer (may be a view of a larger buffer).
        async_op: return a ``Started`` at once (overlap local work with the exchange).
    Returns:
        ``[group_size]`` int64 on the same device (no device-to-host read); a ``Started``
        with ``async_op``.
    """
    world = group_size(group)
    if tuple(send_counts.shape) != (world,):
        raise DispatcherError(
            f"all_to_all_counts: send_counts has shape {tuple(send_counts.shape)}, expected "
            f"({world},) (one count per rank of the group)"
        )
    if out is None:
        out = torch.empty_like(send_counts)
    if group is None:
        out.copy_(send_counts)
        return Started(out, None) if async_op else out
    work = dist.all_to_all_single(out, send_counts.contiguous(), group=group, async_op=async_op)
    return Started(out, work) if async_op else out


# --------------------------------------------------------------------------- top-k packing

def pack_topk(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pack expert ids and weights into one float32 tensor (one collective instead of two).

    Ids travel as float32, exact for ``|id| < 2**24`` (``MAX_PACKED_EXPERT_ID``); callers
    check their expert count once at construction.

    Args:
        ids: ``[N, K]`` integer expert ids, ``-1`` = none.
        weights: ``[N, K]`` floating weights.
    Returns:
        ``[N, 2K]`` float32: ids in columns ``[:K]``, weights in ``[K:]``.
    """
    if ids.shape != weights.shape or ids.dim() != 2:
        raise DispatcherError(
            f"pack_topk: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both "
            f"be [N, K]"
        )
    return torch.cat([ids.to(torch.float32), weights.to(torch.float32)], dim=1)


class UnpackedTopK(NamedTuple):
    """``ids [N, K]`` int64 (``-1`` kept) and ``weights [N, K]`` float32."""

    ids: torch.Tensor
    weights: torch.Tensor


def unpack_topk(packed: torch.Tensor, top_k: int) -> UnpackedTopK:
    """Inverse of ``pack_topk``.

    Args:
        packed: ``[N, 2K]`` float32.
    Returns:
        ``UnpackedTopK(ids [N, K] int64 (-1 kept), weights [N, K] float32)``.
    """
    if packed.dim() != 2 or packed.shape[1] != 2 * top_k:
        raise DispatcherError(
            f"unpack_topk: packed has shape {tuple(packed.shape)}, expected [N, {2 * top_k}]"
        )
    return UnpackedTopK(packed[:, :top_k].to(torch.int64), packed[:, top_k:].contiguous())
