"""The field table: one declarative list that drives argparse, env parsing, JSON and the docs.

Each :class:`FieldSpec` names a server argument once. Its command-line flag is
``--<name with dashes>`` (plus ``aliases``), its environment variable ``MOE_A2A_<NAME>``
(the one canonical spelling), its JSON key the name itself. Field-local checks (type,
choices, range) live here too; checks across fields live in :mod:`moe_a2a.server_args.validate`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from moe_a2a.backends.spec import BackendSpec, normalize_name
from moe_a2a.server_args.errors import REMOVAL_RELEASE, ConfigError

ENV_PREFIX = "MOE_A2A_"
BOOL_TRUE = ("1", "true", "yes", "on")
BOOL_FALSE = ("0", "false", "no", "off")
BOOL_SPELLINGS = "1/0, true/false, yes/no, on/off (any case)"
DEEPEP_MODES = ("normal", "low_latency", "auto")

# "applies" predicates: given the resolved values and the backend spec, does the field matter?
# A field set explicitly where it does not apply earns a warning (never a silent no-op).
Applies = Callable[[Mapping[str, Any], BackendSpec], bool]


def _has_modes(values: Mapping[str, Any], spec: BackendSpec) -> bool:
    return tuple(spec.modes) != ("default",)


def _has_low_latency(values: Mapping[str, Any], spec: BackendSpec) -> bool:
    return "low_latency" in spec.modes


def _fused(values: Mapping[str, Any], spec: BackendSpec) -> bool:
    return spec.fused_experts


def _waterfill(values: Mapping[str, Any], spec: BackendSpec) -> bool:
    return bool(values["enable_deepep_waterfill"])


def _dp_attention_or_one(values: Mapping[str, Any], spec: BackendSpec) -> bool:
    return bool(values["enable_dp_attention"]) or values["dp_size"] == 1


def _capturing(values: Mapping[str, Any], spec: BackendSpec) -> bool:
    return bool(values["enable_return_routed_experts"])


@dataclass(frozen=True)
class FieldSpec:
    """One server argument.

    Attributes:
        name: snake_case name: attribute of ``ServerArgs``, JSON key, keyword argument.
        type: ``bool``, ``int`` or ``str``.
        default: built-in default (``None`` only when ``nullable``).
        help: one line for ``--help`` and the docs (the default is appended automatically).
        aliases: extra flag spellings (SGLang's).
        choices: allowed values of a ``str`` field (``None``: free text or checked elsewhere).
        nullable: ``None`` is a valid value ("unset").
        min, max: inclusive range of an ``int`` field; ``special`` lists allowed outliers (-1).
        group: section of ``--help`` and of the docs.
        applies: when the field has an effect; ``applies_text`` says it in words.
        auto: how auto-configuration may change it (docs).
        metavar: placeholder in ``--help``.
        ident: identifier-like text (normalised like backend names) even without ``choices``.
        none_value: what ``None`` means for a field that cannot be unset (backend: "none").
    """

    name: str
    type: type
    default: Any
    help: str
    aliases: Tuple[str, ...] = ()
    choices: Optional[Tuple[str, ...]] = None
    nullable: bool = False
    min: Optional[int] = None
    max: Optional[int] = None
    special: Tuple[int, ...] = ()
    group: str = "parallelism"
    applies: Optional[Applies] = None
    applies_text: str = ""
    auto: str = ""
    metavar: Optional[str] = None
    ident: bool = False
    none_value: Optional[str] = None

    @property
    def is_ident(self) -> bool:
        """Identifier-like text: compared after lower-casing and ``-`` -> ``_``."""
        return self.ident or self.choices is not None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> Tuple[str, ...]:
        return (self.flag,) + self.aliases

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def type_text(self) -> str:
        if self.choices:
            text = " | ".join(self.choices)
        else:
            text = self.type.__name__
        return f"{text} or unset" if self.nullable else text

    @property
    def range_text(self) -> str:
        if self.min is None and self.max is None:
            return ""
        low = "" if self.min is None else str(self.min)
        high = "" if self.max is None else str(self.max)
        if self.max is None:
            text = f">= {low}"
        elif self.min is None:
            text = f"<= {high}"
        else:
            text = f"{low}..{high}"
        if self.special:
            text += " or " + " or ".join(str(v) for v in self.special)
        return text

    def default_text(self) -> str:
        return format_value(self.default) if self.default is not None else "unset"

    # ---- conversion ------------------------------------------------------------------------

    def convert(self, value: Any, given: str) -> Any:
        """Turn text (env, command line) or a Python value (keywords) into this field's type.

        ``given`` shows the user what was read, e.g. ``"MOE_A2A_TP_SIZE='x'"``; it starts
        every error message. The result also passes :meth:`check`.
        """
        if value is None and self.none_value is not None:
            value = self.none_value
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{given}: {self.name} cannot be unset; fix: give a {self.type_text}")
        if self.type is bool:
            value = _to_bool(value, given)
        elif self.type is int:
            value = _to_int(value, given, self)
        else:
            value = _to_str(value, given, self)
        self.check(value, given)
        return value

    def check(self, value: Any, given: str) -> None:
        """Field-local invariants of an already converted value (also run on JSON input)."""
        if value is None:
            if not self.nullable:
                raise ConfigError(f"{given}: {self.name} cannot be unset; fix: give a {self.type_text}")
            return
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(
                f"{given}: {self.name} must be of type {self.type.__name__}, got "
                f"{type(value).__name__} {value!r}; fix: give a {self.type_text}"
            )
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{given}: {value!r} is not a valid {self.name}; choose one of "
                f"{', '.join(self.choices)}"
            )
        if self.type is int and value not in self.special:
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise ConfigError(
                    f"{given}: {self.name}={value} is out of range; it must be {self.range_text}; "
                    f"fix: pass {self.flag} with a value in that range"
                )


def format_value(value: Any) -> str:
    """How a value is shown in messages, tables and docs."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _to_bool(value: Any, given: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in BOOL_TRUE:
            return True
        if text in BOOL_FALSE:
            return False
    raise ConfigError(f"{given} is not a boolean; fix: use one of {BOOL_SPELLINGS}")


def _to_int(value: Any, given: str, spec: FieldSpec) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    rng = f" ({spec.range_text})" if spec.range_text else ""
    raise ConfigError(f"{given} is not an integer; fix: give a whole number{rng}, e.g. {spec.flag} "
                      f"{spec.default if spec.default is not None else 8}")


def _to_str(value: Any, given: str, spec: FieldSpec) -> str:
    if isinstance(value, enum.Enum) and isinstance(value.value, str):  # MoeA2ABackend.DEEPEP
        value = value.value
    if not isinstance(value, str):
        raise ConfigError(f"{given}: {spec.name} must be text, got {type(value).__name__}; "
                          f"fix: give a {spec.type_text}")
    if spec.is_ident:
        return normalize_name(value)  # "Low-Latency" -> "low_latency", like backend names
    return value


F = FieldSpec

FIELDS: Tuple[FieldSpec, ...] = (
    # ---- backend ---------------------------------------------------------------------------
    F("moe_a2a_backend", str, "none", group="backend", metavar="NAME", ident=True,
      none_value="none",
      help="MoE all-to-all backend: any registered name (built-ins: none, alltoall, deepep, "
           "megamoe; see `moe-a2a backends`)",
      auto="megamoe from legacy SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE; deepep from "
           "--enable-deepep-waterfill"),
    # ---- parallelism -----------------------------------------------------------------------
    F("tp_size", int, 1, aliases=("--tensor-parallel-size", "--tp"), min=1, metavar="N",
      help="tensor-parallel size: the number of ranks of one MoE layer"),
    F("dp_size", int, 1, aliases=("--data-parallel-size", "--dp"), min=1, metavar="N",
      help="attention data-parallel size (takes effect with --enable-dp-attention)",
      applies=_dp_attention_or_one, applies_text="with --enable-dp-attention"),
    F("ep_size", int, 1, aliases=("--expert-parallel-size", "--ep"), min=1, metavar="N",
      help="expert-parallel size; derived as tp_size when the backend's ep_policy is 'tp'",
      auto="tp_size for backends whose ep_policy is 'tp' (alltoall, deepep, megamoe)"),
    F("enable_dp_attention", bool, False,
      help="data-parallel attention: dp_size groups of tp_size/dp_size ranks each",
      auto="false when dp_size is 1"),
    # ---- DeepEP ----------------------------------------------------------------------------
    F("deepep_mode", str, "auto", group="deepep", metavar="MODE", ident=True,
      help="DeepEP mode: normal, low_latency or auto (normal for prefill batches, low_latency "
           "otherwise); must be one of the backend's modes",
      applies=_has_modes, applies_text="with a backend that has modes (deepep)"),
    F("deepep_config", str, None, nullable=True, group="deepep", metavar="JSON|PATH",
      help="DeepEP buffer configs: JSON text or a path to a JSON file (read at resolve time; "
           "workers get the text)",
      applies=_has_modes, applies_text="with a backend that has modes (deepep)"),
    F("deepep_num_max_dispatch_tokens_per_rank", int, 128, min=1, max=1024, group="deepep",
      metavar="N",
      help="DeepEP low-latency capacity: the most tokens one rank dispatches per step",
      applies=_has_low_latency, applies_text="with a backend that has a low_latency mode (deepep)"),
    F("enable_deepep_waterfill", bool, False, group="deepep",
      help="waterfill: send each token's shared-expert work to the least-loaded rank; forces "
           "--moe-a2a-backend deepep and shared-experts fusion"),
    F("deepep_waterfill_dynamic", bool, False, group="deepep",
      help="waterfill in dynamic mode (one small all-reduce of the loads per layer) instead of "
           "static (local counts)",
      applies=_waterfill, applies_text="with --enable-deepep-waterfill"),
    # ---- Mega-MoE --------------------------------------------------------------------------
    F("mega_moe_num_max_tokens_per_rank", int, 1024, min=1, group="megamoe", metavar="N",
      help="Mega-MoE capacity: batches with more tokens per rank fall back to the standard path",
      applies=_fused, applies_text="with a fused-experts backend (megamoe)"),
    F("mega_moe_fix_memory", bool, False, group="megamoe",
      help="share expert weights between the fused Mega-MoE path and its standard fallback",
      applies=_fused, applies_text="with a fused-experts backend (megamoe)",
      auto="true with a fused-experts backend (megamoe) unless set"),
    # ---- shared experts --------------------------------------------------------------------
    F("disable_shared_experts_fusion", bool, False, group="shared experts",
      help="keep shared experts separate (exclusive with --enforce-shared-experts-fusion)"),
    F("enforce_shared_experts_fusion", bool, False, group="shared experts",
      help="fuse shared experts as extra top-k columns (exclusive with "
           "--disable-shared-experts-fusion)",
      auto="true with --enable-deepep-waterfill"),
    # ---- routed experts capture (R3) -------------------------------------------------------
    F("enable_return_routed_experts", bool, False, group="routed experts",
      help="capture the router's logical expert ids per token (rollout routing replay)"),
    F("routed_experts_gather", str, "auto", choices=("auto", "early", "late", "none"),
      group="routed experts", metavar="MODE",
      help="how captured ids are gathered across attention-TP ranks: early (per layer, "
           "graph-capturable), late (once per step), none (replicated layout), auto",
      applies=_capturing, applies_text="with --enable-return-routed-experts",
      auto="none when no gather is needed, else early (late when CUDA graphs are off)"),
    # ---- EPLB ------------------------------------------------------------------------------
    F("enable_eplb", bool, False, group="eplb",
      help="expert-parallel load balancing (needs ep_size > 1)"),
    F("ep_num_redundant_experts", int, 0, min=0, group="eplb", metavar="N",
      help="extra physical expert slots for replicas of hot experts"),
    F("eplb_algorithm", str, "auto", choices=("auto", "deepseek", "deepseek_hierarchical"),
      group="eplb", metavar="ALGO", help="rebalance algorithm"),
    F("ep_dispatch_algorithm", str, None, nullable=True, choices=("static", "dynamic"),
      group="eplb", metavar="ALGO",
      help="which replica a token goes to: static (nearest, deterministic) or dynamic (random)",
      auto="static when EPLB is on and it is unset"),
    F("init_expert_location", str, "trivial", group="eplb", metavar="SPEC",
      help="initial expert placement: trivial, JSON text, or a .json/.pt file with "
           "physical_to_logical_map or logical_count"),
    F("expert_distribution_recorder_mode", str, None, nullable=True,
      choices=("stat", "per_pass", "per_token"), group="eplb", metavar="MODE",
      help="expert-load recorder mode",
      auto="stat when EPLB is on and it is unset"),
    F("expert_distribution_recorder_buffer_size", int, None, nullable=True, min=1, special=(-1,),
      group="eplb", metavar="N", help="recorder buffer size in steps (-1 = unbounded)"),
    F("eplb_rebalance_num_iterations", int, 1000, min=1, group="eplb", metavar="N",
      help="steps between rebalances"),
    # ---- batch limits ----------------------------------------------------------------------
    F("disable_cuda_graph", bool, False, group="batch limits",
      help="do not capture CUDA graphs",
      auto="true when the backend's mode cannot be captured (deepep normal, alltoall)"),
    F("cuda_graph_max_bs", int, None, nullable=True, min=1, group="batch limits", metavar="N",
      help="largest batch per DP rank captured in a CUDA graph (checked against capacities)"),
    F("chunked_prefill_size", int, None, nullable=True, min=1, special=(-1,),
      group="batch limits", metavar="N",
      help="prefill chunk in tokens per DP rank, -1 = off (checked against capacities)"),
    F("max_running_requests", int, None, nullable=True, min=1, group="batch limits",
      metavar="N", help="most requests decoded at once over all DP ranks (checked against "
                        "capacities)"),
)

FIELDS_BY_NAME: Dict[str, FieldSpec] = {f.name: f for f in FIELDS}
FIELD_NAMES: Tuple[str, ...] = tuple(FIELDS_BY_NAME)
FIELDS_BY_ENV: Dict[str, FieldSpec] = {f.env: f for f in FIELDS}


# ---- legacy SGLang names ---------------------------------------------------------------------

@dataclass(frozen=True)
class LegacyVar:
    """A legacy SGLang environment variable and what it means here.

    ``value`` maps the parsed variable to the field's value (``None``: the variable does not
    set the field, e.g. the megamoe switch set to 0).
    """

    var: str
    type: type
    field: str
    replacement: str
    meaning: str
    value: Callable[[Any], Any] = lambda v: v


@dataclass(frozen=True)
class LegacyFlag:
    """A legacy SGLang boolean flag (``store_true``)."""

    name: str
    replacement: str
    meaning: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


LEGACY_VARS: Tuple[LegacyVar, ...] = (
    LegacyVar("SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE", bool, "moe_a2a_backend",
              "--moe-a2a-backend megamoe",
              "selects megamoe when no backend is given explicitly",
              value=lambda on: "megamoe" if on else None),
    LegacyVar("SGLANG_OPT_FIX_MEGA_MOE_MEMORY", bool, "mega_moe_fix_memory",
              "--mega-moe-fix-memory / --no-mega-moe-fix-memory",
              "megamoe weight sharing between the fused and fallback paths"),
    LegacyVar("SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK", int,
              "mega_moe_num_max_tokens_per_rank", "--mega-moe-num-max-tokens-per-rank",
              "Mega-MoE capacity per rank"),
    LegacyVar("SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK", int,
              "deepep_num_max_dispatch_tokens_per_rank",
              "--deepep-num-max-dispatch-tokens-per-rank", "DeepEP low-latency capacity"),
    LegacyVar("SGLANG_DISABLE_STATIC_WATERFILL", bool, "deepep_waterfill_dynamic",
              "--deepep-waterfill-dynamic", "waterfill in dynamic mode"),
)

LEGACY_FLAGS: Tuple[LegacyFlag, ...] = (
    LegacyFlag("enable_deepep_moe", "--moe-a2a-backend deepep", "same as --moe-a2a-backend deepep"),
    LegacyFlag("enable_ep_moe", "--ep-size <tp_size>", "same as --ep-size <tp_size>"),
)
LEGACY_FLAG_NAMES: Tuple[str, ...] = tuple(f.name for f in LEGACY_FLAGS)


def deprecation_message(old: str, replacement: str) -> str:
    return (f"{old} is deprecated and will be removed in {REMOVAL_RELEASE}: "
            f"use {replacement} instead")


def describe(name: str, value: Any, source: str) -> str:
    """Where a value came from, as the user wrote it: ``--ep-size 4``, ``MOE_A2A_EP_SIZE=4`` ...

    Error messages start with this, so users see the flag or variable they have to change.
    """
    spec = FIELDS_BY_NAME[name]
    if source == "cli":
        if spec.type is bool:
            return spec.flag if value else "--no-" + spec.flag[2:]
        return f"{spec.flag} {format_value(value)}"
    if source.startswith("env:"):
        return f"{source[4:]}={format_value(value)}"
    if source.startswith("legacy_env:"):
        return f"{name}={format_value(value)} (from {source[len('legacy_env:'):]})"
    if source == "kwargs":
        return f"{name}={value!r}"
    if source == "auto":
        return f"{name}={format_value(value)} (auto-configured)"
    return f"{name}={format_value(value)} (default)"


def is_explicit(source: str) -> bool:
    """Given by the user on purpose: command line, keywords or a ``MOE_A2A_*`` variable."""
    return source in ("cli", "kwargs") or source.startswith("env:")


def is_set(source: str) -> bool:
    """Explicit, or from a legacy variable: anything but a default or an automatic change."""
    return is_explicit(source) or source.startswith("legacy_env:")
