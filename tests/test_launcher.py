"""moe_a2a.launcher: local ranks started, watched and stopped together (multi-process, no torch
in the ranks: each test costs Python start-ups, not torch imports)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launcher_targets as targets
from proc_helpers import alive, linux_only, wait_for
from moe_a2a.errors import MoeA2AError
from moe_a2a.launcher import RankError, launch

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.multiproc


def test_results_in_rank_order():
    assert launch(targets.echo, 3, ("x",), stall_timeout_s=60) == [(0, "x"), (1, "x"), (2, "x")]


def test_the_parent_waits_without_spinning():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    assert launch(targets.sleep_by_rank, 2, (3.0,), stall_timeout_s=60) == [0, 1]
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, f"the parent used {cpu:.2f} s of CPU while waiting 3 s"


def test_a_raising_rank_is_named_and_the_others_stopped_at_once():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(targets.raise_on, 3, (1,), stall_timeout_s=60)
    assert time.monotonic() - start < 20  # the others sleep 60 s: they were stopped
    err = info.value
    assert err.ranks == (1,)
    assert str(err).startswith("rank 1 raised RuntimeError: broken on purpose")
    assert "(last progress: started)" in str(err) and "Traceback" not in str(err)
    assert "broken on purpose" in err.tracebacks() and "Traceback" in err.tracebacks()


def test_a_user_error_on_a_rank_stays_a_user_error():
    with pytest.raises(MoeA2AError, match=r"^--thing 3 is invalid: use 2$"):
        launch(targets.user_error_on, 2, (0,), stall_timeout_s=60)


def test_a_killed_rank_is_the_cause_not_the_peers_that_lost_it():
    with pytest.raises(RankError) as info:
        launch(targets.peer_lost_after, 3, (2,), stall_timeout_s=60)
    text = str(info.value)
    assert info.value.ranks == (2,)
    assert text.startswith("rank 2 was killed by SIGKILL"), text
    assert "rank 0 raised" not in text and "rank 1 raised" not in text


def test_rank_error_message_puts_causes_first():
    from moe_a2a.launcher import PEER_LOST, RAISED, RankFailure

    err = RankError([RankFailure(rank=0, cause=PEER_LOST, detail="RuntimeError: Connection closed"),
                     RankFailure(rank=3, cause=RAISED, detail="ValueError: x", traceback="tb3"),
                     RankFailure(rank=1, cause=PEER_LOST, detail="RuntimeError: Timed out")])
    assert str(err) == "rank 3 raised ValueError: x; then ranks 0, 1 lost the failed peer"
    assert err.ranks == (3,) and err.tracebacks() == "--- rank 3 (raised) ---\ntb3"


def test_a_stuck_rank_is_named_when_its_peers_time_out():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(targets.stuck_one, 3, (0,), stall_timeout_s=60)
    assert time.monotonic() - start < 30
    assert info.value.ranks == (0,)
    assert str(info.value).startswith("rank 0 stopped responding: no progress for"), str(info.value)
    assert "(last progress: step 0, layer 0)" in str(info.value)


def test_silent_ranks_hit_the_parent_deadline(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        launch(targets.silent, 2, (str(tmp_path),), stall_timeout_s=2)
    assert time.monotonic() - start < 30
    assert info.value.ranks == (0, 1)
    assert "no rank reported progress for 2 s (--collective-timeout)" in str(info.value)
    for pid_file in tmp_path.glob("rank*.pid"):
        assert not alive(int(pid_file.read_text()))


def test_a_rank_that_never_reports_gets_the_startup_allowance(tmp_path):
    with pytest.raises(RankError) as info:
        launch(targets.mute, 2, (str(tmp_path),), stall_timeout_s=0.5, startup_timeout_s=3)
    assert info.value.ranks == (0, 1)
    assert "no rank reported progress for 3 s after starting" in str(info.value)
    for pid_file in tmp_path.glob("rank*.pid"):
        assert not alive(int(pid_file.read_text()))


# ---- the parent is stopped: a driver process runs launch() over silent ranks ----------------

DRIVER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import launcher_targets
from moe_a2a.launcher import launch
try:
    launch(launcher_targets.silent, 3, (sys.argv[1],), stall_timeout_s=600)
except KeyboardInterrupt as exc:
    print("driver: interrupted", file=sys.stderr)
    sys.exit(getattr(exc, "exit_status", 130))
"""


def _start_driver(tmp_path, **popen):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    assert wait_for(lambda: len(list(tmp_path.glob("rank*.pid"))) == 3, 60), proc.stderr
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert all(alive(pid) for pid in pids)
    return proc, pids


@linux_only
def test_sigterm_to_the_parent_stops_every_rank(tmp_path):
    proc, pids = _start_driver(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not any(alive(pid) for pid in pids)


@linux_only
def test_ctrl_c_to_the_process_group_one_message_no_traceback(tmp_path):
    proc, pids = _start_driver(tmp_path, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: parent and ranks get it
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert err.strip() == "driver: interrupted", err
    assert not any(alive(pid) for pid in pids)


@linux_only
def test_ranks_die_with_a_killed_parent(tmp_path):
    proc, pids = _start_driver(tmp_path)
    proc.kill()  # SIGKILL: the parent cannot clean up; the kernel and the watchdog must
    proc.wait(timeout=10)
    assert wait_for(lambda: not any(alive(pid) for pid in pids), 5)


WATCHDOG_CHILD = """
import os, sys, time
sys.platform = "watchdog-only"  # no prctl: only the watchdog thread guards this process
from moe_a2a.launcher import die_with_parent
die_with_parent(os.getppid())
print(os.getpid(), flush=True)
time.sleep(60)
"""
WATCHDOG_PARENT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {WATCHDOG_CHILD!r}], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
child.wait()
"""


@linux_only
def test_watchdog_ends_a_rank_whose_parent_is_gone_without_prctl():
    parent = subprocess.Popen([sys.executable, "-c", WATCHDOG_PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait(timeout=10)
    assert wait_for(lambda: not alive(child), 5)


def test_a_rank_whose_parent_already_left_exits_at_once():
    code = "from moe_a2a.launcher import die_with_parent; die_with_parent(1); print('still here')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and "still here" not in out.stdout
