"""Shared pieces of the method tests: dtype-derived tolerances, random batches, a small differentiable model."""

import socket

import torch
import torch.multiprocessing as mp


def tolerance(dtype, factor=256):
    """``assert_close`` tolerances of ``factor`` machine epsilons of the dtype the library computes in.

    fp16/bf16 inputs are computed in fp32, so their results are held to fp32's epsilon.

    Args:
        dtype: the inputs' dtype.
        factor: how many epsilons (accumulation over rows and classes, transcendental functions).

    Returns:
        dict: ``rtol`` and ``atol`` for ``torch.testing.assert_close``.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.finfo(compute).eps * factor
    return {"rtol": eps, "atol": eps}


def stored_tolerance(dtype, factor=256):
    """Tolerances of a result computed in fp32/fp64 and stored in ``dtype`` (the gradients of the logits).

    Rounding to ``dtype`` moves a value by up to half an ulp; two results rounded separately (the library's
    and an autograd reference's, both stored in ``dtype``) can land one ulp apart: up to 2 epsilons of
    ``dtype`` relative to the smaller.

    Args:
        dtype: the dtype the result is stored in.
        factor: epsilons of the compute dtype, as in :func:`tolerance`.

    Returns:
        dict: ``rtol`` and ``atol`` for ``torch.testing.assert_close``.
    """
    computed = tolerance(dtype, factor)
    return {"rtol": computed["rtol"] + 2 * torch.finfo(dtype).eps, "atol": computed["atol"]}


# The fused PGD step computes in fp32 whatever the inputs' dtype: attack trajectories agree to fp32 rounding.
STEP_ATOL = 16 * torch.finfo(torch.float32).eps


def logits_case(batch, classes, seed=0, dtype=torch.float64, count=3, scale=4.0):
    """``count`` random (B, C) logits and (B,) labels covering every class when B >= C."""
    gen = torch.Generator().manual_seed(seed)
    logits = [scale * torch.randn(batch, classes, generator=gen, dtype=torch.float64).to(dtype) for _ in range(count)]
    labels = torch.randint(0, classes, (batch,), generator=gen)
    if batch >= classes:
        labels[:classes] = torch.arange(classes)
    return logits, labels


def leaves(*tensors):
    """Fresh leaf copies that require grad."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def small_model(in_features, classes, seed=0, dtype=torch.float64, hidden=16):
    """A smooth MLP (tanh, no ReLU: input gradients are never exactly zero, so PGD signs are stable)."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 1.5)
    return model.to(dtype)


def images(batch, shape=(2, 3, 3), seed=0, dtype=torch.float64):
    """Inputs in [0, 1], away from the box edges."""
    gen = torch.Generator().manual_seed(seed)
    return (0.1 + 0.8 * torch.rand((batch,) + shape, generator=gen, dtype=torch.float64)).to(dtype)


def free_port():
    """A TCP port free on the loopback interface now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(worker, world, out_dir, timeout=120):
    """Runs ``worker(rank, port, out_dir)`` in ``world`` spawned processes and waits for them.

    Args:
        worker: a module-level function (spawned processes import it).
        world: number of processes.
        out_dir: a folder the workers write their results into.
        timeout: seconds to wait for each process before it is killed.

    Returns:
        list: the exit codes (a killed process's is negative).
    """
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, port, out_dir)) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]
