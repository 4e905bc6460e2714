"""The README's examples run as written: the fused KD loss against the reference, the own loop on tiny digits models."""

import math
import re
from pathlib import Path

import pytest
import torch

from fastabsld.recipe.data import TensorLoader, load_digits
from fastabsld.recipe.models import build_model

README = Path(__file__).resolve().parent.parent / "README.md"


def section_code(heading):
    """The first ```python block after a ``## heading`` of the README."""
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match and match.start() < text.find("\n## ", start + 1), f"no python block under '{heading}'"
    return match.group(1)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and a shared machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_own_training_loop_snippet_runs(one_thread):
    code = section_code("ABSLD in your own training loop")
    assert len(code.strip().splitlines()) <= 40
    torch.manual_seed(0)
    data = load_digits(0)
    student, teacher = build_model("cnn-s", 10, 1), build_model("cnn-l", 10, 1)
    x, y = data.train
    loader = TensorLoader(x[:96], y[:96], 32, shuffle=True)
    epochs, batches = 4, len(loader)
    namespace = {"student": student, "teacher": teacher, "train_loader": loader, "num_classes": 10, "epochs": epochs}
    exec(compile(code, str(README), "exec"), namespace)

    loss_fn, loss = namespace["loss_fn"], namespace["loss"]
    assert math.isfinite(loss.item()) and loss.item() > 0
    # The temperatures moved away from 1 once per epoch, inside their clamp.
    for tau in (loss_fn.tau_adv, loss_fn.tau_nat):
        assert not torch.allclose(tau, torch.ones(10)) and bool(((tau >= 0.5) & (tau <= 5.0)).all())
    # Milestones int(f * 4) = 2, 3, 3: the LR and beta drop x0.1 at epoch 2 and x0.01 at epoch 3.
    assert namespace["milestones"] == [2, 3, 3]
    assert namespace["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1 * 1e-3, rel=1e-9)
    assert loss_fn.beta == pytest.approx(0.1 * 1e-3, rel=1e-9)
    # Only the two training forwards per batch touched BatchNorm: the attack ran the student in eval mode.
    tracked = [m.num_batches_tracked.item() for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert set(tracked) == {2 * batches * epochs}
    assert not any(m.training for m in teacher.modules()) and student.training


def test_fused_kd_loss_snippet_runs_and_matches_the_reference():
    from fastabsld import reference

    namespace = {}
    exec(compile(section_code("The fused KD loss"), str(README), "exec"), namespace)
    s, t, labels = namespace["student_logits"], namespace["teacher_logits"], namespace["labels"]
    rows = reference.kd_kl_div(s.detach().double(), t.double(), labels, 1.0, 1.0, "none", -100)
    weights = namespace["class_weight"][labels].double() * namespace["row_weight"].double()
    expected = (rows * weights).sum() / len(labels)  # batchmean: the weighted sum over the rows, not the weights
    assert namespace["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert s.grad is not None and s.grad.shape == s.shape
    assert isinstance(namespace["criterion"], torch.nn.Module)


def section_blocks(heading):
    """Every ```python block of a ``## heading`` section of the README, in order."""
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.compile(r"```python\n(.*?)```", re.S).findall(text[start:end if end > 0 else None])


def test_robust_teacher_snippet_trains_a_robust_frozen_teacher(one_thread):
    from fastabsld.attack import ce_loss, pgd

    code = next(block for block in section_blocks("ABSLD in your own training loop") if "ce_loss(y)" in block)
    torch.manual_seed(0)
    data = load_digits(0)
    x, y = data.train
    x, y = x[:256], y[:256]
    teacher = build_model("cnn-l", 10, 1)
    namespace = {"teacher": teacher, "train_loader": TensorLoader(x, y, 32, shuffle=True), "epochs": 4}
    exec(compile(code, str(README), "exec"), namespace)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        clean = (teacher(x).argmax(1) == y).float().mean().item()
    x_adv = pgd(teacher, x, ce_loss(y), eps=8 / 255, alpha=2 / 255, steps=10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        robust = (teacher(x_adv).argmax(1) == y).float().mean().item()
    assert robust > 0.5 and clean >= robust  # chance is 0.1


def test_the_loops_facts_hold():
    import inspect

    from fastabsld import ABSLDLoss
    from fastabsld.evaluation import ATTACKS, evaluate

    assert set(ABSLDLoss(10).state_dict()) == {"tau_adv", "tau_nat", "risk_adv", "risk_nat", "_extra_state"}
    defaults = inspect.signature(evaluate).parameters
    assert defaults["eps"].default == 8 / 255 and defaults["alpha"].default == 2 / 255
    assert defaults["attacks"].default == ATTACKS == ("clean", "fgsm", "pgd20", "cw20", "autoattack")
    assert "tensorboard --logdir" in README.read_text()
    from fastabsld.recipe.cli import build_parser

    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "TensorBoard" in train_help and "--log-file" in train_help
