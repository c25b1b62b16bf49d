"""``moe-a2a backends [--json] [--device]`` (moe/cli/backends_cmd.py), in process."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from moe_a2a.backends import register_backend, registry_snapshot
from noop_dispatcher import NoopDispatcher
from moe_a2a.cli import backends_cmd


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with registry_snapshot(builtins_only=True):  # whatever third-party backends are installed
        yield


class _Ok(NoopDispatcher):
    pass


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="moe-a2a")
    backends_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["backends", *argv])
    assert args.handler is backends_cmd.main
    code = args.handler(args)
    out = capsys.readouterr()
    return code, out.out, out.err


FIELDS = {"name", "builtin", "available", "emulated", "reason", "source", "dispatcher", "token_layout",
          "ep_policy", "fused_experts", "modes", "cuda_graph_modes", "devices", "requires",
          "min_compute_capability", "install_hint", "description"}


def test_json_lists_every_backend_with_all_fields(capsys):
    register_backend("my_cli", _Ok, token_layout="scattered", ep_policy="tp", modes=("a", "b"),
                     cuda_graph_modes=("b",))
    code, out, err = _run(["--json", "--device", "cpu"], capsys)
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["none", "alltoall", "deepep", "megamoe", "my_cli"]
    for row in rows:
        assert set(row) == FIELDS
    by = {r["name"]: r for r in rows}
    assert by["deepep"] == {
        "name": "deepep", "builtin": True, "available": False, "emulated": False,
        "reason": by["deepep"]["reason"],
        "source": "builtin", "dispatcher": "moe_a2a.dispatchers.deepep:DeepEPDispatcher",
        "token_layout": "scattered", "ep_policy": "tp", "fused_experts": False,
        "modes": ["normal", "low_latency", "auto"], "cuda_graph_modes": ["low_latency", "auto"],
        "devices": ["cuda"], "requires": ["deep_ep"], "min_compute_capability": [9, 0],
        "install_hint": by["deepep"]["install_hint"], "description": by["deepep"]["description"],
    }
    assert by["deepep"]["reason"].startswith(
        "backend 'deepep' runs on cuda only; device 'cpu' is not supported")
    mine = by["my_cli"]
    assert mine["available"] is True and mine["builtin"] is False and mine["reason"] == ""
    assert mine["modes"] == ["a", "b"] and mine["cuda_graph_modes"] == ["b"]
    assert mine["source"] == f"register_backend (module {__name__})"
    assert by["megamoe"]["fused_experts"] is True


def test_json_default_device_is_this_machine(capsys):
    code, out, _ = _run(["--json"], capsys)
    by = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert "torch.cuda.is_available() is False" in by["deepep"]["reason"]


def test_table(capsys):
    register_backend("my_table", _Ok, token_layout="scattered", ep_policy="tp")
    code, out, err = _run(["--device", "cpu"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["name", "builtin", "available", "layout", "ep_policy", "fused",
                                "modes", "cuda_graph", "devices", "reason"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"none", "alltoall", "deepep", "megamoe", "my_table"}
    assert rows["my_table"].split()[:9] == ["my_table", "no", "yes", "scattered", "tp", "no",
                                            "default", "-", "cpu,cuda"]
    assert rows["my_table"].rstrip().endswith("-")
    assert rows["deepep"].split()[:9] == ["deepep", "yes", "no", "scattered", "tp", "no",
                                          "normal,low_latency,auto", "low_latency,auto", "cuda"]
    assert "backend 'deepep' runs on cuda only; device 'cpu' is not supported" in rows["deepep"]
    # the reason column starts at the same offset on every line
    offset = lines[0].index("reason")
    assert rows["deepep"][offset:].startswith("backend 'deepep'")


def test_emulated_kernels_listing(capsys):
    """--emulate-kernels: deepep and megamoe are available on CPU and say "emulated"."""
    code, out, _ = _run(["--device", "cpu", "--emulate-kernels"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert code == 0 and rows["deepep"][2] == "emulated" and rows["megamoe"][2] == "emulated"
    assert rows["none"][2] == "yes"
    code, out, _ = _run(["--json", "--device", "cpu", "--emulate-kernels", "sm90"], capsys)
    by = {r["name"]: r for r in json.loads(out)}
    assert by["megamoe"]["available"] and by["megamoe"]["emulated"] and by["megamoe"]["reason"] == ""
    import sys
    assert "deep_ep" not in sys.modules  # the emulation ended with the command


def test_bad_device_is_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="moe-a2a")
    backends_cmd.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["backends", "--device", "tpu"])
    assert info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
