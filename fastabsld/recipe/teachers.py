"""Teachers from elsewhere: fastabsld checkpoints, plain state_dicts, the TRADES / RobustBench WideResNet, RobustBench.

:func:`load_teacher` accepts

- a fastabsld checkpoint (``best.pt``, ``last.pt``, a cached teacher): its own architecture is rebuilt;
- a plain ``state_dict`` of a named architecture (``--teacher-model``), also wrapped as
  ``{"state_dict": ...}`` (or ``"model"``, ``"model_state_dict"``, ``"net"``) and with the
  ``module.`` prefix of ``DataParallel``;
- the state_dict of the TRADES / RobustBench WideResNet (the teacher of the ABSLD and RSLAD papers,
  RobustBench's ``Zhang2019Theoretically``), recognised by its key layout and converted to the bundled
  :class:`fastabsld.recipe.models.WideResNet`, which computes the same function;
- ``robustbench:<model name>``: RobustBench's loader (``pip install robustbench``; it downloads the
  weights once), converted the same way when the layout is the TRADES one, else used as it is;
- an ``nn.Module`` (in Python).

Files are read with ``torch.load(weights_only=True)``: they hold tensors and plain containers (and, in a
run's ``last.pt``, numpy's RNG state), never code. A pickled ``nn.Module`` is refused with a message
saying to save its ``state_dict``. A file that carries fastabsld's checksum trailer (its checkpoints,
cached teachers) is verified first: a flipped byte is a
:class:`~fastabsld.recipe.errors.CheckpointError` naming the file, never a silently different teacher;
a file from elsewhere carries none and is identified by its SHA-256 in metrics.json. Every other
failure is a :class:`TeacherError` naming the file and what was wrong.
"""

import hashlib
import os
import re

import torch
from torch import nn

from fastabsld.recipe import checkpoint
from fastabsld.recipe.config import TrainConfig, default_cache_dir
from fastabsld.recipe.models import WideResNet, build_model

# Keys under which training scripts commonly nest a state_dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
ROBUSTBENCH_PREFIX = "robustbench:"
_TRADES_BLOCK = re.compile(r"^block([123])\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(.+)$")


class TeacherError(ValueError):
    """A teacher that cannot be used; the message names the source and what was wrong."""


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj):
    """The state_dict inside a saved object: itself, or under ``WRAPPER_KEYS``, without a ``module.`` prefix.

    Args:
        obj: what ``torch.load`` returned.

    Returns:
        dict or None: name -> tensor, or None when no state_dict is found.
    """
    for _ in range(3):  # {"state_dict": {"model": {...}}} and the like
        if _is_state_dict(obj):
            break
        if not isinstance(obj, dict):
            return None
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            return None
        obj = inner
    if not _is_state_dict(obj):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def is_trades_wideresnet(state):
    """Whether a state_dict has the TRADES / RobustBench WideResNet layout (``conv1``, ``block1.layer.N...``, ``fc``).

    Args:
        state: name -> tensor.

    Returns:
        bool: True for that layout.
    """
    return "conv1.weight" in state and "fc.weight" in state and any(_TRADES_BLOCK.match(k) for k in state)


def convert_trades_wideresnet(state):
    """Converts a TRADES / RobustBench WideResNet state_dict to the bundled :class:`WideResNet`'s names.

    ``conv1`` -> ``stem``; ``block<s>.layer.<i>.{bn1, conv1, bn2, conv2, convShortcut}`` ->
    ``blocks.<(s - 1) * n + i>.{bn1, conv1, bn2, conv2, shortcut}`` (n blocks per stage); ``bn1`` -> ``bn``;
    ``fc`` -> ``head``. The ``sub_block1`` that TRADES builds but never calls is dropped.

    Args:
        state: the TRADES-layout state_dict (without a ``module.`` prefix).

    Returns:
        tuple: (converted state_dict, dict of ``depth``, ``width``, ``num_classes``, ``in_channels``).

    Raises:
        TeacherError: keys outside the layout, or inconsistent stages.
    """
    per_stage = {}
    for key in state:
        match = _TRADES_BLOCK.match(key)
        if match:
            per_stage.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if sorted(per_stage) != [1, 2, 3] or len({len(v) for v in per_stage.values()}) != 1 \
            or any(v != set(range(len(v))) for v in per_stage.values()):
        raise TeacherError(f"the WideResNet stages block1/block2/block3 must hold equally many blocks 0..n-1, got "
                           f"{ {k: sorted(v) for k, v in sorted(per_stage.items())} }")
    n = len(per_stage[1])
    converted, unknown = {}, []
    for key, value in state.items():
        match = _TRADES_BLOCK.match(key)
        if match:
            stage, index, layer, rest = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
            layer = "shortcut" if layer == "convShortcut" else layer
            converted[f"blocks.{(stage - 1) * n + index}.{layer}.{rest}"] = value
        elif key.startswith("sub_block1."):
            continue
        elif key.startswith("conv1."):
            converted["stem." + key[len("conv1."):]] = value
        elif key.startswith("bn1."):
            converted["bn." + key[len("bn1."):]] = value
        elif key.startswith("fc."):
            converted["head." + key[len("fc."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise TeacherError(f"keys outside the TRADES WideResNet layout: {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''}")
    first = state["block1.layer.0.conv1.weight"]
    if first.shape[0] % 16:
        raise TeacherError(f"block1's width {first.shape[0]} is not a multiple of 16")
    shape = {"depth": 6 * n + 4, "width": first.shape[0] // 16, "num_classes": state["fc.weight"].shape[0],
             "in_channels": state["conv1.weight"].shape[1]}
    return converted, shape


def _describe_mismatch(model, state):
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''} ({len(items)})")
    return "; ".join(parts)


def load_state(model, state, what):
    """Loads ``state`` into ``model`` strictly, or raises a TeacherError that lists what does not fit.

    Args:
        model: the freshly built architecture.
        state: name -> tensor.
        what: how to name the source and architecture in the message.

    Returns:
        nn.Module: ``model``.
    """
    problem = _describe_mismatch(model, state)
    if problem:
        raise TeacherError(f"{what}: the weights do not fit the architecture ({problem})")
    model.load_state_dict(state)
    return model


def _checkpoint_globals():
    """What a fastabsld ``last.pt`` holds besides tensors and plain containers: numpy's RNG state (an array)."""
    import numpy as np

    return [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]


def _read(path):
    """``torch.load(path, weights_only=True)`` after checking the checksum trailer when the file carries one.

    Returns:
        tuple: (what the file holds, True when a checksum trailer was verified / False for a file without one).

    Raises:
        CheckpointError: a file whose trailer does not match its content (a flipped byte, a truncated copy).
        TeacherError: any other unusable file, naming it.
    """
    if os.path.isdir(path):
        raise TeacherError(f"teacher {path} is a folder, not a weights file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher {path}: no such file")
    if os.path.getsize(path) == 0:
        raise TeacherError(f"teacher {path} is empty")
    verified = checkpoint.verify(path)
    try:
        # numpy's RNG state is allowed too, so that a run's own last.pt serves as a teacher.
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True), verified
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ValueError... for bad files
        text = str(error)
        if "Unsupported global" in text or "GLOBAL" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            raise TeacherError(f"teacher {path} holds a pickled object ({found.group(1) if found else 'code'}), "
                               "not weights: save model.state_dict() instead, or pass the module itself as "
                               "train(teacher=module) in Python") from error
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise TeacherError(f"teacher {path} is not a PyTorch weights file ({type(error).__name__}: {first})") \
            from error


def file_digest(path):
    """The first 16 hex digits of a file's SHA-256 (identifies a teacher in metrics.json).

    Args:
        path: the file.

    Returns:
        str: the digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def weights_digest(model):
    """The first 16 hex digits of a SHA-256 over a model's state_dict: names, dtypes, shapes and values.

    It identifies the teacher's weights whatever they came from (a file in any layout, the cache,
    RobustBench, a module), so that a resumed run can tell whether it distils from the same teacher.

    Args:
        model: an ``nn.Module``.

    Returns:
        str: the digest.
    """
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


def _from_loaded(obj, where, *, model_name, num_classes, in_channels):
    """(module, info) from what a file or RobustBench gave."""
    if isinstance(obj, dict) and {"config", "model"} <= set(obj) and isinstance(obj["config"], dict):
        try:
            cfg = TrainConfig.from_dict(obj["config"], source=f"{where}'s config")
        except (TypeError, ValueError) as error:
            raise TeacherError(f"teacher {where}: its saved config is not valid ({error})") from error
        state = unwrap_state_dict(obj["model"])
        if state is None:
            raise TeacherError(f"teacher {where}: its 'model' entry holds no weights")
        classes, channels = obj.get("num_classes", num_classes), obj.get("in_channels", in_channels)
        model = load_state(build_model(cfg.model, classes, channels), state, f"teacher {where} ({cfg.model})")
        return model, {"format": "fastabsld", "architecture": cfg.model}
    state = unwrap_state_dict(obj)
    if state is None:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else None
        raise TeacherError(f"teacher {where} holds no state_dict (found {type(obj).__name__}"
                           f"{f' with keys {keys}' if keys is not None else ''}; expected name -> tensor, possibly "
                           f"under {'/'.join(WRAPPER_KEYS)})")
    if is_trades_wideresnet(state):
        converted, shape = convert_trades_wideresnet(state)
        model = WideResNet(shape["num_classes"], shape["in_channels"], shape["depth"], shape["width"])
        arch = f"wrn-{shape['depth']}-{shape['width']}"
        return load_state(model, converted, f"teacher {where} (TRADES layout, {arch})"), \
            {"format": "trades-wideresnet", "architecture": arch}
    if model_name is None:
        raise TeacherError(f"teacher {where} is a plain state_dict: name its architecture (--teacher-model)")
    model = load_state(build_model(model_name, num_classes, in_channels), state, f"teacher {where} ({model_name})")
    return model, {"format": "state_dict", "architecture": model_name}


def _robustbench_missing(error):
    """Whether an import failure means that robustbench itself is not installed (not that it failed to import)."""
    missing = getattr(error, "name", None)
    return isinstance(error, ModuleNotFoundError) and (missing is None or missing == "robustbench"
                                                       or missing.startswith("robustbench."))


def _robustbench(name, dataset, cache_dir):
    try:
        from robustbench.utils import load_model
    except Exception as error:  # an installed package may fail with anything: a missing dependency, a version clash
        if _robustbench_missing(error):
            raise ImportError(f"teacher {ROBUSTBENCH_PREFIX}{name} needs the robustbench package: `pip install "
                              "git+https://github.com/RobustBench/robustbench` (it downloads the weights once), or "
                              "download the weights yourself and pass the file") from error
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ImportError(f"teacher {ROBUSTBENCH_PREFIX}{name}: the robustbench package is installed but fails to "
                          f"import ({type(error).__name__}: {first}); repair its installation (`python -c 'import "
                          "robustbench.utils'` shows the whole error), or download the weights and pass the file") \
            from error
    if dataset not in ("cifar10", "cifar100"):
        raise TeacherError(f"teacher {ROBUSTBENCH_PREFIX}{name}: RobustBench models are for cifar10/cifar100 here, "
                           f"the data set is {dataset!r}")
    model_dir = os.path.join(cache_dir or default_cache_dir(), "robustbench")
    try:
        return load_model(model_name=name, dataset=dataset, threat_model="Linf", model_dir=model_dir)
    except Exception as error:  # an unknown name, a failed download...
        raise TeacherError(f"teacher {ROBUSTBENCH_PREFIX}{name}: RobustBench could not load it "
                           f"({type(error).__name__}: {error})") from error


def check_outputs(model, example, num_classes, where):
    """Runs the teacher on example images and checks that it returns (B, num_classes) finite logits.

    Args:
        model: the teacher (eval mode).
        example: (B, C, H, W) images of the data set.
        num_classes: classes of the data set.
        where: how to name the teacher in the message.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            logits = model(example.to(device))
    except Exception as error:  # a wrong input shape surfaces as any of several torch errors
        raise TeacherError(f"teacher {where} fails on the data's images {tuple(example.shape[1:])} "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(logits, torch.Tensor) or logits.shape != (example.shape[0], num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TeacherError(f"teacher {where} returns {shape} for {example.shape[0]} images; the data set has "
                           f"{num_classes} classes")


def load_teacher(source, *, model_name=None, num_classes, in_channels, example=None, dataset=None, cache_dir=None,
                 device="cpu"):
    """A frozen teacher in eval mode from a file, a RobustBench name or a module (see the module docstring).

    Args:
        source: a path, ``"robustbench:<name>"``, or an ``nn.Module``.
        model_name: architecture of a plain state_dict (``--teacher-model``).
        num_classes: classes of the data set.
        in_channels: input channels of the data set.
        example: a few images of the data set, to check the teacher's outputs (None: not checked).
        dataset: the data set's name (RobustBench needs it).
        cache_dir: where RobustBench keeps downloaded weights (``<cache_dir>/robustbench``; None: the default
            teacher cache).
        device: where to put the teacher.

    Returns:
        tuple: (teacher: eval mode, no gradients, on ``device``; info dict for metrics.json: ``source``,
        ``format``, ``architecture``, ``weights_sha256`` (:func:`weights_digest`) and, for files, ``path``,
        ``sha256`` (of the file) and ``checksum_verified`` (the file carried fastabsld's checksum trailer)).

    Raises:
        CheckpointError: a file carrying fastabsld's checksum trailer that does not match its content.
        TeacherError: a file or module that cannot serve as the teacher, naming it and why.
        FileNotFoundError: no such file.
        ImportError: ``robustbench:`` without the package, or with one that fails to import (saying what failed).
    """
    if isinstance(source, nn.Module):
        model, info = source, {"source": "module", "format": "module", "architecture": type(source).__name__}
        where = f"module {type(source).__name__}"
    elif isinstance(source, str) and source.startswith(ROBUSTBENCH_PREFIX):
        name = source[len(ROBUSTBENCH_PREFIX):]
        loaded = _robustbench(name, dataset, cache_dir)
        state = unwrap_state_dict(loaded.state_dict())
        if state is not None and is_trades_wideresnet(state):
            model, info = _from_loaded(state, source, model_name=None, num_classes=num_classes,
                                       in_channels=in_channels)
        else:
            model, info = loaded, {"format": "robustbench", "architecture": type(loaded).__name__}
        info = {"source": "robustbench", "name": name, **info}
        where = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        loaded, verified = _read(path)
        model, info = _from_loaded(loaded, path, model_name=model_name, num_classes=num_classes,
                                   in_channels=in_channels)
        info = {"source": "file", "path": os.path.abspath(path), "sha256": file_digest(path),
                "checksum_verified": verified, **info}
        where = path
    else:
        raise TeacherError(f"teacher must be a path, '{ROBUSTBENCH_PREFIX}<name>' or an nn.Module, got "
                           f"{type(source).__name__}")
    info["weights_sha256"] = weights_digest(model)
    model = model.to(device).eval().requires_grad_(False)
    if example is not None:
        check_outputs(model, example, num_classes, where)
    return model, info
