import pytest

from tests.compat.common import build_all


@pytest.fixture
def all_callbacks():
    """A factory: ``all_callbacks(monitor={...}, clip={...}, guard={...})`` -> [monitor, clipper, guard].

    While GradientNormMonitor is a placeholder the list holds the other two (see ``common.monitor_or_none``).
    """
    return build_all
