"""Capability data of the four built-in backends (SPEC §2.3).

Dispatchers are referenced by dotted path: their modules import torch (and, for deepep and
megamoe, reach ``deep_ep``/``deep_gemm`` lazily), so the registry never imports them until a
dispatcher is built or availability is checked.
"""

from __future__ import annotations

from typing import Tuple

from moe_a2a.backends.names import MoeA2ABackend
from moe_a2a.backends.settings import CapacityRule, DeepEPSettings, MegaMoESettings
from moe_a2a.backends.spec import WATERFILL, BackendSpec, Requirement

NONE = BackendSpec(
    name=MoeA2ABackend.NONE.value,
    dispatcher="moe_a2a.dispatchers.standard:StandardDispatcher",
    token_layout="replicated",
    ep_policy="user",
    modes=("default",),
    cuda_graph_modes=("default",),  # only collectives of fixed shape: capturable
    devices=("cpu", "cuda"),
    builtin=True,
    description="tokens replicated in the TP group; local experts computed, partial sums all-reduced",
)

ALLTOALL = BackendSpec(
    name=MoeA2ABackend.ALLTOALL.value,
    dispatcher="moe_a2a.dispatchers.alltoall:AllToAllDispatcher",
    token_layout="scattered",
    ep_policy="tp",
    modes=("default",),
    cuda_graph_modes=(),  # reads the exchanged split sizes on the host: not capturable
    devices=("cpu", "cuda"),
    builtin=True,
    description="torch.distributed all_to_all_single with exact splits (gloo on CPU, nccl on CUDA)",
)

DEEPEP = BackendSpec(
    name=MoeA2ABackend.DEEPEP.value,
    dispatcher="moe_a2a.dispatchers.deepep:DeepEPDispatcher",
    token_layout="scattered",
    ep_policy="tp",
    modes=("normal", "low_latency", "auto"),
    # normal mode syncs the receive counts to the host; low_latency uses fixed-size buffers,
    # and auto runs decode batches (the captured ones) through low_latency.
    cuda_graph_modes=("low_latency", "auto"),
    devices=("cuda",),
    requires=(Requirement(module="deep_ep", distribution="deep_ep"),),
    min_compute_capability=(9, 0),
    install_hint=(
        "build DeepEP v1.2.1 from source with NVSHMEM on an SM90+ GPU "
        "(https://github.com/deepseek-ai/DeepEP; on CUDA 13 add CUDA's include/cccl to the "
        "include path and set TORCH_CUDA_ARCH_LIST=9.0; see "
        "https://github.com/moe-a2a/moe-a2a/blob/main/docs/deepep.md); without a GPU, "
        "moe-a2a run --emulate-kernels runs the CPU emulation"
    ),
    builtin=True,
    description="DeepEP buffers: normal (prefill), low_latency (decode), auto (per batch)",
    features=(WATERFILL,),
    settings=DeepEPSettings,
    settings_fields={
        "mode": "deepep_mode",
        "config": "deepep_config",
        "num_max_dispatch_tokens_per_rank": "deepep_num_max_dispatch_tokens_per_rank",
    },
    mode_setting="mode",
    capacities=(
        # low_latency runs every batch (prefill chunks too) through the fixed-size buffers;
        # auto runs only decode batches through them
        CapacityRule("num_max_dispatch_tokens_per_rank", batches="all", modes=("low_latency",)),
        CapacityRule("num_max_dispatch_tokens_per_rank", batches="decode", modes=("auto",)),
    ),
)

MEGAMOE = BackendSpec(
    name=MoeA2ABackend.MEGAMOE.value,
    dispatcher="moe_a2a.dispatchers.megamoe:MegaMoE",
    # as in SGLang, the fused kernel takes each rank's own slice of the batch (it moves the
    # tokens itself); over-cap steps run the fallback backend in that backend's layout
    token_layout="scattered",
    ep_policy="tp",
    fused_experts=True,
    modes=("default",),
    cuda_graph_modes=("default",),  # captured batches fit the cap and take the fused kernel
    devices=("cuda",),
    requires=(Requirement(module="deep_gemm", distribution="deep_gemm"),),
    # SM100: upstream DeepGEMM; SM90: SGLang's DeepGEMM fork (the dispatcher checks which API
    # the installed deep_gemm has for this device)
    min_compute_capability=(9, 0),
    install_hint=(
        "pip install deep_gemm: upstream DeepGEMM (https://github.com/deepseek-ai/DeepGEMM) for "
        "SM100, SGLang's fork (sgl-deep-gemm) for SM90; see "
        "https://github.com/moe-a2a/moe-a2a/blob/main/docs/megamoe.md; without a GPU, "
        "moe-a2a run --emulate-kernels runs the CPU emulation"
    ),
    builtin=True,
    description="DeepGEMM Mega-MoE: fused dispatch + expert GEMMs + combine; large batches fall back to standard",
    features=(WATERFILL,),  # SGLang 0.5.23 runs waterfill on megamoe too
    settings=MegaMoESettings,
    settings_fields={
        "num_max_tokens_per_rank": "mega_moe_num_max_tokens_per_rank",
        "fix_memory": "mega_moe_fix_memory",
    },
    # captured (CUDA-graph) batches must fit; eager batches above the cap take the fallback
    capacities=(CapacityRule("num_max_tokens_per_rank", batches="captured",
                             over_capacity="fallback"),),
    fallback=MoeA2ABackend.NONE.value,
)

BUILTIN_SPECS: Tuple[BackendSpec, ...] = (NONE, ALLTOALL, DEEPEP, MEGAMOE)
