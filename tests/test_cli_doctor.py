"""``moe-a2a doctor``: the environment report, with the real reasons."""

from __future__ import annotations

import json

from moe_a2a.cli import main
from moe_a2a.cli.doctor_cmd import collect, render
from moe_a2a.testing import emulate_kernels


def test_doctor_json_reports_every_section(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"moe_a2a", "python", "platform", "torch", "cuda", "packages", "backends"}
    assert report["torch"]["importable"] and report["torch"]["distributed"]["gloo"] is True
    import torch

    assert report["cuda"]["available"] is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in report["cuda"]["reason"]
    for name in ("deep_ep", "deep_gemm"):
        entry = report["packages"][name]
        assert entry["importable"] or entry["error"].startswith(f"import {name} failed: ")
    assert "nvshmem" in report["packages"]
    rows = {r["name"]: r for r in report["backends"]}
    assert rows["none"]["available"] and rows["alltoall"]["available"]
    from moe_a2a.backends import check_availability

    for name in ("deepep", "megamoe"):  # the same reason as the registry gives
        assert (rows[name]["available"], rows[name]["reason"]) == check_availability(name)


def test_doctor_text_and_emulation(capsys):
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "torch " in text and "backends:" in text and "deepep:" in text
    with emulate_kernels():
        report = collect()
    assert report["packages"]["deep_ep"] == {"version": "1.2.1+moe_a2a.emulation",
                                             "importable": True, "emulated": True}
    rows = {r["name"]: r for r in report["backends"]}
    assert rows["deepep"]["available"] and rows["deepep"]["emulated"]
    assert "deepep: emulated" in render(report) and "deep_gemm: moe-a2a emulation" in render(report)
