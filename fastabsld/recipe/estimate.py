"""How long adversarial training will take, measured before it starts.

A PGD-trained model costs per batch about ``steps + 1`` forward and backward passes (the attack's
steps, then the training step). Timing one such pass on a small batch of the real images and model,
and scaling it by the batch size, the batches per epoch and the epochs, gives the order of magnitude
a user needs before committing hours of CPU time; evaluation is not counted.
"""

import math
import time

import torch

from fastabsld.recipe.data import first_images, split_size
from fastabsld.recipe.models import build_model

PROBE_BATCH = 4
PROBE_REPEATS = 2
# Training longer than this on the CPU is announced as a warning (shorter ones as a plain line).
LONG_TRAINING_S = 600.0


def seconds_per_pass(model, images):
    """Seconds of one forward and backward pass of ``model`` on ``images`` (the fastest of a few).

    Args:
        model: an ``nn.Module`` in training mode.
        images: a (B, C, H, W) batch.

    Returns:
        float: seconds.
    """
    images = images.detach().clone().requires_grad_(True)
    best = math.inf
    for _ in range(PROBE_REPEATS + 1):  # the first pass warms the allocator and the kernels' plans
        start = time.perf_counter()
        model(images).float().sum().backward()
        best = min(best, time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return best


def training_seconds(cfg, data):
    """Estimated seconds to train ``cfg.model`` on ``data`` with ``cfg``'s attack, batch size and epochs.

    Args:
        cfg: TrainConfig of the run to estimate (model, batch_size, steps, epochs, device).
        data: the run's Splits.

    Returns:
        float: seconds of training (evaluation excluded).
    """
    torch_state = torch.random.get_rng_state()
    try:
        model = build_model(cfg.model, data.num_classes, data.in_channels).train()
        probe = first_images(data.val)[:1].repeat(PROBE_BATCH, 1, 1, 1)
        per_pass = seconds_per_pass(model, probe) * cfg.batch_size / PROBE_BATCH
    finally:
        torch.random.set_rng_state(torch_state)  # the probe must not move the run's random stream
    batches = math.ceil(split_size(data.train) / cfg.batch_size)
    return per_pass * (cfg.steps + 1) * batches * cfg.epochs


def describe_seconds(seconds):
    """A duration as people say it: ``"40 s"``, ``"12 min"``, ``"3.5 h"``.

    Args:
        seconds: the duration.

    Returns:
        str: the rounded duration with its unit.
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def announce_cpu_training(cfg, data, what, log):
    """Logs how long training ``what`` on the CPU will take; a warning naming faster choices when it is long.

    Nothing is logged when the run trains on a GPU.

    Args:
        cfg: TrainConfig of the training (its device, model, batch size, steps, epochs).
        data: the run's Splits.
        what: what is trained, for the message (``"the robust teacher"``).
        log: function printing one-line messages.

    Returns:
        float or None: the estimate in seconds (None on a GPU).
    """
    from fastabsld.recipe.runtime import resolve_device

    if resolve_device(cfg.device).type != "cpu":
        return None
    seconds = training_seconds(cfg, data)
    line = (f"training {what} ({cfg.model}, {cfg.epochs} epochs, {cfg.steps} PGD steps per batch) on the CPU: "
            f"about {describe_seconds(seconds)} (estimated from a timed pass, evaluation excluded)")
    if seconds > LONG_TRAINING_S:
        log(f"warning: {line}; a GPU (--device cuda) or a smaller model (cnn-l) trains it far faster")
    else:
        log(line)
    return seconds
