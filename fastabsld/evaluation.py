"""Robustness and fairness evaluation: accuracy, worst-class accuracy and NSD under attacks."""

import torch

from fastabsld import attack as attacks_module
from fastabsld.metrics import ClassAccuracy

ATTACKS = ("clean", "fgsm", "pgd20", "cw", "autoattack")


def _torchattacks():
    """The torchattacks module, or an ImportError saying how to get it."""
    try:
        import torchattacks
    except ImportError as error:
        raise ImportError("the 'autoattack' evaluation needs torchattacks: `pip install torchattacks`, or leave "
                          "'autoattack' out of attacks=...") from error
    return torchattacks


def _model_device(model):
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _attacked_inputs(name, model, x, y, *, eps, alpha, steps, cw_confidence, clamp, generator, auto):
    """The inputs to classify under attack ``name``."""
    if name == "clean":
        return x
    if name == "fgsm":
        return attacks_module.fgsm(model, x, attacks_module.ce_loss(y), eps=eps, clamp=clamp)
    if name == "autoattack":
        return auto(x, y)
    loss_fn = attacks_module.ce_loss(y) if name == "pgd20" else attacks_module.cw_loss(y, confidence=cw_confidence)
    return attacks_module.pgd(model, x, loss_fn, eps=eps, alpha=alpha, steps=steps, random_start="uniform",
                              clamp=clamp, generator=generator)


def evaluate(model, loader, attacks=ATTACKS, *, eps=8 / 255, alpha=2 / 255, num_classes=None, device=None,
             progress=True, steps=20, cw_confidence=50.0, autoattack_version="standard", seed=0,
             clamp=(0.0, 1.0)):
    """Accuracy, worst-class accuracy and NSD of ``model`` on ``loader``, clean and under attacks.

    The attacks (L-inf, radius ``eps``): ``"clean"``; ``"fgsm"``; ``"pgd20"`` (PGD with the
    cross-entropy loss, uniform random start, ``steps`` steps of size ``alpha``); ``"cw"`` (CW-inf:
    the same PGD on the CW margin loss with confidence ``cw_confidence``); ``"autoattack"``
    (torchattacks' AutoAttack, ``autoattack_version``). The model runs in eval mode and every
    module is left in the mode it was in; its parameters receive no gradients.

    Args:
        model: nn.Module mapping inputs in ``clamp`` (B, ...) to logits (B, C).
        loader: iterable of (inputs, labels, ...) batches.
        attacks: names of the attacks to run, from ``ATTACKS``.
        eps: attack radius.
        alpha: PGD / CW step size.
        num_classes: C (default: the width of the model's logits).
        device: device the batches are moved to (default: the model's; the model must be there).
        progress: show a tqdm progress bar.
        steps: PGD / CW steps (20 in the standard evaluation; fewer for quick checks).
        cw_confidence: margin of the CW loss.
        autoattack_version: "standard", "plus" or "rand".
        seed: seed of the random starts (PGD, CW and AutoAttack).
        clamp: (min, max) valid input range.

    Returns:
        dict: for each attack name, ``{"average": accuracy over all samples, "worst": worst-class
        accuracy, "nsd": std/mean of the class accuracies, "per_class": list of C accuracies,
        "count": number of samples}``, as plain Python floats and lists (``json.dumps`` writes them;
        undefined figures, such as a class without samples, are NaN).
    """
    attacks = tuple(attacks)
    unknown = [name for name in attacks if name not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks must be a non-empty selection of {ATTACKS}, got {attacks!r}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attacks must not repeat a name, got {attacks!r}")
    torchattacks = _torchattacks() if "autoattack" in attacks else None
    device = torch.device(device) if device is not None else _model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        return _run(model, loader, attacks, device, num_classes, progress, generator,
                    dict(eps=eps, alpha=alpha, steps=steps, cw_confidence=cw_confidence, clamp=clamp),
                    lambda classes: torchattacks.AutoAttack(model, norm="Linf", eps=eps, version=autoattack_version,
                                                            n_classes=classes, seed=seed))
    finally:
        for module, training in modes:
            module.training = training


def _run(model, loader, attacks, device, num_classes, progress, generator, options, make_autoattack):
    """The batch loop of ``evaluate`` (model already in eval mode)."""
    from tqdm.auto import tqdm

    meters = auto = None
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if meters is None:
            if num_classes is None:
                with torch.no_grad():
                    num_classes = model(x[:1]).shape[1]
            meters = {name: ClassAccuracy(num_classes, device=device) for name in attacks}
            auto = make_autoattack(num_classes) if "autoattack" in attacks else None
        for name in attacks:
            inputs = _attacked_inputs(name, model, x, y, generator=generator, auto=auto, **options)
            with torch.no_grad():
                meters[name].update(model(inputs), y)
    if meters is None:
        raise ValueError("loader yielded no batches")
    return {name: meters[name].summary() for name in attacks}
