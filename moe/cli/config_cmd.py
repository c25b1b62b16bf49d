"""``moe-a2a config [FLAGS] [--json]``: resolve the server arguments and explain them.

Human output: the resolved fields (value and where it came from), the derived sizes, every
automatic decision, then the warnings. ``--json`` prints one object
``{"args", "decisions", "warnings", "sources", "derived"}`` on stdout. Warnings also go to
stderr in both forms. Bad input raises ``ConfigError``: exit 2, one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any, List

from moe_a2a.plugins import add_plugin_argument
from moe_a2a.server_args import ServerArgs, add_arguments, resolve_namespace
from moe_a2a.server_args.fields import FIELDS, format_value

_MAX_VALUE_WIDTH = 48


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "config",
        help="resolve server arguments and explain every automatic decision",
        description="Resolve server arguments from flags, MOE_A2A_* variables, legacy SGLang "
        "variables and defaults (in that precedence), apply auto-configuration, validate, and "
        "explain the result. Exit 0 when valid, 2 with one message when not.",
        allow_abbrev=False,
    )
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"args", "decisions", "warnings", "sources", '
                        '"derived"} instead of the table')
    add_plugin_argument(p)
    add_arguments(p)
    p.set_defaults(handler=main)
    return p


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_VALUE_WIDTH else text[: _MAX_VALUE_WIDTH - 3] + "..."


def render(args: ServerArgs) -> str:
    """The human report."""
    values = args.values()
    rows = [(f.name, _shorten(format_value(values[f.name])), args.sources[f.name]) for f in FIELDS]
    header = ("field", "value", "source")
    widths = [max(len(r[0]) for r in rows + [header]), max(len(r[1]) for r in rows + [header])]
    lines: List[str] = [f"resolved server arguments (backend {args.moe_a2a_backend})", ""]
    lines.append(f"  {'field':<{widths[0]}}  {'value':<{widths[1]}}  source")
    lines.append(f"  {'-' * widths[0]}  {'-' * widths[1]}  {'-' * 6}")
    for name, value, source in rows:
        lines.append(f"  {name:<{widths[0]}}  {value:<{widths[1]}}  {source}")
    derived = "  ".join(f"{k}={v}" for k, v in args.derived().items())
    lines += ["", f"derived: {derived}", ""]
    lines.append(f"decisions ({len(args.decisions)}):" if args.decisions else "decisions: none")
    for d in args.decisions:
        lines.append(f"  {d.field}: {_shorten(format_value(d.from_))} -> "
                     f"{_shorten(format_value(d.to))}")
        lines.append(f"      {d.reason}")
    lines.append("")
    lines.append(f"warnings ({len(args.warnings)}):" if args.warnings else "warnings: none")
    for w in args.warnings:
        lines.append(f"  - {w}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        # printed below, once, instead of Python's "file:line: Category: ..." form
        warnings.simplefilter("ignore")
        resolved = resolve_namespace(args)
    if args.json:
        print(json.dumps(resolved.explain(), indent=2))
    else:
        print(render(resolved))
    for message in resolved.warnings:
        print(f"moe-a2a: warning: {message}", file=sys.stderr)
    return 0
