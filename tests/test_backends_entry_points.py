"""Entry-point group ``moe_a2a.backends``: a fake third-party distribution on sys.path.

The fixture distributions live in tests/fixtures/thirdparty_backend/ and are copied to a
temporary directory (nothing is pip-installed, nothing is written into the repository).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from moe_a2a import backends
from moe_a2a.backends import (
    ENTRY_POINT_GROUP,
    BackendEntryPointError,
    BackendSpec,
    UnknownBackendError,
    available_backends,
    get_backend,
    load_entry_points,
    registry_snapshot,
)

FIXTURES = Path(__file__).parent / "fixtures" / "thirdparty_backend"
FAKE_MODULES = ("moe_a2a_fake_backend", "moe_a2a_broken_backend")


@pytest.fixture(autouse=True)
def clean_registry():
    with registry_snapshot(builtins_only=True):  # nothing loaded, whatever is installed
        yield


def _purge_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_MODULES:
            del sys.modules[name]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Put copies of the fixture site directories on sys.path; returns name -> path."""
    paths = {}
    for name in ("good", "broken"):
        paths[name] = tmp_path / name
        shutil.copytree(FIXTURES / name, paths[name])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def add(*names):
        for name in names:
            monkeypatch.syspath_prepend(str(paths[name]))
        importlib.invalidate_caches()

    yield SimpleNamespace(add=add, paths=paths)
    _purge_modules()
    importlib.invalidate_caches()


def test_decorated_class_entry_point(site):
    site.add("good")
    errors = load_entry_points()
    assert errors == []
    spec = get_backend("fake_a2a")
    assert spec.token_layout == "scattered" and spec.ep_policy == "tp" and not spec.builtin
    assert spec.dispatcher_path == "moe_a2a_fake_backend.dispatch:FakeDispatcher"
    assert backends.REGISTRY.source("fake_a2a") == (
        "entry point 'fake_a2a' of distribution 'moe-a2a-fake-backend 0.1.0'")


def test_factory_entry_point_is_lazy(site):
    site.add("good")
    load_entry_points()
    spec = get_backend("fake-lazy")
    assert spec.name == "fake_lazy" and spec.modes == ("fast", "slow")
    assert spec.dispatcher == "moe_a2a_fake_backend.dispatch:FakeDispatcher"  # a path, not loaded
    assert backends.check_availability(spec, "cpu") == (True, "")
    assert spec.load_dispatcher_class().__name__ == "FakeDispatcher"


def test_load_entry_points_is_idempotent(site):
    site.add("good", "broken")
    first = load_entry_points()
    names = backends.backend_names()
    second = load_entry_points()
    assert backends.backend_names() == names
    assert [str(e) for e in second] == [str(e) for e in first]


def test_reload_after_registry_restore_registers_from_the_class_record(site):
    site.add("good")
    with registry_snapshot():
        load_entry_points()
        cls = get_backend("fake_a2a").dispatcher
    # the module stays imported, the registry forgot it: loading again must still register it
    assert "moe_a2a_fake_backend.dispatch" in sys.modules
    assert backends.REGISTRY.source("fake_a2a") == "unknown"
    load_entry_points()
    assert get_backend("fake_a2a").dispatcher is cls


BROKEN_CASES = {
    "broken_missing": ["ModuleNotFoundError", "moe_a2a_no_such_module"],
    "broken_raises": ["RuntimeError: boom while importing"],
    "broken_plain": ["is a class that is not registered as backend 'broken_plain'",
                     "fix: decorate it with @register_backend('broken_plain'"],
    "broken_number": ["returned 42, not a backends.BackendSpec", "fix: return BackendSpec(name='broken_number'"],
    "broken_wrongname": ["entry point name 'broken_wrongname' must equal the backend name",
                         "provides 'some_other_name'", "fix: rename the entry point to 'some_other_name'"],
    "broken_invalid": ["token_layout='diagonal' is invalid"],
    "broken_notcallable": ["'just a string'", "must name a dispatcher class decorated with @register_backend"],
    "deepep": ["'deepep' is a built-in backend name and cannot come from an entry point"],
}


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_broken_entry_points_are_reported_not_skipped(site, name):
    site.add("good", "broken")
    errors = {e.entry_point: e for e in load_entry_points()}
    assert set(errors) == set(BROKEN_CASES)
    err = errors[name]
    msg = str(err)
    assert isinstance(err, BackendEntryPointError) and isinstance(err, ValueError)
    assert err.distribution == "moe-a2a-broken-backend 0.2.0"
    assert f"backend entry point {name!r}" in msg
    assert "distribution 'moe-a2a-broken-backend 0.2.0'" in msg and f"group {ENTRY_POINT_GROUP!r}" in msg
    for text in BROKEN_CASES[name]:
        assert text in msg, (text, msg)
    if name == "deepep":
        assert get_backend("deepep").builtin  # the built-in is untouched
    else:
        with pytest.raises(BackendEntryPointError) as info:
            get_backend(name)                 # requesting the broken name raises its error
        assert info.value is err


def test_broken_entry_points_do_not_break_other_names(site):
    site.add("broken", "good")
    load_entry_points()
    assert get_backend("fake_a2a").name == "fake_a2a"
    assert get_backend("deepep").builtin
    rows = {r.name: r for r in available_backends("cpu")}
    assert rows["fake_a2a"].ok
    broken = rows["broken_missing"]
    assert broken.spec is None and not broken.ok and "moe-a2a-broken-backend" in broken.reason
    with pytest.raises(UnknownBackendError) as info:
        get_backend("nosuch")
    assert "Entry points that failed to load: broken_invalid, broken_missing" in str(info.value)


# -- duck-typed entry points for the conflict and call-count rules -------------------------


@dataclass
class FakeEP:
    name: str
    value: str
    obj: Any
    dist: Any = None
    calls: int = 0

    def load(self):
        self.calls += 1
        return self.obj


def _use_entry_points(monkeypatch, eps):
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [ep for ep in eps] if group == ENTRY_POINT_GROUP else [])


def _spec_factory(name, layout):
    return lambda: BackendSpec(name=name, dispatcher="pkg.mod:D", token_layout=layout, ep_policy="tp")


def test_factory_called_once(monkeypatch):
    ep = FakeEP("once", "pkg.specs:once", _spec_factory("once", "scattered"),
                SimpleNamespace(name="dist-a", version="1.0"))
    _use_entry_points(monkeypatch, [ep])
    load_entry_points()
    load_entry_points()
    get_backend("once")
    assert ep.calls == 1


def test_conflict_between_distributions(monkeypatch):
    a = FakeEP("shared", "a.specs:f", _spec_factory("shared", "scattered"),
               SimpleNamespace(name="dist-a", version="1.0"))
    b = FakeEP("shared", "b.specs:f", lambda: BackendSpec(name="shared", dispatcher="other.mod:E",
                                                           token_layout="scattered", ep_policy="tp"),
               SimpleNamespace(name="dist-b", version="2.0"))
    _use_entry_points(monkeypatch, [a, b])
    (err,) = load_entry_points()
    msg = str(err)
    assert isinstance(err, backends.BackendConflictError) and isinstance(err, BackendEntryPointError)
    assert err.distributions == ("dist-a 1.0", "dist-b 2.0")
    assert "two installed distributions with different specs: 'dist-a 1.0'" in msg
    assert "and 'dist-b 2.0'" in msg and "'pkg.mod:D'" in msg and "'other.mod:E'" in msg
    assert "pip uninstall dist-a or pip uninstall dist-b" in msg
    # neither wins by sys.path order: the name is unavailable until one is removed
    for _ in range(2):
        with pytest.raises(BackendEntryPointError) as info:
            get_backend("shared")
        assert info.value is err
    with pytest.raises(backends.BackendConflictError):  # nor can code claim it meanwhile
        backends.register_backend("shared", "x.y:Z", token_layout="scattered", ep_policy="tp")
    _use_entry_points(monkeypatch, [a])  # dist-b removed: the name is dist-a's again
    with registry_snapshot(builtins_only=True):
        load_entry_points()
        assert get_backend("shared").dispatcher == "pkg.mod:D"


def test_conflict_between_distributions_decorated_classes(monkeypatch):
    """The decorator form: the second distribution's import raises inside register()."""
    from noop_dispatcher import NoopDispatcher

    def import_module_registering(dispatcher_path):
        def load():
            cls = type("Dec", (NoopDispatcher,), {"__module__": dispatcher_path})
            return backends.register_backend("dup", token_layout="scattered", ep_policy="tp")(cls)
        return load

    a = FakeEP("dup", "pa.mod:Dec", None, SimpleNamespace(name="dist-a", version="1.0"))
    b = FakeEP("dup", "pb.mod:Dec", None, SimpleNamespace(name="dist-b", version="1.0"))
    a.load, b.load = import_module_registering("pa.mod"), import_module_registering("pb.mod")
    _use_entry_points(monkeypatch, [a, b])
    (err,) = load_entry_points()
    assert err.distributions == ("dist-a 1.0", "dist-b 1.0")
    with pytest.raises(BackendEntryPointError):
        get_backend("dup")


def test_identical_entry_in_two_distributions_is_fine(monkeypatch):
    a = FakeEP("same", "a:f", _spec_factory("same", "scattered"), SimpleNamespace(name="a", version="1"))
    b = FakeEP("same", "b:f", _spec_factory("same", "scattered"), SimpleNamespace(name="b", version="1"))
    _use_entry_points(monkeypatch, [a, b])
    assert load_entry_points() == []


def test_unreadable_metadata_is_reported(monkeypatch):
    def boom(group=None):
        raise OSError("bad METADATA")
    monkeypatch.setattr(importlib.metadata, "entry_points", boom)
    (err,) = load_entry_points()
    assert "cannot read the installed entry points" in str(err) and "bad METADATA" in str(err)
    assert get_backend("deepep").builtin


def test_lookup_of_known_name_does_not_scan(monkeypatch):
    calls = []
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: calls.append(group) or [])
    monkeypatch.setattr(backends.REGISTRY, "_scanned", False)
    get_backend("deepep")
    assert calls == []          # built-ins resolve without importing third-party code
    with pytest.raises(UnknownBackendError):
        get_backend("not_there")
    assert calls == [ENTRY_POINT_GROUP]
    with pytest.raises(UnknownBackendError):
        get_backend("still_not_there")
    assert calls == [ENTRY_POINT_GROUP]  # scanned lazily once


# -- subprocesses: a fresh interpreter with the fake distribution on PYTHONPATH ----------


ROOT = Path(__file__).resolve().parents[1]


def _env(*paths):
    """The fake distributions, then this working tree (so a stale editable install cannot
    shadow its packages), then whatever PYTHONPATH was."""
    env = dict(os.environ)
    parts = [*map(str, paths), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _cli():
    """The installed ``moe-a2a`` console script; its equivalent when it is not on PATH."""
    script = shutil.which("moe-a2a")
    return [script] if script else [sys.executable, "-c", "from moe_a2a.cli import entry; entry()"]


def _config_cmd_ready() -> bool:
    try:
        importlib.import_module("moe_a2a.cli.config_cmd")
        return True
    except Exception:
        return False


def _backends_cmd(args, env):
    """``moe-a2a backends ARGS``; through backends_cmd directly while the full CLI cannot load."""
    if _config_cmd_ready():
        cmd = [*_cli(), "backends", *args]
    else:
        driver = ("import argparse, sys; from moe_a2a.cli import backends_cmd; "
                  "p = argparse.ArgumentParser(prog='moe-a2a'); s = p.add_subparsers(); "
                  "backends_cmd.add_parser(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))")
        cmd = [sys.executable, "-c", driver, "backends", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_subprocess_lazy_lookup(site):
    code = ("import json; from moe_a2a import backends; s = backends.get_backend('Fake-A2A'); "
            "print(json.dumps([s.name, backends.REGISTRY.source(s.name), backends.backend_names()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(site.paths["good"]), timeout=120)
    assert out.returncode == 0, out.stderr
    name, source, names = json.loads(out.stdout)
    assert name == "fake_a2a" and "moe-a2a-fake-backend 0.1.0" in source
    assert names == ["none", "alltoall", "deepep", "megamoe", "fake_a2a", "fake_lazy"]


def test_cli_backends_json_lists_thirdparty(site):
    out = _backends_cmd(["--json", "--device", "cpu"], _env(site.paths["good"], site.paths["broken"]))
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    fake = rows["fake_a2a"]
    assert fake["available"] is True and fake["builtin"] is False and fake["reason"] == ""
    assert fake["token_layout"] == "scattered" and fake["ep_policy"] == "tp"
    assert fake["dispatcher"] == "moe_a2a_fake_backend.dispatch:FakeDispatcher"
    assert "moe-a2a-fake-backend 0.1.0" in fake["source"]
    assert rows["fake_lazy"]["modes"] == ["fast", "slow"]
    broken = rows["broken_missing"]
    assert broken["available"] is False and broken["token_layout"] is None
    assert "moe-a2a-broken-backend 0.2.0" in broken["reason"]
    assert rows["deepep"]["builtin"] is True


@pytest.mark.skipif(not _config_cmd_ready(), reason="moe_a2a.cli.config_cmd is not importable yet")
def test_cli_config_resolves_thirdparty_backend(site):
    env = _env(site.paths["good"])
    out = subprocess.run([*_cli(), "config", "--moe-a2a-backend", "fake-a2a", "--tp-size", "2",
                          "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    args = json.loads(out.stdout)["args"]
    assert args["moe_a2a_backend"] == "fake_a2a"
    assert args["ep_size"] == 2  # fake_a2a's ep_policy is "tp": read from its spec, not its name


@pytest.mark.skipif(not _config_cmd_ready(), reason="moe_a2a.cli.config_cmd is not importable yet")
def test_cli_config_broken_entry_point_exit_2(site):
    env = _env(site.paths["good"], site.paths["broken"])
    out = subprocess.run([*_cli(), "config", "--moe-a2a-backend", "broken_missing", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "moe-a2a-broken-backend 0.2.0" in out.stderr and "broken_missing" in out.stderr
    assert "Traceback" not in out.stderr
