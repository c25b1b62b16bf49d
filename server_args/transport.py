"""Reading ``ServerArgs.to_json()`` back: the envelope, checked before any field is trusted.

The text may come from another process or a file, so every part is checked for shape and
type with a ConfigError that says what is wrong; the values themselves are then checked by
``ServerArgs`` (field types, ranges, and every invariant of a resolved configuration).
"""

from __future__ import annotations

import json
from typing import Any, Dict

from moe_a2a.server_args.errors import ConfigError, clip, shown
from moe_a2a.server_args.fields import FIELD_NAMES

FIX = "fix: send the output of ServerArgs.to_json() unchanged"
# to_json output is a few kB; anything far larger is not one.
MAX_JSON_CHARS = 16 * 1024 * 1024


def parse_server_args_json(text: Any) -> Dict[str, Any]:
    """The keyword arguments of ``ServerArgs`` held by ``to_json`` text."""
    from moe_a2a.server_args.model import JSON_FORMAT, JSON_VERSION, Decision

    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"server args JSON is not UTF-8 text; {FIX}") from None
    if not isinstance(text, str):
        raise ConfigError(f"server args JSON must be text, got {type(text).__name__}; {FIX}")
    if len(text) > MAX_JSON_CHARS:
        raise ConfigError(f"server args JSON has {len(text)} characters, far more than to_json "
                          f"writes; {FIX}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"server args JSON is not valid JSON ({exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}); {FIX}") from None
    except RecursionError:
        raise ConfigError(f"server args JSON is nested too deeply to be server arguments; "
                          f"{FIX}") from None
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
        raise ConfigError(f"server args JSON lacks \"format\": {JSON_FORMAT!r}; {FIX}")
    if data.get("version") != JSON_VERSION:
        raise ConfigError(f"server args JSON has version {shown(data.get('version'))}; this "
                          f"moe-a2a reads version {JSON_VERSION}; fix: use the same moe-a2a "
                          f"release on the launcher and the workers")
    # `moe-a2a config --json` (ServerArgs.explain) adds "derived" and "capacities": values
    # computed from "args", which the rebuilt object computes again; they are not read.
    extra = sorted(set(data) - {"format", "version", "args", "sources", "decisions", "warnings",
                                "derived", "capacities"})
    if extra:
        raise ConfigError(f"server args JSON has unknown keys {clip(str(extra))}; {FIX}")
    args = data.get("args")
    if not isinstance(args, dict) or set(args) != set(FIELD_NAMES):
        got = set(args) if isinstance(args, dict) else set()
        raise ConfigError(
            f"server args JSON: args must have exactly the fields of this release; missing "
            f"{sorted(set(FIELD_NAMES) - got)}, unknown {clip(str(sorted(got - set(FIELD_NAMES))))}; "
            f"fix: use the same moe-a2a release on the launcher and the workers")
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise ConfigError(f"server args JSON: sources must map field names to text; {FIX}")
    decisions = data.get("decisions", [])
    warnings = data.get("warnings", [])
    if not isinstance(decisions, list):
        raise ConfigError(f"server args JSON: decisions must be a list; {FIX}")
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise ConfigError(f"server args JSON: warnings must be a list of text; {FIX}")
    return {**args, "sources": sources,
            "decisions": tuple(Decision.from_dict(d) for d in decisions),
            "warnings": tuple(warnings)}
