"""``train``: one training run of the recipe from its config: the data, the teacher when needed, the loop.

The recipe's methods are ``absld``, ``rslad``, ``ard``, ``iad`` (distillation), ``trades`` and ``pgd-at``
(see ``fastabsld.recipe.method_plans``); the loop,
checkpoints and resume are ``fastabsld.recipe.loop``'s, the teacher and its cache
``fastabsld.recipe.teacher``'s, teachers from elsewhere ``fastabsld.recipe.teachers``'. A run records
its teacher in its checkpoints and metrics.json (for a file, its absolute path and SHA-256; for every
teacher, the hash of its weights), and a resumed run takes that teacher file again, whichever working
directory or cache folder it resumes from, and refuses a teacher whose weights differ unless told to
accept it.

Your own data and models (the contract): images are float tensors (C, H, W) in [0, 1] (no
normalisation: put it inside the model), labels integers in [0, num_classes); a model is any
``nn.Module`` mapping a (B, C, H, W) batch to (B, num_classes) logits, and a teacher is used in eval
mode without gradients.
"""

import dataclasses
import json
import os

from torch import nn

from fastabsld.evaluation import evaluate
from fastabsld.recipe import distributed, logs
from fastabsld.recipe.config import DISTILLATION_METHODS
from fastabsld.recipe.data import Splits, as_splits, eval_loader, first_images, load_for_config, with_augment
from fastabsld.recipe.loop import fit
from fastabsld.recipe.models import check_model_name
from fastabsld.recipe.report import METRICS_FILE
from fastabsld.recipe.runtime import resolve_device
from fastabsld.recipe.teacher import teacher_and_info
from fastabsld.recipe.teachers import load_teacher

TEACHER_ATTACKS = ("clean", "pgd20")
# Teacher sources whose "path" a resumed run can load again.
_FILE_SOURCES = ("file", "cache")


def recorded_teacher(run_dir):
    """The teacher file that a run in ``run_dir`` recorded in its metrics.json, or None.

    Args:
        run_dir: the run folder.

    Returns:
        str or None: the recorded path (None for a teacher given as a module or by robustbench name).
    """
    try:
        with open(os.path.join(run_dir, METRICS_FILE)) as f:
            recorded = json.load(f).get("teacher")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(recorded, dict) and recorded.get("source") in _FILE_SOURCES:
        recorded = recorded.get("path")
    return recorded if isinstance(recorded, str) else None


def _teacher_config(cfg, run_dir, resume, log):
    """``cfg``, pointed at the teacher file that the resumed run recorded when that file still exists."""
    ctx = distributed.current()
    recorded = ctx.from_main(recorded_teacher(run_dir) if resume and run_dir and ctx.is_main else None)
    if not recorded or recorded == cfg.teacher_path:
        return cfg
    if not ctx.from_main(os.path.isfile(recorded)):
        log(f"warning: the run's teacher {recorded} is gone; taking the teacher of its configuration")
        return cfg
    return dataclasses.replace(cfg, teacher_path=recorded)


def teacher_report(teacher, data, cfg):
    """The teacher's clean and PGD-20 accuracy on the validation split (recorded in metrics.json).

    Args:
        teacher: the frozen teacher.
        data: Splits.
        cfg: TrainConfig (threat model, device).

    Returns:
        dict: ``{attack: {"average", "worst", "nsd"}}`` for clean and PGD-20.
    """
    device = next((p.device for p in teacher.parameters()), resolve_device(cfg.device))
    results = evaluate(teacher, eval_loader(data.val, max(cfg.batch_size, 256), cfg.num_workers), TEACHER_ATTACKS,
                       eps=cfg.eps, alpha=cfg.alpha, num_classes=data.num_classes, device=device, progress=False)
    return {name: {key: r[key] for key in ("average", "worst", "nsd")} for name, r in results.items()}


def prepare_data(cfg, data=None, *, num_classes=None):
    """The run's Splits: ``data`` (anything :func:`fastabsld.recipe.data.as_splits` takes) or ``cfg``'s data set.

    Args:
        cfg: TrainConfig.
        data: Splits, a dict of splits, a Dataset or a DataLoader, or None.
        num_classes: classes of user data (see ``as_splits``).

    Returns:
        Splits: with ``cfg.augment`` applied when set.
    """
    if data is None:
        return load_for_config(cfg)
    if not isinstance(data, Splits):
        data = as_splits(data, num_classes=num_classes, seed=cfg.split_seed, fractions=cfg.folder_split,
                         in_memory_mb=cfg.in_memory_mb, num_workers=cfg.num_workers)
    return with_augment(data, cfg.augment)


def folder_settings_line(cfg, data):
    """The line that states an image folder run's threat model and models (their defaults follow the image size).

    Args:
        cfg: TrainConfig of a ``folder`` run.
        data: its Splits.

    Returns:
        str: one line for the log.
    """
    shape = tuple(first_images(data.val).shape[1:])
    return (f"image folder: {data.num_classes} classes of {shape[0]}x{shape[1]}x{shape[2]} images; threat model "
            f"L-inf eps {cfg.eps:.4g} ({cfg.eps * 255:.3g}/255), alpha {cfg.alpha:.4g}, {cfg.steps} steps; student "
            f"{cfg.model}, teacher {cfg.teacher_model} (--eps, --alpha, --model, --teacher-model choose others)")


def _teacher(cfg, data, teacher, log):
    if teacher is None:
        return teacher_and_info(cfg, data=data, log=log)
    return load_teacher(teacher, model_name=cfg.teacher_model, num_classes=data.num_classes,
                        in_channels=data.in_channels, example=first_images(data.val),
                        dataset=cfg.dataset, cache_dir=cfg.cache_dir, device=resolve_device(cfg.device))


def train(cfg, run_dir=None, *, resume=False, teacher=None, data=None, student=None, num_classes=None, log=None,
          teacher_info=None, scalar_writer=None, accept_teacher_change=False):
    """Trains a student with ``cfg.method``, checkpointing every epoch; evaluates the kept weights on test.

    Writes to ``run_dir``: ``last.pt`` (full state, every epoch), ``best.pt`` (weights chosen on the
    validation split), ``metrics.json`` (config, every epoch's metrics and temperatures, the teacher
    used and its validation accuracy, the final test evaluation) and PNG plots.

    Args:
        cfg: TrainConfig. For data given here, set ``dataset="custom"`` (the teacher cache is then keyed by
            the data's content).
        run_dir: output folder (``None``: nothing is written and ``resume`` is impossible).
        resume: continue from ``run_dir/last.pt`` (or ``last.prev.pt``) when it exists, with the teacher file
            the run recorded.
        teacher: the teacher for distillation methods: an ``nn.Module``, a path (a fastabsld checkpoint, a
            state_dict of ``cfg.teacher_model``, a TRADES/RobustBench WideResNet state_dict) or
            ``"robustbench:<name>"`` (``None``: ``cfg.teacher_path``, else the cached or newly trained one).
        data: Splits, a ``torch.utils.data.Dataset`` (split here with ``cfg.folder_split``), a DataLoader, or
            a dict ``{"train": ..., "val": ..., "test": ...}`` of those or of (x, y) tensors (``None``:
            ``cfg.dataset``). See ``fastabsld.recipe.data`` for the contract and when data is streamed.
        student: the ``nn.Module`` to train (``None``: ``cfg.model``); trained in place.
        num_classes: classes of ``data`` when it cannot tell (a streamed Dataset without ``classes``).
        log: function printing one-line messages (default: :func:`fastabsld.recipe.logs.info`).
        teacher_info: what metrics.json records about a ``teacher`` module given here (its source, and its
            ``"val"`` report, which is then not recomputed); ``None``: described and evaluated here.
        scalar_writer: passed to :func:`fastabsld.recipe.loop.fit` (TensorBoard scalars).
        accept_teacher_change: with ``resume``, go on distilling when the teacher's weights differ from those
            the run's checkpoint was distilled from (recorded under ``"teacher_changes"``); otherwise that is a
            :class:`~fastabsld.recipe.errors.TeacherChangedError` naming both teachers' hashes.

    Returns:
        dict: ``{"config", "history", "best", "test", "model", "teacher"}`` with the trained (selected) model.
    """
    log = log or logs.info
    if student is None:
        check_model_name(cfg.model)  # a typo in a factory fails here, not after the teacher is ready
    if teacher is None and not cfg.teacher_path and cfg.method in DISTILLATION_METHODS:
        check_model_name(cfg.teacher_model, "teacher_model")
    data = prepare_data(cfg, data, num_classes=num_classes)
    if cfg.dataset == "folder":
        log(folder_settings_line(cfg, data))
    info = {}
    if student is not None:
        if not isinstance(student, nn.Module):
            raise ValueError(f"student must be an nn.Module, got {type(student).__name__}")
        info["student"] = {"source": "module", "class": f"{type(student).__module__}.{type(student).__qualname__}"}
    if cfg.method in DISTILLATION_METHODS:
        teacher_cfg = _teacher_config(cfg, run_dir, resume, log) if teacher is None else cfg
        teacher, described = _teacher(teacher_cfg, data, teacher, log)
        described = {**described, **(teacher_info or {})}
        if "val" not in described:
            described["val"] = teacher_report(teacher, data, cfg)
            log(f"teacher ({described.get('architecture')}, {described['source']}): validation clean "
                f"{described['val']['clean']['average']:.3f}, PGD-20 {described['val']['pgd20']['average']:.3f}")
        info["teacher"] = described
    result = fit(cfg, run_dir, data, teacher=teacher, resume=resume, log=log, student=student, info=info,
                 scalar_writer=scalar_writer, accept_teacher_change=accept_teacher_change)
    result.setdefault("teacher", info.get("teacher"))
    return result
