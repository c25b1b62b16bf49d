"""SGLang launch lines: the flags and variables moe-a2a accepts but does not use.

An SGLang launch line works unchanged: every SGLang server flag (``sglang_flags``) is accepted
and, unless moe-a2a owns it, reported in one warning as not used here; SGLang's MoE variables
that moe-a2a does not read are reported as ignored when set. Flags moe-a2a owns keep strict
parsing, and a near-miss of one gets a did-you-mean error.
"""

from __future__ import annotations

import argparse
import difflib
from types import MappingProxyType
from typing import Any, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from moe_a2a.server_args.errors import ConfigError, clip
from moe_a2a.server_args.sglang_flags import BOTH, SGLANG_FLAGS, V14, V23
from moe_a2a.server_args.sources import old_spelling, present

# The namespace attribute the accepted-but-unused SGLang flags are collected in.
UNUSED_DEST = "sglang_unused_flags"


class UnusedVar(NamedTuple):
    """An SGLang MoE variable that moe-a2a does not read."""

    name: str
    meaning: str
    releases: Tuple[str, ...]


UNUSED_SGLANG_VARS: Tuple[UnusedVar, ...] = (
    UnusedVar("SGLANG_DEEPEP_BF16_DISPATCH", "DeepEP dispatch in BF16 (moe-a2a dispatches the "
              "activation dtype)", BOTH),
    UnusedVar("SGLANG_DEEPEP_LL_COMBINE_SEND_NUM_SMS", "SMs of DeepEP's low-latency combine", BOTH),
    UnusedVar("SGLANG_MOE_NVFP4_DISPATCH", "NVFP4 dispatch payloads", BOTH),
    UnusedVar("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "FP4 activations in Mega-MoE", V14),
    UnusedVar("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND", "MXF4 MMA kind in Mega-MoE", V14),
    UnusedVar("SGLANG_OPT_DEEPGEMM_MEGA_MOE_RESERVED_SMS", "SMs Mega-MoE leaves free", V23),
    UnusedVar("SGLANG_OPT_DEEPGEMM_MEGA_MOE_FUSE_SHARED_EXPERTS", "shared experts inside the "
              "Mega-MoE kernel", V23),
    UnusedVar("SGLANG_SIMULATE_UNIFORM_EXPERTS", "EPLB simulation: uniform routing", BOTH),
    UnusedVar("SGLANG_SIMULATE_ROUND_ROBIN_EXPERTS", "EPLB simulation: round-robin routing", BOTH),
    UnusedVar("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", "where the recorder dumps (moe-a2a "
              "returns the dump to the caller)", BOTH),
    UnusedVar("SGLANG_EPLB_HEATMAP_COLLECTION_INTERVAL", "EPLB heat-map collection", BOTH),
    UnusedVar("SGLANG_ENABLE_EPLB_BALANCEDNESS_METRIC", "EPLB balancedness metric", V14),
    UnusedVar("SGLANG_EXPERT_LOCATION_UPDATER_CANARY", "expert-location update checks", BOTH),
    UnusedVar("SGLANG_EXPERT_LOCATION_UPDATER_LOG_INPUT", "expert-location update logs", BOTH),
    UnusedVar("SGLANG_EXPERT_LOCATION_UPDATER_LOG_METRICS", "expert-location update metrics", BOTH),
    UnusedVar("SGLANG_LOG_EXPERT_LOCATION_METADATA", "expert-location logs", BOTH),
    UnusedVar("SGLANG_SHARED_EXPERT_TP1", "shared experts without tensor parallelism", BOTH),
    UnusedVar("SGLANG_MOE_PADDING", "MoE weight padding", BOTH),
    UnusedVar("SGLANG_ENABLE_MOE_DEFERRED_FINALIZE", "deferred MoE finalize", BOTH),
    UnusedVar("SGLANG_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "MORI EP's capacity (backend not "
              "provided)", BOTH),
    UnusedVar("SGLANG_NIXL_EP_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "NIXL EP's capacity (backend not "
              "provided)", BOTH),
    UnusedVar("SGLANG_NIXL_EP_BF16_DISPATCH", "NIXL EP's BF16 dispatch (backend not provided)", BOTH),
    UnusedVar("SGLANG_FLASHINFER_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "FlashInfer A2A's capacity "
              "(backend not provided)", BOTH),
    UnusedVar("SGLANG_DEEPEP_V2_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "DeepEP v2's capacity (backend "
              "not provided)", V23),
    UnusedVar("SGLANG_PPLX_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "pplx's capacity (backend not "
              "provided)", V23),
    UnusedVar("SGLANG_FLASHINFER_MEGAMOE_MAX_TOKENS_PER_RANK", "FlashInfer Mega-MoE's capacity "
              "(backend not provided)", V23),
    UnusedVar("SGLANG_AMD_USE_FLYDSL_MEGA_MOE", "AMD FlyDSL Mega-MoE (not provided)", V23),
    UnusedVar("SGLANG_AMD_FLYDSL_MEGA_MOE_MTPR", "AMD FlyDSL Mega-MoE's capacity (not provided)",
              V23),
    UnusedVar("SGLANG_NPU_FUSED_MOE_MODE", "Ascend fused-EP mode (backend not provided)", V14),
    UnusedVar("SGLANG_CUTLASS_MOE", "CUTLASS MoE runner (use --moe-runner-backend)", V14),
)

# Notes for SGLang flags whose silence could surprise (the rest are listed by name only).
FLAG_NOTES: Mapping[str, str] = MappingProxyType({
    "--config": "its YAML file is not read: give the MoE flags on the command line",
    "--cuda-graph-bs": "give --cuda-graph-max-bs for the capacity checks",
    "--cuda-graph-bs-decode": "give --cuda-graph-max-bs for the capacity checks",
})


def unused_sglang_vars(env: Mapping[str, str]) -> Optional[str]:
    """One warning listing the SGLang MoE variables that are set but not read, or None."""
    found = []
    for var in UNUSED_SGLANG_VARS:
        for name in (var.name, old_spelling(var.name)):
            raw = present(env, name)
            if raw is not None:
                found.append(f"{name}={clip(raw, 40)} ({var.meaning})")
    if not found:
        return None
    return (f"SGLang variables that moe-a2a does not use are ignored: {'; '.join(found)}")


# ---- flags -------------------------------------------------------------------------------------

class _UnusedFlag(argparse.Action):
    """Consumes an SGLang flag moe-a2a does not use and notes its name."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        seen = list(getattr(namespace, UNUSED_DEST, None) or [])
        if option_string not in seen:
            seen.append(option_string)
        setattr(namespace, UNUSED_DEST, seen)


def add_unused_sglang_flags(container: Any) -> None:
    """Register every SGLang flag whose option strings the parser does not have yet (hidden
    from ``--help``); a flag the parser already knows (ours, or the caller's own) is skipped."""
    taken = container._option_string_actions  # argparse's registry, shared with its groups
    for flag in SGLANG_FLAGS:
        free = [option for option in flag.flags if option not in taken]
        if not free:
            continue
        container.add_argument(*free, dest=UNUSED_DEST, action=_UnusedFlag,
                               nargs=None if flag.nargs == 1 else flag.nargs,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def unused_flags(namespace: argparse.Namespace) -> List[str]:
    """The SGLang flags given on the command line that moe-a2a does not use."""
    return list(getattr(namespace, UNUSED_DEST, None) or [])


def unused_flags_warning(flags: Sequence[str]) -> Optional[str]:
    """The one warning naming SGLang flags that were accepted but are not used, or None."""
    if not flags:
        return None
    named = [f"{flag} ({FLAG_NOTES[flag]})" if flag in FLAG_NOTES else flag for flag in flags]
    return (f"SGLang flags that moe-a2a does not use are ignored: {', '.join(named)} (moe-a2a "
            f"configures the MoE communication layer only; see https://github.com/moe-a2a/moe-a2a/"
            f"blob/main/docs/configuration.md#coming-from-sglang)")


def near_miss(arguments: Iterable[str], own: Sequence[str]) -> Optional[str]:
    """A did-you-mean error for the first unrecognised argument close to a flag moe-a2a owns."""
    for argument in arguments:
        if not argument.startswith("--"):
            continue
        name = argument.split("=", 1)[0]
        close = difflib.get_close_matches(name, own, n=1, cutoff=0.8)
        if close:
            return (f"unrecognized argument {clip(name)}: did you mean {close[0]}? (moe-a2a parses "
                    f"its own flags strictly; SGLang flags it does not use are accepted and "
                    f"reported)")
    return None


def install_near_miss_check(parser: argparse.ArgumentParser, own: Sequence[str]) -> None:
    """Make ``parser`` raise a did-you-mean ConfigError for near-misses of ``own`` flags.

    Wraps this parser's ``parse_known_args`` (also what a parent parser calls for a
    subcommand), so the check runs however the parser is reached; other unknown arguments
    are left to argparse's own "unrecognized arguments" error.
    """
    original = parser.parse_known_args

    def parse_known_args(args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Any:
        parsed, extras = original(args, namespace)
        message = near_miss(extras, own)
        if message:
            raise ConfigError(message)
        return parsed, extras

    # mypy cannot check a plain function replacing an overloaded method
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign, assignment]


__all__ = [
    "FLAG_NOTES",
    "UNUSED_DEST",
    "UNUSED_SGLANG_VARS",
    "UnusedVar",
    "add_unused_sglang_flags",
    "install_near_miss_check",
    "near_miss",
    "unused_flags",
    "unused_flags_warning",
    "unused_sglang_vars",
]
