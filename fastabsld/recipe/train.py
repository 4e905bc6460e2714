"""``train``: one training run of the recipe from its config: the data, the teacher when needed, the loop.

The recipe's methods are ``absld``, ``rslad`` and ``pgd-at`` (see ``fastabsld.recipe.steps``); the loop,
checkpoints and resume are ``fastabsld.recipe.loop``'s, the teacher and its cache
``fastabsld.recipe.teacher``'s. A run records where its teacher came from (an absolute path), and a
resumed run takes that teacher again, whichever working directory or cache folder it resumes from.
"""

import dataclasses
import json
import os

from fastabsld.recipe import distributed, logs
from fastabsld.recipe.data import load_dataset
from fastabsld.recipe.loop import fit
from fastabsld.recipe.report import METRICS_FILE
from fastabsld.recipe.teacher import get_teacher, teacher_source


def recorded_teacher(run_dir):
    """The teacher file that a run in ``run_dir`` recorded in its metrics.json, or None.

    Args:
        run_dir: the run folder.

    Returns:
        str or None: the recorded path.
    """
    try:
        with open(os.path.join(run_dir, METRICS_FILE)) as f:
            recorded = json.load(f).get("teacher")
    except (OSError, ValueError, AttributeError):
        return None
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


def train(cfg, run_dir=None, *, resume=False, teacher=None, data=None, log=None, scalar_writer=None):
    """Trains a student with ``cfg.method``, checkpointing every epoch; evaluates the kept weights on test.

    Writes to ``run_dir``: ``last.pt`` (full state, every epoch), ``best.pt`` (weights chosen on the
    validation split), ``metrics.json`` (config, every epoch's metrics and temperatures, the final
    test evaluation) and PNG plots.

    Args:
        cfg: TrainConfig.
        run_dir: output folder (``None``: nothing is written and ``resume`` is impossible).
        resume: continue from ``run_dir/last.pt`` when it exists (with the teacher the run recorded).
        teacher: the frozen teacher for distillation methods (``None``: ``teacher.get_teacher``).
        data: preloaded Splits (``None``: loaded from ``cfg``).
        log: function printing one-line messages (default: :func:`fastabsld.recipe.logs.info`).
        scalar_writer: passed to :func:`fastabsld.recipe.loop.fit` (TensorBoard scalars).

    Returns:
        dict: ``{"config", "history", "best", "test", "model"}`` with the trained (selected) model.
    """
    log = log or logs.info
    data = data if data is not None else load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.split_seed)
    source = None
    if cfg.method != "pgd-at" and teacher is None:
        teacher_cfg = _teacher_config(cfg, run_dir, resume, log)
        teacher = get_teacher(teacher_cfg, data=data, log=log)
        source = teacher_source(teacher_cfg)
    return fit(cfg, run_dir, data, teacher=teacher, resume=resume, log=log, teacher_source=source,
               scalar_writer=scalar_writer)
