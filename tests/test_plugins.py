"""Plugins cannot break the command line (issue 8 item 4, issue 6 items 5 and 6): ``--plugin`` /
``MOE_A2A_PLUGINS`` modules and installed entry points that print, exit, fail or collide."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_a2a.backends import get_backend, registry_snapshot
from moe_a2a.plugins import PluginError, load_plugins, plugin_modules

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures" / "thirdparty_backend"
CUSTOM_MD = ROOT / "docs" / "custom-backend.md"


def _env(*paths, **extra):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_A2A_", "SGLANG_"))}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(ROOT)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def _cli(*argv, env, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "moe_a2a", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def sites(tmp_path):
    """Copies of the fixture distributions (nothing is written into the repository)."""
    out = {}
    for name in ("good", "hostile", "rival"):
        out[name] = tmp_path / "sites" / name
        shutil.copytree(FIXTURES / name, out[name])
    return out


@pytest.fixture
def plugin_dir(tmp_path):
    """A folder of plugin modules: ``chatty_plugin`` (prints while registering a backend),
    ``exiting_plugin`` (calls sys.exit), ``raising_plugin`` (raises)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "chatty_plugin.py").write_text(textwrap.dedent('''
        from moe_a2a.backends import register_backend
        print("chatty plugin: registering")
        register_backend("chatty_a2a", "moe_a2a.dispatchers.alltoall:AllToAllDispatcher",
                         token_layout="scattered", ep_policy="tp")
    '''))
    (folder / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    (folder / "raising_plugin.py").write_text("raise RuntimeError('plugin exploded')\n")
    return folder


# ---- --plugin / MOE_A2A_PLUGINS ----------------------------------------------------------


def test_plugin_modules_from_flags_and_the_variable():
    env = {"MOE_A2A_PLUGINS": "a.b, c"}
    assert plugin_modules(["d,a.b", "e"], env=env) == ("a.b", "c", "d", "e")
    assert plugin_modules([], env={}) == ()
    from moe_a2a.server_args import ConfigError

    with pytest.raises(ConfigError, match="'not a module' is not a module name"):
        plugin_modules(["not a module"], env={})
    with pytest.raises(ConfigError, match="MOE_A2A_PLUGINS="):
        plugin_modules([], env={"MOE_A2A_PLUGINS": "x/y"})


def test_load_plugins_is_guarded(plugin_dir, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(plugin_dir))
    with registry_snapshot():
        load_plugins(["chatty_plugin"])
        assert get_backend("chatty_a2a").name == "chatty_a2a"
        out = capsys.readouterr()
        assert out.out == "" and "chatty plugin: registering" in out.err
    with pytest.raises(PluginError, match=r"plugin 'exiting_plugin' failed to import: it called "
                                          r"sys.exit\(3\) while being loaded"):
        load_plugins(["exiting_plugin"])
    with pytest.raises(PluginError, match="RuntimeError: plugin exploded"):
        load_plugins(["raising_plugin"])
    for name in ("chatty_plugin", "exiting_plugin", "raising_plugin"):
        sys.modules.pop(name, None)


def test_resolve_does_not_warn_about_moe_a2a_plugins():
    from moe_a2a.server_args import resolve

    args = resolve([], env={"MOE_A2A_PLUGINS": "x", "MOE_A2A_PLUGINZ": "y"})
    assert not any("MOE_A2A_PLUGINS " in w for w in args.warnings)
    assert any("MOE_A2A_PLUGINZ" in w for w in args.warnings)


@pytest.mark.multiproc
def test_cli_plugin_json_stays_clean(plugin_dir):
    env = _env(plugin_dir)
    out = _cli("config", "--plugin", "chatty_plugin", "--moe-a2a-backend", "chatty-a2a",
               "--tp-size", "2", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["args"]["moe_a2a_backend"] == "chatty_a2a"
    assert "chatty plugin: registering" in out.stderr
    out = _cli("backends", "--json", "--device", "cpu", env={**env, "MOE_A2A_PLUGINS": "chatty_plugin"})
    assert out.returncode == 0, out.stderr
    assert "chatty_a2a" in [row["name"] for row in json.loads(out.stdout)]
    out = _cli("config", "--plugin", "exiting_plugin", "--json", env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == ("moe-a2a: error: plugin 'exiting_plugin' failed to import: it "
                                  "called sys.exit(3) while being loaded; fix: fix the module, or "
                                  "drop it from --plugin / MOE_A2A_PLUGINS")


@pytest.mark.multiproc
def test_documented_plugin_commands_run(tmp_path):
    """docs/custom-backend.md section 5: the module is section 1's code block, the commands are
    the bash block's, run as written (moe-a2a is this interpreter's)."""
    text = CUSTOM_MD.read_text(encoding="utf-8")
    first_python = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)[0]
    (tmp_path / "my_backends.py").write_text(first_python)
    (bash,) = [b for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
               if "my_backends" in b]
    commands = [line for line in bash.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 3
    for line in commands:
        words = line.split()
        env_words = [w for w in words if re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", w)]
        argv = words[len(env_words):]
        assert argv[0] == "moe-a2a"
        extra = dict(w.split("=", 1) for w in env_words)
        extra["PYTHONPATH"] = f"{tmp_path}:{ROOT}"
        out = _cli(*argv[1:], env=_env(**extra), cwd=tmp_path)
        assert out.returncode == 0, (line, out.stderr)
        if "--json" in argv:
            assert json.loads(out.stdout)["args"]["moe_a2a_backend"] == "local_only"
        if argv[1] == "run":
            assert out.stdout.startswith("PASSED: backend local_only on 1 cpu ranks")
        if argv[1] == "backends":
            assert re.search(r"^local_only\s", out.stdout, flags=re.M)


# ---- installed entry points that misbehave -----------------------------------------------


@pytest.mark.multiproc
def test_entry_point_calling_sys_exit_cannot_end_the_command(sites):
    """Issue 8: a plugin calling sys.exit() at import made `config --moe-a2a-backend typo_name`
    print nothing and exit 0."""
    out = _cli("config", "--moe-a2a-backend", "typo_name", env=_env(sites["hostile"]))
    assert out.returncode == 2 and out.stdout == ""
    assert "unknown MoE A2A backend 'typo_name'" in out.stderr
    assert "Entry points that failed to load: hostile_exit" in out.stderr
    out = _cli("backends", "--json", "--device", "cpu", env=_env(sites["hostile"]))
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}  # stdout is only the JSON
    assert "it called sys.exit(0) while being loaded" in rows["hostile_exit"]["reason"]
    assert rows["hostile_chatty"]["builtin"] is False
    assert "hello from import" in out.stderr and "hello from the factory" in out.stderr


@pytest.mark.multiproc
def test_two_distributions_claiming_one_name_is_an_error_naming_both(sites):
    env = _env(sites["good"], sites["rival"])
    out = _cli("config", "--moe-a2a-backend", "fake_a2a", "--json", env=env)
    assert out.returncode == 2 and out.stdout == ""
    err = out.stderr
    assert "'moe-a2a-fake-backend 0.1.0'" in err and "'moe-a2a-rival-backend 1.0.0'" in err, err
    assert "stays unavailable until one of them is removed" in err
    # either order on sys.path: the same refusal
    out = _cli("config", "--moe-a2a-backend", "fake_a2a", env=_env(sites["rival"], sites["good"]))
    assert out.returncode == 2 and "two installed distributions" in out.stderr
    # removing one makes the name usable again
    out = _cli("config", "--moe-a2a-backend", "fake_a2a", "--json", env=_env(sites["rival"]))
    assert out.returncode == 0 and json.loads(out.stdout)["args"]["moe_a2a_backend"] == "fake_a2a"


@pytest.mark.multiproc
def test_regenerating_the_docs_with_a_plugin_installed_writes_no_plugin_name(sites, tmp_path):
    """Issue 6 item 6: docs describe moe-a2a, not what happens to be installed."""
    env = _env(sites["good"])
    probe = _cli("backends", "--json", "--device", "cpu", env=env)
    assert "fake_a2a" in probe.stdout  # the plugin really is installed for these commands
    for module, doc, argv in (("moe_a2a.server_args.docs", "configuration.md", []),
                              ("moe_a2a.backends.matrix", "backends.md", ["--write"])):
        copy = tmp_path / doc
        copy.write_text((ROOT / "docs" / doc).read_text(encoding="utf-8"), encoding="utf-8")
        out = subprocess.run([sys.executable, "-m", module, *argv, str(copy)], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        text = copy.read_text(encoding="utf-8")
        assert "fake_a2a" not in text and "fake_lazy" not in text
        assert text == (ROOT / "docs" / doc).read_text(encoding="utf-8")


@pytest.mark.multiproc
def test_the_suite_passes_with_a_third_party_backend_installed():
    """Issue 6 item 6: the tests that read the registry, run with moe-a2a-fake-backend installed
    (``--thirdparty-backend``; the whole suite passes that way too)."""
    files = ["test_backends_registry.py", "test_backends_cli.py", "test_backends_docs.py",
             "test_backends_availability.py", "test_cli_config.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p",
                          "no:cacheprovider", "--thirdparty-backend", *files],
                         capture_output=True, text=True, cwd=TESTS, timeout=600, env=_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
