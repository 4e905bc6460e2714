"""``train``: one training run of the recipe from its config: the data, the teacher when needed, the loop.

The recipe's methods are ``absld``, ``rslad`` and ``pgd-at`` (see ``fastabsld.recipe.steps``); the loop,
checkpoints and resume are ``fastabsld.recipe.loop``'s, the teacher and its cache
``fastabsld.recipe.teacher``'s.
"""

from fastabsld.recipe.data import load_dataset
from fastabsld.recipe.loop import fit
from fastabsld.recipe.teacher import get_teacher


def train(cfg, run_dir=None, *, resume=False, teacher=None, data=None, log=print):
    """Trains a student with ``cfg.method``, checkpointing every epoch; evaluates the kept weights on test.

    Writes to ``run_dir``: ``last.pt`` (full state, every epoch), ``best.pt`` (weights chosen on the
    validation split), ``metrics.json`` (config, every epoch's metrics and temperatures, the final
    test evaluation) and PNG plots.

    Args:
        cfg: TrainConfig.
        run_dir: output folder (``None``: nothing is written and ``resume`` is impossible).
        resume: continue from ``run_dir/last.pt`` when it exists.
        teacher: the frozen teacher for distillation methods (``None``: ``teacher.get_teacher``).
        data: preloaded Splits (``None``: loaded from ``cfg``).
        log: function printing one-line messages.

    Returns:
        dict: ``{"config", "history", "best", "test", "model"}`` with the trained (selected) model.
    """
    data = data if data is not None else load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.split_seed)
    if cfg.method != "pgd-at" and teacher is None:
        teacher = get_teacher(cfg, data=data, log=log)
    return fit(cfg, run_dir, data, teacher=teacher, resume=resume, log=log)
