"""Fault-injecting backends for the reliability tests, loaded as a plugin:
``moe-a2a run --plugin faulty_backends --moe-a2a-backend faulty_raise ...`` (tests/ on the path).

Each is the torch-native all-to-all with one fault on rank ``FAULTY_RANK`` of the job at its
first dispatch (or, for ``faulty_nan``, a NaN combine on every rank). When ``FAULTY_MARKER_DIR``
is set, the faulty rank writes ``<dir>/fault`` (the time of the fault) just before it acts, so a
test can time the reaction or wait for the fault before signalling the parent.
"""

import os
import signal
import time
from pathlib import Path

from moe_a2a.backends import register_backend
from moe_a2a.dispatchers.alltoall import AllToAllDispatcher

FAULTY_RANK = 1


class _Faulty(AllToAllDispatcher):
    def _fault_here(self) -> bool:
        if self.setup.groups.rank != FAULTY_RANK:
            return False
        marker = os.environ.get("FAULTY_MARKER_DIR")
        if marker:
            Path(marker, "fault").write_text(f"{time.time()}\n")
        return True


def _register(name, what):
    return register_backend(name, token_layout="scattered", ep_policy="tp", devices=("cpu",),
                            description=f"test backend: {what}")


@_register("faulty_raise", "rank 1 raises in dispatch")
class RaiseInDispatch(_Faulty):
    def dispatch(self, hidden_states, topk, *, batch):
        if self._fault_here():
            raise RuntimeError("injected fault: dispatch failed on purpose")
        return super().dispatch(hidden_states, topk, batch=batch)


@_register("faulty_hang", "rank 1 hangs in dispatch")
class HangInDispatch(_Faulty):
    def dispatch(self, hidden_states, topk, *, batch):
        if self._fault_here():
            time.sleep(3600)
        return super().dispatch(hidden_states, topk, batch=batch)


@_register("faulty_kill", "rank 1 is killed by SIGKILL in dispatch")
class KilledInDispatch(_Faulty):
    def dispatch(self, hidden_states, topk, *, batch):
        if self._fault_here():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().dispatch(hidden_states, topk, batch=batch)


@_register("faulty_nan", "combine returns NaN on every rank")
class NaNCombine(AllToAllDispatcher):
    def combine(self, combine_input, *, batch):
        out = super().combine(combine_input, batch=batch)
        return out * float("nan")
