"""check_availability / available_backends / ensure_available: real reasons, never raises."""

from __future__ import annotations

import pytest
import torch

from moe_a2a import backends
from moe_a2a.backends import (
    BackendAvailability,
    BackendUnavailableError,
    Requirement,
    available_backends,
    check_availability,
    ensure_available,
    get_backend,
    register_backend,
    registry_snapshot,
)
from noop_dispatcher import NoopDispatcher


@pytest.fixture(autouse=True)
def clean_registry():
    with registry_snapshot():
        yield


class _Ok(NoopDispatcher):
    pass


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible GPU of compute capability 9.0 (H100-like)."""
    def set_cc(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "FakeGPU")
    set_cc(9, 0)
    return set_cc


def _cuda_spec(**kw):
    return register_backend("gpu_only", _Ok, token_layout="scattered", ep_policy="tp",
                            devices=("cuda",), **kw)


def test_ok_backend(no_cuda):
    spec = register_backend("cpu_ok", _Ok, token_layout="scattered", ep_policy="tp")
    assert check_availability(spec, "cpu") == (True, "")
    assert check_availability(spec) == (True, "")          # None = this machine → cpu
    assert check_availability("cpu-ok", "cpu") == (True, "")  # a name works too


def test_device_not_supported(no_cuda):
    """Every unmet requirement is named, the device first (then the import error and hint)."""
    ok, reason = check_availability(get_backend("deepep"), "cpu")
    assert not ok
    assert reason.startswith("backend 'deepep' runs on cuda only; device 'cpu' is not supported")
    spec = _cuda_spec()
    assert check_availability(spec, "cpu") == (
        False, "backend 'gpu_only' runs on cuda only; device 'cpu' is not supported")


def test_emulation_waives_device_and_capability(no_cuda):
    """Under moe_a2a.testing.emulate_kernels the kernel backends run on CPU, marked emulated."""
    from moe_a2a.testing import emulate_kernels

    for name in ("deepep", "megamoe"):
        assert not check_availability(name, "cpu")[0]
    with emulate_kernels():
        rows = {r.name: r for r in available_backends("cpu")}
        for name in ("deepep", "megamoe"):
            assert check_availability(name, "cpu") == (True, ""), name
            assert check_availability(name) == (True, "")   # this machine: CPU, emulated
            assert rows[name].ok and rows[name].emulated
        assert not rows["none"].emulated  # nothing to emulate
    with emulate_kernels(["deep_ep"]):  # only what the backend requires counts
        assert check_availability("deepep", "cpu")[0]
        assert not check_availability("megamoe", "cpu")[0]
    assert not check_availability("deepep", "cpu")[0]  # restored afterwards


def test_megamoe_reports_the_missing_api_variant(fake_gpu):
    """SM90 needs SGLang's fork (fp8_mega_moe ...): a deep_gemm without it is named."""
    import sys
    import types

    fake = types.ModuleType("deep_gemm")
    fake.get_symm_buffer_for_mega_moe = fake.transform_weights_for_mega_moe = object()
    fake.bf16_mega_moe = object()
    fake.__version__ = "2.1.1"
    saved = sys.modules.get("deep_gemm")
    sys.modules["deep_gemm"] = fake
    try:
        ok, reason = check_availability("megamoe", "cuda")
        assert not ok and "deep_gemm 2.1.1 lacks get_symm_buffer_for_sm90_mega_moe" in reason
        assert "SGLang's DeepGEMM fork" in reason
        fake_gpu(10, 0)
        assert check_availability("megamoe", "cuda") == (True, "")
        fake_gpu(8, 0)
        ok, reason = check_availability("megamoe", "cuda")
        assert not ok and "compute capability 8.0 found" in reason
    finally:
        if saved is None:
            del sys.modules["deep_gemm"]
        else:
            sys.modules["deep_gemm"] = saved


def test_unknown_device_is_reported_not_raised():
    ok, reason = check_availability(get_backend("none"), "tpu")
    assert not ok and "unknown device 'tpu'" in reason and "cpu, cuda" in reason


def test_torch_device_accepted(no_cuda):
    spec = register_backend("cpu_ok2", _Ok, token_layout="scattered", ep_policy="tp")
    assert check_availability(spec, torch.device("cpu")) == (True, "")


def test_no_cuda_visible(no_cuda):
    ok, reason = check_availability(_cuda_spec(), "cuda")
    assert not ok and "torch.cuda.is_available() is False" in reason
    assert f"torch {torch.__version__}" in reason
    ok, reason = check_availability(_cuda_spec())          # None → cuda-only: still needs CUDA
    assert not ok and "torch.cuda.is_available() is False" in reason


def test_cuda_probe_raising_is_reported(monkeypatch):
    def boom():
        raise RuntimeError("driver too old")
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    ok, reason = check_availability(_cuda_spec(), "cuda")
    assert not ok and "torch.cuda.is_available() raised RuntimeError: driver too old" in reason


def test_compute_capability_found_vs_needed(fake_gpu):
    spec = _cuda_spec(min_compute_capability=(10, 0))
    ok, reason = check_availability(spec, "cuda")
    assert not ok
    assert reason == "compute capability 9.0 found on cuda:0 (FakeGPU); 10.0 or newer needed"
    fake_gpu(10, 0)
    assert check_availability(spec, "cuda") == (True, "")
    fake_gpu(12, 1)
    assert check_availability(spec, "cuda") == (True, "")


def test_none_device_prefers_cuda_when_visible(fake_gpu):
    spec = register_backend("both", _Ok, token_layout="scattered", ep_policy="tp",
                            min_compute_capability=(10, 0))
    ok, reason = check_availability(spec)                  # GPU visible → checked as cuda
    assert not ok and "10.0 or newer needed" in reason
    assert check_availability(spec, "cpu") == (True, "")   # CC does not matter on CPU


def test_missing_requirement_gives_real_import_error_and_hint(no_cuda):
    spec = register_backend("needs_pkg", _Ok, token_layout="scattered", ep_policy="tp",
                            requires=("moe_a2a_surely_missing_pkg",), install_hint="pip install it")
    ok, reason = check_availability(spec, "cpu")
    assert not ok
    assert ("import moe_a2a_surely_missing_pkg failed: ModuleNotFoundError: No module named "
            "'moe_a2a_surely_missing_pkg'") in reason
    assert reason.endswith("install: pip install it")


def test_requirement_import_raising_other_errors():
    """A module whose import raises OSError (a CUDA extension built for another driver)."""
    import importlib.abc
    import importlib.machinery
    import sys

    finder_name = "moe_a2a_exploding_mod"

    class Loader(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise OSError("libcuda.so.1: cannot open shared object file")

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == finder_name:
                return importlib.machinery.ModuleSpec(name, Loader())
            return None

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        ok, reason = Requirement(finder_name).check()
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop(finder_name, None)
    assert not ok
    assert reason == f"import {finder_name} failed: OSError: libcuda.so.1: cannot open shared object file"


def test_requirement_version_too_old():
    import importlib.metadata

    found = importlib.metadata.version("pytest")
    ok, reason = Requirement("pytest", "pytest", "999.0").check()
    assert not ok and reason == f"pytest {found} is installed; 999.0 or newer is required"
    assert Requirement("pytest", "pytest", "1.0").check() == (True, "")
    # importable but without distribution metadata: the version cannot be checked, accept it
    assert Requirement("backends", "moe_a2a_no_dist", "1.0").check() == (True, "")


def test_dispatcher_module_failing_to_import():
    spec = register_backend("lazy_missing", "moe_a2a_missing_mod.x:Disp", token_layout="scattered",
                            ep_policy="tp", install_hint="pip install missing")
    ok, reason = check_availability(spec, "cpu")
    assert not ok
    assert reason.startswith("dispatcher moe_a2a_missing_mod.x:Disp cannot be imported: "
                             "ModuleNotFoundError: No module named 'moe_a2a_missing_mod'")
    assert reason.endswith("install: pip install missing")


def test_dispatcher_attribute_missing():
    spec = register_backend("lazy_attr", "moe_a2a.dispatchers.base:NoSuchDispatcher",
                            token_layout="scattered", ep_policy="tp")
    ok, reason = check_availability(spec, "cpu")
    assert not ok and "AttributeError" in reason and "NoSuchDispatcher" in reason


def test_dispatcher_path_not_a_dispatcher():
    spec = register_backend("lazy_wrong", "json:JSONDecoder", token_layout="scattered",
                            ep_policy="tp")
    ok, reason = check_availability(spec, "cpu")
    assert not ok and "'json:JSONDecoder'" in reason and "not a subclass of moe_a2a.dispatchers.BaseDispatcher" in reason


def test_builtins_report_truthfully(no_cuda):
    for name in ("deepep", "megamoe"):
        spec = get_backend(name)
        ok, reason = check_availability(spec)
        assert not ok and "torch.cuda.is_available() is False" in reason
        module = spec.requires[0].module
        try:
            __import__(module)
        except ImportError:
            assert f"import {module} failed: ModuleNotFoundError" in reason
        if spec.dispatcher_path.split(":")[0] not in __import__("sys").modules:
            try:
                spec.load_dispatcher_class()
            except ImportError as exc:
                assert str(exc.__cause__) in reason
        assert reason.endswith(f"install: {spec.install_hint}")
    for name in ("none", "alltoall"):
        ok, reason = check_availability(name, "cpu")
        try:
            get_backend(name).load_dispatcher_class()
            assert ok, reason
        except ImportError:  # its dispatcher has not landed yet: that is the reason given
            assert not ok and "cannot be imported" in reason


def test_check_availability_never_raises(monkeypatch):
    assert check_availability(3)[0] is False
    assert "availability check failed: TypeError" in check_availability(3)[1]
    ok, reason = check_availability("nosuch")
    assert not ok and "unknown MoE A2A backend 'nosuch'" in reason

    def explode(*a, **k):
        raise RuntimeError("weird")
    monkeypatch.setattr(backends.availability, "_check", explode)
    assert check_availability("none") == (False, "availability check failed: RuntimeError: weird")


def test_available_backends_rows(no_cuda):
    register_backend("zz_ok", _Ok, token_layout="scattered", ep_policy="tp")
    rows = available_backends("cpu")
    assert all(isinstance(r, BackendAvailability) for r in rows)
    assert [r.name for r in rows] == backends.backend_names()
    by_name = {r.name: r for r in rows}
    assert by_name["zz_ok"].ok and by_name["zz_ok"].reason == "" and not by_name["zz_ok"].builtin
    assert not by_name["deepep"].ok and by_name["deepep"].builtin
    spec, ok, reason = by_name["deepep"]                   # unpacks as (spec, ok, reason)
    assert spec is get_backend("deepep") and ok is False and "cuda only" in reason


def test_ensure_available():
    spec = register_backend("ens", _Ok, token_layout="scattered", ep_policy="tp")
    assert ensure_available("ens", "cpu") is spec
    with pytest.raises(BackendUnavailableError) as info:
        ensure_available("deepep", "cpu")
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("--moe-a2a-backend deepep cannot run on cpu: backend "
                                      "'deepep' runs on cuda only; device 'cpu' is not supported")
