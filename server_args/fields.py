"""The field declaration: every server argument declared once, in ``ServerArgsFields``.

Each field is a pydantic field whose ``Annotated`` metadata is an :class:`Arg`: help, docs
group, flag aliases, legacy SGLang variables, when it applies, its range and choices.
Everything else is derived from that one declaration: :data:`FIELDS` (one :class:`FieldSpec`
per field) drives argparse (``cli``), the environment (``MOE_A2A_<NAME>``, ``sources``), JSON
(``model``) and the generated blocks of docs/configuration.md (``docs``). Field-local checks
(type, choices, range) live here too; checks across fields live in ``validate``.
"""

from __future__ import annotations

import enum
import json
import typing
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from types import MappingProxyType
from typing import Annotated, Any, Callable, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict

from moe_a2a.backends.spec import BackendSpec, normalize_name
from moe_a2a.server_args.errors import REMOVAL_RELEASE, ConfigError, clip, shown
from moe_a2a.server_args.sources import ENV_PREFIX, Source, SourceKind

BOOL_TRUE: Tuple[str, ...] = ("1", "true", "yes", "on")
BOOL_FALSE: Tuple[str, ...] = ("0", "false", "no", "off")
BOOL_SPELLINGS = "1/0, true/false, yes/no, on/off (any case)"
# SGLang's own boolean variables also take y/n: legacy variables accept every spelling of both.
LEGACY_BOOL_TRUE: Tuple[str, ...] = BOOL_TRUE + ("y",)
LEGACY_BOOL_FALSE: Tuple[str, ...] = BOOL_FALSE + ("n",)
LEGACY_BOOL_SPELLINGS = "1/0, true/false, yes/no, on/off, y/n (any case)"

# The generic mode flag. A backend names the field that holds its mode through
# ``spec.mode_setting``/``settings_fields``; a backend with modes but no settings takes its mode
# from this flag, as SGLang's --deepep-mode also selects MORI's mode.
MODE_FIELD = "deepep_mode"
DEEPEP_MODES: Tuple[str, ...] = ("normal", "low_latency", "auto")

Values = Mapping[str, Any]


class Kind(str, enum.Enum):
    """How a field's text is converted and what it holds."""

    BOOL = "bool"
    INT = "int"
    TEXT = "text"
    NAME = "name"                # normalised like a backend name: "Low-Latency" -> "low_latency"
    JSON_OBJECT = "json_object"  # JSON object text; backend settings receive the parsed object


@dataclass(frozen=True)
class When:
    """When a field has an effect; set where it has none, it earns a warning."""

    test: Callable[[Values, BackendSpec], bool]
    text: str  # completes "it only applies ..."


@dataclass(frozen=True)
class Legacy:
    """A legacy SGLang environment variable that sets a field (deprecated here).

    Attributes:
        var: the ``SGLANG_*`` name (SGLang's older ``SGL_*`` spelling is honoured too).
        meaning: what it does here, for the docs and the deprecation message.
        bool_switch: the variable is a boolean that, when true, sets the field to this value
            (``SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE=1`` → backend ``megamoe``); false sets nothing.
        replacement: the flag to use instead (default: the field's flag).
        version: the SGLang release it was taken from.
    """

    var: str
    meaning: str
    bool_switch: Any = None
    replacement: Optional[str] = None
    version: str = "0.5.14"


@dataclass(frozen=True)
class Arg:
    """A field's declaration beyond its type and default (``Annotated`` metadata).

    Attributes:
        help: one line for ``--help`` and the docs.
        group: the docs and ``--help`` section.
        aliases: further flags (SGLang's spellings).
        kind: overrides the kind the annotation implies (``NAME``, ``JSON_OBJECT``).
        choices: the values moe-a2a accepts (text fields).
        sglang_only: values SGLang accepts that moe-a2a does not provide: they get a specific
            "known from SGLang" message instead of "not a valid value".
        min, max, special: the integer range, and values allowed outside it (``-1``).
        metavar: the placeholder in ``--help``.
        none_value: what ``None`` given as a keyword means (``moe_a2a_backend=None`` is none).
        backend_setting: the field is a backend knob: it applies when the selected backend's
            settings read it (``spec.settings_fields``), and is its settings' value.
        applies: when it applies otherwise (None: always).
        auto: how auto-configuration may change it (docs).
        legacy: legacy SGLang variables that set it.
    """

    help: str
    group: str = "parallelism"
    aliases: Tuple[str, ...] = ()
    kind: Optional[Kind] = None
    choices: Optional[Tuple[str, ...]] = None
    sglang_only: Tuple[str, ...] = ()
    min: Optional[int] = None
    max: Optional[int] = None
    special: Tuple[int, ...] = ()
    metavar: Optional[str] = None
    none_value: Any = None
    backend_setting: bool = False
    applies: Optional[When] = None
    auto: Optional[str] = None
    legacy: Tuple[Legacy, ...] = ()


def _dp_attention_or_one(values: Values, spec: BackendSpec) -> bool:
    return bool(values["enable_dp_attention"]) or values["dp_size"] == 1


def _waterfill(values: Values, spec: BackendSpec) -> bool:
    return bool(values["enable_deepep_waterfill"])


def _capturing(values: Values, spec: BackendSpec) -> bool:
    return bool(values["enable_return_routed_experts"])


def _recording(values: Values, spec: BackendSpec) -> bool:
    return values["expert_distribution_recorder_mode"] is not None


# SGLang's MoE runners that moe-a2a does not provide (0.5.14 and 0.5.23 choices).
SGLANG_ONLY_RUNNERS = (
    "deep_gemm",  # DeepGEMM's grouped GEMMs: not built here (its wheels do not load on torch 2.11)
    "triton", "triton_kernel", "flashinfer_trtllm", "experimental_sgl_trtllm",
    "flashinfer_trtllm_routed", "flashinfer_cutlass", "flashinfer_mxfp4", "flashinfer_cutedsl",
    "flashinfer_megamoe", "cutlass", "aiter", "marlin", "humming", "experimental_sgl_marlin",
    "lora_cutedsl", "lora_triton", "lora_marlin", "hpc_ops", "intel_xpu")
# 0.5.23's --moe-runner-backend megamoe: an alias of --moe-a2a-backend megamoe (resolved away).
RUNNER_SELECTS_BACKEND = "megamoe"


class ServerArgsFields(BaseModel):
    """The declaration of every server argument (``ServerArgs`` adds behaviour, not fields).

    Field order is the order of tables, JSON and ``--help``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    # ---- backend -------------------------------------------------------------------------------
    moe_a2a_backend: Annotated[str, Arg(
        group="backend", metavar="NAME", kind=Kind.NAME, none_value="none",
        help="MoE all-to-all backend: any registered name (built-ins: none, alltoall, deepep, "
             "megamoe; see `moe-a2a backends`)",
        auto="megamoe from legacy SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE or --moe-runner-backend "
             "megamoe; a waterfill backend (deepep) with --enable-deepep-waterfill",
        legacy=(Legacy("SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE", bool_switch="megamoe",
                       replacement="--moe-a2a-backend megamoe",
                       meaning="selects megamoe when no backend is given explicitly"),))] = "none"
    moe_runner_backend: Annotated[str, Arg(
        group="backend", metavar="RUNNER", kind=Kind.NAME,
        choices=("auto", "reference", "grouped_mm", RUNNER_SELECTS_BACKEND),
        sglang_only=SGLANG_ONLY_RUNNERS,
        help="expert compute of the non-fused paths: reference (plain torch), grouped_mm "
             "(torch._grouped_mm), auto (grouped_mm on CUDA with bfloat16, else reference); "
             "megamoe (SGLang 0.5.23) selects --moe-a2a-backend megamoe",
        auto="auto after megamoe selected the megamoe backend")] = "auto"
    # ---- parallelism ---------------------------------------------------------------------------
    tp_size: Annotated[int, Arg(
        aliases=("--tensor-parallel-size", "--tp"), min=1, metavar="N",
        help="tensor-parallel size: the number of ranks of one MoE layer")] = 1
    dp_size: Annotated[int, Arg(
        aliases=("--data-parallel-size", "--dp"), min=1, metavar="N",
        help="attention data-parallel size (takes effect with --enable-dp-attention; SGLang "
             "0.5.23's --attn-dp-size N is read as --dp-size N --enable-dp-attention)",
        applies=When(_dp_attention_or_one, "with --enable-dp-attention"))] = 1
    ep_size: Annotated[int, Arg(
        aliases=("--expert-parallel-size", "--ep"), min=1, metavar="N",
        help="expert-parallel size; derived as tp_size when the backend's ep_policy is 'tp'",
        auto="tp_size for backends whose ep_policy is 'tp' (alltoall, deepep, megamoe)")] = 1
    enable_dp_attention: Annotated[bool, Arg(
        help="data-parallel attention: dp_size groups of tp_size/dp_size ranks each",
        auto="false when dp_size is 1")] = False
    # ---- DeepEP --------------------------------------------------------------------------------
    deepep_mode: Annotated[str, Arg(
        group="deepep", metavar="MODE", kind=Kind.NAME,
        backend_setting=True,
        help="the backend's mode; DeepEP: normal, low_latency or auto (normal for prefill "
             "batches, low_latency otherwise); must be one of the backend's modes",
        auto="the backend's default mode when the backend lacks the given one")] = "auto"
    deepep_config: Annotated[Optional[str], Arg(
        group="deepep", metavar="JSON|PATH", kind=Kind.JSON_OBJECT, backend_setting=True,
        help="DeepEP buffer configs: JSON text or a path to a JSON file (read at resolve time; "
             "workers get the text)")] = None
    deepep_num_max_dispatch_tokens_per_rank: Annotated[int, Arg(
        group="deepep", min=1, max=1024, metavar="N", backend_setting=True,
        help="DeepEP low-latency capacity: the most tokens one rank's kernel dispatches per step",
        legacy=(Legacy("SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK",
                       meaning="DeepEP low-latency capacity"),))] = 128
    enable_deepep_waterfill: Annotated[bool, Arg(
        group="deepep", aliases=("--enable-waterfill",),
        help="waterfill: send each token's shared-expert work to the least-loaded rank; needs "
             "a backend with the waterfill feature (deepep, megamoe; deepep is chosen when none "
             "is given) and fuses shared experts (--enable-waterfill is SGLang 0.5.23's name)")
    ] = False
    deepep_waterfill_dynamic: Annotated[bool, Arg(
        group="deepep",
        help="waterfill in dynamic mode (one small all-reduce of the loads per layer) instead of "
             "static (local counts)",
        applies=When(_waterfill, "with --enable-deepep-waterfill"),
        legacy=(Legacy("SGLANG_DISABLE_STATIC_WATERFILL",
                       meaning="waterfill in dynamic mode"),))] = False
    # ---- Mega-MoE ------------------------------------------------------------------------------
    mega_moe_num_max_tokens_per_rank: Annotated[int, Arg(
        group="megamoe", min=1, metavar="N", backend_setting=True,
        help="Mega-MoE capacity: the most tokens one rank's fused kernel takes; CUDA-graph "
             "batches must fit, larger eager batches take the fallback path (SGLang 0.5.14's "
             "default; 0.5.23 uses 8192)",
        legacy=(Legacy("SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK",
                       meaning="Mega-MoE capacity per rank"),))] = 1024
    mega_moe_fix_memory: Annotated[bool, Arg(
        group="megamoe", backend_setting=True,
        help="share expert weights between the fused Mega-MoE path and its standard fallback",
        auto="the backend's default (true for megamoe) unless set",
        legacy=(Legacy("SGLANG_OPT_FIX_MEGA_MOE_MEMORY",
                       replacement="--mega-moe-fix-memory / --no-mega-moe-fix-memory",
                       meaning="megamoe weight sharing between the fused and fallback "
                               "paths"),))] = False
    # ---- shared experts ------------------------------------------------------------------------
    disable_shared_experts_fusion: Annotated[bool, Arg(
        group="shared experts",
        help="keep shared experts separate (exclusive with --enforce-shared-experts-fusion)")
    ] = False
    enforce_shared_experts_fusion: Annotated[bool, Arg(
        group="shared experts",
        help="fuse shared experts as extra top-k columns (exclusive with "
             "--disable-shared-experts-fusion)",
        auto="true with --enable-deepep-waterfill")] = False
    # ---- routed experts capture (R3) -----------------------------------------------------------
    enable_return_routed_experts: Annotated[bool, Arg(
        group="routed experts",
        help="capture the router's logical expert ids per token (rollout routing replay)")
    ] = False
    routed_experts_gather: Annotated[str, Arg(
        group="routed experts", metavar="MODE", choices=("auto", "early", "late", "none"),
        help="how captured ids are gathered across attention-TP ranks: early (per layer, "
             "graph-capturable), late (once per step), none (replicated layout), auto",
        applies=When(_capturing, "with --enable-return-routed-experts"),
        auto="none when no gather is needed, else early (late when CUDA graphs are off)")
    ] = "auto"
    # ---- EPLB ----------------------------------------------------------------------------------
    enable_eplb: Annotated[bool, Arg(
        group="eplb", help="expert-parallel load balancing (needs ep_size > 1)")] = False
    ep_num_redundant_experts: Annotated[int, Arg(
        group="eplb", min=0, metavar="N",
        help="extra physical expert slots for replicas of hot experts")] = 0
    eplb_algorithm: Annotated[str, Arg(
        group="eplb", metavar="ALGO", choices=("auto", "deepseek", "deepseek_hierarchical"),
        sglang_only=("deepseek_vec", "deepseek_vec_hierarchical", "elasticity_aware",
                     "elasticity_aware_hierarchical"),
        help="rebalance algorithm")] = "auto"
    ep_dispatch_algorithm: Annotated[Optional[str], Arg(
        group="eplb", metavar="ALGO", choices=("static", "dynamic"), sglang_only=("fake", "lp"),
        help="which replica a token goes to: static (nearest, deterministic) or dynamic (random)",
        auto="static when EPLB is on or the initial expert location is not trivial, and it is "
             "unset")] = None
    init_expert_location: Annotated[str, Arg(
        group="eplb", metavar="SPEC",
        help="initial expert placement: trivial, JSON text, or a .json/.pt file with "
             "physical_to_logical_map or logical_count")] = "trivial"
    expert_distribution_recorder_mode: Annotated[Optional[str], Arg(
        group="eplb", metavar="MODE", choices=("stat", "per_pass", "per_token"),
        sglang_only=("stat_approx",), help="expert-load recorder mode",
        auto="stat when EPLB is on and it is unset")] = None
    expert_distribution_recorder_buffer_size: Annotated[Optional[int], Arg(
        group="eplb", min=1, special=(-1,), metavar="N",
        help="recorder buffer size in steps (-1 = unbounded)",
        applies=When(_recording, "with an expert-distribution recorder mode"),
        auto="--eplb-rebalance-num-iterations when a recorder mode is active and it is unset")
    ] = None
    eplb_rebalance_num_iterations: Annotated[int, Arg(
        group="eplb", min=1, metavar="N", help="steps between rebalances")] = 1000
    # ---- batch limits --------------------------------------------------------------------------
    disable_cuda_graph: Annotated[bool, Arg(
        group="batch limits", help="do not capture CUDA graphs",
        auto="true when the backend's mode cannot be captured (deepep normal, alltoall)")] = False
    cuda_graph_max_bs: Annotated[Optional[int], Arg(
        group="batch limits", aliases=("--cuda-graph-max-bs-decode",), min=1, metavar="N",
        help="largest batch per DP rank captured in a CUDA graph (checked against the "
             "capacities; --cuda-graph-max-bs-decode is SGLang 0.5.14's name)")] = None
    chunked_prefill_size: Annotated[Optional[int], Arg(
        group="batch limits", min=1, special=(-1,), metavar="N",
        help="prefill chunk in tokens over all DP ranks, as in SGLang (each DP rank prefills "
             "chunked_prefill_size / dp_size under DP attention), -1 = off; checked against "
             "the capacities")] = None
    max_running_requests: Annotated[Optional[int], Arg(
        group="batch limits", min=1, metavar="N",
        help="most requests decoded at once over all DP ranks (checked against the "
             "capacities)")] = None


# ---- the derived field table ------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class FieldSpec(Arg):
    """One server argument as every consumer sees it: its ``Arg`` declaration plus the name,
    type and default of the pydantic field. ``flag`` is ``--<name with dashes>``, ``env`` the
    one canonical ``MOE_A2A_<NAME>``.
    """

    name: str
    type: type
    default: Any
    nullable: bool
    kind: Kind  # resolved: the Arg's override, or what the annotation implies

    @property
    def is_ident(self) -> bool:
        """Text normalised like backend names (case, ``-`` → ``_``)."""
        return self.kind is Kind.NAME

    # -- derived names -----------------------------------------------------------------------
    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> Tuple[str, ...]:
        return (self.flag,) + tuple(self.aliases)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def range_text(self) -> str:
        if self.type is not int:
            return ""
        if self.min is not None and self.max is not None:
            text = f"{self.min}..{self.max}"
        elif self.min is not None:
            text = f">= {self.min}"
        else:
            return ""
        for value in self.special:
            text += f" or {value}"
        return text

    @property
    def type_text(self) -> str:
        base = " | ".join(self.choices) if self.choices else self.type.__name__
        return f"{base} or unset" if self.nullable else base

    def default_text(self) -> str:
        return format_value(self.default)

    # -- conversion and checks ---------------------------------------------------------------
    def convert(self, value: Any, given: str, *, legacy: bool = False) -> Any:
        """Convert text (flags, variables) or a Python value (keywords) into this field's type.

        ``given`` shows the user what was read, e.g. ``"MOE_A2A_TP_SIZE='x'"``; it starts
        every error message. ``legacy`` accepts SGLang's extra boolean spellings. The result
        also passes :meth:`check`.
        """
        if value is None and self.none_value is not None:
            value = self.none_value
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{given}: {self.name} cannot be unset; fix: give a {self.type_text}")
        if self.type is bool:
            value = to_bool(value, given, legacy=legacy)
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
            raise ConfigError(f"{given}: {self.name} must be of type {self.type.__name__}, got "
                              f"{type(value).__name__} {shown(value)}; fix: give a {self.type_text}")
        if self.is_ident and value != normalize_name(value):
            raise ConfigError(f"{given}: {shown(value)} is not normalised (resolve stores "
                              f"{normalize_name(value)!r}); fix: build it with server_args.resolve()")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(self.choice_message(value, given))
        if self.type is int and value not in self.special:
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise ConfigError(f"{given}: {self.name}={value} is out of range; it must be "
                                  f"{self.range_text}; fix: pass {self.flag} with a value in that range")

    def choice_message(self, value: Any, given: str, choices: Optional[Tuple[str, ...]] = None) -> str:
        """Why ``value`` is not a valid choice: SGLang-only values get their own message."""
        valid = ", ".join(choices if choices is not None else self.choices or ())
        if value in self.sglang_only:
            return (f"{given}: {value!r} is known from SGLang but is not provided by moe-a2a; "
                    f"choose one of {valid}")
        return f"{given}: {shown(value)} is not a valid {self.name}; choose one of {valid}"

    def setting_value(self, value: Any) -> Any:
        """The value a backend's settings receive (a JSON object field's parsed object)."""
        if self.kind is Kind.JSON_OBJECT and value is not None:
            return json.loads(value)
        return value


def _unwrap(annotation: Any) -> Tuple[type, bool]:
    """``Optional[int]`` → ``(int, True)``; ``int`` → ``(int, False)``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return annotation, False


def _field_specs(model: type[BaseModel]) -> Tuple[FieldSpec, ...]:
    specs = []
    for name, info in model.model_fields.items():
        args = [m for m in info.metadata if isinstance(m, Arg)]
        if len(args) != 1:
            raise TypeError(f"{model.__name__}.{name} needs exactly one Arg(...) in Annotated")
        typ, nullable = _unwrap(info.annotation)
        default_kind = {bool: Kind.BOOL, int: Kind.INT, str: Kind.TEXT}[typ]
        declared = {f.name: getattr(args[0], f.name) for f in dataclass_fields(Arg)}
        declared["kind"] = args[0].kind or default_kind
        specs.append(FieldSpec(**declared, name=name, type=typ, default=info.default,
                               nullable=nullable))
    return tuple(specs)


FIELDS: Tuple[FieldSpec, ...] = _field_specs(ServerArgsFields)
FIELDS_BY_NAME: Mapping[str, FieldSpec] = MappingProxyType({f.name: f for f in FIELDS})
FIELD_NAMES: Tuple[str, ...] = tuple(FIELDS_BY_NAME)
FIELDS_BY_ENV: Mapping[str, FieldSpec] = MappingProxyType({f.env: f for f in FIELDS})
BACKEND_SETTING_FIELDS: Tuple[str, ...] = tuple(f.name for f in FIELDS if f.backend_setting)


# ---- legacy SGLang names -----------------------------------------------------------------------

@dataclass(frozen=True)
class LegacyVar:
    """A legacy variable together with the field it sets (derived from the declaration)."""

    spec: Legacy
    field: str

    @property
    def var(self) -> str:
        return self.spec.var

    @property
    def type(self) -> type:
        return bool if self.spec.bool_switch is not None else FIELDS_BY_NAME[self.field].type

    @property
    def replacement(self) -> str:
        return self.spec.replacement or FIELDS_BY_NAME[self.field].flag

    @property
    def meaning(self) -> str:
        return self.spec.meaning


LEGACY_VARS: Tuple[LegacyVar, ...] = tuple(
    LegacyVar(legacy, f.name) for f in FIELDS for legacy in f.legacy)


@dataclass(frozen=True)
class SpellingFlag:
    """A command-line spelling of other fields' values (SGLang's, with no field of its own).

    ``takes_value``: ``--attn-dp-size N`` takes one value; the legacy switches take none.
    ``deprecated``: a deprecation warning names the replacement and the removal release.
    """

    name: str
    replacement: str
    meaning: str
    deprecated: bool = True
    takes_value: bool = False
    aliases: Tuple[str, ...] = ()
    version: str = "0.5.14"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> Tuple[str, ...]:
        return (self.flag,) + self.aliases


# Deprecated SGLang switches (removed from SGLang itself before 0.5.14).
LEGACY_FLAGS: Tuple[SpellingFlag, ...] = (
    SpellingFlag("enable_deepep_moe", "--moe-a2a-backend deepep", "same as --moe-a2a-backend deepep"),
    SpellingFlag("enable_ep_moe", "--ep-size <tp_size>", "same as --ep-size <tp_size>"),
)
# Current SGLang spellings that map onto our fields.
SGLANG_SPELLINGS: Tuple[SpellingFlag, ...] = (
    SpellingFlag("attn_dp_size", "--dp-size N --enable-dp-attention",
                 "N attention data-parallel groups: same as --dp-size N --enable-dp-attention",
                 deprecated=False, takes_value=True, aliases=("--attention-data-parallel-size",),
                 version="0.5.23"),
)
SPELLING_FLAGS: Tuple[SpellingFlag, ...] = LEGACY_FLAGS + SGLANG_SPELLINGS
LEGACY_FLAG_NAMES: Tuple[str, ...] = tuple(f.name for f in SPELLING_FLAGS)


def deprecation_message(old: str, replacement: str) -> str:
    """The one wording of every deprecation: the old name, the removal release, the new name."""
    return (f"{old} is deprecated and will be removed in {REMOVAL_RELEASE}: "
            f"use {replacement} instead")


# ---- values in messages ------------------------------------------------------------------------

def format_value(value: Any) -> str:
    """How a value is shown in messages, tables and docs."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe(name: str, value: Any, source: Source) -> str:
    """Where a value came from, as the user wrote it: ``--ep-size 4``, ``MOE_A2A_EP_SIZE=4`` ...

    Error messages start with this, so users see the flag or variable they have to change.
    Long values are clipped.
    """
    spec = FIELDS_BY_NAME[name]
    text = clip(format_value(value))
    kind = source.kind
    if kind is SourceKind.CLI:
        if spec.type is bool:
            return spec.flag if value else "--no-" + spec.flag[2:]
        return f"{spec.flag} {text}"
    if kind is SourceKind.ENV:
        return f"{source.variable}={text}"
    if kind is SourceKind.LEGACY_ENV:
        return f"{name}={text} (from {source.variable})"
    if kind is SourceKind.KWARGS:
        return f"{name}={shown(value)}"
    if kind is SourceKind.AUTO:
        return f"{name}={text} (auto-configured)"
    return f"{name}={text} (default)"


# ---- conversions -------------------------------------------------------------------------------

def to_bool(value: Any, given: str, *, legacy: bool = False) -> bool:
    """A boolean from a bool, 0/1, or text in one of the accepted spellings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    true, false = (LEGACY_BOOL_TRUE, LEGACY_BOOL_FALSE) if legacy else (BOOL_TRUE, BOOL_FALSE)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in true:
            return True
        if text in false:
            return False
    spellings = LEGACY_BOOL_SPELLINGS if legacy else BOOL_SPELLINGS
    raise ConfigError(f"{given} is not a boolean; fix: use one of {spellings}")


def _to_int(value: Any, given: str, spec: FieldSpec) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    rng = f" ({spec.range_text})" if spec.range_text else ""
    example = spec.default if spec.default is not None else 8
    raise ConfigError(f"{given} is not an integer; fix: give a whole number{rng}, e.g. "
                      f"{spec.flag} {example}")


def _to_str(value: Any, given: str, spec: FieldSpec) -> str:
    if isinstance(value, enum.Enum) and isinstance(value.value, str):  # MoeA2ABackend.DEEPEP
        value = value.value
    if not isinstance(value, str):
        raise ConfigError(f"{given}: {spec.name} must be text, got {type(value).__name__}; "
                          f"fix: give a {spec.type_text}")
    if spec.is_ident:
        return normalize_name(value)  # "Low-Latency" -> "low_latency", like backend names
    return value

