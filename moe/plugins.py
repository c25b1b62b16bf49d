"""``--plugin MODULE`` / ``MOE_A2A_PLUGINS``: the user's own modules that register backends.

A plugin is an importable module whose import registers backends with
``@moe_a2a.backends.register_backend`` (or the call form). The command line imports the
plugins before it resolves anything (``config``, ``backends``, ``run``); ``moe-a2a run`` carries
their names to its ranks in the run plan, and every rank imports them first.

Loading is guarded like the entry points: whatever the import raises (``SystemExit``
included, ``KeyboardInterrupt`` excepted) becomes a :class:`PluginError` (exit 2 on the command
line, one line naming the module), and what it prints goes to stderr, so ``--json`` stays clean.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any, Iterable, Optional, Sequence, Tuple

from moe_a2a.errors import MoeA2AError


class PluginError(MoeA2AError):
    """A ``--plugin`` module (or one named by ``MOE_A2A_PLUGINS``) could not be imported."""


def add_plugin_argument(parser: Any) -> None:
    """``--plugin MODULE`` (repeatable) on a subcommand's parser or argument group."""
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import MODULE first: a module of yours that registers backends with "
             "@moe_a2a.backends.register_backend (repeatable, or comma-separated; also "
             "MOE_A2A_PLUGINS=mod1,mod2); `moe-a2a run` imports it on every rank too")


def plugin_modules(flags: Sequence[str] = (), env: Optional[dict] = None) -> Tuple[str, ...]:
    """The modules to import: ``MOE_A2A_PLUGINS`` first, then each ``--plugin`` (a value may
    list several, comma-separated), without repeats."""
    from moe_a2a.server_args import plugin_module_names, read_plugins_env

    names = list(read_plugins_env(env))
    for value in flags:
        names += plugin_module_names(value, f"--plugin {value}")
    return tuple(dict.fromkeys(names))


def load_plugins(modules: Iterable[str]) -> None:
    """Import each module (idempotent: an imported module is not imported again).

    Raises:
        PluginError: the import failed or ended the interpreter; names the module and why.
    """
    from moe_a2a.backends.registry import describe_load_failure

    for name in modules:
        if name in sys.modules:
            continue
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the caller's (--json)
                importlib.import_module(name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a plugin never ends the command
            missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
                name == exc.name or name.startswith(exc.name + "."))
            fix = ("check the name and that its folder is on PYTHONPATH (or the package is "
                   "installed)" if missing else "fix the module, or drop it from --plugin / "
                   "MOE_A2A_PLUGINS")
            raise PluginError(f"plugin {name!r} failed to import: {describe_load_failure(exc)}; "
                              f"fix: {fix}") from None


__all__ = ["PluginError", "add_plugin_argument", "load_plugins", "plugin_modules"]
