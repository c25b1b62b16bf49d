from moe_a2a.cli import entry

entry()
