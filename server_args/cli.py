"""argparse wiring generated from the field declaration.

Every flag is added with ``default=argparse.SUPPRESS`` so that a parsed namespace holds only
the flags given on the command line; defaults, environment and auto-configuration are applied
by ``resolve``, which therefore knows what was explicit.
"""

from __future__ import annotations

import argparse
import shlex
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from moe_a2a.server_args.errors import REMOVAL_RELEASE, ConfigError, shown
from moe_a2a.server_args.fields import (
    FIELD_NAMES,
    FIELDS,
    LEGACY_FLAG_NAMES,
    SPELLING_FLAGS,
    FieldSpec,
    SpellingFlag,
)
from moe_a2a.server_args.model import ServerArgs

GROUP_TITLES: Mapping[str, str] = MappingProxyType({
    "backend": "backend",
    "parallelism": "parallelism",
    "deepep": "DeepEP",
    "megamoe": "Mega-MoE",
    "shared experts": "shared experts",
    "routed experts": "routed experts capture (R3)",
    "eplb": "expert-parallel load balancing (EPLB)",
    "batch limits": "batch limits (checked against per-rank capacities)",
    "spellings": f"SGLang spellings of the flags above (the deprecated ones are removed in "
                 f"{REMOVAL_RELEASE})",
})


def help_text(spec: FieldSpec) -> str:
    """The ``--help`` line: meaning, choices, default and the environment variable."""
    parts = [spec.help]
    if spec.choices:
        parts.append(f"choices: {', '.join(spec.choices)}")
    if spec.range_text:
        parts.append(f"range: {spec.range_text}")
    parts.append(f"default: {spec.default_text()}")
    if spec.auto:
        parts.append(f"auto: {spec.auto}")
    parts.append(f"env: {spec.env}")
    return "; ".join(parts).replace("%", "%%")  # argparse formats help with %


def _spelling_help(flag: SpellingFlag) -> str:
    if flag.deprecated:
        return f"deprecated: {flag.meaning} (removed in {REMOVAL_RELEASE})"
    return f"SGLang {flag.version}: {flag.meaning}"


Container = Union[argparse.ArgumentParser, "argparse._ArgumentGroup"]


def add_arguments(parser: Container) -> Container:
    """Add every server flag (with aliases and SGLang's spellings) to ``parser``.

    ``parser`` is an ``ArgumentParser`` (the flags are then sorted into titled groups) or an
    argument group of one (the flags all go into it: argparse deprecates nested groups).
    Returns ``parser``.
    """
    groups: Dict[str, Any] = {}

    def group(key: str) -> Any:
        if not isinstance(parser, argparse.ArgumentParser):
            return parser
        if key not in groups:
            groups[key] = parser.add_argument_group(f"server arguments: {GROUP_TITLES[key]}")
        return groups[key]

    for spec in FIELDS:
        kwargs: Dict[str, Any] = dict(dest=spec.name, default=argparse.SUPPRESS, help=help_text(spec))
        if spec.type is bool:
            # --flag / --no-flag: the negative form overrides a MOE_A2A_* variable
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            # values stay text here; resolve converts them with messages naming the flag
            kwargs["metavar"] = spec.metavar or spec.type.__name__.upper()
        group(spec.group).add_argument(*spec.flags, **kwargs)
    for flag in SPELLING_FLAGS:
        kwargs = dict(dest=flag.name, default=argparse.SUPPRESS, help=_spelling_help(flag))
        if flag.takes_value:
            kwargs["metavar"] = "N"
        else:
            kwargs["action"] = "store_true"
        group("spellings").add_argument(*flag.flags, **kwargs)
    return parser


def explicit_values(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The server flags present in ``namespace`` (others, e.g. ``--num-experts``, are left out)."""
    given = vars(namespace)
    return {name: given[name] for name in FIELD_NAMES + LEGACY_FLAG_NAMES if name in given}


def resolve_namespace(
    namespace: argparse.Namespace,
    env: Optional[Mapping[str, str]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
) -> ServerArgs:
    """Resolve from a namespace parsed by a parser that ``add_arguments`` filled."""
    from moe_a2a.server_args.resolve import resolve_sources

    if not isinstance(namespace, argparse.Namespace):
        raise ConfigError(f"resolve_namespace needs an argparse.Namespace, got "
                          f"{type(namespace).__name__}; fix: pass parser.parse_args(...)")
    return resolve_sources(cli=explicit_values(namespace), kwargs={}, env=env, defaults=defaults)


class _RaisingParser(argparse.ArgumentParser):
    """A parser for ``resolve(argv)``: errors are ConfigError, never ``sys.exit``."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        raise ConfigError(f"server arguments: {message}; fix: see --help or docs/configuration.md")


def build_parser(prog: str = "server-args") -> argparse.ArgumentParser:
    """A parser of the server flags alone whose errors raise ConfigError."""
    return add_arguments(_RaisingParser(prog=prog, allow_abbrev=False))


def parse_argv(argv: Union[Sequence[str], str]) -> Dict[str, Any]:
    """Parse server flags (a list, or one string split like a shell) into explicit values."""
    if isinstance(argv, str):
        try:
            argv = shlex.split(argv)
        except ValueError as exc:  # unbalanced quotes, a trailing backslash
            raise ConfigError(f"server arguments {shown(argv)} cannot be split like a shell "
                              f"command line: {exc}; fix: balance the quotes") from None
    return explicit_values(build_parser().parse_args(list(argv)))
