"""argparse wiring generated from the field declaration.

Every flag is added with ``default=argparse.SUPPRESS`` so that a parsed namespace holds only
the flags given on the command line; defaults, environment and auto-configuration are applied
by ``resolve``, which therefore knows what was explicit.
"""

from __future__ import annotations

import argparse
import shlex
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple, TypeVar, Union

from moe_a2a.server_args.errors import REMOVAL_RELEASE, ConfigError, shown
from moe_a2a.server_args.fields import (
    FIELD_NAMES,
    FIELDS,
    LEGACY_FLAG_NAMES,
    SPELLING_FLAGS,
    FieldSpec,
    SpellingFlag,
    format_value,
)
from moe_a2a.server_args.model import ServerArgs
from moe_a2a.server_args.sglang import (
    add_unused_sglang_flags,
    install_near_miss_check,
    unused_flags,
    unused_flags_warning,
)

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


def flag_help(spec: FieldSpec, default: Any = argparse.SUPPRESS) -> str:
    """The ``--help`` line: meaning, choices, default and the environment variable.

    ``default`` replaces the field's own default in the text (a command with defaults of its
    own, such as ``moe-a2a run``)."""
    parts = [spec.help]
    if spec.choices:
        parts.append(f"choices: {', '.join(spec.choices)}")
    if spec.range_text:
        parts.append(f"range: {spec.range_text}")
    if default is argparse.SUPPRESS:
        parts.append(f"default: {spec.default_text()}")
    else:
        parts.append(f"default: {format_value(default)} here ({spec.default_text()} in "
                     f"`moe-a2a config`)")
    if spec.auto:
        parts.append(f"auto: {spec.auto}")
    parts.append(f"env: {spec.env}")
    return "; ".join(parts).replace("%", "%%")  # argparse formats help with %


def _spelling_help(flag: SpellingFlag) -> str:
    if flag.deprecated:
        return f"deprecated: {flag.meaning} (removed in {REMOVAL_RELEASE})"
    return f"SGLang {flag.version}: {flag.meaning}"


Container = Union[argparse.ArgumentParser, "argparse._ArgumentGroup"]
ContainerT = TypeVar("ContainerT", bound=Container)


def add_arguments(parser: ContainerT, *,
                  strict_parser: Optional[argparse.ArgumentParser] = None,
                  defaults: Optional[Mapping[str, Any]] = None) -> ContainerT:
    """Add every server flag (with aliases and SGLang's spellings) to ``parser``.

    ``parser`` is an ``ArgumentParser`` (the flags are then sorted into titled groups) or an
    argument group of one (the flags all go into it: argparse deprecates nested groups).
    Every other SGLang server flag is accepted too (hidden from ``--help``; flags the parser
    already has are left to it); ``resolve_namespace`` reports those given in one warning.
    A near-miss of one of our flags (``--ep-szie``) is a did-you-mean ConfigError when parsed
    by ``strict_parser`` (default: ``parser`` itself, when it is an ``ArgumentParser``; pass the
    group's parser when ``parser`` is a group). ``defaults`` (field -> value) are the
    command's own defaults, shown in ``--help`` (pass the same mapping to ``resolve_namespace``).
    Returns ``parser``.
    """
    defaults = dict(defaults or {})
    groups: Dict[str, Any] = {}

    def group(key: str) -> Any:
        if not isinstance(parser, argparse.ArgumentParser):
            return parser
        if key not in groups:
            groups[key] = parser.add_argument_group(f"server arguments: {GROUP_TITLES[key]}")
        return groups[key]

    for spec in FIELDS:
        kwargs: Dict[str, Any] = dict(dest=spec.name, default=argparse.SUPPRESS,
                                      help=flag_help(spec, defaults.get(spec.name, argparse.SUPPRESS)))
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
    # SGLang's other flags: accepted (hidden) and reported by resolve_namespace as not used
    add_unused_sglang_flags(parser)
    if strict_parser is None and isinstance(parser, argparse.ArgumentParser):
        strict_parser = parser
    if strict_parser is not None:
        install_near_miss_check(strict_parser, own_flags())
    return parser


def own_flags() -> Tuple[str, ...]:
    """Every option string moe-a2a owns: fields, aliases, ``--no-`` forms, spellings."""
    out: List[str] = []
    for spec in FIELDS:
        out += spec.flags
        if spec.type is bool:
            out += ["--no-" + flag[2:] for flag in spec.flags]
    for flag in SPELLING_FLAGS:
        out += flag.flags
    return tuple(out)


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
    note = unused_flags_warning(unused_flags(namespace))
    return resolve_sources(cli=explicit_values(namespace), kwargs={}, env=env, defaults=defaults,
                           notes=[note] if note else [])


HELP_FLAGS = ("-h", "--help")


class _RaisingParser(argparse.ArgumentParser):
    """A parser for ``resolve(argv)``: errors are ConfigError, never ``sys.exit`` or output."""

    def error(self, message: str) -> NoReturn:  # noqa: D401 - argparse API
        raise ConfigError(f"server arguments: {message}; fix: see `moe-a2a config --help` "
                          f"(or moe_a2a.server_args.help_text())")

    def exit(self, status: int = 0, message: Optional[str] = None) -> NoReturn:  # noqa: D401
        # argparse exits only through error() and its help/version actions; never here
        raise ConfigError(f"server arguments: {message or 'argparse asked to exit'}")


def build_parser(prog: str = "server-args") -> argparse.ArgumentParser:
    """A parser of the server flags alone; errors raise ConfigError and it has no -h/--help
    (``help_text()`` returns what ``--help`` would print)."""
    return add_arguments(_RaisingParser(prog=prog, allow_abbrev=False, add_help=False))


def help_text(prog: str = "server-args") -> str:
    """The ``--help`` text of every server flag, as a string (nothing is printed)."""
    return build_parser(prog).format_help()


def argv_list(argv: Union[Sequence[str], str]) -> List[str]:
    """``argv`` as a list of text (one string is split like a shell), else a ConfigError."""
    if isinstance(argv, str):
        try:
            return shlex.split(argv)
        except ValueError as exc:  # unbalanced quotes, a trailing backslash
            raise ConfigError(f"server arguments {shown(argv)} cannot be split like a shell "
                              f"command line: {exc}; fix: balance the quotes") from None
    if isinstance(argv, (bytes, bytearray, Mapping)) or not isinstance(argv, Sequence):
        raise ConfigError(f"argv={shown(argv)} must be a list of flags or one string; fix: pass "
                          f"e.g. ['--tp-size', '8'] or '--tp-size 8'")
    bad = [a for a in argv if not isinstance(a, str)]
    if bad:
        raise ConfigError(f"argv holds {shown(bad[0])} ({type(bad[0]).__name__}); command-line "
                          f"arguments are text; fix: pass str(value), e.g. ['--tp-size', '8']")
    return list(argv)


def parse_argv(argv: Union[Sequence[str], str]) -> Tuple[Dict[str, Any], List[str]]:
    """Parse server flags (a list, or one string split like a shell): the explicit values, and
    the SGLang flags given that moe-a2a does not use."""
    argv = argv_list(argv)
    asked = [a for a in argv if a in HELP_FLAGS]
    if asked:
        raise ConfigError(f"{asked[0]} asks for the command-line help, which resolve() does not "
                          f"print; fix: call moe_a2a.server_args.help_text() for the text, or "
                          f"run `moe-a2a config --help`")
    namespace = build_parser().parse_args(argv)
    return explicit_values(namespace), unused_flags(namespace)
