"""``moe-a2a run`` under faults (issue 8): wrong results fail, failing ranks are named, stopped
jobs leave nothing behind. The faults come from tests/faulty_backends.py, loaded as a plugin;
spawned runs are tiny (2 ranks, 1 layer, 1 step)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proc_helpers import alive, descendants, linux_only, wait_for

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
TINY = ("--tp-size", "2", "--num-layers", "1", "--steps", "1")
pytestmark = pytest.mark.multiproc


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_A2A_", "SGLANG_"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    env.update(extra or {})
    return env


def _cmd(*argv):
    return [sys.executable, "-m", "moe_a2a", "run", "--quiet", *argv]


def _run(*argv, extra=None, timeout=300):
    return subprocess.run(_cmd(*argv), capture_output=True, text=True, timeout=timeout,
                          env=_env(extra), cwd=REPO)


def _faulty(backend, *argv, marker=None, **kw):
    extra = {"FAULTY_MARKER_DIR": str(marker)} if marker else None
    return _run("--plugin", "faulty_backends", "--moe-a2a-backend", backend, *TINY, *argv,
                extra=extra, **kw)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("moe-a2a")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


# ---- a wrong result never passes ---------------------------------------------------------


def test_float16_20_layers_exits_1_naming_the_non_finite_output():
    """Must hold (issue 8): the residual sum overflows float16; the job must not pass."""
    proc = _run("--moe-a2a-backend", "none", "--tp-size", "1", "--dtype", "float16",
                "--num-layers", "20", "--steps", "2", "--num-tokens", "8")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("FAILED")
    assert "non-finite output (NaN or inf) of layer" in proc.stdout
    assert "at step 0 on rank 0" in proc.stdout


def test_combine_returning_nan_fails():
    proc = _faulty("faulty_nan")
    assert proc.returncode == 1, proc.stderr
    assert "non-finite output (NaN or inf) of layer 0, at step 0 on rank 0" in proc.stdout


# ---- a failing rank is named, with its cause, and never hangs the job ----------------------


def test_rank_raising_in_dispatch_exits_3_within_seconds_naming_it(tmp_path):
    """Must hold (issue 8)."""
    proc = _faulty("faulty_raise", marker=tmp_path)
    ended = time.time()
    assert proc.returncode == 3, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("moe-a2a: error: rank 1 raised RuntimeError: injected fault: "
                           "dispatch failed on purpose"), line
    assert "--debug" in line
    assert ended - float((tmp_path / "fault").read_text()) < 10


def test_killed_rank_exits_3_naming_the_signal():
    proc = _faulty("faulty_kill")
    assert proc.returncode == 3, proc.stderr
    assert _one_line(proc.stderr).startswith("moe-a2a: error: rank 1 was killed by SIGKILL")


def test_stuck_rank_exits_3_after_the_collective_timeout(tmp_path):
    proc = _faulty("faulty_hang", "--collective-timeout", "3", marker=tmp_path)
    ended = time.time()
    assert proc.returncode == 3, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("moe-a2a: error: rank 1 stopped responding"), line
    assert "then rank 0 lost the failed peer" in line
    assert ended - float((tmp_path / "fault").read_text()) < 3 + 12


def test_torchrun_peer_that_never_starts_exits_3_after_the_timeout():
    from moe_a2a.run import free_port

    launch = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    proc = _run("--tp-size", "2", "--collective-timeout", "2", extra=launch)
    assert proc.returncode == 3, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith(f"moe-a2a: error: rank 0 could not meet its peers at 127.0.0.1:"
                           f"{launch['MASTER_PORT']} within the collective timeout"), line
    assert time.monotonic() - start < 60


# ---- stopping the parent stops every rank --------------------------------------------------


def _start_hanging_job(tmp_path, **popen):
    proc = subprocess.Popen(_cmd("--plugin", "faulty_backends", "--moe-a2a-backend", "faulty_hang",
                                 *TINY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env({"FAULTY_MARKER_DIR": str(tmp_path)}), cwd=REPO, **popen)
    assert wait_for(lambda: (tmp_path / "fault").exists() or proc.poll() is not None, 240)
    assert proc.poll() is None, proc.communicate()
    ranks = descendants(proc.pid)
    assert len(ranks) >= 2 and all(alive(pid) for pid in ranks)
    return proc, ranks


@linux_only
def test_sigterm_leaves_no_rank_alive_5_s_later(tmp_path):
    """Must hold (issue 8)."""
    proc, ranks = _start_hanging_job(tmp_path)
    proc.send_signal(signal.SIGTERM)
    time.sleep(5)
    assert not [pid for pid in ranks if alive(pid)]
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert _one_line(err) == "moe-a2a: stopped by SIGTERM"


@linux_only
def test_ctrl_c_exits_130_without_a_traceback_per_rank(tmp_path):
    proc, ranks = _start_hanging_job(tmp_path, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the parent and every rank
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert _one_line(err) == "moe-a2a: interrupted"
    assert wait_for(lambda: not any(alive(pid) for pid in ranks), 5)
