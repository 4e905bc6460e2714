// CPU kernel of fastabsld::kd_kl_div_forward (contract: the fastabsld/ops/kd_loss.py docstring):
// one pass per row computes the weighted KL(p || q) row loss and the gradient(s); rows run in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "kd_kl_div_math.h"

namespace fastabsld {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define KD_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_TARGET_CLONES
#endif

// The fp32 row, compiled for AVX-512, AVX2+FMA and baseline x86-64; picked at load time.
KD_TARGET_CLONES float kd_row_f32(const KdRow<float>& r) { return kd_row<float>(r); }

float run_row(const KdRow<float>& r) { return kd_row_f32(r); }
double run_row(const KdRow<double>& r) { return kd_row<double>(r); }

struct KdArgs {
  at::Tensor s, t;                      // (B, C), any strides
  bool has_labels = false;              // labels given (possibly empty: B = 0)
  const int64_t* labels = nullptr;      // (B,) contiguous, when has_labels and B > 0
  // Temperatures and weights in the accumulation dtype, any stride, or undefined. A temperature
  // is (C,) (per class, indexed by the label) or (B, 1) (per row); weight is (C,), sample_weight (B,).
  at::Tensor tau_t, tau_s, weight, sample_weight;
  bool tau_t_per_row = false, tau_s_per_row = false;
  double tau_t_scalar = 1.0, tau_s_scalar = 1.0, sample_weight_scalar = 1.0;
  int64_t ignore_index = -100;
  int64_t rows = 0, cols = 0;
};

// A vector of per-class or per-row values read through its stride (undefined: absent).
template <typename acc_t>
struct KdValues {
  const acc_t* data = nullptr;
  int64_t stride = 0;

  explicit KdValues(const at::Tensor& values) {
    if (values.defined()) {
      data = values.const_data_ptr<acc_t>();
      stride = values.stride(0);
    }
  }
  acc_t at(int64_t index) const { return data[index * stride]; }
};

template <typename acc_t>
acc_t row_tau(const KdValues<acc_t>& tau, double scalar, int64_t index, const char* name) {
  const acc_t value = tau.data != nullptr ? tau.at(index) : static_cast<acc_t>(scalar);
  TORCH_CHECK(std::isfinite(value) && value > 0, "kd_kl_div_forward: ", name,
              " must be positive and finite, got ", value);
  return value;
}

// Whether n values (stride apart) all lie in [0, largest finite]; NaN does not. Branch-free,
// so that the contiguous loop vectorises: C can be 32k, where a check and a branch per value
// would cost ~1 ns each.
template <typename acc_t>
KD_INLINE inline bool all_non_negative_finite(const acc_t* data, int64_t n, int64_t stride) {
  const acc_t largest = std::numeric_limits<acc_t>::max();
  int bad = 0;
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) bad |= !(data[i] >= 0) | !(data[i] <= largest);
  } else {
    for (int64_t i = 0; i < n; ++i) bad |= !(data[i * stride] >= 0) | !(data[i * stride] <= largest);
  }
  return bad == 0;
}

KD_TARGET_CLONES bool all_non_negative_finite_f32(const float* data, int64_t n, int64_t stride) {
  return all_non_negative_finite(data, n, stride);
}

bool values_in_range(const float* data, int64_t n, int64_t stride) {
  return all_non_negative_finite_f32(data, n, stride);
}
bool values_in_range(const double* data, int64_t n, int64_t stride) {
  return all_non_negative_finite(data, n, stride);
}

// Every value of a weight tensor, before any row runs: a bad weight is the caller's argument
// (ValueError), whichever rows use it.
template <typename acc_t>
void check_weight_values(const at::Tensor& weight, const char* name) {
  const KdValues<acc_t> values(weight);
  if (values.data == nullptr || values_in_range(values.data, weight.size(0), values.stride)) return;
  for (int64_t i = 0; i < weight.size(0); ++i) {
    const acc_t value = values.at(i);
    TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, "kd_kl_div_forward: ", name,
                      " must be non-negative and finite, got ", name, "[", i, "] = ", value);
  }
}

// Copies a strided row into `dst` in the accumulation type, unless it can be read in place.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* src, int64_t stride, int64_t n, acc_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return src;
  }
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c * stride]);
  return dst;
}

template <typename acc_t, typename scalar_t>
void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<scalar_t>(src[c]);
  }
}

template <typename s_t, typename t_t, typename acc_t>
void kd_rows(const KdArgs& a, at::Tensor& loss, at::Tensor& grad_s, at::Tensor& grad_t) {
  const int64_t n = a.cols;
  const s_t* s = a.s.const_data_ptr<s_t>();
  const t_t* t = a.t.const_data_ptr<t_t>();
  const int64_t s_row = a.s.stride(0), s_col = a.s.stride(1);
  const int64_t t_row = a.t.stride(0), t_col = a.t.stride(1);
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  s_t* gs = grad_s.defined() ? grad_s.mutable_data_ptr<s_t>() : nullptr;
  t_t* gt = grad_t.defined() ? grad_t.mutable_data_ptr<t_t>() : nullptr;
  const KdValues<acc_t> tau_t(a.tau_t), tau_s(a.tau_s), weight(a.weight), sample_weight(a.sample_weight);
  const acc_t weight_scalar = static_cast<acc_t>(a.sample_weight_scalar);
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    // Per chunk: the rows in the accumulation type when they cannot be read in place, the
    // gradients before their cast, and the row kernel's scratch.
    std::vector<acc_t> buffer(4 * n + kd_scratch_size(n));
    acc_t* t_buf = buffer.data();
    acc_t* s_buf = t_buf + n;
    acc_t* gs_buf = s_buf + n;
    acc_t* gt_buf = gs_buf + n;
    for (int64_t b = begin; b < end; ++b) {
      s_t* gs_row = gs ? gs + b * n : nullptr;
      t_t* gt_row = gt ? gt + b * n : nullptr;
      int64_t label = -1;  // read only through per-class values, which need labels
      if (a.has_labels) {
        label = a.labels[b];
        if (label == a.ignore_index) {
          out[b] = 0;
          if (gs_row) std::fill(gs_row, gs_row + n, s_t(0));
          if (gt_row) std::fill(gt_row, gt_row + n, t_t(0));
          continue;
        }
        TORCH_CHECK(label >= 0 && label < n, "kd_kl_div_forward: labels[", b, "] = ", label,
                    " is outside [0, ", n, ") and is not ignore_index (", a.ignore_index, ")");
      }
      KdRow<acc_t> r;
      r.inv_tau_t = acc_t(1) / row_tau<acc_t>(tau_t, a.tau_t_scalar, a.tau_t_per_row ? b : label,
                                              "teacher_temperature");
      r.inv_tau_s = acc_t(1) / row_tau<acc_t>(tau_s, a.tau_s_scalar, a.tau_s_per_row ? b : label,
                                              "student_temperature");
      r.weight = weight_scalar;
      if (weight.data != nullptr) r.weight *= weight.at(label);
      if (sample_weight.data != nullptr) r.weight *= sample_weight.at(b);
      r.t = row_as_acc<t_t, acc_t>(t + b * t_row, t_col, n, t_buf);
      r.s = row_as_acc<s_t, acc_t>(s + b * s_row, s_col, n, s_buf);
      r.cols = n;
      r.scratch = gt_buf + n;
      if constexpr (std::is_same_v<s_t, acc_t>) {
        r.grad_s = gs_row;
      } else {
        r.grad_s = gs_row ? gs_buf : nullptr;
      }
      if constexpr (std::is_same_v<t_t, acc_t>) {
        r.grad_t = gt_row;
      } else {
        r.grad_t = gt_row ? gt_buf : nullptr;
      }
      out[b] = run_row(r);
      if (gs_row) store_row(r.grad_s, n, gs_row);
      if (gt_row) store_row(r.grad_t, n, gt_row);
    }
  });
}

// `values` in dtype `type`, without a dispatch when it already is (small shapes are dispatch-bound).
at::Tensor as_type(const at::Tensor& values, at::ScalarType type) {
  return values.scalar_type() == type ? values : values.to(type);
}

// A temperature tensor in the accumulation dtype: (C,) per class (needs labels) or (B, 1) per row.
at::Tensor checked_temperature(const std::optional<at::Tensor>& tau, const char* name,
                               const KdArgs& a, at::ScalarType acc, bool& per_row) {
  if (!tau.has_value()) return at::Tensor();
  per_row = tau->dim() == 2;
  if (per_row) {
    TORCH_CHECK(tau->size(0) == a.rows && tau->size(1) == 1, "kd_kl_div_forward: ", name,
                " per row must have shape (B, 1) = (", a.rows, ", 1), got ", tau->sizes());
  } else {
    TORCH_CHECK(tau->dim() == 1 && tau->size(0) == a.cols, "kd_kl_div_forward: ", name,
                " must have shape (C,) = (", a.cols, ",) (per class) or (B, 1) (per row), got ",
                tau->sizes());
    TORCH_CHECK(a.has_labels, "kd_kl_div_forward: ", name,
                " of shape (C,) is per class and needs labels; per-row temperatures have shape (B, 1)");
  }
  TORCH_CHECK(tau->device() == a.s.device(), "kd_kl_div_forward: ", name, " is on ",
              tau->device(), ", the logits on ", a.s.device());
  TORCH_CHECK(at::isFloatingType(tau->scalar_type()), "kd_kl_div_forward: ", name,
              " must be floating point, got ", tau->scalar_type());
  return as_type(*tau, acc);
}

// A weight tensor of shape (length,) in the accumulation dtype, or undefined.
at::Tensor checked_weight(const std::optional<at::Tensor>& weight, const char* name, int64_t length,
                          const char* what, const KdArgs& a, at::ScalarType acc) {
  if (!weight.has_value()) return at::Tensor();
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == length, "kd_kl_div_forward: ", name,
              " must have shape (", what, ",) = (", length, ",), got ", weight->sizes());
  TORCH_CHECK(weight->device() == a.s.device(), "kd_kl_div_forward: ", name, " is on ",
              weight->device(), ", the logits on ", a.s.device());
  TORCH_CHECK(at::isFloatingType(weight->scalar_type()), "kd_kl_div_forward: ", name,
              " must be floating point, got ", weight->scalar_type());
  return as_type(*weight, acc);
}

constexpr const char* FORWARD_MODE_MESSAGE =
    "fastabsld::kd_kl_div_forward has no forward-mode derivative: call fastabsld.loss.kd_kl_div (or "
    "fastabsld.ops.kd_loss.kd_kl_div_forward), which computes through differentiable operations in forward mode "
    "and under torch.func";

bool kd_supported(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_div_forward_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& teacher_temperature,
    const std::optional<at::Tensor>& student_temperature, double teacher_temperature_scalar,
    double student_temperature_scalar, int64_t ignore_index, bool student_grad, bool teacher_grad,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sample_weight,
    double sample_weight_scalar) {
  TORCH_CHECK(student_logits.dim() == 2, "kd_kl_div_forward: student_logits must be (B, C), got ",
              student_logits.sizes());
  TORCH_CHECK(teacher_logits.sizes() == student_logits.sizes(), "kd_kl_div_forward: teacher_logits ",
              teacher_logits.sizes(), " and student_logits ", student_logits.sizes(),
              " must have the same shape");
  TORCH_CHECK(teacher_logits.device() == student_logits.device(),
              "kd_kl_div_forward: the logits must be on one device");
  // The op's autograd is reverse mode only: a forward-mode tangent would be dropped without a word.
  TORCH_CHECK_NOT_IMPLEMENTED(!student_logits._fw_grad(0).defined() && !teacher_logits._fw_grad(0).defined(),
                              FORWARD_MODE_MESSAGE);
  TORCH_CHECK(kd_supported(student_logits.scalar_type()) && kd_supported(teacher_logits.scalar_type()),
              "kd_kl_div_forward: logits must be fp32, fp16, bf16 or fp64, got ",
              student_logits.scalar_type(), " and ", teacher_logits.scalar_type());
  const bool fp64 =
      student_logits.scalar_type() == at::kDouble || teacher_logits.scalar_type() == at::kDouble;
  const at::ScalarType acc = fp64 ? at::kDouble : at::kFloat;
  KdArgs a;
  a.rows = student_logits.size(0);
  a.cols = student_logits.size(1);
  TORCH_CHECK(a.cols >= 1 || a.rows == 0, "kd_kl_div_forward: C must be >= 1");
  // The fp64 path (for gradcheck) reads both logits as fp64.
  a.s = fp64 ? student_logits.to(at::kDouble) : student_logits;
  a.t = fp64 ? teacher_logits.to(at::kDouble) : teacher_logits;
  at::Tensor labels_checked;
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == a.rows,
                "kd_kl_div_forward: labels must be int64 of shape (", a.rows, ",), got ",
                labels->scalar_type(), " ", labels->sizes());
    TORCH_CHECK(labels->device() == student_logits.device(), "kd_kl_div_forward: labels are on ",
                labels->device(), ", the logits on ", student_logits.device());
    labels_checked = labels->contiguous();
    a.has_labels = true;
    a.labels = labels_checked.const_data_ptr<int64_t>();
  }
  a.tau_t = checked_temperature(teacher_temperature, "teacher_temperature", a, acc, a.tau_t_per_row);
  a.tau_s = checked_temperature(student_temperature, "student_temperature", a, acc, a.tau_s_per_row);
  a.tau_t_scalar = teacher_temperature_scalar;
  a.tau_s_scalar = student_temperature_scalar;
  TORCH_CHECK(!weight.has_value() || a.has_labels,
              "kd_kl_div_forward: weight is per class and needs labels");
  a.weight = checked_weight(weight, "weight", a.cols, "C", a, acc);
  a.sample_weight = checked_weight(sample_weight, "sample_weight", a.rows, "B", a, acc);
  TORCH_CHECK_VALUE(std::isfinite(sample_weight_scalar) && sample_weight_scalar >= 0,
                    "kd_kl_div_forward: sample_weight_scalar must be non-negative and finite, got ",
                    sample_weight_scalar);
  a.sample_weight_scalar = sample_weight_scalar;
  if (fp64) {
    check_weight_values<double>(a.weight, "weight");
    check_weight_values<double>(a.sample_weight, "sample_weight");
  } else {
    check_weight_values<float>(a.weight, "weight");
    check_weight_values<float>(a.sample_weight, "sample_weight");
  }
  a.ignore_index = ignore_index;
  at::Tensor loss = at::empty({a.rows}, student_logits.options().dtype(acc));
  at::Tensor grad_s = student_grad ? at::empty({a.rows, a.cols}, a.s.options()) : at::Tensor();
  at::Tensor grad_t = teacher_grad ? at::empty({a.rows, a.cols}, a.t.options()) : at::Tensor();
  if (a.rows > 0) {
    if (fp64) {
      kd_rows<double, double, double>(a, loss, grad_s, grad_t);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.s.scalar_type(), "kd_kl_div_cpu", [&] {
        using s_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.t.scalar_type(), "kd_kl_div_cpu", [&] {
          if constexpr (!std::is_same_v<s_t, double> && !std::is_same_v<scalar_t, double>) {
            kd_rows<s_t, scalar_t, float>(a, loss, grad_s, grad_t);
          }
        });
      });
    }
  }
  auto finish = [&](const at::Tensor& grad, const at::Tensor& like, bool wanted) {
    if (!wanted) return at::empty({0}, like.options());
    return fp64 ? grad.to(like.scalar_type()) : grad;
  };
  return {loss, finish(grad_s, student_logits, student_grad),
          finish(grad_t, teacher_logits, teacher_grad)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, CPU, m) { m.impl("kd_kl_div_forward", &kd_kl_div_forward_cpu); }

}  // namespace fastabsld
