// fastabsld._C.attach_backward: an autograd node whose backward is a Python callable, for the
// eager CUDA path of the KD loss. It does what a torch.autograd.Function with one output does
// (the output's grad_fn, edges to the inputs that require grad, the backward called with the
// output's gradient and which inputs' gradients the task needs, state released after a backward
// without retain_graph), at a fraction of torch.autograd.Function.apply's host cost, which at
// ABSLD's shapes is a large part of the whole call.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string>
#include <utility>

namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;

class PythonBackward : public Node {
 public:
  PythonBackward(PyObject* backward, std::string name) : backward_(backward), name_(std::move(name)) {
    Py_INCREF(backward_);
  }

  ~PythonBackward() override { release(); }

  std::string name() const override { return name_; }

  variable_list apply(variable_list&& grads) override {
    pybind11::gil_scoped_acquire gil;
    TORCH_CHECK(backward_ != nullptr, name_,
                ": trying to backward through the graph a second time (or directly access saved tensors after "
                "they have already been freed); specify retain_graph=True the first time");
    variable_list result(2);
    if (!grads[0].defined()) {
      return result;
    }
    PyObject* grad = THPVariable_Wrap(grads[0]);
    if (grad == nullptr) {
      throw_python_error();
    }
    PyObject* out = PyObject_CallFunctionObjArgs(backward_, grad, task_should_compute_output(0) ? Py_True : Py_False,
                                                 task_should_compute_output(1) ? Py_True : Py_False, nullptr);
    Py_DECREF(grad);
    if (out == nullptr) {
      throw_python_error();
    }
    if (!PyTuple_Check(out) || PyTuple_GET_SIZE(out) != 2) {
      Py_DECREF(out);
      TORCH_CHECK(false, name_, ": the backward must return a tuple of two gradients (a tensor or None each)");
    }
    for (Py_ssize_t i = 0; i < 2; ++i) {
      PyObject* item = PyTuple_GET_ITEM(out, i);
      if (item == Py_None) {
        continue;
      }
      if (!THPVariable_Check(item)) {
        Py_DECREF(out);
        TORCH_CHECK(false, name_, ": gradient ", i, " is not a tensor or None");
      }
      result[i] = THPVariable_Unpack(item);
    }
    Py_DECREF(out);
    return result;
  }

  void release_variables() override { release(); }

 private:
  static void throw_python_error() {
    python_error error;
    error.persist();
    throw std::move(error);
  }

  void release() {
    if (backward_ != nullptr) {
      // The engine may release or destroy the node on a thread that does not hold the GIL.
      pybind11::gil_scoped_acquire gil;
      Py_CLEAR(backward_);
    }
  }

  PyObject* backward_;
  std::string name_;
};

}  // namespace

namespace fastabsld {

// attach_backward(output, first, second, backward, name): output's grad_fn becomes a node with
// edges to first and second (tensors; those that do not require grad get no edge) that calls
// backward(grad, first needed, second needed) -> (gradient of first or None, of second or None).
// output must be a tensor without autograd history.
PyObject* attach_backward(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *output, *first, *second, *backward;
  const char* name;
  if (!PyArg_ParseTuple(args, "OOOOs", &output, &first, &second, &backward, &name)) {
    return nullptr;
  }
  TORCH_CHECK_TYPE(THPVariable_Check(output) && THPVariable_Check(first) && THPVariable_Check(second),
                   "attach_backward: output, first and second must be tensors");
  TORCH_CHECK_TYPE(PyCallable_Check(backward), "attach_backward: backward must be callable");
  const at::Tensor& out = THPVariable_Unpack(output);
  TORCH_CHECK(!out.requires_grad(), "attach_backward: output already has autograd history");
  auto node = c10::make_intrusive<PythonBackward>(backward, name);
  node->set_next_edges(torch::autograd::collect_next_edges(THPVariable_Unpack(first), THPVariable_Unpack(second)));
  torch::autograd::set_history(out, node);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace fastabsld
