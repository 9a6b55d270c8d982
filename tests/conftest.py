import os
import sys
from pathlib import Path

# Tests compare runs bit for bit (straight vs resumed, two ranks): one fixed attention kernel, not a
# per-process timing choice. Kernel selection has its own tests (test_attention_kernels.py).
os.environ.setdefault("PALE_ATTN_KERNEL", "flash")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py and helpers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of many small models: on 2 shared cores, OpenMP threads that wait
    for each other make small ops far slower than one thread alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
