"""server_args: sources and precedence, auto-configuration rules, validation, JSON, layout."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import warnings

import pytest

from moe_a2a import backends
from moe_a2a.backends import MoeA2ABackend, register_backend, registry_snapshot
from moe_a2a.server_args import (
    FIELDS,
    PRECEDENCE,
    REMOVAL_RELEASE,
    ConfigDeprecationWarning,
    ConfigError,
    ConfigWarning,
    Decision,
    ParallelLayout,
    ServerArgs,
    Source,
    SourceKind,
    add_arguments,
    explicit_values,
    help_text,
    read_launch_env,
    resolve,
    resolve_namespace,
)
from moe_a2a.server_args.fields import BOOL_FALSE, BOOL_TRUE, FIELD_NAMES, FIELDS_BY_NAME, Kind


def R(argv=(), env=None, **kwargs) -> ServerArgs:
    """Resolve with an empty environment unless given, Python warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve(list(argv), env={} if env is None else env, **kwargs)


def err(argv=(), env=None, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        R(argv, env, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints one line
    return message


def src(args: ServerArgs, field: str) -> str:
    """A field's source in its text form (``cli``, ``env:MOE_A2A_TP_SIZE`` ...)."""
    source = args.sources[field]
    assert isinstance(source, Source)  # typed, not a string
    return str(source)


def decision(args: ServerArgs, field: str) -> Decision:
    found = [d for d in args.decisions if d.field == field]
    assert found, f"no decision for {field}: {args.decisions}"
    return found[-1]


def has_decision(args: ServerArgs, field: str) -> bool:
    return any(d.field == field for d in args.decisions)


# ---- defaults and the field table --------------------------------------------------------------

def test_defaults_resolve_to_a_valid_config():
    a = R()
    assert a.moe_a2a_backend == "none"
    assert (a.tp_size, a.dp_size, a.ep_size) == (1, 1, 1)
    assert a.deepep_mode == "auto"
    assert a.deepep_num_max_dispatch_tokens_per_rank == 128
    assert a.mega_moe_num_max_tokens_per_rank == 1024
    assert a.eplb_rebalance_num_iterations == 1000
    assert a.init_expert_location == "trivial"
    assert a.routed_experts_gather == "none"
    assert a.warnings == ()
    assert all(src(a, f.name) in ("default", "auto") for f in FIELDS)


def test_field_table_is_derived_from_the_model_declaration():
    assert tuple(ServerArgs.model_fields) == FIELD_NAMES
    spec = FIELDS_BY_NAME["deepep_num_max_dispatch_tokens_per_rank"]
    info = ServerArgs.model_fields[spec.name]
    assert (spec.default, spec.max, spec.type) == (info.default, 1024, int)
    assert [legacy.var for legacy in spec.legacy] == ["SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"]
    assert FIELDS_BY_NAME["cuda_graph_max_bs"].nullable
    assert FIELDS_BY_NAME["deepep_config"].kind is Kind.JSON_OBJECT


def test_field_table_has_the_spec_flags():
    flags = {flag for f in FIELDS for flag in f.flags}
    for flag in ("--moe-a2a-backend", "--tp-size", "--tensor-parallel-size", "--tp", "--dp-size",
                 "--data-parallel-size", "--dp", "--ep-size", "--expert-parallel-size", "--ep",
                 "--enable-dp-attention", "--deepep-mode", "--deepep-config",
                 "--deepep-num-max-dispatch-tokens-per-rank", "--mega-moe-num-max-tokens-per-rank",
                 "--enable-return-routed-experts", "--routed-experts-gather",
                 "--disable-shared-experts-fusion", "--enforce-shared-experts-fusion",
                 "--enable-deepep-waterfill", "--enable-eplb", "--ep-num-redundant-experts",
                 "--eplb-algorithm", "--ep-dispatch-algorithm", "--init-expert-location",
                 "--expert-distribution-recorder-mode", "--expert-distribution-recorder-buffer-size",
                 "--eplb-rebalance-num-iterations", "--disable-cuda-graph", "--cuda-graph-max-bs",
                 "--chunked-prefill-size", "--max-running-requests", "--mega-moe-fix-memory",
                 "--deepep-waterfill-dynamic"):
        assert flag in flags
    assert all(f.env == "MOE_A2A_" + f.name.upper() for f in FIELDS)


# ---- precedence ----------------------------------------------------------------------------------

LAYERS = ("defaults", "legacy", "env", "cli", "kwargs")
CAP = "deepep_num_max_dispatch_tokens_per_rank"
CAP_VALUES = {"defaults": 200, "legacy": 300, "env": 400, "cli": 500, "kwargs": 600}
CAP_SOURCES = {"defaults": "default", "legacy": "legacy_env:SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK",
               "env": f"env:MOE_A2A_{CAP.upper()}", "cli": "cli", "kwargs": "kwargs"}


@pytest.mark.parametrize("present", [
    combo for n in range(len(LAYERS) + 1) for combo in itertools.combinations(LAYERS, n)
], ids=lambda c: "+".join(c) or "builtin")
def test_precedence_matrix(present):
    env, argv, kwargs, defaults = {}, ["--moe-a2a-backend", "deepep"], {}, {}
    if "defaults" in present:
        defaults[CAP] = CAP_VALUES["defaults"]
    if "legacy" in present:
        env["SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"] = str(CAP_VALUES["legacy"])
    if "env" in present:
        env[f"MOE_A2A_{CAP.upper()}"] = str(CAP_VALUES["env"])
    if "cli" in present:
        argv += ["--deepep-num-max-dispatch-tokens-per-rank", str(CAP_VALUES["cli"])]
    if "kwargs" in present:
        kwargs[CAP] = CAP_VALUES["kwargs"]
    a = R(argv, env, defaults=defaults, **kwargs)
    winner = present[-1] if present else None
    assert getattr(a, CAP) == (CAP_VALUES[winner] if winner else 128)
    assert src(a, CAP) == (CAP_SOURCES[winner] if winner else "default")
    conflict = [w for w in a.warnings if "is ignored" in w]
    legacy_lost = "legacy" in present and winner != "legacy"
    assert len(conflict) == (1 if legacy_lost else 0)
    if legacy_lost:
        assert "SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK=300" in conflict[0]
        assert str(CAP_VALUES[winner]) in conflict[0]


def test_precedence_is_declared_in_one_place():
    assert PRECEDENCE == ("default", "legacy_env", "env", "cli", "kwargs")
    assert all(isinstance(kind, SourceKind) for kind in PRECEDENCE)


def test_the_resolver_reads_the_precedence_order(monkeypatch):
    """Reversing the data reverses who wins: the order is read, not hard-coded."""
    import importlib

    resolve_module = importlib.import_module("moe_a2a.server_args.resolve")
    monkeypatch.setattr(resolve_module, "PRECEDENCE", tuple(reversed(PRECEDENCE)))
    a = R(["--tp-size", "2"], {"MOE_A2A_TP_SIZE": "4"}, tp_size=8)
    assert a.tp_size == 1 and src(a, "tp_size") == "default"


def test_sources_are_typed():
    a = R(["--tp-size", "2", "--moe-a2a-backend", "deepep"],
          {"SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "64", "MOE_A2A_ENABLE_EPLB": "0"})
    assert a.sources["tp_size"] == Source(SourceKind.CLI)
    assert a.sources["ep_size"].kind is SourceKind.AUTO and a.sources["ep_size"].variable is None
    legacy = a.sources[CAP]
    assert (legacy.kind, legacy.variable) == (SourceKind.LEGACY_ENV,
                                             "SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK")
    assert legacy.is_set and not legacy.explicit
    assert a.sources["enable_eplb"] == Source(SourceKind.ENV, "MOE_A2A_ENABLE_EPLB")
    assert Source.parse(str(legacy)) == legacy
    with pytest.raises(ConfigError, match="not understood"):
        Source.parse("telepathy")
    with pytest.raises(ConfigError, match="needs variable"):
        Source(SourceKind.ENV)


def test_legacy_that_agrees_with_the_flag_only_deprecates():
    a = R(["--deepep-num-max-dispatch-tokens-per-rank", "256", "--moe-a2a-backend", "deepep"],
          {"SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "256"})
    assert len(a.warnings) == 1 and "deprecated" in a.warnings[0]


def test_caller_defaults_are_defaults_env_overrides_them():
    a = R(defaults={"moe_a2a_backend": "alltoall", "tp_size": 2})
    assert (a.moe_a2a_backend, a.tp_size, a.ep_size) == ("alltoall", 2, 2)
    assert src(a, "tp_size") == "default"
    b = R(env={"MOE_A2A_TP_SIZE": "4"}, defaults={"moe_a2a_backend": "alltoall", "tp_size": 2})
    assert (b.tp_size, b.ep_size, src(b, "tp_size")) == (4, 4, "env:MOE_A2A_TP_SIZE")
    c = R(env={"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "1"}, defaults={"moe_a2a_backend": "alltoall"})
    assert c.moe_a2a_backend == "megamoe"
    assert decision(c, "moe_a2a_backend").from_ == "alltoall"


def test_caller_default_for_ep_is_replaced_by_derivation():
    a = R(["--moe-a2a-backend", "alltoall", "--tp-size", "4"], defaults={"ep_size": 2})
    assert a.ep_size == 4 and decision(a, "ep_size").from_ == 2


def test_kwargs_apply_after_argv():
    a = R(["--tp-size", "2"], tp_size=4)
    assert a.tp_size == 4 and src(a, "tp_size") == "kwargs"


# ---- environment parsing -------------------------------------------------------------------------

@pytest.mark.parametrize("text", [s for t in BOOL_TRUE for s in (t, t.upper(), t.title())])
def test_boolean_true_spellings(text):
    a = R(env={"MOE_A2A_ENABLE_RETURN_ROUTED_EXPERTS": text})
    assert a.enable_return_routed_experts is True
    assert src(a, "enable_return_routed_experts") == "env:MOE_A2A_ENABLE_RETURN_ROUTED_EXPERTS"


@pytest.mark.parametrize("text", [s for t in BOOL_FALSE for s in (t, t.upper(), f" {t} ")])
def test_boolean_false_spellings(text):
    a = R(["--enable-return-routed-experts"], env={"MOE_A2A_DISABLE_CUDA_GRAPH": text})
    assert a.disable_cuda_graph is False
    assert src(a, "disable_cuda_graph") == "env:MOE_A2A_DISABLE_CUDA_GRAPH"


@pytest.mark.parametrize("var", ["MOE_A2A_ENABLE_EPLB", "SGLANG_OPT_FIX_MEGA_MOE_MEMORY",
                                 "SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE"])
def test_bad_boolean_names_variable_and_spellings(var):
    message = err(env={var: "maybe"})
    assert f"{var}='maybe'" in message
    assert "1/0, true/false, yes/no, on/off" in message


def test_bad_int_env_names_variable():
    message = err(env={"MOE_A2A_TP_SIZE": "four"})
    assert "MOE_A2A_TP_SIZE='four'" in message and "not an integer" in message
    message = err(env={"SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "1.5"})
    assert "SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK='1.5'" in message


def test_int_env_with_spaces_and_empty_means_unset():
    assert R(env={"MOE_A2A_TP_SIZE": " 4 "}).tp_size == 4
    a = R(env={"MOE_A2A_TP_SIZE": "", "SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": ""})
    assert a.tp_size == 1 and a.moe_a2a_backend == "none" and a.warnings == ()


ENV_SAMPLES = {"moe_a2a_backend": "alltoall", "moe_runner_backend": "grouped_mm",
               "deepep_mode": "auto", "deepep_config": "{}",
               "init_expert_location": "trivial", "routed_experts_gather": "none"}


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.env)
def test_every_field_has_a_working_env_variable(field):
    if field.type is str:
        text = ENV_SAMPLES.get(field.name) or field.choices[-1]
    else:
        text = {bool: "1", int: "2"}[field.type]
    env = {"MOE_A2A_TP_SIZE": "2", "MOE_A2A_DP_SIZE": "2", field.env: text}
    if field.name == "enable_eplb":
        env["MOE_A2A_EP_SIZE"] = "2"
    a = R(env=env)
    assert src(a, field.name) == f"env:{field.env}"


def test_unknown_moe_a2a_variable_warns_with_suggestion():
    a = R(env={"MOE_A2A_TP": "4"})
    assert a.tp_size == 1
    assert any("MOE_A2A_TP is not a moe-a2a setting" in w and "MOE_A2A_TP_SIZE" in w
               for w in a.warnings)


def test_env_none_reads_os_environ(monkeypatch):
    monkeypatch.setenv("MOE_A2A_TP_SIZE", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = resolve([])
    assert a.tp_size == 2 and src(a, "tp_size") == "env:MOE_A2A_TP_SIZE"
    assert R().tp_size == 1  # env={} ignores it


# ---- legacy variables and flags ------------------------------------------------------------------

def test_legacy_megamoe_selects_megamoe_with_decision_and_deprecation():
    with pytest.warns(ConfigDeprecationWarning, match="SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE"):
        a = resolve(["--tp-size", "4"], env={"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "1"})
    assert (a.moe_a2a_backend, a.ep_size) == ("megamoe", 4)
    assert src(a, "moe_a2a_backend") == "legacy_env:SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE"
    d = decision(a, "moe_a2a_backend")
    assert (d.from_, d.to) == ("none", "megamoe")
    (dep,) = [w for w in a.warnings if "deprecated" in w]
    assert "--moe-a2a-backend megamoe" in dep and REMOVAL_RELEASE in dep


def test_legacy_megamoe_loses_to_explicit_backend_and_warns_naming_both():
    a = R(["--tp-size", "4", "--moe-a2a-backend", "deepep"], {"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "1"})
    assert a.moe_a2a_backend == "deepep" and a.ep_size == 4
    (conflict,) = [w for w in a.warnings if "ignored" in w]
    assert "SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE=1" in conflict and "--moe-a2a-backend deepep" in conflict
    assert not any(d.field == "moe_a2a_backend" for d in a.decisions)
    b = R(env={"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "1", "MOE_A2A_MOE_A2A_BACKEND": "alltoall"})
    assert b.moe_a2a_backend == "alltoall"
    assert any("MOE_A2A_MOE_A2A_BACKEND=alltoall" in w for w in b.warnings)


def test_legacy_megamoe_off_changes_nothing_but_deprecates():
    a = R(env={"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "0"})
    assert a.moe_a2a_backend == "none" and not has_decision(a, "moe_a2a_backend")
    assert len(a.warnings) == 1 and "deprecated" in a.warnings[0]


@pytest.mark.parametrize("var, value, field, expected, flag", [
    ("SGLANG_OPT_FIX_MEGA_MOE_MEMORY", "0", "mega_moe_fix_memory", False, "--mega-moe-fix-memory"),
    ("SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK", "512",
     "mega_moe_num_max_tokens_per_rank", 512, "--mega-moe-num-max-tokens-per-rank"),
    ("SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "256",
     "deepep_num_max_dispatch_tokens_per_rank", 256, "--deepep-num-max-dispatch-tokens-per-rank"),
    ("SGLANG_DISABLE_STATIC_WATERFILL", "true", "deepep_waterfill_dynamic", True,
     "--deepep-waterfill-dynamic"),
])
def test_legacy_variables_map_to_fields(var, value, field, expected, flag):
    backend = {"mega_moe_fix_memory": "megamoe", "mega_moe_num_max_tokens_per_rank": "megamoe",
               "deepep_num_max_dispatch_tokens_per_rank": "deepep"}.get(field)
    argv = ["--moe-a2a-backend", backend] if backend else ["--enable-deepep-waterfill"]
    with pytest.warns(ConfigDeprecationWarning) as record:
        a = resolve(argv, env={var: value})
    assert getattr(a, field) == expected
    assert src(a, field) == f"legacy_env:{var}"
    messages = [str(r.message) for r in record if r.category is ConfigDeprecationWarning]
    assert any(var in m and flag in m and REMOVAL_RELEASE in m for m in messages)
    assert not has_decision(a, field)  # set by the user (through the legacy name): no auto change


def test_legacy_flag_enable_deepep_moe():
    a = R(["--enable-deepep-moe", "--tp-size", "2"])
    assert a.moe_a2a_backend == "deepep" and src(a, "moe_a2a_backend") == "cli"
    (dep,) = a.warnings
    assert "--enable-deepep-moe" in dep and "--moe-a2a-backend deepep" in dep and REMOVAL_RELEASE in dep
    assert R(["--enable-deepep-moe", "--moe-a2a-backend", "deepep"]).moe_a2a_backend == "deepep"
    message = err(["--enable-deepep-moe", "--moe-a2a-backend", "alltoall"])
    assert "--enable-deepep-moe" in message and "--moe-a2a-backend alltoall" in message
    assert "fix" in message
    # command line beats MOE_A2A_* even in its legacy spelling
    assert R(["--enable-deepep-moe"], {"MOE_A2A_MOE_A2A_BACKEND": "alltoall"}).moe_a2a_backend == "deepep"


def test_legacy_flag_enable_ep_moe():
    a = R(["--enable-ep-moe", "--tp-size", "4"])
    assert a.ep_size == 4 and a.moe_tp_size == 1
    assert "--ep-size 4" in a.warnings[0] and REMOVAL_RELEASE in a.warnings[0]
    message = err(["--enable-ep-moe", "--tp-size", "4", "--ep-size", "2"])
    assert "--enable-ep-moe" in message and "--ep-size 2" in message


def test_legacy_flags_as_kwargs():
    with pytest.warns(ConfigDeprecationWarning, match="--enable-deepep-moe"):
        a = resolve(env={}, enable_deepep_moe=True, tp_size=2)
    assert a.moe_a2a_backend == "deepep" and src(a, "moe_a2a_backend") == "kwargs"


# ---- rule 1: waterfill ---------------------------------------------------------------------------

def test_rule1_waterfill_selects_deepep_and_fusion():
    a = R(["--enable-deepep-waterfill", "--tp-size", "2"])
    assert a.moe_a2a_backend == "deepep" and a.enforce_shared_experts_fusion
    assert "waterfill" in decision(a, "moe_a2a_backend").reason
    assert decision(a, "enforce_shared_experts_fusion").to is True


def test_rule1_waterfill_with_explicit_other_backend_is_an_error():
    message = err(["--enable-deepep-waterfill", "--moe-a2a-backend", "alltoall"])
    assert "--enable-deepep-waterfill" in message and "--moe-a2a-backend alltoall" in message
    assert "fix" in message
    message = err(env={"MOE_A2A_ENABLE_DEEPEP_WATERFILL": "1", "MOE_A2A_MOE_A2A_BACKEND": "none"})
    assert "MOE_A2A_MOE_A2A_BACKEND=none" in message


def test_rule1_waterfill_with_disabled_fusion_is_an_error():
    message = err(["--enable-deepep-waterfill", "--disable-shared-experts-fusion"])
    assert "--disable-shared-experts-fusion" in message and "fix" in message


def test_rule1_waterfill_overrides_defaults_and_legacy_backend():
    a = R(["--enable-deepep-waterfill"], defaults={"moe_a2a_backend": "alltoall",
                                                   "disable_shared_experts_fusion": True})
    assert a.moe_a2a_backend == "deepep" and a.enforce_shared_experts_fusion
    assert not a.disable_shared_experts_fusion
    c = R(["--enable-deepep-waterfill"], {"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "1"})
    # Changed with the waterfill feature: megamoe has it (SGLang 0.5.23 runs waterfill on
    # megamoe; 0.5.14 also ended on megamoe, its megamoe switch ran after waterfill's), so the
    # legacy megamoe switch is honoured instead of being overridden by deepep.
    assert c.moe_a2a_backend == "megamoe" and c.enforce_shared_experts_fusion
    assert not any("ignored" in w for w in c.warnings)


def test_rule1_asks_the_spec_for_the_waterfill_feature():
    """A third-party backend with the feature runs waterfill; one without it is refused."""
    with registry_snapshot():
        register_backend("filler", "tests.nowhere:Filler", token_layout="scattered",
                         ep_policy="tp", features=("waterfill",))
        register_backend("plain", "tests.nowhere:Plain", token_layout="scattered", ep_policy="tp")
        a = R(["--enable-waterfill", "--moe-a2a-backend", "filler", "--tp-size", "2"])
        assert a.moe_a2a_backend == "filler" and a.enforce_shared_experts_fusion
        message = err(["--enable-deepep-waterfill", "--moe-a2a-backend", "plain"])
        assert "waterfill feature (deepep, megamoe)" in message and "--moe-a2a-backend plain" in message


def test_waterfill_dynamic_without_waterfill_warns():
    a = R(["--deepep-waterfill-dynamic"])
    assert any("--deepep-waterfill-dynamic has no effect" in w for w in a.warnings)
    assert not R(["--enable-deepep-waterfill", "--deepep-waterfill-dynamic"]).warnings


# ---- rule 3: ep from tp --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["alltoall", "deepep", "megamoe"])
def test_rule3_ep_derived_from_tp(backend):
    a = R(["--moe-a2a-backend", backend, "--tp-size", "8"])
    assert a.ep_size == 8 and a.moe_tp_size == 1 and src(a, "ep_size") == "auto"
    d = decision(a, "ep_size")
    assert (d.from_, d.to) == (1, 8) and backend in d.reason


def test_rule3_explicit_equal_ep_is_kept_without_decision():
    a = R(["--moe-a2a-backend", "deepep", "--tp-size", "8", "--ep-size", "8"])
    assert a.ep_size == 8 and not has_decision(a, "ep_size") and src(a, "ep_size") == "cli"


def test_rule3_explicit_different_ep_is_an_error_showing_sizes_and_fix():
    message = err(["--moe-a2a-backend", "deepep", "--tp-size", "8", "--ep-size", "4"])
    for part in ("--ep-size 4", "--moe-a2a-backend deepep", "tp_size=8", "dp_size=1", "ep_size=4",
                 "fix", "--ep-size 8"):
        assert part in message
    message = err(["--moe-a2a-backend", "alltoall", "--tp-size", "4"], {"MOE_A2A_EP_SIZE": "2"})
    assert "MOE_A2A_EP_SIZE=2" in message


def test_rule3_tp1_keeps_ep1():
    a = R(["--moe-a2a-backend", "alltoall"])
    assert a.ep_size == 1 and not has_decision(a, "ep_size")


def test_user_policy_ep_must_divide_tp():
    message = err(["--tp-size", "4", "--ep-size", "3"])
    assert "--tp-size 4" in message and "--ep-size 3" in message and "1, 2, 4" in message
    message = err(["--tp-size", "4", "--ep-size", "8"])
    assert "exceeds" in message and "--ep-size 8" in message
    a = R(["--tp-size", "8", "--ep", "4"])
    assert (a.ep_size, a.moe_tp_size) == (4, 2)


# ---- rule 4: megamoe memory sharing --------------------------------------------------------------

def test_rule4_megamoe_fix_memory_defaults_true():
    a = R(["--moe-a2a-backend", "megamoe"])
    assert a.mega_moe_fix_memory and decision(a, "mega_moe_fix_memory").to is True
    b = R(["--moe-a2a-backend", "megamoe", "--no-mega-moe-fix-memory"])
    assert b.mega_moe_fix_memory is False and not has_decision(b, "mega_moe_fix_memory")
    c = R(["--moe-a2a-backend", "megamoe"], {"SGLANG_OPT_FIX_MEGA_MOE_MEMORY": "false"})
    assert c.mega_moe_fix_memory is False
    assert R().mega_moe_fix_memory is False


def test_megamoe_knobs_without_megamoe_warn():
    a = R(["--mega-moe-fix-memory", "--mega-moe-num-max-tokens-per-rank", "64"])
    assert sum("has no effect" in w for w in a.warnings) == 2


# ---- rule 5: CUDA graphs -------------------------------------------------------------------------

def test_rule5_deepep_normal_disables_cuda_graph():
    a = R(["--moe-a2a-backend", "deepep", "--deepep-mode", "normal", "--tp-size", "2"])
    assert a.disable_cuda_graph is True
    d = decision(a, "disable_cuda_graph")
    assert (d.from_, d.to) == (False, True) and "normal" in d.reason


def test_rule5_low_latency_keeps_cuda_graph():
    a = R(["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "2"])
    assert a.disable_cuda_graph is False and not has_decision(a, "disable_cuda_graph")


def test_rule5_explicit_cuda_graph_with_normal_mode_is_an_error():
    message = err(["--moe-a2a-backend", "deepep", "--deepep-mode", "normal", "--no-disable-cuda-graph"])
    assert "--no-disable-cuda-graph" in message and "normal" in message and "low_latency" in message


def test_rule5_asks_the_spec_not_the_name():
    with registry_snapshot():
        register_backend("graphy", "tests.nowhere:Graphy", token_layout="scattered", ep_policy="tp",
                         modes=("fast", "slow"), cuda_graph_modes=("fast",))
        a = R(["--moe-a2a-backend", "graphy", "--tp-size", "2"])
        # its modes lack DeepEP's default "auto": the first mode is chosen, with a decision
        assert a.deepep_mode == "fast" and has_decision(a, "deepep_mode")
        assert not a.disable_cuda_graph
        assert a.routed_experts_gather == "early"  # scattered, graphs on
        b = R(["--moe-a2a-backend", "graphy", "--deepep-mode", "slow", "--tp-size", "2"])
        assert b.disable_cuda_graph and "slow" in decision(b, "disable_cuda_graph").reason
        message = err(["--moe-a2a-backend", "graphy", "--deepep-mode", "auto"])
        assert "fast, slow" in message


# ---- rule 6: DP attention ------------------------------------------------------------------------

def test_rule6_dp1_turns_dp_attention_off():
    a = R(["--enable-dp-attention"])
    assert a.enable_dp_attention is False
    d = decision(a, "enable_dp_attention")
    assert (d.from_, d.to) == (True, False) and "dp_size" in d.reason


def test_dp_attention_requires_tp_divisible_by_dp():
    message = err(["--tp-size", "4", "--dp-size", "3", "--enable-dp-attention"])
    assert "--tp-size 4" in message and "--dp-size 3" in message and "1, 2, 4" in message


def test_dp_without_dp_attention_warns():
    a = R(["--tp-size", "4", "--dp-size", "2"])
    assert a.attn_dp_size == 1 and a.attn_tp_size == 4
    assert any("--dp-size 2 has no effect" in w for w in a.warnings)


# ---- rule 7: EPLB --------------------------------------------------------------------------------

def test_rule7_eplb_needs_ep():
    message = err(["--enable-eplb"])
    assert "--enable-eplb" in message and "ep_size" in message and "fix" in message
    message = err(["--enable-eplb", "--tp-size", "4"])
    assert "1, 2, 4" in message


def test_rule7_eplb_defaults_are_decisions():
    a = R(["--enable-eplb", "--tp-size", "4", "--ep-size", "4"])
    assert a.expert_distribution_recorder_mode == "stat"
    assert a.ep_dispatch_algorithm == "static"
    assert decision(a, "expert_distribution_recorder_mode").to == "stat"
    assert decision(a, "ep_dispatch_algorithm").to == "static"
    b = R(["--enable-eplb", "--moe-a2a-backend", "deepep", "--tp-size", "4",
           "--expert-distribution-recorder-mode", "per_pass", "--ep-dispatch-algorithm", "dynamic"])
    assert (b.expert_distribution_recorder_mode, b.ep_dispatch_algorithm) == ("per_pass", "dynamic")
    assert not has_decision(b, "ep_dispatch_algorithm")


def test_rule7_recorder_buffer_follows_rebalance_iterations_as_in_sglang():
    a = R(["--enable-eplb", "--tp-size", "4", "--ep-size", "4", "--eplb-rebalance-num-iterations",
           "250"])
    assert a.expert_distribution_recorder_buffer_size == 250
    d = decision(a, "expert_distribution_recorder_buffer_size")
    assert (d.from_, d.to) == (None, 250) and "--eplb-rebalance-num-iterations 250" in d.reason
    b = R(["--expert-distribution-recorder-mode", "per_token"])  # a recorder without EPLB too
    assert b.expert_distribution_recorder_buffer_size == 1000
    c = R(["--expert-distribution-recorder-mode", "stat",
           "--expert-distribution-recorder-buffer-size", "-1"])
    assert c.expert_distribution_recorder_buffer_size == -1  # given: kept
    assert R().expert_distribution_recorder_buffer_size is None  # no recorder: nothing to size
    assert any("has no effect" in w for w in
               R(["--expert-distribution-recorder-buffer-size", "8"]).warnings)


def test_rule7_non_trivial_location_dispatches_statically_without_eplb():
    a = R(["--init-expert-location", '{"physical_to_logical_map": [[0, 1]]}'])
    assert a.ep_dispatch_algorithm == "static" and not a.enable_eplb
    assert "not trivial" in decision(a, "ep_dispatch_algorithm").reason
    b = R(["--init-expert-location", '{"physical_to_logical_map": [[0, 1]]}',
           "--ep-dispatch-algorithm", "dynamic"])
    assert b.ep_dispatch_algorithm == "dynamic" and not has_decision(b, "ep_dispatch_algorithm")
    assert R().ep_dispatch_algorithm is None


# ---- rule 8: routed-experts gather ---------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--tp-size", "4"], "none"),                                                  # replicated
    # megamoe's fused kernel takes each rank's scattered slice (as SGLang's communicator lays
    # tokens out for every backend but none), so its ids need a gather: early, not none
    (["--moe-a2a-backend", "megamoe", "--tp-size", "4"], "early"),                  # scattered
    (["--moe-a2a-backend", "deepep", "--tp-size", "8", "--dp-size", "8",
      "--enable-dp-attention"], "none"),                                            # attn_tp 1
    (["--moe-a2a-backend", "deepep", "--deepep-mode", "normal", "--tp-size", "4",
      "--dp-size", "2", "--enable-dp-attention"], "late"),                          # graphs off
    (["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "4"], "early"),
])
def test_rule8_gather_auto(argv, expected):
    a = R(argv + ["--enable-return-routed-experts"])
    assert a.routed_experts_gather == expected
    assert decision(a, "routed_experts_gather").from_ == "auto"


def test_rule8_explicit_gather_where_unneeded_is_honoured_with_warning():
    a = R(["--tp-size", "4", "--enable-return-routed-experts", "--routed-experts-gather", "early"])
    assert a.routed_experts_gather == "early"
    assert any("is not needed" in w for w in a.warnings)


def test_rule8_explicit_none_where_needed_is_an_error():
    message = err(["--moe-a2a-backend", "alltoall", "--tp-size", "4", "--routed-experts-gather", "none"])
    assert "--routed-experts-gather none" in message and "4 attention-TP ranks" in message


def test_gather_without_capture_warns():
    a = R(["--routed-experts-gather", "late"])
    assert any("has no effect" in w and "--enable-return-routed-experts" in w for w in a.warnings)


# ---- rule 9: capacities --------------------------------------------------------------------------

def test_rule9_deepep_capacity_counts_tokens_per_kernel_rank():
    # Changed with issue 7: deepep scatters a DP rank's batch over its attention-TP ranks, so
    # --tp 2 --cuda-graph-max-bs 256 dispatches 128 tokens per rank and fits the default 128.
    argv = ["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "2",
            "--cuda-graph-max-bs", "256"]
    assert R(argv).cuda_graph_max_bs == 256
    message = err(argv[:-1] + ["512"])
    assert "--cuda-graph-max-bs 512 split over 2 attention-TP ranks" in message
    assert "raise --deepep-num-max-dispatch-tokens-per-rank to at least 256" in message
    assert R(argv[:-1] + ["512", "--deepep-num-max-dispatch-tokens-per-rank", "256"])
    # graphs off: the captured batch size is irrelevant
    assert R(argv[:-1] + ["512", "--disable-cuda-graph"]).disable_cuda_graph


def test_rule9_deepep_capacity_one_rank_gets_the_whole_batch_without_split():
    argv = ["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "2",
            "--dp-size", "2", "--enable-dp-attention", "--cuda-graph-max-bs", "256"]
    message = err(argv)  # attention-TP size 1: each rank dispatches its DP rank's 256 tokens
    assert "--cuda-graph-max-bs 256)" in message and "at least 256" in message


def test_rule9_capacity_cannot_exceed_1024():
    message = err(["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency",
                   "--cuda-graph-max-bs", "2048"])
    assert "lower --cuda-graph-max-bs" in message and "1024" in message


def test_rule9_max_running_requests_per_dp_rank():
    base = ["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "2",
            "--dp-size", "2", "--enable-dp-attention"]
    message = err(base + ["--max-running-requests", "300"])
    assert "150 tokens" in message and "--max-running-requests 300 over 2 DP ranks" in message
    assert R(base + ["--max-running-requests", "256"]).max_running_requests == 256
    # four ranks in two DP groups: each DP rank's 150 requests split over 2 attention-TP ranks
    wide = ["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "4",
            "--dp-size", "2", "--enable-dp-attention"]
    assert R(wide + ["--max-running-requests", "300"]).max_running_requests == 300
    message = err(wide + ["--max-running-requests", "600"])
    assert "150 tokens" in message and "over 2 DP ranks split over 2 attention-TP ranks" in message


def test_rule9_low_latency_mode_checks_chunked_prefill():
    message = err(["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency",
                   "--chunked-prefill-size", "512"])
    assert "--chunked-prefill-size 512" in message
    # auto mode prefills through normal buffers
    assert R(["--moe-a2a-backend", "deepep", "--chunked-prefill-size", "512"]).chunked_prefill_size == 512


def test_rule9_chunked_prefill_is_global_and_divided_over_dp_ranks():
    """As in SGLang: --tp 8 --dp 8 --enable-dp-attention --chunked-prefill-size 16384 prefills
    2048 tokens per DP rank (and per kernel rank: attention-TP size is 1)."""
    argv = ["--moe-a2a-backend", "deepep", "--tp", "8", "--dp", "8", "--enable-dp-attention",
            "--chunked-prefill-size", "16384"]
    a = R(argv)
    assert a.chunked_prefill_size == 16384
    derived = a.derived()
    assert derived["prefill_tokens_per_dp_rank"] == 2048
    assert derived["prefill_tokens_per_kernel_rank"] == 2048
    # low_latency runs prefill chunks through its buffers: 2048 per rank exceed the 1024 limit
    message = err(argv + ["--deepep-mode", "low_latency"])
    assert "2048 tokens (--chunked-prefill-size 16384 over 8 DP ranks)" in message
    assert "lower --chunked-prefill-size so that at most 1024 tokens reach one rank" in message
    assert R(argv[:-1] + ["8192", "--deepep-mode", "low_latency",
                          "--deepep-num-max-dispatch-tokens-per-rank", "1024"])


def test_rule9_megamoe_capacity_covers_captured_batches_only():
    # Changed with issue 7: eager batches above the cap take the fallback (as in SGLang), so
    # --max-running-requests is not checked; CUDA-graph batches always take the fused kernel.
    a = R(["--moe-a2a-backend", "megamoe", "--max-running-requests", "4096"])
    assert a.max_running_requests == 4096
    message = err(["--moe-a2a-backend", "megamoe", "--cuda-graph-max-bs", "2048"])
    assert "raise --mega-moe-num-max-tokens-per-rank to at least 2048" in message
    assert "CUDA-graph batches always run backend megamoe's kernel" in message
    assert "fallback (none)" in message
    # the fused kernel takes scattered tokens: 2048 per DP rank over 2 attention-TP ranks fit
    assert R(["--moe-a2a-backend", "megamoe", "--tp-size", "2", "--cuda-graph-max-bs", "2048"])
    b = R(["--moe-a2a-backend", "megamoe", "--cuda-graph-max-bs", "2048",
           "--mega-moe-num-max-tokens-per-rank", "2048"])
    assert b.mega_moe_num_max_tokens_per_rank == 2048
    # graphs off: nothing is captured, nothing to check
    assert R(["--moe-a2a-backend", "megamoe", "--cuda-graph-max-bs", "4096", "--disable-cuda-graph"])


def test_third_party_backend_with_settings_modes_and_capacity():
    """Registered here, resolved and checked through its spec's data alone."""
    from pydantic import Field

    from moe_a2a.backends import BackendSettings, CapacityRule

    class TurboSettings(BackendSettings):
        mode: str = "fast"
        slots: int = Field(default=64, ge=1, le=512)

    with registry_snapshot():
        register_backend(
            "turbo", "tests.nowhere:Turbo", token_layout="scattered", ep_policy="tp",
            modes=("fast", "safe"), cuda_graph_modes=("fast",), settings=TurboSettings,
            settings_fields={"mode": "deepep_mode",
                             "slots": "deepep_num_max_dispatch_tokens_per_rank"},
            mode_setting="mode",
            capacities=(CapacityRule("slots", batches="decode", modes=("fast",)),))
        a = R(["--moe-a2a-backend", "turbo", "--tp-size", "2"])
        # its own default mode and its own default capacity, each a decision
        assert a.deepep_mode == "fast" and has_decision(a, "deepep_mode")
        assert a.deepep_num_max_dispatch_tokens_per_rank == 64
        assert a.backend_settings == TurboSettings(mode="fast", slots=64)
        message = err(["--moe-a2a-backend", "turbo", "--tp-size", "2", "--cuda-graph-max-bs", "256"])
        assert "deepep_num_max_dispatch_tokens_per_rank=64 (auto-configured)" in message
        assert "128 tokens" in message and "backend turbo in mode fast runs decode batches" in message
        # in mode "safe" the rule does not apply (and graphs are turned off: not capturable)
        b = R(["--moe-a2a-backend", "turbo", "--tp-size", "2", "--cuda-graph-max-bs", "256",
               "--deepep-mode", "safe"])
        assert b.disable_cuda_graph and b.backend_settings.mode == "safe"
        # its settings' own bounds are checked at resolve time, naming the flag
        message = err(["--moe-a2a-backend", "turbo", "--deepep-num-max-dispatch-tokens-per-rank",
                       "1000"])
        assert "--deepep-num-max-dispatch-tokens-per-rank 1000" in message
        assert "TurboSettings.slots" in message
        assert "fast, safe" in err(["--moe-a2a-backend", "turbo", "--deepep-mode", "normal"])


def test_capacity_ranges():
    for value in ("0", "1025"):
        message = err(["--deepep-num-max-dispatch-tokens-per-rank", value])
        assert "1..1024" in message and f"--deepep-num-max-dispatch-tokens-per-rank '{value}'" in message
    message = err(env={"SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "4096"})
    assert "SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK='4096'" in message and "1..1024" in message
    assert "--mega-moe-num-max-tokens-per-rank" in err(["--mega-moe-num-max-tokens-per-rank", "0"])


# ---- other validation ----------------------------------------------------------------------------

def test_shared_experts_fusion_flags_are_exclusive():
    message = err(["--disable-shared-experts-fusion", "--enforce-shared-experts-fusion"])
    assert "mutually exclusive" in message and "fix" in message


def test_unknown_backend_lists_registered_names():
    message = err(["--moe-a2a-backend", "nosuch"])
    assert message.startswith("--moe-a2a-backend nosuch")
    for name in ("none", "alltoall", "deepep", "megamoe"):
        assert name in message
    message = err(["--moe-a2a-backend", "mooncake"])
    assert "known from SGLang" in message and "not provided" in message
    assert "MOE_A2A_MOE_A2A_BACKEND=nosuch" in err(env={"MOE_A2A_MOE_A2A_BACKEND": "nosuch"})


def test_backend_names_are_normalised():
    assert R(["--moe-a2a-backend", "DeepEP", "--tp-size", "2"]).moe_a2a_backend == "deepep"
    assert R(moe_a2a_backend=MoeA2ABackend.ALLTOALL).moe_a2a_backend == "alltoall"
    assert R(moe_a2a_backend=None).moe_a2a_backend == "none"
    assert R(["--moe-a2a-backend", "deepep", "--deepep-mode", "Low-Latency"]).deepep_mode == "low_latency"


def test_deepep_mode_validation():
    message = err(["--moe-a2a-backend", "deepep", "--deepep-mode", "fast"])
    assert "--deepep-mode fast" in message and "normal, low_latency, auto" in message
    message = err(["--deepep-mode", "fast"])  # a typo is an error whatever the backend
    assert "DeepEP modes" in message
    a = R(["--deepep-mode", "normal"])
    assert any("--deepep-mode normal has no effect" in w for w in a.warnings)


def test_choice_fields_reject_unknown_values():
    message = err(["--eplb-algorithm", "greedy"])
    assert "'greedy'" in message and "deepseek_hierarchical" in message
    assert "per_token" in err(env={"MOE_A2A_EXPERT_DISTRIBUTION_RECORDER_MODE": "nope"})


def test_special_int_values():
    a = R(["--expert-distribution-recorder-buffer-size", "-1", "--chunked-prefill-size", "-1"])
    assert a.expert_distribution_recorder_buffer_size == -1 and a.chunked_prefill_size == -1
    assert ">= 1 or -1" in err(["--expert-distribution-recorder-buffer-size", "0"])
    assert ">= 0" in err(["--ep-num-redundant-experts", "-2"])


def test_deepep_config_inline_and_file(tmp_path, monkeypatch):
    a = R(["--deepep-config", '{"num_sms": 24}'])
    assert a.deepep_config_dict == {"num_sms": 24} and not has_decision(a, "deepep_config")
    path = tmp_path / "deepep.json"
    path.write_text('{\n  "normal_dispatch": {"num_sms": 20}\n}\n')
    b = R(["--moe-a2a-backend", "deepep", "--deepep-config", str(path)])
    assert b.deepep_config_dict == {"normal_dispatch": {"num_sms": 20}}
    assert str(path) in decision(b, "deepep_config").reason
    # workers get the contents: the file may be gone
    path.unlink()
    assert ServerArgs.from_json(b.to_json()).deepep_config_dict == b.deepep_config_dict


def test_deepep_config_errors(tmp_path):
    message = err(["--deepep-config", '{"num_sms": 24,}'])
    assert "--deepep-config" in message and "line 1 column" in message
    message = err(["--deepep-config", str(tmp_path / "missing.json")])
    assert "missing.json" in message and "not found" in message
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1\n  "b": 2\n}')
    message = err(["--deepep-config", str(bad)])
    assert str(bad) in message and "line 3 column 3" in message
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    assert "not an object" in err(["--deepep-config", str(arr)])


def test_init_expert_location(tmp_path, monkeypatch):
    assert R(["--init-expert-location", '{"logical_count": [[1, 2]]}']).init_expert_location.startswith("{")
    assert "physical_to_logical_map" in err(["--init-expert-location", '{"counts": []}'])
    assert "'trivial', JSON text, or a path" in err(["--init-expert-location", "random"])
    assert "not found" in err(["--init-expert-location", str(tmp_path / "x.pt")])
    (tmp_path / "loc.json").write_text('{"physical_to_logical_map": [[0, 1]]}')
    (tmp_path / "bad.json").write_text('{"x": 1}')
    monkeypatch.chdir(tmp_path)
    a = R(["--init-expert-location", "loc.json"])
    assert a.init_expert_location == str(tmp_path / "loc.json")
    assert has_decision(a, "init_expert_location")
    assert "logical_count" in err(["--init-expert-location", "bad.json"])


# ---- keyword API ---------------------------------------------------------------------------------

def test_kwargs_api():
    a = R(moe_a2a_backend="alltoall", tp_size=4, enable_return_routed_experts="yes")
    assert (a.moe_a2a_backend, a.ep_size, a.enable_return_routed_experts) == ("alltoall", 4, True)
    assert src(a, "tp_size") == "kwargs"
    assert R(tp_size="2").tp_size == 2


def test_unknown_kwarg_lists_valid_names():
    message = err(tp_sise=4)
    assert "unknown keyword argument 'tp_sise'" in message and "'tp_size'" in message
    assert "moe_a2a_backend" in message
    assert "unknown default 'bogus'" in err(defaults={"bogus": 1})


@pytest.mark.parametrize("kwargs, part", [
    ({"tp_size": True}, "tp_size=True"),
    ({"tp_size": 2.0}, "tp_size=2.0"),
    ({"enable_eplb": "maybe"}, "enable_eplb='maybe'"),
    ({"moe_a2a_backend": 3}, "moe_a2a_backend=3"),
    ({"tp_size": None}, "cannot be unset"),
])
def test_kwargs_type_errors(kwargs, part):
    assert part in err(**kwargs)


def test_argv_errors_raise_config_error_not_system_exit():
    assert "--bogus" in err(["--bogus"])
    assert "--tp-size 'x' is not an integer" in err(["--tp-size", "x"])
    assert resolve("--tp-size 2 --ep 2", env={}).ep_size == 2  # one string, split like a shell


# ---- warnings ------------------------------------------------------------------------------------

def test_warnings_are_emitted_with_categories():
    assert issubclass(ConfigDeprecationWarning, FutureWarning)
    with pytest.warns(ConfigWarning, match="has no effect") as record:
        resolve(["--deepep-mode", "normal"], env={})
    assert record[0].filename == __file__  # attributed to the caller of resolve
    with pytest.warns(ConfigWarning) as record:
        resolve_namespace(argparse.Namespace(deepep_mode="normal"), env={})
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve([], env={})  # a clean config warns about nothing


# ---- frozen result, JSON, explain ----------------------------------------------------------------

COMPLEX = ["--moe-a2a-backend", "deepep", "--tp-size", "4", "--dp-size", "2", "--enable-dp-attention",
           "--enable-eplb", "--enable-return-routed-experts", "--deepep-config", '{"x": [1, 2]}',
           "--cuda-graph-max-bs", "64", "--deepep-mode", "low_latency"]


def test_frozen():
    a = R(COMPLEX)
    with pytest.raises(ValueError, match="frozen"):  # pydantic's frozen-instance error
        a.tp_size = 8
    with pytest.raises(TypeError):
        a.sources["tp_size"] = "cli"
    assert isinstance(a.decisions, tuple) and isinstance(a.warnings, tuple)


def test_json_round_trip_is_exact(monkeypatch):
    a = R(COMPLEX, {"SGLANG_OPT_FIX_MEGA_MOE_MEMORY": "1"})
    text = a.to_json()
    # a worker's environment must not matter
    monkeypatch.setenv("MOE_A2A_TP_SIZE", "8")
    monkeypatch.setenv("SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing is re-warned
        b = ServerArgs.from_json(text)
    assert b == a and hash(b) == hash(a)
    assert b.to_json() == text
    assert b.decisions == a.decisions and dict(b.sources) == dict(a.sources)
    assert b.warnings == a.warnings


def test_pickle_and_copy():
    import copy
    import pickle

    a = R(COMPLEX)
    assert pickle.loads(pickle.dumps(a)) == a
    assert copy.deepcopy(a) == a and copy.copy(a) == a


def test_from_json_validates():
    a = R(["--tp-size", "4"])
    data = json.loads(a.to_json())
    data["args"]["ep_size"] = 3
    assert "ep_size=3" in str(pytest.raises(ConfigError, ServerArgs.from_json, json.dumps(data)).value)
    data["args"]["ep_size"] = "2"
    assert "must be of type int" in str(pytest.raises(ConfigError, ServerArgs.from_json, json.dumps(data)).value)
    del data["args"]["ep_size"]
    assert "missing ['ep_size']" in str(pytest.raises(ConfigError, ServerArgs.from_json, json.dumps(data)).value)
    for bad in ("not json", json.dumps({"args": {}}), json.dumps({**json.loads(a.to_json()), "version": 99})):
        with pytest.raises(ConfigError):
            ServerArgs.from_json(bad)


def test_direct_construction_validates():
    values = R().values()
    with pytest.raises(ConfigError, match="unresolved"):
        ServerArgs(**{**values, "routed_experts_gather": "auto"})
    with pytest.raises(ConfigError, match="--moe-a2a-backend|moe_a2a_backend"):
        ServerArgs(**{**values, "moe_a2a_backend": "nosuch"})


def test_explain_is_the_config_json_object():
    a = R(["--moe-a2a-backend", "megamoe", "--tp-size", "8"])
    out = a.explain()
    assert {"args", "decisions", "warnings"} <= set(out)
    assert out["args"] == a.values() and list(out["args"]) == list(FIELD_NAMES)
    assert out["args"]["ep_size"] == 8
    assert all(set(d) == {"field", "from", "to", "reason"} for d in out["decisions"])
    assert out["sources"]["ep_size"] == "auto"
    derived = out["derived"]  # today's keys, and the per-rank figures added with issue 7
    assert {k: derived[k] for k in ("attn_dp_size", "attn_tp_size", "moe_tp_size")} == {
        "attn_dp_size": 1, "attn_tp_size": 8, "moe_tp_size": 1}
    (cap,) = out["capacities"]
    assert (cap["field"], cap["batches"], cap["over_capacity"]) == (
        "mega_moe_num_max_tokens_per_rank", "captured", "fallback")
    assert cap["largest_batch_per_rank"] is None  # no CUDA-graph batch size given
    json.dumps(out)  # JSON-ready


# ---- derived sizes and rank layout ---------------------------------------------------------------

LAYOUTS = [
    ["--tp-size", "8"],
    ["--tp-size", "8", "--ep-size", "8"],
    ["--tp-size", "8", "--ep-size", "2", "--dp-size", "4", "--enable-dp-attention"],
    ["--tp-size", "4", "--ep-size", "2", "--dp-size", "2", "--enable-dp-attention"],
    ["--moe-a2a-backend", "deepep", "--tp-size", "8", "--dp-size", "8", "--enable-dp-attention"],
    ["--moe-a2a-backend", "alltoall", "--tp-size", "4", "--dp-size", "2", "--enable-dp-attention"],
    ["--tp-size", "6", "--ep-size", "3", "--dp-size", "2", "--enable-dp-attention"],
]


@pytest.mark.parametrize("argv", LAYOUTS, ids=lambda a: " ".join(a))
def test_rank_layout_matches_parallel_sizes(argv):
    from moe_a2a.parallel import ParallelSizes

    a = R(argv)
    sizes = ParallelSizes.from_server_args(a)
    assert (sizes.attn_tp_size, sizes.moe_tp_size) == (a.attn_tp_size, a.moe_tp_size)
    groups = sizes.layout_groups()
    for index, group in enumerate(groups["attn_tp"]):
        for pos, r in enumerate(group):
            assert (a.attn_dp_rank(r), a.attn_tp_rank(r)) == (index, pos)
    for index, group in enumerate(groups["attn_dp"]):
        for pos, r in enumerate(group):
            assert (a.attn_tp_rank(r), a.attn_dp_rank(r)) == (index, pos)
    for index, group in enumerate(groups["moe_tp"]):
        for pos, r in enumerate(group):
            assert (a.moe_ep_rank(r), a.moe_tp_rank(r)) == (index, pos)
    for index, group in enumerate(groups["ep"]):
        for pos, r in enumerate(group):
            assert (a.moe_tp_rank(r), a.moe_ep_rank(r)) == (index, pos)


def test_rank_out_of_range():
    a = R(["--tp-size", "2"])
    with pytest.raises(ConfigError, match="outside 0..1"):
        a.attn_tp_rank(2)


def test_backend_spec_property():
    a = R(["--moe-a2a-backend", "alltoall", "--tp-size", "2"])
    assert a.backend_spec is backends.get_backend("alltoall")


# ---- argparse wiring -----------------------------------------------------------------------------

def _parser():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--num-experts", type=int, default=16)
    add_arguments(parser)
    return parser


def test_add_arguments_only_explicit_flags_and_aliases():
    ns = _parser().parse_args(["--tp", "4", "--expert-parallel-size", "2", "--num-experts", "8",
                               "--enable-eplb"])
    assert explicit_values(ns) == {"tp_size": "4", "ep_size": "2", "enable_eplb": True}
    assert explicit_values(_parser().parse_args([])) == {}
    a = resolve_namespace(ns, env={})
    assert (a.tp_size, a.ep_size, a.enable_eplb, src(a, "tp_size")) == (4, 2, True, "cli")


def test_resolve_namespace_with_caller_defaults_and_env():
    ns = _parser().parse_args([])
    defaults = {"moe_a2a_backend": "alltoall", "tp_size": 2}
    a = resolve_namespace(ns, env={}, defaults=defaults)
    assert (a.moe_a2a_backend, a.tp_size, a.ep_size) == ("alltoall", 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = resolve_namespace(ns, env={"MOE_A2A_MOE_A2A_BACKEND": "none"}, defaults=defaults)
    assert b.moe_a2a_backend == "none" and b.ep_size == 1


def test_no_flag_overrides_env():
    ns = _parser().parse_args(["--no-enable-return-routed-experts"])
    a = resolve_namespace(ns, env={"MOE_A2A_ENABLE_RETURN_ROUTED_EXPERTS": "1"})
    assert a.enable_return_routed_experts is False and src(a, "enable_return_routed_experts") == "cli"


def test_add_arguments_into_an_argument_group():
    parser = argparse.ArgumentParser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "nesting argument groups is deprecated"
        add_arguments(parser.add_argument_group("server arguments"))
    assert explicit_values(parser.parse_args(["--tp", "2"])) == {"tp_size": "2"}


def test_help_documents_default_and_env():
    text = _parser().format_help()
    assert "default: 128" in text and "MOE_A2A_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK" in text
    assert "--enable-deepep-moe" in text and REMOVAL_RELEASE in text


# ---- launch variables ----------------------------------------------------------------------------

def test_read_launch_env():
    assert read_launch_env({}) is None
    launch = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (launch.rank, launch.world_size, launch.local_rank) == (1, 2, 1)
    assert launch.init_method == "tcp://127.0.0.1:29500"
    launch.check_world(2)
    with pytest.raises(ConfigError, match="--tp-size 4"):
        launch.check_world(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        launch.rank = 0
    bare = read_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert bare.local_rank == 0 and bare.init_method == "env://"


@pytest.mark.parametrize("env, part", [
    ({"RANK": "0"}, "WORLD_SIZE is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "MASTER_ADDR is not"),
])
def test_read_launch_env_errors(env, part):
    with pytest.raises(ConfigError, match=part):
        read_launch_env(env)


# ---- ParallelLayout: the rank math in one place -----------------------------------------------

@pytest.mark.parametrize("sizes", [(1, 1, 1), (8, 1, 1), (8, 1, 8), (8, 4, 2), (4, 2, 2), (6, 2, 3),
                                   (8, 8, 8), (12, 3, 4)])
def test_parallel_layout_matches_parallel_sizes(sizes):
    from moe_a2a.parallel import ParallelSizes

    tp, attn_dp, ep = sizes
    layout = ParallelLayout(tp_size=tp, attn_dp_size=attn_dp, ep_size=ep)
    old = ParallelSizes(tp_size=tp, attn_dp_size=attn_dp, ep_size=ep)
    assert layout.layout_groups() == old.layout_groups()
    assert (layout.attn_tp_size, layout.moe_tp_size) == (old.attn_tp_size, old.moe_tp_size)
    for kind, groups in layout.layout_groups().items():  # every rank in exactly one group
        assert sorted(r for g in groups for r in g) == list(range(tp)), kind


@pytest.mark.parametrize("sizes, part", [
    ((4, 3, 1), "not divisible by the attention dp size 3"),
    ((4, 1, 3), "not divisible by ep_size=3"),
    ((0, 1, 1), "tp_size=0 must be an integer >= 1"),
    ((4, True, 1), "attn_dp_size=True"),
])
def test_parallel_layout_rejects_bad_sizes_with_a_value_error(sizes, part):
    tp, attn_dp, ep = sizes
    with pytest.raises(ConfigError, match=part) as info:
        ParallelLayout(tp_size=tp, attn_dp_size=attn_dp, ep_size=ep)
    assert isinstance(info.value, ValueError)  # as ParallelSizes' MoeA2AError is


def test_server_args_layout_and_kernel_tokens():
    a = R(["--moe-a2a-backend", "alltoall", "--tp-size", "8", "--dp-size", "2",
           "--enable-dp-attention"])
    assert a.layout == ParallelLayout(tp_size=8, attn_dp_size=2, ep_size=8)
    assert a.kernel_tokens(9) == 3  # scattered over 4 attention-TP ranks, the fullest rank counts
    assert R(["--tp-size", "8"]).kernel_tokens(9) == 9  # replicated: each rank gets all 9
    with pytest.raises(ConfigError, match="outside 0..7"):
        a.layout.moe_tp_rank(8)


# ---- the Python API never ends the caller's process (issue 8 item 6) ---------------------------

@pytest.mark.parametrize("argv", [["-h"], ["--help"], "--tp-size 2 --help", ["--tp", "2", "-h"]])
def test_help_is_a_config_error_not_an_exit(argv, capsys):
    with pytest.raises(ConfigError, match="help_text") as info:
        resolve(argv, env={})
    assert not isinstance(info.value, SystemExit)
    assert capsys.readouterr() == ("", "")  # nothing printed


def test_help_text_returns_the_flags_help():
    text = help_text()
    assert "--moe-a2a-backend" in text and "MOE_A2A_TP_SIZE" in text and "--attn-dp-size" in text
    assert "-h, --help" not in text


@pytest.mark.parametrize("call, part", [
    (lambda: resolve([], env=123), "env=123 must be a mapping"),
    (lambda: resolve([], env=["MOE_A2A_TP_SIZE=4"]), "must be a mapping"),
    (lambda: resolve([], env={"MOE_A2A_TP_SIZE": 4}), "environment variables are text"),
    (lambda: resolve([], env={}, defaults=[("tp_size", 2)]), "must be a mapping of field names"),
    (lambda: resolve([], env={}, defaults="tp_size=2"), "must be a mapping of field names"),
    (lambda: resolve(5, env={}), "argv=5 must be a list of flags or one string"),
    (lambda: resolve(b"--tp-size 4", env={}), "must be a list of flags or one string"),
    (lambda: resolve(["--tp-size", 4], env={}), "argv holds 4 (int)"),
    (lambda: resolve('--deepep-config "{', env={}), "cannot be split like a shell"),
    (lambda: resolve("--tp-size 2 \\", env={}), "cannot be split like a shell"),
    (lambda: resolve_namespace({"tp_size": "2"}, env={}), "needs an argparse.Namespace"),
])
def test_wrong_argument_types_raise_config_error(call, part):
    with pytest.raises(ConfigError) as info:
        call()
    assert part in str(info.value)


def _json_with(argv, **changes) -> str:
    data = json.loads(R(argv).to_json())
    data["args"].update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("argv, changes, part", [
    ([], {"moe_a2a_backend": "DeepEP"}, "'DeepEP' is not normalised"),
    (["--moe-a2a-backend", "deepep"], {"deepep_mode": "Low-Latency"}, "not normalised"),
    ([], {"moe_runner_backend": "Grouped-MM"}, "not normalised"),
    ([], {"enable_dp_attention": True}, "DP attention is turned off when dp_size is 1"),
    (["--enable-eplb", "--tp", "4", "--ep", "4"], {"expert_distribution_recorder_mode": None},
     "EPLB on sets a recorder mode"),
    (["--enable-eplb", "--tp", "4", "--ep", "4"], {"ep_dispatch_algorithm": None},
     "EPLB on sets a dispatch algorithm"),
    ([], {"routed_experts_gather": "auto"}, "is unresolved"),
    ([], {"moe_runner_backend": "megamoe"}, "becomes --moe-a2a-backend megamoe"),
    ([], {"init_expert_location": "placement.json"}, "stored as an absolute path"),
    ([], {"init_expert_location": '{"logical_count": [[1, 2]]}'},
     "a placement other than trivial sets a dispatch algorithm"),
    (["--expert-distribution-recorder-mode", "stat"],
     {"expert_distribution_recorder_buffer_size": None}, "an active recorder gets a buffer size"),
    ([], {"deepep_config": "/path/to/deepep.json"}, "is not valid JSON"),
])
def test_from_json_rejects_states_resolve_never_produces(argv, changes, part):
    with pytest.raises(ConfigError) as info:
        ServerArgs.from_json(_json_with(argv, **changes))
    assert part in str(info.value)


def _envelope(**changes) -> str:
    data = json.loads(R().to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("text, part", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"format": "moe-a2a/server-args", "version": 2, "args": [', "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (None, "must be text"),
    (123, "must be text"),
    (_envelope(args=[1, 2]), "exactly the fields"),
    (_envelope(decisions={"a": 1}), "decisions must be a list"),
    (_envelope(decisions=[{"field": "tp_size"}]), "keys field, from, to, reason"),
    (_envelope(decisions=[{"field": "tp_size", "from": {"x": 1}, "to": 2, "reason": "r"}]),
     "'from' value that no field holds"),
    (_envelope(decisions=[{"field": "nosuch", "from": 1, "to": 2, "reason": "r"}]),
     "names no field"),
    (_envelope(decisions=["tp_size: 1 -> 2"]), "keys field, from, to, reason"),
    (_envelope(warnings=[1, 2]), "warnings must be a list of text"),
    (_envelope(warnings="oops"), "warnings must be a list of text"),
    (_envelope(sources={"tp_size": 5}), "sources must map field names to text"),
    (_envelope(sources={"tp_size": "telepathy"}), "not understood"),
    (_envelope(sources={"nosuch": "cli"}), "unknown fields"),
    (_envelope(extra=1), "unknown keys ['extra']"),
    (_envelope(version=1), "reads version 2"),
], ids=lambda case: str(case)[:40])
def test_from_json_rejects_deeply_nested_or_wrongly_typed_input(text, part):
    with pytest.raises(ConfigError) as info:
        ServerArgs.from_json(text)
    assert part in str(info.value)


LONG = "x" * 10_000


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("call", [
    lambda: R(["--moe-a2a-backend", LONG]),
    lambda: R(["--tp-size", LONG]),
    lambda: R(["--eplb-algorithm", LONG]),
    lambda: R(["--deepep-config", "{" + LONG]),
    lambda: R(["--init-expert-location", LONG]),
    lambda: R(env={"MOE_A2A_EPLB_ALGORITHM": LONG}),
    lambda: R(env={"SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": LONG}),
    lambda: R(tp_size=LONG),
    lambda: R(**{LONG: 1}),
    lambda: R(tp_size=_nested(100_000)),
    lambda: ServerArgs.from_json(_json_with([], tp_size=LONG)),
], ids=range(11))
def test_error_messages_cut_echoed_values(call):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert len(message) < 1500, message[:300]
    assert "x" * 100 not in message


# ---- SGLang launch lines (issue 7) -------------------------------------------------------------

def test_sglang_flags_are_accepted_and_reported_in_one_warning():
    a = R(["--model-path", "deepseek-ai/DeepSeek-V3", "--tp", "8", "--moe-a2a-backend", "deepep",
           "--mem-fraction-static", "0.8", "--enable-two-batch-overlap", "--cuda-graph-bs", "1",
           "2", "4", "--host=0.0.0.0", "--trust-remote-code"])
    assert (a.moe_a2a_backend, a.ep_size) == ("deepep", 8)
    (note,) = [w for w in a.warnings if "SGLang flags" in w]
    for flag in ("--model-path", "--mem-fraction-static", "--enable-two-batch-overlap",
                 "--cuda-graph-bs", "--host", "--trust-remote-code"):
        assert flag in note
    assert "give --cuda-graph-max-bs for the capacity checks" in note
    assert not R(["--tp", "2"]).warnings  # no SGLang flag, no note


def test_sglang_flag_table_is_data_with_releases():
    from moe_a2a.server_args.sglang_flags import RELEASES, SGLANG_FLAGS

    by_flag = {f: entry for entry in SGLANG_FLAGS for f in entry.flags}
    assert RELEASES == ("0.5.14", "0.5.23")
    assert by_flag["--model-path"].flags == ("--model-path", "--model")
    assert by_flag["--enable-two-batch-overlap"].nargs == 0
    assert by_flag["--cuda-graph-bs"].nargs == "+"
    assert by_flag["--enable-waterfill"].releases == ("0.5.23",)
    assert by_flag["--enable-deepep-waterfill"].releases == ("0.5.14",)
    assert by_flag["--attn-dp-size"].flags == ("--attn-dp-size", "--attention-data-parallel-size")
    assert len(SGLANG_FLAGS) > 500


def test_every_sglang_flag_parses_with_its_arity():
    """Each flag of the table takes as many values as in SGLang, whether ours or not."""
    from moe_a2a.server_args.cli import build_parser, own_flags
    from moe_a2a.server_args.sglang_flags import SGLANG_FLAGS

    parser, ours = build_parser(), set(own_flags())
    for entry in SGLANG_FLAGS:
        flag = entry.flags[0]
        if flag in ours:
            continue
        values = {0: [], 1: ["1"], "?": ["1"], "*": ["1", "2"], "+": ["1", "2"]}[entry.nargs]
        ns = parser.parse_args([flag, *values, "--tp-size", "2"])
        assert ns.sglang_unused_flags == [flag] and ns.tp_size == "2", flag


def test_near_miss_of_our_flag_is_a_did_you_mean_error():
    message = err(["--ep-szie", "4"])
    assert "--ep-szie" in message and "did you mean --ep-size?" in message
    assert "did you mean --enable-eplb?" in err(["--enable-elpb"])
    assert "did you mean --deepep-mode?" in err(["--deepep-mdoe=normal"])
    assert "unrecognized arguments: --no-such-flag" in err(["--no-such-flag"])  # not a near miss


def test_add_arguments_leaves_the_callers_flags_alone():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--device", choices=["cpu", "cuda"])  # SGLang has --device too
    add_arguments(parser)
    ns = parser.parse_args(["--device", "cuda", "--dtype", "auto"])
    assert ns.device == "cuda" and ns.sglang_unused_flags == ["--dtype"]
    with pytest.raises(ConfigError, match="did you mean --tp-size"):
        parser.parse_args(["--tp-szie", "2"])


def test_add_arguments_into_a_group_checks_near_misses_on_the_given_parser():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser.add_argument_group("server"), strict_parser=parser)
    with pytest.raises(ConfigError, match="did you mean --moe-a2a-backend"):
        parser.parse_args(["--moe-a2a-backnd", "deepep"])


@pytest.mark.parametrize("argv, part", [
    (["--ep-dispatch-algorithm", "lp"], "'lp' is known from SGLang but is not provided by moe-a2a"),
    (["--ep-dispatch-algorithm", "fake"], "known from SGLang"),
    (["--expert-distribution-recorder-mode", "stat_approx"], "known from SGLang"),
    (["--eplb-algorithm", "deepseek_vec"], "known from SGLang"),
    (["--eplb-algorithm", "elasticity_aware_hierarchical"], "known from SGLang"),
    (["--moe-runner-backend", "flashinfer_trtllm"], "known from SGLang"),
    (["--moe-runner-backend", "deep_gemm"], "choose one of auto, reference, grouped_mm, megamoe"),
    (["--moe-a2a-backend", "ascend_tp"], "known from SGLang"),
    (["--moe-a2a-backend", "flashinfer_megamoe"], "known from SGLang"),
])
def test_sglang_values_not_provided_here_get_a_specific_message(argv, part):
    assert part in err(argv)


def test_a_typo_value_is_not_mistaken_for_an_sglang_one():
    message = err(["--ep-dispatch-algorithm", "statc"])
    assert "is not a valid ep_dispatch_algorithm" in message and "known from SGLang" not in message


def test_cuda_graph_max_bs_decode_is_sglang_0_5_14s_name():
    a = R(["--cuda-graph-max-bs-decode", "64"])
    assert a.cuda_graph_max_bs == 64 and src(a, "cuda_graph_max_bs") == "cli"


def test_moe_runner_backend_is_stored_and_megamoe_selects_the_backend():
    assert R(["--moe-runner-backend", "Grouped-MM"]).moe_runner_backend == "grouped_mm"
    a = R(["--moe-runner-backend", "megamoe", "--tp", "4"])
    assert (a.moe_a2a_backend, a.moe_runner_backend, a.ep_size) == ("megamoe", "auto", 4)
    assert "names the backend" in decision(a, "moe_runner_backend").reason
    assert decision(a, "moe_a2a_backend").to == "megamoe"
    assert R(["--moe-runner-backend", "megamoe", "--moe-a2a-backend", "megamoe"]).moe_a2a_backend == "megamoe"
    # SGLang overrides another backend with a warning; an explicit conflict is an error here
    message = err(["--moe-runner-backend", "megamoe", "--moe-a2a-backend", "deepep"])
    assert "--moe-runner-backend megamoe" in message and "--moe-a2a-backend deepep" in message


def test_enable_waterfill_is_sglang_0_5_23s_name_and_allowed_with_megamoe():
    a = R(["--enable-waterfill", "--moe-a2a-backend", "megamoe", "--tp", "4"])
    assert a.enable_deepep_waterfill and a.moe_a2a_backend == "megamoe"
    assert a.enforce_shared_experts_fusion
    assert R(["--enable-waterfill", "--tp", "2"]).moe_a2a_backend == "deepep"


def test_attn_dp_size_is_sglang_0_5_23s_dp_attention():
    a = R(["--moe-a2a-backend", "deepep", "--tp", "8", "--attn-dp-size", "8"])
    assert (a.dp_size, a.enable_dp_attention, a.attn_tp_size) == (8, True, 1)
    assert R(["--attention-data-parallel-size", "2", "--tp", "4"]).attn_dp_size == 2
    assert not R(["--attn-dp-size", "1"]).enable_dp_attention
    assert not any("deprecated" in w for w in R(["--attn-dp-size", "2", "--tp", "2"]).warnings)
    message = err(["--attn-dp-size", "4", "--dp-size", "2", "--tp", "4"])
    assert "--attn-dp-size 4" in message and "--dp-size 2" in message


def test_old_sgl_prefix_is_honoured_with_a_warning():
    a = R(["--moe-a2a-backend", "deepep"], {"SGL_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "64"})
    assert a.deepep_num_max_dispatch_tokens_per_rank == 64
    assert a.sources[CAP] == Source(SourceKind.LEGACY_ENV, "SGL_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK")
    assert any("SGL_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK is SGLang's older spelling" in w
               for w in a.warnings)
    b = R(env={"SGL_OPT_USE_DEEPGEMM_MEGA_MOE": "1"})
    assert b.moe_a2a_backend == "megamoe"
    # both spellings: the current one wins (SGLang lets the old one win), with a warning
    c = R(["--moe-a2a-backend", "deepep"], {"SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "256",
                                            "SGL_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "64"})
    assert c.deepep_num_max_dispatch_tokens_per_rank == 256
    assert any("SGL_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK=64 is ignored" in w for w in c.warnings)


@pytest.mark.parametrize("text, expected", [("y", True), ("Y", True), ("n", False), ("N", False)])
def test_legacy_booleans_take_sglangs_y_and_n(text, expected):
    a = R(["--moe-a2a-backend", "megamoe"], {"SGLANG_OPT_FIX_MEGA_MOE_MEMORY": text})
    assert a.mega_moe_fix_memory is expected
    assert R(env={"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": text}).moe_a2a_backend == (
        "megamoe" if expected else "none")


def test_our_own_variables_keep_the_documented_spellings():
    message = err(env={"MOE_A2A_ENABLE_EPLB": "y"})
    assert "MOE_A2A_ENABLE_EPLB='y' is not a boolean" in message and "y/n" not in message


def test_unused_sglang_moe_variables_are_reported_when_set():
    env = {"SGLANG_DEEPEP_BF16_DISPATCH": "1", "SGLANG_MOE_NVFP4_DISPATCH": "true",
           "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS": "1",
           "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": "/tmp/rec",
           "SGL_SIMULATE_UNIFORM_EXPERTS": "1",
           "SGLANG_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK": "4096",
           "SGLANG_UNRELATED_SETTING": "1"}
    a = R(env=env)
    (note,) = [w for w in a.warnings if "SGLang variables" in w]
    for var in ("SGLANG_DEEPEP_BF16_DISPATCH=1", "SGLANG_MOE_NVFP4_DISPATCH=true",
                "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR",
                "SGL_SIMULATE_UNIFORM_EXPERTS", "SGLANG_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK"):
        assert var in note
    assert "SGLANG_UNRELATED_SETTING" not in note  # not a MoE variable: not ours to judge
    assert not any("SGLang variables" in w for w in R(env={"SGLANG_DEEPEP_BF16_DISPATCH": ""}).warnings)


def test_megamoe_default_cap_is_sglang_0_5_14s():
    a = R(["--moe-a2a-backend", "megamoe"])
    assert a.mega_moe_num_max_tokens_per_rank == 1024 and a.backend_settings.num_max_tokens_per_rank == 1024
    b = R(["--moe-a2a-backend", "megamoe"], {"SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK": "8192"})
    assert b.mega_moe_num_max_tokens_per_rank == 8192  # 0.5.23's default, asked for explicitly


def test_binary_files_are_config_errors(tmp_path):
    blob = tmp_path / "deepep.json"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff" * 8)
    message = err(["--deepep-config", str(blob)])
    assert "is not UTF-8 text" in message and "deepep.json" in message
    location = tmp_path / "placement.json"
    location.write_bytes(b"\xff\xfe\x00\x01")
    assert "is not UTF-8 text" in err(["--init-expert-location", str(location)])
