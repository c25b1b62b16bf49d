"""The installed package type-checks clean under mypy (settings: pyproject's ``[tool.mypy]``)."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import mypy  # noqa: F401 - the test extra installs it; a missing mypy fails here, not skips

ROOT = Path(__file__).resolve().parents[1]


def _install_layout(dest: Path) -> None:
    """Copy each listed package's modules where setuptools installs them (``package-dir``)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = conf["package-dir"]
    for package in conf["packages"]:
        # setuptools: the longest mapped prefix names the folder, the rest are subfolders
        prefix = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        source = ROOT / mapping[prefix] / Path(*package[len(prefix):].split(".")[1:])
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for module in [*source.glob("*.py"), *source.glob("*.pyi"), *source.glob("py.typed")]:
            shutil.copy2(module, target / module.name)


def test_mypy_passes_on_the_installed_layout(tmp_path):
    site = tmp_path / "site"
    _install_layout(site)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "-p", "moe_a2a", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy_cache")],
        cwd=site, env={**os.environ, "MYPYPATH": str(site)}, capture_output=True, text=True)
    assert out.returncode == 0, f"mypy failed:\n{out.stdout}{out.stderr}"
