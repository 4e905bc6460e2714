"""The epoch loop of the recipe: training epochs, validation, checkpoints, resume and the final test.

Unlike the released script, the checkpoint kept as "best" is chosen on a validation split, never
on the test split; the test split is evaluated once, at the end, with the selected weights.
What a method does per batch, at each epoch's start and end (ABSLD's temperatures, IAD's epoch,
Fair-ARD's class weights) and what its checkpoint keeps is its plan's (``fastabsld.recipe.method_plans``).

What the loop guarantees about its run folder (rank 0 alone writes it, under its lock):

- ``last.pt`` is written after every epoch, checksummed and verified, and its previous version is
  kept as ``last.prev.pt``; a resume that finds ``last.pt`` damaged falls back to it and says so.
  ``best.pt`` / ``best.prev.pt`` likewise, matched against the best epoch that the resumed state records.
- A run killed at any point resumes to the state the uninterrupted run has (weights, temperatures,
  optimiser, RNG states), bit for bit on the same machine.
- A resumed distillation run checks that its teacher's weights are those its checkpoint was distilled
  from (:class:`TeacherChangedError` otherwise, unless accepted; an accepted change is recorded).
- A file the disk refuses (full, over quota) is a :class:`WriteError`; the files before it stay, and
  the run resumes once there is space.
- A NaN or infinite loss (or model state) is counted on the device, read where the epoch already
  synchronises, and by default stops the run with :class:`NonFiniteLossError` before anything of the
  non-finite epoch is written (``on_nonfinite="warn"``: a warning line, and the run goes on).
- The final test evaluation's per-example results go to ``predictions.npz``
  (:mod:`fastabsld.recipe.predictions`), with the test split's identity.
"""

import collections
import contextlib
import copy
import dataclasses
import itertools
import math
import os
import time

import torch

from fastabsld import sanity
from fastabsld.evaluation import evaluate
from fastabsld.recipe import checkpoint, distributed, lock, logs, predictions, report, speed
from fastabsld.recipe.data import eval_loader, is_tensors, split_size, stream_loader, subset
from fastabsld.recipe.errors import CheckpointError, NonFiniteLossError, TeacherChangedError
from fastabsld.recipe.method_plans import plan_for, reweight as reweighting
from fastabsld.recipe.models import build_model
from fastabsld.recipe.runtime import resolve_device, seed_everything
from fastabsld.recipe.schedule import milestone_epochs
from fastabsld.recipe.steps import build_loss, train_step

__all__ = ["NonFiniteLossError", "TeacherChangedError", "fit", "train_epoch"]


def _subset(data, n):
    if n is None:
        return data
    data = copy.copy(data)
    data.train = subset(data.train, n)
    return data


def _temperatures(entry):
    return {key: entry[key] for key in ("tau_adv", "tau_nat") if key in entry}


def _selection_value(cfg, val_metrics):
    attack, _, key = cfg.select_metric.partition(".")
    value = val_metrics[attack][key]
    return -math.inf if value is None or math.isnan(value) else value


def _eval_loader(split, cfg):
    return eval_loader(split, max(cfg.batch_size, 256), cfg.num_workers)


def train_epoch(student, loss_fn, optimizer, loader, cfg, generator, *, teacher=None, device="cpu", progress=False,
                desc="epoch", attack_model=None, nonfinite_count=None, reweight=None):
    """One pass over ``loader``: a step of ``cfg.method`` per batch, then SGD.

    No host synchronisation happens inside the loop; the mean loss (and the count of non-finite
    batch losses) stays on the device.

    Args:
        student: the network being trained.
        loss_fn: the method's loss module (switched to training mode, so ABSLDLoss accumulates class risks), or
            None for PGD-AT.
        optimizer: the optimiser of ``student``.
        loader: iterable of (x, y) batches.
        cfg: TrainConfig (method, threat model).
        generator: torch.Generator of the attacks' random starts.
        teacher: the frozen teacher (needed by the distillation methods).
        device: where the batches go.
        progress: show a progress bar.
        desc: the progress bar's label.
        attack_model: the student's folded eval view for the attack (see ``steps.distill_step``).
        nonfinite_count: optional 0-d integer tensor on ``device``; the number of batches whose loss
            is NaN or infinite is added to it in place.
        reweight: the run's FairReweight (switched to training mode, so it counts the attacks' robust
            steps), or None.

    Returns:
        Tensor: the mean training loss, 0-d, on ``device``.
    """
    from tqdm.auto import tqdm

    for module in (loss_fn, reweight):
        if module is not None:
            module.train()
    student.train()
    loss_sum = torch.zeros((), device=device)
    batches = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = speed.to_device(x, device, cfg.channels_last), y.to(device, non_blocking=True)
        loss = train_step(student, loss_fn, optimizer, x, y, cfg, generator, teacher=teacher, reweight=reweight,
                          attack_model=attack_model)
        loss_sum += loss
        if nonfinite_count is not None:
            nonfinite_count += ~torch.isfinite(loss)
        batches += 1
    return loss_sum / max(batches, 1)


def _finite_state(module):
    """0-d bool tensor on the module's device: every floating-point parameter and buffer is finite."""
    tensors = [t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _epoch_figures(ctx, mean_loss, nonfinite, finite_state):
    """The epoch's mean loss, its count of non-finite batches and whether the state went non-finite: one sync."""
    mean_loss = ctx.mean(mean_loss)
    flags = torch.stack([nonfinite.double(), (~finite_state).double().to(nonfinite.device)])
    flags = ctx.mean(flags) * ctx.world_size  # summed over the ranks
    loss, count, state = torch.cat([mean_loss.double().reshape(1), flags]).tolist()
    return loss, round(count), state > 0


def _nonfinite_problem(loss, count, bad_state, batches):
    problems = []
    if count:
        problems.append(f"the training loss was NaN or infinite in {count} of {batches} batches")
    elif not math.isfinite(loss):
        problems.append(f"the mean training loss is {loss}")
    if bad_state:
        problems.append("the model's weights or BatchNorm statistics are NaN or infinite")
    return "; ".join(problems)


def _silent(*args, **kwargs):
    pass


def _restore(state, cfg, student, optimizer, scheduler, plan, loss_fn, reweight, generators, log):
    """Loads a ``last.pt`` state into the run's objects; returns (history, best, epochs done)."""
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
    plan.restore(loss_fn, state)
    reweighting.restore(reweight, state)
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


def _load_resume_state(last_path, ctx, device, log):
    """The state to resume from: ``last.pt``, or ``last.prev.pt`` when ``last.pt`` is damaged (rank 0 decides).

    Returns:
        tuple: (state, the file it came from), or None when the run folder holds no checkpoint.
    """
    found = error = None
    if ctx.is_main:
        try:
            found = checkpoint.load_latest(last_path, map_location=device)
        except CheckpointError as failure:
            error = failure
    used, error = ctx.from_main((found[1] if found else None, error))
    if error is not None:
        raise error
    if used is None:
        return None
    if not ctx.is_main:
        return checkpoint.load(used, map_location=device), used
    state, used, verified, passed = found
    for problem in passed:
        log(f"warning: {problem}; falling back to {used} (epoch {state['epoch']})")
    if not verified:
        log(f"warning: {used} carries no checksum (written by an older version); loaded unverified")
    return state, used


def _load_best(best_path, best, resumed_epoch, cfg, device, log):
    """The kept weights matching the resumed state's ``best`` record, from ``best.pt`` or ``best.prev.pt``.

    Returns:
        tuple: (model state or None, the best record (adjusted when the recorded weights are lost),
        whether ``best.pt`` itself is the good file).
    """
    if best["epoch"] is None:
        return None, best, False
    usable = []
    for path in (best_path, checkpoint.previous_path(best_path)):
        if not os.path.exists(path):
            continue
        try:
            state = checkpoint.load(path, map_location=device)
        except CheckpointError as error:
            log(f"warning: {error}")
            continue
        if isinstance(state, dict) and "model" in state:
            usable.append((path, state))
    for path, state in usable:
        if state.get("epoch") == best["epoch"]:
            if path != best_path:
                log(f"warning: {best_path} does not hold the weights of the best epoch {best['epoch']}; "
                    f"falling back to {path}")
            return state["model"], best, path == best_path
    older = [(p, s) for p, s in usable if isinstance(s.get("epoch"), int) and s["epoch"] <= resumed_epoch]
    if older:
        path, state = max(older, key=lambda item: item[1]["epoch"])
        log(f"warning: the weights of the best epoch {best['epoch']} are lost; the kept weights are now those of "
            f"epoch {state['epoch']} ({path})")
        return state["model"], {"epoch": state["epoch"], "value": _selection_value(cfg, state["val"])}, False
    log(f"warning: no usable {os.path.basename(best_path)}: the weights of the best epoch {best['epoch']} are lost; "
        f"the selection starts again after epoch {resumed_epoch}")
    return None, {"epoch": None, "value": -math.inf}, False


# What a teacher change records of each teacher (the rest of a teacher's record, its validation, stays in "teacher").
_TEACHER_IDENTITY = ("source", "path", "name", "hash", "sha256", "weights_sha256")


def _identity(record):
    return {key: record[key] for key in _TEACHER_IDENTITY if key in record}


def _teacher_changes(state, info, run_dir, accept):
    """The teacher changes of a resumed run: its checkpoint's, plus one when the teacher's weights differ now.

    Returns:
        list: ``{"epoch": first epoch with the new teacher, "from": ..., "to": ...}`` records.

    Raises:
        TeacherChangedError: the weights differ and ``accept`` is False.
    """
    changes = list(state.get("teacher_changes") or [])
    recorded, current = state.get("teacher"), (info or {}).get("teacher")
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return changes
    # Checkpoints written before the weights were hashed compare the files' hashes.
    key = next((k for k in ("weights_sha256", "sha256") if recorded.get(k) and current.get(k)), None)
    if key is None or recorded[key] == current[key]:
        return changes
    if not accept:
        raise TeacherChangedError(run_dir, recorded, current)
    return changes + [{"epoch": state["epoch"] + 1, "from": _identity(recorded), "to": _identity(current)}]


def fit(cfg, run_dir, data, *, teacher=None, resume=False, log=None, student=None, info=None, scalar_writer=None,
        accept_teacher_change=False):
    """Trains a student with ``cfg.method`` on ``data``, checkpointing every epoch; evaluates the kept weights on test.

    Writes to ``run_dir`` (holding its lock, see :mod:`fastabsld.recipe.lock`): ``last.pt`` (full state,
    every epoch) and ``last.prev.pt`` (the one before), ``best.pt`` (weights chosen on the validation
    split) and ``best.prev.pt``, ``metrics.json`` (config, every epoch's metrics and temperatures, the
    final test evaluation), PNG plots, and TensorBoard scalars when the ``tensorboard`` package is
    installed. Logs one line per epoch.

    Args:
        cfg: TrainConfig.
        run_dir: output folder (``None``: nothing is written and ``resume`` is impossible).
        data: the data set's Splits (``cfg.train_subset`` is applied here).
        teacher: the frozen teacher, required by the distillation methods.
        resume: continue from ``run_dir/last.pt`` (or ``last.prev.pt``) when it exists.
        log: function printing one-line messages (default: :func:`fastabsld.recipe.logs.info`).
        student: the network to train (``None``: ``cfg.model`` built fresh); trained in place.
        info: extra entries for the checkpoints and metrics.json (which teacher was used, under
            ``"teacher"``: a resumed run takes the teacher file recorded there again).
        scalar_writer: a SummaryWriter-like object (``add_scalar``, ``flush``) receiving the epoch
            scalars; None: a ``torch.utils.tensorboard.SummaryWriter`` in ``run_dir`` when tensorboard
            is installed.
        accept_teacher_change: resume even when ``info["teacher"]``'s weights differ from those the
            checkpoint was distilled from; the change is recorded under ``"teacher_changes"`` in the
            checkpoints and metrics.json.

    Returns:
        dict: ``{"config", "history", "best", "test", "model", ...}`` with the trained (selected) model.

    Raises:
        RunLockedError: another process is running in ``run_dir``.
        CheckpointError: ``resume`` found checkpoints, none of them usable.
        TeacherChangedError: ``resume`` with a teacher other than the checkpoint's, not accepted.
        NonFiniteLossError: the loss became NaN or infinite and ``cfg.on_nonfinite`` is ``"stop"``.
        WriteError: the file system refused a run file (a full disk); the files before it are untouched.
    """
    log = log or logs.info
    ctx = distributed.current()
    writes = run_dir if ctx.is_main else None
    with lock.hold(writes) if writes else contextlib.nullcontext():
        return _fit(cfg, run_dir, data, teacher=teacher, resume=resume, log=log, student=student, info=info,
                    scalar_writer=scalar_writer, accept_teacher_change=accept_teacher_change)


def _fit(cfg, run_dir, data, *, teacher, resume, log, student, info, scalar_writer, accept_teacher_change):
    from tqdm.auto import tqdm

    ctx = distributed.current()
    device = ctx.device(resolve_device(cfg.device))
    if not ctx.is_main:  # rank 0 alone logs, shows progress and writes the run folder
        log, cfg = _silent, dataclasses.replace(cfg, progress=False)
    bars = logs.show_progress(cfg.progress)
    writes = run_dir if ctx.is_main else None
    data = _subset(data, cfg.train_subset)
    seed_everything(cfg.seed)
    student = (build_model(cfg.model, data.num_classes, data.in_channels) if student is None else student).to(device)
    plan = plan_for(cfg.method)
    loss_fn = build_loss(cfg, data.num_classes)
    reweight = reweighting.build_reweight(cfg, data.num_classes)
    for module in (loss_fn, reweight):
        if module is not None:
            module.to(device)
    if not plan.distills:
        teacher = None
    elif teacher is None:
        raise ValueError(f"method {cfg.method!r} distils from a teacher: pass teacher=...")
    else:
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
    step_model, attack_model, step_teacher = speed.step_models(student, cfg, distill=plan.folded_attack,
                                                               teacher=teacher, train_model=model)

    history, best, start = [], {"epoch": None, "value": -math.inf}, 0
    last_path = os.path.join(run_dir, "last.pt") if run_dir else None
    best_path = os.path.join(run_dir, "best.pt") if writes else None
    best_state = None
    # Whether the file now at last_path / best_path is known good for this run: only such a file may
    # become the .prev fallback when the next one is written.
    last_good = best_good = False
    if writes:
        checkpoint.remove_stale_temporaries(run_dir)
    restored = _load_resume_state(last_path, ctx, device, log) if resume and last_path else None
    teacher_changes = []
    if restored:
        state, used = restored
        teacher_changes = _teacher_changes(state, info, run_dir, accept_teacher_change)
        if len(teacher_changes) > len(state.get("teacher_changes") or []):
            change = teacher_changes[-1]
            log(f"warning: the teacher changed (weights SHA-256 {change['from'].get('weights_sha256')} -> "
                f"{change['to'].get('weights_sha256')}); distilling from the new one from epoch {change['epoch']} "
                "on, as accepted")
        history, best, start = _restore(state, cfg, student, optimizer, scheduler, plan, loss_fn, reweight, generators,
                                        log)
        last_good = used == last_path
        if ctx.is_main:
            best_state, best, best_good = _load_best(best_path, best, start, cfg, device, log)
        log(f"resumed {run_dir} after epoch {start}" + ("" if used == last_path else f" (from {used})"))
    else:
        if resume and run_dir:
            log(f"no checkpoint in {run_dir}; starting from scratch")
        for path in (last_path, best_path) if writes else ():
            if os.path.exists(checkpoint.previous_path(path)):  # another run's: never a fallback of this one
                os.remove(checkpoint.previous_path(path))

    names = getattr(data, "class_names", None)
    shapes = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    extra = {**(info or {}), "world_size": ctx.world_size}
    if teacher_changes:
        extra["teacher_changes"] = teacher_changes
    if names:
        extra["class_names"] = list(names)
    own_writer = scalar_writer is None
    writer = (logs.tensorboard_writer(run_dir, first_epoch=start + 1) if own_writer else scalar_writer) \
        if writes else None
    scalars = logs.Scalars(writer) if writer is not None else None
    try:
        with logs.around_bars(bars):
            epochs = tqdm(range(start, cfg.epochs), desc=f"{cfg.method} epochs", disable=not bars, initial=start,
                          total=cfg.epochs, leave=False)
            for epoch in epochs:
                began = time.perf_counter()
                plan.start_epoch(loss_fn, cfg, epoch)
                nonfinite = torch.zeros((), dtype=torch.int64, device=device)
                with ctx.draws():
                    mean_loss = train_epoch(step_model, loss_fn, optimizer, loader, cfg, attack_gen,
                                            teacher=step_teacher, device=device, progress=bars,
                                            desc=f"epoch {epoch + 1}", attack_model=attack_model,
                                            nonfinite_count=nonfinite, reweight=reweight)
                loss, count, bad_state = _epoch_figures(ctx, mean_loss, nonfinite, _finite_state(student))
                entry = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss}
                problem = _nonfinite_problem(loss, count, bad_state, len(loader))
                if problem:
                    if cfg.on_nonfinite == "stop":
                        _stop(cfg, epoch, problem, run_dir if writes else None, last_path, history, best, extra)
                    log(f"warning: epoch {epoch + 1}: {problem}; the run goes on (on_nonfinite='warn')")
                    entry["nonfinite_batches"] = count
                entry.update(plan.end_epoch(loss_fn, cfg, epoch))
                entry.update(reweighting.end_epoch(reweight))
                scheduler.step()
                improved = False
                if ctx.is_main and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    entry["val"] = evaluate(student, val_loader, cfg.val_attacks, eps=cfg.eps, alpha=cfg.alpha,
                                            num_classes=data.num_classes, device=device, progress=False)
                    value = _selection_value(cfg, entry["val"])
                    if value > best["value"]:
                        best, improved = {"epoch": epoch + 1, "value": value}, True
                        best_state = copy.deepcopy(student.state_dict())
                        if best_path:
                            checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": cfg.to_dict(),
                                                    "epoch": epoch + 1, "model": best_state, "val": entry["val"],
                                                    "temperatures": _temperatures(entry), **shapes, **extra},
                                                   best_path, keep_previous=best_good)
                            best_good = True
                entry["seconds"] = time.perf_counter() - began
                history.append(entry)
                epochs.set_postfix(loss=f"{entry['train_loss']:.4f}")
                if scalars:  # before last.pt: a run killed in between replays the epoch, and purge_step drops these
                    scalars.add(logs.epoch_scalars(entry), epoch + 1)
                if writes:
                    checkpoint.atomic_save({
                        "format": checkpoint.FORMAT, "config": cfg.to_dict(), "epoch": epoch + 1,
                        "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        **plan.checkpoint_entries(loss_fn), **reweighting.checkpoint_entries(reweight),
                        "rng": checkpoint.rng_state(generators),
                        "history": history, "best": best, **shapes, **extra}, last_path, keep_previous=last_good)
                    last_good = True
                    report.write_metrics(run_dir, {"config": cfg.to_dict(), "history": history, "best": best,
                                                   **extra})
                log(logs.epoch_line(entry, epochs=cfg.epochs, method=cfg.method, best=improved))
                ctx.barrier()  # every rank has finished the epoch that last.pt records
            epochs.close()

        if not ctx.is_main:  # the test evaluation and the report are rank 0's
            return {"config": cfg.to_dict(), "history": history, "best": best, "test": None,
                    "model": student.eval()}
        if best_state is not None:
            student.load_state_dict(best_state)
        test = evaluate(student, _eval_loader(data.test, cfg), cfg.test_attacks, eps=cfg.eps, alpha=cfg.alpha,
                        num_classes=data.num_classes, device=device, progress=bars)
        result = {"config": cfg.to_dict(), "history": history, "best": best, "test": test, **extra}
        # The adversarial-evaluation checks eval runs (a stronger attack above a weaker one, masked gradients).
        warnings = sanity.check({attack: test.correct(attack) for attack in cfg.test_attacks})
        for warning in warnings:
            log(f"warning: {warning.message}")
        result["sanity"] = {"warnings": [warning.to_dict() for warning in warnings]}
        if scalars:
            scalars.add(logs.final_scalars(test), cfg.epochs)
        if writes:  # the predictions first: metrics.json with a test marks the run finished
            kept = "best.pt" if best_state is not None else "last.pt"
            predictions.save(os.path.join(run_dir, predictions.FILE), test, predictions.identity(
                cfg, data, split="test", split_size=split_size(data.test), checkpoint=kept))
            report.write_metrics(run_dir, result)
            report.plot_run(run_dir, result)
        result["model"] = student.eval()
        return result
    finally:
        if scalars and own_writer:
            scalars.close()


def _stop(cfg, epoch, problem, run_dir, last_path, history, best, extra):
    """Records the failure in metrics.json (rank 0) and raises NonFiniteLossError; last.pt keeps its finite epoch."""
    if run_dir:
        report.write_metrics(run_dir, {"config": cfg.to_dict(), "history": history, "best": best, **extra,
                                       "stopped": {"epoch": epoch + 1, "reason": problem}})
    kept = (f"{last_path} keeps the last finite epoch ({epoch})" if last_path and epoch > 0
            else "no checkpoint was written")
    raise NonFiniteLossError(f"epoch {epoch + 1}: {problem}; the run stopped (on_nonfinite='stop'); {kept}",
                             epoch + 1)
