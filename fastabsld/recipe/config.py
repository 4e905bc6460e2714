"""The configuration of a training run: :class:`TrainConfig`, its defaults per data set and its checks.

A config is validated once, when it is built, so that a bad value fails before any training starts.
"""

import dataclasses
import os
from dataclasses import dataclass, field

from fastabsld.methods.absld import TEMPERATURE_MODES
from fastabsld.evaluation import ATTACKS
from fastabsld.ops.checks import check_real

METHODS = ("absld", "rslad", "pgd-at")
# Released schedule: LR (and beta) times 0.1 at epochs 215, 260 and 285 of 300.
RELEASED_MILESTONES = (215 / 300, 260 / 300, 285 / 300)
# Threat model per data set: (eps, alpha). Digits pixels take 17 grey levels (steps of 1/16); eps = 0.1
# is 1.6 levels per pixel: the digit stays legible to a person, while an undefended cnn-s drops from
# 99.6% to 30% under PGD-20 (8/255 leaves it at 95%). CIFAR: the standard 8/255 and 2/255.
THREAT = {"digits": (0.1, 0.025), "cifar10": (8 / 255, 2 / 255), "cifar100": (8 / 255, 2 / 255)}
DEFAULT_MODELS = {"digits": ("cnn-s", "cnn-l"), "cifar10": ("resnet18", "wrn-34-10"),
                  "cifar100": ("resnet18", "wrn-34-10")}
SELECT_KEYS = ("average", "worst")
NONFINITE_ACTIONS = ("stop", "warn")
# TrainConfig fields that say where a run executes or how it reports, not what it computes (free to change
# on resume, outside the teacher cache's key).
RUNTIME_FIELDS = ("device", "data_dir", "cache_dir", "progress", "channels_last", "compile", "fold_bn",
                  "on_nonfinite")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in checkpoints and metrics.json).

    Attributes:
        method: ``"absld"``, ``"rslad"`` or ``"pgd-at"``.
        dataset: ``"digits"``, ``"cifar10"`` or ``"cifar100"``.
        model: student architecture (``None``: the data set's default, see ``DEFAULT_MODELS``).
        teacher_model: teacher architecture for distillation (``None``: the default).
        epochs: training epochs.
        batch_size: batch size; under torchrun the global batch, split evenly over the processes.
        lr, momentum, weight_decay: SGD settings.
        milestones: LR milestones as fractions of ``epochs`` (released: 215/260/285 of 300).
        lr_gamma: LR (and beta) factor at each milestone.
        eps, alpha, steps: L-inf threat model of the inner maximisation (``None``: data set default).
        beta, tau_min, tau_max, temperature_mode: ABSLD temperature settings (see ABSLDLoss).
        adv_weight, nat_weight: weights of the adversarial and natural distillation terms.
        eval_every: evaluate on the validation split every this many epochs (and after the last).
        val_attacks: attacks of the validation evaluation.
        select_metric: ``"<attack>.<average|worst>"`` on the validation split, choosing
            the kept weights.
        test_attacks: attacks of the final test evaluation.
        seed: seed of initialisation, data order and attack noise.
        split_seed: seed of the train/val/test split.
        train_subset: keep only the first N training images (tests, quick runs).
        teacher_epochs, teacher_seed: PGD-AT training of the teacher when it is not cached.
        teacher_path: a teacher checkpoint to use instead of training/caching one.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        data_dir: CIFAR folder.
        cache_dir: folder of cached teachers.
        progress: show progress bars (drawn only when standard error is a terminal).
        on_nonfinite: what a NaN or infinite training loss does: ``"stop"`` the run with an error (the
            last finite checkpoint stays) or ``"warn"`` and go on.
        sync_bn: under torchrun, normalise BatchNorm with the global batch's statistics (SyncBatchNorm,
            CUDA only; see fastabsld.recipe.distributed).
        amp: bf16 autocast around the student's and the teacher's forwards (the losses stay fp32).
        channels_last: run the models and batches in the channels_last memory format.
        compile: ``torch.compile`` the student's training forward and the attack's forward.
        fold_bn: run the inner attack on an eval-mode view of the student with every Conv2d ->
            BatchNorm2d pair folded into one convolution (the teacher likewise, in channels_last on
            the CPU); same results up to float rounding, faster.
    """

    method: str = "absld"
    dataset: str = "digits"
    model: str = None
    teacher_model: str = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: tuple = RELEASED_MILESTONES
    lr_gamma: float = 0.1
    eps: float = None
    alpha: float = None
    steps: int = 10
    beta: float = 0.1
    tau_min: float = 0.5
    tau_max: float = 5.0
    temperature_mode: str = "paper"
    adv_weight: float = 5 / 6
    nat_weight: float = 1 / 6
    eval_every: int = 1
    val_attacks: tuple = ("clean", "pgd20")
    select_metric: str = "pgd20.average"
    test_attacks: tuple = ("clean", "fgsm", "pgd20", "cw")
    seed: int = 0
    split_seed: int = 0
    train_subset: int = None
    teacher_epochs: int = 40
    teacher_seed: int = 0
    teacher_path: str = None
    device: str = "cpu"
    data_dir: str = None
    cache_dir: str = field(default_factory=lambda: os.environ.get("FASTABSLD_CACHE", ".fastabsld_cache"))
    progress: bool = True
    on_nonfinite: str = "stop"
    sync_bn: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    fold_bn: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dataset not in THREAT:
            raise ValueError(f"dataset must be one of {tuple(THREAT)}, got {self.dataset!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.steps < 0:
            raise ValueError(f"epochs and batch_size must be >= 1 and steps >= 0, got {self.epochs}, "
                             f"{self.batch_size}, {self.steps}")
        student, teacher = DEFAULT_MODELS[self.dataset]
        self.model = self.model or student
        self.teacher_model = self.teacher_model or teacher
        eps, alpha = THREAT[self.dataset]
        self.eps = eps if self.eps is None else float(self.eps)
        self.alpha = alpha if self.alpha is None else float(self.alpha)
        self.milestones = tuple(self.milestones)
        self.val_attacks = tuple(self.val_attacks)
        self.test_attacks = tuple(self.test_attacks)
        # Checked here, not at the first attack step or the final test: a bad value must not cost a run.
        for name in ("eps", "alpha", "beta"):
            check_real(getattr(self, name), name, minimum=0.0)
        check_real(self.lr, "lr", minimum=0.0, strict=True)
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {self.on_nonfinite!r}")
        if self.temperature_mode not in TEMPERATURE_MODES:
            raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {self.temperature_mode!r}")
        for name in ("val_attacks", "test_attacks"):
            attacks = getattr(self, name)
            if not attacks or not set(attacks) <= set(ATTACKS):
                raise ValueError(f"{name} must be a non-empty selection of {ATTACKS}, got {attacks!r}")
        attack, _, key = self.select_metric.partition(".")
        if attack not in self.val_attacks or key not in SELECT_KEYS:
            raise ValueError(f"select_metric must be '<one of val_attacks {self.val_attacks}>."
                             f"<{'|'.join(SELECT_KEYS)}>', "
                             f"got {self.select_metric!r}")

    def to_dict(self):
        """The config as a JSON-friendly dict.

        Returns:
            dict: field name -> value.
        """
        return dataclasses.asdict(self)
