"""Validation of a complete set of values: every invariant a resolved ``ServerArgs`` satisfies.

It runs when a ``ServerArgs`` is created (by ``resolve`` or ``from_json``), so an invalid one
cannot exist. It reads values only (no environment, no files); ``sources`` only shape the
messages (``--ep-size 4`` vs ``MOE_A2A_EP_SIZE=4``).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple

from moe_a2a.backends import MoeA2ABackend, UnknownBackendError, get_backend
from moe_a2a.backends.spec import BackendSpec
from moe_a2a.server_args.errors import ConfigError
from moe_a2a.server_args.fields import DEEPEP_MODES, FIELDS, FIELDS_BY_NAME, describe

Values = Mapping[str, Any]
Sources = Mapping[str, str]

GATHER_CHOICES = ("early", "late", "none")  # resolved values (auto is resolved away)
EXPERT_LOCATION_KEYS = ("physical_to_logical_map", "logical_count")


class View:
    """Values, their sources, and message helpers."""

    def __init__(self, values: Values, sources: Sources) -> None:
        self.v = values
        self.sources = sources

    def d(self, name: str) -> str:
        return describe(name, self.v[name], self.sources.get(name, "default"))

    @property
    def attn_dp_size(self) -> int:
        return self.v["dp_size"] if self.v["enable_dp_attention"] else 1

    @property
    def attn_tp_size(self) -> int:
        return self.v["tp_size"] // self.attn_dp_size


# ---- helpers shared with resolve ------------------------------------------------------------

def backend_spec(name: str, given: str) -> BackendSpec:
    """The registered spec; an unknown name becomes a ConfigError naming where it came from."""
    try:
        return get_backend(name)
    except UnknownBackendError as exc:  # keep the registry's message: it lists the names
        raise ConfigError(f"{given}: {exc}") from exc


def has_modes(spec: BackendSpec) -> bool:
    return tuple(spec.modes) != ("default",)


def effective_mode(spec: BackendSpec, deepep_mode: str) -> str:
    """The mode the backend runs in: ``--deepep-mode`` for backends with modes, else default."""
    return deepep_mode if has_modes(spec) else "default"


def valid_modes(spec: BackendSpec) -> Tuple[str, ...]:
    return tuple(spec.modes) if has_modes(spec) else DEEPEP_MODES


def gather_needed(spec: BackendSpec, attn_tp_size: int) -> bool:
    """Captured ids need a gather when each attention-TP rank holds a different slice."""
    return spec.token_layout == "scattered" and attn_tp_size > 1


def divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def ep_error(view: View, spec: BackendSpec) -> Optional[str]:
    """Why ep_size is invalid for this tp_size and backend, or None."""
    tp, dp, ep = view.v["tp_size"], view.v["dp_size"], view.v["ep_size"]
    sizes = f"(tp_size={tp}, dp_size={dp}, ep_size={ep})"
    if spec.ep_policy == "tp":
        if ep != tp:
            return (
                f"{view.d('ep_size')} conflicts with {view.d('moe_a2a_backend')}: this backend "
                f"derives ep_size from tp_size (ep_policy 'tp'), so ep_size must equal tp_size "
                f"{sizes}; fix: drop --ep-size, or pass --ep-size {tp}"
            )
        return None
    if ep > tp:
        return (
            f"{view.d('ep_size')} exceeds {view.d('tp_size')}: experts are split over the "
            f"tp_size ranks, so ep_size <= tp_size {sizes}; fix: pass --ep-size dividing "
            f"--tp-size {tp} (one of {divisors(tp)}), or raise --tp-size"
        )
    if tp % ep:
        return (
            f"{view.d('tp_size')} is not divisible by {view.d('ep_size')}: the tp_size ranks form "
            f"ep_size groups of equal size {sizes}; fix: pass --ep-size dividing --tp-size {tp} "
            f"(one of {divisors(tp)})"
        )
    return None


def waterfill_error(view: View, spec: BackendSpec) -> Optional[str]:
    v = view.v
    if not v["enable_deepep_waterfill"]:
        return None
    deepep = MoeA2ABackend.DEEPEP.value  # waterfill is a DeepEP feature: it selects deepep
    if spec.name != deepep:
        return (
            f"{view.d('enable_deepep_waterfill')} needs --moe-a2a-backend {deepep}, but "
            f"{view.d('moe_a2a_backend')} was given; fix: drop --moe-a2a-backend (waterfill "
            f"selects {deepep}) or drop --enable-deepep-waterfill"
        )
    if not v["enforce_shared_experts_fusion"]:
        culprit = ("disable_shared_experts_fusion" if v["disable_shared_experts_fusion"]
                   else "enforce_shared_experts_fusion")
        return (
            f"{view.d('enable_deepep_waterfill')} needs shared-experts fusion (it places the "
            f"fused shared-expert column), but {view.d(culprit)} was given; fix: drop "
            f"--disable-shared-experts-fusion or --enable-deepep-waterfill"
        )
    return None


def cuda_graph_error(view: View, spec: BackendSpec) -> Optional[str]:
    mode = effective_mode(spec, view.v["deepep_mode"])
    if view.v["disable_cuda_graph"] or spec.supports_cuda_graph(mode):
        return None
    capturable = list(spec.cuda_graph_modes) if has_modes(spec) else []
    alt = f", or use --deepep-mode {' or '.join(capturable)}" if capturable else ""
    return (
        f"{view.d('disable_cuda_graph')}: {backend_mode(spec, mode)} cannot run inside CUDA "
        f"graphs; fix: drop --no-disable-cuda-graph (CUDA graphs are then turned off "
        f"automatically){alt}"
    )


def backend_mode(spec: BackendSpec, mode: str) -> str:
    return f"backend {spec.name}" + (f" in mode {mode}" if has_modes(spec) else "")


def eplb_error(view: View, spec: Optional[BackendSpec] = None) -> Optional[str]:
    if not view.v["enable_eplb"] or view.v["ep_size"] > 1:
        return None
    tp = view.v["tp_size"]
    if tp > 1:
        fix = (f"pass --ep-size N with N > 1 dividing --tp-size {tp} (one of "
               f"{divisors(tp)}), or use a backend that derives ep_size from tp_size "
               f"(e.g. --moe-a2a-backend alltoall)")
    else:
        fix = "raise --tp-size above 1 and give --ep-size (or a backend that derives it from tp_size)"
    return (f"{view.d('enable_eplb')} needs expert parallelism (ep_size > 1), but "
            f"{view.d('ep_size')}; fix: {fix}, or drop --enable-eplb")


def decode_batches(view: View) -> Iterator[Tuple[int, str, str]]:
    """The largest per-rank batches the settings allow: (tokens, shown as, flag that lowers it)."""
    v = view.v
    if v["cuda_graph_max_bs"] is not None and not v["disable_cuda_graph"]:
        yield v["cuda_graph_max_bs"], view.d("cuda_graph_max_bs"), "--cuda-graph-max-bs"
    if v["max_running_requests"] is not None:
        dp = view.attn_dp_size
        per_rank = -(-v["max_running_requests"] // dp)  # ceil: the fullest DP rank counts
        shown = view.d("max_running_requests")
        if dp > 1:
            shown += f" over {dp} DP ranks"
        yield per_rank, shown, "--max-running-requests"


def capacity_checks(view: View, spec: BackendSpec) -> Iterator[Tuple[str, List[Tuple[int, str, str]], str]]:
    """(capacity field, batches it must hold, why) for the capacities the backend uses."""
    mode = effective_mode(spec, view.v["deepep_mode"])
    if "low_latency" in spec.modes and mode in ("low_latency", "auto"):
        batches = list(decode_batches(view))
        chunk = view.v["chunked_prefill_size"]
        if mode == "low_latency" and chunk is not None and chunk > 0:
            # every batch, prefill chunks included, goes through the low-latency buffers
            batches.append((chunk, view.d("chunked_prefill_size"), "--chunked-prefill-size"))
        yield ("deepep_num_max_dispatch_tokens_per_rank", batches,
               f"{spec.name} mode {mode} dispatches decode batches through low-latency buffers "
               f"sized by it")
    if spec.fused_experts:
        yield ("mega_moe_num_max_tokens_per_rank", list(decode_batches(view)),
               f"{spec.name} runs batches up to this size on its fused path (captured CUDA graphs "
               f"always take it)")


def capacity_error(view: View, spec: BackendSpec,
                   batches_override: Optional[List[Tuple[int, str, str]]] = None) -> Optional[str]:
    for field, batches, why in capacity_checks(view, spec):
        if batches_override is not None:
            batches = batches_override
        cap = view.v[field]
        high = FIELDS_BY_NAME[field].max
        flag = FIELDS_BY_NAME[field].flag
        for need, shown, lower_flag in batches:
            if need <= cap:
                continue
            if high is not None and need > high:
                fix = (f"lower {lower_flag} so that at most {high} tokens reach one rank "
                       f"({flag} cannot exceed {high})")
            else:
                fix = f"raise {flag} to at least {need}, or lower {lower_flag}"
            return (f"{view.d(field)} is smaller than the largest per-rank batch of {need} tokens "
                    f"({shown}): {why}; fix: {fix}")
    return None


def parse_json_object(text: str, what: str) -> dict:
    """Parse JSON text that must hold an object; errors point at line and column."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
            f"(character {exc.pos}); fix: correct the JSON"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} holds a JSON {type(obj).__name__}, not an object; fix: "
                          f"give a JSON object {{...}}")
    return obj


def expert_location_kind(text: str, given: str) -> str:
    """``trivial``, ``json`` (inline text) or ``file`` (a .json/.pt path); error otherwise."""
    stripped = text.strip()
    if stripped == "trivial":
        return "trivial"
    if stripped.startswith("{"):
        return "json"
    if stripped.endswith((".json", ".pt")):
        return "file"
    raise ConfigError(
        f"{given} is not understood: expected 'trivial', JSON text, or a path ending in .json "
        f"or .pt; fix: pass one of those"
    )


def check_expert_location_json(obj: dict, what: str) -> None:
    if not any(key in obj for key in EXPERT_LOCATION_KEYS):
        raise ConfigError(
            f"{what} has keys {sorted(obj)} but needs one of {', '.join(EXPERT_LOCATION_KEYS)}; "
            f"fix: give physical_to_logical_map ([layers][physical slots] of logical ids) or "
            f"logical_count ([layers][experts] of token counts)"
        )


# ---- the checks -----------------------------------------------------------------------------

def check_fields(view: View) -> None:
    """Field-local checks (type, choices, range) of every field."""
    for spec in FIELDS:
        spec.check(view.v[spec.name], view.d(spec.name))


def mode_error(view: View, spec: BackendSpec) -> Optional[str]:
    modes = valid_modes(spec)
    if view.v["deepep_mode"] in modes:
        return None
    kind = f"backend {spec.name} supports modes" if has_modes(spec) else "DeepEP modes are"
    return (f"{view.d('deepep_mode')} is not valid: {kind} {', '.join(modes)}; fix: pass "
            f"--deepep-mode {modes[-1]}")


def dp_attention_error(view: View, spec: BackendSpec) -> Optional[str]:
    tp = view.v["tp_size"]
    if not view.v["enable_dp_attention"] or tp % view.v["dp_size"] == 0:
        return None
    return (
        f"{view.d('tp_size')} is not divisible by {view.d('dp_size')} with "
        f"{view.d('enable_dp_attention')}: DP attention splits the tp_size ranks into dp_size "
        f"groups of equal size; fix: pass --dp-size dividing --tp-size {tp} (one of "
        f"{divisors(tp)}), or drop --enable-dp-attention"
    )


def fusion_error(view: View, spec: BackendSpec) -> Optional[str]:
    if not (view.v["disable_shared_experts_fusion"] and view.v["enforce_shared_experts_fusion"]):
        return None
    return (f"{view.d('disable_shared_experts_fusion')} and "
            f"{view.d('enforce_shared_experts_fusion')} are mutually exclusive; fix: drop one")


def gather_error(view: View, spec: BackendSpec) -> Optional[str]:
    gather = view.v["routed_experts_gather"]
    if gather not in GATHER_CHOICES:
        return (f"{view.d('routed_experts_gather')} is unresolved: a ServerArgs holds one of "
                f"{', '.join(GATHER_CHOICES)}; fix: build it with server_args.resolve()")
    if gather == "none" and gather_needed(spec, view.attn_tp_size):
        return (f"{view.d('routed_experts_gather')}: backend {spec.name} scatters tokens over "
                f"the {view.attn_tp_size} attention-TP ranks, so captured ids must be gathered; "
                f"fix: pass --routed-experts-gather auto, early or late")
    return None


def json_fields_error(view: View, spec: BackendSpec) -> Optional[str]:
    if view.v["deepep_config"] is not None:
        parse_json_object(view.v["deepep_config"], view.d("deepep_config"))
    location = view.v["init_expert_location"]
    what = view.d("init_expert_location")
    if expert_location_kind(location, what) == "json":
        check_expert_location_json(parse_json_object(location, what), what)
    return None


# In the order users should fix things: sizes before features before capacities.
CHECKS: Tuple[Callable[[View, BackendSpec], Optional[str]], ...] = (
    mode_error,
    dp_attention_error,
    ep_error,
    fusion_error,
    waterfill_error,
    eplb_error,
    cuda_graph_error,
    gather_error,
    capacity_error,
    json_fields_error,
)


def validate(values: Values, sources: Sources) -> BackendSpec:
    """Raise ConfigError for the first broken invariant; return the backend spec."""
    view = View(values, sources)
    check_fields(view)
    spec = backend_spec(values["moe_a2a_backend"], view.d("moe_a2a_backend"))
    for check in CHECKS:
        message = check(view, spec)
        if message:
            raise ConfigError(message)
    return spec


def batch_capacity_error(args, tokens_per_rank: int, shown: str, lower_flag: str) -> Optional[str]:
    """The capacity rule of ``resolve`` applied to a batch a caller is about to run.

    ``args`` is a resolved ``ServerArgs``; returns the error message (naming the flag that
    raises the capacity) or None when every per-rank capacity of its backend holds the batch.
    """
    view = View(args.values(), dict(args.sources))
    return capacity_error(view, args.backend_spec, [(tokens_per_rank, shown, lower_flag)])
