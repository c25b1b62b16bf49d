"""The main job behind ``moe-a2a run``: real ranks, real token movement, checked outputs.

Each rank builds a stack of ``EPMoE`` layers from the same seeded global weights, runs
forward steps on uneven per-DP-rank batches (empty ranks included) and compares every
layer's output with a single-process oracle computed on the same input: the plain-torch
reference (``moe_a2a.reference``) or, with ``--hf-config``, transformers' own forward.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from moe_a2a.errors import MoeA2AError
from moe_a2a.launcher import RankError, launch  # noqa: F401 - RankError: re-exported
from moe_a2a.parallel import (ParallelSizes, default_backend, destroy_distributed, init_distributed,
                          make_parallel_context)
from moe_a2a.plugins import load_plugins
from moe_a2a.run_check import OutputCheck, tolerance  # noqa: F401 - tolerance: re-exported
from moe_a2a.run_plan import RunPlan, derived_seed

if TYPE_CHECKING:
    from moe_a2a.parallel import ParallelContext
    from moe_a2a.server_args import ServerArgs

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def batch_sizes(plan: RunPlan, step: int, dp_size: int) -> List[int]:
    """Tokens per DP rank in ``step``: uneven, with empty ranks, reproducible from the seed."""
    gen = torch.Generator().manual_seed(derived_seed(plan.seed, 7919, step))
    sizes = torch.randint(0, plan.num_tokens + 1, (dp_size,), generator=gen).tolist()
    phase = step % 4
    if phase == 0:
        sizes = [plan.num_tokens] * dp_size
    elif phase == 1:
        # some ranks empty; with one DP rank a single token leaves most attention-TP ranks empty
        sizes = [0 if d % 2 == 0 else s for d, s in enumerate(sizes)] if dp_size > 1 else [1]
    return sizes


def step_forward_mode(step: int, dp_rank: int):
    """The forward mode of a DP rank in ``step``: the first step prefills (the prompts), later
    steps decode, except every fourth (2, 6, ...) where DP rank 0 prefills while the others
    decode, so per-step mode choices (DeepEP ``auto``) see prefill, decode and mixed steps."""
    from moe_a2a.dispatchers import ForwardMode

    if step == 0 or (step % 4 == 2 and dp_rank == 0):
        return ForwardMode.PREFILL
    return ForwardMode.DECODE


def step_input(plan: RunPlan, step: int, dp_rank: int, num_tokens: int, hidden: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derived_seed(plan.seed, 1_000_003, step * 101 + dp_rank))
    return torch.randn(num_tokens, hidden, generator=gen)


class _Oracle:
    """Single-process reference for one layer, in fp32 on the rank's own device."""

    def __init__(self, weights, router, hf_block, device: torch.device):
        self.router = router  # these three also build the capture check's RouterOracle
        self.weights = None if weights is None else weights.to(device, torch.float32)
        self.hf_block = None if hf_block is None else hf_block.to(device)
        if self.hf_block is not None:
            from moe_a2a.hf import hf_forward

            block = self.hf_block
            self._forward: Callable[[torch.Tensor], torch.Tensor] = lambda x: hf_forward(block, x)
        elif self.weights is not None:
            from moe_a2a.reference import reference_moe

            fp32 = self.weights
            self._forward = lambda x: reference_moe(x, fp32, router)[0]
        else:
            raise MoeA2AError("the reference needs a transformers block or the layer's weights")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def _build_stack(plan: RunPlan, args: "ServerArgs", ctx: "ParallelContext", dtype: torch.dtype,
                 capture=None):
    """Build the MoE stack (with its EPLB runtime, or None) and each layer's oracle (same
    seeded weights on every rank); ``capture``: routed-experts buffer sizes, or None."""
    from moe_a2a.eplb.run_job import skew_routing
    from moe_a2a.eplb.runtime import build_eplb_stack
    from moe_a2a.routing import RouterConfig
    from moe_a2a.weights import MoEWeights

    shape = plan.shape
    all_weights, routers, oracles = [], [], []
    for layer_id in range(shape.num_layers):
        seed = derived_seed(plan.seed, 1000, layer_id)
        if shape.hf_config is not None:
            from moe_a2a.hf import build_hf_block, extract_moe, load_hf_config

            block = build_hf_block(load_hf_config(shape.hf_config), seed=seed, dtype=torch.float32)
            weights, router = extract_moe(block)
            oracles.append(_Oracle(None, None, block, ctx.device))
        else:
            router = RouterConfig(num_experts=shape.num_experts, top_k=shape.top_k,
                                  scoring="sigmoid", n_group=shape.n_group or 1,
                                  topk_group=shape.topk_group or 1,
                                  renormalize=True,
                                  routed_scaling_factor=shape.routed_scaling_factor,
                                  has_correction_bias=True)
            weights = MoEWeights.random(shape.num_experts, shape.hidden_size,
                                        shape.intermediate_size, shape.shared_intermediate_size,
                                        seed=seed, dtype=dtype, with_correction_bias=True)
            weights = skew_routing(weights, plan.routing_skew, seed)
            oracles.append(_Oracle(weights, router, None, ctx.device))
        all_weights.append(weights)
        routers.append(router)
    return build_eplb_stack(all_weights, routers, args, ctx, dtype=dtype,
                            capture=capture), oracles


def run_rank(rank: int, plan: RunPlan, init_method: str, world_size: int,
             local_rank: Optional[int] = None,
             progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """One rank of the job. Returns the job's summary (the same on every rank).

    ``progress(text)`` (from the launcher) hears how far the rank got."""
    load_plugins(plan.plugins)  # backends registered by --plugin modules, before resolving
    if not plan.emulate_kernels:
        return _run_rank(rank, plan, init_method, world_size, local_rank, progress)
    from moe_a2a.testing.kernel_emulation import emulate_kernels

    with emulate_kernels(plan.emulate_kernels, compute_capability=plan.emulated_capability):
        return _run_rank(rank, plan, init_method, world_size, local_rank, progress)


def _dispatch_modes(layers) -> Dict[str, int]:
    """Kernel modes the dispatchers ran (backends with per-step modes count them)."""
    total: Dict[str, int] = {}
    for layer in layers:
        for mode, n in getattr(layer.dispatcher, "mode_counts", {}).items():
            total[mode] = total.get(mode, 0) + n
    return total


def _run_rank(rank: int, plan: RunPlan, init_method: str, world_size: int,
              local_rank: Optional[int] = None,
              progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    from moe_a2a.server_args import ServerArgs

    report = progress or (lambda what: None)
    args = ServerArgs.from_json(plan.args_json)
    dtype = DTYPES[plan.dtype]
    device = torch.device(plan.device)
    if device.type == "cuda":
        local = rank if local_rank is None else local_rank  # one GPU per process on its node
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # ranks share the host's cores: idle OpenMP threads of one rank must not spin on the cores
    # another rank launches kernels from
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))
    init_distributed(rank, world_size, backend=default_backend(device), init_method=init_method,
                     device=device, timeout_s=plan.collective_timeout_s)
    report("joined the process group")
    stack = None
    try:
        sizes = ParallelSizes.from_server_args(args)
        ctx = make_parallel_context(sizes, rank, device, timeout_s=plan.collective_timeout_s)
        groups = ctx.groups
        capture = _capture_job(plan, args, groups)
        (stack, eplb), oracles = _build_stack(plan, args, ctx, dtype,
                                              capture=None if capture is None else capture.sizes)
        if eplb is not None and eplb.recorder is not None:
            eplb.recorder.start()  # the run reports what it recorded
        report("built the layer stack")
        layers = stack.layers
        tokens, timed_tokens, ep_seconds = 0, 0, 0.0
        hidden_size = layers[0].gate.shape[1]
        fp8 = any(getattr(layer.fused, "fp8", False) or getattr(layer.dispatcher, "fp8", False)
                  for layer in layers)
        check = OutputCheck(dtype, rank, world_size, fp8=fp8)
        for step in range(plan.steps):
            dp_sizes = batch_sizes(plan, step, groups.dp_size)
            num_tokens = dp_sizes[groups.dp_rank]
            h = step_input(plan, step, groups.dp_rank, num_tokens, hidden_size).to(device, dtype)
            if world_size > 1:
                dist.barrier()
            _sync(device)
            timed = step > 0 or plan.steps == 1  # step 0 warms up (NCCL, allocator, kernels)
            stack.begin_step(num_tokens, step_forward_mode(step, groups.dp_rank),
                             token_slots=None if capture is None
                             else capture.step_slots(step).to(device))
            for layer_id, (layer, oracle) in enumerate(zip(layers, oracles)):
                if capture is not None:
                    capture.expect(step, layer_id, oracle, h)
                start = time.perf_counter()
                out = layer(h)
                _sync(device)
                if timed:
                    ep_seconds += time.perf_counter() - start
                if num_tokens:
                    check.compare(step, layer_id, h, out, oracle(h.float()))
                report(f"step {step}, layer {layer_id}")
                h = h + out
            stack.end_step()
            if groups.attn_tp_rank == 0:
                tokens += num_tokens
                timed_tokens += num_tokens if timed else 0
            if plan.progress and rank == 0:
                print(f"[moe-a2a run] step {step + 1}/{plan.steps}: tokens per DP rank {dp_sizes}, "
                      f"max abs err so far {check.max_err:.3g}", file=sys.stderr, flush=True)
        verdict = check.summary(device)
        maxed = torch.tensor([ep_seconds], dtype=torch.float64)
        summed = torch.tensor([tokens, timed_tokens], dtype=torch.float64)
        if world_size > 1:
            if device.type == "cuda":  # nccl reduces device tensors only
                maxed, summed = maxed.to(device), summed.to(device)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
            dist.all_reduce(summed)
        (ep_seconds,) = maxed.tolist()
        total_tokens, timed_tokens = summed.tolist()
        extra = {}
        if eplb is not None:  # collective: every rank dumps the recorder
            from moe_a2a.eplb.run_job import run_summary

            extra["eplb"] = run_summary(eplb)
        from moe_a2a.run_capture import finish

        captured = finish(capture, stack.routed_experts, args=args, attn_tp_rank=groups.attn_tp_rank,
                          world_size=world_size, device=device, output=plan.routed_experts_output,
                          rank=rank)
        return {
            **verdict,
            "passed": verdict["passed"] and not captured.get("routed_experts_failures"),
            "fp8": fp8,
            "reference": "transformers" if plan.shape.hf_config else "single_process",
            "backend": args.moe_a2a_backend,
            "tp_size": args.tp_size,
            "dp_size": args.dp_size,
            "ep_size": args.ep_size,
            "enable_dp_attention": args.enable_dp_attention,
            "attn_tp_size": args.attn_tp_size,
            "moe_tp_size": args.moe_tp_size,
            "steps": plan.steps,
            "num_layers": len(layers),
            "tokens": int(total_tokens),
            # through the whole layer stack, slowest rank, warm-up step excluded
            "tokens_per_s": timed_tokens / ep_seconds if ep_seconds > 0 else 0.0,
            "dtype": plan.dtype,
            "device": plan.device,
            "dist_backend": groups.backend,
            "shape": dataclasses.asdict(plan.shape),
            "num_tokens": plan.num_tokens,
            "seed": plan.seed,
            "layer_calls": stack.path_counts(),
            "dispatch_modes": _dispatch_modes(layers),
            "communicators": len(stack.communicators),
            "runner": getattr(stack.layers[0].experts.runner, "name", type(stack.layers[0].experts.runner).__name__),
            **extra,
            **captured,
        }
    finally:
        if stack is not None:
            stack.close()
        destroy_distributed()


def _capture_job(plan: RunPlan, args: "ServerArgs", groups):
    """This DP rank's simulated requests when routed-experts capture is on (else None)."""
    if not args.enable_return_routed_experts:
        return None
    from moe_a2a.run_capture import CaptureJob

    step_tokens = [batch_sizes(plan, s, groups.dp_size)[groups.dp_rank] for s in range(plan.steps)]
    return CaptureJob(step_tokens, args=args, seed=plan.seed, dp_rank=groups.dp_rank,
                      max_step=plan.num_tokens, num_layers=plan.shape.num_layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Beyond --collective-timeout, how long the parent waits for any rank's progress before it
#: declares the job stuck (the ranks' own collective timeouts fire first and say more).
STALL_MARGIN_S = 15.0


def spawn_job(plan: Any, world_size: int, timeout_s: Optional[float] = None,
              rank_fn: Optional[Callable[..., Dict[str, Any]]] = None, *,
              debug: bool = False) -> Dict[str, Any]:
    """Run ``world_size`` local ranks (``moe_a2a.launcher``) and return rank 0's result.

    ``rank_fn(rank, plan, init_method, world_size)`` is one rank's job (a module-level
    function, picklable for spawn); ``run_rank`` by default (``moe-a2a bench`` passes its own).
    ``run_rank`` reports progress, so a stuck rank is found after ``plan.collective_timeout_s``
    (+ a margin); a ``rank_fn`` that reports none gets ``timeout_s`` (default 3600 s) of
    silence. Raises ``RankError`` naming a failed rank, ``MoeA2AError`` for bad input found on
    the ranks, ``KeyboardInterrupt``/``JobInterrupted`` when stopped; no rank outlives the call.
    """
    init_method = f"tcp://127.0.0.1:{free_port()}"
    if rank_fn is None:
        stall = plan.collective_timeout_s + STALL_MARGIN_S if timeout_s is None else timeout_s
        results = launch(run_rank, world_size, (plan, init_method, world_size),
                         stall_timeout_s=stall, debug=debug)
    else:
        silence = 3600.0 if timeout_s is None else timeout_s
        results = launch(_silent_rank, world_size, (rank_fn, plan, init_method, world_size),
                         stall_timeout_s=silence, startup_timeout_s=silence, debug=debug)
    return results[0]


def _silent_rank(rank: int, rank_fn: Callable[..., Dict[str, Any]], *args: Any,
                 progress: Callable[[str], None]) -> Dict[str, Any]:
    """A rank function that reports no progress, under the launcher."""
    progress("started")
    return rank_fn(rank, *args)
