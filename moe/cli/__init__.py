"""``moe-a2a`` command line: one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` and ``main(args) -> int``.
User errors (``ValueError`` subclasses raised for bad input, among them
``server_args.ConfigError``) print one line on stderr and exit 2, never a traceback.

Exit statuses (docs/reliability.md): 0 passed, 1 an output mismatched, 2 bad input, 3 a rank
failed (crashed, killed, timed out), 130 interrupted (128 + the signal for SIGTERM/SIGHUP).
Arguments are parsed before anything imports torch, so a bad flag is reported at once.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import NoReturn, Optional, Sequence

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
EXIT_RANK_FAILED = 3
EXIT_INTERRUPTED = 130

_LONG_WORD = re.compile(r"\S{121,}")


def clip_words(text: str) -> str:
    """``text`` with every run of more than 120 non-blank characters cut (an echoed value can
    be megabytes long; the message must stay one readable line)."""
    return _LONG_WORD.sub(lambda m: f"{m.group(0)[:100]}...({len(m.group(0))} chars)", str(text))


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help only where it says something: not for a None or
    False default, nor when the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if action.default is None or action.default is False or "default:" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors with one line and exit 2 (its default status too)."""

    def error(self, message: str) -> NoReturn:  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"moe-a2a: error: {clip_words(message)}\n")


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
        args = parser.parse_args(argv)  # argparse's own exits (usage, --help) leave from here
        args.plugins = _load_plugins(args)
        return int(args.handler(args) or 0)
    except SystemExit:  # argparse, before the user_error_types() below imports torch
        raise
    except user_error_types() as exc:
        print(f"moe-a2a: error: {clip_words(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `moe-a2a ... | head`: the reader left, which is fine
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP while ranks ran (all stopped)
        status = getattr(exc, "exit_status", EXIT_INTERRUPTED)
        how = "interrupted" if status == EXIT_INTERRUPTED else f"stopped by {exc}"
        print(f"moe-a2a: {how}", file=sys.stderr)
        return status


def _load_plugins(args: argparse.Namespace) -> tuple:
    """Import the ``--plugin`` / ``MOE_A2A_PLUGINS`` modules before the command resolves
    anything; returns their names (``run`` sends them to its ranks)."""
    from moe_a2a.plugins import load_plugins, plugin_modules

    modules = plugin_modules(getattr(args, "plugin", None) or ())
    load_plugins(modules)
    return modules


def entry() -> None:
    sys.exit(main())
