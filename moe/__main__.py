from moe.cli import entry

entry()
