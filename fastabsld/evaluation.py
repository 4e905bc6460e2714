"""Robustness and fairness evaluation: accuracy, worst-class accuracy and NSD under attacks.

Attack names carry their step counts: ``"clean"``, ``"fgsm"``, ``"pgd<N>"`` (PGD with the
cross-entropy loss, N steps), ``"cw<N>"`` (CW-inf: the same PGD on the CW margin loss) and
``"autoattack"``. A bare ``"pgd"`` or ``"cw"`` takes its steps from the ``steps`` argument (20 when
unset) and is reported under the full name (``"pgd20"``), so a figure's label always says what ran.

Each attack draws its random starts from its own generator, seeded from ``(seed, attack name)``:
an attack's figure depends on the model, the data, the seed and its own settings only, never on
which other attacks ran beside it or in which order.

Besides the figures, an evaluation keeps each example's predicted class under each attack
(:class:`Evaluation`), so that paired statistics and the sanity checks of
:mod:`fastabsld.sanity` can be computed without attacking again; a row of logits that is not
finite predicts no class (-1) and counts as wrong, and each attack reports how many there were.
"""

import hashlib
import re

import numpy as np
import torch

from fastabsld import attack as attacks_module
from fastabsld.metrics import NO_CLASS, ClassAccuracy, predicted_classes
from fastabsld.ops.checks import check_choice, check_int, check_real

# The standard evaluation of the ABSLD/RSLAD papers (bare "pgd"/"cw" and other step counts are accepted too).
ATTACKS = ("clean", "fgsm", "pgd20", "cw20", "autoattack")
ATTACK_KINDS = ("clean", "fgsm", "pgd", "cw", "autoattack")
DEFAULT_STEPS = 20
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
# "auto": the official autoattack package when it is installed, else torchattacks' port.
AUTOATTACK_BACKENDS = ("auto", "autoattack", "torchattacks")
_NAME = re.compile(r"^(clean|fgsm|autoattack|pgd|cw)(\d*)$")


def parse_attack(name, steps=None):
    """The canonical name, kind and step count of one attack name.

    Args:
        name: ``"clean"``, ``"fgsm"``, ``"pgd"``, ``"pgd<N>"``, ``"cw"``, ``"cw<N>"`` or ``"autoattack"``.
        steps: the step count of a bare ``"pgd"`` / ``"cw"`` (``None``: 20). A name that carries its
            own count must agree with it when given.

    Returns:
        tuple: (canonical name such as ``"pgd20"``, kind from ``ATTACK_KINDS``, steps or None).

    Raises:
        ValueError: an unknown name, a count of 0, or a count that contradicts ``steps``.
    """
    match = _NAME.match(name) if isinstance(name, str) else None
    if match is None or (match.group(2) and match.group(1) not in ("pgd", "cw")):
        raise ValueError(f"attacks: unknown attack {name!r}; the names are clean, fgsm, pgd<N>, cw<N> (N steps; bare "
                         f"pgd / cw take the steps setting, default {DEFAULT_STEPS}) and autoattack")
    kind, digits = match.groups()
    if kind not in ("pgd", "cw"):
        return kind, kind, None
    if steps is not None:
        steps = check_int(steps, "steps", minimum=1)
    if digits:
        count = int(digits)
        if count < 1:
            raise ValueError(f"attack {name!r} must run at least 1 step")
        if steps is not None and steps != count:
            raise ValueError(f"attack {name!r} runs {count} steps, but steps={steps}: name it '{kind}{steps}' or "
                             f"'{kind}', or leave steps unset")
    else:
        count = DEFAULT_STEPS if steps is None else steps
    return f"{kind}{count}", kind, count


def attack_names(attacks, steps=None):
    """The canonical names of a selection of attacks, checked (non-empty, no attack twice).

    Args:
        attacks: iterable of attack names (see :func:`parse_attack`).
        steps: step count of bare ``"pgd"`` / ``"cw"`` names.

    Returns:
        tuple of str: the canonical names, in the given order.

    Raises:
        ValueError: an empty selection, an unknown name, or the same attack twice (``"pgd"`` and ``"pgd20"``
            are the same attack).
    """
    if isinstance(attacks, str):
        attacks = (attacks,)
    names = tuple(parse_attack(name, steps)[0] for name in attacks)
    if not names:
        raise ValueError(f"attacks must be a non-empty selection such as {ATTACKS}, got ()")
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must not repeat an attack, got {tuple(attacks)!r} (as run: {names})")
    return names


def attack_seed(seed, name):
    """The seed of one attack's generator: a stable 63-bit hash of ``(seed, canonical name)``.

    Args:
        seed: the evaluation's seed.
        name: the attack's canonical name.

    Returns:
        int: a seed for ``torch.Generator.manual_seed``.
    """
    digest = hashlib.sha256(f"fastabsld-eval/{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class Evaluation(dict):
    """What :func:`evaluate` returns: ``{attack: figures}`` (a dict, JSON-ready) plus the per-example results.

    Attributes:
        labels: (N,) int64 numpy array: the examples' labels, in the order the loader yielded them.
        predictions: ``{attack: (N,) int32 numpy array}``: each example's predicted class under that
            attack, ``NO_CLASS`` (-1) where the model's logits were not finite.
    """

    def __init__(self, figures, labels, predictions):
        super().__init__(figures)
        self.labels = labels
        self.predictions = predictions

    def correct(self, attack):
        """Whether each example was classified correctly under ``attack``.

        Args:
            attack: a canonical attack name of this evaluation.

        Returns:
            numpy.ndarray: (N,) bool.
        """
        return self.predictions[attack] == self.labels


def find_autoattack_backend(backend="auto"):
    """The AutoAttack implementation :func:`evaluate` uses: the official ``autoattack`` package or torchattacks.

    Args:
        backend: ``"auto"`` (the official package when installed, else torchattacks), ``"autoattack"`` or
            ``"torchattacks"``.

    Returns:
        tuple: (backend name, its module).

    Raises:
        ImportError: the backend is not installed, saying how to get it.
    """
    check_choice(backend, "autoattack_backend", AUTOATTACK_BACKENDS)
    if backend in ("auto", "autoattack"):
        try:
            import autoattack
        except ImportError as error:
            if backend == "autoattack":
                raise ImportError("autoattack_backend='autoattack' needs the official package: `pip install "
                                  "git+https://github.com/fra31/auto-attack`") from error
        else:
            return "autoattack", autoattack
    try:
        import torchattacks
    except ImportError as error:
        raise ImportError("the 'autoattack' evaluation needs the official autoattack package (`pip install "
                          "git+https://github.com/fra31/auto-attack`) or torchattacks (`pip install torchattacks`), "
                          "or leave 'autoattack' out of attacks=...") from error
    return "torchattacks", torchattacks


def _model_device(model):
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _make_autoattack(backend, module, model, *, eps, version, num_classes, seed, device):
    """``auto(x, y) -> x_adv`` through the chosen backend (same threat model either way)."""
    if backend == "torchattacks":
        return module.AutoAttack(model, norm="Linf", eps=eps, version=version, n_classes=num_classes, seed=seed)
    adversary = module.AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, verbose=False,
                                  device=str(device))
    # The targeted attacks aim at the 9 most likely other classes by default; fewer exist below 10 classes.
    for part in ("apgd_targeted", "fab"):
        if hasattr(adversary, part) and hasattr(getattr(adversary, part), "n_target_classes"):
            getattr(adversary, part).n_target_classes = min(9, num_classes - 1)
    return lambda x, y: adversary.run_standard_evaluation(x, y, bs=len(x))


def _attacked_inputs(kind, model, x, y, *, eps, alpha, steps, cw_confidence, clamp, generator, auto):
    """The inputs to classify under one attack (the model is in eval mode already)."""
    if kind == "clean":
        return x
    if kind == "fgsm":
        return attacks_module.fgsm(model, x, attacks_module.ce_loss(y), eps=eps, clamp=clamp, eval_mode=False)
    if kind == "autoattack":
        return auto(x, y)
    loss_fn = attacks_module.ce_loss(y) if kind == "pgd" else attacks_module.cw_loss(y, confidence=cw_confidence)
    return attacks_module.pgd(model, x, loss_fn, eps=eps, alpha=alpha, steps=steps, random_start="uniform",
                              clamp=clamp, generator=generator, eval_mode=False)


def evaluate(model, loader, attacks=ATTACKS, *, eps=8 / 255, alpha=2 / 255, num_classes=None, device=None,
             progress=True, steps=None, cw_confidence=50.0, autoattack_version="standard", autoattack_backend="auto",
             seed=0, clamp=(0.0, 1.0), batch_size=256):
    """Accuracy, worst-class accuracy and NSD of ``model`` on ``loader``, clean and under attacks.

    The attacks (L-inf, radius ``eps``; see the module docstring for the names): ``"clean"``;
    ``"fgsm"``; ``"pgd<N>"`` (cross-entropy, uniform random start, N steps of size ``alpha``);
    ``"cw<N>"`` (the same PGD on the CW margin loss with confidence ``cw_confidence``);
    ``"autoattack"`` (``autoattack_version`` through the official ``autoattack`` package when it is
    installed, else torchattacks' port; ``autoattack_backend`` chooses). Each attack's random starts
    come from its own generator seeded from ``(seed, name)`` (:func:`attack_seed`), so its figure is
    the same whatever other attacks run. The model runs in eval mode and every module is left in the
    mode it was in; its parameters receive no gradients.

    Args:
        model: nn.Module mapping inputs in ``clamp`` (B, ...) to logits (B, C).
        loader: iterable of (inputs, labels, ...) batches (e.g. a DataLoader), or a
            ``torch.utils.data.Dataset`` of (image, label) pairs, batched here by ``batch_size``.
            Images in ``clamp`` (no normalisation: put it inside the model), integer labels in [0, C).
        attacks: names of the attacks to run (default ``ATTACKS``).
        eps: attack radius (a non-negative number).
        alpha: PGD / CW step size (a non-negative number).
        num_classes: C (default: the width of the model's logits).
        device: device the batches are moved to (default: the model's; the model must be there).
        progress: show a tqdm progress bar.
        steps: the step count of bare ``"pgd"`` / ``"cw"`` names (``None``: 20); a name such as
            ``"pgd50"`` carries its own.
        cw_confidence: margin of the CW loss.
        autoattack_version: ``"standard"``, ``"plus"`` or ``"rand"``.
        autoattack_backend: ``"auto"``, ``"autoattack"`` (the official package) or ``"torchattacks"``.
        seed: seed from which every attack's generator is derived.
        clamp: (min, max) valid input range.
        batch_size: batch size when ``loader`` is a Dataset.

    Returns:
        Evaluation: a dict with, for each canonical attack name, ``{"average": accuracy over all samples,
        "worst": worst-class accuracy, "nsd": std/mean of the class accuracies, "per_class": list of C
        accuracies, "count": number of samples, "nonfinite": number of samples whose logits held NaN or
        an infinity (counted as wrong)}`` (the AutoAttack entry also names its ``"backend"`` and
        ``"version"``), as plain Python floats and lists (``json.dumps`` writes them; undefined
        figures, such as a class without samples, are NaN); its ``labels`` and ``predictions``
        attributes hold the per-example results as numpy arrays.

    Raises:
        ValueError: a bad attack name, eps, alpha, steps, seed or option, before any batch is read.
        ImportError: ``"autoattack"`` without an installed backend.
    """
    names = attack_names(attacks, steps)
    specs = {name: parse_attack(name) for name in names}
    eps = check_real(eps, "eps", minimum=0.0)
    alpha = check_real(alpha, "alpha", minimum=0.0)
    seed = check_int(seed, "seed", minimum=0)
    check_real(cw_confidence, "cw_confidence", minimum=0.0)
    check_choice(autoattack_version, "autoattack_version", AUTOATTACK_VERSIONS)
    if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2):
        raise ValueError(f"clamp must be a (min, max) pair, got {clamp!r}")
    backend = autoattack_backend_module = None
    if "autoattack" in names:
        backend, autoattack_backend_module = find_autoattack_backend(autoattack_backend)
    if isinstance(loader, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(loader, batch_size=check_int(batch_size, "batch_size", minimum=1))
    device = torch.device(device) if device is not None else _model_device(model)
    generators = {name: torch.Generator(device=device).manual_seed(attack_seed(seed, name)) for name in names}
    auto_seed = attack_seed(seed, "autoattack") % (2 ** 31)

    def make_autoattack(classes):
        return _make_autoattack(backend, autoattack_backend_module, model, eps=eps, version=autoattack_version,
                                num_classes=classes, seed=auto_seed, device=device)

    options = dict(eps=eps, alpha=alpha, cw_confidence=cw_confidence, clamp=tuple(clamp))
    with attacks_module.model_mode(model):
        results = _run(model, loader, specs, device, num_classes, progress, generators, options, make_autoattack)
    if "autoattack" in results:
        results["autoattack"].update(backend=backend, version=autoattack_version)
    return results


def _run(model, loader, specs, device, num_classes, progress, generators, options, make_autoattack):
    """The batch loop of ``evaluate`` (model already in eval mode)."""
    from tqdm.auto import tqdm

    meters = auto = None
    predicted, labels = {name: [] for name in specs}, []
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if meters is None:
            if num_classes is None:
                with torch.no_grad():
                    num_classes = model(x[:1]).shape[1]
            meters = {name: ClassAccuracy(num_classes, device=device) for name in specs}
            auto = make_autoattack(num_classes) if "autoattack" in specs else None
        for name, (_, kind, steps) in specs.items():
            inputs = _attacked_inputs(kind, model, x, y, steps=steps, generator=generators[name], auto=auto,
                                      **options)
            with torch.no_grad():
                classes = predicted_classes(model(inputs))
            meters[name].update(classes, y)
            predicted[name].append(classes)
        labels.append(y)
    if meters is None:
        raise ValueError("loader yielded no batches")
    predictions = {name: torch.cat(predicted[name]).to(torch.int32).cpu().numpy() for name in specs}
    figures = {name: {**meters[name].summary(), "nonfinite": int(np.count_nonzero(predictions[name] == NO_CLASS))}
               for name in specs}
    return Evaluation(figures, torch.cat(labels).to(torch.int64).cpu().numpy(), predictions)
