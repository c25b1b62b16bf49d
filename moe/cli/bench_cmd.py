"""``moe-a2a bench``: time backends beside two plain-torch floors, on local ranks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from moe_a2a.cli import DefaultsHelpFormatter
from moe_a2a.errors import MoeA2AError
from moe_a2a.plugins import add_plugin_argument

if TYPE_CHECKING:
    from moe_a2a.server_args import ServerArgs

EXIT_FAILED = 1
EXIT_RANK_FAILED = 3  # as moe-a2a run (docs/reliability.md)

# bench's own defaults (an env var still overrides them, a flag always does): 4 ranks, and
# every rank owning its own tokens (DP attention over all ranks) with the experts spread over
# every rank, so that all backends move and compute the same work per rank
BENCH_TP_SIZE = 4


def _int_list(flag: str):
    def parse(text: str) -> Tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: give comma-separated integers, e.g. 128,512,4096") from None
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: every value must be >= 1")
        return values
    return parse


def _name_list(text: str) -> Tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError("--backends: name at least one backend, e.g. none,alltoall")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--backends {text!r} names a backend twice")
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    from moe_a2a.cli.shape_args import add_shape_arguments
    from moe_a2a.server_args import add_arguments

    p = subparsers.add_parser(
        "bench", help="time backends' dispatch, experts and combine beside two plain-torch floors",
        description=(
            "Start --tp-size ranks (gloo on CPU, nccl with --device cuda; or join a torchrun job), "
            "build one MoE layer per backend from the same seeded weights, route seeded tokens "
            "with the real router, and time dispatch, experts and combine (separately and "
            "together, and dispatch -> combine without experts) beside two floors written in "
            "plain torch on the same routing and payload: (a) one gather, two exact-split "
            "all_to_all_single calls and one weighted scatter-add; (b) all-gather + "
            "reduce-scatter of the hidden states. Medians of --repeats interleaved rounds after "
            "--warmup, slowest rank. Every rank owns --num-tokens tokens: by default DP attention "
            "spans all ranks (--dp-size = --tp-size) and --ep-size = --tp-size. Outputs are "
            "checked against a single-process reference first. Exit 0 on success, 1 when a "
            "backend's output is wrong, 2 on bad input."),
        formatter_class=DefaultsHelpFormatter)
    bench = p.add_argument_group("benchmark")
    bench.add_argument("--backends", type=_name_list, default="none,alltoall",
                       metavar="NAME[,NAME...]",
                       help="backends to time (any registered backend, plugins included)")
    bench.add_argument("--num-tokens", type=_int_list("--num-tokens"), default="128,512,4096",
                       metavar="N[,N...]", help="tokens per rank, one measurement each")
    bench.add_argument("--warmup", type=int, default=3, help="unrecorded rounds per size")
    bench.add_argument("--repeats", type=int, default=10, help="recorded rounds per size (median)")
    bench.add_argument("--seed", type=int, default=0, help="weights and inputs")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="activation and expert dtype")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    bench.add_argument("--no-check", dest="check", action="store_false",
                       help="skip the check of every output against the reference")
    bench.add_argument("--json", action="store_true",
                       help="print the report as one JSON object instead of the table")
    bench.add_argument("--plot", metavar="FILE", default=None,
                       help="write a log-log PNG: time against tokens per rank, one line per "
                            "backend and floor (needs matplotlib: pip install 'moe-a2a[bench]')")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_shape_arguments(p.add_argument_group("model shape"))
    server = p.add_argument_group(
        "server arguments", f"as for `moe-a2a config` (--moe-a2a-backend excepted: use "
        f"--backends); bench's own defaults: tp_size={BENCH_TP_SIZE}, dp_size=tp_size with "
        f"enable_dp_attention, ep_size=tp_size")
    add_arguments(server, strict_parser=p, defaults={"tp_size": BENCH_TP_SIZE})
    add_plugin_argument(p)
    p.set_defaults(handler=main)
    return p


def _resolve_all(ns: argparse.Namespace) -> List["ServerArgs"]:
    """One resolved ``ServerArgs`` per backend, with bench's defaults under the user's flags."""
    from moe_a2a.server_args import resolve_namespace

    if getattr(ns, "moe_a2a_backend", None) is not None:
        raise MoeA2AError(f"--moe-a2a-backend {ns.moe_a2a_backend}: bench times the backends "
                          f"named by --backends; fix: --backends {ns.moe_a2a_backend}")
    resolved = []
    with warnings.catch_warnings():  # printed once below, from args.warnings
        warnings.simplefilter("ignore")
        # the job's size first (from --tp-size, its variable or bench's default), so that the
        # defaults below can follow it
        tp_only = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k == "tp_size"})
        tp = resolve_namespace(tp_only, defaults={"tp_size": BENCH_TP_SIZE}).tp_size
        for name in ns.backends:
            per_backend = argparse.Namespace(**{**vars(ns), "moe_a2a_backend": name})
            defaults: Dict[str, Any] = {"tp_size": BENCH_TP_SIZE, "ep_size": tp}
            if getattr(ns, "enable_dp_attention", True) is not False:
                defaults.update(enable_dp_attention=True, dp_size=tp)
            resolved.append(resolve_namespace(per_backend, defaults=defaults))
    return resolved


# Settings that change what a layer moves but that bench does not build (it times the plain
# dispatch path with the identity remap): refusing beats timing something else than asked.
NOT_BENCHED = (
    ("enable_eplb", "EPLB"),
    ("ep_num_redundant_experts", "redundant experts (EPLB)"),
    ("enforce_shared_experts_fusion", "shared experts fused as top-k columns"),
    ("enable_deepep_waterfill", "DeepEP waterfill"),
    ("enable_return_routed_experts", "routed-experts capture"),
)


def _check_benched(args: "ServerArgs") -> None:
    for field, what in NOT_BENCHED:
        if getattr(args, field, None):
            flag = "--" + field.replace("_", "-")
            raise MoeA2AError(f"{flag}: {what} is not built by `moe-a2a bench` (it times the "
                              f"dispatch path with logical = physical experts); drop {flag}, "
                              f"or measure it with `moe-a2a run`")


def _check_plan(ns: argparse.Namespace, all_args: List["ServerArgs"]):
    from moe_a2a.cli.run_cmd import _check_capacity, _check_device, checked_shape
    from moe_a2a.run_plan import ModelShape

    if ns.warmup < 0:
        raise MoeA2AError(f"--warmup {ns.warmup} is invalid: it must be >= 0")
    if ns.repeats < 1:
        raise MoeA2AError(f"--repeats {ns.repeats} is invalid: it must be >= 1")
    tp_sizes = {a.tp_size for a in all_args}
    attn_tp = {a.attn_tp_size for a in all_args}
    if len(tp_sizes) != 1 or len(attn_tp) != 1:
        raise MoeA2AError("the backends resolved to different --tp-size or attention-TP sizes "
                          f"({sorted(tp_sizes)}, {sorted(attn_tp)}); fix: give --tp-size and "
                          f"--dp-size explicitly so that they apply to every backend")
    tp = tp_sizes.pop()
    if ns.num_experts % tp:
        raise MoeA2AError(f"--num-experts {ns.num_experts} cannot be split over {tp} ranks (floor "
                          f"(a) places experts over every rank): use a multiple of {tp}")
    shape = ModelShape(num_experts=ns.num_experts, top_k=ns.top_k, hidden_size=ns.hidden_size,
                       intermediate_size=ns.intermediate_size, shared_intermediate_size=0,
                       num_layers=1, n_group=ns.n_group, topk_group=ns.topk_group)
    for args in all_args:
        _check_device(ns.device, args)
        _check_benched(args)
        shape = checked_shape(shape, args)
        _check_capacity(args, max(ns.num_tokens) * args.attn_tp_size)
    return shape


def _check_plot_path(path: str) -> None:
    from moe_a2a.bench_report import check_plot_available

    check_plot_available()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MoeA2AError(f"--plot {path}: folder {folder} does not exist; fix: create it or "
                          f"give another path")


def main(ns: argparse.Namespace) -> int:
    from moe_a2a.bench import BenchPlan, bench_rank, run_bench
    from moe_a2a.bench_report import format_table, write_plot
    from moe_a2a.run import RankError
    from moe_a2a.server_args import read_launch_env

    all_args = _resolve_all(ns)
    for warning in dict.fromkeys(w for a in all_args for w in a.warnings):
        print(f"moe-a2a: warning: {warning}", file=sys.stderr)
    shape = _check_plan(ns, all_args)
    if ns.plot:
        _check_plot_path(ns.plot)
    tp = all_args[0].tp_size
    plan = BenchPlan(backends=tuple(ns.backends), args_json=tuple(a.to_json() for a in all_args),
                     shape=shape, num_tokens=tuple(ns.num_tokens), warmup=ns.warmup,
                     repeats=ns.repeats, seed=ns.seed, dtype=ns.dtype, device=ns.device,
                     check=ns.check, progress=not ns.quiet,
                     plugins=tuple(getattr(ns, "plugins", ())))
    launch = read_launch_env()
    if launch is None:
        if not ns.quiet:
            print(f"[moe-a2a bench] {', '.join(ns.backends)}: starting {tp} local {ns.device} "
                  f"ranks, {len(ns.num_tokens)} sizes x ({ns.warmup} warm-up + {ns.repeats}) "
                  f"rounds", file=sys.stderr, flush=True)
        try:
            report = run_bench(plan, tp)
        except RankError as exc:
            print(f"moe-a2a: error: {exc}", file=sys.stderr)
            return EXIT_RANK_FAILED
    else:
        launch.check_world(tp)
        report = bench_rank(launch.rank, plan, "env://", launch.world_size, launch.local_rank)
        if launch.rank != 0:
            return 0 if report["passed"] else EXIT_FAILED
    if not report["passed"]:
        bad = [c for c in report["checks"] if not c["passed"]]
        print("moe-a2a: error: wrong results, so no timings: " + "; ".join(
            f"{c['what']} max abs err {c['max_abs_err']:.3g} > tolerance {c['tolerance']:.3g}"
            for c in bad), file=sys.stderr)
        if ns.json:
            print(json.dumps(report, indent=2))
        return EXIT_FAILED
    if ns.plot:
        write_plot(report, ns.plot)
        if not ns.quiet:
            print(f"[moe-a2a bench] plot written to {ns.plot}", file=sys.stderr)
    print(json.dumps(report, indent=2) if ns.json else format_table(report))
    return 0
