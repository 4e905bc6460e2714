"""The configuration of a training run: :class:`TrainConfig`, its defaults per data set and its checks.

A config is validated once, when it is built, so that a bad value fails before any training starts.
The command line is generated from it (``fastabsld.recipe.options``): every field is a flag of
``fastabsld train`` with the type, default, choices and the description written here.

The fields fall into three groups, which the teacher cache and ``--resume`` rely on:

- ``TEACHER_FIELDS`` define the robust teacher a distillation run trains when none is given (the
  data, the threat model and the teacher's own PGD-AT or TRADES recipe); the teacher cache is keyed by them only.
- ``RUNTIME_FIELDS`` say where and how fast a run executes, not what it computes.
- every other field is the student's recipe.
"""

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

from fastabsld.evaluation import attack_names, parse_attack
from fastabsld.methods.absld import TEMPERATURE_MODES
from fastabsld.ops.checks import check_int, check_real
from fastabsld.recipe.data import DATASETS, folder_image_side
from fastabsld.recipe.models import MODELS, is_factory
from fastabsld.temperature import check_temperature_bounds

CACHE_ENV = "FASTABSLD_CACHE"
DEFAULT_CACHE_DIR = ".fastabsld_cache"


def default_cache_dir():
    """The teacher cache folder when none is given: ``$FASTABSLD_CACHE``, or ``.fastabsld_cache`` when it is unset.

    A blank ``FASTABSLD_CACHE`` (``""``, as ``FASTABSLD_CACHE= cmd`` leaves it) counts as unset: an empty
    folder name would otherwise put teacher files into the current folder.

    Returns:
        str: the folder.
    """
    return os.environ.get(CACHE_ENV, "").strip() or DEFAULT_CACHE_DIR


METHODS = ("absld", "rslad", "pgd-at", "trades", "ard", "iad")
# The methods that distil from a robust teacher (the others train a model on its own).
DISTILLATION_METHODS = ("absld", "rslad", "ard", "iad")
# How a robust teacher that the recipe trains itself is trained.
TEACHER_METHODS = ("pgd-at", "trades")
# The hyper-parameters that only one method (or the re-weighting) reads; a run of another method ignores them.
METHOD_FIELDS = {"trades": ("trades_beta",), "ard": ("ard_temperature", "ard_alpha"),
                 "iad": ("iad_temperature", "iad_alpha", "iad_beta", "iad_warmup"),
                 "reweight": ("reweight_beta", "reweight_min", "reweight_max")}
# Released schedule: LR (and beta) times 0.1 at epochs 215, 260 and 285 of 300.
RELEASED_MILESTONES = (215 / 300, 260 / 300, 285 / 300)
# Threat model per data set: (eps, alpha). Digits pixels take 17 grey levels (steps of 1/16); eps = 0.1
# is 1.6 levels per pixel: the digit stays legible to a person, while an undefended cnn-s drops from
# 99.6% to 30% under PGD-20 (8/255 leaves it at 95%). CIFAR and other images: the standard 8/255 and 2/255.
THREAT = {"digits": (0.1, 0.025), "cifar10": (8 / 255, 2 / 255), "cifar100": (8 / 255, 2 / 255),
          "folder": (8 / 255, 2 / 255), "custom": (8 / 255, 2 / 255)}
DEFAULT_MODELS = {"digits": ("cnn-s", "cnn-l"), "cifar10": ("resnet18", "wrn-34-10"),
                  "cifar100": ("resnet18", "wrn-34-10"), "folder": ("resnet18", "wrn-34-10"),
                  "custom": ("resnet18", "wrn-34-10")}
# An image folder's defaults follow its images' side (pixels) and the device, (student, teacher, eps, alpha):
# tiny images (<= 16 px, as the 8x8 digits) take the small CNNs and the digits' eps 0.1; CIFAR-scale
# images (<= 64 px) the CIFAR recipe's 8/255 and, on a GPU, its networks; larger images RobustBench's
# ImageNet L-inf radius 4/255. On the CPU the small CNNs at every size: a WRN-34-10 teacher there takes
# hours per epoch even on 32x32 images.
FOLDER_TINY_SIDE, FOLDER_CIFAR_SIDE = 16, 64
FOLDER_THREAT = ((FOLDER_TINY_SIDE, (0.1, 0.025)), (FOLDER_CIFAR_SIDE, (8 / 255, 2 / 255)), (None, (4 / 255, 1 / 255)))
SMALL_MODELS = DEFAULT_MODELS["digits"]
SELECT_KEYS = ("average", "worst")
NONFINITE_ACTIONS = ("stop", "warn")
# One default for every entry point (train, demo, Python): the teacher cache then serves them all.
DEFAULT_TEACHER_EPOCHS = 30
# TrainConfig fields that say where a run executes or how it reports, not what it computes (free to change
# on resume, outside the teacher cache's key).
RUNTIME_FIELDS = ("device", "data_dir", "cache_dir", "progress", "channels_last", "compile", "fold_bn", "num_workers",
                  "on_nonfinite")
# Fields besides the runtime ones that a resumed run may change: how long it runs and its final test.
RESUMABLE_FIELDS = RUNTIME_FIELDS + ("epochs", "eval_every", "test_attacks")
# Fields that define the teacher a run trains (and its cache key); everything else is the student's.
TEACHER_FIELDS = ("dataset", "image_size", "folder_split", "augment", "in_memory_mb", "split_seed", "eps", "alpha",
                  "steps", "amp", "teacher_model", "teacher_epochs", "teacher_seed", "teacher_lr", "teacher_batch_size",
                  "teacher_momentum", "teacher_weight_decay", "teacher_milestones", "teacher_lr_gamma",
                  "teacher_method")
# A teacher field that counts only for one teacher method (a PGD-AT teacher does not read trades_beta).
TEACHER_METHOD_FIELDS = {"trades": ("trades_beta",)}


def folder_defaults(side, device_type):
    """The default (student, teacher, eps, alpha) of an image folder whose images are ``side`` pixels.

    Args:
        side: the images' larger side in pixels (None when unknown: CIFAR-scale is assumed).
        device_type: ``"cpu"`` or ``"cuda"``, where the run trains.

    Returns:
        tuple: (student model name, teacher model name, eps, alpha).
    """
    side = FOLDER_CIFAR_SIDE if side is None else side
    eps, alpha = next(threat for limit, threat in FOLDER_THREAT if limit is None or side <= limit)
    small = side <= FOLDER_TINY_SIDE or device_type != "cuda"
    student, teacher = SMALL_MODELS if small else DEFAULT_MODELS["folder"]
    return student, teacher, eps, alpha


def _device_type(name):
    """``"cuda"`` or ``"cpu"`` for a device name (``auto`` follows torch.cuda.is_available())."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(name).startswith("cuda") else "cpu"


def _choices(*values):
    return {"choices": tuple(values)}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in checkpoints and metrics.json).

    Attributes:
        method: the training method: ABSLD, RSLAD (ABSLD with the temperatures fixed at 1), ARD or IAD
            (distillation from a robust teacher), TRADES or PGD adversarial training (no teacher).
        dataset: ``digits`` (scikit-learn's 8x8 digits, offline), ``cifar10`` / ``cifar100`` (from
            data_dir), ``folder`` (an image folder at data_dir, see fastabsld.recipe.data) or ``custom``
            (data given in Python to ``train(data=...)``).
        data_dir: the data set's folder: CIFAR's parent folder (default ./data) or the image folder of
            ``--dataset folder``.
        image_size: resize the images of a folder data set to this many pixels square (default: keep
            their size, which must then be the same for all).
        folder_split: train/val/test fractions of a seeded stratified split, for a folder data set without
            train/val/test subfolders (and for the val/test parts such a folder lacks).
        augment: 4-pixel padded random crop and horizontal flip of training batches (default: on for CIFAR,
            off for digits and folders).
        in_memory_mb: data sets up to this size (as float32 tensors) are loaded into memory and batched
            there (fast, bit-exact resume); larger ones are streamed through a DataLoader.
        num_workers: DataLoader worker processes that read images (folder data, streamed data sets).
        model: student architecture: a registered name (cnn-s, cnn-l, resnet18, mobilenetv2, wrn-34-10) or
            ``pkg.module:factory`` (called with num_classes and in_channels) (default: the data set's,
            cnn-s on digits, resnet18 on CIFAR; for an image folder, cnn-s for images of at most 16 px or on
            the CPU, resnet18 otherwise).
        epochs: training epochs.
        batch_size: batch size; under torchrun the global batch, split evenly over the processes.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        milestones: LR milestones as fractions of epochs (released: 215, 260 and 285 of 300 epochs).
        lr_gamma: LR (and ABSLD beta) factor at each milestone.
        eps: L-inf radius of the attacks (default: 0.1 on digits, 8/255 on CIFAR; for an image folder by
            the images' side: 0.1 up to 16 px, 8/255 up to 64 px, 4/255 (RobustBench's ImageNet radius) above;
            fractions such as 8/255 are accepted). The digits images are 8x8 with 17 grey levels (steps of 1/16 = 0.0625); eps = 0.1
            moves each pixel by at most 1.6 grey levels, which keeps the digit legible to a person, yet it is
            a real threat: the cnn-s student trained without defence falls from 99.6% clean to 30% under
            PGD-20 (its worst class to 4%). 8/255, the CIFAR value, is half a grey level on digits and leaves
            that model at 95%: too little to defend against.
        alpha: PGD step size of training and evaluation (default: a quarter of the default eps: 0.025 on
            digits, 2/255 on CIFAR).
        steps: PGD steps of the inner maximisation in training (a teacher trained here too).
        beta: ABSLD temperature learning rate (decayed with the LR at the milestones).
        tau_min: lower clamp of the ABSLD class temperatures.
        tau_max: upper clamp of the ABSLD class temperatures.
        temperature_mode: ``paper`` (separate adversarial and natural temperatures) or ``released``
            (the released script's tau_adv * tau_nat aliasing, to reproduce published numbers).
        adv_weight: weight of the adversarial distillation term.
        nat_weight: weight of the natural distillation term.
        reweight: Fair-ARD's per-class re-weighting of the distillation loss (ard, iad, rslad, absld): each
            class is weighted by how few attack steps its samples stay correctly classified, updated once
            per epoch.
        reweight_beta: exponent of the inverse robust time in the Fair-ARD class weights.
        reweight_min: lower clamp of the Fair-ARD class weights (normalised to sum to the class count).
        reweight_max: upper clamp of the Fair-ARD class weights.
        trades_beta: weight of the TRADES KL term (1/lambda; 6 in the paper), for the trades method and a
            TRADES teacher.
        ard_temperature: ARD's distillation temperature.
        ard_alpha: ARD's weight of the distillation term (1 - ard_alpha weighs the clean cross-entropy).
        iad_temperature: IAD's distillation temperature of the teacher term.
        iad_alpha: IAD's weight of the distillation terms (1 - iad_alpha weighs the clean cross-entropy).
        iad_beta: IAD's exponent of the teacher's true-class probability (the trust in the teacher).
        iad_warmup: IAD's warm-up (plain ARD) as a fraction of the epochs (60 of 200 in the paper).
        eval_every: evaluate on the validation split every this many epochs (and after the last).
        val_attacks: attacks of the validation evaluation (names as in fastabsld.evaluation: clean, fgsm,
            pgd<N>, cw<N>, autoattack).
        select_metric: ``<attack>.<average|worst>`` on the validation split, choosing the kept weights.
        test_attacks: attacks of the final test evaluation.
        seed: seed of the student's initialisation, data order and attack noise.
        split_seed: seed of the train/val/test split.
        train_subset: keep only the first N training images (tests, quick runs).
        teacher_path: the teacher to distil from instead of training (or reusing the cached) one: a
            fastabsld checkpoint, a state_dict of teacher_model, a TRADES/RobustBench WideResNet state_dict,
            or ``robustbench:<model name>`` (needs the robustbench package).
        teacher_model: teacher architecture, as for model (default: cnn-l on digits, wrn-34-10 on CIFAR; for
            an image folder, cnn-l for images of at most 16 px or on the CPU, wrn-34-10 otherwise). Training a
            large teacher on the CPU is announced with an estimate of its time before it starts.
        teacher_epochs: epochs of a teacher trained here (by PGD-AT or TRADES, see teacher_method).
        teacher_seed: seed of a teacher trained here.
        teacher_lr: SGD learning rate of a teacher trained here.
        teacher_batch_size: batch size of a teacher trained here.
        teacher_momentum: SGD momentum of a teacher trained here.
        teacher_weight_decay: SGD weight decay of a teacher trained here.
        teacher_milestones: LR milestones (fractions of teacher_epochs) of a teacher trained here.
        teacher_lr_gamma: LR factor at each milestone of a teacher trained here.
        teacher_method: how a teacher trained here is trained: ``pgd-at`` or ``trades`` (with trades_beta).
        device: ``cpu``, ``cuda`` or ``auto``.
        cache_dir: folder of cached teachers (default: $FASTABSLD_CACHE when set and not blank, else
            .fastabsld_cache).
        progress: show progress bars (drawn only when standard error is a terminal).
        on_nonfinite: what a NaN or infinite training loss does: ``stop`` the run with an error (the
            last finite checkpoint stays) or ``warn`` and go on.
        sync_bn: under torchrun, normalise BatchNorm with the global batch's statistics (SyncBatchNorm,
            CUDA only; see fastabsld.recipe.distributed).
        amp: bf16 autocast around the student's and the teacher's forwards (the losses stay fp32).
        channels_last: run the models and batches in the channels_last memory format.
        compile: ``torch.compile`` the student's training forward and the attack's forward.
        fold_bn: run the inner attack on an eval-mode view of the student with every Conv2d -> BatchNorm2d
            pair folded into one convolution (the teacher likewise, in channels_last on the CPU); same
            results up to float rounding, faster.
    """

    method: str = field(default="absld", metadata=_choices(*METHODS))
    dataset: str = field(default="digits", metadata=_choices(*DATASETS))
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    folder_split: tuple[float, ...] = (0.7, 0.1, 0.2)
    augment: Optional[bool] = None
    in_memory_mb: int = 4096
    num_workers: int = 0
    model: Optional[str] = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: tuple[float, ...] = RELEASED_MILESTONES
    lr_gamma: float = 0.1
    eps: Optional[float] = None
    alpha: Optional[float] = None
    steps: int = 10
    beta: float = 0.1
    tau_min: float = 0.5
    tau_max: float = 5.0
    temperature_mode: str = field(default="paper", metadata=_choices(*TEMPERATURE_MODES))
    adv_weight: float = 5 / 6
    nat_weight: float = 1 / 6
    reweight: bool = False
    reweight_beta: float = 2.0
    reweight_min: float = 5 / 6
    reweight_max: float = 5 / 2
    trades_beta: float = 6.0
    ard_temperature: float = 30.0
    ard_alpha: float = 1.0
    iad_temperature: float = 1.0
    iad_alpha: float = 1.0
    iad_beta: float = 0.1
    iad_warmup: float = 60 / 200
    eval_every: int = 1
    val_attacks: tuple[str, ...] = ("clean", "pgd20")
    select_metric: str = "pgd20.average"
    test_attacks: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw20")
    seed: int = 0
    split_seed: int = 0
    train_subset: Optional[int] = None
    teacher_path: Optional[str] = None
    teacher_model: Optional[str] = None
    teacher_epochs: int = DEFAULT_TEACHER_EPOCHS
    teacher_seed: int = 0
    teacher_lr: float = 0.1
    teacher_batch_size: int = 128
    teacher_momentum: float = 0.9
    teacher_weight_decay: float = 2e-4
    teacher_milestones: tuple[float, ...] = RELEASED_MILESTONES
    teacher_lr_gamma: float = 0.1
    teacher_method: str = field(default="pgd-at", metadata=_choices(*TEACHER_METHODS))
    device: str = "cpu"
    cache_dir: str = field(default_factory=lambda: default_cache_dir())
    progress: bool = True
    on_nonfinite: str = field(default="stop", metadata=_choices(*NONFINITE_ACTIONS))
    sync_bn: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    fold_bn: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if typing.get_origin(field_type(f)) is tuple and isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        check_types(self)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if not self.cache_dir.strip():
            raise ValueError(f"cache_dir must name a folder, got {self.cache_dir!r} (leave it out for "
                             f"${CACHE_ENV} or {DEFAULT_CACHE_DIR})")
        for name in ("epochs", "batch_size", "eval_every", "teacher_epochs", "teacher_batch_size"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("steps", "seed", "split_seed", "teacher_seed", "in_memory_mb", "num_workers"):
            check_int(getattr(self, name), name, minimum=0)
        for name in ("train_subset", "image_size"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, minimum=1)
        student, teacher = DEFAULT_MODELS[self.dataset]
        eps, alpha = THREAT[self.dataset]
        if self.dataset == "folder" and None in (self.model, self.teacher_model, self.eps, self.alpha):
            side = self.image_size or folder_image_side(self.data_dir)
            student, teacher, eps, alpha = folder_defaults(side, _device_type(self.device))
        self.model = self.model or student
        self.teacher_model = self.teacher_model or teacher
        for name in ("model", "teacher_model"):
            value = getattr(self, name)
            if value not in MODELS and not is_factory(value):
                raise ValueError(f"{name} must be one of {sorted(MODELS)} or 'pkg.module:factory', got {value!r}")
        self.eps = eps if self.eps is None else float(self.eps)
        self.alpha = alpha if self.alpha is None else float(self.alpha)
        # Checked here, not at the first attack step or the final test: a bad value must not cost a run.
        for name in ("eps", "alpha", "beta", "momentum", "weight_decay", "adv_weight", "nat_weight",
                     "teacher_momentum", "teacher_weight_decay"):
            check_real(getattr(self, name), name, minimum=0.0)
        for name in ("lr", "lr_gamma", "teacher_lr", "teacher_lr_gamma"):
            check_real(getattr(self, name), name, minimum=0.0, strict=True)
        check_temperature_bounds(self.tau_min, self.tau_max, 1.0)
        for name in ("milestones", "teacher_milestones"):
            for value in getattr(self, name):
                check_real(value, name, minimum=0.0, maximum=1.0)
        if len(self.folder_split) != 3 or any(check_real(v, "folder_split", minimum=0.0) <= 0
                                              for v in self.folder_split) \
                or abs(sum(self.folder_split) - 1) > 1e-6:
            raise ValueError(f"folder_split must be three positive train/val/test fractions summing to 1, "
                             f"got {self.folder_split!r}")
        for name in ("val_attacks", "test_attacks"):
            try:
                setattr(self, name, attack_names(getattr(self, name)))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        self._check_method_fields()
        attack, _, key = self.select_metric.partition(".")
        try:
            attack = parse_attack(attack)[0]
        except ValueError:
            attack = None
        if attack not in self.val_attacks or key not in SELECT_KEYS:
            raise ValueError(f"select_metric must be '<one of val_attacks {self.val_attacks}>."
                             f"<{'|'.join(SELECT_KEYS)}>', got {self.select_metric!r}")
        self.select_metric = f"{attack}.{key}"

    def _check_method_fields(self):
        """The methods' hyper-parameters and the re-weighting (their types and choices are checked before)."""
        if self.reweight and self.method not in DISTILLATION_METHODS:
            raise ValueError(f"reweight re-weights a distillation loss ({', '.join(DISTILLATION_METHODS)}); "
                             f"method {self.method!r} distils from no teacher")
        for name in ("reweight_beta", "trades_beta", "iad_beta"):
            check_real(getattr(self, name), name, minimum=0.0)
        for name in ("reweight_min", "ard_temperature", "iad_temperature"):
            check_real(getattr(self, name), name, minimum=0.0, strict=True)
        check_real(self.reweight_max, "reweight_max", minimum=self.reweight_min)
        for name in ("ard_alpha", "iad_alpha", "iad_warmup"):
            check_real(getattr(self, name), name, minimum=0.0, maximum=1.0)

    def to_dict(self):
        """The config as a JSON-friendly dict.

        Returns:
            dict: field name -> value.
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values, *, source="config"):
        """A TrainConfig from a dict of field values (a saved config, a config file).

        Args:
            values: field name -> value; missing fields take their defaults.
            source: what the dict came from, for the error message.

        Returns:
            TrainConfig: the validated config.

        Raises:
            ValueError: a key that is no field of TrainConfig, or a bad value.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a table of settings, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))} (the settings are TrainConfig's fields: "
                             f"see 'fastabsld train --help')")
        return cls(**values)


@functools.cache
def _hints():
    return typing.get_type_hints(TrainConfig)


def field_type(f):
    """The annotation of a TrainConfig field with ``Optional`` removed (``int``, ``float``, ``tuple[str, ...]``...).

    Args:
        f: a ``dataclasses.Field`` of TrainConfig.

    Returns:
        type: the field's value type.
    """
    hint = _hints()[f.name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _type_ok(value, hint):
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_type_ok(v, inner) for v in value)
    return isinstance(value, hint)


def check_types(cfg):
    """Raises ValueError naming the first field whose value does not have the field's type.

    Args:
        cfg: a TrainConfig (``None`` is accepted where the field's default is ``None``).
    """
    hints = _hints()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        optional = typing.get_origin(hints[f.name]) is typing.Union
        if (value is None and optional) or _type_ok(value, field_type(f)):
            continue
        wanted = getattr(field_type(f), "__name__", str(field_type(f)))
        if typing.get_origin(field_type(f)) is tuple:
            wanted = f"a list of {typing.get_args(field_type(f))[0].__name__}"
        raise ValueError(f"{f.name} must be {wanted}{' or null' if optional else ''}, got "
                         f"{type(value).__name__} {value!r}")

