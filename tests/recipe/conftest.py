"""Fixtures of the recipe's tests: one torch thread per module, the digits data set loaded once, image folders."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastabsld.recipe.data import load_digits
from fastabsld.recipe.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs a test module on one torch thread: fastest for the tiny digits models on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """The digits splits (seed 0)."""
    return load_digits(0)


def digits_models(dtype, seed=3, num_classes=10):
    """A digits student (cnn-s, train mode) and teacher (cnn-l, frozen), with non-trivial BatchNorm statistics.

    Args:
        dtype: parameter dtype.
        seed: torch seed of the initialisation.
        num_classes: outputs.

    Returns:
        tuple: (student, teacher).
    """
    torch.manual_seed(seed)
    teacher = build_model("cnn-l", num_classes, 1).to(dtype)
    teacher.train()
    teacher(torch.rand(64, 1, 8, 8, dtype=dtype))
    student = build_model("cnn-s", num_classes, 1).to(dtype)
    student.train()
    with torch.no_grad():
        student(torch.rand(64, 1, 8, 8, dtype=dtype))
    return student, teacher.eval().requires_grad_(False)


CLASSES = ("cat", "dog", "eel")


def png_folder(root, classes=CLASSES, per_class=10, size=(6, 6), odd=None):
    """Class folders of small RGB PNGs whose first pixel encodes the class's index in CLASSES (labels checkable).

    Args:
        root: the folder to fill (pathlib.Path).
        classes: class folder names, from CLASSES.
        per_class: images per class.
        size: (H, W) of the images.
        odd: (H, W) of one image of a different size, or None.
    """
    rng = np.random.default_rng(0)
    for name in classes:
        k = CLASSES.index(name)
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 50, (*size, 3), dtype=np.uint8)
            pixels[0, 0, 0] = 100 * k  # the class, readable back as x[0, 0, 0] * 255 / 100
            shape = odd if (odd and i == 0 and k == 0) else None
            image = Image.fromarray(pixels if shape is None else rng.integers(0, 50, (*shape, 3), dtype=np.uint8))
            image.save(root / name / f"{i}.png")
@pytest.fixture(scope="session")
def saved_digits(tmp_path_factory):
    """The digits splits (seed 0) saved to a file, for worker processes that must not import scikit-learn."""
    path = tmp_path_factory.mktemp("digits") / "digits.pt"
    torch.save(load_digits(0), path)
    return str(path)


@pytest.fixture(scope="session")
def forkserver():
    """A multiprocessing context whose processes fork from a server that imported torch and the recipe once.

    Every process it starts is a process of its own (SIGKILL kills it alone) that starts in milliseconds.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.recipe.fault_worker"])
    return context


def run_process(context, target, *args, timeout=180):
    """Runs ``target(*args)`` in a process of ``context``; returns its exit code (-9 when it was SIGKILLed).

    Args:
        context: a multiprocessing context.
        target: an importable function.
        *args: its arguments (picklable).
        timeout: seconds before the process is killed and the test fails.

    Returns:
        int: the exit code.
    """
    process = context.Process(target=target, args=args)
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"{target.__name__} did not finish within {timeout} s")
    return process.exitcode


def full_disk(monkeypatch, name, nth):
    """From the ``nth`` run file called ``name`` on, every file the checkpoint writer creates sits on a full disk.

    The temporary file is created as usual, then its descriptor is pointed at ``/dev/full``, where every
    write fails with ENOSPC from the kernel, as on a file system without free blocks.

    Args:
        monkeypatch: pytest's monkeypatch.
        name: the base name that counts (``last.pt``).
        nth: the first such file that does not fit (1-based).

    Returns:
        dict: ``{"full": bool}``; set ``full`` to False to free the space again.
    """
    from fastabsld.recipe import checkpoint

    real, seen, disk = checkpoint._temporary, [], {"full": False}

    def temporary(path):
        fd, tmp = real(path)
        if os.path.basename(path) == name:
            seen.append(path)
            disk["full"] = disk["full"] or len(seen) == nth
        if disk["full"]:
            device = os.open("/dev/full", os.O_WRONLY)
            os.dup2(device, fd)
            os.close(device)
        return fd, tmp

    monkeypatch.setattr(checkpoint, "_temporary", temporary)
    return disk
