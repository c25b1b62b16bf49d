"""``moe-a2a run`` (placeholder until the run job lands)."""


def add_parser(subparsers):
    p = subparsers.add_parser("run", help="run the EP MoE job on local ranks and check it")
    p.set_defaults(handler=main)
    return p


def main(args) -> int:
    raise NotImplementedError("moe-a2a run is being built")
