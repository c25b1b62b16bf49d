"""``ServerArgs``: the frozen, validated result of ``resolve`` (and what workers receive)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

from pydantic import PrivateAttr, ValidationError

from moe_a2a.backends import BackendSettings, BackendSpec
from moe_a2a.server_args.backend_args import backend_spec, build_settings
from moe_a2a.server_args.errors import ConfigError, clip, shown
from moe_a2a.server_args.fields import FIELD_NAMES, FIELDS, ServerArgsFields, describe, format_value
from moe_a2a.server_args.layout import ParallelLayout
from moe_a2a.server_args.sources import DEFAULT, Source
from moe_a2a.server_args.validate import View, capacity_checks, prefill_tokens_per_dp_rank, validate

JSON_FORMAT = "moe-a2a/server-args"
# 2: moe_runner_backend added. A worker reads the version its launcher wrote (same release).
JSON_VERSION = 2


@dataclass(frozen=True)
class Decision:
    """One automatic change made by auto-configuration.

    ``from_`` is serialised as ``"from"`` (a Python keyword).
    """

    field: str
    from_: Any
    to: Any
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form ``{"field", "from", "to", "reason"}``."""
        return {"field": self.field, "from": self.from_, "to": self.to, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Any) -> "Decision":
        """The inverse of :meth:`to_dict`; anything else is a ConfigError."""
        if not isinstance(data, Mapping) or set(data) != {"field", "from", "to", "reason"}:
            raise ConfigError(f"server args JSON: decision {shown(data)} must be an object with "
                              f"keys field, from, to, reason; fix: send the output of "
                              f"ServerArgs.to_json() unchanged")
        if data["field"] not in FIELD_NAMES or not isinstance(data["reason"], str):
            raise ConfigError(f"server args JSON: decision {shown(data)} names no field of this "
                              f"release or has no text reason; fix: send the output of "
                              f"ServerArgs.to_json() unchanged")
        for key in ("from", "to"):
            if data[key] is not None and not isinstance(data[key], (bool, int, str)):
                raise ConfigError(f"server args JSON: decision {shown(data)} has a {key!r} value "
                                  f"that no field holds; fix: send the output of "
                                  f"ServerArgs.to_json() unchanged")
        return cls(field=data["field"], from_=data["from"], to=data["to"], reason=data["reason"])

    def __str__(self) -> str:
        return f"{self.field}: {format_value(self.from_)} -> {format_value(self.to)} ({self.reason})"


def _sources(given: Optional[Mapping[str, Any]]) -> Mapping[str, Source]:
    """Every field's Source (default where not given); names and kinds checked."""
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ConfigError(f"sources={shown(given)} must map field names to sources")
    unknown = sorted(str(k) for k in set(given) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"sources name unknown fields {clip(str(unknown))}; valid: "
                          f"{', '.join(FIELD_NAMES)}")
    return MappingProxyType({name: Source.parse(given.get(name, DEFAULT)) for name in FIELD_NAMES})


class ServerArgs(ServerArgsFields):
    """Resolved server arguments. Build with :func:`moe_a2a.server_args.resolve`; never mutated.

    Fields are named as the flags (``--ep-size`` -> ``ep_size``) and declared in
    ``moe_a2a.server_args.fields.ServerArgsFields``. Every instance is valid: construction runs
    every check (``from_json`` too) but no auto-configuration, and never reads the environment.

    Beyond the fields:
        decisions: automatic changes, in the order they were made.
        sources: where each field's value came from (a :class:`Source` per field;
            ``str(source)`` is ``default``, ``legacy_env:<VAR>``, ``env:<VAR>``, ``cli``,
            ``kwargs`` or ``auto``).
        warnings: messages for the user (deprecations, flags without effect, conflicts).
    """

    _sources: Mapping[str, Source] = PrivateAttr()
    _decisions: Tuple[Decision, ...] = PrivateAttr(default=())
    _warnings: Tuple[str, ...] = PrivateAttr(default=())

    def __init__(self, *, sources: Optional[Mapping[str, Any]] = None,
                 decisions: Any = (), warnings: Any = (), **values: Any) -> None:
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:
            raise ConfigError(f"ServerArgs got unknown fields {clip(str(unknown))}; valid: "
                              f"{', '.join(FIELD_NAMES)}")
        srcs = _sources(sources)
        for spec in FIELDS:  # our messages first; pydantic's strict types are the second net
            if spec.name in values:
                spec.check(values[spec.name], describe(spec.name, values[spec.name], srcs[spec.name]))
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(f"ServerArgs: {clip(str(exc), 300)}") from None
        if isinstance(decisions, (str, bytes)) or not all(isinstance(d, Decision) for d in decisions):
            raise ConfigError(f"decisions must be Decision objects, got {shown(decisions)}")
        if isinstance(warnings, (str, bytes)) or not all(isinstance(w, str) for w in warnings):
            raise ConfigError(f"warnings must be a sequence of text, got {shown(warnings)}")
        self._sources = srcs
        self._decisions = tuple(decisions)
        self._warnings = tuple(warnings)
        validate(self.values(), srcs)

    # ---- provenance --------------------------------------------------------------------------

    @property
    def sources(self) -> Mapping[str, Source]:
        """Where each field's value came from (read-only)."""
        return self._sources

    @property
    def decisions(self) -> Tuple[Decision, ...]:
        """The automatic changes, in order."""
        return self._decisions

    @property
    def warnings(self) -> Tuple[str, ...]:
        """Messages for the user."""
        return self._warnings

    # ---- values ------------------------------------------------------------------------------

    def values(self) -> Dict[str, Any]:
        """The resolved fields, in declaration order."""
        return {name: getattr(self, name) for name in FIELD_NAMES}

    # ---- the backend -------------------------------------------------------------------------

    @property
    def backend_spec(self) -> BackendSpec:
        """The selected backend's registered spec."""
        return backend_spec(self.moe_a2a_backend, f"--moe-a2a-backend {self.moe_a2a_backend}")

    @property
    def backend_settings(self) -> BackendSettings:
        """The backend's typed settings (an instance of ``spec.settings``), built from the
        fields its spec maps (``spec.settings_fields``); JSON-object fields arrive parsed."""
        return build_settings(self.backend_spec, self.values())

    @property
    def deepep_config_dict(self) -> Optional[dict]:
        """``deepep_config`` parsed (resolve already inlined a file's contents)."""
        return None if self.deepep_config is None else json.loads(self.deepep_config)

    # ---- sizes and rank layout ---------------------------------------------------------------

    @property
    def layout(self) -> ParallelLayout:
        """The rank layout of this job (``moe_a2a.server_args.layout``)."""
        return ParallelLayout.from_server_args(self)

    @property
    def attn_dp_size(self) -> int:
        """DP-attention groups: dp_size under DP attention, else 1."""
        return self.dp_size if self.enable_dp_attention else 1

    @property
    def attn_tp_size(self) -> int:
        """Ranks of one attention-TP group."""
        return self.layout.attn_tp_size

    @property
    def moe_tp_size(self) -> int:
        """Ranks that split one expert by its intermediate dimension."""
        return self.layout.moe_tp_size

    def attn_dp_rank(self, rank: int) -> int:
        """Which attention-DP group ``rank`` is in."""
        return self.layout.attn_dp_rank(rank)

    def attn_tp_rank(self, rank: int) -> int:
        """``rank``'s position in its attention-TP group."""
        return self.layout.attn_tp_rank(rank)

    def moe_ep_rank(self, rank: int) -> int:
        """Which expert group ``rank`` serves."""
        return self.layout.moe_ep_rank(rank)

    def moe_tp_rank(self, rank: int) -> int:
        """``rank``'s slice of the intermediate dimension in its expert group."""
        return self.layout.moe_tp_rank(rank)

    def kernel_tokens(self, tokens_per_dp_rank: int) -> int:
        """The most tokens one rank's kernel receives from a DP rank's batch (scattered
        backends split it over the attention-TP ranks)."""
        return self.layout.split(tokens_per_dp_rank, self.backend_spec.token_layout == "scattered")

    # ---- explanation and transport -----------------------------------------------------------

    def derived(self) -> Dict[str, Any]:
        """Sizes and per-rank figures derived from the fields (``moe-a2a config``'s ``derived``).

        ``prefill_tokens_per_dp_rank``: a DP rank's prefill chunk (``--chunked-prefill-size`` is
        global, divided over DP ranks under DP attention, as in SGLang);
        ``prefill_tokens_per_kernel_rank``: what one rank's kernel receives of it. None when
        chunked prefill is unset or off.
        """
        chunk = prefill_tokens_per_dp_rank(self.values(), self.attn_dp_size)
        return {**self.layout.sizes(),
                "prefill_tokens_per_dp_rank": chunk,
                "prefill_tokens_per_kernel_rank": None if chunk is None else self.kernel_tokens(chunk)}

    def capacities(self) -> List[Dict[str, Any]]:
        """Each capacity of the backend's current mode with the largest per-rank batch it must
        hold (rule 9), as checked: ``field`` (None when the backend fixes it), ``capacity``,
        ``batches`` (all, decode, captured), ``over_capacity``, ``largest_batch_per_rank`` and
        ``largest_batch_from`` (None when no batch limit was given)."""
        view = View(self.values(), self.sources, self.backend_spec)
        out: List[Dict[str, Any]] = []
        for check in capacity_checks(view):
            largest = max(check.batches, key=lambda b: b.tokens, default=None)
            out.append({
                "field": check.field, "setting": check.rule.setting, "capacity": check.capacity,
                "batches": check.rule.batches, "over_capacity": check.rule.over_capacity,
                "largest_batch_per_rank": None if largest is None else largest.tokens,
                "largest_batch_from": None if largest is None else largest.shown})
        return out

    def explain(self) -> Dict[str, Any]:
        """The ``moe-a2a config --json`` object: ``to_json``'s, plus what was derived and checked
        (so a launcher can hand the command's output to ``from_json`` unchanged)."""
        return {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "args": self.values(),
            "decisions": [d.to_dict() for d in self.decisions],
            "warnings": list(self.warnings),
            "sources": {name: str(source) for name, source in self.sources.items()},
            "derived": self.derived(),
            "capacities": self.capacities(),
        }

    def to_json(self) -> str:
        """Everything a worker needs; ``from_json`` rebuilds an equal object."""
        return json.dumps({
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "args": self.values(),
            "sources": {name: str(source) for name, source in self.sources.items()},
            "decisions": [d.to_dict() for d in self.decisions],
            "warnings": list(self.warnings),
        })

    @classmethod
    def from_json(cls, text: str) -> "ServerArgs":
        """Rebuild from ``to_json`` output: validates, but reads no environment and changes nothing."""
        from moe_a2a.server_args.transport import parse_server_args_json

        return cls(**parse_server_args_json(text))

    # ---- value semantics ---------------------------------------------------------------------

    def __hash__(self) -> int:
        return hash((tuple(self.values().items()), self._decisions, self._warnings,
                     tuple(self._sources.items())))

    def __reduce__(self):
        # pickle (multiprocessing, spawn) through the JSON form: one wire format
        return (ServerArgs.from_json, (self.to_json(),))

    def __copy__(self) -> "ServerArgs":
        return self  # immutable: a copy is the same value

    def __deepcopy__(self, memo: Optional[dict] = None) -> "ServerArgs":
        return self
