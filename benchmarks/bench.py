"""``moe-a2a bench`` from a checkout (the timing code is ``moe_a2a.bench``).

    python benchmarks/bench.py --tp-size 4 --backends none,alltoall --num-tokens 1024,4096 \\
        --hidden-size 1024 --json --plot out.png

Every flag of ``moe-a2a bench`` works here; see ``moe-a2a bench --help``.
"""

import sys

from moe_a2a.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
