"""``ServerArgs``: the frozen, validated result of ``resolve`` (and what workers receive)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple

from moe_a2a.backends.spec import BackendSpec
from moe_a2a.server_args.errors import ConfigError
from moe_a2a.server_args.fields import FIELD_NAMES
from moe_a2a.server_args.validate import backend_spec, validate

JSON_FORMAT = "moe-a2a/server-args"
JSON_VERSION = 1


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
        return {"field": self.field, "from": self.from_, "to": self.to, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Decision":
        try:
            return cls(field=data["field"], from_=data["from"], to=data["to"], reason=data["reason"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"server args JSON: decision {data!r} lacks {exc}; fix: send the "
                              f"output of ServerArgs.to_json() unchanged") from None

    def __str__(self) -> str:
        from moe_a2a.server_args.fields import format_value

        return f"{self.field}: {format_value(self.from_)} -> {format_value(self.to)} ({self.reason})"


@dataclass(frozen=True, kw_only=True)
class ServerArgs:
    """Resolved server arguments. Build with :func:`moe_a2a.server_args.resolve`; never mutated.

    Fields are named as the flags (``--ep-size`` -> ``ep_size``); see ``moe_a2a.server_args.fields``
    for types, defaults and meaning. Every instance is valid: construction runs every check
    (``from_json`` too) but no auto-configuration, and never reads the environment.

    Attributes beyond the fields:
        decisions: automatic changes, in the order they were made.
        sources: where each field's value came from: ``default``, ``legacy_env:<VAR>``,
            ``env:<VAR>``, ``cli``, ``kwargs`` or ``auto``.
        warnings: messages for the user (deprecations, flags without effect, conflicts).
    """

    moe_a2a_backend: str
    tp_size: int
    dp_size: int
    ep_size: int
    enable_dp_attention: bool
    deepep_mode: str
    deepep_config: Optional[str]
    deepep_num_max_dispatch_tokens_per_rank: int
    enable_deepep_waterfill: bool
    deepep_waterfill_dynamic: bool
    mega_moe_num_max_tokens_per_rank: int
    mega_moe_fix_memory: bool
    disable_shared_experts_fusion: bool
    enforce_shared_experts_fusion: bool
    enable_return_routed_experts: bool
    routed_experts_gather: str
    enable_eplb: bool
    ep_num_redundant_experts: int
    eplb_algorithm: str
    ep_dispatch_algorithm: Optional[str]
    init_expert_location: str
    expert_distribution_recorder_mode: Optional[str]
    expert_distribution_recorder_buffer_size: Optional[int]
    eplb_rebalance_num_iterations: int
    disable_cuda_graph: bool
    cuda_graph_max_bs: Optional[int]
    chunked_prefill_size: Optional[int]
    max_running_requests: Optional[int]

    decisions: Tuple[Decision, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)
    warnings: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(FIELD_NAMES))
        if unknown:
            raise ConfigError(f"sources name unknown fields {unknown}; valid: {', '.join(FIELD_NAMES)}")
        sources = {name: str(self.sources.get(name, "default")) for name in FIELD_NAMES}
        object.__setattr__(self, "sources", MappingProxyType(sources))
        object.__setattr__(self, "decisions", tuple(self.decisions))
        object.__setattr__(self, "warnings", tuple(str(w) for w in self.warnings))
        for decision in self.decisions:
            if not isinstance(decision, Decision):
                raise ConfigError(f"decisions must be Decision objects, got {decision!r}")
        validate(self.values(), sources)

    # ---- values ------------------------------------------------------------------------------

    def values(self) -> Dict[str, Any]:
        """The resolved fields, in table order."""
        return {name: getattr(self, name) for name in FIELD_NAMES}

    # ---- derived sizes and rank layout (same as moe.parallel.ParallelSizes) -------------------

    @property
    def backend_spec(self) -> BackendSpec:
        return backend_spec(self.moe_a2a_backend, f"--moe-a2a-backend {self.moe_a2a_backend}")

    @property
    def attn_dp_size(self) -> int:
        """DP-attention groups: dp_size under DP attention, else 1."""
        return self.dp_size if self.enable_dp_attention else 1

    @property
    def attn_tp_size(self) -> int:
        """Ranks of one attention-TP group."""
        return self.tp_size // self.attn_dp_size

    @property
    def moe_tp_size(self) -> int:
        """Ranks that split one expert by its intermediate dimension."""
        return self.tp_size // self.ep_size

    @property
    def backend_settings(self) -> Any:
        """The backend's typed settings (``spec.settings``), built from the fields its spec
        maps (``spec.settings_fields``); a JSON-text field becomes the object it holds."""
        spec = self.backend_spec
        values = {}
        for attr, field_name in spec.settings_fields.items():
            value = getattr(self, field_name)
            if field_name == "deepep_config" and value is not None:
                value = json.loads(value)
            values[attr] = value
        try:
            return spec.settings(**values)
        except Exception as exc:  # pydantic's ValidationError: a registration mismatch
            raise ConfigError(
                f"backend {spec.name}: its settings {spec.settings.__name__} reject the resolved "
                f"values {values}: {exc}; fix: the backend's settings_fields must map "
                f"compatible server arguments") from None

    @property
    def deepep_config_dict(self) -> Optional[dict]:
        """``deepep_config`` parsed (resolve already inlined a file's contents)."""
        return None if self.deepep_config is None else json.loads(self.deepep_config)

    def _rank(self, rank: int) -> int:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.tp_size:
            raise ConfigError(f"rank {rank!r} is outside 0..{self.tp_size - 1} (tp_size="
                              f"{self.tp_size}); fix: pass a rank of this job")
        return rank

    def attn_dp_rank(self, rank: int) -> int:
        return self._rank(rank) // self.attn_tp_size

    def attn_tp_rank(self, rank: int) -> int:
        return self._rank(rank) % self.attn_tp_size

    def moe_ep_rank(self, rank: int) -> int:
        return self._rank(rank) // self.moe_tp_size

    def moe_tp_rank(self, rank: int) -> int:
        return self._rank(rank) % self.moe_tp_size

    # ---- explanation and transport -----------------------------------------------------------

    def derived(self) -> Dict[str, int]:
        return {"attn_dp_size": self.attn_dp_size, "attn_tp_size": self.attn_tp_size,
                "moe_tp_size": self.moe_tp_size}

    def explain(self) -> Dict[str, Any]:
        """The ``moe-a2a config --json`` object."""
        return {
            "args": self.values(),
            "decisions": [d.to_dict() for d in self.decisions],
            "warnings": list(self.warnings),
            "sources": dict(self.sources),
            "derived": self.derived(),
        }

    def to_json(self) -> str:
        """Everything a worker needs; ``from_json`` rebuilds an equal object."""
        return json.dumps({
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "args": self.values(),
            "sources": dict(self.sources),
            "decisions": [d.to_dict() for d in self.decisions],
            "warnings": list(self.warnings),
        })

    def __reduce__(self):
        # pickle (multiprocessing, spawn) through the JSON form: the read-only sources mapping
        # does not pickle, and this keeps one wire format
        return (ServerArgs.from_json, (self.to_json(),))

    @classmethod
    def from_json(cls, text: str) -> "ServerArgs":
        """Rebuild from ``to_json`` output: validates, but reads no environment and changes nothing."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"server args JSON is not valid JSON ({exc}); fix: send the output "
                              f"of ServerArgs.to_json() unchanged") from None
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise ConfigError(f"server args JSON lacks \"format\": {JSON_FORMAT!r}; fix: send the "
                              f"output of ServerArgs.to_json() unchanged")
        if data.get("version") != JSON_VERSION:
            raise ConfigError(f"server args JSON has version {data.get('version')!r}; this moe-a2a "
                              f"reads version {JSON_VERSION}; fix: use the same moe-a2a release "
                              f"on the launcher and the workers")
        args = data.get("args")
        if not isinstance(args, dict) or set(args) != set(FIELD_NAMES):
            got = set(args) if isinstance(args, dict) else set()
            raise ConfigError(
                f"server args JSON: args must have exactly the fields of this release; missing "
                f"{sorted(set(FIELD_NAMES) - got)}, unknown {sorted(got - set(FIELD_NAMES))}; fix: "
                f"use the same moe-a2a release on the launcher and the workers"
            )
        return cls(
            **args,
            sources=data.get("sources", {}),
            decisions=tuple(Decision.from_dict(d) for d in data.get("decisions", ())),
            warnings=tuple(data.get("warnings", ())),
        )


def _check_class_matches_table() -> None:
    """The dataclass attributes and the field table name the same fields in the same order."""
    names = tuple(f.name for f in fields(ServerArgs))[: len(FIELD_NAMES)]
    if names != FIELD_NAMES:
        raise RuntimeError(f"ServerArgs fields {names} differ from the field table {FIELD_NAMES}")


_check_class_matches_table()  # cheap and import-time: a mismatch is a bug in this package
