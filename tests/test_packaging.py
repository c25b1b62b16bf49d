"""The distribution installs one import namespace, ``moe_a2a``, and nothing generic."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_one_namespace_and_no_generic_top_level_packages(tmp_path):
    code = ("import importlib.util, moe_a2a, moe_a2a.backends, moe_a2a.server_args, "
            "moe_a2a.dispatchers; "
            "print([n for n in ('moe', 'backends', 'dispatchers', 'server_args') "
            "if importlib.util.find_spec(n) is not None]); print(moe_a2a.__version__)")
    out = _run(code, tmp_path)  # not the repository root: only what is installed is visible
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "[]"
    assert lines[1].count(".") >= 1


def test_importing_backends_and_server_args_is_light(tmp_path):
    code = ("import sys, moe_a2a, moe_a2a.backends, moe_a2a.server_args; "
            "print(sorted(m for m in ('torch', 'deep_ep', 'deep_gemm', 'moe_a2a.layer') "
            "if m in sys.modules))")
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_source_package_is_listed_in_pyproject():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    mapping = conf["package-dir"]
    found = set()
    for prefix, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([prefix, *rel.parts]))
    # a subfolder of moe/ that is itself a mapped package root is listed under its own name
    found = {name for name in found
             if not any(name.startswith(f"moe_a2a.{root}") for root in ("backends.", "dispatchers."))}
    assert found <= listed | {f"moe_a2a.{f}" for f in ("backends", "dispatchers", "server_args")}
    assert listed <= found | set(mapping)


def test_public_api_is_lazy_and_complete():
    import moe_a2a

    for name in moe_a2a.__all__:
        assert getattr(moe_a2a, name) is not None, name


def test_version_flag_and_attribute():
    import moe_a2a

    for cmd in ([sys.executable, "-m", "moe_a2a", "--version"],):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == f"moe-a2a {moe_a2a.__version__}"
