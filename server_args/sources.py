"""Where values come from: the typed ``Source`` of each field, the precedence order, and the
readers of the environment (``MOE_A2A_*`` variables, legacy and unused SGLang variables).

This package is the only place in moe-a2a that reads ``os.environ`` for configuration; the
readers here take the mapping explicitly, and only ``resolve`` substitutes ``os.environ``.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from moe_a2a.server_args.errors import ConfigError, clip, shown


class SourceKind(str, enum.Enum):
    """The kinds of sources, by name (``str`` values: they travel through JSON)."""

    DEFAULT = "default"          # built-in, or a caller's ``defaults=``
    LEGACY_ENV = "legacy_env"    # an SGLang variable (SGLANG_* / SGL_*)
    ENV = "env"                  # a MOE_A2A_* variable
    CLI = "cli"                  # the command line (argv or a parsed namespace)
    KWARGS = "kwargs"            # keyword arguments of resolve()
    AUTO = "auto"                # changed by auto-configuration (a Decision says why)


# The precedence order, lowest first: the resolver applies the layers in this order, so a
# later kind overrides an earlier one. AUTO is not a layer: it comes after resolution.
PRECEDENCE: Tuple[SourceKind, ...] = (
    SourceKind.DEFAULT, SourceKind.LEGACY_ENV, SourceKind.ENV, SourceKind.CLI, SourceKind.KWARGS)

# Given on purpose by the user: an automatic rule never overrides these (it raises instead).
EXPLICIT: Tuple[SourceKind, ...] = (SourceKind.ENV, SourceKind.CLI, SourceKind.KWARGS)
# Kinds that name the variable they were read from.
_WITH_VARIABLE: Tuple[SourceKind, ...] = (SourceKind.ENV, SourceKind.LEGACY_ENV)


@dataclass(frozen=True)
class Source:
    """Where one field's value came from.

    Attributes:
        kind: the layer (see :class:`SourceKind`).
        variable: the environment variable read, for ``env`` and ``legacy_env``; else None.

    ``str(source)`` is the JSON and table form: ``cli``, ``env:MOE_A2A_EP_SIZE``,
    ``legacy_env:SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK`` ...
    """

    kind: SourceKind
    variable: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SourceKind(self.kind))
        if (self.variable is not None) != (self.kind in _WITH_VARIABLE):
            raise ConfigError(f"source kind {self.kind.value!r} "
                              f"{'needs' if self.kind in _WITH_VARIABLE else 'takes no'} variable "
                              f"(got {shown(self.variable)})")

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.variable}" if self.variable else self.kind.value

    @property
    def explicit(self) -> bool:
        """Given on purpose: command line, keywords or a ``MOE_A2A_*`` variable."""
        return self.kind in EXPLICIT

    @property
    def is_set(self) -> bool:
        """Explicit, or from a legacy variable: anything but a default or an automatic change."""
        return self.explicit or self.kind is SourceKind.LEGACY_ENV

    @classmethod
    def parse(cls, text: Any) -> "Source":
        """The inverse of ``str()``; a ConfigError for anything else (JSON input)."""
        if isinstance(text, Source):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"source {shown(text)} is not text; expected one of "
                              f"{', '.join(k.value for k in SourceKind)} (env kinds as kind:VAR)")
        kind, _, variable = text.partition(":")
        try:
            return cls(SourceKind(kind), variable or None)
        except ValueError:
            raise ConfigError(f"source {shown(text)} is not understood; expected one of "
                              f"{', '.join(k.value for k in SourceKind)} (env kinds as "
                              f"kind:VAR)") from None


DEFAULT = Source(SourceKind.DEFAULT)
CLI = Source(SourceKind.CLI)
KWARGS = Source(SourceKind.KWARGS)
AUTO = Source(SourceKind.AUTO)


# ---- environment -------------------------------------------------------------------------------

ENV_PREFIX = "MOE_A2A_"
SGLANG_PREFIX = "SGLANG_"
OLD_SGLANG_PREFIX = "SGL_"  # SGLang's older prefix, still honoured by SGLang itself


def present(env: Mapping[str, str], var: str) -> Optional[str]:
    """The variable's text, or None when unset or empty (``VAR=`` counts as unset)."""
    raw = env.get(var)
    if raw is None or not str(raw).strip():
        return None
    return str(raw)


@dataclass(frozen=True)
class EnvValue:
    """One SGLang variable as read: the name found, its text, and the notes to report."""

    name: str            # the spelling that was read (SGLANG_X or SGL_X)
    raw: str
    notes: Tuple[str, ...] = ()


def old_spelling(var: str) -> str:
    """``SGLANG_X`` → ``SGL_X``: the prefix SGLang used before."""
    return OLD_SGLANG_PREFIX + var[len(SGLANG_PREFIX):]


def read_sglang_var(env: Mapping[str, str], var: str) -> Optional[EnvValue]:
    """An SGLang variable under its ``SGLANG_`` name or SGLang's older ``SGL_`` spelling.

    Both spellings set: ``SGLANG_`` wins (SGLang itself lets the old one overwrite the new one;
    moe-a2a keeps the current name authoritative), with a note when they disagree.
    """
    new, old = present(env, var), present(env, old_spelling(var))
    if old is None:
        return None if new is None else EnvValue(var, new)
    note = (f"{old_spelling(var)} is SGLang's older spelling of {var}; it is honoured, but rename "
            f"it to {var}")
    if new is None:
        return EnvValue(old_spelling(var), old, (note,))
    if new.strip() != old.strip():
        note = (f"{old_spelling(var)}={clip(old)} is ignored: {var}={clip(new)} is also set and "
                f"takes precedence (SGLang would let the old spelling win)")
        return EnvValue(var, new, (note,))
    return EnvValue(var, new)


def unknown_moe_env(env: Mapping[str, str], known: Mapping[str, Any]) -> List[str]:
    """Warnings for ``MOE_A2A_*`` variables that name no field (a typo would otherwise be lost)."""
    out = []
    for var in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known):
        close = difflib.get_close_matches(var, list(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        out.append(f"{clip(var)} is not a moe-a2a setting and is ignored{hint} (variables are "
                   f"MOE_A2A_<FIELD>, e.g. MOE_A2A_EP_SIZE; `moe-a2a config --help` lists each)")
    return out


def check_env(env: Any) -> Mapping[str, str]:
    """``env`` as given to ``resolve``: a mapping of text to text, else a ConfigError."""
    if not isinstance(env, Mapping):
        raise ConfigError(f"env={shown(env)} must be a mapping of variable names to text (or None "
                          f"for os.environ); fix: pass e.g. env={{}} or env=dict(os.environ)")
    bad: Dict[Any, Any] = {k: v for k, v in env.items()
                           if not isinstance(k, str) or not isinstance(v, str)}
    relevant = {k: v for k, v in bad.items() if not isinstance(k, str) or
                k.startswith((ENV_PREFIX, SGLANG_PREFIX, OLD_SGLANG_PREFIX))}
    if relevant:
        key, value = next(iter(relevant.items()))
        raise ConfigError(f"env[{shown(key)}]={shown(value)}: environment variables are text; "
                          f"fix: pass str keys and str values, e.g. env={{'MOE_A2A_TP_SIZE': '4'}}")
    return env

