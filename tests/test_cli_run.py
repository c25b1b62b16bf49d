"""``moe-a2a run`` end to end, as a user runs it: real spawned ranks, exit codes, JSON summary."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKE_BACKEND = REPO / "tests" / "fixtures" / "thirdparty_backend" / "good"
pytestmark = pytest.mark.multiproc


def _run(*argv, env_extra=None, launcher=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_A2A_", "SGLANG_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [str(p) for p in (env_extra or {}).pop("_paths", [])])
    env.update(env_extra or {})
    cmd = (launcher or [sys.executable, "-m", "moe_a2a"]) + ["run", "--quiet", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _summary(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_alltoall_tp4_passes():
    s = _summary(_run("--moe-a2a-backend", "alltoall", "--tp-size", "4", "--json"))
    assert s["passed"] is True and s["backend"] == "alltoall"
    assert (s["tp_size"], s["ep_size"], s["attn_tp_size"]) == (4, 4, 4)
    assert s["steps"] == 4 and s["tokens"] > 0 and s["tokens_per_s"] > 0
    assert 0 <= s["max_abs_err"] <= s["tolerance"]
    assert any(d["field"] == "ep_size" for d in s["decisions"])
    assert s["routed_experts_checked"] == 0 and s["routed_experts_gather"] is None  # capture off


def test_none_with_dp_attention_and_moe_tp_passes():
    s = _summary(_run("--moe-a2a-backend", "none", "--tp-size", "4", "--ep-size", "2",
                      "--dp-size", "2", "--enable-dp-attention", "--json"))
    assert s["passed"] is True
    assert (s["attn_tp_size"], s["moe_tp_size"], s["ep_size"]) == (2, 2, 2)


def test_eplb_rebalances_skewed_routing_and_outputs_stay_equal():
    s = _summary(_run("--moe-a2a-backend", "alltoall", "--tp-size", "4", "--enable-eplb",
                      "--ep-num-redundant-experts", "4", "--routing-skew", "2", "--json"))
    assert s["passed"] is True
    eplb = s["eplb"]
    assert eplb["utilization_after"] > eplb["utilization_before"]
    assert eplb["num_physical_experts"] == 20 and eplb["dispatch_algorithm"] == "static"
    first = eplb["rebalances"][0]
    assert first["forward"] == 2 and first["layers_changed"] == [0, 1]  # halfway through 4 steps


def test_fused_shared_experts_with_eplb_on_the_replicated_backend():
    proc = _run("--moe-a2a-backend", "none", "--tp-size", "4", "--ep-size", "2",
                "--enforce-shared-experts-fusion", "--enable-eplb", "--ep-num-redundant-experts", "2",
                "--ep-dispatch-algorithm", "dynamic", "--routing-skew", "1", "--steps", "3",
                "--num-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASSED") and "EPLB: 18 physical experts, 1 rebalances" in proc.stdout


def test_experts_not_divisible_by_ep_exits_2():
    proc = _run("--moe-a2a-backend", "alltoall", "--tp-size", "4", "--num-experts", "6")
    assert proc.returncode == 2
    assert "--num-experts 6 cannot be split over ep_size 4" in proc.stderr
    assert "multiple of 4" in proc.stderr and "Traceback" not in proc.stderr


def test_unavailable_backend_exits_2_with_the_reason():
    import importlib.util

    proc = _run("--moe-a2a-backend", "deepep", "--tp-size", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--moe-a2a-backend deepep cannot run on cpu" in proc.stderr
    if importlib.util.find_spec("deep_ep") is None:  # fail closed: the import error and the hint
        assert "import deep_ep failed: ModuleNotFoundError: No module named 'deep_ep'" in proc.stderr
        assert "install: build DeepEP v1.2.1 from source" in proc.stderr
        assert "--emulate-kernels" in proc.stderr


# ---- deepep and megamoe through the kernel emulations (--emulate-kernels) -----------------

def test_deepep_low_latency_emulated():
    s = _summary(_run("--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size",
                      "4", "--emulate-kernels", "--json"))
    assert s["passed"] is True and s["backend"] == "deepep" and s["tp_size"] == 4
    assert s["emulated"] is True and s["kernels"] == {"deep_ep": "emulated"}
    assert s["dispatch_modes"] == {"normal": 0, "low_latency": 8}
    assert s["dtype"] == "bfloat16" and s["shape"]["hidden_size"] == 2048  # what the kernels take
    fields = {d["field"]: d for d in s["decisions"]}
    assert fields["hidden_size"]["to"] == 2048 and "DeepEP low-latency kernels" in fields["hidden_size"]["reason"]
    assert fields["dtype"]["to"] == "bfloat16"


def test_deepep_auto_emulated_prefill_then_decode():
    """auto: step 0 prefills (normal), steps 1 and 3 decode (low latency), step 2 prefills."""
    proc = _run("--moe-a2a-backend", "deepep", "--deepep-mode", "auto", "--tp-size", "4",
                "--num-layers", "1", "--emulate-kernels", "--json")
    s = _summary(proc)
    assert s["passed"] is True and s["dispatch_modes"] == {"normal": 2, "low_latency": 2}


def test_megamoe_emulated_under_and_over_the_cap():
    """cap 4 with up to 32 tokens over 4 attention-TP ranks: full steps take the fallback,
    small ones the fused kernel; both equal the reference."""
    s = _summary(_run("--moe-a2a-backend", "megamoe", "--tp-size", "4", "--num-layers", "1",
                      "--mega-moe-num-max-tokens-per-rank", "4", "--emulate-kernels", "--json"))
    assert s["passed"] is True and s["kernels"] == {"deep_gemm": "emulated"}
    assert s["layer_calls"]["fused"] == 2 and s["layer_calls"]["fallback"] == 2


def test_hf_deepseek_block_against_transformers():
    from moe_a2a.hf import example_hf_config

    s = _summary(_run("--hf-config", str(example_hf_config("deepseek_v3")),
                      "--moe-a2a-backend", "alltoall", "--tp-size", "2", "--json"))
    assert s["passed"] is True and s["reference"] == "transformers"


def test_mismatch_exits_1():
    # the fixture backend keeps tokens on their rank: wrong as soon as ep_size > 1
    proc = _run("--moe-a2a-backend", "fake_a2a", "--tp-size", "2", "--steps", "1",
                "--num-layers", "1", env_extra={"_paths": [FAKE_BACKEND]})
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("FAILED")


def test_torchrun_two_processes():
    from moe_a2a.run import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # this interpreter's torchrun

    proc = _run("--moe-a2a-backend", "alltoall", "--tp-size", "2", "--json",
                launcher=[*torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "-m", "moe_a2a"])
    s = _summary(proc)
    assert s["passed"] is True and s["tp_size"] == 2 and s["dist_backend"] == "gloo"


# ---- bad input: rejected before any rank starts (in-process, fast) ----------------------

@pytest.mark.parametrize("argv, needle", [
    (["--moe-a2a-backend", "deepep", "--tp-size", "2", "--deepep-mode", "low_latency",
      "--num-tokens", "300"], "raise --deepep-num-max-dispatch-tokens-per-rank to at least 150"),
    # an eager batch above the Mega-MoE cap is not an error (that step takes the fallback);
    # here megamoe cannot run at all, and says why
    (["--moe-a2a-backend", "megamoe", "--tp-size", "2", "--num-tokens", "2000"],
     "--moe-a2a-backend megamoe cannot run on cpu"),
    (["--steps", "0"], "--steps 0 is invalid: it must be >= 1"),
    (["--num-tokens", "-1"], "--num-tokens -1 is invalid: it must be >= 1"),
    (["--top-k", "17"], "--top-k 17 exceeds --num-experts 16"),
    (["--moe-a2a-backend", "none", "--tp-size", "4", "--intermediate-size", "30"],
     "--intermediate-size 30 cannot be split over moe_tp_size 4"),
    (["--tp-size", "2", "--num-experts", "16", "--top-k", "9", "--n-group", "8",
      "--topk-group", "2"], "raise topk_group to >= 5"),
    (["--hf-config", "/nonexistent/config.json"], "/nonexistent/config.json does not exist"),
    (["--moe-a2a-backend", "deepep", "--tp-size", "2"], "--moe-a2a-backend deepep cannot run on cpu"),
    (["--device", "cuda"], "--device cuda"),
    (["--routed-experts-output", "/tmp/x.json"],
     "--routed-experts-output needs --enable-return-routed-experts"),
    (["--enable-return-routed-experts", "--routed-experts-output", "/nonexistent/dir/x.json"],
     "folder /nonexistent/dir does not exist"),
    (["--moe-a2a-backend", "alltoall", "--tp-size", "4", "--num-experts", "16", "--enable-eplb",
      "--ep-num-redundant-experts", "3"],
     "--num-experts 16 + --ep-num-redundant-experts 3 = 19 physical experts cannot be split "
     "over ep 4: the physical expert count must be a multiple of 4; fix: use "
     "--ep-num-redundant-experts 0 or 4"),
    (["--tp-size", "4", "--ep-num-redundant-experts", "1", "--num-experts", "8"],
     "= 9 physical experts cannot be split over ep 4"),
    (["--enforce-shared-experts-fusion", "--shared-intermediate-size", "0"],
     "but --shared-intermediate-size 0 means there is none"),
    (["--enforce-shared-experts-fusion", "--shared-intermediate-size", "96"],
     "into slots of --intermediate-size 64: use a multiple of 64"),
    (["--routing-skew", "-1"], "--routing-skew -1.0 is invalid"),
    (["--enable-deepep-waterfill", "--tp-size", "2"], "--moe-a2a-backend deepep cannot run on cpu"),
    (["--moe-a2a-backend", "deepep", "--deepep-mode", "low_latency", "--tp-size", "2",
      "--hidden-size", "1000", "--emulate-kernels"],
     "--hidden-size 1000: DeepEP low-latency kernels are compiled for hidden sizes 2048,"),
    (["--moe-a2a-backend", "deepep", "--tp-size", "2", "--dtype", "float32", "--emulate-kernels"],
     "--dtype float32: DeepEP normal and low-latency kernels (auto mode) take bfloat16"),
    (["--moe-a2a-backend", "megamoe", "--tp-size", "2", "--intermediate-size", "64",
      "--emulate-kernels"], "--intermediate-size 64: DeepGEMM Mega-MoE kernels need an expert "
                            "intermediate size divisible by 512"),
    (["--moe-a2a-backend", "deepep", "--tp-size", "6", "--deepep-mode", "normal",
      "--num-experts", "24", "--emulate-kernels"], "--tp-size 6: DeepEP normal kernels run on EP "
                                                   "groups of 2, 4, 8"),
])
def test_bad_input_exits_2_without_starting_ranks(argv, needle, capsys, monkeypatch):
    from moe_a2a import run as run_module
    from moe_a2a.cli import main

    def no_spawn(*a, **k):
        raise AssertionError("ranks were started for bad input")

    monkeypatch.setattr(run_module, "spawn_job", no_spawn)
    for name in [k for k in os.environ if k.startswith(("MOE_A2A_", "SGLANG_"))]:
        monkeypatch.delenv(name)
    if argv[:2] == ["--device", "cuda"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA present: --device cuda is valid here")
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_hf_config_experts_not_divisible(tmp_path, capsys):
    from moe_a2a.cli import main
    from moe_a2a.hf import example_hf_config

    cfg = json.loads(example_hf_config("mixtral").read_text())
    cfg["num_local_experts"] = 6
    path = tmp_path / "mixtral6.json"
    path.write_text(json.dumps(cfg))
    assert main(["run", "--hf-config", str(path), "--tp-size", "4"]) == 2
    assert "6 experts cannot be split over ep_size 4" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["alltoall", "none"])
def test_cuda_two_gpus(backend):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    extra = ["--ep-size", "2"] if backend == "none" else []
    s = _summary(_run("--device", "cuda", "--moe-a2a-backend", backend, "--tp-size", "2",
                      *extra, "--json"))
    assert s["passed"] is True and s["dist_backend"] == "nccl"
