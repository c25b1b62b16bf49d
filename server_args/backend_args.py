"""What a backend spec reads from the server arguments, asked of its data (never its name).

A spec maps its settings attributes to server-argument fields (``settings_fields``), names the
attribute holding its mode (``mode_setting``) and the attributes holding its capacities
(``capacities``). These helpers answer the resolver's questions from that data, so a
third-party backend with its own settings, modes and capacities is resolved and checked
without any change here.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Mapping, Optional

from moe_a2a.backends import BackendSettings, BackendSpec, CapacityRule, UnknownBackendError, get_backend
from moe_a2a.server_args.errors import ConfigError, clip
from moe_a2a.server_args.fields import FIELDS_BY_NAME, MODE_FIELD

Values = Mapping[str, Any]
NO_MODE = "default"  # the one mode of a backend without modes


def backend_spec(name: str, given: str) -> BackendSpec:
    """The registered spec; an unknown name becomes a ConfigError naming where it came from."""
    try:
        return get_backend(name)
    except UnknownBackendError as exc:  # keep the registry's message: it lists the names
        raise ConfigError(f"{given}: {exc}") from exc


def mode_field(spec: BackendSpec) -> Optional[str]:
    """The server-argument field holding the backend's mode, or None (no modes, or a fixed one).

    ``spec.mode_setting`` names the settings attribute; its field is ``settings_fields[attr]``.
    A backend with modes but no settings uses the generic mode flag (``--deepep-mode``).
    """
    if spec.mode_setting is not None:
        return spec.settings_fields.get(spec.mode_setting)
    return MODE_FIELD if spec.has_modes else None


def backend_mode(spec: BackendSpec, values: Values) -> str:
    """The mode the backend runs in (``default`` for a backend without modes)."""
    field = mode_field(spec)
    if field is not None:
        return str(values[field])
    if spec.mode_setting is not None:  # declared but not mapped: the settings' own default
        return str(setting_default(spec, spec.mode_setting))
    return NO_MODE


def describe_backend(spec: BackendSpec, mode: str) -> str:
    """``backend deepep in mode normal`` (the mode only for backends with modes)."""
    return f"backend {spec.name}" + (f" in mode {mode}" if spec.has_modes else "")


def reads(spec: BackendSpec) -> FrozenSet[str]:
    """The server-argument fields the backend uses (its settings and its mode)."""
    fields = set(spec.settings_fields.values())
    field = mode_field(spec)
    if field is not None:
        fields.add(field)
    return frozenset(fields)


def setting_default(spec: BackendSpec, attr: str) -> Any:
    """The default of one attribute of the backend's settings class."""
    return spec.settings.model_fields[attr].get_default(call_default_factory=True)


def capacity_field(spec: BackendSpec, rule: CapacityRule) -> Optional[str]:
    """The server-argument field that sets a capacity, or None (fixed by the backend)."""
    return spec.settings_fields.get(rule.setting)


def capacity_value(spec: BackendSpec, rule: CapacityRule, values: Values) -> int:
    """The capacity in tokens per rank, from its field or the settings' default."""
    field = capacity_field(spec, rule)
    return int(values[field] if field is not None else setting_default(spec, rule.setting))


def settings_input(spec: BackendSpec, values: Values) -> Dict[str, Any]:
    """The keyword arguments of ``spec.settings`` built from the resolved values."""
    return {attr: FIELDS_BY_NAME[field].setting_value(values[field])
            for attr, field in spec.settings_fields.items()}


def build_settings(spec: BackendSpec, values: Values) -> BackendSettings:
    """The backend's typed settings; a value they reject is a ConfigError naming the field."""
    unknown = sorted(set(spec.settings_fields.values()) - set(FIELDS_BY_NAME))
    if unknown:
        raise ConfigError(
            f"backend {spec.name}: settings_fields name {unknown}, which are not server "
            f"arguments (fields: {', '.join(FIELDS_BY_NAME)}); fix: map settings attributes to "
            f"existing fields in the backend's registration")
    given = settings_input(spec, values)
    try:
        return spec.settings(**given)
    except Exception as exc:  # pydantic's ValidationError: the value breaks the backend's bounds
        errors = getattr(exc, "errors", None)
        detail = clip(str(exc).replace("\n", " "), 300)
        if callable(errors):
            first = errors()[0] if errors() else {}
            attr = str(first.get("loc", ("?",))[0])
            field = spec.settings_fields.get(attr, attr)
            flag = FIELDS_BY_NAME[field].flag if field in FIELDS_BY_NAME else field
            detail = (f"{flag} {clip(str(given.get(attr)))}: {first.get('msg', detail)} "
                      f"({spec.settings.__name__}.{attr})")
        raise ConfigError(f"backend {spec.name} rejects its settings: {detail}; fix: pass a value "
                          f"the backend accepts") from None
