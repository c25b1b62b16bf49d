"""The command line under bad input and as documented (issue 8 items 5 and 7, issue 6 item 4):
every bad input exits 2 with one line before any rank starts; help shows what really happens."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_a2a import run as run_module
from moe_a2a.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_spawn(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("ranks were started for bad input")

    monkeypatch.setattr(run_module, "spawn_job", refuse)
    for name in [k for k in os.environ if k.startswith(("MOE_A2A_", "SGLANG_"))]:
        monkeypatch.delenv(name)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _exit_2(argv, capsys) -> str:
    try:
        status = main(["run", *argv])
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def _hf(tmp_path, **changes) -> str:
    from moe_a2a.hf import example_hf_config

    cfg = json.loads(example_hf_config("mixtral").read_text())
    cfg.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("argv, needles", [
    (["--num-tokens", "1000000000000"],
     ["--num-tokens 1000000000000 with this model needs about", "PiB", "available on this machine",
      "fix: lower --num-tokens to about"]),
    (["--hidden-size", "1000000", "--intermediate-size", "1000000"],
     ["the weights alone do not fit"]),
    (["--seed", "100000000000000000000000"],
     ["--seed 100000000000000000000000 is out of range", "0..18446744073709551615"]),
    (["--seed", "-1"], ["--seed -1 is out of range"]),
    (["--tp-size", "4096", "--moe-a2a-backend", "none"],
     ["--tp-size 4096 would start 4096 local rank processes", "fix: lower --tp-size to"]),
    (["--num-tokens", "0"], ["--num-tokens 0 is invalid: it must be >= 1"]),
    (["--collective-timeout", "0"], ["--collective-timeout 0 is invalid: it must be > 0"]),
    (["--collective-timeout", "nan"], ["--collective-timeout nan is invalid"]),
    (["--num-layers", "0"], ["--num-layers 0 is invalid: it must be >= 1"]),
])
def test_bad_input_exits_2_before_any_rank(argv, needles, capsys, no_spawn):
    err = _exit_2(argv, capsys)
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("changes, needle", [
    ({"num_local_experts": "eight"}, 'num_local_experts="eight" is a JSON string, not a whole number'),
    ({"num_local_experts": 8.0}, "num_local_experts=8.0 is a JSON number with a fraction"),
    ({"num_local_experts": True}, "num_local_experts=true is a JSON boolean"),
    ({"hidden_size": 0}, "hidden_size=0 is invalid: it must be >= 1"),
    ({"num_experts_per_tok": -2}, "num_experts_per_tok=-2 is invalid"),
])
def test_bad_hf_config_values_exit_2(tmp_path, changes, needle, capsys, no_spawn):
    err = _exit_2(["--hf-config", _hf(tmp_path, **changes), "--tp-size", "2"], capsys)
    assert needle in err and "config.json" in err, err


def test_hf_config_refuses_shape_flags_it_would_ignore(tmp_path, capsys, no_spawn):
    err = _exit_2(["--hf-config", _hf(tmp_path), "--num-experts", "32", "--top-k", "2"], capsys)
    assert "sets the model shape, so --num-experts, --top-k would be ignored" in err
    assert "fix: drop them, or edit the config" in err


def test_launch_variables_without_rendezvous_exit_2(capsys, no_spawn, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = _exit_2(["--tp-size", "2"], capsys)
    assert "RANK=0 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not" in err


def test_echoed_values_are_cut(capsys, no_spawn):
    huge = "7" * 5000  # beyond Python's int-to-text limit, too
    err = _exit_2(["--num-experts", huge], capsys)
    assert len(err) < 400 and "(5002 chars)" in err, err  # the value and its quotes
    err = _exit_2(["--moe-a2a-backend", "x" * 3000], capsys)
    assert len(err) < 2000 and "3000" in err, err


def test_a_plugin_that_does_not_import_exits_2(capsys, no_spawn):
    err = _exit_2(["--plugin", "no_such_plugin_module_xyz"], capsys)
    assert "plugin 'no_such_plugin_module_xyz' failed to import: ModuleNotFoundError" in err
    assert "PYTHONPATH" in err


def test_a_bad_flag_is_reported_without_importing_torch():
    code = ("import sys\nfrom moe_a2a.cli import main\nrc = main(['run', '--bogus'])\n"
            "print(rc, 'torch' in sys.modules)")
    for argv_code in (code, code.replace("'--bogus'", "'--ep-szie', '2'"),
                      code.replace("'--bogus'", "'--help'")):
        wrapped = f"try:\n    exec({argv_code!r})\nexcept SystemExit as e:\n    import sys\n" \
                  f"    print(e.code, 'torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
        assert out.stdout.split()[-1] == "False", (argv_code, out.stdout, out.stderr)
        assert out.stdout.split()[-2] in ("0", "2")


# ---- help text ---------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_flag_of_every_subcommand_has_help():
    parser = build_parser()
    commands = dict(_subparsers(parser))
    assert {"config", "backends", "run"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue  # SGLang's flags moe-a2a accepts but does not use: hidden on purpose
            assert action.help and action.help.strip(), (name, action.option_strings)
        text = sub.format_help()
        assert "(default: None)" not in text, name
        for block in text.split("\n  -")[1:]:
            assert block.count("default:") <= 1, (name, block)


def test_run_help_shows_runs_own_defaults():
    (run,) = [p for n, p in _subparsers(build_parser()) if n == "run"]
    text = " ".join(run.format_help().split())
    assert "default: alltoall here (none in `moe-a2a config`)" in text
    assert "default: 4 here (1 in `moe-a2a config`)" in text
    assert "routed experts (default: 16)" in text and "--collective-timeout" in text
    (config,) = [p for n, p in _subparsers(build_parser()) if n == "config"]
    assert "here (" not in config.format_help()


def test_every_subcommand_takes_plugin():
    for name, sub in _subparsers(build_parser()):
        assert any("--plugin" in a.option_strings for a in sub._actions), name


@pytest.mark.parametrize("location, needle", [
    ('{"physical_to_logical_map": "x"}', "physical_to_logical_map is 'x', not a non-empty list"),
    ('{"physical_to_logical_map": []}', "not a non-empty list of lists"),
    ('{"physical_to_logical_map": [[0, 1, "a"]]}', "physical_to_logical_map[0][2] is 'a'"),
    ('{"physical_to_logical_map": [[0, 1], [0]]}', "physical_to_logical_map[1] has 1 entries, layer 0 has 2"),
    ('{"physical_to_logical_map": [[0, true]]}', "physical_to_logical_map[0][1] is True"),
    ('{"logical_count": [[3, -1]]}', "logical_count[0][1] is -1"),
    ('{"logical_count": [[3, 1.5]]}', "logical_count[0][1] is 1.5"),
])
def test_init_expert_location_contents_are_validated(location, needle, tmp_path):
    """Issue 8 item 7: inline JSON and .json files alike."""
    from moe_a2a.server_args import ConfigError, resolve

    path = tmp_path / "location.json"
    path.write_text(location)
    for value in (location, str(path)):
        with pytest.raises(ConfigError) as info:
            resolve(["--init-expert-location", value], env={})
        assert needle in str(info.value) and "fix: give" in str(info.value)
    assert resolve(["--init-expert-location", '{"logical_count": [[3, 1]]}'], env={})
