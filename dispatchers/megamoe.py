"""The ``megamoe`` backend: DeepGEMM's fused Mega-MoE kernel as a ``FusedMoE``.

One kernel does dispatch, the experts' two GEMMs with SwiGLU and the weighted combine over a
symmetric buffer. Two API variants, chosen from the compute capability of the device the
kernels run on (``moe_a2a.dispatchers.kernels.kernel_capability``):

=========  ==================================  ======================================  =========
variant    buffer                              weights                                 kernel
=========  ==================================  ======================================  =========
SM100      ``get_symm_buffer_for_mega_moe``    bf16 ``[E, 2I, H]`` / ``[E, H, I]``,     ``bf16_mega_moe``
           (``mma_type='bf16xbf16'``)          ``transform_weights_for_mega_moe``
SM90       ``get_symm_buffer_for_sm90_mega_    e4m3 + 128x128 block scales,            ``fp8_mega_moe``
           moe`` (SGLang's DeepGEMM fork)      ``transform_weights_for_mega_moe_sm90``
=========  ==================================  ======================================  =========

Upstream DeepGEMM ships the SM100 API only; the SM90 variant exists in SGLang's fork. The
SM100 path uses the bf16 kernel (exact weights); ``fp8_fp4_mega_moe`` (FP4 weights) is not
used. Weights are transformed once (``prepare_weights``); the symmetric buffer is cached in the
process's :class:`MegaMoECommunicator` per (group, capacity, shape, variant) and shared by
every layer of that shape. Per call the inputs are staged into the buffer as DeepGEMM's own
test does (``buffer.x[:T].copy_(x)``, plus ``x_sf`` for FP8, ``topk_idx``, ``topk_weights``),
then the fused call writes ``y``.

Capacity: ``--mega-moe-num-max-tokens-per-rank``. The layer takes the spec's fallback
(``none``) for a step whose DP-global largest per-rank batch exceeds it, on every rank alike;
calling ``forward`` above it is an error naming the flag.

``fix_memory`` (``--mega-moe-fix-memory``): the fused path reuses the fallback's storage where
the kernel's layout equals it: the SM100 L2 (down) weights are the fallback's ``w_down``
itself. L1 needs an interleaved gate/up copy (the reference experts keep gate and up apart),
and the SM90 path holds FP8 copies, so nothing else can be shared; ``shared_storage`` names
what is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from moe_a2a.dispatchers.base import DispatcherSetup
from moe_a2a.dispatchers.batch import BatchInfo, PhysicalTopK
from moe_a2a.dispatchers.checks import check_dispatch_inputs
from moe_a2a.dispatchers.communicator import Communicator
from moe_a2a.dispatchers.errors import DispatcherError
from moe_a2a.dispatchers.fp8 import quantize_blocks, quantize_per_token
from moe_a2a.dispatchers.fused import FusedMoE, LocalExpertWeightsLike
from moe_a2a.dispatchers.kernels import emulation_info, import_kernel_package, kernel_capability
from moe_a2a.dispatchers.requirements import KernelRequirements

__all__ = ["MEGA_MOE_REQUIREMENTS", "MegaMoE", "MegaMoECommunicator", "MegaMoEVariant",
           "VARIANTS", "select_variant"]

CAPACITY_FLAG = "--mega-moe-num-max-tokens-per-rank"
INSTALL_HINT = ("pip install deep_gemm (SM100: upstream DeepGEMM; SM90: SGLang's DeepGEMM fork "
                "sgl-deep-gemm, see https://github.com/moe-a2a/moe-a2a/blob/main/docs/megamoe.md), "
                "or use moe_a2a.testing.emulate_kernels() / "
                "moe-a2a run --emulate-kernels for the CPU emulation")

#: SGLang's ``check_mega_moe_shapes`` for the bf16 kernel (hidden and intermediate multiples
#: of 512) also covers the SM90 FP8 path (multiples of 128).
MEGA_MOE_REQUIREMENTS = KernelRequirements(
    kernels="DeepGEMM Mega-MoE kernels", dtypes=("bfloat16",), hidden_multiple=512,
    intermediate_multiple=512, min_ep_size=2)


@dataclass(frozen=True)
class MegaMoEVariant:
    """One Mega-MoE API variant: its functions in ``deep_gemm`` and its architecture."""

    name: str
    arch_major: int
    get_buffer: str
    transform: str
    kernel: str
    fp8: bool

    def missing(self, module: Any) -> Tuple[str, ...]:
        return tuple(f for f in (self.get_buffer, self.transform, self.kernel)
                     if not hasattr(module, f))


VARIANTS = (
    MegaMoEVariant("sm100_bf16", 10, "get_symm_buffer_for_mega_moe",
                   "transform_weights_for_mega_moe", "bf16_mega_moe", fp8=False),
    MegaMoEVariant("sm90_fp8", 9, "get_symm_buffer_for_sm90_mega_moe",
                   "transform_weights_for_mega_moe_sm90", "fp8_mega_moe", fp8=True),
)


def _variant_for(capability: Optional[Tuple[int, int]], module: Any) -> Tuple[Optional[MegaMoEVariant], str]:
    """The variant for ``capability`` and ``module``, or None with the reason."""
    if capability is None:
        return None, "Mega-MoE kernels run on CUDA devices (compute capability 9.x or 10.x)"
    for variant in VARIANTS:
        if variant.arch_major == capability[0]:
            missing = variant.missing(module)
            if not missing:
                return variant, ""
            version = getattr(module, "__version__", "(version unknown)")
            where = ("upstream DeepGEMM runs Mega-MoE on SM100 only; SGLang's DeepGEMM fork "
                     "(sgl-deep-gemm) adds the SM90 FP8 variant" if variant.arch_major == 9
                     else "install a DeepGEMM release with Mega-MoE")
            return None, (f"deep_gemm {version} lacks {', '.join(missing)} needed for the "
                          f"{variant.name} Mega-MoE on compute capability {capability[0]}."
                          f"{capability[1]}: {where}")
    return None, (f"Mega-MoE kernels exist for compute capability 9.x (SGLang's DeepGEMM fork) and "
                  f"10.x (upstream DeepGEMM); this device has {capability[0]}.{capability[1]}")


def select_variant(device: torch.device, module: Any) -> MegaMoEVariant:
    """The variant the kernels of ``module`` run on ``device``, or ``DispatcherError``."""
    variant, reason = _variant_for(kernel_capability(device, module), module)
    if variant is None:
        raise DispatcherError(f"megamoe: {reason}")
    return variant


class MegaMoECommunicator(Communicator):
    """Owns the Mega-MoE symmetric buffers, one per (group, capacity, shape, variant)."""

    def __init__(self, setup) -> None:
        super().__init__(setup)
        self._buffers: Dict[Tuple[Any, ...], Any] = {}

    def symm_buffer(self, key: Tuple[Any, ...], allocate: Callable[[], Any]) -> Any:
        """The buffer cached under ``key``; ``allocate()`` (collective) builds it once."""
        self.check_open("megamoe")
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = allocate()
            self._buffers[key] = buffer
        return buffer

    @property
    def num_buffers(self) -> int:
        return len(self._buffers)

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.destroy()
        self._buffers.clear()
        super().close()


class MegaMoE(FusedMoE):
    """DeepGEMM Mega-MoE on this rank's tokens (scattered layout).

    Attributes:
        variant: the API variant for this device (``sm100_bf16`` or ``sm90_fp8``).
        capacity: ``num_max_tokens_per_rank`` (tokens one rank passes to the kernel).
        shared_storage: weights the fused path shares with the fallback (``fix_memory``).
    """

    communicator_class = MegaMoECommunicator
    comm: MegaMoECommunicator  # the base class checks it is a communicator_class
    token_layout = "scattered"

    @classmethod
    def kernel_requirements(cls, settings: Any) -> KernelRequirements:
        return MEGA_MOE_REQUIREMENTS

    @classmethod
    def check_runnable(cls, device: str) -> Tuple[bool, str]:
        """The API variant for this device exists in the installed ``deep_gemm`` (a missing
        package or device is reported by the spec's requirements, not here)."""
        try:
            import importlib

            module = importlib.import_module("deep_gemm")
        except Exception:
            return True, ""
        if device == "cuda":
            if not torch.cuda.is_available():
                return True, ""
            capability = tuple(torch.cuda.get_device_capability())
        else:
            info = emulation_info(module)
            if info is None:
                return True, ""
            capability = tuple(info.compute_capability)
        variant, reason = _variant_for(capability, module)  # type: ignore[arg-type]
        return variant is not None, reason

    def __init__(self, setup: DispatcherSetup) -> None:
        g = setup.groups
        if g.moe_tp_size != 1 or g.ep_size != g.world_size or g.ep_group is None:
            raise DispatcherError(
                f"Mega-MoE needs one EP group of all {g.world_size} ranks (ep_size == tp_size >= 2, "
                f"moe_tp_size == 1); got ep_size={g.ep_size}, moe_tp_size={g.moe_tp_size}; fix: "
                f"--tp-size >= 2 without --ep-size (megamoe derives it)")
        MEGA_MOE_REQUIREMENTS.check("MegaMoE", dtype=setup.dtype, hidden_size=setup.hidden_size,
                                    ep_size=g.ep_size)
        super().__init__(setup)
        settings = setup.settings
        self.capacity = int(getattr(settings, "num_max_tokens_per_rank", 1024))
        self.fix_memory = bool(getattr(settings, "fix_memory", True))
        self.deep_gemm = import_kernel_package("deep_gemm", "the megamoe backend", INSTALL_HINT)
        self.variant = select_variant(setup.device, self.deep_gemm)
        self.groups = g
        self.l1: Any = None
        self.l2: Any = None
        self.symm: Any = None
        self.shared_storage: Tuple[str, ...] = ()

    @property
    def fp8(self) -> bool:
        """The fused path rounds weights and activations to e4m3 (the SM90 variant)."""
        return self.variant.fp8

    def prepare_weights(self, weights: LocalExpertWeightsLike) -> None:
        """Transform this rank's experts into the kernel's layout once and get the buffer."""
        w_gate, w_up, w_down = weights.w_gate, weights.w_up, weights.w_down
        e_local = self.placement.num_local_experts
        if w_gate.dim() != 3 or w_gate.shape[0] != e_local or w_gate.shape[2] != self.setup.hidden_size:
            raise DispatcherError(f"MegaMoE.prepare_weights: w_gate has shape {tuple(w_gate.shape)}; "
                                  f"expected [{e_local}, I, {self.setup.hidden_size}]")
        inter = int(w_gate.shape[1])
        MEGA_MOE_REQUIREMENTS.check("MegaMoE", intermediate_size=inter)
        dg = self.deep_gemm
        transform = getattr(dg, self.variant.transform)
        if self.variant.fp8:
            q1 = quantize_blocks(torch.cat([w_gate, w_up], dim=1))
            q2 = quantize_blocks(w_down)
            self.l1, self.l2 = transform(q1, q2)
        else:
            l1 = torch.cat([w_gate, w_up], dim=1).to(torch.bfloat16).contiguous()
            share = (self.fix_memory and w_down.dtype == torch.bfloat16 and w_down.is_contiguous())
            l2 = w_down if share else w_down.to(torch.bfloat16).clone(memory_format=torch.contiguous_format)
            self.l1, self.l2 = transform(l1, l2)
            if self.l2.data_ptr() == w_down.data_ptr():
                self.shared_storage = ("w_down",)
        group, variant = self.groups.ep_group, self.variant
        key = (id(group), self.capacity, self.setup.num_experts, self.setup.top_k,
               self.setup.hidden_size, inter, variant.name)
        allocate_args = (group, self.setup.num_experts, self.capacity, self.setup.top_k,
                         self.setup.hidden_size, inter)
        if variant.fp8:
            allocate = lambda: getattr(dg, variant.get_buffer)(*allocate_args)  # noqa: E731
        else:
            allocate = lambda: getattr(dg, variant.get_buffer)(  # noqa: E731
                *allocate_args, mma_type="bf16xbf16")
        self.symm = self.comm.symm_buffer(key, allocate)

    def forward(self, hidden_states: torch.Tensor, topk: PhysicalTopK, *,
                batch: BatchInfo) -> torch.Tensor:
        """Args:
            hidden_states: ``[T, H]`` bfloat16, this rank's tokens (``T`` may be 0).
            topk: ``ids [T, K]`` global physical ids (``-1`` = none), ``weights [T, K]``.
            batch: the step's agreed facts (the layer calls this only within the capacity).
        Returns:
            ``[T, H]`` the routed experts' weighted sum, in ``hidden_states``' dtype.
        """
        check_dispatch_inputs(hidden_states, topk, self.setup.hidden_size)
        if hidden_states.dtype != torch.bfloat16:
            raise DispatcherError(f"Mega-MoE takes bfloat16 activations; got {hidden_states.dtype}; "
                                  f"fix: run the model in bfloat16 (moe-a2a run --dtype bfloat16)")
        if self.symm is None:
            raise DispatcherError("MegaMoE.forward before prepare_weights: build the layer with "
                                  "EPMoE.build (it prepares the weights once)")
        self.comm.check_open("megamoe")
        num_tokens = int(hidden_states.shape[0])
        need = num_tokens
        if batch.agreed:
            need = max(need, batch.max_tokens_per_rank(self.groups.attn_tp_size, True))
        if need > self.capacity:
            raise DispatcherError(
                f"Mega-MoE: {need} tokens on one rank exceed {CAPACITY_FLAG} {self.capacity}; the "
                f"layer runs such steps on the fallback path; fix: raise {CAPACITY_FLAG} to at "
                f"least {need}, or call the fused path only for batches within it")
        buf = self.symm
        ids = topk.ids.to(device=hidden_states.device, dtype=torch.int64)
        weights = topk.weights.to(device=hidden_states.device, dtype=torch.float32)
        if self.variant.fp8:
            q, scales = quantize_per_token(hidden_states)
            buf.x[:num_tokens].copy_(q)
            buf.x_sf[:num_tokens].copy_(scales)
        else:
            buf.x[:num_tokens].copy_(hidden_states)
        buf.topk_idx[:num_tokens].copy_(ids)
        buf.topk_weights[:num_tokens].copy_(weights)
        if num_tokens == 0:  # y keeps one row (as SGLang does); its token routes nowhere
            buf.topk_idx[0].fill_(-1)
        y = torch.empty(max(num_tokens, 1), self.setup.hidden_size, dtype=torch.bfloat16,
                        device=hidden_states.device)
        getattr(self.deep_gemm, self.variant.kernel)(y, self.l1, self.l2, buf)
        return y[:num_tokens].to(hidden_states.dtype)
