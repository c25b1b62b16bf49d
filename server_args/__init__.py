"""Server arguments: flags, environment variables and one resolution pass to a frozen config.

    from moe_a2a.server_args import resolve
    args = resolve(["--moe-a2a-backend", "deepep", "--tp-size", "8"])   # command line
    args = resolve(moe_a2a_backend="deepep", tp_size=8)                 # keywords (RL frameworks)
    args.ep_size, args.decisions, args.explain(), args.backend_settings, args.layout
    worker_args = ServerArgs.from_json(args.to_json())                  # workers: no env, no auto

Precedence per field (``PRECEDENCE``): command line / keywords > ``MOE_A2A_*`` > legacy SGLang
variable > default. Every field is declared once (``fields.ServerArgsFields``). See
``docs/configuration.md``.
"""

from moe_a2a.server_args.cli import add_arguments, explicit_values, help_text, resolve_namespace
from moe_a2a.server_args.errors import (
    REMOVAL_RELEASE,
    ConfigDeprecationWarning,
    ConfigError,
    ConfigWarning,
)
from moe_a2a.server_args.fields import FIELDS, FieldSpec
from moe_a2a.server_args.launch import LaunchEnv, read_launch_env
from moe_a2a.server_args.layout import ParallelLayout
from moe_a2a.server_args.model import Decision, ServerArgs
from moe_a2a.server_args.plugin_env import PLUGINS_VAR, plugin_module_names, read_plugins_env
from moe_a2a.server_args.resolve import resolve
from moe_a2a.server_args.sources import PRECEDENCE, Source, SourceKind
from moe_a2a.server_args.validate import batch_capacity_error

__all__ = [
    "ConfigDeprecationWarning",
    "ConfigError",
    "ConfigWarning",
    "Decision",
    "FIELDS",
    "FieldSpec",
    "LaunchEnv",
    "PLUGINS_VAR",
    "PRECEDENCE",
    "ParallelLayout",
    "REMOVAL_RELEASE",
    "ServerArgs",
    "Source",
    "SourceKind",
    "add_arguments",
    "batch_capacity_error",
    "explicit_values",
    "help_text",
    "plugin_module_names",
    "read_launch_env",
    "read_plugins_env",
    "resolve",
    "resolve_namespace",
]
