"""pytest fixture for the kernel emulations: ``pytest_plugins = ["moe_a2a.testing.pytest_plugin"]``.

::

    def test_my_integration(emulated_kernels):
        import deep_ep                    # moe-a2a's emulation of DeepEP v1.2.1
        ...

``emulated_kernels`` yields the ``EmulationInfo`` list of ``moe_a2a.testing.emulate_kernels()``
(both packages, SM100 off-GPU); parametrize indirectly with ``{"compute_capability": (9, 0)}``
or ``{"packages": ["deep_ep"]}`` to change that.
"""

from __future__ import annotations

import pytest

from moe_a2a.testing.kernel_emulation import emulate_kernels


@pytest.fixture
def emulated_kernels(request):
    options = dict(getattr(request, "param", None) or {})
    with emulate_kernels(**options) as infos:
        yield infos
