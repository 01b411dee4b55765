import os

# Offline before anything imports huggingface_hub: some tokenizer loaders otherwise retry for
# minutes and return a degenerate vocabulary instead of failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test networks are tiny: one intra-op thread is faster than two (and than two contended
# ones, where OpenMP barriers make small kernels several times slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
