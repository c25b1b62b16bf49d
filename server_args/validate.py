"""Validation of a complete set of values: every invariant a resolved ``ServerArgs`` satisfies.

It runs when a ``ServerArgs`` is created (by ``resolve`` or ``from_json``), so an invalid one
cannot exist. It reads values only (no environment, no files); ``sources`` only shape the
messages (``--ep-size 4`` vs ``MOE_A2A_EP_SIZE=4``). Backends are asked through their spec's
data (``backend_args``), never by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple

from moe_a2a.backends import WATERFILL, BackendSpec, CapacityRule
from moe_a2a.server_args.backend_args import (
    backend_mode,
    backend_spec,
    build_settings,
    capacity_field,
    capacity_value,
    describe_backend,
    mode_field,
)
from moe_a2a.server_args.errors import ConfigError
from moe_a2a.server_args.fields import (
    DEEPEP_MODES,
    FIELDS,
    FIELDS_BY_NAME,
    MODE_FIELD,
    RUNNER_SELECTS_BACKEND,
    describe,
)
from moe_a2a.server_args.files import (
    check_expert_location_json,
    expert_location_kind,
    parse_json_object,
)
from moe_a2a.server_args.layout import ParallelLayout
from moe_a2a.server_args.sources import DEFAULT, Source

if TYPE_CHECKING:
    from moe_a2a.server_args.model import ServerArgs

Values = Mapping[str, Any]
Sources = Mapping[str, Source]

GATHER_CHOICES = ("early", "late", "none")  # resolved values (auto is resolved away)


class View:
    """Values, their sources, the backend spec, and message helpers."""

    def __init__(self, values: Values, sources: Sources, spec: Optional[BackendSpec] = None) -> None:
        self.v = values
        self.sources = sources
        self._spec = spec

    def d(self, name: str) -> str:
        """The value as the user gave it (flag, variable, keyword or default)."""
        return describe(name, self.v[name], self.sources.get(name, DEFAULT))

    @property
    def spec(self) -> BackendSpec:
        if self._spec is None:
            self._spec = backend_spec(self.v["moe_a2a_backend"], self.d("moe_a2a_backend"))
        return self._spec

    @property
    def attn_dp_size(self) -> int:
        return self.v["dp_size"] if self.v["enable_dp_attention"] else 1

    @property
    def attn_tp_size(self) -> int:
        """Ranks of one attention-TP group (tp_size when DP attention cannot split it)."""
        tp, dp = self.v["tp_size"], self.attn_dp_size
        return tp // dp if tp % dp == 0 else tp

    @property
    def layout(self) -> ParallelLayout:
        """The rank layout (only after the size checks passed: it raises on bad sizes)."""
        return ParallelLayout(tp_size=self.v["tp_size"], attn_dp_size=self.attn_dp_size,
                              ep_size=self.v["ep_size"])

    @property
    def scattered(self) -> bool:
        """The backend splits each DP rank's tokens over its attention-TP ranks."""
        return self.spec.token_layout == "scattered"

    @property
    def mode(self) -> str:
        return backend_mode(self.spec, self.v)


def gather_needed(spec: BackendSpec, attn_tp_size: int) -> bool:
    """Captured ids need a gather when each attention-TP rank holds a different slice."""
    return spec.token_layout == "scattered" and attn_tp_size > 1


def divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


# ---- capacities (rule 9) -----------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    """A batch one rank's kernel may receive.

    Attributes:
        tokens: tokens per kernel rank (after the DP and attention-TP splits).
        shown: where it comes from, as the user set it (``--cuda-graph-max-bs 256 over 2
            attention-TP ranks``).
        lower_flag: the flag that lowers it.
    """

    tokens: int
    shown: str
    lower_flag: str


@dataclass(frozen=True)
class CapacityCheck:
    """One capacity of the backend and the batches it must hold in the current mode."""

    rule: CapacityRule
    field: Optional[str]  # the server argument that sets it; None: fixed by the backend
    capacity: int
    batches: Tuple[Batch, ...]
    why: str


def _per_kernel(view: View, tokens: int, shown: str, lower_flag: str) -> Batch:
    layout = view.layout
    per_rank = layout.split(tokens, view.scattered)
    if per_rank != tokens:
        shown += f" split over {layout.attn_tp_size} attention-TP ranks"
    return Batch(per_rank, shown, lower_flag)


def captured_batches(view: View) -> List[Batch]:
    """CUDA-graph batches: ``--cuda-graph-max-bs`` per DP rank, when graphs are on."""
    v = view.v
    if v["cuda_graph_max_bs"] is None or v["disable_cuda_graph"]:
        return []
    return [_per_kernel(view, v["cuda_graph_max_bs"], view.d("cuda_graph_max_bs"),
                        "--cuda-graph-max-bs")]


def decode_batches(view: View) -> List[Batch]:
    """Decode batches: the captured ones and the running requests of the fullest DP rank."""
    v = view.v
    out = captured_batches(view)
    if v["max_running_requests"] is not None:
        dp = view.attn_dp_size
        shown = view.d("max_running_requests") + (f" over {dp} DP ranks" if dp > 1 else "")
        out.append(_per_kernel(view, -(-v["max_running_requests"] // dp), shown,
                               "--max-running-requests"))
    return out


def prefill_tokens_per_dp_rank(values: Values, attn_dp_size: int) -> Optional[int]:
    """A DP rank's prefill chunk: ``--chunked-prefill-size`` is global and, under DP attention,
    divided over the DP ranks (as SGLang does: 16384 over 8 DP ranks is 2048)."""
    chunk = values["chunked_prefill_size"]
    if chunk is None or chunk <= 0:
        return None
    return chunk // attn_dp_size


def all_batches(view: View) -> List[Batch]:
    """Every batch: decode batches and prefill chunks."""
    out = decode_batches(view)
    dp = view.attn_dp_size
    chunk = prefill_tokens_per_dp_rank(view.v, dp)
    if chunk is not None:
        shown = view.d("chunked_prefill_size") + (f" over {dp} DP ranks" if dp > 1 else "")
        out.append(_per_kernel(view, chunk, shown, "--chunked-prefill-size"))
    return out


BATCHES: Mapping[str, Callable[[View], List[Batch]]] = MappingProxyType({
    "all": all_batches, "decode": decode_batches, "captured": captured_batches})


def _why(view: View, rule: CapacityRule) -> str:
    spec, what = view.spec, describe_backend(view.spec, view.mode)
    if rule.batches == "captured":
        after = (f"; larger eager batches take the fallback ({spec.fallback})"
                 if rule.over_capacity == "fallback" else "")
        return f"CUDA-graph batches always run {what}'s kernel, sized by it{after}"
    if rule.batches == "decode":
        return f"{what} runs decode batches through buffers sized by it"
    return f"{what} runs every batch, prefill chunks included, through buffers sized by it"


def capacity_checks(view: View) -> List[CapacityCheck]:
    """The backend's capacity rules that apply in its current mode, with their batches."""
    spec, mode = view.spec, view.mode
    return [CapacityCheck(rule=rule, field=capacity_field(spec, rule),
                          capacity=capacity_value(spec, rule, view.v),
                          batches=tuple(BATCHES[rule.batches](view)), why=_why(view, rule))
            for rule in spec.capacities if rule.applies(mode)]


def capacity_message(view: View, check: CapacityCheck, batch: Batch) -> Optional[str]:
    """Why ``batch`` does not fit ``check``'s capacity, naming the flags; None when it fits."""
    if batch.tokens <= check.capacity:
        return None
    need = batch.tokens
    if check.field is None:
        what = (f"backend {view.spec.name}'s fixed capacity of {check.capacity} tokens "
                f"({view.spec.settings.__name__}.{check.rule.setting})")
        fix = f"lower {batch.lower_flag}"
    else:
        spec = FIELDS_BY_NAME[check.field]
        what = view.d(check.field)
        if spec.max is not None and need > spec.max:
            fix = (f"lower {batch.lower_flag} so that at most {spec.max} tokens reach one rank "
                   f"({spec.flag} cannot exceed {spec.max})")
        else:
            fix = f"raise {spec.flag} to at least {need}, or lower {batch.lower_flag}"
    return (f"{what} is smaller than the largest per-rank batch of {need} tokens "
            f"({batch.shown}): {check.why}; fix: {fix}")


# ---- the checks --------------------------------------------------------------------------------

Check = Callable[[View], Optional[str]]


def mode_error(view: View) -> Optional[str]:
    """The mode is one of the backend's (or, without a mode field, a known DeepEP mode)."""
    field = mode_field(view.spec)
    name = field or MODE_FIELD
    modes = view.spec.modes if field is not None else DEEPEP_MODES
    if view.v[name] in modes:
        return None
    kind = f"backend {view.spec.name} supports modes" if field is not None else "DeepEP modes are"
    spec = FIELDS_BY_NAME[name]
    if view.v[name] in spec.sglang_only:
        return spec.choice_message(view.v[name], view.d(name), tuple(modes))
    return (f"{view.d(name)} is not valid: {kind} {', '.join(modes)}; fix: pass "
            f"{spec.flag} {modes[-1]}")


def dp_attention_error(view: View) -> Optional[str]:
    tp = view.v["tp_size"]
    if not view.v["enable_dp_attention"] or tp % view.v["dp_size"] == 0:
        return None
    return (
        f"{view.d('tp_size')} is not divisible by {view.d('dp_size')} with "
        f"{view.d('enable_dp_attention')}: DP attention splits the tp_size ranks into dp_size "
        f"groups of equal size; fix: pass --dp-size dividing --tp-size {tp} (one of "
        f"{divisors(tp)}), or drop --enable-dp-attention")


def ep_error(view: View) -> Optional[str]:
    """Why ep_size is invalid for this tp_size and backend, or None."""
    tp, dp, ep = view.v["tp_size"], view.v["dp_size"], view.v["ep_size"]
    sizes = f"(tp_size={tp}, dp_size={dp}, ep_size={ep})"
    if view.spec.ep_policy == "tp":
        if ep != tp:
            return (
                f"{view.d('ep_size')} conflicts with {view.d('moe_a2a_backend')}: this backend "
                f"derives ep_size from tp_size (ep_policy 'tp'), so ep_size must equal tp_size "
                f"{sizes}; fix: drop --ep-size, or pass --ep-size {tp}")
        return None
    if ep > tp:
        return (
            f"{view.d('ep_size')} exceeds {view.d('tp_size')}: experts are split over the "
            f"tp_size ranks, so ep_size <= tp_size {sizes}; fix: pass --ep-size dividing "
            f"--tp-size {tp} (one of {divisors(tp)}), or raise --tp-size")
    if tp % ep:
        return (
            f"{view.d('tp_size')} is not divisible by {view.d('ep_size')}: the tp_size ranks form "
            f"ep_size groups of equal size {sizes}; fix: pass --ep-size dividing --tp-size {tp} "
            f"(one of {divisors(tp)})")
    return None


def fusion_error(view: View) -> Optional[str]:
    if not (view.v["disable_shared_experts_fusion"] and view.v["enforce_shared_experts_fusion"]):
        return None
    return (f"{view.d('disable_shared_experts_fusion')} and "
            f"{view.d('enforce_shared_experts_fusion')} are mutually exclusive; fix: drop one")


def waterfill_backends() -> List[str]:
    """The built-in backends with the waterfill feature, in registry order."""
    from moe_a2a.backends import BUILTIN_NAMES, get_backend

    return [n for n in BUILTIN_NAMES if WATERFILL in get_backend(n).features]


def waterfill_error(view: View) -> Optional[str]:
    """Waterfill runs on a backend with the feature, with shared experts fused."""
    v = view.v
    if not v["enable_deepep_waterfill"]:
        return None
    if WATERFILL not in view.spec.features:
        able = ", ".join(waterfill_backends())
        return (f"{view.d('enable_deepep_waterfill')} needs a backend with the waterfill "
                f"feature ({able}), but {view.d('moe_a2a_backend')} was given; fix: drop "
                f"--moe-a2a-backend (waterfill then selects one) or drop --enable-deepep-waterfill")
    if not v["enforce_shared_experts_fusion"]:
        culprit = ("disable_shared_experts_fusion" if v["disable_shared_experts_fusion"]
                   else "enforce_shared_experts_fusion")
        return (f"{view.d('enable_deepep_waterfill')} needs shared-experts fusion (it places the "
                f"fused shared-expert column), but {view.d(culprit)} was given; fix: drop "
                f"--disable-shared-experts-fusion or --enable-deepep-waterfill")
    return None


def eplb_error(view: View) -> Optional[str]:
    if not view.v["enable_eplb"] or view.v["ep_size"] > 1:
        return None
    tp = view.v["tp_size"]
    if tp > 1:
        fix = (f"pass --ep-size N with N > 1 dividing --tp-size {tp} (one of {divisors(tp)}), "
               f"or use a backend that derives ep_size from tp_size (e.g. --moe-a2a-backend "
               f"alltoall)")
    else:
        fix = "raise --tp-size above 1 and give --ep-size (or a backend that derives it from tp_size)"
    return (f"{view.d('enable_eplb')} needs expert parallelism (ep_size > 1), but "
            f"{view.d('ep_size')}; fix: {fix}, or drop --enable-eplb")


def cuda_graph_error(view: View) -> Optional[str]:
    spec, mode = view.spec, view.mode
    if view.v["disable_cuda_graph"] or spec.supports_cuda_graph(mode):
        return None
    field = mode_field(spec)
    capturable = list(spec.cuda_graph_modes) if field is not None else []
    alt = (f", or use {FIELDS_BY_NAME[field].flag} {' or '.join(capturable)}"
           if capturable and field is not None else "")
    return (f"{view.d('disable_cuda_graph')}: {describe_backend(spec, mode)} cannot run inside "
            f"CUDA graphs; fix: drop --no-disable-cuda-graph (CUDA graphs are then turned off "
            f"automatically){alt}")


def gather_error(view: View) -> Optional[str]:
    gather = view.v["routed_experts_gather"]
    if gather not in GATHER_CHOICES:
        return (f"{view.d('routed_experts_gather')} is unresolved: a ServerArgs holds one of "
                f"{', '.join(GATHER_CHOICES)}; fix: build it with server_args.resolve()")
    attn_tp = view.attn_tp_size
    if gather == "none" and gather_needed(view.spec, attn_tp):
        return (f"{view.d('routed_experts_gather')}: backend {view.spec.name} scatters tokens over "
                f"the {attn_tp} attention-TP ranks, so captured ids must be gathered; fix: pass "
                f"--routed-experts-gather auto, early or late")
    return None


@dataclass(frozen=True)
class ResolvedState:
    """A postcondition of auto-configuration: every ``ServerArgs`` that ``resolve`` builds
    satisfies it, so one that breaks it (hand-written JSON, direct construction) is refused."""

    fields: Tuple[str, ...]
    holds: Callable[[Values], bool]
    guarantee: str


RESOLVED_STATES: Tuple[ResolvedState, ...] = (
    ResolvedState(("enable_dp_attention", "dp_size"),
                  lambda v: not (v["enable_dp_attention"] and v["dp_size"] == 1),
                  "DP attention is turned off when dp_size is 1"),
    ResolvedState(("enable_eplb", "expert_distribution_recorder_mode"),
                  lambda v: not (v["enable_eplb"] and v["expert_distribution_recorder_mode"] is None),
                  "EPLB on sets a recorder mode (stat)"),
    ResolvedState(("enable_eplb", "ep_dispatch_algorithm"),
                  lambda v: not (v["enable_eplb"] and v["ep_dispatch_algorithm"] is None),
                  "EPLB on sets a dispatch algorithm (static)"),
    ResolvedState(("init_expert_location",),
                  lambda v: expert_location_kind(v["init_expert_location"], "") != "file"
                  or os.path.isabs(v["init_expert_location"]),
                  "a file named by --init-expert-location is stored as an absolute path"),
    ResolvedState(("init_expert_location", "ep_dispatch_algorithm"),
                  lambda v: v["init_expert_location"] == "trivial"
                  or v["ep_dispatch_algorithm"] is not None,
                  "a placement other than trivial sets a dispatch algorithm (static)"),
    ResolvedState(("expert_distribution_recorder_mode", "expert_distribution_recorder_buffer_size"),
                  lambda v: v["expert_distribution_recorder_mode"] is None
                  or v["expert_distribution_recorder_buffer_size"] is not None,
                  "an active recorder gets a buffer size (--eplb-rebalance-num-iterations)"),
    ResolvedState(("moe_runner_backend",),
                  lambda v: v["moe_runner_backend"] != RUNNER_SELECTS_BACKEND,
                  f"--moe-runner-backend {RUNNER_SELECTS_BACKEND} becomes --moe-a2a-backend "
                  f"{RUNNER_SELECTS_BACKEND} with the auto runner"),
)


def unresolved_error(view: View) -> Optional[str]:
    """A state ``resolve`` never produces (checked after the fields are known to be valid)."""
    for state in RESOLVED_STATES:
        if not state.holds(view.v):
            given = ", ".join(view.d(name) for name in state.fields)
            return (f"{given}: resolve never produces this combination ({state.guarantee}); "
                    f"fix: build server arguments with server_args.resolve(), and send "
                    f"ServerArgs.to_json() to workers unchanged")
    return None


def capacity_error(view: View) -> Optional[str]:
    """Rule 9: every capacity holds the largest batch its rule covers."""
    for check in capacity_checks(view):
        for batch in check.batches:
            message = capacity_message(view, check, batch)
            if message:
                return message
    return None


def settings_error(view: View) -> Optional[str]:
    """The backend's own settings class accepts the values (raises ConfigError itself)."""
    build_settings(view.spec, view.v)
    return None


def json_fields_error(view: View) -> Optional[str]:
    """The JSON-valued fields are well formed (no file access)."""
    if view.v["deepep_config"] is not None:
        parse_json_object(view.v["deepep_config"], view.d("deepep_config"))
    location, what = view.v["init_expert_location"], view.d("init_expert_location")
    if expert_location_kind(location, what) == "json":
        check_expert_location_json(parse_json_object(location, what), what)
    return None


# In the order users should fix things: sizes before features before capacities.
CHECKS: Tuple[Check, ...] = (
    mode_error,
    dp_attention_error,
    ep_error,
    fusion_error,
    waterfill_error,
    eplb_error,
    cuda_graph_error,
    gather_error,
    unresolved_error,
    settings_error,
    capacity_error,
    json_fields_error,
)


def check_fields(view: View) -> None:
    """Field-local checks (type, choices, range) of every field."""
    for spec in FIELDS:
        spec.check(view.v[spec.name], view.d(spec.name))


def validate(values: Values, sources: Sources) -> BackendSpec:
    """Raise ConfigError for the first broken invariant; return the backend spec."""
    view = View(values, sources)
    check_fields(view)
    for check in CHECKS:
        message = check(view)
        if message:
            raise ConfigError(message)
    return view.spec


def batch_capacity_error(args: "ServerArgs", tokens_per_rank: int, shown: str,
                         lower_flag: str) -> Optional[str]:
    """Rule 9 applied to one batch a caller is about to run eagerly.

    Args:
        args: resolved server arguments.
        tokens_per_rank: the tokens one rank's kernel receives (``args.kernel_tokens(n)``
            turns a DP rank's batch into this).
        shown: how the batch was asked for (``--num-tokens 512``).
        lower_flag: the flag that lowers it.
    Returns:
        The error message naming the flag that raises the capacity, or None when every
        capacity of the backend's current mode holds the batch. Rules whose over-capacity
        action is ``fallback`` are skipped: an eager batch above them takes the fallback.
    """
    view = View(args.values(), args.sources, args.backend_spec)
    batch = Batch(tokens_per_rank, shown, lower_flag)
    for check in capacity_checks(view):
        if check.rule.over_capacity == "error":
            message = capacity_message(view, check, batch)
            if message:
                return message
    return None
