"""A launcher that resolves the server arguments once and hands every worker the result.

    python examples/launcher.py                       # the flags below by default
    python examples/launcher.py --moe-a2a-backend deepep --tp-size 8 --deepep-mode low_latency

The launcher runs ``moe-a2a config FLAGS --json`` as a subprocess (what a launcher in any
language can do), prints the automatic decisions and warnings, and starts ``tp_size`` workers.
Here a worker is a process that only reports what it received; in an engine it would build its
rank's layers. Each worker rebuilds the resolved arguments with ``ServerArgs.from_json`` from
that same JSON: no flag parsing, no environment read, no auto-configuration. To show it, the
launcher starts the workers with ``MOE_A2A_TP_SIZE=3`` in their environment, which they ignore.
A bad command line stops the launcher with ``moe-a2a config``'s exit status (2) and its
one-line message. Exit status 0 when every worker saw the launcher's configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DEFAULT_FLAGS = ["--moe-a2a-backend", "alltoall", "--tp-size", "4", "--dp-size", "2",
                 "--enable-dp-attention", "--enable-return-routed-experts"]


def worker(rank: int) -> None:
    """One worker: the JSON arrives on stdin; report this rank's place in the job."""
    from moe_a2a.server_args import ServerArgs  # imports neither torch nor a kernel package

    args = ServerArgs.from_json(sys.stdin.read())
    print(json.dumps({
        "rank": rank, "backend": args.moe_a2a_backend, "tp_size": args.tp_size,
        "ep_size": args.ep_size, "attn_dp_rank": args.attn_dp_rank(rank),
        "attn_tp_rank": args.attn_tp_rank(rank), "moe_ep_rank": args.moe_ep_rank(rank),
        "routed_experts_gather": args.routed_experts_gather,
    }))


def main(flags: list) -> int:
    resolved = subprocess.run([sys.executable, "-m", "moe_a2a", "config", *flags, "--json"],
                              capture_output=True, text=True)
    if resolved.returncode != 0:  # bad input: moe-a2a's one line, its status
        sys.stderr.write(resolved.stderr)
        return resolved.returncode
    config = json.loads(resolved.stdout)
    args = config["args"]
    print(f"backend {args['moe_a2a_backend']}, tp {args['tp_size']}, dp {args['dp_size']}, "
          f"ep {args['ep_size']}; attention-TP {config['derived']['attn_tp_size']}")
    for d in config["decisions"]:
        print(f"  decision: {d['field']}: {d['from']} -> {d['to']} ({d['reason']})")
    for w in config["warnings"]:
        print(f"  warning: {w}")

    env = {**os.environ, "MOE_A2A_TP_SIZE": "3"}  # ignored: workers never read the environment
    workers = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for rank in range(args["tp_size"])]
    reports = [json.loads(p.communicate(resolved.stdout)[0]) for p in workers]
    ok = all(p.returncode == 0 for p in workers) and all(
        r["tp_size"] == args["tp_size"] and r["ep_size"] == args["ep_size"]
        and r["routed_experts_gather"] == args["routed_experts_gather"] for r in reports)
    for r in reports:
        print(f"  worker {r['rank']}: DP rank {r['attn_dp_rank']}, attention-TP rank "
              f"{r['attn_tp_rank']}, EP rank {r['moe_ep_rank']}, gather {r['routed_experts_gather']}")
    print("every worker has the launcher's configuration" if ok else "a worker disagrees")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]))
    else:
        sys.exit(main(sys.argv[1:] or DEFAULT_FLAGS))
