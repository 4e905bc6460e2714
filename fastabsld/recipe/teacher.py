"""The robust teacher of a distillation run: its PGD-AT recipe, the cache keyed by that recipe, and loading.

A teacher is trained once per recipe (architecture, epochs, threat model, split, seed...) and cached
as ``<cache_dir>/teacher-<dataset>-<model>-<hash>.pt``; any change to that recipe gives a new hash.
Its training runs in ``<cache_dir>/teacher-<dataset>-<model>-<hash>-run`` with the epoch loop's
checkpoints, under that folder's lock: a training killed half-way resumes from its last epoch on the
next call, and a second process that needs the same teacher waits for the first one to cache it.
"""

import contextlib
import dataclasses
import hashlib
import json
import os

from fastabsld.recipe import checkpoint, distributed, lock, logs
from fastabsld.recipe.config import RUNTIME_FIELDS
from fastabsld.recipe.data import load_dataset
from fastabsld.recipe.loop import fit
from fastabsld.recipe.runtime import resolve_device

# Fields that do not change a trained teacher's weights.
_HASH_EXCLUDED = RUNTIME_FIELDS + ("test_attacks", "sync_bn")


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


def config_hash(cfg):
    """A short stable hash of the fields of ``cfg`` that determine the trained weights.

    Args:
        cfg: TrainConfig.

    Returns:
        str: 16 hex digits.
    """
    fields = {k: v for k, v in cfg.to_dict().items() if k not in _HASH_EXCLUDED}
    if not cfg.amp:
        del fields["amp"]  # fp32 and bf16 runs differ; fp32 runs hash without the field
    blob = json.dumps({"format": checkpoint.FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_cache_path(cfg):
    """Where :func:`get_teacher` caches the teacher of ``cfg``.

    Args:
        cfg: the student's TrainConfig.

    Returns:
        str: the file path.
    """
    tcfg = teacher_config(cfg)
    return os.path.join(cfg.cache_dir, f"teacher-{tcfg.dataset}-{tcfg.model}-{config_hash(tcfg)}.pt")


def teacher_source(cfg):
    """Where ``cfg``'s teacher comes from, as recorded in a run: ``cfg.teacher_path`` or the cache file, absolute.

    Args:
        cfg: the student's TrainConfig.

    Returns:
        str: the path (absolute when it names a file).
    """
    path = cfg.teacher_path or teacher_cache_path(cfg)
    return os.path.abspath(path) if cfg.teacher_path is None or os.path.exists(path) else path


def get_teacher(cfg, *, data=None, log=None):
    """The robust teacher of ``cfg``: loaded from ``cfg.teacher_path``, from the cache, or trained and cached.

    Args:
        cfg: the student's TrainConfig.
        data: the data set's preloaded Splits (``None``: loaded from ``cfg``); the teacher trains on all of
            its training split.
        log: function printing one-line messages (default: :func:`fastabsld.recipe.logs.info`).

    Returns:
        nn.Module: the teacher, frozen, in eval mode, on ``cfg.device``.
    """
    log = log or logs.info
    if cfg.teacher_path:
        teacher, _ = checkpoint.load_model(cfg.teacher_path, resolve_device(cfg.device))
        return teacher.requires_grad_(False)
    tcfg = teacher_config(cfg)
    path = os.path.abspath(teacher_cache_path(cfg))
    ctx = distributed.current()
    if not ctx.from_main(os.path.exists(path)):  # under torchrun all ranks train it together; rank 0 caches it
        run_dir = os.path.splitext(path)[0] + "-run"
        # Rank 0 holds the teacher's run folder; a process training the same teacher elsewhere is waited for.
        with lock.hold(run_dir, wait=True, log=log) if ctx.is_main else contextlib.nullcontext():
            if not ctx.from_main(os.path.exists(path)):
                _train_teacher(cfg, tcfg, path, run_dir, data, ctx, log)
    teacher, _ = checkpoint.load_model(path, resolve_device(cfg.device))
    return teacher.requires_grad_(False)


def _train_teacher(cfg, tcfg, path, run_dir, data, ctx, log):
    """Trains (or resumes training) the teacher in ``run_dir``; rank 0 moves its kept weights to ``path``."""
    last = os.path.join(run_dir, "last.pt")
    resume = ctx.from_main(os.path.exists(last) or os.path.exists(checkpoint.previous_path(last)))
    log(f"{'resuming the training of' if resume else 'training'} the robust teacher ({tcfg.model}, PGD-AT, "
        f"{tcfg.epochs} epochs) in {run_dir}; cached at {path}")
    if data is None:
        data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.split_seed)
    result = fit(tcfg, run_dir, data, resume=resume, log=log)
    if ctx.is_main:
        best = os.path.join(run_dir, "best.pt")
        if not os.path.exists(best):  # this folder's kept weights were cached before, and the cache file deleted
            log(f"warning: {best} is gone (cached before); caching the weights of the last epoch instead")
            checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": result["config"],
                                    "epoch": len(result["history"]), "model": result["model"].state_dict(),
                                    "num_classes": data.num_classes, "in_channels": data.in_channels}, best)
        os.replace(best, path)
        # The training is over: its fallbacks would only double the folder's size (last.pt stays).
        for name in ("last.pt", "best.pt"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(checkpoint.previous_path(os.path.join(run_dir, name)))
        test = result["test"]
        log(f"teacher test accuracy: clean {test['clean']['average']:.3f}, PGD-20 {test['pgd20']['average']:.3f}")
    ctx.barrier()
