"""``resolve``: sources -> one pass of auto-configuration -> a frozen, validated ``ServerArgs``.

Precedence, per field (later wins; this tuple is the one place it is decided)::

    default  <  legacy_env (SGLANG_*)  <  env (MOE_A2A_*)  <  cli  <  kwargs

``defaults`` given by the caller replace built-in defaults but still count as defaults.
Order of work: layers -> legacy mapping -> auto-configuration (rules 1-9, each change recorded
as a Decision) -> advisory warnings -> validation (in ``ServerArgs.__post_init__``). Nothing
changes afterwards.
"""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from moe_a2a.backends import MoeA2ABackend
from moe_a2a.backends.spec import BackendSpec
from moe_a2a.server_args.errors import ConfigDeprecationWarning, ConfigError, ConfigWarning
from moe_a2a.server_args.fields import (
    FIELD_NAMES,
    FIELDS,
    FIELDS_BY_NAME,
    LEGACY_FLAG_NAMES,
    LEGACY_FLAGS,
    _to_bool,
    deprecation_message,
    describe,
    is_explicit,
    is_set,
)
from moe_a2a.server_args.model import Decision, ServerArgs
from moe_a2a.server_args.sources import (
    LegacyValue,
    check_expert_location,
    load_deepep_config,
    read_legacy_env,
    read_moe_env,
    unknown_moe_env,
)
from moe_a2a.server_args.validate import (
    View,
    backend_mode,
    backend_spec,
    cuda_graph_error,
    effective_mode,
    eplb_error,
    ep_error,
    gather_needed,
    has_modes,
    waterfill_error,
)

PRECEDENCE: Tuple[str, ...] = ("default", "legacy_env", "env", "cli", "kwargs")


class _Builder:
    """Mutable values while resolving; frozen into ``ServerArgs`` at the end."""

    def __init__(self) -> None:
        self.values: Dict[str, Any] = {}
        self.sources: Dict[str, str] = {}
        self.defaults: Dict[str, Any] = {}
        self.decisions: List[Decision] = []
        self.messages: List[Tuple[str, Type[Warning]]] = []

    def put(self, name: str, value: Any, source: str) -> None:
        self.values[name] = value
        self.sources[name] = source
        if source == "default":
            self.defaults[name] = value

    def auto(self, name: str, value: Any, reason: str) -> None:
        """An automatic change: recorded as a decision, source ``auto``."""
        old = self.values[name]
        if old == value:
            return
        self.decisions.append(Decision(field=name, from_=old, to=value, reason=reason))
        self.values[name] = value
        self.sources[name] = "auto"

    def explicit(self, name: str) -> bool:
        return is_explicit(self.sources[name])

    def d(self, name: str) -> str:
        return describe(name, self.values[name], self.sources[name])

    def warn(self, message: str, category: Type[Warning] = ConfigWarning) -> None:
        self.messages.append((message, category))

    def view(self) -> View:
        return View(self.values, self.sources)


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

    cli = parse_argv(argv) if argv is not None else {}
    return resolve_sources(cli=cli, kwargs=kwargs, env=env, defaults=defaults)


def resolve_sources(
    *,
    cli: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    env: Optional[Mapping[str, str]],
    defaults: Optional[Mapping[str, Any]],
    stacklevel: int = 3,
) -> ServerArgs:
    """The one resolution pass over explicit ``cli``/``kwargs`` values and the environment."""
    env = os.environ if env is None else env
    b = _Builder()
    legacy = _apply_layers(b, cli=cli, kwargs=kwargs, env=env, defaults=defaults or {})
    _map_legacy(b, legacy)
    _read_files(b)
    spec = _auto_configure(b)
    _advise(b, spec)
    args = ServerArgs(
        **b.values,
        sources=b.sources,
        decisions=tuple(b.decisions),
        warnings=tuple(message for message, _ in b.messages),
    )
    for message, category in b.messages:
        warnings.warn(message, category, stacklevel=stacklevel)  # points at the caller of resolve
    return args


# ---- layers ------------------------------------------------------------------------------------

def _unknown_name(name: str, where: str) -> ConfigError:
    valid = FIELD_NAMES + LEGACY_FLAG_NAMES
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown {where} {name!r}{hint}; valid names: {', '.join(FIELD_NAMES)}")


def _shown(name: str, value: Any, source: str) -> str:
    """How an explicit raw value is shown before it is converted."""
    spec = FIELDS_BY_NAME[name]
    if source == "cli" and not isinstance(value, bool):
        return f"{spec.flag} {value!r}"
    if source == "cli":
        return spec.flag if value else "--no-" + spec.flag[2:]
    if source == "default":
        return f"defaults[{name!r}]={value!r}"
    return f"{name}={value!r}"


def _apply_layers(b: _Builder, *, cli: Mapping[str, Any], kwargs: Mapping[str, Any],
                  env: Mapping[str, str], defaults: Mapping[str, Any]) -> List[LegacyValue]:
    """Fill every field from its sources in ``PRECEDENCE`` order; later layers overwrite."""
    for spec in FIELDS:
        b.put(spec.name, spec.default, "default")
    for name, value in defaults.items():
        if name not in FIELDS_BY_NAME:
            raise _unknown_name(name, "default")
        b.put(name, FIELDS_BY_NAME[name].convert(value, _shown(name, value, "default")), "default")

    legacy = list(read_legacy_env(env))
    for item in legacy:
        b.warn(deprecation_message(item.var.var, f"{item.var.replacement} (or "
                                   f"{FIELDS_BY_NAME[item.var.field].env})"),
               ConfigDeprecationWarning)
        if item.value is not None:
            b.put(item.var.field, item.value, item.source)

    for name, value, source in read_moe_env(env):
        b.put(name, value, source)
    for message in unknown_moe_env(env):
        b.warn(message)

    legacy_flags: Dict[str, Tuple[bool, str]] = {}
    for source, given in (("cli", cli), ("kwargs", kwargs)):
        for name, value in given.items():
            if name in LEGACY_FLAG_NAMES:
                shown = f"--{name.replace('_', '-')}" if source == "cli" else f"{name}={value!r}"
                legacy_flags[name] = (_to_bool(value, shown), source)
                continue
            if name not in FIELDS_BY_NAME:
                raise _unknown_name(name, "keyword argument" if source == "kwargs" else "option")
            b.put(name, FIELDS_BY_NAME[name].convert(value, _shown(name, value, source)), source)
    _apply_legacy_flags(b, legacy_flags)
    return legacy


def _apply_legacy_flags(b: _Builder, flags: Mapping[str, Tuple[bool, str]]) -> None:
    """``--enable-deepep-moe`` / ``--enable-ep-moe``: command-line spellings of other flags."""
    by_name = {f.name: f for f in LEGACY_FLAGS}
    for name, (on, source) in flags.items():
        flag = by_name[name].flag
        if name == "enable_deepep_moe":
            deepep = MoeA2ABackend.DEEPEP.value
            b.warn(deprecation_message(flag, "--moe-a2a-backend deepep"), ConfigDeprecationWarning)
            if not on:
                continue
            if b.sources["moe_a2a_backend"] in ("cli", "kwargs") and b.values["moe_a2a_backend"] != deepep:
                raise ConfigError(f"{flag} (deprecated: --moe-a2a-backend {deepep}) conflicts with "
                                  f"{b.d('moe_a2a_backend')}; fix: drop {flag}")
            b.put("moe_a2a_backend", deepep, source)
        else:  # enable_ep_moe
            tp = b.values["tp_size"]
            b.warn(deprecation_message(flag, f"--ep-size <tp_size> (here --ep-size {tp})"),
                   ConfigDeprecationWarning)
            if not on:
                continue
            if b.sources["ep_size"] in ("cli", "kwargs") and b.values["ep_size"] != tp:
                raise ConfigError(f"{flag} (deprecated: --ep-size <tp_size> = {tp}) conflicts with "
                                  f"{b.d('ep_size')}; fix: drop {flag}")
            b.put("ep_size", tp, source)


def _map_legacy(b: _Builder, legacy: List[LegacyValue]) -> None:
    """Rule 2 and conflicts: a legacy variable loses to any explicit setting, with a warning."""
    for item in legacy:
        name = item.var.field
        if item.value is None:
            continue
        if b.sources[name] == item.source:
            if name == "moe_a2a_backend":  # rule 2: a backend switch is worth a decision
                b.decisions.append(Decision(
                    field=name, from_=b.defaults[name], to=item.value,
                    reason=f"{item.var.var}={item.raw} (deprecated) {item.var.meaning}"))
            continue
        if b.values[name] != item.value:
            b.warn(f"{item.var.var}={item.raw} is ignored: {b.d(name)} takes precedence "
                   f"(command line > MOE_A2A_* > legacy variables; SGLang would let "
                   f"{item.var.var} win, moe-a2a does not)")


def _read_files(b: _Builder) -> None:
    """Files named by flags are read here, once, so workers get contents, not paths."""
    if b.values["deepep_config"] is not None:
        text, path = load_deepep_config(b.values["deepep_config"], b.d("deepep_config"))
        if path is not None:
            b.auto("deepep_config", text,
                   f"contents of {path} inlined so that workers need not read the file")
    location = b.values["init_expert_location"]
    checked = check_expert_location(location, b.d("init_expert_location"))
    if checked != location:
        b.auto("init_expert_location", checked,
               "relative path made absolute so that workers started elsewhere find it")


# ---- auto-configuration ------------------------------------------------------------------------

def _raise(message: Optional[str]) -> None:
    if message:
        raise ConfigError(message)


def _auto_configure(b: _Builder) -> BackendSpec:
    """Rules 1-9 of SPEC §3.3 in order (rule 2 ran in the legacy mapping)."""
    v = b.values

    # 1. waterfill runs on deepep with fused shared experts
    if v["enable_deepep_waterfill"]:
        deepep = MoeA2ABackend.DEEPEP.value
        if v["moe_a2a_backend"] != deepep:
            if b.explicit("moe_a2a_backend"):
                _raise(waterfill_error(b.view(), backend_spec(v["moe_a2a_backend"], b.d("moe_a2a_backend"))))
            if b.sources["moe_a2a_backend"].startswith("legacy_env:"):
                b.warn(f"{b.d('moe_a2a_backend')} is ignored: --enable-deepep-waterfill needs deepep")
            b.auto("moe_a2a_backend", deepep, "--enable-deepep-waterfill runs on the deepep backend")
        if not v["enforce_shared_experts_fusion"]:
            if v["disable_shared_experts_fusion"] and b.explicit("disable_shared_experts_fusion"):
                _raise(waterfill_error(b.view(), backend_spec(deepep, deepep)))
            b.auto("disable_shared_experts_fusion", False,
                   "--enable-deepep-waterfill needs shared-experts fusion")
            b.auto("enforce_shared_experts_fusion", True,
                   "--enable-deepep-waterfill places the fused shared-expert column on the "
                   "least-loaded rank, so shared experts are fused")

    spec = backend_spec(v["moe_a2a_backend"], b.d("moe_a2a_backend"))
    name = spec.name

    # 3. ep_size from tp_size for ep_policy "tp"
    if spec.ep_policy == "tp" and v["ep_size"] != v["tp_size"]:
        if b.explicit("ep_size"):
            _raise(ep_error(b.view(), spec))
        b.auto("ep_size", v["tp_size"],
               f"backend {name} derives ep_size from tp_size (ep_policy 'tp'): each of the "
               f"{v['tp_size']} ranks owns its own experts")

    # 4. fused-experts backends share weights with their fallback unless told otherwise
    if spec.fused_experts and not is_set(b.sources["mega_moe_fix_memory"]):
        b.auto("mega_moe_fix_memory", True,
               f"backend {name} computes the experts itself; sharing weights between its fused "
               f"path and its standard fallback saves a copy (SGLang's default)")

    # 5. modes that cannot be captured turn CUDA graphs off
    if has_modes(spec) and v["deepep_mode"] not in spec.modes and not b.explicit("deepep_mode"):
        b.auto("deepep_mode", spec.modes[0], f"backend {name} has no mode {v['deepep_mode']!r}")
    mode = effective_mode(spec, v["deepep_mode"])
    if not v["disable_cuda_graph"] and not spec.supports_cuda_graph(mode):
        if b.explicit("disable_cuda_graph"):
            _raise(cuda_graph_error(b.view(), spec))
        b.auto("disable_cuda_graph", True,
               f"{backend_mode(spec, mode)} cannot run inside CUDA graphs"
               + (" (normal-mode kernels sync with the host)" if mode == "normal" else "")
               + f"; capturable modes: {', '.join(spec.cuda_graph_modes) or 'none'}")

    # 6. DP attention needs dp_size > 1
    if v["enable_dp_attention"] and v["dp_size"] == 1:
        b.auto("enable_dp_attention", False, "dp_size is 1: DP attention would have nothing to split")

    # 7. EPLB: statistics and a deterministic dispatch by default; needs ep_size > 1
    if v["enable_eplb"]:
        _raise(eplb_error(b.view()))
        if v["expert_distribution_recorder_mode"] is None:
            b.auto("expert_distribution_recorder_mode", "stat",
                   "EPLB rebalances from expert-load statistics (the stat recorder)")
        if v["ep_dispatch_algorithm"] is None:
            b.auto("ep_dispatch_algorithm", "static",
                   "EPLB default: each token goes to the nearest replica (deterministic)")

    # 8. routed-experts gather
    view = b.view()
    if v["routed_experts_gather"] == "auto":
        if not gather_needed(spec, view.attn_tp_size):
            why = (f"backend {name} keeps tokens replicated in the attention-TP group"
                   if spec.token_layout == "replicated"
                   else "attention-TP size is 1: each rank holds all rows of its DP rank")
            b.auto("routed_experts_gather", "none", f"no gather needed: {why}")
        elif v["disable_cuda_graph"]:
            b.auto("routed_experts_gather", "late",
                   f"backend {name} scatters tokens over {view.attn_tp_size} attention-TP ranks "
                   f"and CUDA graphs are off: one all-gather per step beats one per layer")
        else:
            b.auto("routed_experts_gather", "early",
                   f"backend {name} scatters tokens over {view.attn_tp_size} attention-TP ranks; "
                   f"early gather (one all-gather per layer) can be captured in CUDA graphs")

    # 9. capacities are checked by validation (ServerArgs.__post_init__); nothing to change
    return spec


# ---- advice ------------------------------------------------------------------------------------

def _advise(b: _Builder, spec: BackendSpec) -> None:
    """Warnings for settings that work but do nothing, or more than needed."""
    v = b.values
    for field in FIELDS:
        if field.applies is None or not is_set(b.sources[field.name]):
            continue
        if v[field.name] != field.default and not field.applies(v, spec):
            b.warn(f"{b.d(field.name)} has no effect: it only applies {field.applies_text} "
                   f"(backend is {spec.name})")
    gather = v["routed_experts_gather"]
    if (v["enable_return_routed_experts"] and gather in ("early", "late")
            and not gather_needed(spec, b.view().attn_tp_size)):
        b.warn(f"{b.d('routed_experts_gather')} is not needed (backend {spec.name}, attention-TP "
               f"size {b.view().attn_tp_size}): every rank already holds the rows it captures; the "
               f"gather still runs and gives the same ids; fix: --routed-experts-gather auto")
