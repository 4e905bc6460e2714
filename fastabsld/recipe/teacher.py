"""The robust teacher of a distillation run: its recipe (PGD-AT or TRADES), the cache keyed by it, and loading.

A teacher is trained once per recipe and cached as ``<cache_dir>/teacher-<dataset>-<model>-<hash>.pt``.
The hash covers only what defines the teacher (``config.TEACHER_FIELDS``: the data and its split, the
threat model, the teacher's method (PGD-AT or TRADES, with its trades_beta), architecture and its own
epochs, seed and optimiser settings, plus the content of a folder or custom data set), so runs that
differ in student settings (beta, temperature mode, method, epochs, evaluation...) share one teacher.
Its training runs in ``<cache_dir>/teacher-<dataset>-<model>-<hash>-run`` with the epoch loop's
checkpoints, under that folder's lock: a training killed half-way resumes from its last epoch on the
next call, and a second process that needs the same teacher waits for the first one to cache it. The
cached file carries the checkpoints' checksum trailer and is verified at every load: a damaged one is an
error naming it, never a silently different teacher. A teacher given by ``teacher_path`` (see
``fastabsld.recipe.teachers``) is loaded instead.
"""

import contextlib
import hashlib
import json
import os
import re

from fastabsld.recipe import checkpoint, distributed, lock, logs
from fastabsld.recipe.config import TEACHER_FIELDS, TEACHER_METHOD_FIELDS, TrainConfig
from fastabsld.recipe.data import folder_fingerprint, first_images, load_for_config
from fastabsld.recipe.errors import CheckpointError
from fastabsld.recipe.estimate import announce_cpu_training
from fastabsld.recipe.loop import fit
from fastabsld.recipe.runtime import resolve_device
from fastabsld.recipe.teachers import load_teacher


def teacher_config(cfg):
    """The config that trains ``cfg``'s teacher: the teacher fields of ``cfg``, nothing of its student.

    Args:
        cfg: the student's TrainConfig.

    Returns:
        TrainConfig: method ``cfg.teacher_method`` (PGD-AT or TRADES, with ``cfg.trades_beta``) with the
        teacher's architecture, epochs, seed and optimiser; validation every epoch on clean and PGD-20 accuracy.
    """
    shared = ("dataset", "data_dir", "image_size", "folder_split", "augment", "in_memory_mb", "num_workers", "eps",
              "alpha", "steps", "split_seed", "device", "cache_dir", "progress", "sync_bn", "amp", "channels_last",
              "compile", "fold_bn", "on_nonfinite")
    own = {name: getattr(cfg, name) for name in TEACHER_FIELDS if name.startswith("teacher_")}
    own.update({name: getattr(cfg, name) for name in TEACHER_METHOD_FIELDS.get(cfg.teacher_method, ())})
    return TrainConfig(**{name: getattr(cfg, name) for name in shared}, **own, method=cfg.teacher_method,
                       model=cfg.teacher_model, epochs=cfg.teacher_epochs, seed=cfg.teacher_seed, lr=cfg.teacher_lr,
                       batch_size=cfg.teacher_batch_size, momentum=cfg.teacher_momentum,
                       weight_decay=cfg.teacher_weight_decay, milestones=cfg.teacher_milestones,
                       lr_gamma=cfg.teacher_lr_gamma, eval_every=1, val_attacks=("clean", "pgd20"),
                       select_metric="pgd20.average", test_attacks=("clean", "pgd20"))


def data_identity(cfg, data=None):
    """What identifies the data beyond the config's fields: the content of a folder or custom data set.

    Args:
        cfg: TrainConfig.
        data: the run's Splits, or None.

    Returns:
        str or None: None for digits and CIFAR (named by the config), else the data's fingerprint.
    """
    if cfg.dataset not in ("folder", "custom"):
        return None
    if data is not None and data.source:
        return data.source
    if cfg.dataset == "folder":
        return folder_fingerprint(cfg.data_dir, cfg.image_size)
    raise ValueError("a custom data set's teacher cache needs the data: pass data=...")


def config_hash(cfg, data=None):
    """A short stable hash of what defines ``cfg``'s teacher (``TEACHER_FIELDS`` and the data's identity).

    Args:
        cfg: a student's TrainConfig (or its :func:`teacher_config`: the same hash).
        data: the run's Splits (needed for custom data).

    Returns:
        str: 16 hex digits.
    """
    fields = {name: getattr(cfg, name) for name in TEACHER_FIELDS}
    fields.update({name: getattr(cfg, name) for name in TEACHER_METHOD_FIELDS.get(cfg.teacher_method, ())})
    blob = json.dumps({"format": checkpoint.FORMAT, "data": data_identity(cfg, data), **fields}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_cache_path(cfg, data=None):
    """Where :func:`get_teacher` caches the teacher of ``cfg``.

    Args:
        cfg: the student's TrainConfig.
        data: the run's Splits (needed for custom data).

    Returns:
        str: the file path.
    """
    model = re.sub(r"[^\w.-]+", "_", cfg.teacher_model)
    return os.path.join(cfg.cache_dir, f"teacher-{cfg.dataset}-{model}-{config_hash(cfg, data)}.pt")


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
    return teacher_and_info(cfg, data=data, log=log)[0]


def teacher_and_info(cfg, *, data=None, log=None):
    """:func:`get_teacher` and where the teacher came from (for metrics.json).

    Args:
        cfg: the student's TrainConfig.
        data: the data set's preloaded Splits (``None``: loaded from ``cfg``).
        log: function printing one-line messages (default: :func:`fastabsld.recipe.logs.info`).

    Returns:
        tuple: (teacher, info dict: ``source`` ``"file"`` / ``"robustbench"`` / ``"cache"``, and the path,
        digest or cache hash).
    """
    log = log or logs.info
    if data is None:
        data = load_for_config(cfg)
    device = resolve_device(cfg.device)
    shape = dict(model_name=cfg.teacher_model, num_classes=data.num_classes, in_channels=data.in_channels,
                 example=first_images(data.val), dataset=cfg.dataset, cache_dir=cfg.cache_dir, device=device)
    if cfg.teacher_path:
        return load_teacher(cfg.teacher_path, **shape)
    tcfg = teacher_config(cfg)
    path = os.path.abspath(teacher_cache_path(cfg, data))
    ctx = distributed.current()
    trained = False
    if not ctx.from_main(os.path.exists(path)):  # under torchrun all ranks train it together; rank 0 caches it
        run_dir = os.path.splitext(path)[0] + "-run"
        # Rank 0 holds the teacher's run folder; a process training the same teacher elsewhere is waited for
        # (and then finds the cached file: it trained nothing itself).
        with lock.hold(run_dir, wait=True, log=log) if ctx.is_main else contextlib.nullcontext():
            if not ctx.from_main(os.path.exists(path)):
                _train_teacher(tcfg, path, run_dir, data, ctx, log)
                trained = True
    try:
        teacher, info = load_teacher(path, **shape)
    except CheckpointError as error:
        raise CheckpointError(path, f"{error.problem}; this cached teacher is damaged: delete it to train the "
                                    "teacher again") from error
    return teacher, {**info, "source": "cache", "hash": config_hash(cfg, data), "trained_now": trained}


def _train_teacher(tcfg, path, run_dir, data, ctx, log):
    """Trains (or resumes training) the teacher in ``run_dir``; rank 0 moves its kept weights to ``path``."""
    last = os.path.join(run_dir, "last.pt")
    resume = ctx.from_main(os.path.exists(last) or os.path.exists(checkpoint.previous_path(last)))
    log(f"{'resuming the training of' if resume else 'training'} the robust teacher ({tcfg.model}, {tcfg.method}, "
        f"{tcfg.epochs} epochs) in {run_dir}; cached at {path}")
    if ctx.is_main and not resume:
        announce_cpu_training(tcfg, data, "the robust teacher", log)
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
