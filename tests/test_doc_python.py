"""Every ``python`` block of README.md, docs/*.md and examples/*/README.md runs.

One fresh interpreter per page runs the page's blocks in order, in one namespace (a block may
use what an earlier one defined), in a scratch directory, without ``MOE_A2A_*`` / ``SGLANG_*``
variables. A block whose first line is ``# needs: ...`` is skipped when that is unmet (see
tests/doc_blocks.py). docs/custom-backend.md is run by tests/test_backends_docs.py, which also
checks what its blocks registered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from doc_blocks import ROOT, doc_files, python_blocks

PAGES = [p for p in doc_files() if python_blocks(p) and p != ROOT / "docs" / "custom-backend.md"]

# Line numbers of a traceback are the page's: each block is compiled padded to its first line.
DRIVER = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from doc_blocks import ROOT, block_needs, python_blocks

page = Path(sys.argv[2])
namespace = {"__name__": "doc_" + page.stem.replace("-", "_")}
for block in python_blocks(page):
    needs = block_needs(block)
    reason = needs.missing() if needs is not None else None
    if reason:
        print(f"skipped {block.where}: {reason}")
        continue
    code = "\n" * (block.line - 1) + block.text
    exec(compile(code, str(page.relative_to(ROOT)), "exec"), namespace)
    print(f"ran {block.where}")
"""


def test_some_pages_have_python():
    names = {p.name for p in PAGES}
    assert {"README.md", "transformers.md", "routed-experts.md", "configuration.md",
            "eplb.md", "deepep.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_doc_python_blocks_run(page, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_A2A_", "SGLANG_", "SGL_"))}
    out = subprocess.run([sys.executable, "-c", DRIVER, str(Path(__file__).parent), str(page)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (f"a python block of {page.relative_to(ROOT)} failed:\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-6000:]}")
    if not any(line.startswith("ran ") for line in out.stdout.splitlines()):
        pytest.skip(f"no block of {page.relative_to(ROOT)} can run here:\n{out.stdout}")
