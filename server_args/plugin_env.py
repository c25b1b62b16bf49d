"""``MOE_A2A_PLUGINS``: modules to import before anything resolves a backend name.

A process-level variable, not a field of ``ServerArgs``: the plugins must be imported before
resolution (they register the backend names it checks), so they cannot be one of its results.
It is read here, like every other variable, and passed on explicitly (``moe-a2a run`` carries
the module names to its ranks in the run plan).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Tuple

from moe_a2a.server_args.errors import ConfigError, shown
from moe_a2a.server_args.sources import check_env, present

PLUGINS_VAR = "MOE_A2A_PLUGINS"

#: ``MOE_A2A_*`` variables that are not fields (``resolve`` does not warn about them).
PROCESS_VARIABLES: Mapping[str, str] = {
    PLUGINS_VAR: "comma-separated modules to import first (they register backends); "
                 "like --plugin",
}

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def plugin_module_names(text: str, given: str) -> Tuple[str, ...]:
    """Module names from ``mod1,mod2`` text (blank entries skipped); ``given`` names the flag or
    variable in errors."""
    names = tuple(part.strip() for part in str(text).split(",") if part.strip())
    for name in names:
        if not _MODULE.fullmatch(name):
            raise ConfigError(f"{given}: {shown(name)} is not a module name; fix: give dotted "
                              f"Python module names, e.g. my_pkg.my_backends (comma-separated)")
    return names


def read_plugins_env(env: Optional[Mapping[str, str]] = None) -> Tuple[str, ...]:
    """The modules named by ``MOE_A2A_PLUGINS`` (``()`` when unset or empty)."""
    env = os.environ if env is None else check_env(env)
    raw = present(env, PLUGINS_VAR)
    if raw is None:
        return ()
    return plugin_module_names(raw, f"{PLUGINS_VAR}={shown(raw)}")
