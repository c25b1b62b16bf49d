import pytest
import torch

from moe_a2a.testing import RankPool

pytest_plugins = ["moe_a2a.testing.pytest_plugin"]  # the emulated_kernels fixture


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
