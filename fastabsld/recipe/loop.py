"""The epoch loop of the recipe: training epochs, validation, checkpoints, resume and the final test.

Unlike the released script, the checkpoint kept as "best" is chosen on a validation split, never
on the test split; the test split is evaluated once, at the end, with the selected weights.
Temperatures are updated once per epoch; ``beta`` is scaled by the LR factor at the LR milestones.
"""

import collections
import copy
import dataclasses
import math
import os
import time

import torch

from fastabsld.evaluation import evaluate
from fastabsld.recipe import checkpoint, distributed, report, speed
from fastabsld.recipe.data import eval_loader, is_tensors, split_size, stream_loader, subset
from fastabsld.recipe.models import build_model
from fastabsld.recipe.runtime import resolve_device, seed_everything
from fastabsld.recipe.schedule import beta_at, milestone_epochs
from fastabsld.recipe.steps import build_loss, train_step


def _subset(data, n):
    if n is None:
        return data
    data = copy.copy(data)
    data.train = subset(data.train, n)
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
    return eval_loader(split, max(cfg.batch_size, 256), cfg.num_workers)


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
        attack_model: the student's folded eval view for the attack (see ``steps.distill_step``).

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
        x, y = speed.to_device(x, device, cfg.channels_last), y.to(device, non_blocking=True)
        loss_sum += train_step(student, loss_fn, optimizer, x, y, cfg, generator, teacher=teacher,
                               attack_model=attack_model)
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
    _reschedule(scheduler, optimizer, cfg, state["epoch"])
    if loss_fn is not None:
        loss_fn.load_state_dict(state["loss_fn"])
    checkpoint.set_rng_state(state["rng"], generators)
    return state["history"], state["best"], state["epoch"]


def _reschedule(scheduler, optimizer, cfg, done):
    """After a resume with other epochs: the LR milestones of ``cfg`` from now on, and the LR they give."""
    milestones = milestone_epochs(cfg)
    if sorted(scheduler.milestones.elements()) == milestones:
        return
    scheduler.milestones = collections.Counter(milestones)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * cfg.lr_gamma ** sum(m <= done for m in milestones)


def fit(cfg, run_dir, data, *, teacher=None, resume=False, log=print, student=None, info=None):
    """Trains a student with ``cfg.method`` on ``data``, checkpointing every epoch; evaluates the kept weights on test.

    Writes to ``run_dir``: ``last.pt`` (full state, every epoch), ``best.pt`` (weights chosen on the
    validation split), ``metrics.json`` (config, every epoch's metrics and temperatures, the final
    test evaluation) and PNG plots.

    Args:
        cfg: TrainConfig.
        run_dir: output folder (``None``: nothing is written and ``resume`` is impossible).
        data: the data set's Splits (``cfg.train_subset`` is applied here).
        teacher: the frozen teacher, required by the distillation methods.
        resume: continue from ``run_dir/last.pt`` when it exists.
        log: function printing one-line messages.
        student: the network to train (``None``: ``cfg.model`` built fresh); trained in place.
        info: extra entries for metrics.json (e.g. which teacher was used).

    Returns:
        dict: ``{"config", "history", "best", "test", "model"}`` with the trained (selected) model.
    """
    from tqdm.auto import tqdm

    ctx = distributed.current()
    device = ctx.device(resolve_device(cfg.device))
    if not ctx.is_main:  # rank 0 alone logs, shows progress and writes the run folder
        log, cfg = _silent, dataclasses.replace(cfg, progress=False)
    writes = run_dir if ctx.is_main else None
    data = _subset(data, cfg.train_subset)
    seed_everything(cfg.seed)
    student = (build_model(cfg.model, data.num_classes, data.in_channels) if student is None else student).to(device)
    loss_fn = build_loss(cfg, data.num_classes)
    if loss_fn is not None:
        if teacher is None:
            raise ValueError(f"method {cfg.method!r} distils from a teacher: pass teacher=...")
        loss_fn.to(device)
        teacher = teacher.to(device).eval().requires_grad_(False)
    if cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher if teacher is None else teacher.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_epochs(cfg), cfg.lr_gamma)
    # A last batch of a few images would make BatchNorm's batch statistics noisy: drop it, unless it is the only one.
    drop_last = split_size(data.train) > cfg.batch_size
    if is_tensors(data.train):
        loader = ctx.train_loader(*data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=data.augment,
                                  drop_last=drop_last)
    elif ctx.distributed:
        raise ValueError("a streamed data set trains in one process; under torchrun, give data that fits in memory")
    else:
        loader = stream_loader(data.train, cfg.batch_size, seed=cfg.seed, augment=data.augment, drop_last=drop_last,
                               num_workers=cfg.num_workers)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    generators = {"data": loader.generator, "attack": attack_gen}
    val_loader = _eval_loader(data.val, cfg)
    model = ctx.wrap(student, sync_bn=cfg.sync_bn)
    step_model, attack_model, step_teacher = speed.step_models(student, cfg, distill=loss_fn is not None,
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
                    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": cfg.to_dict(),
                                            "epoch": epoch + 1, "model": best_state, "val": entry["val"],
                                            "temperatures": _temperatures(loss_fn), **shapes}, best_path)
        entry["seconds"] = time.perf_counter() - began
        history.append(entry)
        epochs.set_postfix(loss=f"{entry['train_loss']:.4f}")
        if writes:
            checkpoint.atomic_save({
                "format": checkpoint.FORMAT, "config": cfg.to_dict(), "epoch": epoch + 1,
                "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "loss_fn": None if loss_fn is None else loss_fn.state_dict(),
                "beta": None if loss_fn is None else loss_fn.beta, "rng": checkpoint.rng_state(generators),
                "history": history, "best": best, "world_size": ctx.world_size, **shapes}, last_path)
            report.write_metrics(run_dir, {"config": cfg.to_dict(), "history": history, "best": best,
                                           "world_size": ctx.world_size, **(info or {})})
        ctx.barrier()  # every rank has finished the epoch that last.pt records
    epochs.close()

    if not ctx.is_main:  # the test evaluation and the report are rank 0's
        return {"config": cfg.to_dict(), "history": history, "best": best, "test": None, "model": student.eval()}
    if best_state is not None:
        student.load_state_dict(best_state)
    test = evaluate(student, _eval_loader(data.test, cfg), cfg.test_attacks, eps=cfg.eps, alpha=cfg.alpha,
                    num_classes=data.num_classes, device=device, progress=cfg.progress)
    result = {"config": cfg.to_dict(), "history": history, "best": best, "test": test,
              "world_size": ctx.world_size, **(info or {})}
    if writes:
        report.write_metrics(run_dir, result)
        report.plot_run(run_dir, result)
    result["model"] = student.eval()
    return result
