"""A CPU-capable emulation of DeepEP v1.2.1's Python API (``deep_ep``), over torch.distributed.

``moe_a2a.testing.emulate_kernels()`` installs this module's public names as ``deep_ep``.
Names, parameter names and order, defaults, return tuples, handle layouts and dtypes follow
``deep_ep/buffer.py`` and ``csrc/deep_ep.cpp`` of DeepEP v1.2.1 (tag ``v1.2.1``, commit
9af0e0d0e74f3577af1979c9b9e1ac2cad0104ee); ``tests/test_kernel_emulation.py`` compares the
signatures with a recorded copy of the real ones.

What is real: tokens really move between ranks (``all_to_all_single`` over the Buffer's group,
gloo or nccl), results are computed exactly, and the checks the C++ runtime makes
(``EP_HOST_ASSERT``: dtypes, contiguity, shapes, capacity, buffer sizes against DeepEP's own
size formulas, compiled hidden sizes and top-k limits) raise ``RuntimeError`` as the
extension does; Python-level ``assert``s raise ``AssertionError`` as in ``buffer.py``.

What differs from the kernels (see docs/deepep.md):

* no NVLink/RDMA/NVSHMEM, no streams: ``async_finish`` events are already complete and
  ``EventOverlap.current_stream_wait`` returns at once; every call is synchronous and issues
  torch.distributed collectives, so all ranks must make the same calls in the same order (the
  real kernels need that too);
* row order: received rows are ordered by source rank, then by the source's token order. The
  normal kernels order them the same way; the low-latency kernel orders each expert's rows by
  arrival (``packed_recv_layout_range`` says where each source's rows are), so code must not
  rely on the order within an expert;
* with ``return_recv_hook=True`` data moves during the call and only becomes visible when the
  hook is called (before that the receive tensors hold NaN, like unreceived memory);
* unused rows of the low-latency layout hold NaN (the kernel leaves them uninitialised);
* ``use_logfmt`` is accepted and computed exactly (no LogFMT rounding);
* after normal-mode calls, a low-latency dispatch without ``clean_low_latency_buffer`` raises
  (the real kernel reads stale flags and may hang or return garbage);
* internode (more than 8 ranks) and ``mpi4py`` communicators are not emulated.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from moe_a2a.dispatchers.base import localize_topk
from moe_a2a.dispatchers.collectives import all_to_all_v, gather_into
from moe_a2a.dispatchers.fp8 import FP8, quantize_per_token

# csrc/kernels/configs.cuh and csrc/kernels/launch.cuh (v1.2.1)
NUM_MAX_NVL_PEERS = 8
NUM_MAX_RDMA_PEERS = 20
NUM_MAX_LOCAL_EXPERTS = 1024
NUM_BUFFER_ALIGNMENT_BYTES = 128
NUM_WORKSPACE_BYTES = 32 * 1024 * 1024
INTRANODE_RANKS = (2, 4, 8)                                            # SWITCH_RANKS
LOW_LATENCY_HIDDEN_SIZES = (2048, 2560, 4096, 5120, 6144, 7168, 8192)  # SWITCH_HIDDEN
LOW_LATENCY_MAX_TOPK = 11                                              # kNumMaxTopK
SOURCE_META_BYTES = 8                                                  # sizeof(SourceMeta)
INT_MAX = 2**31 - 1
_INT_MASK = 2**32 - 1


def _check(cond: bool, text: str, why: str = "") -> None:
    """``EP_HOST_ASSERT``: the extension raises ``RuntimeError`` with the failed condition."""
    if not cond:
        raise RuntimeError(f"Failed: Assertion error csrc/deep_ep.cpp '{text}' "
                           f"(moe_a2a emulation of DeepEP v1.2.1{': ' + why if why else ''})")


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


# --------------------------------------------------------------------------- events

class EventHandle:
    """``deep_ep_cpp.EventHandle``: a recorded CUDA event (here: already complete)."""

    def __init__(self) -> None:
        pass

    def current_stream_wait(self) -> None:
        """The current stream waits for the event (nothing to wait for in the emulation)."""


class EventOverlap:
    """A wrapper of a captured event, also usable as ``with event_overlap:``."""

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[Optional[torch.Tensor], ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None
        self.event.current_stream_wait()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


# --------------------------------------------------------------------------- Config

class Config:
    """``deep_ep_cpp.Config``: normal-kernel tuning (SMs and chunk sizes) and buffer hints."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256,
                 num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        _check(num_sms >= 0, "num_sms >= 0")
        _check(num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0,
               "num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0")
        _check(num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens,
               "num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens")
        _check(num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0,
               "num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = _align(num_max_rdma_chunked_recv_tokens,
                                                       num_max_rdma_chunked_send_tokens)
        _check(num_max_rdma_chunked_send_tokens < self.num_max_rdma_chunked_recv_tokens,
               "num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens")
        _check(num_max_rdma_chunked_send_tokens <= self.num_max_rdma_chunked_recv_tokens // 2,
               "num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens / 2")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        max_topk = max_scales = 128
        _check(num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0,
               "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        _check(num_ranks <= NUM_MAX_NVL_PEERS or self.num_sms % 2 == 0,
               "num_ranks <= NUM_MAX_NVL_PEERS or num_sms % 2 == 0")
        rdma_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1)
        nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
        per_channel_rank = self.num_sms // 2 * nvl_ranks
        recv = self.num_max_nvl_chunked_recv_tokens
        total = per_channel_rank * (2 * rdma_ranks + 3) * 4
        total += per_channel_rank * recv * hidden_bytes
        total += per_channel_rank * recv * SOURCE_META_BYTES
        total += per_channel_rank * recv * max_topk * 8
        total += per_channel_rank * recv * max_topk * 4
        total += per_channel_rank * recv * max_scales * 4
        return _align(total, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        max_topk = max_scales = 128
        _check(num_ranks % NUM_MAX_NVL_PEERS == 0, "num_ranks % NUM_MAX_NVL_PEERS == 0")
        _check(self.num_sms % 2 == 0, "num_sms % 2 == 0")
        per = self.num_sms // 2 * (num_ranks // NUM_MAX_NVL_PEERS)
        recv = self.num_max_rdma_chunked_recv_tokens
        total = per * (NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4
        total += per * recv * hidden_bytes * 2
        total += per * recv * SOURCE_META_BYTES * 2
        total += per * recv * max_topk * 8 * 2
        total += per * recv * max_topk * 4 * 2
        total += per * recv * max_scales * 4 * 2
        total += per * recv * 16 * 2
        return _align(total, 128)


def _low_latency_layout_bytes(num_max_dispatch_tokens_per_rank: int, hidden: int,
                              num_ranks: int, num_experts: int) -> int:
    """``LowLatencyLayout(...).total_bytes`` of csrc/config.hpp."""
    num_scales = hidden // 128
    _check(num_scales * 4 <= hidden, "num_scales * sizeof(float) <= hidden")
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    cap = num_max_dispatch_tokens_per_rank
    send = max(cap * dispatch_msg, num_experts * cap * combine_msg)
    recv = max(num_experts * cap * dispatch_msg, num_experts * cap * combine_msg)
    signaling = _align(num_experts * 4, 128)
    return send * 2 + recv * 2 + signaling * 2


# buffer.py's recommended configs per EP size: (nvl send, nvl recv, rdma send, rdma recv)
_DISPATCH_CONFIGS = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (8, 288, 32, 128), 32: (32, 288, 32, 128), 64: (20, 288, 28, 128),
    128: (20, 560, 32, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_CONFIGS = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 64: (1, 288, 20, 128), 128: (1, 560, 12, 128),
    144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _recommended(table, num_ranks: int) -> Config:
    assert num_ranks in table, f'Unsupported number of EP ranks: {num_ranks}'
    return Config(Buffer.num_sms, *table[num_ranks])


# --------------------------------------------------------------------------- Buffer

class Buffer:
    """The expert-parallel communication buffer (normal and low-latency all-to-all).

    Attributes:
        num_sms: the SMs used in high-throughput kernels (class-wide, as in DeepEP).
        rank / group_size / group: position and group.
        num_nvl_bytes / num_rdma_bytes: the buffer sizes asked for (checked against DeepEP's
            own formulas on every call).
        low_latency_mode / explicitly_destroy: as given.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup],
                 num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False,
                 comm: Optional[Any] = None) -> None:  # an mpi4py.MPI.Comm (not emulated)
        if group is not None:
            self.rank = group.rank()
            self.group = group
            self.group_size = group.size()
        elif comm is not None:
            raise NotImplementedError("the moe_a2a emulation of deep_ep.Buffer supports "
                                      "torch.distributed groups only, not mpi4py communicators")
        else:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        ranks = self.group_size
        _check(num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0
               and (num_nvl_bytes <= INT_MAX or num_rdma_bytes == 0),
               "num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and (num_nvl_bytes <= INT_MAX "
               "or num_rdma_bytes == 0)")
        _check(num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0
               and (low_latency_mode or num_rdma_bytes <= INT_MAX),
               "num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and (low_latency_mode or "
               "num_rdma_bytes <= INT_MAX)")
        _check(ranks <= NUM_MAX_NVL_PEERS * NUM_MAX_RDMA_PEERS or low_latency_mode,
               "num_ranks <= NUM_MAX_NVL_PEERS * NUM_MAX_RDMA_PEERS or low_latency_mode")
        _check(ranks < NUM_MAX_NVL_PEERS or ranks % NUM_MAX_NVL_PEERS == 0,
               "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        if num_rdma_bytes > 0:
            _check(ranks > NUM_MAX_NVL_PEERS or low_latency_mode,
                   "num_ranks > NUM_MAX_NVL_PEERS or low_latency_mode")
        if ranks > NUM_MAX_NVL_PEERS or low_latency_mode:
            assert num_qps_per_rank > 0
        # construction is collective (the real one exchanges IPC handles and NVSHMEM ids):
        # every rank must ask for the same buffer
        mine = (num_nvl_bytes, num_rdma_bytes, bool(low_latency_mode))
        everyone: List[Any] = [None] * ranks
        dist.all_gather_object(everyone, mine, group=group)
        _check(all(e == mine for e in everyone), "all ranks create the same buffer",
               f"ranks asked for (num_nvl_bytes, num_rdma_bytes, low_latency_mode) {everyone}")
        self._alive = True
        self._low_latency_clean = True   # low-latency flags are zero after construction
        self._next_combine: Optional[torch.Tensor] = None
        self._local_buffers: dict = {}

    # ---- lifecycle -------------------------------------------------------------------------

    def _runtime(self, method: str) -> None:
        if not self._alive:  # the real one sets runtime = None: any call then fails like this
            raise AttributeError(f"'NoneType' object has no attribute '{method}'")

    def destroy(self):
        """Release the buffers; only with ``explicitly_destroy=True``."""
        assert self.explicitly_destroy, '`explicitly_destroy` flag must be set'
        self._runtime("destroy")
        self._alive = False
        self._local_buffers.clear()
        self._next_combine = None

    @staticmethod
    def is_sm90_compiled():
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, 'The SM count must be even'
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        total = _low_latency_layout_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                                          num_experts)
        return ((total + NUM_BUFFER_ALIGNMENT_BYTES) // NUM_BUFFER_ALIGNMENT_BYTES
                * NUM_BUFFER_ALIGNMENT_BYTES)

    def get_comm_stream(self) -> torch.Stream:
        self._runtime("get_comm_stream")
        if not torch.cuda.is_available():
            raise RuntimeError("the moe_a2a emulation of deep_ep runs without CUDA streams: "
                               "there is no communication stream on this machine")
        return torch.cuda.current_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None,
                                offset: int = 0, use_rdma_buffer: bool = False) -> torch.Tensor:
        self._runtime("get_local_buffer_tensor")
        nbytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        raw = self._local_buffers.get(use_rdma_buffer)
        if raw is None:
            raw = torch.zeros(nbytes, dtype=torch.uint8)
            self._local_buffers[use_rdma_buffer] = raw
        element = torch.empty((), dtype=dtype).element_size()
        tensor = raw[offset * element:].view(dtype)
        if size is None:
            return tensor
        assert tensor.numel() >= size.numel()
        return tensor[:size.numel()].view(size)

    @staticmethod
    def _unpack_bias(bias: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]):
        bias_0, bias_1 = None, None
        if isinstance(bias, torch.Tensor):
            bias_0 = bias
        elif isinstance(bias, tuple):
            assert len(bias) == 2
            bias_0, bias_1 = bias
        return bias_0, bias_1

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return _recommended(_DISPATCH_CONFIGS, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return _recommended(_COMBINE_CONFIGS, num_ranks)

    # ---- helpers -----------------------------------------------------------------------------

    def _intranode(self, what: str) -> None:
        if self.group_size > NUM_MAX_NVL_PEERS:
            raise NotImplementedError(
                f"{what}: the moe_a2a emulation covers intranode DeepEP (up to "
                f"{NUM_MAX_NVL_PEERS} ranks); {self.group_size} ranks would take the internode "
                f"kernels, which are not emulated")
        _check(self.group_size in INTRANODE_RANKS, "Unsupported ranks",
               f"intranode kernels are compiled for {INTRANODE_RANKS} ranks, the group has "
               f"{self.group_size}")

    def _gather_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """``[W]`` per-destination counts of every rank -> ``[W_src, W_dst]`` (int64)."""
        world = self.group_size
        out = torch.empty(world * world, dtype=torch.int64, device=counts.device)
        gather_into(out, counts.to(torch.int64).contiguous(), self.group)
        return out.view(world, world)

    def _all_to_all(self, x: torch.Tensor, recv_splits, send_splits) -> torch.Tensor:
        return all_to_all_v(x.contiguous(), list(recv_splits), list(send_splits), self.group)

    @staticmethod
    def _events(async_finish: bool, previous_event, allocate_on_comm_stream: bool,
                tensors=None) -> EventOverlap:
        if allocate_on_comm_stream:
            _check(previous_event is not None and async_finish,
                   "previous_event.has_value() and async")
        return EventOverlap(EventHandle() if async_finish else None, tensors)

    # ---- normal mode -----------------------------------------------------------------------

    # noinspection PyTypeChecker
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """``(num_tokens_per_rank [W] int32, None (intranode), num_tokens_per_expert [E] int32,
        is_token_in_rank [T, W] bool, event)``."""
        self._runtime("get_dispatch_layout")
        _check(topk_idx.dim() == 2, "topk_idx.dim() == 2")
        _check(topk_idx.is_contiguous(), "topk_idx.is_contiguous()")
        _check(num_experts > 0, "num_experts > 0")
        event = self._events(async_finish, previous_event, allocate_on_comm_stream)
        world = self.group_size
        ids = topk_idx.to(torch.int64)
        num_tokens = ids.shape[0]
        valid = ids >= 0
        per_expert = torch.bincount(ids[valid], minlength=num_experts)[:num_experts]
        ranks = torch.where(valid, torch.div(ids, max(1, num_experts // world),
                                             rounding_mode="floor"),
                            torch.full_like(ids, world))
        in_rank = torch.zeros(num_tokens, world + 1, dtype=torch.bool, device=ids.device)
        in_rank.scatter_(1, ranks, True)
        is_token_in_rank = in_rank[:, :world].contiguous()
        per_rank = is_token_in_rank.sum(dim=0)
        return (per_rank.to(torch.int32), None, per_expert.to(torch.int32), is_token_in_rank,
                event)

    # noinspection PyTypeChecker
    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 handle: Optional[Tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], Optional[torch.Tensor],
                  Optional[torch.Tensor], Optional[List[int]], Optional[Tuple], EventOverlap]:
        """Send each token once to every rank holding one of its experts.

        Returns ``(recv_x (or (recv_x, recv_x_scales)), recv_topk_idx [R, K] int64 (local ids,
        -1 elsewhere), recv_topk_weights [R, K] float32 (0 where -1),
        num_recv_tokens_per_expert_list, handle, event)``; with a ``handle`` (cached mode) only
        ``recv_x`` is returned, the rest are None.
        """
        self._runtime("dispatch")
        config = self.get_dispatch_config(self.group_size) if config is None else config
        self._intranode("Buffer.dispatch")
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        cached = handle is not None
        if handle is not None:
            assert topk_idx is None and topk_weights is None
            rank_prefix_matrix, channel_prefix_matrix, _, _, is_token_in_rank, _ = handle
        else:
            _check(num_tokens_per_rank is not None and num_tokens_per_expert is not None,
                   "num_tokens_per_rank.has_value() and num_tokens_per_expert.has_value()")
            assert (num_tokens_per_rank is not None and is_token_in_rank is not None
                    and num_tokens_per_expert is not None)
        world, rank = self.group_size, self.rank
        num_channels = config.num_sms // 2
        _check(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        _check(is_token_in_rank.dtype == torch.bool, "is_token_in_rank.scalar_type() == torch::kBool")
        _check(x.dim() == 2 and x.is_contiguous(), "x.dim() == 2 and x.is_contiguous()")
        _check(x.shape[1] * x.element_size() % 16 == 0, "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        _check(is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous(),
               "is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous()")
        _check(tuple(is_token_in_rank.shape) == (x.shape[0], world),
               "is_token_in_rank.size(0) == x.size(0) and is_token_in_rank.size(1) == num_ranks")
        num_tokens, hidden = int(x.shape[0]), int(x.shape[1])
        if cached:
            _check(rank_prefix_matrix.dtype == torch.int32, "cached_rank_prefix_matrix int32")
            _check(tuple(rank_prefix_matrix.shape) == (world, world),
                   "cached_rank_prefix_matrix->size(0) == num_ranks and size(1) == num_ranks")
            _check(tuple(channel_prefix_matrix.shape) == (world, num_channels),
                   "cached_channel_prefix_matrix->size(1) == num_channels")
            num_experts = 0
        else:
            assert num_tokens_per_expert is not None and num_tokens_per_rank is not None  # checked above
            _check(num_tokens_per_expert.dtype == torch.int32, "num_tokens_per_expert int32")
            _check(num_tokens_per_rank.dtype == torch.int32, "num_tokens_per_rank int32")
            _check(num_tokens_per_expert.dim() == 1 and num_tokens_per_expert.shape[0] % world == 0,
                   "num_tokens_per_expert->size(0) % num_ranks == 0")
            _check(num_tokens_per_expert.shape[0] // world <= NUM_MAX_LOCAL_EXPERTS,
                   "num_tokens_per_expert->size(0) / num_ranks <= NUM_MAX_LOCAL_EXPERTS")
            _check(tuple(num_tokens_per_rank.shape) == (world,),
                   "num_tokens_per_rank->size(0) == num_ranks")
            num_experts = int(num_tokens_per_expert.shape[0])
        num_local = num_experts // world if num_experts else 0
        _check((topk_idx is None) == (topk_weights is None),
               "topk_idx.has_value() == topk_weights.has_value()")
        num_topk = 0
        if topk_idx is not None and topk_weights is not None:  # both or neither (checked above)
            num_topk = int(topk_idx.shape[1])
            _check(num_experts > 0, "num_experts > 0")
            _check(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx contiguous [T, K]")
            _check(topk_weights.dim() == 2 and topk_weights.is_contiguous(),
                   "topk_weights contiguous [T, K]")
            _check(topk_idx.shape[0] == num_tokens and topk_weights.shape[0] == num_tokens,
                   "num_tokens == topk_idx->size(0) and num_tokens == topk_weights->size(0)")
            _check(topk_weights.shape[1] == num_topk, "num_topk == topk_weights->size(1)")
            _check(topk_weights.dtype == torch.float32, "topk_weights->scalar_type() == torch::kFloat32")
        num_scales = 0
        if x_scales is not None:
            _check(x.element_size() == 1, "x.element_size() == 1")
            _check(x_scales.dtype in (torch.float32, torch.int32),
                   "x_scales->scalar_type() == torch::kFloat32 or torch::kInt")
            _check(x_scales.dim() == 2 and x_scales.shape[0] == num_tokens,
                   "x_scales->dim() == 2 and x_scales->size(0) == num_tokens")
            num_scales = int(x_scales.shape[1])
        event = self._events(async_finish, previous_event, allocate_on_comm_stream)
        recv_bytes = config.num_max_nvl_chunked_recv_tokens
        if not cached:
            _check(world * (world + num_local) * 4 <= self.num_nvl_bytes,
                   "num_ranks * (num_ranks + num_local_experts) * sizeof(int) <= num_nvl_bytes")
        need = (world * world * 4 + num_channels * world * 4 * 4
                + num_channels * world * recv_bytes * hidden * x.element_size()
                + num_channels * world * recv_bytes * 4
                + num_channels * world * recv_bytes * num_topk * 12
                + num_channels * world * recv_bytes * 4 * num_scales)
        _check(need <= self.num_nvl_bytes, "intranode dispatch buffer bytes <= num_nvl_bytes",
               f"needs {need} bytes, the buffer has num_nvl_bytes={self.num_nvl_bytes}; size it "
               f"with Config.get_nvl_buffer_size_hint")
        self._low_latency_clean = False

        # what goes where
        device = x.device
        in_rank = is_token_in_rank.to(torch.int64)
        send_counts = in_rank.sum(dim=0)
        if not cached:
            assert num_tokens_per_rank is not None  # checked above
            _check(torch.equal(send_counts, num_tokens_per_rank.to(torch.int64)),
                   "num_tokens_per_rank matches is_token_in_rank",
                   "the layout tensors disagree; pass what get_dispatch_layout returned")
        counts = self._gather_counts(send_counts)             # [src, dst]
        prefix = torch.cumsum(counts, dim=0)
        send_splits = counts[rank].tolist()
        recv_splits = counts[:, rank].tolist()
        # rank-major send order: the tokens sent to rank 0 in token order, then to rank 1, ...
        send_token = torch.nonzero(is_token_in_rank.t(), as_tuple=True)[1]
        send_rank = torch.repeat_interleave(torch.arange(world, device=device),
                                            send_counts, output_size=int(send_token.numel()))
        recv_x = self._all_to_all(x.index_select(0, send_token), recv_splits, send_splits)
        recv_scales = None
        if x_scales is not None:
            recv_scales = self._all_to_all(x_scales.index_select(0, send_token), recv_splits,
                                           send_splits)
        recv_src_idx = self._all_to_all(send_token, recv_splits, send_splits).to(torch.int32)
        num_recv = int(recv_x.shape[0])

        # the handle: prefix matrices, source indices, where each token went
        channel_tokens = -(-num_tokens // num_channels) if num_channels else 0
        channel_of = (torch.arange(num_tokens, device=device) // max(1, channel_tokens))
        per_channel = torch.zeros(world, num_channels, dtype=torch.int64, device=device)
        if num_tokens:
            per_channel.index_add_(1, channel_of, in_rank.t().contiguous())
        channel_prefix = torch.cumsum(per_channel, dim=1).to(torch.int32)
        recv_channel_prefix = self._all_to_all(channel_prefix, [1] * world, [1] * world)
        within = torch.cumsum(in_rank, dim=0) - in_rank
        send_head = torch.where(is_token_in_rank, within, torch.full_like(within, -1)).to(torch.int32)
        new_handle = (prefix.to(torch.int32), channel_prefix, recv_channel_prefix, recv_src_idx,
                      is_token_in_rank, send_head)
        if cached:
            out_x = (recv_x, recv_scales) if recv_scales is not None else recv_x
            return out_x, None, None, None, None, event
        if topk_idx is None or topk_weights is None:
            raise NotImplementedError("the moe_a2a emulation of deep_ep.Buffer.dispatch needs "
                                      "topk_idx and topk_weights when no handle is given")

        # the kernel rewrites ids on the sender: the receiver's local ids, -1 (weight 0) elsewhere
        local, row_weights = localize_topk(topk_idx.index_select(0, send_token),
                                           topk_weights.index_select(0, send_token), send_rank,
                                           num_local)
        recv_topk_idx = self._all_to_all(local, recv_splits, send_splits)
        recv_topk_weights = self._all_to_all(row_weights, recv_splits, send_splits)
        expert_counts = torch.bincount(recv_topk_idx[recv_topk_idx >= 0],
                                       minlength=num_local)[:num_local]
        aligned = (-(-expert_counts // expert_alignment) * expert_alignment).tolist()
        if num_worst_tokens > 0:
            _check(num_recv <= num_worst_tokens, "num_recv_tokens <= num_worst_tokens",
                   f"{num_recv} tokens arrived, num_worst_tokens={num_worst_tokens}")
            pad = num_worst_tokens - num_recv
            recv_x = torch.cat([recv_x, recv_x.new_zeros((pad, hidden))])
            if recv_scales is not None:
                recv_scales = torch.cat([recv_scales, recv_scales.new_zeros((pad, num_scales))])
            recv_topk_idx = torch.cat([recv_topk_idx, recv_topk_idx.new_full((pad, num_topk), -1)])
            recv_topk_weights = torch.cat([recv_topk_weights,
                                           recv_topk_weights.new_zeros((pad, num_topk))])
            aligned = []
        out_x = (recv_x, recv_scales) if recv_scales is not None else recv_x
        return out_x, recv_topk_idx, recv_topk_weights, aligned, new_handle, event

    # noinspection PyTypeChecker
    def combine(self, x: torch.Tensor, handle: Tuple,
                topk_weights: Optional[torch.Tensor] = None,
                bias: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
                config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Sum each token's rows back at its origin (**without** weights): ``(combined_x
        [T, H] (x's dtype), combined_topk_weights [T, K] or None, event)``."""
        self._runtime("combine")
        config = self.get_combine_config(self.group_size) if config is None else config
        self._intranode("Buffer.combine")
        rank_prefix_matrix, _, channel_prefix_matrix, src_idx, is_recv_token_in_rank, send_head = handle
        bias_0, bias_1 = Buffer._unpack_bias(bias)
        world, rank = self.group_size, self.rank
        num_channels = config.num_sms // 2
        _check(x.dim() == 2 and x.is_contiguous(), "x.dim() == 2 and x.is_contiguous()")
        _check(src_idx.dim() == 1 and src_idx.dtype == torch.int32, "src_idx int32 [N]")
        _check(send_head.dim() == 2 and send_head.dtype == torch.int32, "send_head int32 [T, W]")
        _check(rank_prefix_matrix.dtype == torch.int32
               and tuple(rank_prefix_matrix.shape) == (world, world),
               "rank_prefix_matrix int32 [num_ranks, num_ranks]")
        _check(tuple(channel_prefix_matrix.shape) == (world, num_channels),
               "channel_prefix_matrix->size(1) == num_channels")
        _check(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        num_tokens, hidden = int(x.shape[0]), int(x.shape[1])
        num_recv = int(send_head.shape[0])
        _check(src_idx.shape[0] == num_tokens, "src_idx.size(0) == num_tokens",
               f"x has {num_tokens} rows but the handle describes {src_idx.shape[0]}")
        _check(send_head.shape[1] == world, "send_head.size(1) == num_ranks")
        _check(hidden * x.element_size() % 16 == 0, "(hidden * x.element_size()) % sizeof(int4) == 0")
        _check(x.dtype == torch.bfloat16, "Unsupported type",
               f"the intranode combine kernel is compiled for bfloat16 only, got {x.dtype}")
        num_topk = 0
        if topk_weights is not None:
            _check(topk_weights.dim() == 2 and topk_weights.is_contiguous()
                   and topk_weights.shape[0] == num_tokens and topk_weights.dtype == torch.float32,
                   "topk_weights float32 contiguous [num_tokens, K]")
            num_topk = int(topk_weights.shape[1])
        for b in (bias_0, bias_1):
            if b is not None:
                _check(b.dim() == 2 and b.is_contiguous() and b.dtype == x.dtype
                       and tuple(b.shape) == (num_recv, hidden),
                       "bias [num_recv_tokens, hidden] contiguous, x's dtype")
        event = self._events(async_finish, previous_event, allocate_on_comm_stream)
        need = (num_channels * world * 8
                + num_channels * world * config.num_max_nvl_chunked_recv_tokens * hidden * x.element_size()
                + num_channels * world * config.num_max_nvl_chunked_recv_tokens * 4
                + num_channels * world * config.num_max_nvl_chunked_recv_tokens * num_topk * 4)
        _check(need <= self.num_nvl_bytes, "intranode combine buffer bytes <= num_nvl_bytes",
               f"needs {need} bytes, the buffer has num_nvl_bytes={self.num_nvl_bytes}")
        self._low_latency_clean = False
        column = rank_prefix_matrix[:, rank].to(torch.int64)
        recv_from = torch.diff(column, prepend=column.new_zeros(1)).tolist()  # rows I hold per source
        sent_to = is_recv_token_in_rank.to(torch.int64).sum(dim=0).tolist()   # rows coming back
        back = self._all_to_all(x, sent_to, recv_from)
        back_idx = self._all_to_all(src_idx.to(torch.int64), sent_to, recv_from)
        acc = torch.zeros(num_recv, hidden, dtype=torch.float32, device=x.device)
        acc.index_add_(0, back_idx, back.float())
        for b in (bias_0, bias_1):
            if b is not None:
                acc += b.float()
        combined_topk_weights = None
        if topk_weights is not None:
            back_w = self._all_to_all(topk_weights, sent_to, recv_from)
            combined_topk_weights = torch.zeros(num_recv, num_topk, dtype=torch.float32,
                                                device=x.device)
            combined_topk_weights.index_add_(0, back_idx, back_w)
        return acc.to(x.dtype), combined_topk_weights, event

    def internode_dispatch(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("the moe_a2a emulation does not cover DeepEP's internode "
                                  "(more than 8 ranks) kernels")

    def internode_combine(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("the moe_a2a emulation does not cover DeepEP's internode "
                                  "(more than 8 ranks) kernels")

    # ---- low-latency mode --------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """Zero the low-latency flags; needed after normal-mode calls before any
        low-latency kernel."""
        self._runtime("clean_low_latency_buffer")
        _check(self.low_latency_mode, "low_latency_mode")
        total = _low_latency_layout_bytes(num_max_dispatch_tokens_per_rank, hidden,
                                          self.group_size, num_experts)
        _check(total <= self.num_rdma_bytes, "0 <= offset and offset + num_bytes <= num_rdma_bytes")
        self._low_latency_clean = True

    def _check_low_latency(self, hidden: int, num_topk: int, cap: int, num_experts: int) -> None:
        _check(self.low_latency_mode, "low_latency_mode",
               "create the Buffer with low_latency_mode=True for low-latency kernels")
        _check(hidden in LOW_LATENCY_HIDDEN_SIZES, "Unsupported hidden",
               f"low-latency kernels are compiled for hidden sizes {LOW_LATENCY_HIDDEN_SIZES}, "
               f"got {hidden}")
        _check(num_topk <= LOW_LATENCY_MAX_TOPK, "num_topk <= kNumMaxTopK",
               f"low-latency kernels take at most {LOW_LATENCY_MAX_TOPK} top-k columns, got {num_topk}")
        _check(num_experts % self.group_size == 0, "num_experts % num_ranks == 0")
        _check(num_experts * 4 * 2 <= NUM_WORKSPACE_BYTES,
               "num_experts * sizeof(int) * 2 <= NUM_WORKSPACE_BYTES")
        total = _low_latency_layout_bytes(cap, hidden, self.group_size, num_experts)
        _check(total <= self.num_rdma_bytes, "layout.total_bytes <= num_rdma_bytes",
               f"needs {total} bytes, the buffer has num_rdma_bytes={self.num_rdma_bytes}; size "
               f"it with Buffer.get_low_latency_rdma_size_hint")
        if not self._low_latency_clean:
            raise RuntimeError(
                "moe_a2a emulation of DeepEP: a low-latency kernel after normal-mode kernels "
                "without clean_low_latency_buffer(); the real kernel would read stale flags "
                "(hang or garbage); fix: call Buffer.clean_low_latency_buffer(...) when "
                "switching from normal to low-latency mode")

    # noinspection PyTypeChecker
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, Tuple,
                  EventOverlap, Optional[Callable]]:
        """Send each (token, expert) pair to the expert's rank, into a masked layout.

        Returns ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is
        ``[E_local, cap * W, H]`` bf16, or with ``use_fp8`` a tuple of e4m3 data and scales
        ``[E_local, cap * W, H // 128]`` float32 (``H // 512`` int32 with ``use_ue8m0``),
        column-major in the last two dims; ``recv_count [E_local]`` int32; ``handle =
        (src_info [E_local, cap * W] int32, layout_range [E_local, W] int64, cap, H, E)``;
        ``hook`` is None unless ``return_recv_hook``.
        """
        self._runtime("low_latency_dispatch")
        cap = num_max_dispatch_tokens_per_rank
        _check(self.low_latency_mode, "low_latency_mode")
        _check(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16,
               "x.dim() == 2 and x.is_contiguous() and x.scalar_type() == torch::kBFloat16")
        _check(x.shape[1] % 8 == 0 and x.shape[1] % 128 == 0,
               "x.size(1) % sizeof(int4) == 0 and x.size(1) % 128 == 0")
        _check(topk_idx.dim() == 2 and topk_idx.is_contiguous(),
               "topk_idx.dim() == 2 and topk_idx.is_contiguous()")
        _check(x.shape[0] == topk_idx.shape[0] and x.shape[0] <= cap,
               "x.size(0) == topk_idx.size(0) and x.size(0) <= num_max_dispatch_tokens_per_rank",
               f"{x.shape[0]} tokens, capacity num_max_dispatch_tokens_per_rank={cap}")
        _check(topk_idx.dtype == torch.int64, "topk_idx.scalar_type() == torch::kInt64")
        _check(num_experts % self.group_size == 0, "num_experts % num_ranks == 0")
        world, rank = self.group_size, self.rank
        num_local = num_experts // world
        if cumulative_local_expert_recv_stats is not None:
            s = cumulative_local_expert_recv_stats
            _check(s.dtype == torch.int32 and s.dim() == 1 and s.is_contiguous()
                   and s.shape[0] == num_local, "cumulative_local_expert_recv_stats int32 [E_local]")
        if dispatch_wait_recv_cost_stats is not None:
            s = dispatch_wait_recv_cost_stats
            _check(s.dtype == torch.int64 and s.dim() == 1 and s.is_contiguous()
                   and s.shape[0] == world, "dispatch_wait_recv_cost_stats int64 [num_ranks]")
        num_tokens, hidden = int(x.shape[0]), int(x.shape[1])
        num_topk = int(topk_idx.shape[1])
        self._check_low_latency(hidden, num_topk, cap, num_experts)
        _check(not (async_finish and return_recv_hook), "not (async and return_recv_hook)")
        _check((world * cap) % 4 == 0, "(num_ranks * num_max_dispatch_tokens_per_rank) % 4 == 0",
               "TMA requires the number of tokens to be multiple of 4")
        if use_fp8:
            _check(hidden % 512 == 0, "hidden % 512 == 0")
            if use_ue8m0:
                _check(round_scale, "round_scale", "UE8M0 SF requires `round_scale=True`")

        device = x.device
        ids = topk_idx.reshape(-1)
        pair_token = torch.arange(num_tokens * num_topk, device=device) // max(1, num_topk)
        valid = ids >= 0
        ids, pair_token = ids[valid], pair_token[valid]
        order = torch.argsort(ids * (num_tokens + 1) + pair_token, stable=True)  # (expert, token)
        ids, pair_token = ids[order], pair_token[order]
        counts = torch.bincount(ids, minlength=num_experts)[:num_experts]      # [W * E_local]
        send_splits = counts.view(world, num_local).sum(dim=1).tolist()
        recv_counts = self._all_to_all(counts.view(world, num_local), [1] * world, [1] * world)
        recv_splits = recv_counts.sum(dim=1).tolist()                            # [src]
        rows = self._all_to_all(x.index_select(0, pair_token), recv_splits, send_splits)
        tokens = self._all_to_all(pair_token, recv_splits, send_splits)
        experts = self._all_to_all(ids, recv_splits, send_splits) - rank * num_local

        # place each source's rows of expert e at the expert's next free slots, sources in order
        width = cap * world
        recv_count = recv_counts.sum(dim=0)                                      # [E_local]
        begin = torch.cumsum(recv_counts, dim=0) - recv_counts                   # [src, e]
        src_of_row = torch.repeat_interleave(torch.arange(world, device=device),
                                             torch.tensor(recv_splits, device=device),
                                             output_size=int(rows.shape[0]))
        flat_key = src_of_row * num_local + experts
        starts = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
        within = torch.arange(rows.shape[0], device=device) - starts[flat_key]
        slot = begin[src_of_row, experts] + within
        layout_range = (begin.t().contiguous() << 32) | recv_counts.t().contiguous()
        src_info = torch.full((num_local, width), -1, dtype=torch.int32, device=device)
        src_info[experts, slot] = tokens.to(torch.int32)
        staged = torch.full((num_local, width, hidden), float("nan"), dtype=torch.bfloat16,
                            device=device)
        staged[experts, slot] = rows
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += recv_count.to(torch.int32)
        self._next_combine = None

        def deliver(into: Tuple[torch.Tensor, ...]) -> None:
            if not use_fp8:
                into[0].copy_(staged)
                return
            q, s = quantize_per_token(staged.reshape(-1, hidden).nan_to_num(0.0),
                                      round_scale=round_scale)
            q = q.view(num_local, width, hidden)
            s = s.view(num_local, width, hidden // 128)
            filled = torch.zeros(num_local, width, dtype=torch.bool, device=device)
            filled[experts, slot] = True
            into[0].copy_(torch.where(filled[..., None], q.view(torch.uint8),
                                      torch.full_like(q.view(torch.uint8), 0x7F)).view(FP8))
            if use_ue8m0:
                exponent = ((s.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.int32)
                e4 = exponent.view(num_local, width, hidden // 512, 4)
                packed = e4[..., 0] | (e4[..., 1] << 8) | (e4[..., 2] << 16) | (e4[..., 3] << 24)
                into[1].copy_(packed)
            else:
                into[1].copy_(torch.where(filled[..., None], s, torch.full_like(s, float("nan"))))

        packed_recv_x = torch.full((num_local, width, hidden), float("nan"),
                                   dtype=FP8 if use_fp8 else torch.bfloat16, device=device)
        packed_recv_x_scales = None
        if use_fp8:
            columns = hidden // 512 if use_ue8m0 else hidden // 128
            scale_dtype = torch.int32 if use_ue8m0 else torch.float32
            packed_recv_x_scales = torch.empty((num_local, columns, width), dtype=scale_dtype,
                                               device=device).transpose(1, 2)
            packed_recv_x_scales.fill_(0 if use_ue8m0 else float("nan"))
        received = ((packed_recv_x,) if packed_recv_x_scales is None
                    else (packed_recv_x, packed_recv_x_scales))
        hook = None
        if return_recv_hook:
            hook = lambda: deliver(received)  # noqa: E731 - the data appears when received
        else:
            deliver(received)
        handle = (src_info, layout_range, cap, hidden, num_experts)
        tensors_to_record = (x, topk_idx, packed_recv_x, packed_recv_x_scales, recv_count,
                             src_info, layout_range, cumulative_local_expert_recv_stats)
        recv = ((packed_recv_x, packed_recv_x_scales) if packed_recv_x_scales is not None
                else packed_recv_x)
        return (recv, recv_count.to(torch.int32), handle,
                EventOverlap(EventHandle() if async_finish else None,
                             tensors_to_record if async_finish else None), hook)

    # noinspection PyTypeChecker
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None) -> \
            Tuple[torch.Tensor, EventOverlap, Optional[Callable]]:
        """Send each expert's rows back and reduce them **with** ``topk_weights`` at the
        origin: ``(combined_x [T, H] bf16, event, hook)``."""
        self._runtime("low_latency_combine")
        src_info, layout_range, cap, hidden, num_experts = handle
        world, rank = self.group_size, self.rank
        num_local = num_experts // world
        _check(self.low_latency_mode, "low_latency_mode")
        _check(x.dim() == 3 and x.is_contiguous() and x.dtype == torch.bfloat16,
               "x.dim() == 3 and x.is_contiguous() and x.scalar_type() == torch::kBFloat16")
        _check(x.shape[0] == num_local, "x.size(0) == num_experts / num_ranks")
        _check(x.shape[1] == world * cap, "x.size(1) == num_ranks * num_max_dispatch_tokens_per_rank")
        _check(x.shape[2] % 8 == 0 and x.shape[2] % 128 == 0,
               "x.size(2) % sizeof(int4) == 0 and x.size(2) % 128 == 0")
        _check(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx.dim() == 2 and contiguous")
        _check(tuple(topk_idx.shape) == tuple(topk_weights.shape),
               "topk_idx.size(0) == topk_weights.size(0) and topk_idx.size(1) == topk_weights.size(1)")
        _check(topk_idx.dtype == torch.int64, "topk_idx.scalar_type() == torch::kInt64")
        _check(topk_weights.dim() == 2 and topk_weights.is_contiguous(), "topk_weights contiguous")
        _check(topk_weights.shape[0] <= cap, "topk_weights.size(0) <= num_max_dispatch_tokens_per_rank")
        _check(topk_weights.dtype == torch.float32, "topk_weights.scalar_type() == torch::kFloat32")
        _check(src_info.dim() == 2 and src_info.dtype == torch.int32 and src_info.shape[0] == x.shape[0],
               "src_info.scalar_type() == torch::kInt32 and x.size(0) == src_info.size(0)")
        _check(layout_range.dtype == torch.int64 and tuple(layout_range.shape) == (num_local, world),
               "layout_range int64 [num_experts / num_ranks, num_ranks]")
        if combine_wait_recv_cost_stats is not None:
            s = combine_wait_recv_cost_stats
            _check(s.dtype == torch.int64 and s.dim() == 1 and s.shape[0] == world,
                   "combine_wait_recv_cost_stats int64 [num_ranks]")
        num_combined, num_topk = int(topk_weights.shape[0]), int(topk_weights.shape[1])
        self._check_low_latency(int(x.shape[2]), num_topk, cap, num_experts)
        _check(not (async_finish and return_recv_hook), "not (async and return_recv_hook)")
        if out is not None:
            _check(out.dim() == 2 and out.is_contiguous() and out.dtype == torch.bfloat16
                   and tuple(out.shape) == (num_combined, hidden),
                   "out bf16 contiguous [num_combined_tokens, hidden]")
        source = x
        if zero_copy:
            _check(self._next_combine is not None, "zero_copy needs get_next_low_latency_combine_buffer")
            assert self._next_combine is not None  # _check raised otherwise
            source = self._next_combine
        device = x.device
        begin = (layout_range >> 32)                                        # [E_local, W]
        count = (layout_range & _INT_MASK)
        # send back to each source rank: its rows of every local expert, expert-major
        slots: List[Tuple[int, int, int]] = []
        send_splits: List[int] = []
        for src in range(world):
            n = 0
            for e in range(num_local):
                b, c = int(begin[e, src]), int(count[e, src])
                if c:
                    slots.append((e, b, c))
                    n += c
            send_splits.append(n)
        if slots:
            rows = torch.cat([source[e, b:b + c] for e, b, c in slots])
            tokens = torch.cat([src_info[e, b:b + c].to(torch.int64) for e, b, c in slots])
            dest_experts = torch.cat([torch.full((c,), rank * num_local + e, dtype=torch.int64,
                                                 device=device) for e, b, c in slots])
        else:
            rows = x.new_empty((0, hidden))
            tokens = torch.empty(0, dtype=torch.int64, device=device)
            dest_experts = torch.empty(0, dtype=torch.int64, device=device)
        valid = topk_idx >= 0
        owner = torch.where(valid, torch.div(topk_idx, num_local, rounding_mode="floor"),
                            torch.full_like(topk_idx, world))
        recv_splits = torch.bincount(owner.reshape(-1), minlength=world + 1)[:world].tolist()
        back = self._all_to_all(rows, recv_splits, send_splits)
        back_token = self._all_to_all(tokens, recv_splits, send_splits)
        back_expert = self._all_to_all(dest_experts, recv_splits, send_splits)
        match = topk_idx.index_select(0, back_token) == back_expert.unsqueeze(1)
        weight = (topk_weights.index_select(0, back_token) * match).sum(dim=1)
        acc = torch.zeros(num_combined, hidden, dtype=torch.float32, device=device)
        acc.index_add_(0, back_token, back.float() * weight.unsqueeze(1))
        self._next_combine = None
        combined = out if out is not None else torch.empty(num_combined, hidden,
                                                           dtype=torch.bfloat16, device=device)
        hook = None
        if return_recv_hook:
            combined.fill_(float("nan"))
            hook = lambda: combined.copy_(acc)  # noqa: E731
        else:
            combined.copy_(acc)
        tensors_to_record = (x, topk_idx, topk_weights, src_info, layout_range, combined)
        return combined, EventOverlap(EventHandle() if async_finish else None,
                                      tensors_to_record if async_finish else None), hook

    def get_next_low_latency_combine_buffer(self, handle: Tuple):
        """The tensor the next ``low_latency_combine(..., zero_copy=True)`` reads:
        ``[E_local, W * cap, H]`` bf16, to be filled by the caller."""
        self._runtime("get_next_low_latency_combine_buffer")
        src_info, layout_range, cap, hidden, num_experts = handle
        self._next_combine = torch.zeros(num_experts // self.group_size, self.group_size * cap,
                                         hidden, dtype=torch.bfloat16, device=src_info.device)
        return self._next_combine


def check_nvlink_connections(group: dist.ProcessGroup):
    """NVLink topology check of ``deep_ep.utils`` (nothing to check in the emulation)."""


__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "check_nvlink_connections"]
