"""Every command shown in README.md, docs/*.md and examples/*/README.md runs as documented.

The commands are the lines of fenced ``bash`` blocks that start with ``moe-a2a``,
``python -m moe_a2a``, ``torchrun``, ``python benchmarks/`` or ``python examples/`` (see
tests/doc_blocks.py for the markers ``# exit N`` and ``# needs: ...``). Each runs once (identical
commands of several docs are run once) in a scratch directory per doc that holds copies of
docs/ and examples/ and links to moe/ and benchmarks/, so relative paths work as from a
checkout and nothing the commands write lands in the repository. ``moe-a2a`` is this
interpreter's console script, ``python`` this interpreter, ``torchrun`` ``python -m
torch.distributed.run``. Variables that would change a result (``MOE_A2A_*``, ``SGLANG_*``,
``SGL_*``) are removed from the environment first.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from doc_blocks import (ROOT, RUN_PREFIXES, SHELL_LANGS, Command, all_commands, block_file, blocks,
                        dedupe, doc_files, shell_lines)

try:
    COMMANDS = all_commands()
    PARSE_ERROR = None
except ValueError as exc:  # reported by test_doc_commands_parse, not as a collection error
    COMMANDS, PARSE_ERROR = [], exc
RUNS = dedupe(COMMANDS)

#: The README's two fresh-machine commands; .ci/run runs the second.
SETUP_RUN = "pip install torch==2.13.0 -e . && moe-a2a run"
SETUP_TEST = "pip install torch==2.13.0 -e '.[test]' && python -m pytest -q"

#: Commands that start ranks cost seconds each; the whole file must stay under 3 minutes on
#: a 2-core CI machine (no GPU). Add a command only where it shows something no other one does.
MAX_SPAWNING_COMMANDS = 16

SCRUBBED_ENV_PREFIXES = ("MOE_A2A_", "SGLANG_", "SGL_")


def test_doc_commands_parse():
    assert PARSE_ERROR is None, str(PARSE_ERROR)
    assert RUNS, "no documented command found"


def test_no_commands_outside_shell_blocks():
    """A command in an untagged block would never be run: tag the block ``bash``."""
    stray = []
    for path in doc_files():
        for block in blocks(path):
            if block.lang in SHELL_LANGS or block.lang in ("python", "toml", "json"):
                continue
            for offset, line in enumerate(block.text.splitlines()):
                if line.strip().startswith(RUN_PREFIXES):
                    stray.append(f"{block.where.rsplit(':', 1)[0]}:{block.line + offset}: {line.strip()}")
    assert not stray, "commands outside ```bash blocks (never run):\n" + "\n".join(stray)


def test_setup_commands_match_ci():
    pinned = [code for block in blocks(ROOT / "README.md") if block.lang in SHELL_LANGS
              for _, code, _ in shell_lines(block) if code.startswith("pip install torch==")]
    assert sorted(pinned) == sorted([SETUP_RUN, SETUP_TEST]), (
        f"README.md must show exactly the two fresh-machine commands {SETUP_RUN!r} and "
        f"{SETUP_TEST!r}; found {pinned}")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert SETUP_TEST in ci, f".ci/run must run the README's test command {SETUP_TEST!r}"


def test_needs_markers_are_known():
    for cmd in COMMANDS:
        if cmd.needs is not None:
            cmd.needs.missing()  # raises ValueError for a requirement it cannot check


def _spawns(argv: Tuple[str, ...]) -> bool:
    """Starts ranks or a benchmark: seconds, not a fraction of one."""
    if argv[0] == "python" and argv[1:3] == ("-m", "moe_a2a"):
        argv = ("moe-a2a", *argv[3:])
    return (argv[:2] in (("moe-a2a", "run"), ("moe-a2a", "bench")) or argv[0] == "torchrun"
            or argv[0].startswith("benchmarks/")
            or argv[0] == "python" and argv[1].startswith(("benchmarks/", "examples/")))


def test_spawning_commands_are_few():
    spawning = [key for key, cmds in RUNS.items() if cmds[0].kind == "run" and _spawns(cmds[0].argv)
                and (cmds[0].needs is None or cmds[0].needs.missing() is None)]
    assert len(spawning) <= MAX_SPAWNING_COMMANDS, (
        f"{len(spawning)} documented commands start ranks or benchmarks (at most "
        f"{MAX_SPAWNING_COMMANDS}, to keep this file under 3 minutes): reuse an existing "
        f"command or shrink one:\n" + "\n".join(spawning))


# ---- running them ------------------------------------------------------------------------

def _can_build_offline() -> bool:
    """setuptools can build a wheel here without pip's isolated build environment."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    # before 70.1 setuptools builds wheels through the separate `wheel` package
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


class Workspace:
    """A scratch checkout for one doc's commands, with the examples it installed."""

    def __init__(self, root: Path, doc: Path) -> None:
        self.root = root
        self.site = root / "_site"
        self.installed: Dict[str, Tuple[int, str]] = {}
        root.mkdir(parents=True)
        for name in ("docs", "examples"):
            shutil.copytree(ROOT / name, root / name,
                            ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        shutil.copy(ROOT / "README.md", root / "README.md")
        for name in ("moe", "benchmarks"):
            (root / name).symlink_to(ROOT / name, target_is_directory=True)
        for block in blocks(doc):  # files the doc asks readers to save
            name = block_file(block)
            if name:
                (root / name).write_text(block.text, encoding="utf-8")

    def env(self, extra: Tuple[Tuple[str, str], ...] = ()) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_ENV_PREFIXES)}
        path = [str(self.site)] if self.installed else []
        env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(extra)
        return env

    def install(self, rel: str) -> Tuple[int, str]:
        """``pip install <example>`` into this workspace's private site directory."""
        if rel not in self.installed:
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                   str(self.site), str(self.root / rel)]
            if _can_build_offline():
                cmd.insert(4, "--no-build-isolation")  # else pip fetches setuptools from its index
            out = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=300)
            self.installed[rel] = (out.returncode, out.stdout + out.stderr)
        return self.installed[rel]


@pytest.fixture(scope="session")
def workspaces(tmp_path_factory):
    made: Dict[Path, Workspace] = {}
    base = tmp_path_factory.mktemp("doc-commands")

    def get(doc: Path) -> Workspace:
        if doc not in made:
            made[doc] = Workspace(base / f"ws{len(made)}-{doc.parent.name}-{doc.stem}", doc)
        return made[doc]

    return get


def _argv(words: Tuple[str, ...]) -> List[str]:
    head, rest = words[0], list(words[1:])
    if head == "moe-a2a":
        script = Path(sys.executable).with_name("moe-a2a")
        return [str(script), *rest] if script.exists() else [sys.executable, "-m", "moe_a2a", *rest]
    if head == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *rest]
    if head == "python":
        return [sys.executable, *rest]
    if head.startswith("benchmarks/"):
        return [head, *rest]  # a script of the repository, run from the workspace
    raise AssertionError(f"no interpreter mapping for {head!r}")


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


@pytest.mark.parametrize("key", list(RUNS), ids=[f"{cmds[0].where} {key[:70]}" for key, cmds in RUNS.items()])
def test_doc_command(key, workspaces):
    cmds = RUNS[key]
    cmd: Command = cmds[0]
    shown = "; ".join(c.where for c in cmds)
    if cmd.needs is not None:
        reason = cmd.needs.missing()
        if reason:
            pytest.skip(f"{shown}: {reason}")
    ws = workspaces(cmd.block.path)
    # the examples this doc installed before this command
    for prior in COMMANDS:
        if prior is cmd:
            break
        if prior.kind == "install" and prior.block.path == cmd.block.path:
            ws.install(prior.install_path)
    if cmd.kind == "install":
        rc, output = ws.install(cmd.install_path)
        assert rc == 0, f"{shown}: `{cmd.text}` failed:\n{_tail(output)}"
        return
    out = subprocess.run(_argv(cmd.argv), cwd=ws.root, env=ws.env(cmd.env), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == cmd.expect_exit, (
        f"{shown}: `{cmd.text}` exited {out.returncode}, the doc says {cmd.expect_exit}\n"
        f"--- stdout\n{_tail(out.stdout)}\n--- stderr\n{_tail(out.stderr)}")
    if cmd.expect_exit == 2:  # bad input: one line, never a traceback
        assert "Traceback" not in out.stderr, f"{shown}: exit 2 with a traceback:\n{_tail(out.stderr)}"
