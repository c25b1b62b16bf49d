"""The doc parser behind test_doc_commands.py / test_doc_python.py, on a synthetic page."""

from __future__ import annotations

import pytest

from doc_blocks import (Needs, block_file, block_needs, blocks, commands, dedupe, python_blocks,
                        shell_lines)

PAGE = '''# A page

```bash
moe-a2a config --tp-size 2          # a reader's note
moe-a2a run --tp-size 4 \\
    --steps 2   # exit 1
MOE_A2A_TP_SIZE=2 moe-a2a config --json
pip install torch==2.13.0 -e . && moe-a2a run
pip install ./examples/custom_backend
moe-a2a run --device cuda --tp-size 8   # needs: 8 GPUs
```

- a list item with an indented block:

  ```bash
  # needs: an SM90 GPU (never built here)
  git clone https://example.invalid/x && cd x
  NVSHMEM_DIR=$(python -c "print(1)") python setup.py install
  ```

```python
# file: my_backends.py
X = 1
```

```python
# needs: 2 ranks
Y = X
```

```
moe-a2a in an untagged block
```
'''


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "page.md"
    path.write_text(PAGE, encoding="utf-8")
    return path


def test_blocks_and_markers(page):
    found = blocks(page)
    assert [b.lang for b in found] == ["bash", "bash", "python", "python", ""]
    assert found[1].text.startswith("# needs:") and found[1].line == 16  # indent removed
    first, second = python_blocks(page)
    assert block_file(first) == "my_backends.py" and block_needs(first) is None
    assert block_needs(second).text == "2 ranks" and "torch.distributed" in block_needs(second).missing()


def test_commands(page):
    shell = blocks(page)[0]
    cmds = commands(shell)
    assert [c.kind for c in cmds] == ["run", "run", "run", "setup", "run", "install", "run"]
    assert cmds[1].argv == ("moe-a2a", "run", "--tp-size", "4", "--steps", "2")
    assert cmds[1].expect_exit == 1 and cmds[1].line == shell.line + 1
    assert cmds[2].env == (("MOE_A2A_TP_SIZE", "2"),) and cmds[2].argv[0] == "moe-a2a"
    assert cmds[5].install_path == "examples/custom_backend"
    assert cmds[6].needs.text == "8 GPUs"
    assert shell_lines(shell)[0][1:] == ("moe-a2a config --tp-size 2", "a reader's note")
    setup = commands(blocks(page)[1])  # a `# needs:` block: its other lines are set-up
    assert [c.kind for c in setup] == ["setup", "setup", "setup"]
    keys = list(dedupe(cmds))
    assert keys[-1].endswith("[after installing examples/custom_backend]")


def test_unknown_command_is_an_error(tmp_path):
    path = tmp_path / "bad.md"
    path.write_text("```bash\nrm -rf build\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="neither a command the tests run"):
        commands(blocks(path)[0])


@pytest.mark.parametrize("text, missing", [
    ("2 nodes", "never started"), ("minutes", "a measurement"), ("about 35 minutes", "a measurement"),
    ("8 GPUs", "CUDA GPU"), ("a GPU", "CUDA GPU"), ("no_such_module_here", "not installed"),
    ("json", None),
])
def test_needs(text, missing):
    import torch

    if "GPU" in text and torch.cuda.is_available():
        pytest.skip("checks the CPU-machine answer")
    reason = Needs(text).missing()
    assert (reason is None) if missing is None else (missing in reason)


def test_needs_rejects_what_it_cannot_check():
    with pytest.raises(ValueError, match="unknown requirement"):
        Needs("a fast network").missing()
