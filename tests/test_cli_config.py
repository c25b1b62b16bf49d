"""``moe-a2a config``: the "Must hold" lines of issue 2, the output forms, and the docs page.

Most checks call ``moe_a2a.cli.main`` in-process (the console script is ``sys.exit(main())``);
a few run a real process to check exit codes, stderr and that no traceback escapes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest

from moe_a2a.cli import main as cli_main
from moe_a2a.server_args import docs as server_args_docs
from moe_a2a.server_args import resolve
from moe_a2a.server_args.fields import FIELDS, LEGACY_VARS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


@pytest.fixture
def clean_env(monkeypatch):
    """No MOE_A2A_* or legacy SGLANG_* variables from the machine running the tests."""
    for var in list(os.environ):
        if var.startswith(("MOE_A2A_", "SGLANG_")):
            monkeypatch.delenv(var)
    return monkeypatch


def run(capsys, *argv):
    try:
        code = cli_main(["config", *argv])
    except SystemExit as exc:  # argparse's own usage errors exit from the parser
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out), err


def decisions_for(obj, field):
    return [d for d in obj["decisions"] if d["field"] == field]


# ---- Must hold (in-process) ----------------------------------------------------------------------

def test_megamoe_tp8_derives_ep(clean_env, capsys):
    obj, _ = run_json(capsys, "--moe-a2a-backend", "megamoe", "--tp-size", "8")
    assert set(obj) >= {"args", "decisions", "warnings"}
    assert obj["args"]["ep_size"] == 8
    (d,) = decisions_for(obj, "ep_size")
    assert (d["from"], d["to"]) == (1, 8) and "megamoe" in d["reason"]


def test_legacy_megamoe_variable(clean_env, capsys):
    clean_env.setenv("SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE", "1")
    obj, err = run_json(capsys, "--tp-size", "4")
    assert obj["args"]["moe_a2a_backend"] == "megamoe" and obj["args"]["ep_size"] == 4
    assert any("deprecated" in w and "SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE" in w for w in obj["warnings"])
    assert "deprecated" in err  # warnings also on stderr
    obj, err = run_json(capsys, "--tp-size", "4", "--moe-a2a-backend", "deepep")
    assert obj["args"]["moe_a2a_backend"] == "deepep"
    assert any("SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE" in w and "--moe-a2a-backend deepep" in w
               for w in obj["warnings"])


@pytest.mark.parametrize("argv, parts", [
    (["--moe-a2a-backend", "nosuch"], ["nosuch", "none, alltoall, deepep, megamoe"]),
    (["--moe-a2a-backend", "mooncake"], ["known from SGLang", "not provided"]),
    (["--moe-a2a-backend", "deepep", "--tp-size", "8", "--ep-size", "4"],
     ["tp_size=8", "ep_size=4", "fix: drop --ep-size, or pass --ep-size 8"]),
    (["--tp-size", "4", "--dp-size", "3", "--enable-dp-attention"], ["--dp-size 3", "fix"]),
    (["--enable-eplb"], ["--enable-eplb", "ep_size", "fix"]),
    (["--tp-size", "zero"], ["--tp-size 'zero'", "not an integer"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
])
def test_bad_input_exits_2_with_one_line(clean_env, capsys, argv, parts):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("moe-a2a: error: ")
    for part in parts:
        assert part in err


def test_bad_env_exits_2(clean_env, capsys):
    clean_env.setenv("MOE_A2A_ENABLE_EPLB", "perhaps")
    code, _, err = run(capsys)
    assert code == 2 and "MOE_A2A_ENABLE_EPLB='perhaps'" in err and "yes/no" in err


def test_deepep_normal_disables_cuda_graph(clean_env, capsys):
    obj, _ = run_json(capsys, "--moe-a2a-backend", "deepep", "--deepep-mode", "normal", "--tp-size", "2")
    assert obj["args"]["disable_cuda_graph"] is True
    (d,) = decisions_for(obj, "disable_cuda_graph")
    assert (d["from"], d["to"]) == (False, True)


def test_dp_attention_with_dp1_is_turned_off(clean_env, capsys):
    obj, _ = run_json(capsys, "--enable-dp-attention")
    assert obj["args"]["enable_dp_attention"] is False
    (d,) = decisions_for(obj, "enable_dp_attention")
    assert (d["from"], d["to"]) == (True, False)


def test_eplb_decisions(clean_env, capsys):
    obj, _ = run_json(capsys, "--enable-eplb", "--tp-size", "4", "--ep-size", "4")
    assert obj["args"]["expert_distribution_recorder_mode"] == "stat"
    assert obj["args"]["ep_dispatch_algorithm"] == "static"
    assert decisions_for(obj, "expert_distribution_recorder_mode")[0]["to"] == "stat"
    assert decisions_for(obj, "ep_dispatch_algorithm")[0]["to"] == "static"


def test_registered_backend_resolves(clean_env, capsys):
    from moe_a2a.backends import register_backend, registry_snapshot

    with registry_snapshot():
        register_backend("my_a2a", "tests.nowhere:Mine", token_layout="scattered", ep_policy="tp")
        obj, _ = run_json(capsys, "--moe-a2a-backend", "My-A2A", "--tp-size", "2")
    assert obj["args"]["moe_a2a_backend"] == "my_a2a" and obj["args"]["ep_size"] == 2


# ---- output forms --------------------------------------------------------------------------------

def test_json_matches_explain(clean_env, capsys):
    argv = ["--moe-a2a-backend", "alltoall", "--tp-size", "4", "--enable-return-routed-experts"]
    obj, _ = run_json(capsys, *argv)
    assert obj == json.loads(json.dumps(resolve(argv, env={}).explain()))
    assert obj["sources"]["tp_size"] == "cli" and obj["derived"]["attn_tp_size"] == 4


def test_json_output_is_what_workers_read(clean_env, capsys):
    """A launcher hands `moe-a2a config --json` to ServerArgs.from_json unchanged."""
    from moe_a2a.server_args import ConfigError, ServerArgs

    argv = ["--moe-a2a-backend", "deepep", "--tp-size", "4", "--dp-size", "2",
            "--enable-dp-attention", "--cuda-graph-max-bs", "64"]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    rebuilt = ServerArgs.from_json(out)
    assert rebuilt == resolve(argv, env={}) and rebuilt.decisions and rebuilt.capacities()
    data = json.loads(out)
    with pytest.raises(ConfigError, match="unknown keys"):
        ServerArgs.from_json(json.dumps({**data, "derivd": {}}))


def test_human_output_table_decisions_warnings(clean_env, capsys):
    clean_env.setenv("MOE_A2A_TP_SIZE", "2")
    code, out, err = run(capsys, "--moe-a2a-backend", "alltoall", "--deepep-mode", "normal")
    assert code == 0
    lines = out.splitlines()
    tp_row = next(line for line in lines if line.split()[:1] == ["tp_size"])
    assert tp_row.split()[1:] == ["2", "env:MOE_A2A_TP_SIZE"]
    backend_row = next(line for line in lines if line.split()[:1] == ["moe_a2a_backend"])
    assert backend_row.split()[1:] == ["alltoall", "cli"]
    assert all(any(line.split()[:1] == [f.name] for line in lines) for f in FIELDS)
    order = [out.index(h) for h in ("field", "derived:", "decisions (", "warnings (")]
    assert order == sorted(order)
    assert "ep_size: 1 -> 2" in out
    assert "--deepep-mode normal has no effect" in out
    assert "moe-a2a: warning: --deepep-mode normal has no effect" in err


# ---- real processes ------------------------------------------------------------------------------

def _process(argv, extra_env=None, pythonpath=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_A2A_", "SGLANG_"))}
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "moe_a2a", "config", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_process_json_and_warnings_on_stderr():
    proc = _process(["--tp-size", "4", "--json"], {"SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE": "1"})
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["args"]["moe_a2a_backend"] == "megamoe" and obj["args"]["ep_size"] == 4
    assert proc.stderr.startswith("moe-a2a: warning: SGLANG_OPT_USE_DEEPGEMM_MEGA_MOE is deprecated")
    assert "Traceback" not in proc.stderr and "FutureWarning" not in proc.stderr


def test_process_bad_backend_exit_2_without_traceback():
    proc = _process(["--moe-a2a-backend", "nosuch"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "registered backends are none, alltoall, deepep, megamoe" in proc.stderr


def test_process_entry_point_backend_resolves(tmp_path):
    pkg = tmp_path / "cfg_ep_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from moe_a2a.backends import BackendSpec

        def spec():
            return BackendSpec(name="cfg_ep_a2a", dispatcher="cfg_ep_pkg.dispatch:FakeDispatcher",
                               token_layout="scattered", ep_policy="tp",
                               cuda_graph_modes=("default",))
    """))
    dist = tmp_path / "cfg_ep_a2a-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cfg-ep-a2a\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[moe_a2a.backends]\ncfg_ep_a2a = cfg_ep_pkg:spec\n")
    proc = _process(["--moe-a2a-backend", "cfg_ep_a2a", "--tp-size", "2", "--json"], pythonpath=[tmp_path])
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["args"]["moe_a2a_backend"] == "cfg_ep_a2a" and obj["args"]["ep_size"] == 2
    assert obj["args"]["disable_cuda_graph"] is False  # its spec says it can be captured


# ---- docs/configuration.md -----------------------------------------------------------------------

def test_configuration_doc_is_current():
    text = DOC.read_text()
    assert sorted(server_args_docs.block_names(text)) == sorted(server_args_docs.BLOCKS)
    assert server_args_docs.update(text) == text, (
        "docs/configuration.md is stale: run python -m moe_a2a.server_args.docs docs/configuration.md")


def test_configuration_doc_names_every_flag_variable_and_legacy_name():
    text = DOC.read_text()
    for f in FIELDS:
        assert f"`{f.flag}`" in text and f"`{f.env}`" in text
        for alias in f.aliases:
            assert f"`{alias}`" in text
    for legacy in LEGACY_VARS:
        assert f"`{legacy.var}`" in text
    assert "--enable-deepep-moe" in text and "--enable-ep-moe" in text
    assert "moe-a2a 0.4" in text


def test_layout_table_rows_match_server_args():
    """Read the table as a user would and check each row against a fresh resolve."""
    text = DOC.read_text()
    block = text.split("<!-- BEGIN generated:layout -->")[1].split("<!-- END generated:layout -->")[0]
    rows = [line.strip("|").split("|") for line in block.strip().splitlines()[2:]]
    assert len(rows) >= 5
    for cells in rows:
        tp, dp, ep, backend, dp_attn, attn_dp, attn_tp, moe_tp, ep_out, gather = (c.strip() for c in cells)
        argv = ["--moe-a2a-backend", backend, "--tp-size", tp, "--dp-size", dp,
                "--enable-return-routed-experts"]
        if ep != "-":
            argv += ["--ep-size", ep]
        if dp_attn == "on":
            argv.append("--enable-dp-attention")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = resolve(argv, env={})
        assert (a.attn_dp_size, a.attn_tp_size, a.moe_tp_size, a.ep_size, a.routed_experts_gather) == (
            int(attn_dp), int(attn_tp), int(moe_tp), int(ep_out), gather), cells



# ---- issue 7: launch-line parity with SGLang (Must hold) ------------------------------------------

def test_deepep_low_latency_capacity_counts_per_kernel_rank(clean_env, capsys):
    code, _, err = run(capsys, "--moe-a2a-backend", "deepep", "--tp", "2", "--deepep-mode",
                       "low_latency", "--cuda-graph-max-bs", "256")
    assert code == 0, err


def test_chunked_prefill_is_global_and_reported_per_rank(clean_env, capsys):
    obj, _ = run_json(capsys, "--moe-a2a-backend", "deepep", "--tp", "8", "--dp", "8",
                      "--enable-dp-attention", "--chunked-prefill-size", "16384")
    assert obj["args"]["chunked_prefill_size"] == 16384
    assert obj["derived"]["prefill_tokens_per_dp_rank"] == 2048
    assert obj["derived"]["prefill_tokens_per_kernel_rank"] == 2048


def test_sglang_launch_line_works_unchanged(clean_env, capsys):
    obj, err = run_json(capsys, "--model-path", "deepseek-ai/DeepSeek-V3", "--tp", "8",
                        "--moe-a2a-backend", "deepep", "--mem-fraction-static", "0.8",
                        "--enable-two-batch-overlap")
    (warning,) = [w for w in obj["warnings"] if "SGLang flags" in w]
    for flag in ("--model-path", "--mem-fraction-static", "--enable-two-batch-overlap"):
        assert flag in warning
    assert warning in err  # also on stderr
    assert obj["args"]["ep_size"] == 8


def test_near_miss_exits_2_suggesting_our_flag(clean_env, capsys):
    code, out, err = run(capsys, "--ep-szie", "4")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "did you mean --ep-size?" in err


def test_process_near_miss_and_sglang_flags():
    proc = _process(["--ep-szie", "4"])
    assert proc.returncode == 2 and "did you mean --ep-size?" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    proc = _process(["--model-path", "x", "--tp", "2", "--json"], {"SGL_DEEPEP_BF16_DISPATCH": "1"})
    assert proc.returncode == 0, proc.stderr
    warnings_ = json.loads(proc.stdout)["warnings"]
    assert any("--model-path" in w for w in warnings_)
    assert any("SGL_DEEPEP_BF16_DISPATCH=1" in w for w in warnings_)
