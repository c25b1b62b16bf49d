"""``moe-a2a run --enable-return-routed-experts``: the issue's must-hold command lines and the
output file (bad input: tests/test_cli_run.py)."""

import json

import pytest
import torch

import moe_a2a
from test_cli_run import _run, _summary

pytestmark = pytest.mark.multiproc

DP2 = ("--tp-size", "4", "--dp-size", "2", "--enable-dp-attention",
       "--enable-return-routed-experts", "--json")


@pytest.mark.parametrize("backend, gather", [("alltoall", "late"), ("alltoall", "early"),
                                             ("none", None)])
def test_capture_passes_against_the_reference_router(backend, gather, tmp_path):
    out = tmp_path / "routed.json"
    flags = ("--routed-experts-gather", gather) if gather else ()
    s = _summary(_run("--moe-a2a-backend", backend, *DP2, *flags,
                      "--routed-experts-output", str(out)))
    assert s["passed"] is True and s["routed_experts_checked"] > 0
    assert s["routed_experts_failures"] == 0 and s["routed_experts_rejected"] > 0
    assert s["routed_experts_gather"] == (gather or "none")
    if backend == "alltoall":
        assert s["attn_tp_size"] == 2 and s["routed_experts_collectives"] > 0
    doc = json.loads(out.read_text())
    assert (doc["num_layers"], doc["top_k"], doc["num_experts"]) == (2, 4, 16)
    rows = 0
    for request in doc["requests"]:
        if "error" in request:
            assert "routed_experts_start_len" in request["error"]
            continue
        decoded = moe_a2a.decode_routed_experts(request["blob"])
        assert (decoded.start, decoded.end) == (request["start"], request["end"])
        assert decoded.ids.shape == (request["rows"], 2, 4)
        assert decoded.ids.dtype == torch.int32 and bool((decoded.ids >= 0).all())
        rows += request["rows"]
    assert rows == s["routed_experts_checked"]
    assert {r["dp_rank"] for r in doc["requests"]} == {0, 1}


def test_capture_is_logical_under_eplb_and_fused_shared_experts():
    """Replicas and fused shared columns change what dispatchers see, never what is captured."""
    s = _summary(_run("--moe-a2a-backend", "alltoall", "--tp-size", "4", "--enable-eplb",
                      "--ep-num-redundant-experts", "4", "--enforce-shared-experts-fusion",
                      "--routing-skew", "2", "--enable-return-routed-experts", "--json"))
    assert s["passed"] is True and s["routed_experts_checked"] > 0
    assert s["routed_experts_failures"] == 0 and s["eplb"]
