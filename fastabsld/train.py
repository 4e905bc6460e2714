"""The ABSLD training recipe (and the RSLAD and PGD-AT baselines) as a reusable, resumable loop.

Per batch of a distillation method (``absld`` or ``rslad``), as in the authors' released script:
the frozen teacher's logits on the clean batch are computed once; the student, in eval mode, is
attacked with 10 PGD steps from ``x + 0.001 * N(0, 1)`` maximising the summed KL to the tempered
teacher labels ``loss_fn.teacher_probs(z_t, y, "adv")``; then, in train mode,
``loss_fn(student(x_adv), student(x), z_t, y)`` is minimised with SGD. Temperatures are updated
once per epoch; ``beta`` is scaled by the LR factor at the LR milestones. ``rslad`` is the same
loop with the temperatures fixed at 1; ``pgd-at`` is PGD adversarial training with cross-entropy
(uniform random start), also used to train the robust teacher.

Unlike the released script, the checkpoint kept as "best" is chosen on a validation split, never
on the test split; the test split is evaluated once, at the end, with the selected weights.
"""

import copy
import dataclasses
import hashlib
import json
import math
import numbers
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fastabsld import checkpoint, distributed, fast_step, report
from fastabsld.data import TensorLoader, load_dataset
from fastabsld.models import build_model

from fastabsld.attack import ce_loss, kl_loss, pgd
from fastabsld.evaluation import ATTACKS, evaluate
from fastabsld.loss import ABSLDLoss

METHODS = ("absld", "rslad", "pgd-at")
# Released schedule: LR (and beta) times 0.1 at epochs 215, 260 and 285 of 300.
RELEASED_MILESTONES = (215 / 300, 260 / 300, 285 / 300)
# Threat model per data set: (eps, alpha). Digits pixels take 17 grey levels (steps of 1/16); eps = 0.1
# is 1.6 levels per pixel: the digit stays legible to a person, while an undefended cnn-s drops from
# 99.6% to 30% under PGD-20 (8/255 leaves it at 95%). CIFAR: the standard 8/255 and 2/255.
THREAT = {"digits": (0.1, 0.025), "cifar10": (8 / 255, 2 / 255), "cifar100": (8 / 255, 2 / 255)}
DEFAULT_MODELS = {"digits": ("cnn-s", "cnn-l"), "cifar10": ("resnet18", "wrn-34-10"),
                  "cifar100": ("resnet18", "wrn-34-10")}
CHECKPOINT_FORMAT = 1
SELECT_KEYS = ("average", "worst")
# TrainConfig fields that say where a run executes, not what it computes (free to change on resume).
RUNTIME_FIELDS = ("device", "data_dir", "cache_dir", "progress", "channels_last", "compile", "fold_bn")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in checkpoints and metrics.json).

    Attributes:
        method: ``"absld"``, ``"rslad"`` or ``"pgd-at"``.
        dataset: ``"digits"``, ``"cifar10"`` or ``"cifar100"``.
        model: student architecture (``None``: the data set's default, see ``DEFAULT_MODELS``).
        teacher_model: teacher architecture for distillation (``None``: the default).
        epochs: training epochs.
        batch_size: batch size; under torchrun the global batch, split evenly over the processes.
        lr, momentum, weight_decay: SGD settings.
        milestones: LR milestones as fractions of ``epochs`` (released: 215/260/285 of 300).
        lr_gamma: LR (and beta) factor at each milestone.
        eps, alpha, steps: L-inf threat model of the inner maximisation (``None``: data set default).
        beta, tau_min, tau_max, temperature_mode: ABSLD temperature settings (see ABSLDLoss).
        adv_weight, nat_weight: weights of the adversarial and natural distillation terms.
        eval_every: evaluate on the validation split every this many epochs (and after the last).
        val_attacks: attacks of the validation evaluation.
        select_metric: ``"<attack>.<average|worst>"`` on the validation split, choosing
            the kept weights.
        test_attacks: attacks of the final test evaluation.
        seed: seed of initialisation, data order and attack noise.
        split_seed: seed of the train/val/test split.
        train_subset: keep only the first N training images (tests, quick runs).
        teacher_epochs, teacher_seed: PGD-AT training of the teacher when it is not cached.
        teacher_path: a teacher checkpoint to use instead of training/caching one.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        data_dir: CIFAR folder.
        cache_dir: folder of cached teachers.
        progress: show progress bars.
        sync_bn: under torchrun, normalise BatchNorm with the global batch's statistics (SyncBatchNorm,
            CUDA only; see fastabsld.distributed).
        amp: bf16 autocast around the student's and the teacher's forwards (the losses stay fp32).
        channels_last: run the models and batches in the channels_last memory format.
        compile: ``torch.compile`` the student's training forward and the attack's forward.
        fold_bn: run the inner attack on an eval-mode view of the student with every Conv2d ->
            BatchNorm2d pair folded into one convolution (the teacher likewise, in channels_last on
            the CPU); same results up to float rounding, faster.
    """

    method: str = "absld"
    dataset: str = "digits"
    model: str = None
    teacher_model: str = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: tuple = RELEASED_MILESTONES
    lr_gamma: float = 0.1
    eps: float = None
    alpha: float = None
    steps: int = 10
    beta: float = 0.1
    tau_min: float = 0.5
    tau_max: float = 5.0
    temperature_mode: str = "paper"
    adv_weight: float = 5 / 6
    nat_weight: float = 1 / 6
    eval_every: int = 1
    val_attacks: tuple = ("clean", "pgd20")
    select_metric: str = "pgd20.average"
    test_attacks: tuple = ("clean", "fgsm", "pgd20", "cw")
    seed: int = 0
    split_seed: int = 0
    train_subset: int = None
    teacher_epochs: int = 40
    teacher_seed: int = 0
    teacher_path: str = None
    device: str = "cpu"
    data_dir: str = None
    cache_dir: str = field(default_factory=lambda: os.environ.get("FASTABSLD_CACHE", ".fastabsld_cache"))
    progress: bool = True
    sync_bn: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    fold_bn: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dataset not in THREAT:
            raise ValueError(f"dataset must be one of {tuple(THREAT)}, got {self.dataset!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.steps < 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and steps >= 0, got {self.epochs}, "
                             f"{self.batch_size}, {self.steps}")
        student, teacher = DEFAULT_MODELS[self.dataset]
        self.model = self.model or student
        self.teacher_model = self.teacher_model or teacher
        eps, alpha = THREAT[self.dataset]
        self.eps = eps if self.eps is None else float(self.eps)
        self.alpha = alpha if self.alpha is None else float(self.alpha)
        self.milestones = tuple(self.milestones)
        self.val_attacks = tuple(self.val_attacks)
        self.test_attacks = tuple(self.test_attacks)
        # Checked here, not at the first attack step or the final test: a bad value must not cost a run.
        for name in ("eps", "alpha", "lr", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        for name in ("val_attacks", "test_attacks"):
            attacks = getattr(self, name)
            if not attacks or not set(attacks) <= set(ATTACKS):
                raise ValueError(f"{name} must be a non-empty selection of {ATTACKS}, got {attacks!r}")
        attack, _, key = self.select_metric.partition(".")
        if attack not in self.val_attacks or key not in SELECT_KEYS:
            raise ValueError(f"select_metric must be '<one of val_attacks {self.val_attacks}>."
                             f"<{'|'.join(SELECT_KEYS)}>', "
                             f"got {self.select_metric!r}")

    def to_dict(self):
        """The config as a JSON-friendly dict."""
        return dataclasses.asdict(self)


def resolve_device(name):
    """``"auto"`` -> CUDA when available, else the CPU; other names pass through.

    Args:
        name: device name.

    Returns:
        torch.device: the device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


def seed_everything(seed):
    """Seeds python, numpy and torch (CPU and CUDA).

    Args:
        seed: the seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def milestone_epochs(cfg):
    """The LR milestones in epochs: ``int(fraction * epochs)``, at least 1, deduplicated.

    Args:
        cfg: TrainConfig.

    Returns:
        list of int: sorted milestone epochs.
    """
    return sorted({max(1, int(f * cfg.epochs)) for f in cfg.milestones})


def beta_at(cfg, epoch):
    """The ABSLD ``beta`` during 0-based ``epoch``: scaled by ``lr_gamma`` at every passed milestone.

    Args:
        cfg: TrainConfig.
        epoch: 0-based epoch.

    Returns:
        float: beta (0 for ``rslad`` and ``pgd-at``, whose temperatures stay at 1).
    """
    if cfg.method != "absld":
        return 0.0
    return cfg.beta * cfg.lr_gamma ** sum(m <= epoch for m in milestone_epochs(cfg))


def build_loss(cfg, num_classes):
    """The distillation loss module of a method (``None`` for ``pgd-at``).

    ``rslad`` is ABSLDLoss with beta = 0 (see :func:`beta_at`), so its temperatures stay at 1.

    Args:
        cfg: TrainConfig.
        num_classes: number of classes.

    Returns:
        ABSLDLoss or None.
    """
    if cfg.method == "pgd-at":
        return None
    return ABSLDLoss(num_classes, adv_weight=cfg.adv_weight, nat_weight=cfg.nat_weight, tau_init=1.0,
                     tau_min=cfg.tau_min, tau_max=cfg.tau_max, beta=beta_at(cfg, 0),
                     temperature_mode=cfg.temperature_mode)


def distill_step(student, teacher, loss_fn, x, y, cfg, generator, *, attack_model=None):
    """Loss of one ABSLD/RSLAD batch (not yet back-propagated). Leaves the student in train mode.

    The teacher's logits are computed once and serve the attack's soft labels and both loss terms.

    Args:
        student: the student network (or its ``torch.compile`` wrapper).
        teacher: the frozen teacher (eval mode).
        loss_fn: ABSLDLoss (in training mode, so it accumulates class risks).
        x, y: the batch.
        cfg: TrainConfig (eps, alpha, steps, amp).
        generator: torch.Generator of the attack's random start.
        attack_model: a :class:`fastabsld.fold.FoldedEvalView` of the student (refreshed here) for the
            attack, or None to attack the student itself.

    Returns:
        Tensor: the scalar loss (fp32).
    """
    with torch.no_grad():
        teacher_logits = fast_step.forward_fp32(teacher, x, cfg.amp)
    student.eval()
    attacked = student if attack_model is None else attack_model.refresh()
    target = loss_fn.teacher_probs(teacher_logits, y, branch="adv")
    x_adv = pgd(fast_step.Fp32Logits(attacked, cfg.amp), x, kl_loss(target), eps=cfg.eps, alpha=cfg.alpha,
                steps=cfg.steps, random_start="normal", generator=generator)
    student.train()
    adv_logits = fast_step.forward_fp32(student, x_adv, cfg.amp)
    return loss_fn(adv_logits, fast_step.forward_fp32(student, x, cfg.amp), teacher_logits, y)


def pgd_at_step(student, x, y, cfg, generator):
    """Loss of one PGD adversarial-training batch (cross-entropy on PGD examples, uniform start).

    Args:
        student: the network.
        x, y: the batch.
        cfg: TrainConfig.
        generator: torch.Generator of the random start.

    Returns:
        Tensor: the scalar loss.
    """
    student.eval()
    x_adv = pgd(fast_step.Fp32Logits(student, cfg.amp), x, ce_loss(y), eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                random_start="uniform", generator=generator)
    student.train()
    return F.cross_entropy(fast_step.forward_fp32(student, x_adv, cfg.amp), y)


def _subset(data, n):
    if n is None:
        return data
    data = copy.copy(data)
    data.train = (data.train[0][:n], data.train[1][:n])
    return data


def _temperatures(loss_fn):
    if loss_fn is None:
        return {}
    return {"tau_adv": loss_fn.tau_adv.tolist(), "tau_nat": loss_fn.tau_nat.tolist()}


def _selection_value(cfg, val_metrics):
    attack, _, key = cfg.select_metric.partition(".")
    value = val_metrics[attack][key]
    return -math.inf if value is None or math.isnan(value) else value


def _eval_loader(split, cfg):
    return TensorLoader(split[0], split[1], max(cfg.batch_size, 256))


def train_epoch(student, loss_fn, optimizer, loader, cfg, generator, *, teacher=None, device="cpu", progress=False,
                desc="epoch", attack_model=None):
    """One pass over ``loader``: a distillation step (``loss_fn`` given) or a PGD-AT step per batch, then SGD.

    No host synchronisation happens inside the loop; the mean loss stays on the device.

    Args:
        student: the network being trained.
        loss_fn: ABSLDLoss (switched to training mode, so it accumulates class risks) or None for PGD-AT.
        optimizer: the optimiser of ``student``.
        loader: iterable of (x, y) batches.
        cfg: TrainConfig (threat model).
        generator: torch.Generator of the attacks' random starts.
        teacher: the frozen teacher (needed with ``loss_fn``).
        device: where the batches go.
        progress: show a progress bar.
        desc: the progress bar's label.
        attack_model: the student's folded eval view for the attack (see :func:`distill_step`).

    Returns:
        Tensor: the mean training loss, 0-d, on ``device``.
    """
    from tqdm.auto import tqdm

    if loss_fn is not None:
        loss_fn.train()
    student.train()
    loss_sum = torch.zeros((), device=device)
    batches = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = fast_step.to_device(x, device, cfg.channels_last), y.to(device, non_blocking=True)
        if loss_fn is None:
            loss = pgd_at_step(student, x, y, cfg, generator)
        else:
            loss = distill_step(student, teacher, loss_fn, x, y, cfg, generator, attack_model=attack_model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        batches += 1
    return loss_sum / max(batches, 1)


def _silent(*args, **kwargs):
    pass


def _restore(path, cfg, device, student, optimizer, scheduler, loss_fn, generators, log):
    """Loads ``last.pt`` into the run's objects; returns (history, best, epochs done)."""
    state = checkpoint.load(path, map_location=device)
    world_size = distributed.current().world_size
    if state.get("world_size", 1) != world_size:
        log(f"warning: resuming a run of {state.get('world_size', 1)} processes with {world_size}: data order and "
            "attack noise continue as saved, BatchNorm statistics (per rank without --sync-bn) change")
    if state["config"] != cfg.to_dict():
        changed = sorted(k for k, v in cfg.to_dict().items() if state["config"].get(k) != v)
        log(f"warning: resuming with a changed config (fields: {', '.join(changed)})")
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if loss_fn is not None:
        loss_fn.load_state_dict(state["loss_fn"])
    checkpoint.set_rng_state(state["rng"], generators)
    return state["history"], state["best"], state["epoch"]


def train(cfg, run_dir=None, *, resume=False, teacher=None, data=None, log=print):
    """Trains a student with ``cfg.method``, checkpointing every epoch; evaluates the kept weights on test.

    Writes to ``run_dir``: ``last.pt`` (full state, every epoch), ``best.pt`` (weights chosen on the
    validation split), ``metrics.json`` (config, every epoch's metrics and temperatures, the final
    test evaluation) and PNG plots.

    Args:
        cfg: TrainConfig.
        run_dir: output folder (``None``: nothing is written and ``resume`` is impossible).
        resume: continue from ``run_dir/last.pt`` when it exists.
        teacher: the frozen teacher for distillation methods (``None``: :func:`get_teacher`).
        data: preloaded Splits (``None``: loaded from ``cfg``).
        log: function printing one-line messages.

    Returns:
        dict: ``{"config", "history", "best", "test", "model"}`` with the trained (selected) model.
    """
    from tqdm.auto import tqdm

    ctx = distributed.current()
    device = ctx.device(resolve_device(cfg.device))
    if not ctx.is_main:  # rank 0 alone logs, shows progress and writes the run folder
        log, cfg = _silent, dataclasses.replace(cfg, progress=False)
    writes = run_dir if ctx.is_main else None
    full = data if data is not None else load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.split_seed)
    data = _subset(full, cfg.train_subset)
    seed_everything(cfg.seed)
    student = build_model(cfg.model, data.num_classes, data.in_channels).to(device)
    loss_fn = build_loss(cfg, data.num_classes)
    if loss_fn is not None:
        loss_fn.to(device)
        if teacher is None:
            teacher = get_teacher(cfg, data=full, log=log)
        teacher = teacher.to(device).eval().requires_grad_(False)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher if teacher is None else teacher.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_epochs(cfg), cfg.lr_gamma)
    # A last batch of a few images would make BatchNorm's batch statistics noisy: drop it, unless it is the only one.
    loader = ctx.train_loader(*data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=data.augment,
                              drop_last=len(data.train[1]) > cfg.batch_size)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    generators = {"data": loader.generator, "attack": attack_gen}
    val_loader = _eval_loader(data.val, cfg)
    model = ctx.wrap(student, sync_bn=cfg.sync_bn)
    step_model, attack_model, step_teacher = fast_step.step_models(student, cfg, distill=loss_fn is not None,
                                                                   teacher=teacher, train_model=model)

    history, best, start = [], {"epoch": None, "value": -math.inf}, 0
    last_path = os.path.join(run_dir, "last.pt") if run_dir else None
    best_path = os.path.join(run_dir, "best.pt") if writes else None
    best_state = None
    if resume and last_path and os.path.exists(last_path):
        history, best, start = _restore(last_path, cfg, device, student, optimizer, scheduler, loss_fn, generators,
                                        log)
        if ctx.is_main and os.path.exists(best_path):
            best_state = checkpoint.load(best_path, map_location=device)["model"]
        log(f"resumed {run_dir} after epoch {start}")
    elif resume:
        log(f"no checkpoint in {run_dir}; starting from scratch")

    shapes = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    epochs = tqdm(range(start, cfg.epochs), desc=f"{cfg.method} epochs", disable=not cfg.progress,
                  initial=start, total=cfg.epochs, leave=False)
    for epoch in epochs:
        began = time.perf_counter()
        if loss_fn is not None:
            loss_fn.beta = beta_at(cfg, epoch)
        with ctx.draws():
            mean_loss = train_epoch(step_model, loss_fn, optimizer, loader, cfg, attack_gen, teacher=step_teacher,
                                    device=device, progress=cfg.progress, desc=f"epoch {epoch + 1}",
                                    attack_model=attack_model)
        mean_loss = ctx.mean(mean_loss)
        entry = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": mean_loss.item()}
        if loss_fn is not None:
            entry["beta"] = loss_fn.beta
            loss_fn.update_temperatures()
            entry.update(_temperatures(loss_fn))
        scheduler.step()
        if ctx.is_main and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            entry["val"] = evaluate(student, val_loader, cfg.val_attacks, eps=cfg.eps, alpha=cfg.alpha,
                                    num_classes=data.num_classes, device=device, progress=False)
            value = _selection_value(cfg, entry["val"])
            if value > best["value"]:
                best = {"epoch": epoch + 1, "value": value}
                best_state = copy.deepcopy(student.state_dict())
                if best_path:
                    checkpoint.atomic_save({"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch + 1,
                                            "model": best_state, "val": entry["val"],
                                            "temperatures": _temperatures(loss_fn), **shapes}, best_path)
        entry["seconds"] = time.perf_counter() - began
        history.append(entry)
        epochs.set_postfix(loss=f"{entry['train_loss']:.4f}")
        if writes:
            checkpoint.atomic_save({
                "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch + 1,
                "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "loss_fn": None if loss_fn is None else loss_fn.state_dict(),
                "beta": None if loss_fn is None else loss_fn.beta, "rng": checkpoint.rng_state(generators),
                "history": history, "best": best, "world_size": ctx.world_size, **shapes}, last_path)
            report.write_metrics(run_dir, {"config": cfg.to_dict(), "history": history, "best": best,
                                           "world_size": ctx.world_size})
        ctx.barrier()  # every rank has finished the epoch that last.pt records
    epochs.close()

    if not ctx.is_main:  # the test evaluation and the report are rank 0's
        return {"config": cfg.to_dict(), "history": history, "best": best, "test": None, "model": student.eval()}
    if best_state is not None:
        student.load_state_dict(best_state)
    test = evaluate(student, _eval_loader(data.test, cfg), cfg.test_attacks, eps=cfg.eps, alpha=cfg.alpha,
                    num_classes=data.num_classes, device=device, progress=cfg.progress)
    result = {"config": cfg.to_dict(), "history": history, "best": best, "test": test,
              "world_size": ctx.world_size}
    if writes:
        report.write_metrics(run_dir, result)
        report.plot_run(run_dir, result)
    result["model"] = student.eval()
    return result


def teacher_config(cfg):
    """The PGD-AT config that trains ``cfg``'s teacher (same data, threat model and optimiser).

    Args:
        cfg: the student's TrainConfig.

    Returns:
        TrainConfig: method ``pgd-at`` with the teacher architecture and epochs.
    """
    return dataclasses.replace(cfg, method="pgd-at", model=cfg.teacher_model, epochs=cfg.teacher_epochs,
                               seed=cfg.teacher_seed, train_subset=None, select_metric="pgd20.average",
                               val_attacks=("clean", "pgd20"), test_attacks=("clean", "pgd20"), teacher_path=None)


# Fields that do not change a trained teacher's weights.
# sync_bn is left out too, so that adding it kept the cached teachers of earlier versions valid.
_HASH_EXCLUDED = RUNTIME_FIELDS + ("test_attacks", "sync_bn")


def config_hash(cfg):
    """A short stable hash of the fields of ``cfg`` that determine the trained weights.

    Args:
        cfg: TrainConfig.

    Returns:
        str: 16 hex digits.
    """
    fields = {k: v for k, v in cfg.to_dict().items() if k not in _HASH_EXCLUDED}
    if not cfg.amp:
        del fields["amp"]  # keeps the hashes (and cached teachers) of fp32 runs as they were before the field
    blob = json.dumps({"format": CHECKPOINT_FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_model(path, device="cpu"):
    """Rebuilds a model from a ``best.pt`` / ``last.pt`` / cached-teacher checkpoint.

    Args:
        path: the checkpoint.
        device: where to put the model.

    Returns:
        tuple: (model in eval mode, TrainConfig of the run that made it).
    """
    state = checkpoint.load(path, map_location=device)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg.model, state["num_classes"], state["in_channels"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def get_teacher(cfg, *, data=None, log=print):
    """The robust teacher of ``cfg``: loaded from ``cfg.teacher_path``, from the cache, or trained and cached.

    The cache file is ``<cache_dir>/teacher-<dataset>-<model>-<config hash>.pt``; any change to the
    teacher's recipe (architecture, epochs, threat model, split, seed...) gives a new hash.

    Args:
        cfg: the student's TrainConfig.
        data: preloaded Splits (``None``: loaded from ``cfg``).
        log: function printing one-line messages.

    Returns:
        nn.Module: the teacher, frozen, in eval mode, on the CPU or ``cfg.device``.
    """
    if cfg.teacher_path:
        teacher, _ = load_model(cfg.teacher_path, resolve_device(cfg.device))
        return teacher.requires_grad_(False)
    tcfg = teacher_config(cfg)
    path = teacher_cache_path(cfg)
    ctx = distributed.current()
    if not ctx.from_main(os.path.exists(path)):  # under torchrun all ranks train it together; rank 0 caches it
        log(f"training the robust teacher ({tcfg.model}, PGD-AT, {tcfg.epochs} epochs); cached at {path}")
        result = train(tcfg, os.path.splitext(path)[0] + "-run", data=data, log=log)
        if ctx.is_main:
            os.replace(os.path.join(os.path.splitext(path)[0] + "-run", "best.pt"), path)
            test = result["test"]
            log(f"teacher test accuracy: clean {test['clean']['average']:.3f}, PGD-20 {test['pgd20']['average']:.3f}")
        ctx.barrier()
    teacher, _ = load_model(path, resolve_device(cfg.device))
    return teacher.requires_grad_(False)


def teacher_cache_path(cfg):
    """Where :func:`get_teacher` caches the teacher of ``cfg``.

    Args:
        cfg: the student's TrainConfig.

    Returns:
        str: the file path.
    """
    tcfg = teacher_config(cfg)
    return os.path.join(cfg.cache_dir, f"teacher-{tcfg.dataset}-{tcfg.model}-{config_hash(tcfg)}.pt")
