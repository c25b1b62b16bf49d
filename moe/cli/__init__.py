"""``moe-a2a`` command line: one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` and ``main(args) -> int``.
User errors (``ValueError`` subclasses raised for bad input, among them
``server_args.ConfigError``) print one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from moe_a2a.errors import user_error_types

# name -> module; imported lazily so ``moe-a2a config`` never pays for the model code.
SUBCOMMANDS = {
    "config": "moe_a2a.cli.config_cmd",
    "backends": "moe_a2a.cli.backends_cmd",
    "run": "moe_a2a.cli.run_cmd",
    "doctor": "moe_a2a.cli.doctor_cmd",
    "bench": "moe_a2a.cli.bench_cmd",
}

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors with one line and exit 2 (its default status too)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"moe-a2a: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from moe_a2a._version import __version__

    parser = _Parser(prog="moe-a2a", description="MoE all-to-all backends: configure, inspect, run.")
    parser.add_argument("--version", action="version", version=f"moe-a2a {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.handler(args) or 0)
    except user_error_types() as exc:
        print(f"moe-a2a: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `moe-a2a ... | head`: the reader left, which is fine
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("moe-a2a: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
