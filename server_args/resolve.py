"""``resolve``: sources -> one pass of auto-configuration -> a frozen, validated ``ServerArgs``.

Precedence, per field, is the data ``sources.PRECEDENCE`` (lowest first)::

    default  <  legacy_env (SGLANG_*)  <  env (MOE_A2A_*)  <  cli  <  kwargs

The layers are applied in that order, each overriding the ones before. ``defaults`` given by
the caller replace built-in defaults but still count as defaults. Order of work: layers ->
legacy mapping -> files -> auto-configuration (rules of SPEC §3.3, each change recorded as a
Decision) -> advisory warnings -> validation (in ``ServerArgs``). Nothing changes afterwards.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from moe_a2a.backends import BUILTIN_NAMES, WATERFILL, BackendSpec
from moe_a2a.server_args.backend_args import (
    backend_mode,
    backend_spec,
    describe_backend,
    mode_field,
    reads,
    setting_default,
)
from moe_a2a.server_args.errors import (
    ConfigDeprecationWarning,
    ConfigError,
    ConfigWarning,
    clip,
    shown,
)
from moe_a2a.server_args.fields import (
    BACKEND_SETTING_FIELDS,
    FIELD_NAMES,
    FIELDS,
    FIELDS_BY_ENV,
    FIELDS_BY_NAME,
    LEGACY_FLAG_NAMES,
    LEGACY_VARS,
    RUNNER_SELECTS_BACKEND,
    SPELLING_FLAGS,
    Kind,
    LegacyVar,
    SpellingFlag,
    deprecation_message,
    describe,
    to_bool,
)
from moe_a2a.server_args.files import load_deepep_config, load_expert_location
from moe_a2a.server_args.model import Decision, ServerArgs
from moe_a2a.server_args.plugin_env import PROCESS_VARIABLES
from moe_a2a.server_args.sglang import unused_sglang_vars
from moe_a2a.server_args.sources import (
    AUTO,
    CLI,
    DEFAULT,
    KWARGS,
    PRECEDENCE,
    Source,
    SourceKind,
    check_env,
    present,
    read_sglang_var,
    unknown_moe_env,
)
from moe_a2a.server_args.validate import (
    View,
    cuda_graph_error,
    eplb_error,
    ep_error,
    gather_needed,
    waterfill_backends,
    waterfill_error,
)

Message = Tuple[str, Type[Warning]]


@dataclass(frozen=True)
class LegacyValue:
    """A legacy variable that is set: the name read, its text and the field value it stands for."""

    var: LegacyVar
    name: str  # the spelling read (SGLANG_X, or SGLang's older SGL_X)
    raw: str
    value: Any  # None: set, but it does not set the field (the megamoe switch set to 0)

    @property
    def source(self) -> Source:
        return Source(SourceKind.LEGACY_ENV, self.name)


@dataclass(frozen=True)
class Spelling:
    """A spelling flag as given (``--enable-deepep-moe``, ``--attn-dp-size 8``)."""

    flag: SpellingFlag
    value: Any
    source: Source


@dataclass
class _Inputs:
    """What the caller handed to ``resolve``."""

    cli: Mapping[str, Any]
    kwargs: Mapping[str, Any]
    env: Mapping[str, str]
    defaults: Mapping[str, Any]


@dataclass
class _Builder:
    """Mutable values while resolving; frozen into ``ServerArgs`` at the end."""

    values: Dict[str, Any] = field(default_factory=dict)
    sources: Dict[str, Source] = field(default_factory=dict)
    defaults: Dict[str, Any] = field(default_factory=dict)
    decisions: List[Decision] = field(default_factory=list)
    messages: List[Message] = field(default_factory=list)
    legacy: List[LegacyValue] = field(default_factory=list)
    spellings: List[Spelling] = field(default_factory=list)

    def put(self, name: str, value: Any, source: Source) -> None:
        self.values[name] = value
        self.sources[name] = source
        if source.kind is SourceKind.DEFAULT:
            self.defaults[name] = value

    def auto(self, name: str, value: Any, reason: str) -> None:
        """An automatic change: recorded as a decision, source ``auto``."""
        old = self.values[name]
        if old == value:
            return
        self.decisions.append(Decision(field=name, from_=old, to=value, reason=reason))
        self.values[name] = value
        self.sources[name] = AUTO

    def explicit(self, name: str) -> bool:
        return self.sources[name].explicit

    def d(self, name: str) -> str:
        return describe(name, self.values[name], self.sources[name])

    def warn(self, message: str, category: Type[Warning] = ConfigWarning) -> None:
        self.messages.append((message, category))

    def view(self, spec: Optional[BackendSpec] = None) -> View:
        return View(self.values, self.sources, spec)


# ---- entry points ------------------------------------------------------------------------------

def resolve(
    argv: Optional[Union[Sequence[str], str]] = None,
    *,
    env: Optional[Mapping[str, str]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    **kwargs: Any,
) -> ServerArgs:
    """Resolve server arguments.

    Args:
        argv: server flags as on the command line (a list, or one string split like a shell).
            Only server flags: engines with flags of their own use ``add_arguments`` on their
            parser and ``resolve_namespace``.
        env: environment mapping; ``None`` reads ``os.environ``.
        defaults: values that replace built-in defaults (they still count as defaults, so
            ``MOE_A2A_*`` and legacy variables override them).
        **kwargs: explicit values by field name, with command-line precedence (applied after
            ``argv``). The legacy ``enable_deepep_moe``/``enable_ep_moe`` are accepted too.

    Raises:
        ConfigError: any invalid input or combination, naming flags, values and the fix.
    """
    from moe_a2a.server_args.cli import parse_argv  # argparse wiring lives in cli.py
    from moe_a2a.server_args.sglang import unused_flags_warning

    cli, unused = parse_argv(argv) if argv is not None else ({}, [])
    note = unused_flags_warning(unused)
    return resolve_sources(cli=cli, kwargs=kwargs, env=env, defaults=defaults,
                           notes=[note] if note else [])


def resolve_sources(
    *,
    cli: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    env: Optional[Mapping[str, str]],
    defaults: Optional[Mapping[str, Any]],
    notes: Sequence[str] = (),
    stacklevel: int = 3,
) -> ServerArgs:
    """The one resolution pass over explicit ``cli``/``kwargs`` values and the environment.

    ``notes`` are warnings the caller already has (e.g. SGLang flags that were not used).
    """
    inputs = _Inputs(cli=cli, kwargs=kwargs, env=os.environ if env is None else check_env(env),
                     defaults={} if defaults is None else defaults)
    b = _Builder()
    for kind in PRECEDENCE:  # lowest first: later layers override earlier ones
        LAYERS[kind](b, inputs)
    unused_vars = unused_sglang_vars(inputs.env)
    if unused_vars:
        b.warn(unused_vars)
    _apply_spellings(b)
    _map_legacy(b)
    _read_files(b)
    spec = _auto_configure(b)
    _advise(b, spec)
    for note in notes:
        b.warn(note)
    args = ServerArgs(**b.values, sources=b.sources, decisions=tuple(b.decisions),
                      warnings=tuple(message for message, _ in b.messages))
    for message, category in b.messages:
        warnings.warn(message, category, stacklevel=stacklevel)  # points at the caller of resolve
    return args


# ---- layers ------------------------------------------------------------------------------------

def unknown_name(name: Any, where: str) -> ConfigError:
    """An unknown field name, with the closest valid one."""
    valid = FIELD_NAMES + LEGACY_FLAG_NAMES
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {where} {shown(name)}{hint}; valid names: {', '.join(FIELD_NAMES)}")


def _shown(name: str, value: Any, source: Source) -> str:
    """How an explicit raw value is shown before it is converted."""
    spec = FIELDS_BY_NAME[name]
    if source.kind is SourceKind.CLI:
        if isinstance(value, bool):
            return spec.flag if value else "--no-" + spec.flag[2:]
        return f"{spec.flag} {shown(value)}"
    if source.kind is SourceKind.DEFAULT:
        return f"defaults[{name!r}]={shown(value)}"
    return f"{name}={shown(value)}"


def _defaults_layer(b: _Builder, inputs: _Inputs) -> None:
    if not isinstance(inputs.defaults, Mapping):
        raise ConfigError(f"defaults={shown(inputs.defaults)} must be a mapping of field names "
                          f"to values; fix: pass e.g. defaults={{'tp_size': 4}}")
    for spec in FIELDS:
        b.put(spec.name, spec.default, DEFAULT)
    for name, value in inputs.defaults.items():
        if name not in FIELDS_BY_NAME:
            raise unknown_name(name, "default")
        b.put(name, FIELDS_BY_NAME[name].convert(value, _shown(name, value, DEFAULT)), DEFAULT)


def read_legacy_env(env: Mapping[str, str]) -> List[Tuple[LegacyValue, Tuple[str, ...]]]:
    """Every legacy variable that is set, with the notes its spelling earned."""
    out = []
    for legacy in LEGACY_VARS:
        found = read_sglang_var(env, legacy.var)
        if found is None:
            continue
        given = f"{found.name}={shown(found.raw)}"
        spec = FIELDS_BY_NAME[legacy.field]
        switch = legacy.spec.bool_switch
        if switch is not None:
            value = switch if to_bool(found.raw, given, legacy=True) else None
            value = None if value is None else spec.convert(value, given)
        else:
            value = spec.convert(found.raw, given, legacy=True)
        out.append((LegacyValue(legacy, found.name, found.raw, value), found.notes))
    return out


def _legacy_layer(b: _Builder, inputs: _Inputs) -> None:
    for item, notes in read_legacy_env(inputs.env):
        replacement = f"{item.var.replacement} (or {FIELDS_BY_NAME[item.var.field].env})"
        b.warn(deprecation_message(item.name, replacement), ConfigDeprecationWarning)
        for note in notes:
            b.warn(note, ConfigDeprecationWarning)
        b.legacy.append(item)
        if item.value is not None:
            b.put(item.var.field, item.value, item.source)


def _env_layer(b: _Builder, inputs: _Inputs) -> None:
    for spec in FIELDS:
        raw = present(inputs.env, spec.env)
        if raw is not None:
            b.put(spec.name, spec.convert(raw, f"{spec.env}={shown(raw)}"),
                  Source(SourceKind.ENV, spec.env))
    for message in unknown_moe_env(inputs.env, {**FIELDS_BY_ENV, **PROCESS_VARIABLES}):
        b.warn(message)


def _explicit_layer(source: Source, where: str) -> Callable[[_Builder, _Inputs], None]:
    def layer(b: _Builder, inputs: _Inputs) -> None:
        given = inputs.cli if source.kind is SourceKind.CLI else inputs.kwargs
        by_name = {f.name: f for f in SPELLING_FLAGS}
        for name, value in given.items():
            if name in by_name:
                b.spellings.append(Spelling(by_name[name], value, source))
            elif name in FIELDS_BY_NAME:
                b.put(name, FIELDS_BY_NAME[name].convert(value, _shown(name, value, source)), source)
            else:
                raise unknown_name(name, where)
    return layer


# How each kind of source is read; the order they are applied in is PRECEDENCE.
LAYERS: Mapping[SourceKind, Callable[[_Builder, _Inputs], None]] = MappingProxyType({
    SourceKind.DEFAULT: _defaults_layer,
    SourceKind.LEGACY_ENV: _legacy_layer,
    SourceKind.ENV: _env_layer,
    SourceKind.CLI: _explicit_layer(CLI, "option"),
    SourceKind.KWARGS: _explicit_layer(KWARGS, "keyword argument"),
})


def _spelling_shown(item: Spelling) -> str:
    if item.source.kind is SourceKind.CLI:
        return item.flag.flag + ("" if not item.flag.takes_value else f" {clip(str(item.value))}")
    return f"{item.flag.name}={shown(item.value)}"


def _set_from_spelling(b: _Builder, item: Spelling, name: str, value: Any) -> None:
    """A spelling sets ``name`` unless it was given explicitly with another value (an error)."""
    if b.sources[name].kind in (SourceKind.CLI, SourceKind.KWARGS) and b.values[name] != value:
        raise ConfigError(f"{_spelling_shown(item)} ({item.flag.meaning}) conflicts with "
                          f"{b.d(name)}; fix: drop {item.flag.flag}")
    b.put(name, value, item.source)


def _apply_spellings(b: _Builder) -> None:
    """``--enable-deepep-moe``, ``--enable-ep-moe``, ``--attn-dp-size N``: other fields' values."""
    for item in b.spellings:
        shown_as = _spelling_shown(item)
        if item.flag.deprecated:
            replacement = item.flag.replacement
            if item.flag.name == "enable_ep_moe":
                replacement = f"--ep-size <tp_size> (here --ep-size {b.values['tp_size']})"
            b.warn(deprecation_message(item.flag.flag, replacement), ConfigDeprecationWarning)
        if item.flag.name == "attn_dp_size":
            size = FIELDS_BY_NAME["dp_size"].convert(item.value, shown_as)
            if size > 1:
                _set_from_spelling(b, item, "dp_size", size)
                _set_from_spelling(b, item, "enable_dp_attention", True)
            continue
        if not to_bool(item.value, shown_as):
            continue
        if item.flag.name == "enable_deepep_moe":
            _set_from_spelling(b, item, "moe_a2a_backend", "deepep")
        else:  # enable_ep_moe
            _set_from_spelling(b, item, "ep_size", b.values["tp_size"])


def _map_legacy(b: _Builder) -> None:
    """Rule 2 and conflicts: a legacy variable loses to any explicit setting, with a warning."""
    for item in b.legacy:
        name = item.var.field
        if item.value is None:
            continue
        if b.sources[name] == item.source:
            if name == "moe_a2a_backend":  # rule 2: a backend switch is worth a decision
                b.decisions.append(Decision(
                    field=name, from_=b.defaults[name], to=item.value,
                    reason=f"{item.name}={item.raw} (deprecated) {item.var.meaning}"))
            continue
        if b.values[name] != item.value:
            b.warn(f"{item.name}={clip(item.raw)} is ignored: {b.d(name)} takes precedence "
                   f"(command line > MOE_A2A_* > legacy variables; SGLang would let "
                   f"{item.name} win, moe-a2a does not)")


def _read_files(b: _Builder) -> None:
    """Files named by flags are read here, once, so workers get contents, not paths."""
    if b.values["deepep_config"] is not None:
        text, path = load_deepep_config(b.values["deepep_config"], b.d("deepep_config"))
        if path is not None:
            b.auto("deepep_config", text,
                   f"contents of {path} inlined so that workers need not read the file")
    location = b.values["init_expert_location"]
    checked = load_expert_location(location, b.d("init_expert_location"))
    if checked != location:
        b.auto("init_expert_location", checked,
               "relative path made absolute so that workers started elsewhere find it")


# ---- auto-configuration ------------------------------------------------------------------------

def _raise(message: Optional[str]) -> None:
    if message:
        raise ConfigError(message)


def _select_backend(b: _Builder, name: str, why: str) -> None:
    """An automatic backend choice; an explicit other backend is an error (no silent override)."""
    if b.values["moe_a2a_backend"] == name:
        return
    if b.explicit("moe_a2a_backend"):
        raise ConfigError(f"{why} selects --moe-a2a-backend {name}, but {b.d('moe_a2a_backend')} "
                          f"was given; fix: drop one of them")
    if b.sources["moe_a2a_backend"].kind is SourceKind.LEGACY_ENV:
        b.warn(f"{b.d('moe_a2a_backend')} is ignored: {why} selects {name}")
    b.auto("moe_a2a_backend", name, f"{why} selects the {name} backend")


def _runner_rule(b: _Builder) -> None:
    """SGLang 0.5.23's ``--moe-runner-backend megamoe`` is ``--moe-a2a-backend megamoe``."""
    if b.values["moe_runner_backend"] != RUNNER_SELECTS_BACKEND:
        return
    _select_backend(b, RUNNER_SELECTS_BACKEND, b.d("moe_runner_backend"))
    b.auto("moe_runner_backend", "auto",
           f"--moe-runner-backend {RUNNER_SELECTS_BACKEND} names the backend, not an expert "
           f"runner: the fused kernel computes the experts, its fallback uses the auto runner")


def _waterfill_rule(b: _Builder) -> None:
    """Rule 1: waterfill runs on a backend with the waterfill feature, with fused shared experts."""
    v = b.values
    if not v["enable_deepep_waterfill"]:
        return
    spec = backend_spec(v["moe_a2a_backend"], b.d("moe_a2a_backend"))
    if WATERFILL not in spec.features:
        if b.explicit("moe_a2a_backend"):
            _raise(waterfill_error(b.view(spec)))
        target = waterfill_backends()[0]  # the first built-in with the feature: deepep
        if b.sources["moe_a2a_backend"].kind is SourceKind.LEGACY_ENV:
            b.warn(f"{b.d('moe_a2a_backend')} is ignored: --enable-deepep-waterfill needs a "
                   f"backend with the waterfill feature")
        b.auto("moe_a2a_backend", target,
               f"--enable-deepep-waterfill needs a backend with the waterfill feature; backend "
               f"{spec.name} lacks it, {target} is the first built-in that has it")
    if not v["enforce_shared_experts_fusion"]:
        if v["disable_shared_experts_fusion"] and b.explicit("disable_shared_experts_fusion"):
            _raise(waterfill_error(b.view()))
        b.auto("disable_shared_experts_fusion", False,
               "--enable-deepep-waterfill needs shared-experts fusion")
        b.auto("enforce_shared_experts_fusion", True,
               "--enable-deepep-waterfill places the fused shared-expert column on the "
               "least-loaded rank, so shared experts are fused")


def _backend_defaults_rule(b: _Builder, spec: BackendSpec) -> None:
    """Rule 4, generic: a backend knob nobody set (still the built-in default) takes the
    backend's own default (``spec.settings``); a mode the backend lacks becomes its default."""
    for attr, name in spec.settings_fields.items():
        if name not in FIELDS_BY_NAME or b.sources[name].is_set:
            continue
        if b.values[name] != FIELDS_BY_NAME[name].default:
            continue  # a caller's defaults= value: theirs, not ours to replace
        if FIELDS_BY_NAME[name].kind is Kind.JSON_OBJECT:
            continue  # text here, an object in the settings: nothing to compare
        default = setting_default(spec, attr)
        if default != b.values[name] and default is not None:
            b.auto(name, default, f"backend {spec.name}'s default ({spec.settings.__name__}."
                                  f"{attr}={default!r}) for a setting that was not given")
    field = mode_field(spec)
    if field is not None and b.values[field] not in spec.modes and not b.explicit(field):
        attr_default = setting_default(spec, spec.mode_setting) if spec.mode_setting else None
        mode = attr_default if attr_default in spec.modes else spec.modes[0]
        b.auto(field, mode, f"backend {spec.name} has no mode {b.values[field]!r}; its modes: "
                            f"{', '.join(spec.modes)}")


def _auto_configure(b: _Builder) -> BackendSpec:
    """The rules of SPEC §3.3 in order (rule 2 ran in the legacy mapping)."""
    v = b.values
    _runner_rule(b)
    _waterfill_rule(b)                                                   # rule 1
    spec = backend_spec(v["moe_a2a_backend"], b.d("moe_a2a_backend"))
    name = spec.name

    # 3. ep_size from tp_size for ep_policy "tp"
    if spec.ep_policy == "tp" and v["ep_size"] != v["tp_size"]:
        if b.explicit("ep_size"):
            _raise(ep_error(b.view(spec)))
        b.auto("ep_size", v["tp_size"],
               f"backend {name} derives ep_size from tp_size (ep_policy 'tp'): each of the "
               f"{v['tp_size']} ranks owns its own experts")

    # 4. the backend's own defaults for its knobs (megamoe shares weights with its fallback)
    _backend_defaults_rule(b, spec)

    # 5. modes that cannot be captured turn CUDA graphs off
    mode = backend_mode(spec, v)
    if not v["disable_cuda_graph"] and not spec.supports_cuda_graph(mode):
        if b.explicit("disable_cuda_graph"):
            _raise(cuda_graph_error(b.view(spec)))
        host = " (its kernels sync with the host)" if spec.cuda_graph_modes else ""
        b.auto("disable_cuda_graph", True,
               f"{describe_backend(spec, mode)} cannot run inside CUDA graphs{host}; "
               f"capturable modes: {', '.join(spec.cuda_graph_modes) or 'none'}")

    # 6. DP attention needs dp_size > 1
    if v["enable_dp_attention"] and v["dp_size"] == 1:
        b.auto("enable_dp_attention", False, "dp_size is 1: DP attention would have nothing to split")

    # 7. EPLB and expert placement, as SGLang sets them
    _eplb_rule(b, spec)

    # 8. routed-experts gather
    _gather_rule(b, spec)
    # 9. capacities are checked by validation (in ServerArgs); nothing to change
    return spec


def _eplb_rule(b: _Builder, spec: BackendSpec) -> None:
    """Rule 7: EPLB needs ep_size > 1 and records statistics; a placement other than trivial
    dispatches deterministically; an active recorder keeps one rebalance period of steps."""
    v = b.values
    if v["enable_eplb"]:
        _raise(eplb_error(b.view(spec)))
        if v["expert_distribution_recorder_mode"] is None:
            b.auto("expert_distribution_recorder_mode", "stat",
                   "EPLB rebalances from expert-load statistics (the stat recorder)")
    if v["ep_dispatch_algorithm"] is None:
        if v["enable_eplb"]:
            b.auto("ep_dispatch_algorithm", "static",
                   "EPLB default: each token goes to the nearest replica (deterministic)")
        elif v["init_expert_location"] != "trivial":
            b.auto("ep_dispatch_algorithm", "static",
                   "the initial expert location is not trivial: replicas exist, and each token "
                   "goes to the nearest one (deterministic), as SGLang does")
    if v["expert_distribution_recorder_mode"] is not None \
            and v["expert_distribution_recorder_buffer_size"] is None:
        b.auto("expert_distribution_recorder_buffer_size", v["eplb_rebalance_num_iterations"],
               f"the recorder keeps the steps of one rebalance period "
               f"({b.d('eplb_rebalance_num_iterations')}), as SGLang does")


def _gather_rule(b: _Builder, spec: BackendSpec) -> None:
    """Rule 8: ``auto`` gathers only where attention-TP ranks hold different rows."""
    v = b.values
    if v["routed_experts_gather"] != "auto":
        return
    attn_tp = b.view(spec).attn_tp_size
    if not gather_needed(spec, attn_tp):
        why = (f"backend {spec.name} keeps tokens replicated in the attention-TP group"
               if spec.token_layout == "replicated"
               else "attention-TP size is 1: each rank holds all rows of its DP rank")
        b.auto("routed_experts_gather", "none", f"no gather needed: {why}")
    elif v["disable_cuda_graph"]:
        b.auto("routed_experts_gather", "late",
               f"backend {spec.name} scatters tokens over {attn_tp} attention-TP ranks and CUDA "
               f"graphs are off: one all-gather per step beats one per layer")
    else:
        b.auto("routed_experts_gather", "early",
               f"backend {spec.name} scatters tokens over {attn_tp} attention-TP ranks; early "
               f"gather (one all-gather per layer) can be captured in CUDA graphs")


# ---- advice ------------------------------------------------------------------------------------

def _readers(name: str) -> str:
    """The built-in backends whose settings read field ``name`` (for messages)."""
    from moe_a2a.backends import get_backend

    found = [n for n in BUILTIN_NAMES if name in reads(get_backend(n))]
    return ", ".join(found) or "none of the built-ins"


def _advise(b: _Builder, spec: BackendSpec) -> None:
    """Warnings for settings that work but do nothing, or more than needed."""
    v = b.values
    used = reads(spec)
    for f in FIELDS:
        if not b.sources[f.name].is_set or v[f.name] == f.default:
            continue
        if f.name in BACKEND_SETTING_FIELDS and f.name not in used:
            b.warn(f"{b.d(f.name)} has no effect: it only applies with a backend whose settings "
                   f"read it ({_readers(f.name)}) (backend is {spec.name})")
        elif f.applies is not None and not f.applies.test(v, spec):
            b.warn(f"{b.d(f.name)} has no effect: it only applies {f.applies.text} "
                   f"(backend is {spec.name})")
    attn_tp = b.view(spec).attn_tp_size
    if (v["enable_return_routed_experts"] and v["routed_experts_gather"] in ("early", "late")
            and not gather_needed(spec, attn_tp)):
        b.warn(f"{b.d('routed_experts_gather')} is not needed (backend {spec.name}, attention-TP "
               f"size {attn_tp}): every rank already holds the rows it captures; the gather still "
               f"runs and gives the same ids; fix: --routed-experts-gather auto")
