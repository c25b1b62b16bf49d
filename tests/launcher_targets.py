"""Rank bodies for the launcher tests (importable by name in spawned ranks; no torch)."""

import os
import signal
import time
from pathlib import Path


def echo(rank, value, *, progress):
    progress("echoing")
    return (rank, value)


def raise_on(rank, bad_rank, *, progress):
    progress("started")
    if rank == bad_rank:
        raise RuntimeError("broken on purpose")
    time.sleep(60)  # the others would wait for the failed one forever


def user_error_on(rank, bad_rank, *, progress):
    from moe_a2a.errors import MoeA2AError

    if rank == bad_rank:
        raise MoeA2AError("--thing 3 is invalid: use 2")
    time.sleep(60)


def peer_lost_after(rank, bad_rank, *, progress):
    """The bad rank dies; the others fail like a collective whose peer is gone."""
    if rank == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")


def silent(rank, marker_dir, *, progress):
    """Every rank reports once, writes its pid, then never answers again."""
    progress("in the collective")
    Path(marker_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(3600)


def stuck_one(rank, bad_rank, *, progress):
    """The bad rank hangs; the others time out like a collective waiting for it."""
    progress("step 0, layer 0")
    if rank == bad_rank:
        time.sleep(3600)
    time.sleep(1.0)
    raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1000ms for "
                       "recv operation to complete")


def mute(rank, marker_dir, *, progress):
    """Never reports progress (a rank stuck while starting)."""
    Path(marker_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(3600)


def sleep_by_rank(rank, seconds_per_rank, *, progress):
    """Rank r returns after r * seconds_per_rank seconds (the first finishes at once)."""
    time.sleep(rank * seconds_per_rank)
    return rank
