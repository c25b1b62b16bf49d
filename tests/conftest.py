import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moe_a2a.testing import RankPool

pytest_plugins = ["moe_a2a.testing.pytest_plugin"]  # the emulated_kernels fixture

THIRDPARTY_GOOD = Path(__file__).resolve().parent / "fixtures" / "thirdparty_backend" / "good"


def pytest_addoption(parser):
    parser.addoption(
        "--thirdparty-backend", action="store_true",
        help="run with the fixture distribution moe-a2a-fake-backend installed (a copy on "
             "sys.path and PYTHONPATH), as for a user with a third-party backend: the suite "
             "must pass either way")


def pytest_configure(config):
    if config.getoption("--thirdparty-backend"):
        site = Path(tempfile.mkdtemp(prefix="moe_a2a_site_")) / "good"
        shutil.copytree(THIRDPARTY_GOOD, site)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def pool2():
    with RankPool(2) as pool:
        yield pool


@pytest.fixture(scope="session")
def pool4():
    with RankPool(4) as pool:
        yield pool


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
