"""The README's CUDA-graph capture of the attack loop, run as written and replayed against an uncaptured attack."""

import re
from pathlib import Path

import pytest
import torch

from fastabsld.attack import kl_loss, pgd_loop
from fastabsld.loss import ABSLDLoss
from fastabsld.recipe.models import build_model

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_graph_snippet():
    """The first python block of the README's section on capturing the attack in a CUDA graph."""
    text = README.read_text()
    section = text[text.index("### Capturing the attack in a CUDA graph"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_snippet_is_found():
    snippet = readme_graph_snippet()
    assert "torch.cuda.graph" in snippet and "graph.replay()" in snippet


@pytest.mark.cuda
def test_replayed_graph_equals_the_uncaptured_attack():
    torch.manual_seed(0)
    student = build_model("resnet18", 10, 3).cuda()
    student.train()
    with torch.no_grad():
        student(torch.rand(64, 3, 32, 32, device="cuda"))  # non-trivial BatchNorm statistics
    x = torch.rand(128, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    teacher_logits = 3 * torch.randn(128, 10, device="cuda")
    loss_fn = ABSLDLoss(10).cuda()
    namespace = {"student": student, "x": x, "y": y, "teacher_logits": teacher_logits, "loss_fn": loss_fn,
                 "gen": torch.Generator(device="cuda").manual_seed(5)}
    exec(compile(readme_graph_snippet(), str(README), "exec"), namespace)
    captured = namespace["x_adv"]

    noise = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    probs = loss_fn.teacher_probs(teacher_logits, y, branch="adv")
    student.eval()
    eager = pgd_loop(namespace["view"].refresh(), x, x + 0.001 * noise, kl_loss(probs), eps=8 / 255, alpha=2 / 255,
                     steps=10)
    torch.testing.assert_close(captured, eager, rtol=0, atol=1e-6)
    assert not torch.equal(captured, x)  # the attack moved the inputs

    # A second batch through the same graph: only the static inputs change.
    x2 = torch.rand_like(x)
    namespace["static_x"].copy_(x2)
    namespace["static_noise"].zero_()
    namespace["graph"].replay()
    again = pgd_loop(namespace["view"], x2, x2.clone(), kl_loss(probs), eps=8 / 255, alpha=2 / 255, steps=10)
    torch.testing.assert_close(namespace["static_adv"], again, rtol=0, atol=1e-6)
