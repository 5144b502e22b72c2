import os

import pytest
import torch

# Two cores in CI: keep intra-op threads low so parallel helpers and subprocess tests do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


def pytest_addoption(parser):
    parser.addoption(
        "--demo-check",
        action="store_true",
        help="run the demo_check tests: the demo's verdicts in every mode on 3 seeds (minutes; make demo-check)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--demo-check"):
        return
    skip = pytest.mark.skip(reason="multi-seed demo verdicts: run with --demo-check (make demo-check)")
    for item in items:
        if "demo_check" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
