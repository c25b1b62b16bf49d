"""Values that are JSON documents or name files: ``--deepep-config``, ``--init-expert-location``.

``resolve`` reads a named file once (``load_*``), so workers receive contents, never paths;
validation re-checks the stored text (``check_*``) without touching the file system.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

from moe_a2a.server_args.errors import ConfigError, clip

EXPERT_LOCATION_KEYS = ("physical_to_logical_map", "logical_count")
# A DeepEP config or an expert placement is a few kB; a larger file is not one of them.
MAX_JSON_FILE_BYTES = 64 * 1024 * 1024


def parse_json(text: str, what: str) -> Any:
    """Parse JSON text; errors point at line and column and never echo the whole document."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
            f"(character {exc.pos}); fix: correct the JSON") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a configuration; fix: send the "
                          f"intended document") from None


def parse_json_object(text: str, what: str) -> dict:
    """Parse JSON text that must hold an object."""
    obj = parse_json(text, what)
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} holds a JSON {type(obj).__name__}, not an object; fix: "
                          f"give a JSON object {{...}}")
    return obj


def read_text_file(path: str, what: str) -> str:
    """A UTF-8 text file's contents; a binary, huge or unreadable file is a ConfigError."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_FILE_BYTES:
            raise ConfigError(f"{what}: {clip(path)} has {size} bytes, more than a configuration "
                              f"file holds ({MAX_JSON_FILE_BYTES}); fix: point at the intended "
                              f"JSON file")
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {clip(path)} is not UTF-8 text (byte {exc.start} is "
                          f"0x{exc.object[exc.start]:02x}); fix: point at a JSON file") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {clip(path)}: {exc.strerror or exc}; fix: check "
                          f"the path and its permissions") from None


def load_deepep_config(value: str, given: str) -> Tuple[str, Optional[str]]:
    """``--deepep-config``: JSON text, or a path whose contents are read now.

    Returns ``(json_text, path)``; ``path`` is None for inline text.
    """
    if value.lstrip().startswith("{"):
        parse_json_object(value, given)
        return value, None
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise ConfigError(f"{given}: neither JSON object text nor an existing file ({clip(path)!r} "
                          f"not found); fix: pass JSON text like '{{\"num_sms\": 24}}' or the "
                          f"path of a JSON file")
    obj = parse_json_object(read_text_file(path, given), f"{given} (file {clip(path)})")
    return json.dumps(obj, separators=(",", ":")), path


def expert_location_kind(text: str, given: str) -> str:
    """``trivial``, ``json`` (inline text) or ``file`` (a .json/.pt path); error otherwise."""
    stripped = text.strip()
    if stripped == "trivial":
        return "trivial"
    if stripped.startswith("{"):
        return "json"
    if stripped.endswith((".json", ".pt")):
        return "file"
    raise ConfigError(f"{given} is not understood: expected 'trivial', JSON text, or a path "
                      f"ending in .json or .pt; fix: pass one of those")


def check_expert_location_json(obj: dict, what: str) -> None:
    """A placement document names the physical map or the per-expert counts."""
    if not any(key in obj for key in EXPERT_LOCATION_KEYS):
        keys = clip(str(sorted(map(str, obj))))
        raise ConfigError(
            f"{what} has keys {keys} but needs one of {', '.join(EXPERT_LOCATION_KEYS)}; fix: "
            f"give physical_to_logical_map ([layers][physical slots] of logical ids) or "
            f"logical_count ([layers][experts] of token counts)")
    for key in EXPERT_LOCATION_KEYS:
        if key in obj:
            _check_layer_table(obj[key], key, what)


def _check_layer_table(table: object, key: str, what: str) -> None:
    """``[layers][columns]`` of non-negative whole numbers, every layer as long as the first."""
    shape = "[layers][physical slots] of logical expert ids" if key == EXPERT_LOCATION_KEYS[0] \
        else "[layers][experts] of token counts"
    fix = f"fix: give {key} as {shape}, non-negative integers, every layer the same length"
    if not isinstance(table, list) or not table or not all(isinstance(r, list) for r in table):
        raise ConfigError(f"{what}: {key} is {clip(repr(table))}, not a non-empty list of "
                          f"lists; {fix}")
    width = len(table[0])
    for layer, row in enumerate(table):
        if len(row) != width or not row:
            raise ConfigError(f"{what}: {key}[{layer}] has {len(row)} entries, layer 0 has "
                              f"{width}; {fix}")
        for col, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{what}: {key}[{layer}][{col}] is {clip(repr(value))}; {fix}")


def load_expert_location(value: str, given: str) -> str:
    """``--init-expert-location``: check the file exists (and a .json file's keys).

    Returns the value, with a relative path made absolute so workers started elsewhere find it.
    """
    if expert_location_kind(value, given) != "file":
        return value
    path = os.path.abspath(os.path.expanduser(value.strip()))
    if not os.path.isfile(path):
        raise ConfigError(f"{given}: file {clip(path)!r} not found; fix: pass an existing .json "
                          f"or .pt file, JSON text, or 'trivial'")
    if path.endswith(".json"):
        what = f"{given} (file {clip(path)})"
        check_expert_location_json(parse_json_object(read_text_file(path, given), what), what)
    return path

