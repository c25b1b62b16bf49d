"""Backend registry: enum, names, registration rules, lookups and their error messages."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from moe_a2a import backends
from moe_a2a.backends import (
    BUILTIN_NAMES,
    DEVICES,
    EP_POLICIES,
    SGLANG_ONLY_BACKENDS,
    TOKEN_LAYOUTS,
    BackendConflictError,
    BackendSpec,
    InvalidBackendError,
    MoeA2ABackend,
    Requirement,
    ReservedBackendNameError,
    UnknownBackendError,
    get_backend,
    list_backends,
    register_backend,
    registry_snapshot,
)
from moe_a2a.dispatchers import BaseDispatcher, StandardDispatchOutput


@pytest.fixture(autouse=True)
def clean_registry():
    with registry_snapshot(builtins_only=True):  # whatever third-party backends are installed
        yield


class _Dummy(BaseDispatcher):
    output_class = StandardDispatchOutput

    def dispatch(self, hidden_states, topk, *, batch):  # pragma: no cover - never built here
        raise NotImplementedError

    def combine(self, combine_input, *, batch):  # pragma: no cover
        raise NotImplementedError


class _Other(_Dummy):
    pass


# -- enum ---------------------------------------------------------------------------------


def test_enum_members_and_values():
    assert [m.value for m in MoeA2ABackend] == ["none", "alltoall", "deepep", "megamoe"]
    assert BUILTIN_NAMES == ("none", "alltoall", "deepep", "megamoe")
    assert isinstance(MoeA2ABackend.DEEPEP, str) and MoeA2ABackend.DEEPEP == "deepep"
    assert str(MoeA2ABackend.DEEPEP) == "deepep" and f"{MoeA2ABackend.MEGAMOE}" == "megamoe"


def test_enum_none_and_normalised_lookup():
    assert MoeA2ABackend(None) is MoeA2ABackend.NONE
    assert MoeA2ABackend("DeepEP") is MoeA2ABackend.DEEPEP
    assert MoeA2ABackend(" ALLTOALL ") is MoeA2ABackend.ALLTOALL


def test_enum_is_closed():
    with pytest.raises(UnknownBackendError) as info:
        MoeA2ABackend("mooncake")
    msg = str(info.value)
    assert "'mooncake'" in msg and "none, alltoall, deepep, megamoe" in msg and "get_backend" in msg
    with pytest.raises(ValueError):
        MoeA2ABackend(3)


def test_enum_spec_property():
    assert MoeA2ABackend.DEEPEP.spec is get_backend("deepep")


# -- built-ins ------------------------------------------------------------------------------

EXPECTED_BUILTINS = {
    "none": dict(dispatcher="moe_a2a.dispatchers.standard:StandardDispatcher", token_layout="replicated",
                 ep_policy="user", fused_experts=False, modes=("default",),
                 cuda_graph_modes=("default",), devices=("cpu", "cuda"), requires=(),
                 min_compute_capability=None),
    "alltoall": dict(dispatcher="moe_a2a.dispatchers.alltoall:AllToAllDispatcher", token_layout="scattered",
                     ep_policy="tp", fused_experts=False, modes=("default",), cuda_graph_modes=(),
                     devices=("cpu", "cuda"), requires=(), min_compute_capability=None),
    "deepep": dict(dispatcher="moe_a2a.dispatchers.deepep:DeepEPDispatcher", token_layout="scattered",
                   ep_policy="tp", fused_experts=False, modes=("normal", "low_latency", "auto"),
                   cuda_graph_modes=("low_latency", "auto"), devices=("cuda",),
                   requires=(Requirement("deep_ep", "deep_ep"),), min_compute_capability=(9, 0)),
    # the fused kernel takes scattered tokens (as SGLang lays them out); over-cap steps fall back
    "megamoe": dict(dispatcher="moe_a2a.dispatchers.megamoe:MegaMoE", token_layout="scattered",
                    ep_policy="tp", fused_experts=True, modes=("default",), cuda_graph_modes=("default",),
                    devices=("cuda",), requires=(Requirement("deep_gemm", "deep_gemm"),),
                    min_compute_capability=(9, 0), fallback="none"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BUILTINS))
def test_builtin_capabilities(name):
    spec = get_backend(name)
    assert spec.builtin and spec.name == name
    for field, value in EXPECTED_BUILTINS[name].items():
        assert getattr(spec, field) == value, field


def test_builtin_cuda_graph_per_mode():
    deepep = get_backend("deepep")
    assert deepep.supports_cuda_graph("low_latency") and deepep.supports_cuda_graph("LOW-LATENCY")
    assert deepep.supports_cuda_graph("auto") and not deepep.supports_cuda_graph("normal")
    assert get_backend("none").supports_cuda_graph() and not get_backend("alltoall").supports_cuda_graph()


def test_install_hints():
    hint = get_backend("deepep").install_hint
    assert "NVSHMEM" in hint and "include/cccl" in hint and "TORCH_CUDA_ARCH_LIST=9.0" in hint
    assert "--emulate-kernels" in hint
    hint = get_backend("megamoe").install_hint
    assert "sgl-deep-gemm" in hint and "SM100" in hint and "--emulate-kernels" in hint


def test_every_registered_backend_is_fully_classified():
    register_backend("extra_cls", _Dummy, token_layout="scattered", ep_policy="tp")
    specs = list_backends()
    assert [s.name for s in specs][:4] == list(BUILTIN_NAMES)
    for spec in specs:
        assert isinstance(spec, BackendSpec)
        assert isinstance(spec.name, str) and spec.name == backends.normalize_name(spec.name)
        assert isinstance(spec.dispatcher, (str, type)) and ":" in spec.dispatcher_path
        assert spec.token_layout in TOKEN_LAYOUTS
        assert spec.ep_policy in EP_POLICIES
        assert isinstance(spec.fused_experts, bool) and isinstance(spec.builtin, bool)
        assert isinstance(spec.modes, tuple) and spec.modes and all(isinstance(m, str) for m in spec.modes)
        assert isinstance(spec.cuda_graph_modes, tuple) and set(spec.cuda_graph_modes) <= set(spec.modes)
        assert isinstance(spec.devices, tuple) and spec.devices and set(spec.devices) <= set(DEVICES)
        assert isinstance(spec.requires, tuple) and all(isinstance(r, Requirement) for r in spec.requires)
        cc = spec.min_compute_capability
        assert cc is None or (isinstance(cc, tuple) and len(cc) == 2 and all(isinstance(v, int) for v in cc))
        assert isinstance(spec.install_hint, str) and isinstance(spec.description, str)
        if spec.builtin:
            assert spec.description
            assert not spec.requires or spec.install_hint  # a missing package needs a hint
        for mode in spec.modes:
            assert isinstance(spec.supports_cuda_graph(mode), bool)
        # typed settings and capacities are data the resolver reads
        assert issubclass(spec.settings, backends.BackendSettings)
        assert set(spec.settings_fields) <= set(spec.settings.model_fields)
        assert (spec.mode_setting is not None) == (spec.has_modes and spec.settings is not backends.NoSettings)
        for rule in spec.capacities:
            assert rule.setting in spec.settings.model_fields
        assert (spec.fallback is not None) == any(r.over_capacity == "fallback" for r in spec.capacities)
        if spec.builtin:  # the class keeps the contract the spec names
            cls = spec.load_dispatcher_class()
            from moe_a2a.dispatchers import BaseDispatcher, DispatchOutput, FusedMoE
            assert issubclass(cls, FusedMoE if spec.fused_experts else BaseDispatcher)
            if not spec.fused_experts:
                assert issubclass(cls.output_class, DispatchOutput)


def test_output_class_and_fused_contract_checked_at_registration():
    class NoOutput(BaseDispatcher):
        def dispatch(self, hidden_states, topk, *, batch):  # pragma: no cover
            raise NotImplementedError

        def combine(self, combine_input, *, batch):  # pragma: no cover
            raise NotImplementedError

    with pytest.raises(backends.InvalidBackendError, match="output_class"):
        register_backend("no_out", NoOutput, token_layout="scattered", ep_policy="tp")
    with pytest.raises(backends.InvalidBackendError, match="fused_experts=True .* is not a FusedMoE"):
        register_backend("not_fused", _Dummy, token_layout="scattered", ep_policy="tp",
                         fused_experts=True)
    with pytest.raises(backends.InvalidBackendError, match="needs fallback"):
        register_backend("no_fb", _Dummy, token_layout="scattered", ep_policy="tp",
                         settings=backends.MegaMoESettings,
                         capacities=(backends.CapacityRule("num_max_tokens_per_rank", batches="captured",
                                                           over_capacity="fallback"),))
    with pytest.raises(backends.InvalidBackendError, match="not an attribute"):
        register_backend("bad_cap", _Dummy, token_layout="scattered", ep_policy="tp",
                         capacities=(backends.CapacityRule("cap", batches="all"),))


def test_kernel_backends_name_the_missing_package_and_the_hint():
    import importlib.util

    for name, module in (("deepep", "deep_ep"), ("megamoe", "deep_gemm")):
        if importlib.util.find_spec(module) is not None:
            continue
        ok, reason = backends.check_availability(name, "cuda")
        assert not ok and f"import {module} failed: ModuleNotFoundError" in reason
        assert reason.endswith(f"install: {get_backend(name).install_hint}")


# -- get_backend ----------------------------------------------------------------------------


def test_get_backend_accepts_str_enum_none():
    assert get_backend(None) is get_backend("none")
    assert get_backend(MoeA2ABackend.DEEPEP) is get_backend("deepep")
    assert get_backend("  Deep-EP ".replace("-", "")) is get_backend("deepep")
    assert get_backend("AllToAll") is get_backend("alltoall")


def test_get_backend_wrong_type():
    with pytest.raises(TypeError, match="must be a str, MoeA2ABackend or None, not int"):
        get_backend(3)


def test_unknown_backend_lists_registered_names_and_suggests():
    register_backend("my_a2a", "pkg.mod:Cls", token_layout="scattered", ep_policy="tp")
    with pytest.raises(UnknownBackendError) as info:
        get_backend("deep_ep")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "unknown MoE A2A backend 'deep_ep'" in msg
    assert "none, alltoall, deepep, megamoe, my_a2a" in msg
    assert "Did you mean 'deepep'?" in msg
    assert "register_backend" in msg and "moe_a2a.backends" in msg


@pytest.mark.parametrize("name", sorted(SGLANG_ONLY_BACKENDS))
def test_sglang_only_names_get_a_specific_message(name):
    assert set(SGLANG_ONLY_BACKENDS) == {"mooncake", "nixl", "mori", "ascend_fuseep", "flashinfer",
                                         "deepep_v2", "pplx",
                                         "ascend_tp", "flashinfer_megamoe"}  # SGLang 0.5.23
    with pytest.raises(UnknownBackendError) as info:
        get_backend(name.upper().replace("_", "-"))
    msg = str(info.value)
    assert "known from SGLang" in msg and "not provided by moe-a2a" in msg
    assert f"register_backend({name!r}" in msg and "'moe_a2a.backends'" in msg
    assert "none, alltoall, deepep, megamoe" in msg


def test_sglang_name_can_be_registered_by_a_user():
    register_backend("mooncake", "mooncake_ep.dispatch:MooncakeDispatcher",
                     token_layout="scattered", ep_policy="tp", devices=("cuda",))
    assert get_backend("mooncake").dispatcher_path == "mooncake_ep.dispatch:MooncakeDispatcher"


# -- register_backend -------------------------------------------------------------------------


def test_decorator_registers_class_and_returns_it():
    @register_backend("My-A2A", token_layout="scattered", ep_policy="tp", devices=["cpu"])
    class MyDispatcher(_Dummy):
        pass

    assert isinstance(MyDispatcher, type)  # the class itself, unchanged
    spec = get_backend("my_a2a")
    assert spec.name == "my_a2a" and spec.dispatcher is MyDispatcher and not spec.builtin
    assert spec.devices == ("cpu",) and spec.load_dispatcher_class() is MyDispatcher
    assert backends.REGISTRY.source("my-a2a") == f"register_backend (module {__name__})"


def test_dotted_path_is_lazy_and_returns_spec():
    spec = register_backend("lazy_a2a", "no_such_pkg.sub:Dispatcher", token_layout="replicated",
                            ep_policy="user", requires=["no_such_pkg>=1.2"],
                            modes=["A", "b"], cuda_graph_modes=["a"])
    assert isinstance(spec, BackendSpec) and get_backend("lazy-a2a") is spec
    assert spec.modes == ("a", "b") and spec.cuda_graph_modes == ("a",)
    assert spec.requires == (Requirement("no_such_pkg", "no_such_pkg", "1.2"),)
    assert "no_such_pkg" not in sys.modules
    with pytest.raises(ImportError, match="cannot load dispatcher 'no_such_pkg.sub:Dispatcher'"):
        spec.load_dispatcher_class()


def test_class_passed_directly_returns_spec():
    spec = register_backend("direct", _Dummy, token_layout="scattered", ep_policy="tp")
    assert spec.dispatcher is _Dummy and get_backend("direct") is spec


def test_identical_registration_is_noop():
    first = register_backend("twice", "pkg.mod:Cls", token_layout="scattered", ep_policy="tp",
                             modes=("x",))
    again = register_backend("TWICE", "pkg.mod:Cls", token_layout="scattered", ep_policy="tp",
                             modes=["X"])
    assert again is first


def test_class_and_its_path_are_the_same_entry():
    spec = register_backend("same", _Dummy, token_layout="scattered", ep_policy="tp")
    path = f"{_Dummy.__module__}:{_Dummy.__qualname__}"
    assert register_backend("same", path, token_layout="scattered", ep_policy="tp") is spec


def test_decorating_twice_is_noop():
    decorate = register_backend("deco", token_layout="scattered", ep_policy="tp")
    assert decorate(_Dummy) is _Dummy and decorate(_Dummy) is _Dummy
    assert get_backend("deco").dispatcher is _Dummy


def test_conflicting_registration_names_both_dispatchers():
    register_backend("clash", _Dummy, token_layout="scattered", ep_policy="tp")
    with pytest.raises(BackendConflictError) as info:
        register_backend("clash", _Other, token_layout="replicated", ep_policy="tp")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{__name__}:_Dummy" in msg and f"{__name__}:_Other" in msg
    assert "token_layout: 'scattered' vs 'replicated'" in msg and "choose another name" in msg
    assert get_backend("clash").dispatcher is _Dummy  # the first one stays


@pytest.mark.parametrize("name", ["deepep", "NONE", "all-to-all".replace("-", ""), MoeA2ABackend.MEGAMOE])
def test_builtin_names_are_reserved(name):
    with pytest.raises(ReservedBackendNameError) as info:
        register_backend(name, "pkg.mod:Cls", token_layout="scattered", ep_policy="tp")
    msg = str(info.value)
    assert "is reserved" in msg and "fix: register under another name" in msg
    assert isinstance(info.value, ValueError)


def test_builtin_flag_is_reserved():
    spec = BackendSpec(name="sneaky", dispatcher="a.b:C", token_layout="scattered",
                       ep_policy="tp", builtin=True)
    with pytest.raises(ReservedBackendNameError, match="builtin=True, which is reserved for moe-a2a's own backends; fix: leave builtin=False"):
        backends.REGISTRY.register(spec)


def test_reregistering_a_builtin_spec_object_is_noop():
    spec = get_backend("deepep")
    assert backends.REGISTRY.register(spec) is spec


def test_register_rejects_non_spec():
    with pytest.raises(InvalidBackendError, match="expected a backends.BackendSpec"):
        backends.REGISTRY.register("deepep")


BASE = dict(token_layout="scattered", ep_policy="tp")


@pytest.mark.parametrize(
    "name, dispatcher, overrides, expected",
    [
        ("bad name", "a.b:C", {}, ["'bad name'", "[a-z][a-z0-9_]*", "fix:"]),
        ("9lives", "a.b:C", {}, ["'9lives'", "start with a letter"]),
        ("", "a.b:C", {}, ["''", "must match"]),
        ("ok", "a.b.C", {}, ["'a.b.C'", "'package.module:ClassName'", "fix:"]),
        ("ok", "a.b:", {}, ["'a.b:'", "dotted path"]),
        ("ok", "a b:C", {}, ["'a b:C'", "dotted path"]),
        ("ok", 42, {}, ["42", "BaseDispatcher subclass or a dotted path"]),
        ("ok", "a.b:C", {"token_layout": "diagonal"},
         ["token_layout='diagonal'", "'replicated', 'scattered'", "fix:"]),
        ("ok", "a.b:C", {"token_layout": None}, ["token_layout=None", "expected one of"]),
        ("ok", "a.b:C", {"ep_policy": "dp"}, ["ep_policy='dp'", "'user', 'tp'", "fix:"]),
        ("ok", "a.b:C", {"fused_experts": "yes"}, ["fused_experts='yes'", "True or False"]),
        ("ok", "a.b:C", {"modes": ()}, ["modes=() is empty", "fix: modes=('default',)"]),
        ("ok", "a.b:C", {"modes": "normal"}, ["modes='normal'", "single string", "fix: modes=('normal',)"]),
        ("ok", "a.b:C", {"modes": 5}, ["modes=5", "tuple of strings"]),
        ("ok", "a.b:C", {"modes": ("low latency",)}, ["'low latency'", "[a-z][a-z0-9_]*"]),
        ("ok", "a.b:C", {"modes": ("a", "A")}, ["lists 'a' twice", "fix: list each once"]),
        ("ok", "a.b:C", {"modes": ("normal",), "cuda_graph_modes": ("low_latency",)},
         ["cuda_graph_modes ['low_latency'] are not in modes ['normal']", "subset", "fix:"]),
        ("ok", "a.b:C", {"devices": ("tpu",)}, ["devices=['tpu']", "subset of ['cpu', 'cuda']", "fix:"]),
        ("ok", "a.b:C", {"devices": ()}, ["devices=[]", "non-empty"]),
        ("ok", "a.b:C", {"devices": "cuda"}, ["devices='cuda'", "fix: devices=('cuda',)"]),
        ("ok", "a.b:C", {"requires": ("deep ep",)}, ["'deep ep'", "'module>=version'", "fix:"]),
        ("ok", "a.b:C", {"requires": (3,)}, ["entry 3", "Requirement"]),
        ("ok", "a.b:C", {"requires": 3}, ["requires=3", "tuple of Requirement"]),
        ("ok", "a.b:C", {"min_compute_capability": (9,)}, ["min_compute_capability=(9,)", "(major, minor)", "fix:"]),
        ("ok", "a.b:C", {"min_compute_capability": (9, -1)}, ["(9, -1)", "non-negative"]),
        ("ok", "a.b:C", {"min_compute_capability": "9.0"}, ["'9.0'", "(major, minor)"]),
        ("ok", "a.b:C", {"min_compute_capability": (9, 0), "devices": ("cpu",)},
         ["only applies to CUDA", "lacks 'cuda'", "fix:"]),
        ("ok", "a.b:C", {"install_hint": 3}, ["install_hint=3", "must be a string"]),
        ("ok", "a.b:C", {"description": None}, ["description=None", "must be a string"]),
        ("ok", "a.b:C", {"extra": 3}, ["extra=3", "mapping"]),
    ],
)
def test_invalid_values_are_rejected_at_register_time(name, dispatcher, overrides, expected):
    kwargs = {**BASE, **overrides}
    with pytest.raises(InvalidBackendError) as info:
        register_backend(name, dispatcher, **kwargs)
    assert isinstance(info.value, ValueError)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))
    assert backends.backend_names() == list(BUILTIN_NAMES)  # nothing half-registered


def test_decorator_rejects_non_dispatcher_class():
    with pytest.raises(InvalidBackendError) as info:
        @register_backend("plain", token_layout="scattered", ep_policy="tp")
        class Plain:
            pass
    msg = str(info.value)
    assert "Plain does not subclass moe_a2a.dispatchers.BaseDispatcher" in msg and "fix:" in msg
    with pytest.raises(UnknownBackendError):
        get_backend("plain")


def test_decorator_rejects_bad_name_at_decorator_line():
    with pytest.raises(InvalidBackendError, match="'has space'"):
        register_backend("has space", token_layout="scattered", ep_policy="tp")


def test_decorator_requires_capabilities():
    with pytest.raises(TypeError):
        register_backend("x")  # token_layout and ep_policy are required keywords


def test_spec_is_hashable_picklable_and_json_ready():
    spec = register_backend("pick", "pkg.mod:Cls", token_layout="scattered", ep_policy="tp",
                            requires=("deep_ep>=1.1",), min_compute_capability=[9, 0],
                            extra={"k": 1})
    assert hash(spec) == hash(pickle.loads(pickle.dumps(spec)))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert spec.min_compute_capability == (9, 0)
    data = spec.to_dict()
    assert data["requires"] == ["deep_ep>=1.1"] and data["min_compute_capability"] == [9, 0]
    assert data["dispatcher"] == "pkg.mod:Cls" and data["builtin"] is False


def test_requirement_parse_and_str():
    assert Requirement.parse("deep_ep") == Requirement("deep_ep", "deep_ep", None)
    assert Requirement.parse("deep-gemm >= 2.0") == Requirement("deep_gemm", "deep-gemm", "2.0")
    assert str(Requirement("deep_ep", "deep-ep", "1.1")) == "deep-ep>=1.1"
    with pytest.raises(InvalidBackendError, match="'x<1'"):
        Requirement.parse("x<1")
    with pytest.raises(InvalidBackendError, match="not an importable module name"):
        Requirement("no such")
    with pytest.raises(InvalidBackendError, match="min_version 'abc'"):
        Requirement("ok", min_version="abc")


def test_version_tuple_handles_tags():
    from moe_a2a.backends.spec import _version_tuple

    assert _version_tuple("2.1.0rc1+cu124") == (2, 1, 0)
    assert _version_tuple("1.10") > _version_tuple("1.9")
    assert _version_tuple("0a1") == (0,)


# -- registry state ---------------------------------------------------------------------------


def test_registry_snapshot_restores_state():
    with registry_snapshot():
        register_backend("temp", "pkg.mod:Cls", token_layout="scattered", ep_policy="tp")
        assert "temp" in backends.backend_names()
    assert "temp" not in backends.backend_names()
    with pytest.raises(UnknownBackendError):
        get_backend("temp")


def test_snapshot_restores_even_on_error():
    with pytest.raises(RuntimeError):
        with registry_snapshot():
            register_backend("temp2", "pkg.mod:Cls", token_layout="scattered", ep_policy="tp")
            raise RuntimeError("test")
    assert "temp2" not in backends.backend_names()


def test_list_order_builtins_then_sorted():
    register_backend("zz", "p.m:C", token_layout="scattered", ep_policy="tp")
    register_backend("aa", "p.m:C", token_layout="scattered", ep_policy="tp")
    assert backends.backend_names() == [*BUILTIN_NAMES, "aa", "zz"]


def test_import_has_no_heavy_side_effects():
    code = ("import sys; from moe_a2a import backends; backends.get_backend('deepep'); "
            "backends.list_backends(); bad = [m for m in ('torch', 'deep_ep', 'deep_gemm', "
            "'moe_a2a.dispatchers', 'moe_a2a.server_args', 'moe_a2a.layer', 'backends', "
            "'dispatchers', 'server_args', 'moe') if m in sys.modules]; print(bad)")
    # this package alone (the installed one, as before): a third-party backend on PYTHONPATH
    # may import torch, and may
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_os_environ_in_backends():
    from pathlib import Path

    root = Path(backends.__file__).parent
    for path in root.glob("*.py"):
        assert "os.environ" not in path.read_text(), path
        assert "getenv" not in path.read_text(), path
