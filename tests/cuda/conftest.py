"""The CUDA-only tests (marked ``cuda``): run on a machine with a GPU by ``make gpu-check``, skipped elsewhere."""

import pytest
import torch


@pytest.fixture(autouse=True)
def deterministic_cudnn():
    """cuDNN in its deterministic mode: a captured graph and an eager run then pick the same algorithms."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
