"""Reading the sources: ``MOE_A2A_*`` variables, legacy SGLang variables, and files named by flags.

This package is the only place in moe-a2a that reads ``os.environ`` for configuration; the
functions here take the mapping explicitly, and only ``resolve`` substitutes ``os.environ``.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Tuple

from moe_a2a.server_args.errors import ConfigError
from moe_a2a.server_args.fields import (
    ENV_PREFIX,
    FIELDS,
    FIELDS_BY_ENV,
    FIELDS_BY_NAME,
    LEGACY_VARS,
    LegacyVar,
    _to_bool,
)
from moe_a2a.server_args.validate import check_expert_location_json, expert_location_kind, parse_json_object


def _present(env: Mapping[str, str], var: str) -> Optional[str]:
    """The variable's text, or None when unset or empty (``VAR=`` counts as unset)."""
    raw = env.get(var)
    if raw is None or not str(raw).strip():
        return None
    return str(raw)


def read_moe_env(env: Mapping[str, str]) -> Iterator[Tuple[str, Any, str]]:
    """``(field, value, source)`` for every ``MOE_A2A_<FIELD>`` variable that is set."""
    for spec in FIELDS:
        raw = _present(env, spec.env)
        if raw is not None:
            yield spec.name, spec.convert(raw, f"{spec.env}={raw!r}"), f"env:{spec.env}"


def unknown_moe_env(env: Mapping[str, str]) -> List[str]:
    """Warnings for ``MOE_A2A_*`` variables that name no field (a typo would otherwise be lost)."""
    out = []
    for var in sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in FIELDS_BY_ENV):
        close = difflib.get_close_matches(var, list(FIELDS_BY_ENV), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        out.append(f"{var} is not a moe-a2a setting and is ignored{hint} (variables are "
                   f"MOE_A2A_<FIELD>, e.g. MOE_A2A_EP_SIZE; see docs/configuration.md)")
    return out


@dataclass(frozen=True)
class LegacyValue:
    """A legacy variable that is set: its text and the field value it stands for."""

    var: LegacyVar
    raw: str
    value: Any  # None: set, but it does not set the field (e.g. the megamoe switch set to 0)

    @property
    def source(self) -> str:
        return f"legacy_env:{self.var.var}"


def read_legacy_env(env: Mapping[str, str]) -> Iterator[LegacyValue]:
    for legacy in LEGACY_VARS:
        raw = _present(env, legacy.var)
        if raw is None:
            continue
        given = f"{legacy.var}={raw!r}"
        spec = FIELDS_BY_NAME[legacy.field]
        parsed = _to_bool(raw, given) if legacy.type is bool else spec.convert(raw, given)
        value = legacy.value(parsed)
        if value is not None:
            value = spec.convert(value, given)
        yield LegacyValue(legacy, raw, value)


def load_deepep_config(value: str, given: str) -> Tuple[str, Optional[str]]:
    """``--deepep-config``: JSON text, or a path whose contents are read now.

    Returns ``(json_text, path)``; ``path`` is None for inline text. Workers get the text, so
    they never need the file.
    """
    if value.lstrip().startswith("{"):
        parse_json_object(value, given)
        return value, None
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise ConfigError(f"{given}: neither JSON object text nor an existing file ({path!r} not "
                          f"found); fix: pass JSON text like '{{\"num_sms\": 24}}' or the path "
                          f"of a JSON file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{given}: cannot read {path!r}: {exc}; fix: check the file's "
                          f"permissions") from None
    obj = parse_json_object(text, f"{given} (file {path})")
    return json.dumps(obj, separators=(",", ":")), path


def check_expert_location(value: str, given: str) -> str:
    """``--init-expert-location``: check the file exists (and its keys for .json).

    Returns the value, with a relative path made absolute so workers started elsewhere find it.
    """
    kind = expert_location_kind(value, given)
    if kind != "file":
        return value
    path = os.path.abspath(os.path.expanduser(value.strip()))
    if not os.path.isfile(path):
        raise ConfigError(f"{given}: file {path!r} not found; fix: pass an existing .json or .pt "
                          f"file, JSON text, or 'trivial'")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"{given}: cannot read {path!r}: {exc}") from None
        what = f"{given} (file {path})"
        check_expert_location_json(parse_json_object(text, what), what)
    return path
