"""Shared fixtures of the training, checkpoint and command-line tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs a test module on one torch thread: fastest for the tiny digits models on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
