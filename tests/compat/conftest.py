import pytest

from tests.compat.common import build_all


@pytest.fixture
def all_callbacks():
    """A factory: ``all_callbacks(monitor={...}, clip={...}, guard={...})`` -> [monitor, clipper, guard]."""
    return build_all
