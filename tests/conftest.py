"""Test configuration: Triton kernels run in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported anywhere, hence at the top of conftest.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (compiled Triton kernels)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (compiled Triton kernels)"))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
