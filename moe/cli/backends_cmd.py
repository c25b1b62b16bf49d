"""``moe-a2a backends [--json] [--device cpu|cuda]``: the registry and what can run here.

Human output is a table (name, builtin, available, layout, ep_policy, fused, modes,
cuda_graph, devices, reason; the reason last because it can be long). ``--json`` prints a
list of objects with ``name``, ``builtin``, ``available``, ``reason``, ``source`` and every
capability field of the spec (``dispatcher``, ``token_layout``, ``ep_policy``,
``fused_experts``, ``modes``, ``cuda_graph_modes``, ``devices``, ``requires``,
``min_compute_capability``, ``install_hint``, ``description``) and ``emulated`` (the backend's
packages are moe-a2a's CPU emulations: with ``--emulate-kernels``, or when called inside
``moe_a2a.testing.emulate_kernels()``; the table then says ``emulated`` instead of ``yes``). A
broken entry point is a row with ``available: false``, its error as the reason and null
capability fields.
Exit status 0 (unavailable backends are information, not an error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from moe_a2a import backends
from moe_a2a.backends.spec import DEVICES
from moe_a2a.plugins import add_plugin_argument

_CAPABILITY_FIELDS = ("dispatcher", "token_layout", "ep_policy", "fused_experts", "modes",
                      "cuda_graph_modes", "devices", "requires", "min_compute_capability",
                      "install_hint", "description")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "backends",
        help="list the registered MoE A2A backends, their capabilities and availability",
        description="List the registered MoE A2A backends (built-in and from the "
        f"'{backends.ENTRY_POINT_GROUP}' entry points) with their capabilities and whether "
        "they can run here, with the real reason when not.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="check availability for this device (default: this machine, CUDA when "
                        "a GPU is visible and the backend supports it)")
    p.add_argument("--emulate-kernels", nargs="?", const="sm100", default=None, metavar="ARCH",
                   choices=["sm90", "sm100"],
                   help="check availability with moe_a2a.testing's emulations of deep_ep and "
                        "deep_gemm installed (what `moe-a2a run --emulate-kernels` uses)")
    add_plugin_argument(p)
    p.set_defaults(handler=main)
    return p


def rows(device: Optional[str] = None) -> List[Dict[str, Any]]:
    """The JSON rows (also the data behind the table)."""
    out = []
    for row in backends.available_backends(device):
        record: Dict[str, Any] = {"name": row.name, "builtin": row.builtin,
                                  "available": row.ok, "reason": row.reason,
                                  "emulated": row.emulated}
        if row.spec is not None:
            caps = row.spec.to_dict()
            record["source"] = backends.REGISTRY.source(row.name)
            record.update({k: caps[k] for k in _CAPABILITY_FIELDS})
        else:
            record["source"] = "broken entry point"
            record.update({k: None for k in _CAPABILITY_FIELDS})
        out.append(record)
    return out


def format_table(records: Sequence[Dict[str, Any]]) -> str:
    """A plain-text table; list cells joined with ',' and missing values shown as '-'."""
    header = ("name", "builtin", "available", "layout", "ep_policy", "fused", "modes",
              "cuda_graph", "devices", "reason")
    keys = ("name", "builtin", "available", "token_layout", "ep_policy", "fused_experts",
            "modes", "cuda_graph_modes", "devices", "reason")

    def cell(value: Any) -> str:
        if value is None or value == "" or value == []:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, tuple):  # (available, emulated)
            return "emulated" if value[0] and value[1] else cell(value[0])
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value)

    def value(record: Dict[str, Any], key: str) -> Any:
        if key == "available":
            return (record["available"], record.get("emulated", False))
        return record[key]

    table = [list(header)] + [[cell(value(r, k)) for k in keys] for r in records]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = []
    for line in table:
        left = "  ".join(text.ljust(width) for text, width in zip(line, widths))
        lines.append(f"{left}  {line[-1]}".rstrip())
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.emulate_kernels is not None:
        from moe_a2a.testing.kernel_emulation import emulate_kernels, parse_arch

        with emulate_kernels(compute_capability=parse_arch(args.emulate_kernels)):
            records = rows(args.device)
    else:
        records = rows(args.device)
    text = json.dumps(records, indent=2) if args.json else format_table(records)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `moe-a2a backends | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
