"""``moe-a2a run``: start local ranks, move real tokens, check every output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from moe_a2a.cli import kernel_options
from moe_a2a.errors import MoeA2AError

if TYPE_CHECKING:  # the CLI imports the server-args model lazily
    from moe_a2a.run_plan import ModelShape, RunPlan
    from moe_a2a.server_args import LaunchEnv, ServerArgs

# What ``moe-a2a run`` does with no flags: a demo on several CPU ranks over the torch-native
# all-to-all. These count as defaults (an env var or legacy variable still overrides them).
RUN_DEFAULTS = {"moe_a2a_backend": "alltoall", "tp_size": 4}

EXIT_MISMATCH = 1
EXIT_RANK_FAILED = 3

# Shape flags an --hf-config replaces: given with it, they would be silently ignored.
SHAPE_FLAGS = ("num_experts", "top_k", "hidden_size", "intermediate_size",
               "shared_intermediate_size", "n_group", "topk_group")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from moe_a2a.plugins import add_plugin_argument
    from moe_a2a.run_plan import DEFAULT_COLLECTIVE_TIMEOUT_S, ModelShape, RunPlan
    from moe_a2a.server_args import add_arguments

    shape, plan = ModelShape(), RunPlan(args_json="", shape=ModelShape())
    p = subparsers.add_parser(
        "run", help="run an EP MoE layer stack on local ranks and check it against a reference",
        description=(
            "Start --tp-size ranks (gloo on CPU, nccl with --device cuda; or join a torchrun job), "
            "build a DeepSeek-style MoE layer stack (grouped top-k with correction bias, one shared "
            "expert), run forward steps with uneven per-rank batches including empty ranks, and "
            "check every layer's output against a single-process reference. Exit 0 when all checks "
            "pass, 1 on a mismatch (a non-finite output counts as one), 2 on bad input, 3 when a "
            "rank failed (crashed, killed or timed out), 130 when interrupted. With no flags: the "
            "alltoall backend on 4 CPU ranks."),
        allow_abbrev=False)
    model = p.add_argument_group("model shape (not with --hf-config, which sets the shape)")
    model.add_argument("--num-experts", type=int, default=None,
                       help=f"routed experts (default: {shape.num_experts})")
    model.add_argument("--top-k", type=int, default=None,
                       help=f"experts per token (default: {shape.top_k})")
    model.add_argument("--hidden-size", type=int, default=None,
                       help=f"hidden size of the tokens (default: {shape.hidden_size}, or the "
                            f"smallest size the backend's kernels accept)")
    model.add_argument("--intermediate-size", type=int, default=None,
                       help=f"per-expert intermediate size, split over moe-TP ranks (default: "
                            f"{shape.intermediate_size}, or what the backend's kernels accept)")
    model.add_argument("--shared-intermediate-size", type=int, default=None,
                       help="shared expert intermediate size; 0 = no shared expert "
                            "(default: --intermediate-size, i.e. one shared expert)")
    model.add_argument("--num-layers", type=int, default=shape.num_layers,
                       help=f"MoE layers in the stack (default: {shape.num_layers})")
    model.add_argument("--n-group", type=int, default=None,
                       help="expert groups for grouped top-k (default: adapts to --num-experts)")
    model.add_argument("--topk-group", type=int, default=None,
                       help="groups kept per token (default: adapts to --num-experts/--top-k)")
    model.add_argument("--hf-config", metavar="FILE", default=None,
                       help="a transformers config JSON (deepseek_v3, qwen3_moe, mixtral): run that "
                            "model's MoE block and check against transformers' own forward "
                            "(default: the DeepSeek-style shape above)")
    job = p.add_argument_group("job")
    job.add_argument("--num-tokens", type=int, default=plan.num_tokens,
                     help=f"largest batch one DP rank gets in a step, >= 1 (default: "
                          f"{plan.num_tokens})")
    job.add_argument("--steps", type=int, default=plan.steps,
                     help=f"forward steps; the first warms up and is not timed when there are "
                          f"more (default: {plan.steps})")
    job.add_argument("--seed", type=int, default=plan.seed,
                     help=f"seed of weights, inputs and batch sizes, 0..2**64-1 (default: "
                          f"{plan.seed})")
    job.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="dtype of the layers; the reference runs in float32 (default: float32, "
                          "or the dtype the backend's kernels take: bfloat16 for deepep and "
                          "megamoe)")
    job.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="cpu (gloo) or cuda (nccl, one GPU per rank) (default: cpu)")
    job.add_argument("--collective-timeout", type=float, default=DEFAULT_COLLECTIVE_TIMEOUT_S,
                     metavar="SECONDS",
                     help=f"how long a rank may wait for its peers in a collective before the "
                          f"job fails with exit 3 naming the stuck rank (default: "
                          f"{DEFAULT_COLLECTIVE_TIMEOUT_S:.0f})")
    job.add_argument("--routing-skew", type=float, default=plan.routing_skew, metavar="S",
                     help="add S to the router's correction bias of a few seeded experts (E/8): "
                          "skewed expert load for EPLB to rebalance (built-in shape only)")
    kernel_options.add_arguments(job)
    job.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    job.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    job.add_argument("--debug", action="store_true",
                     help="when a rank fails, also print its traceback (and a stuck rank's stack)")
    job.add_argument("--routed-experts-output", metavar="PATH", default=None,
                     help="with --enable-return-routed-experts: write every simulated request's "
                          "routed experts (wire-format blobs, base64) with an index to this JSON "
                          "file")
    add_plugin_argument(job)
    server = p.add_argument_group(
        "server arguments", "as for `moe-a2a config`; run's own defaults: "
        + ", ".join(f"{k}={v}" for k, v in RUN_DEFAULTS.items()))
    add_arguments(server, strict_parser=p, defaults=RUN_DEFAULTS)
    p.set_defaults(handler=main)
    return p


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise MoeA2AError(f"{name} {value} is invalid: it must be >= {minimum}")


def resolve_groups(shape: "ModelShape") -> "ModelShape":
    """Fill in ``n_group``/``topk_group`` left to adapt to the expert count."""
    n_group, topk_group = routing_groups(shape)
    return dataclasses.replace(shape, n_group=n_group, topk_group=topk_group)


def routing_groups(shape: "ModelShape") -> Tuple[int, int]:
    """``(n_group, topk_group)``: the given ones, or what adapts to the expert count."""
    from moe_a2a.routing import default_groups

    if shape.n_group is not None and shape.topk_group is not None:
        return shape.n_group, shape.topk_group
    if shape.n_group is None:
        n_group, topk_group = default_groups(shape.num_experts, shape.top_k)
        if shape.topk_group is not None:
            topk_group = shape.topk_group
    else:
        # keep half of the given groups, or as many as top-k needs
        n_group = shape.n_group
        per_group = max(1, shape.num_experts // max(1, n_group))
        topk_group = min(n_group, max(n_group // 2, -(-shape.top_k // per_group), 1))
    return n_group, topk_group


def checked_shape(shape: "ModelShape", args: "ServerArgs") -> "ModelShape":
    """The shape with its routing groups filled in; rejects a layer stack that cannot be built
    on these ranks, before any rank starts."""
    from moe_a2a.routing import RouterConfig

    for flag, value, minimum in (("--num-experts", shape.num_experts, 1), ("--top-k", shape.top_k, 1),
                                 ("--hidden-size", shape.hidden_size, 1),
                                 ("--intermediate-size", shape.intermediate_size, 1),
                                 ("--shared-intermediate-size", shape.shared_intermediate_size, 0),
                                 ("--num-layers", shape.num_layers, 1)):
        _check_positive(flag, value, minimum)
    ep, moe_tp = args.ep_size, args.moe_tp_size
    why_ep = (f" ({args.moe_a2a_backend} derives ep_size from --tp-size)"
              if args.backend_spec.ep_policy == "tp" else "")
    placement = eplb_shape_error(shape.num_experts, shape.intermediate_size,
                                 shape.shared_intermediate_size, args)
    if placement:
        raise MoeA2AError(placement)
    if shape.num_experts % ep and not args.ep_num_redundant_experts:
        multiple = ep * max(1, round(shape.num_experts / ep))
        raise MoeA2AError(
            f"--num-experts {shape.num_experts} cannot be split over ep_size {ep}{why_ep}: "
            f"use a multiple of {ep} such as {multiple}, or change --tp-size/--ep-size")
    if shape.intermediate_size % moe_tp:
        raise MoeA2AError(
            f"--intermediate-size {shape.intermediate_size} cannot be split over moe_tp_size "
            f"{moe_tp} (tp_size {args.tp_size} / ep_size {ep}): use a multiple of {moe_tp}")
    if shape.top_k > shape.num_experts:
        raise MoeA2AError(f"--top-k {shape.top_k} exceeds --num-experts {shape.num_experts}: "
                          f"choose top-k <= num-experts")
    n_group, topk_group = routing_groups(shape)
    RouterConfig(num_experts=shape.num_experts, top_k=shape.top_k, scoring="sigmoid",
                 n_group=n_group, topk_group=topk_group, renormalize=True,
                 routed_scaling_factor=shape.routed_scaling_factor, has_correction_bias=True)
    return dataclasses.replace(shape, n_group=n_group, topk_group=topk_group)


def _check_hf_shape(path: str, args: "ServerArgs") -> None:
    from moe_a2a.hf import moe_sizes

    num_experts, inter = moe_sizes(path)
    placement = eplb_shape_error(num_experts, inter, None, args)
    if placement:
        raise MoeA2AError(f"{path}: {placement}")
    if num_experts % args.ep_size and not args.ep_num_redundant_experts:
        raise MoeA2AError(
            f"{path}: {num_experts} experts cannot be split over ep_size {args.ep_size}: "
            f"change --tp-size/--ep-size to a divisor of {num_experts}")
    if inter % args.moe_tp_size:
        raise MoeA2AError(f"{path}: intermediate size {inter} cannot be split over moe_tp_size "
                          f"{args.moe_tp_size} (tp_size {args.tp_size} / ep_size {args.ep_size}): "
                          f"raise --ep-size")


def eplb_shape_error(num_experts: int, intermediate: int, shared_intermediate: Optional[int],
                     args: "ServerArgs") -> Optional[str]:
    """Where the expert count is known: the physical experts (``E + redundant``) must split
    over ep, and a fused shared expert must cut into routed-size slots."""
    from moe_a2a.eplb.location import physical_count_error

    message = None
    if args.ep_num_redundant_experts:
        message = physical_count_error(num_experts, args.ep_num_redundant_experts, args.ep_size,
                                       experts_flag="--num-experts",
                                       redundant_flag="--ep-num-redundant-experts")
    fused = args.enforce_shared_experts_fusion or args.enable_deepep_waterfill
    if message is None and fused and shared_intermediate is not None:
        if shared_intermediate == 0:
            message = ("--enforce-shared-experts-fusion computes the shared expert as top-k "
                       "columns, but --shared-intermediate-size 0 means there is none; fix: "
                       "drop one of them")
        elif shared_intermediate % intermediate:
            message = (f"--enforce-shared-experts-fusion cuts the shared expert "
                       f"(--shared-intermediate-size {shared_intermediate}) into slots of "
                       f"--intermediate-size {intermediate}: use a multiple of {intermediate}")
    return message


# Settings that resolve (so `moe-a2a config` explains them) but whose machinery `run` does not
# build yet: refusing beats silently running without them.
NOT_YET_RUN: Tuple[Tuple[str, str], ...] = (
)


def _check_supported(args: "ServerArgs") -> None:
    for field, what in NOT_YET_RUN:
        if getattr(args, field):
            flag = "--" + field.replace("_", "-")
            raise MoeA2AError(f"{flag}: {what} is not built by `moe-a2a run` in this release; "
                              f"drop {flag} (`moe-a2a config` still resolves and explains it)")


def _checked_skew(skew: float) -> float:
    import math

    if not math.isfinite(skew) or skew < 0:
        raise MoeA2AError(f"--routing-skew {skew} is invalid: it must be a finite number >= 0")
    return skew


def _check_routed_experts_output(path: "str | None", args: "ServerArgs") -> None:
    import os

    if path is None:
        return
    if not args.enable_return_routed_experts:
        raise MoeA2AError("--routed-experts-output needs --enable-return-routed-experts (nothing "
                          "is captured without it); fix: add the flag or drop the output")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MoeA2AError(f"--routed-experts-output {path}: folder {folder} does not exist; "
                          f"fix: create it or choose another path")


def _check_capacity(args: "ServerArgs", num_tokens: int) -> None:
    """``--num-tokens`` must fit every per-rank capacity of the backend (no silent fallback)."""
    from moe_a2a.server_args.validate import batch_capacity_error

    spec = args.backend_spec
    if spec.capacities and all(r.over_capacity == "fallback" for r in spec.capacities):
        return  # run's batches are eager: above the cap a step takes the fallback path
    attn_tp = args.attn_tp_size if spec.token_layout == "scattered" else 1
    per_rank = args.kernel_tokens(num_tokens)  # the fullest rank after the attention-TP split
    shown = f"--num-tokens {num_tokens}" + (f" over {attn_tp} attention-TP ranks" if attn_tp > 1 else "")
    message = batch_capacity_error(args, per_rank, shown, "--num-tokens")
    if message:
        raise MoeA2AError(message)


def _check_device(device: str, args: "ServerArgs") -> None:
    import torch

    from moe_a2a.backends import ensure_available

    if device == "cuda":
        if not torch.cuda.is_available():
            raise MoeA2AError("--device cuda: torch.cuda.is_available() is False on this machine; "
                              "use --device cpu")
        if torch.cuda.device_count() < args.tp_size:
            raise MoeA2AError(f"--device cuda with --tp-size {args.tp_size} needs {args.tp_size} "
                              f"GPUs, {torch.cuda.device_count()} visible: lower --tp-size")
    ensure_available(args.backend_spec, device)


def _describe(summary: Dict[str, Any]) -> str:
    from moe_a2a.run_check import describe_nonfinite

    verdict = "PASSED" if summary["passed"] else "FAILED"
    eplb = summary.get("eplb")
    tail = ""
    if eplb and eplb.get("utilization_before") is not None:
        after = eplb.get("utilization_after")
        tail = (f"\n  EPLB: {eplb['num_physical_experts']} physical experts, "
                f"{len(eplb.get('rebalances', []))} rebalances; GPU utilisation (mean/max load) "
                f"{eplb['utilization_before']:.3f} before"
                + (f", {after:.3f} after" if after is not None else ""))
    text = (
        f"{verdict}: backend {summary['backend']} on {summary['tp_size']} {summary['device']} ranks "
        f"({summary['dist_backend']}): attn_tp {summary['attn_tp_size']} x dp "
        f"{summary['dp_size'] if summary['enable_dp_attention'] else 1}, ep {summary['ep_size']}, "
        f"moe_tp {summary['moe_tp_size']}; {summary['steps']} steps x {summary['num_layers']} layers, "
        f"{summary['tokens']} tokens, {summary['dtype']}\n"
        f"  max abs err {summary['max_abs_err']:.3g} (tolerance {summary['tolerance']:.3g}, "
        f"reference: {summary['reference']}); {summary['tokens_per_s']:.1f} tokens/s through the "
        f"layer stack{tail}" + _describe_capture(summary) + _describe_kernels(summary))
    if summary.get("nonfinite"):
        text += "\n  " + describe_nonfinite(summary["nonfinite"], summary["dtype"])
    return text


def _describe_capture(summary: Dict[str, Any]) -> str:
    if summary.get("routed_experts_gather") is None:
        return ""
    text = (f"\n  routed experts ({summary['routed_experts_gather']} gather): "
            f"{summary['routed_experts_checked']} rows of {summary['routed_experts_requests']} "
            f"requests checked against the reference router, {summary['routed_experts_ties']} "
            f"ties, {summary['routed_experts_rejected']} invalid start_len rejected, "
            f"{summary['routed_experts_failures']} failures")
    if summary.get("routed_experts_first_problem"):
        text += f"\n  first problem: {summary['routed_experts_first_problem']}"
    if summary.get("routed_experts_output"):
        text += f"\n  written to {summary['routed_experts_output']}"
    return text


def _describe_kernels(summary: Dict[str, Any]) -> str:
    kernels = summary.get("kernels") or {}
    if not kernels:
        return ""
    parts = [f"{name} {'EMULATED (moe_a2a.testing: no kernel ran)' if how == 'emulated' else how}"
             for name, how in kernels.items()]
    return "\n  kernels: " + ", ".join(parts)


def _model_shape(ns: argparse.Namespace) -> "ModelShape":
    """The shape from the flags; with --hf-config the config sets it, and a shape flag given
    too is refused (it would be silently ignored)."""
    from moe_a2a.run_plan import ModelShape

    if ns.hf_config:
        given = [f"--{name.replace('_', '-')}" for name in SHAPE_FLAGS
                 if getattr(ns, name) is not None]
        if given:
            raise MoeA2AError(f"--hf-config {ns.hf_config} sets the model shape, so "
                              f"{', '.join(given)} would be ignored; fix: drop "
                              f"{'it' if len(given) == 1 else 'them'}, or edit the config")
        return ModelShape(num_layers=ns.num_layers, hf_config=ns.hf_config)
    base = ModelShape()
    sizes = {name: getattr(ns, name) for name in SHAPE_FLAGS if getattr(ns, name) is not None}
    if "shared_intermediate_size" not in sizes:  # one shared expert of the routed size
        sizes["shared_intermediate_size"] = sizes.get("intermediate_size", base.intermediate_size)
    return dataclasses.replace(base, num_layers=ns.num_layers, **sizes)


def _preflight(ns: argparse.Namespace, shape: "ModelShape", args: "ServerArgs", dtype: str,
               local_ranks: int) -> None:
    """Whether the job fits this machine's memory (no rank is started for one that cannot)."""
    from moe_a2a import preflight

    if shape.hf_config:
        from moe_a2a.hf import moe_shape

        sizes = moe_shape(shape.hf_config)
    else:
        sizes = {k: getattr(shape, k) for k in ("num_experts", "top_k", "hidden_size",
                                                "intermediate_size", "shared_intermediate_size")}
    preflight.check_memory(preflight.ModelSize(num_layers=shape.num_layers, **sizes),
                           ns.num_tokens, dtype, args.ep_size,
                           args.attn_dp_size if args.enable_dp_attention else 1,
                           local_ranks, ns.device)


def main(ns: argparse.Namespace) -> int:
    from moe_a2a import preflight
    from moe_a2a.launcher import RankError
    from moe_a2a.run_plan import RunPlan
    from moe_a2a.server_args import read_launch_env, resolve_namespace

    _check_positive("--num-tokens", ns.num_tokens, 1)
    _check_positive("--steps", ns.steps, 1)
    _check_positive("--num-layers", ns.num_layers, 1)
    preflight.check_seed(ns.seed)
    preflight.check_collective_timeout(ns.collective_timeout)
    launch = read_launch_env()  # torchrun's variables: malformed ones are bad input (exit 2)
    with warnings.catch_warnings():  # printed once below, from args.warnings
        warnings.simplefilter("ignore")
        # EPLB rebalances halfway through the run unless told otherwise
        defaults = {**RUN_DEFAULTS, "eplb_rebalance_num_iterations": max(1, (ns.steps + 1) // 2)}
        args = resolve_namespace(ns, defaults=defaults)
    for warning in args.warnings:
        print(f"moe-a2a: warning: {warning}", file=sys.stderr)
    if launch is None:  # the local ranks this machine can run, before anything is sized by them
        preflight.check_local_ranks(args.tp_size, ns.device)
    shape = _model_shape(ns)
    shape, dtype, run_decisions = kernel_options.fit_shape(ns, args, shape)
    if shape.hf_config:
        _check_hf_shape(shape.hf_config, args)
        if ns.routing_skew:
            raise MoeA2AError("--routing-skew biases the built-in DeepSeek-style router; fix: "
                              "drop --routing-skew or --hf-config")
    else:
        shape = checked_shape(shape, args)
    _check_supported(args)
    _check_routed_experts_output(ns.routed_experts_output, args)
    _check_capacity(args, ns.num_tokens)
    emulation = kernel_options.emulation_plan(ns.emulate_kernels, args, ns.device)
    _preflight(ns, shape, args, dtype, args.tp_size if launch is None else 1)
    with kernel_options.emulated(emulation):
        _check_device(ns.device, args)
    plan = RunPlan(args_json=args.to_json(), shape=shape, num_tokens=ns.num_tokens,
                   steps=ns.steps, seed=ns.seed, dtype=dtype, device=ns.device,
                   progress=not ns.quiet, routing_skew=_checked_skew(ns.routing_skew),
                   routed_experts_output=ns.routed_experts_output,
                   emulate_kernels=emulation.packages,
                   emulated_capability=emulation.compute_capability,
                   collective_timeout_s=ns.collective_timeout,
                   plugins=tuple(getattr(ns, "plugins", ())))
    if launch is None and not ns.quiet and emulation.active:
        print(f"[moe-a2a run] {', '.join(emulation.packages)}: moe_a2a.testing emulation "
              f"(same API, real token movement, no kernels)", file=sys.stderr, flush=True)
    try:
        summary = _run(plan, args, launch, ns)
    except RankError as exc:  # one line; the ranks' tracebacks with --debug
        hint = " (--debug prints the ranks' tracebacks)" if exc.tracebacks() and not ns.debug else ""
        print(f"moe-a2a: error: {exc}{hint}", file=sys.stderr)
        if ns.debug and exc.tracebacks():
            print(exc.tracebacks(), file=sys.stderr)
        return EXIT_RANK_FAILED
    if launch is not None and launch.rank != 0:  # rank 0 reports for the torchrun job
        return 0 if summary["passed"] else EXIT_MISMATCH
    summary["decisions"] = [d.to_dict() if hasattr(d, "to_dict") else d for d in
                            args.explain().get("decisions", [])] + run_decisions
    summary["kernels"] = kernel_options.kernels_summary(emulation)
    summary["emulated"] = emulation.active
    summary["warnings"] = list(args.warnings)
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_describe(summary))
    return 0 if summary["passed"] else EXIT_MISMATCH


def _run(plan: "RunPlan", args: "ServerArgs", launch: Optional["LaunchEnv"],
         ns: argparse.Namespace) -> Dict[str, Any]:
    """Spawn the local ranks, or be one rank of a torchrun job; the job's summary."""
    from moe_a2a.launcher import run_in_process
    from moe_a2a.run import run_rank, spawn_job

    if launch is None:
        if not ns.quiet:
            print(f"[moe-a2a run] backend {args.moe_a2a_backend}: starting {args.tp_size} local "
                  f"{ns.device} ranks, {ns.steps} steps x {plan.shape.num_layers} layers, up to "
                  f"{ns.num_tokens} tokens per DP rank", file=sys.stderr, flush=True)
        return spawn_job(plan, args.tp_size, debug=ns.debug)
    launch.check_world(args.tp_size)
    # env://, not launch.init_method: under torchrun the agent already serves the store
    # at MASTER_PORT, and env:// joins it
    return run_in_process(run_rank, launch.rank,
                          (plan, "env://", launch.world_size, launch.local_rank),
                          rendezvous=f"{launch.master_addr}:{launch.master_port}")
