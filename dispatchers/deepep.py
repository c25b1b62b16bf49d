"""The ``deepep`` backend: DeepEP's normal and low-latency all-to-all (``deep_ep.Buffer``).

Written against DeepEP v1.2.1's Python API (``deep_ep/buffer.py``); ``deep_ep`` is imported
when the communicator is built, never at module import. On a machine without DeepEP the same
code runs on ``moe_a2a.testing.emulate_kernels()``'s stand-in (tests, ``moe-a2a run
--emulate-kernels``): the emulation replaces the module, not these code paths.

Per process: one :class:`DeepEPCommunicator` owns the one ``deep_ep.Buffer`` of the EP group,
sized from DeepEP's own hints (``Config.get_nvl_buffer_size_hint`` / ``get_rdma_buffer_size_hint``
of the normal configs, ``Buffer.get_low_latency_rdma_size_hint`` for the low-latency capacity)
and ``--deepep-config``; it is shared by every layer and destroyed by ``close()``.

Per step, the mode (``--deepep-mode``):

* ``normal``: ``get_dispatch_layout`` + ``dispatch`` (each token sent once per destination
  rank; received rows with *local* expert ids and weights, per-expert counts on the host) ->
  ``DeepEPNormalOutput``; the experts weight their rows; ``combine`` sums the rows back
  **without** weights.
* ``low_latency``: ``low_latency_dispatch`` (each (token, expert) pair into a masked
  ``[E_local, cap * ep, H]`` layout, fixed-size buffers, CUDA-graph capturable) ->
  ``DeepEPLowLatencyOutput``; the experts return unweighted rows; ``low_latency_combine``
  applies ``topk_weights`` while reducing. Capacity ``cap`` =
  ``--deepep-num-max-dispatch-tokens-per-rank``; a batch above it is an error naming that flag,
  raised on every rank from the agreed ``BatchInfo`` (never a truncation, never a hang).
* ``auto``: ``normal`` when any DP rank prefills in this step (``BatchInfo.any_prefill``,
  agreed across ranks), else ``low_latency``. Switching from normal to low-latency cleans the
  low-latency buffer first (``clean_low_latency_buffer``), as DeepEP requires.

FP8: with ``DeepEPSettings.fp8_dispatch`` activations travel as e4m3 with per-token
128-channel float32 scales (normal: cast here and passed as ``(x, scales)``; low-latency:
``use_fp8=True``, cast by the kernel); outputs carry ``scales`` and the experts runner
dequantises. Combines always move bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Set, Tuple, Type

import torch

from moe_a2a.dispatchers.base import BaseDispatcher, DispatcherSetup
from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK
from moe_a2a.dispatchers.checks import check_dispatch_inputs, combine_handle
from moe_a2a.dispatchers.communicator import CommSetup, Communicator
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.fp8 import quantize_per_token
from moe_a2a.dispatchers.kernels import import_kernel_package
from moe_a2a.dispatchers.outputs import (
    CombineInput,
    DeepEPLowLatencyOutput,
    DeepEPNormalOutput,
    DispatchOutput,
)
from moe_a2a.dispatchers.requirements import KernelRequirements

__all__ = ["DeepEPCommunicator", "DeepEPDispatcher", "DeepEPLowLatencyHandle",
           "DeepEPNormalHandle", "deepep_requirements"]

INSTALL_HINT = ("build DeepEP v1.2.1 from source with NVSHMEM on an SM90+ GPU "
                "(https://github.com/moe-a2a/moe-a2a/blob/main/docs/deepep.md), "
                "or use moe_a2a.testing.emulate_kernels() / moe-a2a run --emulate-kernels for the "
                "CPU emulation")
CAPACITY_FLAG = "--deepep-num-max-dispatch-tokens-per-rank"
CONFIG_FLAG = "--deepep-config"

# DeepEP v1.2.1 limits (csrc/kernels/launch.cuh, csrc/kernels/configs.cuh, buffer.py)
LOW_LATENCY_HIDDEN_SIZES = (2048, 2560, 4096, 5120, 6144, 7168, 8192)
NORMAL_EP_SIZES = (2, 4, 8, 16, 24, 32, 64, 128, 144, 160)  # get_dispatch_config's table
_CONFIG_FIELDS = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                  "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")

NORMAL = "normal"
LOW_LATENCY = "low_latency"


def _setting(settings: Any, name: str, default: Any) -> Any:
    return default if settings is None else getattr(settings, name, default)


def deepep_requirements(mode: str, fp8_dispatch: bool = False) -> KernelRequirements:
    """What DeepEP v1.2.1's kernels accept in ``mode`` (``auto`` needs both kernels')."""
    normal = KernelRequirements(
        kernels="DeepEP normal kernels", dtypes=("bfloat16",),  # the combine is bf16-only
        hidden_multiple=128 if fp8_dispatch else 8, ep_sizes=NORMAL_EP_SIZES,
        max_local_experts=1024)
    low_latency = KernelRequirements(
        kernels="DeepEP low-latency kernels", dtypes=("bfloat16",),
        hidden_sizes=tuple(h for h in LOW_LATENCY_HIDDEN_SIZES if not fp8_dispatch or h % 512 == 0),
        max_top_k=11, min_ep_size=2, max_local_experts=1024)
    if mode == NORMAL:
        return normal
    if mode == LOW_LATENCY:
        return low_latency
    return normal.merged(low_latency, "DeepEP normal and low-latency kernels (auto mode)")


def _parse_config(deep_ep: Any, raw: Optional[Dict[str, Any]]) -> Tuple[Any, Any, Optional[int]]:
    """``--deepep-config`` -> (dispatch Config or None, combine Config or None, num_sms)."""
    if not raw:
        return None, None, None
    unknown = sorted(set(raw) - {"normal_dispatch", "normal_combine"})
    if unknown:
        raise DispatcherError(f"{CONFIG_FLAG} has keys {unknown}; expected 'normal_dispatch' and/or "
                              f"'normal_combine', each an object with {', '.join(_CONFIG_FIELDS)}")
    configs: List[Any] = []
    sms: Set[int] = set()
    for key in ("normal_dispatch", "normal_combine"):
        entry = raw.get(key)
        if entry is None:
            configs.append(None)
            continue
        if not isinstance(entry, dict) or set(entry) - set(_CONFIG_FIELDS):
            bad = sorted(set(entry) - set(_CONFIG_FIELDS)) if isinstance(entry, dict) else entry
            raise DispatcherError(f"{CONFIG_FLAG}: {key} has {bad!r}; its keys are "
                                  f"{', '.join(_CONFIG_FIELDS)} (deep_ep.Config's arguments)")
        try:
            configs.append(deep_ep.Config(**entry))
        except Exception as exc:  # the extension rejects inconsistent chunk sizes
            raise DispatcherError(f"{CONFIG_FLAG}: deep_ep.Config(**{entry}) for {key} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if "num_sms" in entry:
            sms.add(int(entry["num_sms"]))
    if len(sms) > 1:
        raise DispatcherError(f"{CONFIG_FLAG}: normal_dispatch and normal_combine give different "
                              f"num_sms {sorted(sms)}; fix: use one SM count for both")
    return configs[0], configs[1], (sms.pop() if sms else None)


class DeepEPCommunicator(Communicator):
    """The process's one ``deep_ep.Buffer`` (EP group), its configs and the current mode.

    Attributes:
        buffer: the ``deep_ep.Buffer`` (None once closed).
        mode: ``--deepep-mode`` (``normal``, ``low_latency`` or ``auto``).
        capacity: ``num_max_dispatch_tokens_per_rank`` (low-latency modes).
        num_nvl_bytes / num_rdma_bytes / num_qps_per_rank: what the buffer was created with.
        dispatch_config / combine_config: ``deep_ep.Config`` from ``--deepep-config``, or None
            (DeepEP's defaults for the EP size).
        cleans: how many times the low-latency buffer was cleaned on a mode switch.
    """

    def __init__(self, setup: CommSetup) -> None:
        super().__init__(setup)
        settings, g = setup.settings, setup.groups
        self.mode = str(_setting(settings, "mode", "auto"))
        self.capacity = int(_setting(settings, "num_max_dispatch_tokens_per_rank", 128))
        self.fp8_dispatch = bool(_setting(settings, "fp8_dispatch", False))
        if g.moe_tp_size != 1 or g.ep_size != g.world_size or g.ep_group is None:
            raise DispatcherError(
                f"DeepEP needs one EP group of all {g.world_size} ranks (ep_size == tp_size >= 2, "
                f"moe_tp_size == 1); got ep_size={g.ep_size}, moe_tp_size={g.moe_tp_size}; fix: "
                f"--tp-size >= 2 without --ep-size (deepep derives it)")
        deepep_requirements(self.mode, self.fp8_dispatch).check(
            "DeepEPCommunicator", dtype=setup.dtype, hidden_size=setup.hidden_size,
            top_k=setup.top_k, ep_size=g.ep_size, num_experts=setup.num_experts)
        deep_ep = import_kernel_package("deep_ep", "the deepep backend", INSTALL_HINT)
        self.deep_ep = deep_ep
        self.dispatch_config, self.combine_config, config_sms = _parse_config(
            deep_ep, _setting(settings, "config", None))
        world, hidden, experts = g.ep_size, setup.hidden_size, setup.num_experts
        nvl = rdma = 0
        qps = []
        if self.mode != LOW_LATENCY:
            hidden_bytes = hidden * 2  # bf16 rows: the largest payload (FP8 rows are smaller)
            for config in (self.dispatch_config or deep_ep.Buffer.get_dispatch_config(world),
                           self.combine_config or deep_ep.Buffer.get_combine_config(world)):
                nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden_bytes, world))
                rdma = max(rdma, config.get_rdma_buffer_size_hint(hidden_bytes, world))
            qps.append(config_sms if config_sms is not None else deep_ep.Buffer.num_sms)
        if self.mode != NORMAL:
            rdma = max(rdma, deep_ep.Buffer.get_low_latency_rdma_size_hint(
                self.capacity, hidden, world, experts))
            qps.append(experts // world)  # DeepEP: one QP per local expert in low-latency mode
        self.num_nvl_bytes, self.num_rdma_bytes, self.num_qps_per_rank = nvl, rdma, max(qps)
        self.buffer = deep_ep.Buffer(g.ep_group, nvl, rdma, low_latency_mode=self.mode != NORMAL,
                                     num_qps_per_rank=self.num_qps_per_rank,
                                     explicitly_destroy=True)
        self._last_mode: Optional[str] = None
        self.cleans = 0

    def enter(self, mode: str) -> Any:
        """The buffer, ready for ``mode``'s kernels (cleaned when leaving normal mode)."""
        self.check_open("DeepEP dispatch")
        if mode == LOW_LATENCY and self._last_mode == NORMAL:
            self.buffer.clean_low_latency_buffer(self.capacity, self.setup.hidden_size,
                                                 self.setup.num_experts)
            self.cleans += 1
        self._last_mode = mode
        return self.buffer

    def open_buffer(self) -> Any:
        """The buffer for a combine: its dispatch already prepared the mode (cleaning between
        a low-latency dispatch and its combine would wipe the combine's flags)."""
        self.check_open("DeepEP combine")
        return self.buffer

    def close(self) -> None:
        if getattr(self, "buffer", None) is not None:
            self.buffer.destroy()
            self.buffer = None
        super().close()


@dataclass(frozen=True)
class DeepEPNormalHandle:
    """What the normal ``combine`` needs: DeepEP's dispatch ``handle`` (the intranode 6-tuple
    ``(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
    is_token_in_rank, send_head)``), this rank's token count and the input dtype."""

    buffer_handle: Tuple[Any, ...]
    num_tokens: int
    input_dtype: torch.dtype


@dataclass(frozen=True)
class DeepEPLowLatencyHandle:
    """What ``low_latency_combine`` needs: DeepEP's handle ``(src_info, layout_range, cap, H,
    E)`` and the dispatched routing (``topk_ids [T, K]`` int64 global ids, ``topk_weights
    [T, K]`` float32: the combine applies the weights)."""

    buffer_handle: Tuple[Any, ...]
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens: int
    input_dtype: torch.dtype


class DeepEPDispatcher(BaseDispatcher):
    """DeepEP dispatch/combine over the process's ``deep_ep.Buffer``.

    ``output_class`` is ``DeepEPNormalOutput`` (what the registry checks; an instance in
    ``low_latency`` mode declares ``DeepEPLowLatencyOutput``); in ``auto`` mode each step
    returns one of ``output_classes``, chosen from the step's ``BatchInfo``.

    Attributes:
        mode_counts: dispatches per kernel mode (``normal``, ``low_latency``).
    """

    output_class: ClassVar[Type[DispatchOutput]] = DeepEPNormalOutput
    output_classes: ClassVar[Tuple[type, ...]] = (DeepEPNormalOutput, DeepEPLowLatencyOutput)
    communicator_class = DeepEPCommunicator
    comm: DeepEPCommunicator  # the base class checks it is a communicator_class
    token_layout = "scattered"

    @classmethod
    def kernel_requirements(cls, settings: Any) -> KernelRequirements:
        return deepep_requirements(str(_setting(settings, "mode", "auto")),
                                   bool(_setting(settings, "fp8_dispatch", False)))

    def __init__(self, setup: DispatcherSetup) -> None:
        super().__init__(setup)
        comm = self.comm
        mine = (setup.num_experts, setup.hidden_size, setup.dtype)
        sized = (comm.setup.num_experts, comm.setup.hidden_size, comm.setup.dtype)
        if mine != sized:
            raise DispatcherError(
                f"DeepEPDispatcher: layer (num_experts, hidden, dtype) {mine} differs from the "
                f"{sized} the process's DeepEP buffer was sized for; fix: one DeepEP buffer "
                f"serves layers of one shape (build a stack per shape)")
        self.groups = setup.groups
        self.mode = comm.mode
        if self.mode == LOW_LATENCY:
            self.output_class = DeepEPLowLatencyOutput  # type: ignore[misc]
        self.mode_counts: Dict[str, int] = {NORMAL: 0, LOW_LATENCY: 0}

    @property
    def fp8(self) -> bool:
        """Activations travel as e4m3 (``fp8_dispatch``)."""
        return self.comm.fp8_dispatch

    # ---- per step ------------------------------------------------------------------------

    def step_mode(self, batch: BatchInfo) -> str:
        """The kernels of this step: the configured mode, or for ``auto`` normal when any DP
        rank prefills (the same answer on every rank: ``batch`` is agreed)."""
        if self.mode != "auto":
            return self.mode
        batch.require_agreed("deepep auto mode")
        return NORMAL if batch.any_prefill else LOW_LATENCY

    def _check_capacity(self, num_tokens: int, batch: BatchInfo) -> None:
        cap = self.comm.capacity
        need = num_tokens
        if batch.agreed:  # every rank decides from the same numbers: all raise, none hangs
            need = max(num_tokens, batch.max_tokens_per_rank(self.groups.attn_tp_size, True))
        if need > cap:
            raise DispatcherError(
                f"DeepEP low-latency dispatch: {need} tokens on one rank exceed {CAPACITY_FLAG} "
                f"{cap} (the fixed-size low-latency buffers hold at most that many tokens per "
                f"rank); fix: raise {CAPACITY_FLAG} to at least {need} (at most 1024), or "
                f"send fewer tokens per step (--cuda-graph-max-bs, --max-running-requests)")

    def dispatch(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                 batch: BatchInfo) -> DispatchOutput:
        """Args:
            hidden_states: ``[T, H]`` bfloat16, this rank's own tokens; ``T`` may be 0.
            topk: ``ids [T, K]`` global physical ids (``-1`` = none), ``weights [T, K]``.
            batch: the step's agreed facts (``auto`` and the capacity decide from them).
        Returns:
            ``DeepEPNormalOutput`` (normal steps) or ``DeepEPLowLatencyOutput``.
        """
        check_dispatch_inputs(hidden_states, topk, self.setup.hidden_size)
        if hidden_states.dtype != torch.bfloat16:
            raise DispatcherError(
                f"DeepEP moves bfloat16 activations; got {hidden_states.dtype}; fix: run the "
                f"model in bfloat16 (moe-a2a run --dtype bfloat16)")
        mode = self.step_mode(batch)
        if mode == NORMAL and batch.capturing:
            raise DispatcherError("DeepEP normal mode reads receive counts on the host and cannot "
                                  "run inside a CUDA graph; fix: --deepep-mode low_latency or auto")
        if mode == LOW_LATENCY:
            self._check_capacity(int(hidden_states.shape[0]), batch)
        buffer = self.comm.enter(mode)
        self.mode_counts[mode] += 1
        ids = topk.ids.to(device=hidden_states.device, dtype=torch.int64).contiguous()
        weights = topk.weights.to(device=hidden_states.device, dtype=torch.float32).contiguous()
        x = hidden_states.contiguous()
        if mode == NORMAL:
            return self._dispatch_normal(buffer, x, ids, weights)
        return self._dispatch_low_latency(buffer, x, ids, weights)

    def _dispatch_normal(self, buffer: Any, x: torch.Tensor, ids: torch.Tensor,
                         weights: torch.Tensor) -> DeepEPNormalOutput:
        num_experts = self.setup.num_experts
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
         _event) = buffer.get_dispatch_layout(ids, num_experts)
        payload: Any = quantize_per_token(x) if self.comm.fp8_dispatch else x
        recv_x, recv_ids, recv_weights, counts, handle, _event = buffer.dispatch(
            payload, topk_idx=ids, topk_weights=weights,
            num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
            expert_alignment=1, config=self.comm.dispatch_config)
        scales = None
        if isinstance(recv_x, tuple):
            recv_x, scales = recv_x
        return DeepEPNormalOutput(
            hidden_states=recv_x, scales=scales, topk_ids=recv_ids, topk_weights=recv_weights,
            num_recv_tokens_per_expert=counts,
            handle=DeepEPNormalHandle(buffer_handle=handle, num_tokens=int(x.shape[0]),
                                      input_dtype=x.dtype))

    def _dispatch_low_latency(self, buffer: Any, x: torch.Tensor, ids: torch.Tensor,
                              weights: torch.Tensor) -> DeepEPLowLatencyOutput:
        num_experts, cap = self.setup.num_experts, self.comm.capacity
        fp8 = self.comm.fp8_dispatch
        recv, recv_count, handle, _event, _hook = buffer.low_latency_dispatch(
            x, ids, cap, num_experts, use_fp8=fp8, async_finish=False, return_recv_hook=False)
        scales = None
        if fp8:
            recv, scales = recv
        # SGLang's hint for masked grouped GEMMs: the mean rows per expert, rounded up
        expected_m = (int(x.shape[0]) * self.groups.ep_size * int(ids.shape[1]) + num_experts) \
            // num_experts
        return DeepEPLowLatencyOutput(
            hidden_states=recv, scales=scales, masked_m=recv_count, expected_m=expected_m,
            handle=DeepEPLowLatencyHandle(buffer_handle=handle, topk_ids=ids, topk_weights=weights,
                                          num_tokens=int(x.shape[0]), input_dtype=x.dtype))

    def combine(self, combine_input: CombineInput, *, batch: BatchInfo) -> torch.Tensor:
        """Normal: sum each token's rows back (the experts applied the weights). Low-latency:
        ``low_latency_combine`` reduces with the dispatched ``topk_weights``.

        Returns ``[T, H]`` in the dispatched dtype.
        """
        handle = getattr(combine_input.dispatch_output, "handle", None)
        if isinstance(handle, DeepEPLowLatencyHandle):
            h = combine_handle(combine_input, DeepEPLowLatencyHandle, "DeepEPDispatcher")
            buffer = self.comm.open_buffer()
            y = combine_input.expert_output.to(torch.bfloat16).contiguous()
            combined, _event, _hook = buffer.low_latency_combine(
                y, h.topk_ids, h.topk_weights, h.buffer_handle, async_finish=False,
                return_recv_hook=False)
            return combined.to(h.input_dtype)
        h = combine_handle(combine_input, DeepEPNormalHandle, "DeepEPDispatcher")
        buffer = self.comm.open_buffer()
        y = combine_input.expert_output.to(torch.bfloat16).contiguous()
        combined, _weights, _event = buffer.combine(y, h.buffer_handle,
                                                    config=self.comm.combine_config)
        return combined.to(h.input_dtype)
