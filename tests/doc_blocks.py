"""The fenced blocks of the Markdown docs, and the commands in their shell blocks.

Shared by tests/test_doc_commands.py (runs every documented command), tests/test_doc_python.py
and tests/test_backends_docs.py (run the Python blocks).

Conventions a doc follows (docs/README.md states them for writers):

* Commands to run live in fenced ``bash`` blocks, one per line (``\\`` continues a line).
* A trailing comment marks what the test needs to know about one command:
  ``# exit 2`` (the expected exit status; 0 otherwise) and ``# needs: 8 GPUs`` (skipped, with
  that reason, unless the machine has it). Requirements, comma-separated: ``N GPUs`` (or
  ``a GPU``), ``N nodes`` (never started), ``N ranks`` (Python blocks for several processes),
  ``minutes`` (a measurement: never run), or a Python module (``matplotlib``, ``deep_ep``).
  Other comment text is for readers.
* A block whose first line is ``# needs: ...`` is skipped as a whole when that is unmet; in a
  ``python`` block the same first-line comment skips that block. A block whose first line is
  ``# file: NAME`` is saved as NAME in the working directory of the doc's commands.
* ``pip install`` lines set up an environment and are not run, except ``pip install
  ./examples/<dir>``, which the test installs into a private directory (never into the
  environment running the tests) for the doc's later commands.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

#: Every Markdown file whose commands and code are tested.
def doc_files() -> List[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "examples").glob("**/README.md"))]


SHELL_LANGS = ("bash", "sh", "shell", "console")

#: First words of the commands the tests run.
RUN_PREFIXES = ("moe-a2a", "python -m moe_a2a", "torchrun", "python benchmarks/",
                "python examples/", "benchmarks/")

#: Set-up commands: they change an environment, so the tests never run them (CI runs the
#: README's, see test_setup_commands_match_ci).
SETUP_PREFIXES = ("pip install", "python -m pip install", "python -m pytest", "git clone",
                  "cd ", "export ", "python setup.py")

#: ``pip install`` of one of the repository's examples: installed privately by the tests.
LOCAL_INSTALL = re.compile(r"^(?:python -m )?pip install (?:-e )?(?P<path>\.?/?examples/[\w./-]+)$")


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Block:
    """One fenced block: ``lang`` is the first word of its info string."""

    path: Path
    line: int          # 1-based line of the block's first content line
    lang: str
    info: str
    text: str          # content, dedented by the fence's indentation

    @property
    def where(self) -> str:
        return f"{shown(self.path)}:{self.line}"

    def first_comment(self) -> str:
        first = next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")
        return first[1:].strip() if first.startswith("#") else ""


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def blocks(path: Path) -> List[Block]:
    """Every fenced block of ``path``, in order."""
    out: List[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or "`" in m.group("info"):
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").strip()
        body: List[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        else:
            raise ValueError(f"{shown(path)}:{i + 1}: fence {fence} is never closed")
        lang = info.split()[0] if info else ""
        out.append(Block(path=path, line=i + 2, lang=lang, info=info,
                         text="\n".join(body) + ("\n" if body else "")))
        i = j + 1
    return out


def python_blocks(path: Path) -> List[Block]:
    return [b for b in blocks(path) if b.lang == "python"]


def block_needs(block: Block) -> Optional["Needs"]:
    """The ``# needs: ...`` of a block's first line, or None."""
    first = block.first_comment()
    return _markers(first)[1] if first.startswith("needs:") else None


def block_file(block: Block) -> Optional[str]:
    """The ``# file: NAME`` of a block's first line (the doc asks readers to save the block as
    NAME; the command tests write it into the doc's working directory), or None."""
    first = block.first_comment()
    if not first.startswith("file:"):
        return None
    name = first[len("file:"):].strip()
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"{block.where}: `# file: {name}` must name a plain file")
    return name


# ---- commands ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Needs:
    """A ``needs:`` marker: what a command or block needs, and whether this machine has it."""

    text: str

    def missing(self) -> Optional[str]:
        """None when every requirement is met, else the skip reason."""
        for item in (part.strip() for part in self.text.split(",")):
            reason = _missing(item)
            if reason:
                return f"needs {self.text} ({reason})"
        return None


def _missing(item: str) -> Optional[str]:
    low = item.lower()
    nodes = re.fullmatch(r"(\d+) nodes", low)
    if nodes:
        return f"a job across {nodes.group(1)} machines is never started by the tests"
    if re.fullmatch(r"(?:about )?(?:\d+ )?minutes", low):
        return "a measurement: longer than these tests may take; the docs run a small form"
    ranks = re.fullmatch(r"(\d+) ranks", low)
    if ranks:
        return (f"code for {ranks.group(1)} torch.distributed ranks; the docs test runs one "
                f"process (examples/ run such code under torchrun)")
    gpus = re.fullmatch(r"(?:(\d+) |an? )?(?:(?:cuda|nvidia|sm\d+|h\d+) )*gpus?|cuda", low)
    if gpus:
        wanted = int(gpus.group(1) or 1)
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return None if have >= wanted else f"{have} CUDA GPU(s) here"
    module = re.fullmatch(r"[a-z_][a-z0-9_.]*", low)
    if module:
        return None if importlib.util.find_spec(low) is not None else f"{low} is not installed"
    raise ValueError(f"unknown requirement {item!r} in a `needs:` marker: write `N GPUs`, "
                     f"`N nodes`, `N ranks`, `minutes` or a module name")


@dataclass(frozen=True)
class Command:
    """One command line of a shell block."""

    block: Block
    line: int                      # 1-based line in the doc
    text: str                      # as written, continuation lines joined, comment removed
    kind: str                      # "run", "install" (a local example), "setup"
    argv: Tuple[str, ...] = ()     # for "run": the words after the environment assignments
    env: Tuple[Tuple[str, str], ...] = ()
    expect_exit: int = 0
    needs: Optional[Needs] = None
    install_path: Optional[str] = None

    @property
    def where(self) -> str:
        return f"{shown(self.block.path)}:{self.line}"


def _split_comment(line: str) -> Tuple[str, str]:
    """``(code, comment)``: the comment starts at the first ``#`` outside quotes that follows
    whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _markers(comment: str) -> Tuple[int, Optional[Needs]]:
    exit_m = re.search(r"\bexit (\d+)\b", comment)
    needs_m = re.search(r"\bneeds: ([^;()]+)", comment)
    return (int(exit_m.group(1)) if exit_m else 0,
            Needs(needs_m.group(1).strip()) if needs_m else None)


def _logical_lines(block: Block) -> List[Tuple[int, str]]:
    out: List[Tuple[int, str]] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        if not pending:
            start = block.line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((start, pending + raw))
        pending = ""
    if pending:
        raise ValueError(f"{block.where}: the last line ends with a continuation backslash")
    return out


def shell_lines(block: Block) -> List[Tuple[int, str, str]]:
    """``(line, code, comment)`` of each logical line of a shell block (continuations joined)."""
    out = []
    for line, raw in _logical_lines(block):
        code, comment = _split_comment(raw.strip())
        if code:
            out.append((line, " ".join(code.split()), comment))
    return out


def commands(block: Block) -> List[Command]:
    """The commands of one shell block; raises ValueError for a line it does not know."""
    out: List[Command] = []
    whole = block_needs(block)
    for line, code, comment in shell_lines(block):
        expect, needs = _markers(comment)
        needs = needs or whole
        for part in (p.strip() for p in code.split("&&")):
            words = shlex.split(part)
            env = []
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env.append((name, value))
            rest = " ".join(words)
            local = LOCAL_INSTALL.match(rest)
            if local:
                out.append(Command(block=block, line=line, text=part, kind="install",
                                   install_path=local.group("path").removeprefix("./"),
                                   needs=needs))
            elif rest.startswith(RUN_PREFIXES):
                out.append(Command(block=block, line=line, text=part, kind="run",
                                   argv=tuple(words), env=tuple(env), expect_exit=expect,
                                   needs=needs))
            elif rest.startswith(SETUP_PREFIXES) or whole is not None:
                out.append(Command(block=block, line=line, text=part, kind="setup", needs=needs))
            else:
                raise ValueError(
                    f"{shown(block.path)}:{line}: `{part}` is neither a command the tests run "
                    f"(starting with {', '.join(RUN_PREFIXES)}) nor a set-up command; fix: "
                    f"mark the block with a first line `# needs: ...`, or extend "
                    f"tests/doc_blocks.py")
    return out


def all_commands(paths: Optional[Sequence[Path]] = None) -> List[Command]:
    out: List[Command] = []
    for path in paths or doc_files():
        for block in blocks(path):
            if block.lang in SHELL_LANGS:
                out.extend(commands(block))
    return out


def dedupe(cmds: Sequence[Command]) -> Dict[str, List[Command]]:
    """Commands to run, keyed by their text and the local installs before them in their doc
    (identical commands of several docs run once)."""
    runs: Dict[str, List[Command]] = {}
    installed: Dict[Path, List[str]] = {}
    for cmd in cmds:
        if cmd.kind == "install":
            installed.setdefault(cmd.block.path, []).append(cmd.install_path or "")
        if cmd.kind not in ("run", "install"):
            continue
        key = " ".join(cmd.text.split())
        prior = installed.get(cmd.block.path, [])
        if cmd.kind == "run" and prior:
            key += "  [after installing " + ", ".join(prior) + "]"
        runs.setdefault(key, []).append(cmd)
    return runs
