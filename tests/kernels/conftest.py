"""Fixtures of the kernel tests: tiny launch configurations, and the table of the worst errors of each module."""

import pytest

from ffsd_kernels import attention as attention_module
from ffsd_kernels import diversity as diversity_module
from tests.helpers import WORST


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny launch configurations, so that every loop of every kernel runs several times on small inputs."""
    monkeypatch.setattr(attention_module, "_map_config", lambda c, p, inner: (2, 4, 1))
    monkeypatch.setattr(
        attention_module, "_distance_config",
        lambda b, n: (8, 16, max(-(-n // 16), 1), 1),
    )  # fmt: skip
    monkeypatch.setattr(diversity_module, "_select_config", lambda n: (16, n <= 16, 1))


@pytest.fixture(scope="module", autouse=True)
def _report_worst_errors(request):
    """After each module, the worst relative error against float64 that ``tests.helpers.check`` saw there, per op,
    dtype and kind."""
    WORST.clear()
    yield
    if not WORST:
        return
    lines = ["", f"worst relative errors against float64 in {request.module.__name__} (op, dtype, kind):"]
    lines += [f"  {op:<22} {dtype:<9} {kind:<12} {err:.3e}" for (op, dtype, kind), err in sorted(WORST.items())]
    WORST.clear()
    # Written past output capture, so that the table shows on a passing run too.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:  # pragma: no cover - only without those plugins
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line)
