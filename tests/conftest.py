import os

import pytest
import torch

# Two cores in CI: keep intra-op threads low so parallel helpers and subprocess tests do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
