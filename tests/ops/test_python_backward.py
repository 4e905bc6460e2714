"""``fastabsld._C.attach_backward``: an autograd node whose backward is a Python callable.

Checked against what ``torch.autograd`` does for a ``torch.autograd.Function`` with the same
backward: the gradients that reach the inputs, which inputs' gradients a task asks for, hooks,
a second backward (refused unless the graph was retained), errors raised by the backward, the
state released after a backward and when the graph is dropped, and a backward that is itself
differentiated.
"""

import gc
import weakref

import pytest
import torch

from fastabsld.ops._extension import HAS_EXTENSION

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled extension")


def _attach():
    from fastabsld import _C
    return _C.attach_backward


class Scale:
    """backward(grad) = (grad * a_factor, grad * b_factor) for the needed inputs; records its calls."""

    def __init__(self, a_factor, b_factor):
        self.a_factor, self.b_factor = a_factor, b_factor
        self.calls = []

    def __call__(self, grad, first, second):
        self.calls.append((first, second))
        return (grad * self.a_factor if first else None), (grad * self.b_factor if second else None)


def _output(a, b):
    """A 0-d output computed outside autograd, as the eager loss's is."""
    with torch.no_grad():
        return (a * b).sum()


def test_gradients_reach_the_inputs_that_require_them():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4)
    out = _output(a, b)
    backward = Scale(b, a)
    _attach()(out, a, b, backward, "TestBackward")
    assert out.requires_grad and out.grad_fn.name() == "TestBackward"
    (grad,) = torch.autograd.grad(out, a, torch.tensor(2.0))
    torch.testing.assert_close(grad, 2 * b)
    assert backward.calls == [(True, False)]


def test_the_task_says_which_gradients_it_needs():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = _output(a, b)
    backward = Scale(b, a)
    _attach()(out, a, b, backward, "TestBackward")
    (grad,) = torch.autograd.grad(out, b, retain_graph=True)
    torch.testing.assert_close(grad, a.detach())
    out.backward()
    torch.testing.assert_close(a.grad, b.detach())
    torch.testing.assert_close(b.grad, a.detach())
    assert backward.calls == [(False, True), (True, True)]


def test_a_second_backward_needs_retain_graph_and_the_state_is_released():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    out = _output(a, b)
    backward = Scale(b, a)
    alive = weakref.ref(backward)
    _attach()(out, a, b, backward, "TestBackward")
    del backward
    torch.autograd.grad(out, a, retain_graph=True)
    assert alive() is not None
    torch.autograd.grad(out, a)
    assert alive() is None  # released after a backward without retain_graph
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, a)


def test_the_state_is_freed_with_the_graph():
    a = torch.randn(3, requires_grad=True)
    out = _output(a, a)
    backward = Scale(a, a)
    alive = weakref.ref(backward)
    _attach()(out, a, a.detach(), backward, "TestBackward")
    del backward
    assert alive() is not None
    del out
    gc.collect()
    assert alive() is None


def test_errors_of_the_backward_reach_the_caller():
    a = torch.randn(3, requires_grad=True)

    def failing(grad, first, second):
        raise KeyError("from the backward")

    out = _output(a, a)
    _attach()(out, a, a.detach(), failing, "TestBackward")
    with pytest.raises(KeyError, match="from the backward"):
        out.backward()

    out = _output(a, a)
    _attach()(out, a, a.detach(), lambda grad, first, second: grad, "TestBackward")
    with pytest.raises(RuntimeError, match="tuple of two gradients"):
        out.backward()

    out = _output(a, a)
    _attach()(out, a, a.detach(), lambda grad, first, second: (1.0, None), "TestBackward")
    with pytest.raises(RuntimeError, match="not a tensor or None"):
        out.backward()


def test_a_wrong_gradient_shape_is_caught_by_autograd():
    a = torch.randn(3, requires_grad=True)
    out = _output(a, a)
    _attach()(out, a, a.detach(), lambda grad, first, second: (torch.ones(4), None), "TestBackward")
    with pytest.raises(RuntimeError, match="invalid gradient"):
        out.backward()


def test_bad_arguments_are_refused():
    a = torch.randn(3, requires_grad=True)
    out = _output(a, a)
    with pytest.raises(TypeError, match="must be tensors"):
        _attach()(out, a, 1.0, Scale(1, 1), "TestBackward")
    with pytest.raises(TypeError, match="callable"):
        _attach()(out, a, a, None, "TestBackward")
    with pytest.raises(RuntimeError, match="already has autograd history"):
        _attach()(a * 2, a, a, Scale(1, 1), "TestBackward")


def test_hooks_and_higher_order_derivatives():
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = _output(a, a)  # sum(a^2), computed without a graph

    def backward(grad, first, second):
        return grad * 2 * a, None  # differentiable in a when grad is enabled

    _attach()(out, a, a.detach(), backward, "TestBackward")
    seen = []
    out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_outputs[0].item()))
    (grad,) = torch.autograd.grad(out, a, torch.tensor(3.0, dtype=torch.float64), create_graph=True)
    assert seen == [3.0]
    torch.testing.assert_close(grad, 6 * a.detach())
    (second,) = torch.autograd.grad(grad.sum(), a)
    torch.testing.assert_close(second, torch.full_like(a, 6.0))
