"""docs/backends.md stays generated from the registry; docs/custom-backend.md runs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from doc_blocks import block_file, blocks, python_blocks
from moe_a2a import backends
from moe_a2a.backends import ENTRY_POINT_GROUP, registry_snapshot
from moe_a2a.backends import matrix

ROOT = Path(__file__).resolve().parents[1]
BACKENDS_MD = ROOT / "docs" / "backends.md"
CUSTOM_MD = ROOT / "docs" / "custom-backend.md"
EXAMPLE = ROOT / "examples" / "custom_backend"


@pytest.fixture(autouse=True)
def clean_registry():
    with registry_snapshot():
        yield


def test_backends_md_matrix_is_fresh():
    text = BACKENDS_MD.read_text(encoding="utf-8")
    assert matrix.update_text(text) == text, (
        f"docs/backends.md is stale: regenerate it with `{matrix.REGENERATE}`")


def test_matrix_has_one_row_per_builtin_with_capabilities():
    table = matrix.render_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(backends.BUILTIN_NAMES)
    deepep = rows[2]
    for text in ("scattered", "tp", "`normal`, `low_latency`, `auto`", "`low_latency`", "cuda",
                 "`deep_ep`", "9.0 (SM90)"):
        assert text in deepep
    assert "| yes |" in rows[3]  # megamoe: fused experts


def test_matrix_ignores_third_party_backends():
    backends.register_backend("third", "p.m:C", token_layout="scattered", ep_policy="tp")
    assert "`third`" not in matrix.render_markdown()
    assert "`third`" in matrix.render_markdown(backends.list_backends())


def test_update_text_needs_markers():
    with pytest.raises(ValueError, match="markers are missing"):
        matrix.update_text("no markers here")


def test_matrix_cli_check_and_write(tmp_path):
    stale = tmp_path / "backends.md"
    stale.write_text(f"intro\n{matrix.BEGIN}\nold table\n{matrix.END}\noutro\n", encoding="utf-8")
    run = lambda *a: subprocess.run([sys.executable, "-m", "moe_a2a.backends.matrix", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, timeout=60)
    out = run("--check", str(stale))
    assert out.returncode == 1 and matrix.REGENERATE in out.stderr
    assert run("--write", str(stale)).returncode == 0
    text = stale.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert run("--check", str(stale)).returncode == 0
    assert run("--check", str(tmp_path / "missing.md")).returncode == 2
    printed = run()
    assert printed.returncode == 0 and printed.stdout == matrix.render_markdown()


def test_custom_backend_md_examples_run():
    code_blocks = python_blocks(CUSTOM_MD)
    assert len(code_blocks) >= 5
    namespace = {"__name__": "custom_backend_doc"}
    for block in code_blocks:
        exec(compile(block.text, f"{block.where} (python block)", "exec"), namespace)
    assert backends.get_backend("local_only").dispatcher_path == "custom_backend_doc:LocalOnlyDispatcher"
    assert backends.get_backend("my_fast_a2a").requires[0].min_version == "0.3"


def test_custom_backend_md_entry_point_snippet():
    (toml_block,) = [b.text for b in blocks(CUSTOM_MD) if b.lang == "toml"]
    data = tomllib.loads(toml_block)
    eps = data["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert set(eps) == {"local_only", "local_only_lazy"}
    for value in eps.values():
        assert re.fullmatch(r"[\w.]+:\w+", value)


def test_example_package_is_the_documented_backend():
    """examples/custom_backend ships section 1's code unchanged, under section 4's entry point."""
    module = (EXAMPLE / "moe_a2a_local_only" / "dispatch.py").read_text(encoding="utf-8")
    first = python_blocks(CUSTOM_MD)[0]
    code = first.text.split("\n", 1)[1] if block_file(first) else first.text  # minus `# file:`
    assert code.strip() in module
    eps = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["entry-points"][ENTRY_POINT_GROUP]
    assert eps == {"local_only": "moe_a2a_local_only.dispatch:LocalOnlyDispatcher"}
