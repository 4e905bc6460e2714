"""Test set-up: runs Triton kernels in the interpreter on machines without a GPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs, so this happens
before anything imports ``fastabsld``.
"""

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a GPU exists and are skipped, with the reason shown, elsewhere."""
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `make gpu-check` on a GPU machine)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every device: the CPU, and CUDA (skipped with its reason where no GPU exists)."""
    return torch.device(request.param)


def triton_device():
    """The device on which Triton kernels run here: CUDA, or the CPU under the interpreter."""
    return torch.device("cuda" if HAS_GPU else "cpu")
