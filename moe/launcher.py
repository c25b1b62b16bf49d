"""Local ranks as child processes: started together, watched, stopped together.

``moe-a2a run`` starts ``tp_size`` ranks on this machine through :func:`launch`. What holds
(docs/reliability.md):

* Ranks die with their parent, however it ends: on Linux the kernel kills a rank when its
  parent exits (``PR_SET_PDEATHSIG``), and on every platform a watchdog thread in each rank ends
  it within a second once its parent is gone.
* SIGINT (Ctrl-C), SIGTERM or SIGHUP to the parent stops every rank (SIGTERM, then SIGKILL after
  a short grace) before the parent returns; ranks ignore SIGINT themselves, so Ctrl-C in a
  terminal gives one message, not a traceback per rank.
* A failing rank is named with its cause: it raised (the exception, on one line), it was killed
  by a signal, it exited without a result, or it stopped responding. Ranks that failed only
  because a peer went away are reported as such, never as the cause.
* No rank holds the job longer than ``stall_timeout_s`` without reporting progress (a rank
  that has not reported any yet, still importing and meeting its peers, gets
  ``startup_timeout_s``).

This module imports neither torch nor the rest of the library at import time.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

#: Exit status of a rank that finds its parent gone (nobody reads it: the job is over).
_ORPHAN_EXIT = 3
_WATCHDOG_PERIOD_S = 0.5
#: How long the parent waits, after the first rank lost a peer, for the rank that caused it.
FAILURE_GRACE_S = 2.0
#: How long ranks get to exit by themselves after SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 1.0
#: How long finished ranks get to exit (tear down their process group) before being stopped.
EXIT_GRACE_S = 10.0
#: Extra allowance, beyond the stall timeout, before a rank's first progress report: importing
#: torch on a busy machine with many ranks takes tens of seconds.
STARTUP_ALLOWANCE_S = 300.0

# failure causes
RAISED = "raised"
KILLED = "killed"
EXITED = "exited"
STUCK = "stuck"
PEER_LOST = "peer lost"
UNREACHABLE = "unreachable"

# what a torch.distributed backend says when a peer went away or a collective timed out
_PEER_LOSS_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out",
                      "broken pipe", "gloo", "nccl", "socket", "tcpstore", "store")


@dataclass(frozen=True)
class RankFailure:
    """Why one rank did not return a result.

    Attributes:
        rank: the rank (0..world_size-1).
        cause: ``raised`` (an exception), ``killed`` (a signal), ``exited`` (ended without a
            result), ``stuck`` (alive, silent past the deadline), ``unreachable`` (never met its
            peers: one that never started, a wrong address) or ``peer lost`` (a collective
            failed because another rank went away or stalled: a consequence, not a cause).
        detail: one line: the exception, the signal, the exit status or how long it was silent.
        last_progress: the last progress the rank reported (``step 1, layer 0``), or "".
        traceback: the rank's traceback when it raised, else "".
    """

    rank: int
    cause: str
    detail: str
    last_progress: str = ""
    traceback: str = ""

    @property
    def primary(self) -> bool:
        return self.cause != PEER_LOST

    def line(self) -> str:
        where = f" (last progress: {self.last_progress})" if self.last_progress else ""
        verbs = {RAISED: "raised", KILLED: "was killed by", EXITED: "exited",
                 STUCK: "stopped responding:", PEER_LOST: "lost a peer:",
                 UNREACHABLE: "could not meet its peers"}
        verb = verbs.get(self.cause, self.cause)
        gap = "" if self.detail.startswith((" ", ":")) else " "
        return f"rank {self.rank} {verb}{gap}{self.detail}{where}"


class RankError(RuntimeError):
    """At least one rank failed (crashed, killed, stuck): not bad input, not a mismatch.

    ``str()`` names the failing rank(s) and the cause on one line; :meth:`tracebacks` holds the
    ranks' tracebacks (printed by the command line with ``--debug``).
    """

    def __init__(self, failures: Sequence[RankFailure], *, note: str = "") -> None:
        self.failures: Tuple[RankFailure, ...] = tuple(
            sorted(failures, key=lambda f: (not f.primary, f.rank)))
        self.note = note
        super().__init__(self._message())

    def _message(self) -> str:
        causes = [f for f in self.failures if f.primary] or list(self.failures)
        text = "; ".join(f.line() for f in causes)
        followers = sorted(f.rank for f in self.failures if f not in causes)
        if followers:
            text += (f"; then rank{'s' if len(followers) > 1 else ''} "
                     f"{', '.join(map(str, followers))} lost the failed peer")
        return text + (f"; {self.note}" if self.note else "")

    @property
    def ranks(self) -> Tuple[int, ...]:
        """The ranks named as the cause."""
        causes = [f for f in self.failures if f.primary] or list(self.failures)
        return tuple(f.rank for f in causes)

    def tracebacks(self) -> str:
        return "\n".join(f"--- rank {f.rank} ({f.cause}) ---\n{f.traceback.rstrip()}"
                         for f in self.failures if f.traceback)


class JobInterrupted(KeyboardInterrupt):
    """The parent got SIGINT, SIGTERM or SIGHUP; every rank has been stopped.

    ``exit_status`` is 130 after SIGINT (Ctrl-C) and ``128 + signal`` otherwise (143 after
    SIGTERM), the shell's convention.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(_signal_name(self.signum))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---- one rank -----------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (its parent) is gone.

    Linux: the kernel sends SIGKILL when the parent exits (``prctl(PR_SET_PDEATHSIG)``).
    Everywhere: a daemon thread polls the parent pid and exits once it changes (the process was
    re-parented), which also covers the parent dying before ``prctl`` took effect.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: the watchdog still covers it
            pass
    if os.getppid() != parent_pid:
        os._exit(_ORPHAN_EXIT)

    def watch() -> None:
        while True:
            time.sleep(_WATCHDOG_PERIOD_S)
            if os.getppid() != parent_pid:
                os._exit(_ORPHAN_EXIT)

    threading.Thread(target=watch, name="moe-a2a parent watchdog", daemon=True).start()


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` is what a collective raises when a peer went away or stalled."""
    dist_error = None
    if "torch.distributed" in sys.modules:
        dist_error = getattr(sys.modules["torch.distributed"], "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, (RuntimeError, OSError, TimeoutError)):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_LOSS_MARKERS)


def describe_exception(exc: BaseException) -> Dict[str, Any]:
    """An exception as plain data (sent from a rank to its parent)."""
    from moe_a2a.errors import user_error_types

    message = str(exc).strip()
    first = message.splitlines()[0] if message else ""
    return {"type": type(exc).__name__, "message": message,
            "line": f"{type(exc).__name__}: {first}" if first else type(exc).__name__,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            "user_error": isinstance(exc, user_error_types()),
            "peer_loss": is_peer_loss(exc)}


def failure_from_exception(rank: int, info: Dict[str, Any], last_progress: str = "") -> RankFailure:
    return RankFailure(rank=rank, cause=PEER_LOST if info["peer_loss"] else RAISED,
                       detail=_clip(info["line"]), last_progress=last_progress,
                       traceback=info["traceback"])


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} chars)"


class _Channel:
    """A rank's side of its pipe to the parent; a rank whose parent is gone ends at once."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, kind: str, value: Any = None) -> None:
        with self._lock:
            try:
                self._conn.send((kind, value))
            except (BrokenPipeError, EOFError, OSError):
                os._exit(_ORPHAN_EXIT)

    def progress(self, what: str) -> None:
        self.send("progress", str(what))


def _rank_main(rank: int, parent_pid: int, conn: Any, target: Callable[..., Any],
               args: Tuple[Any, ...], debug: bool) -> None:
    """The body of a spawned rank: guard, run ``target``, report the outcome."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    if hasattr(signal, "SIGUSR1"):  # the parent asks a stuck rank where it is (--debug)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if debug:
        faulthandler.enable()  # a crash in native code prints the Python stack
    channel = _Channel(conn)
    channel.send("started")
    try:
        result = target(rank, *args, progress=channel.progress)
    except BaseException as exc:  # reported to the parent, which decides what it means
        channel.send("error", describe_exception(exc))
    else:
        channel.send("ok", result)
    conn.close()


# ---- the parent ---------------------------------------------------------------------------


@contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Start children with SIGINT ignored (inherited across exec), so a Ctrl-C to the process
    group reaches the parent only. SIGINT is blocked meanwhile, so one arriving now is held and
    delivered to the parent afterwards, not lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    masked = hasattr(signal, "pthread_sigmask")
    if masked:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`JobInterrupted` in the main thread while the job runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise JobInterrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT and the stop signals while ranks are being stopped: a second Ctrl-C must
    not leave ranks behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, *_STOP_SIGNALS)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in held}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class _Job:
    def __init__(self, target: Callable[..., Any], world_size: int, args: Tuple[Any, ...],
                 stall_timeout_s: float, startup_timeout_s: float, debug: bool) -> None:
        self.target, self.world_size, self.args = target, world_size, args
        self.stall_timeout_s, self.startup_timeout_s = stall_timeout_s, startup_timeout_s
        self.debug = debug
        self.procs: List[Any] = []
        self.conns: List[Any] = []
        self.open: Dict[int, Any] = {}
        self.results: Dict[int, Any] = {}
        self.errors: Dict[int, Dict[str, Any]] = {}     # rank -> describe_exception()
        self.deaths: Dict[int, RankFailure] = {}
        self.progress: Dict[int, str] = {}
        self.heard: Dict[int, float] = {}
        self.last_event = time.monotonic()

    # -- start / stop ---------------------------------------------------------------------

    def start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with _children_ignore_sigint():
            for rank in range(self.world_size):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_rank_main, name=f"moe-a2a rank {rank}",
                                   args=(rank, os.getpid(), writer, self.target, self.args,
                                         self.debug))
                proc.start()
                writer.close()  # the rank holds the only writer: EOF means it is gone
                self.procs.append(proc)
                self.conns.append(reader)
                self.open[rank] = reader
                self.heard[rank] = time.monotonic()
        self.last_event = time.monotonic()

    def stop(self, exit_grace_s: float = 0.0, dump_stacks: Sequence[int] = ()) -> None:
        """Every rank gone: wait ``exit_grace_s`` for them to exit, then SIGTERM, then SIGKILL."""
        with _signals_held():
            if dump_stacks and hasattr(signal, "SIGUSR1"):
                for rank in dump_stacks:
                    self._signal(rank, signal.SIGUSR1)
                time.sleep(0.5)  # faulthandler writes the stacks to the rank's stderr
            self._join(exit_grace_s)
            for rank, proc in enumerate(self.procs):
                if proc.is_alive():
                    self._signal(rank, signal.SIGTERM)
            self._join(TERMINATE_GRACE_S)
            for proc in self.procs:
                if proc.is_alive():
                    proc.kill()
            for proc in self.procs:
                proc.join()
            for conn in self.conns:
                conn.close()

    def _signal(self, rank: int, signum: int) -> None:
        pid = self.procs[rank].pid
        if pid is not None and self.procs[rank].is_alive():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _join(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))

    # -- watching -------------------------------------------------------------------------

    def _drain(self, rank: int) -> None:
        conn = self.open.get(rank)
        if conn is None:
            return
        try:
            while conn.poll():
                kind, value = conn.recv()
                now = time.monotonic()
                self.heard[rank] = self.last_event = now
                if kind == "progress":
                    self.progress[rank] = value
                elif kind == "ok":
                    self.results[rank] = value
                elif kind == "error":
                    self.errors[rank] = value
        except (EOFError, OSError):
            del self.open[rank]

    def _check_exits(self) -> None:
        for rank, proc in enumerate(self.procs):
            if rank in self.deaths or proc.is_alive():
                continue
            self._drain(rank)  # what it sent before exiting
            if rank in self.results or rank in self.errors:
                continue
            code = proc.exitcode
            if code is not None and code < 0:
                self.deaths[rank] = RankFailure(rank=rank, cause=KILLED, detail=_signal_name(-code),
                                                last_progress=self.progress.get(rank, ""))
            else:
                self.deaths[rank] = RankFailure(
                    rank=rank, cause=EXITED, detail=f"with status {code} and no result",
                    last_progress=self.progress.get(rank, ""))

    def _failures(self) -> List[RankFailure]:
        out = list(self.deaths.values())
        for rank, info in self.errors.items():
            if not info["user_error"]:
                out.append(failure_from_exception(rank, info, self.progress.get(rank, "")))
        return out

    def _silent_ranks(self, now: float) -> List[RankFailure]:
        """Ranks alive with no outcome: stuck (a hang in a kernel, a deadlock, an endless loop)."""
        out = []
        for rank, proc in enumerate(self.procs):
            if rank in self.results or rank in self.errors or rank in self.deaths:
                continue
            out.append(RankFailure(rank=rank, cause=STUCK,
                                   detail=f"no progress for {now - self.heard[rank]:.0f} s",
                                   last_progress=self.progress.get(rank, "")))
        return out

    def watch(self) -> List[Any]:
        """Wait for every rank's result; raise as soon as the job cannot finish."""
        from multiprocessing.connection import wait

        first_failure: Optional[float] = None
        while len(self.results) < self.world_size:
            now = time.monotonic()
            failures = self._failures()
            user_errors = {r: e for r, e in self.errors.items() if e["user_error"]}
            if user_errors and not any(f.primary for f in failures):
                self._raise_user_error(user_errors)
            if failures:
                first_failure = first_failure or now
                accounted = len(self.results) + len(self.errors) + len(self.deaths)
                if (any(f.primary for f in failures) or accounted == self.world_size
                        or now - first_failure > FAILURE_GRACE_S):
                    if not any(f.primary for f in failures):
                        failures += self._silent_ranks(now)
                    self._fail(failures)
            starting = any(r not in self.progress for r in range(self.world_size)
                           if r not in self.results)
            limit = self.startup_timeout_s if starting else self.stall_timeout_s
            if now - self.last_event > limit:
                self._fail(self._silent_ranks(now),
                           note=f"no rank reported progress for {limit:.0f} s"
                                + (" after starting" if starting else " (--collective-timeout)"))
            # a finished rank's sentinel stays ready: waiting on it would spin
            waitables = list(self.open.values()) + [
                p.sentinel for r, p in enumerate(self.procs)
                if r not in self.deaths and r not in self.results and r not in self.errors]
            ready = wait(waitables, timeout=0.25)
            for rank, conn in list(self.open.items()):
                if conn in ready:
                    self._drain(rank)
            self._check_exits()
        return [self.results[r] for r in range(self.world_size)]

    def _fail(self, failures: List[RankFailure], note: str = "") -> None:
        stuck = [f.rank for f in failures if f.cause == STUCK]
        self.stop(dump_stacks=stuck if self.debug else ())
        raise RankError(failures, note=note)

    def _raise_user_error(self, user_errors: Dict[int, Dict[str, Any]]) -> None:
        from moe_a2a.errors import MoeA2AError

        self.stop()
        messages = {e["message"] for e in user_errors.values()}
        rank, info = min(user_errors.items())
        raise MoeA2AError(info["message"] if len(messages) == 1 else f"rank {rank}: {info['message']}")


def launch(target: Callable[..., Any], world_size: int, args: Tuple[Any, ...] = (), *,
           stall_timeout_s: float, startup_timeout_s: Optional[float] = None,
           debug: bool = False) -> List[Any]:
    """Run ``target(rank, *args, progress=report)`` in ``world_size`` spawned processes.

    ``target`` must be importable by name; ``report(text)`` tells the parent how far the rank
    got (it also resets the stall deadline). Until every rank has reported progress once, the
    deadline is ``startup_timeout_s`` (default: ``stall_timeout_s`` + 300 s). Returns the
    ranks' results in rank order.

    Raises:
        RankError: a rank raised, was killed, exited without a result, or stopped responding
            (no rank reported progress for ``stall_timeout_s``); the message names it.
        MoeA2AError: a rank raised a user error (bad input found only on the ranks).
        JobInterrupted / KeyboardInterrupt: the parent got SIGTERM, SIGHUP or SIGINT.
    In every case every rank is stopped before this returns or raises.
    """
    if startup_timeout_s is None:
        startup_timeout_s = stall_timeout_s + STARTUP_ALLOWANCE_S
    job = _Job(target, world_size, tuple(args), stall_timeout_s, startup_timeout_s, debug)
    finished = False
    with _stop_signals_raise():
        try:
            job.start()
            results = job.watch()
            finished = True
            return results
        finally:
            job.stop(exit_grace_s=EXIT_GRACE_S if finished else 0.0)


def run_in_process(target: Callable[..., Any], rank: int, args: Tuple[Any, ...] = (), *,
                   rendezvous: str = "") -> Any:
    """Run one rank in this process (a torchrun worker): the same failure reports as
    :func:`launch` (a RankError naming this rank; user errors pass through). A rank that
    fails to meet its peers before its first progress report (a peer that never started) is
    reported as such, with ``rendezvous`` (the address) in the message."""
    from moe_a2a.errors import user_error_types

    last: List[str] = []
    try:
        return target(rank, *args, progress=last.append)
    except (KeyboardInterrupt, *user_error_types()):
        raise
    except Exception as exc:
        info = describe_exception(exc)
        failure = failure_from_exception(rank, info, last[-1] if last else "")
        if not last and failure.cause == PEER_LOST:
            where = f" at {rendezvous}" if rendezvous else ""
            failure = RankFailure(rank=rank, cause=UNREACHABLE,
                                  detail=f"{where} within the collective timeout: {failure.detail}",
                                  traceback=failure.traceback)
        raise RankError([failure]) from None


__all__ = ["JobInterrupted", "RankError", "RankFailure", "die_with_parent", "is_peer_loss",
           "launch", "run_in_process"]
