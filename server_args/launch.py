"""The launch variables torchrun sets (RANK, WORLD_SIZE, ...), read in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from moe_a2a.server_args.errors import ConfigError
from moe_a2a.server_args.sources import check_env


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a torchrun-style launch.

    ``master_addr``/``master_port`` are required when ``world_size > 1`` (the rendezvous
    point); ``local_rank`` defaults to ``rank`` when LOCAL_RANK is unset (one node).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def init_method(self) -> str:
        """The ``torch.distributed`` init method: ``tcp://addr:port`` when the rendezvous point
        is known (always, for more than one rank), else ``env://``."""
        if self.master_addr and self.master_port:
            return f"tcp://{self.master_addr}:{self.master_port}"
        return "env://"

    def check_world(self, tp_size: int) -> None:
        """One process per rank: WORLD_SIZE must equal tp_size (ConfigError naming the fix)."""
        if self.world_size != tp_size:
            raise ConfigError(
                f"WORLD_SIZE={self.world_size} but --tp-size {tp_size}: moe-a2a runs one process "
                f"per rank; fix: launch with torchrun --nproc-per-node {tp_size} (times nodes) or "
                f"pass --tp-size {self.world_size}"
            )


def _int(env: Mapping[str, str], var: str, low: int = 0) -> int:
    raw = env[var]
    try:
        value = int(str(raw).strip(), 10)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not an integer; fix: launch with torchrun, which "
                          f"sets it, or export {var} as a whole number") from None
    if value < low:
        raise ConfigError(f"{var}={value} must be >= {low}; fix: check the launcher")
    return value


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> Optional[LaunchEnv]:
    """The launch variables, or None when RANK is unset (not launched by torchrun).

    Raises:
        ConfigError: a variable is not a number, out of range, or missing (WORLD_SIZE with
            RANK; MASTER_ADDR and MASTER_PORT with more than one rank).
    """
    env = os.environ if env is None else check_env(env)
    if not str(env.get("RANK", "")).strip():
        return None
    if not str(env.get("WORLD_SIZE", "")).strip():
        raise ConfigError(f"RANK={env['RANK']} is set but WORLD_SIZE is not; fix: launch with "
                          f"torchrun, or export WORLD_SIZE as well")
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE", low=1)
    if rank >= world_size:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world_size}; fix: check the "
                          f"launcher (ranks are 0..WORLD_SIZE-1)")
    local_rank = _int(env, "LOCAL_RANK") if str(env.get("LOCAL_RANK", "")).strip() else rank
    addr = str(env.get("MASTER_ADDR", "")).strip() or None
    port = None
    if str(env.get("MASTER_PORT", "")).strip():
        port = _int(env, "MASTER_PORT", low=1)
        if port > 65535:
            raise ConfigError(f"MASTER_PORT={port} is not a TCP port (1..65535); fix: pick a free "
                              f"port, e.g. 29500")
    if world_size > 1 and (addr is None or port is None):
        missing = " and ".join(v for v, x in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if x is None)
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world_size} are set but {missing} "
                          f"{'is' if ' and ' not in missing else 'are'} not: the ranks cannot "
                          f"meet; fix: launch with torchrun (it sets them), or export "
                          f"MASTER_ADDR and MASTER_PORT of rank 0")
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                     master_addr=addr, master_port=port)
