// The schemas of every op in torch.ops.fastabsld, and the Python module fastabsld._C (which
// vector loops the CPU PGD step runs; attach_backward, python_backward.cpp).
// Kernels register per backend with TORCH_LIBRARY_IMPL in their own files.
#include <Python.h>
#include <torch/library.h>

#include "pgd_step_cpu_simd.h"

namespace fastabsld {
PyObject* attach_backward(PyObject*, PyObject* args);
}

namespace {

PyObject* pgd_step_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastabsld::pgd_step_cpu_isa());
}

PyMethodDef methods[] = {
    {"pgd_step_cpu_isa", pgd_step_cpu_isa, METH_NOARGS,
     "The vector ISA of the fp32 CPU pgd_step loops on this machine: avx512, avx2 or scalar."},
    {"attach_backward", fastabsld::attach_backward, METH_VARARGS,
     "attach_backward(output, first, second, backward, name): output's grad_fn becomes an autograd node "
     "named name, with edges to the tensors first and second, that calls backward(grad, first needed, "
     "second needed) -> (gradient of first or None, gradient of second or None)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastabsld, m) {
  // One projected ascent step of PGD, per sample over all non-batch dimensions.
  // alpha/eps: the scalars are used where the per-sample tensors (shape (B,), on x_adv's device) are absent.
  m.def(
      "pgd_step(Tensor x_adv, Tensor x, Tensor grad, Tensor? alpha_per_sample, "
      "Tensor? eps_per_sample, float alpha, float eps, str norm, float clamp_min, "
      "float clamp_max) -> Tensor");
  // Fused KD loss, per row: w * KL(softmax(t / tau_t) || softmax(s / tau_s)) and its gradients
  // (empty (0,) tensors when not asked for). A temperature tensor is (C,), one per class indexed
  // by labels (which it needs), or (B, 1), one per row; the scalar is used where it is None. The
  // row weight w = weight[label] (C,) * sample_weight[row] (B,) * sample_weight_scalar.
  m.def(
      "kd_kl_div_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor? teacher_temperature, Tensor? student_temperature, "
      "float teacher_temperature_scalar, float student_temperature_scalar, int ignore_index, "
      "bool student_grad, bool teacher_grad, Tensor? weight=None, Tensor? sample_weight=None, "
      "float sample_weight_scalar=1.) -> (Tensor row_loss, Tensor grad_student, Tensor grad_teacher)");
  // The reduced fused KD loss ("none", "sum", "batchmean", "mean") with its autograd in C++:
  // kd_kl_div_forward plus the reduction, for eager callers (torch.compile traces the above).
  m.def(
      "kd_kl_div_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor? teacher_temperature, Tensor? student_temperature, "
      "float teacher_temperature_scalar, float student_temperature_scalar, int ignore_index, "
      "str reduction, Tensor? weight=None, Tensor? sample_weight=None, "
      "float sample_weight_scalar=1.) -> Tensor");
}
