"""Reading a run folder's checkpoints with one clear error per problem: truncated, empty, foreign or incomplete files.

``fastabsld train --resume`` and ``fastabsld eval`` read ``last.pt`` / ``best.pt`` through
:func:`read_checkpoint` before anything runs, so a bad file is an error line naming the file and what
is wrong with it, and nothing in the run folder is touched.
"""

import os
import zipfile

from fastabsld.recipe import checkpoint
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.errors import CheckpointError
from fastabsld.recipe.models import build_model

# What each kind of checkpoint must hold.
LAST_KEYS = ("format", "config", "epoch", "model", "optimizer", "scheduler", "rng", "history", "best", "num_classes",
             "in_channels")
MODEL_KEYS = ("format", "config", "model", "num_classes", "in_channels")


def checked_config(state, required):
    """The TrainConfig of a loaded checkpoint, or what keeps it from being a usable one.

    Args:
        state: what ``torch.load`` returned.
        required: keys the checkpoint must hold.

    Returns:
        tuple: (TrainConfig, None), or (None, the problem phrased to follow the file name: "is not ...").
    """
    if not isinstance(state, dict):
        return None, f"is not a fastabsld checkpoint (it holds a {type(state).__name__})"
    missing = [key for key in required if key not in state]
    if missing:
        return None, (f"is not a complete fastabsld checkpoint: it lacks {', '.join(missing)}"
                      f"{' (a plain state_dict?)' if 'config' in missing else ''}")
    try:
        return TrainConfig.from_dict(state["config"], source="its config"), None
    except (TypeError, ValueError) as error:
        return None, f"holds an invalid config: {error}"


def read_checkpoint(path, required=MODEL_KEYS, map_location="cpu"):
    """Loads a fastabsld checkpoint (checksum verified) and checks that it holds ``required`` and a valid config.

    Args:
        path: the file.
        required: keys the checkpoint must hold.
        map_location: passed to ``torch.load``.

    Returns:
        tuple: (the checkpoint dict, its TrainConfig).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: anything else wrong with it (empty, truncated, corrupt, foreign, incomplete).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    state = checkpoint.load(path, map_location=map_location)
    cfg, problem = checked_config(state, required)
    if problem:
        raise CheckpointError(path, problem)
    return state, cfg


def load_run_model(path, device="cpu"):
    """Rebuilds the model of a ``best.pt`` / ``last.pt`` / cached-teacher checkpoint, with clear errors.

    Args:
        path: the checkpoint.
        device: where to put the model.

    Returns:
        tuple: (model in eval mode, TrainConfig of the run, the checkpoint dict).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an unreadable or incomplete file, or weights that do not fit the saved architecture.
    """
    state, cfg = read_checkpoint(path, MODEL_KEYS, map_location="cpu")
    try:
        model = build_model(cfg.model, state["num_classes"], state["in_channels"])
    except ValueError as error:
        raise CheckpointError(path, f"names a model that cannot be rebuilt: {error}") from error
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(path, f"holds weights that do not fit the model {cfg.model!r} ({first}); a run that "
                                    "trained a module given in Python is evaluated in Python") from error
    return model.to(device).eval(), cfg, state


def check_run_folder(run_dir):
    """Checks ``last.pt`` (or, when it is damaged, ``last.prev.pt``) and ``best.pt`` of a run folder before a resume.

    Args:
        run_dir: the folder.

    Returns:
        tuple: (the dict of the checkpoint the run resumes from, its TrainConfig).

    Raises:
        CheckpointError: no usable ``last.pt`` (nor previous version), or a bad ``best.pt``.
    """
    last = os.path.join(run_dir, "last.pt")
    found = checkpoint.load_latest(last, accept=lambda state: checked_config(state, LAST_KEYS)[1])
    if found is None:
        raise FileNotFoundError(f"{last}: no such file")
    best = os.path.join(run_dir, "best.pt")
    if os.path.exists(best) and not os.path.exists(checkpoint.previous_path(best)):
        read_checkpoint(best, ("format", "config", "model"))  # with a previous version, the loop falls back to it
    return found[0], TrainConfig.from_dict(found[0]["config"])


# Every file fastabsld writes into a run folder (the loop, its report and lock, compare, the demo): an output
# named by the user (eval's --json, --plot, --predictions) never replaces one.
RUN_FILES = ("last.pt", "best.pt", "last.prev.pt", "best.prev.pt", "metrics.json", "run.lock", "train.log",
             "predictions.npz", "per_class.png", "curves.png", "temperatures.png", "temperature_accuracy.png",
             "compare.json", "compare.png", "compare_eval.json", "demo.json", "per_class_robust_accuracy.png",
             "absld_temperatures.png")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _holds_weights(path):
    """Whether an existing file is a torch checkpoint (a zip holding ``data.pkl``, or a legacy pickle)."""
    try:
        with open(path, "rb") as f:
            if f.read(1) == b"\x80":  # a pickle: torch's legacy format
                return True
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return False


def check_output_path(path, option):
    """Refuses an output file that would replace a checkpoint or a file fastabsld writes in run folders.

    Args:
        path: the file the user named.
        option: the option that named it (for the message), e.g. ``"--json"``.

    Raises:
        ValueError: ``path`` is named like a run file (``RUN_FILES``) or a checkpoint (``.pt``, ``.pth``,
            ``.ckpt``), or is an existing checkpoint of any name, or a folder.
    """
    name = os.path.basename(path)
    if name in RUN_FILES or name.endswith(_CHECKPOINT_SUFFIXES):
        what = "a checkpoint" if name.endswith(_CHECKPOINT_SUFFIXES) else f"the run file {name}"
        raise ValueError(f"{option} {path}: refusing to write over {what} (fastabsld writes {name} in run folders); "
                         "choose another file name")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a folder; name a file")
    if os.path.isfile(path) and _holds_weights(path):
        raise ValueError(f"{option} {path}: refusing to write over a checkpoint; choose another file name")
