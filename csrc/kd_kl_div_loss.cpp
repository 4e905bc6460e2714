// fastabsld::kd_kl_div_loss: the reduced KD loss with its autograd in C++, for eager callers.
// It runs kd_kl_div_forward (any backend) below autograd, reduces the row losses, and keeps the
// gradient(s) of that one pass; the backward only scales them. torch.compile traces
// kd_kl_div_forward (autograd registered in Python) instead: this op is the eager fast path.
// A backward that is itself differentiated (create_graph) runs kd_kl_div_forward with autograd
// and differentiates it: that op's Python backward then computes through differentiable
// operations, so the gradient has the derivatives of every order the composite formula has.
#include <torch/csrc/autograd/autograd.h>
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>

namespace fastabsld {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Reduction { kNone, kSum, kBatchMean, kMean };

Reduction parse_reduction(c10::string_view name) {
  if (name == "none") return Reduction::kNone;
  if (name == "sum") return Reduction::kSum;
  if (name == "batchmean") return Reduction::kBatchMean;
  TORCH_CHECK(name == "mean", "kd_kl_div_loss: reduction must be none, sum, batchmean or mean, got '",
              std::string(name), "'");
  return Reduction::kMean;
}

// What the sum of row losses is divided by: undefined for none/sum; counted rows (x C for mean),
// with at least one row counted: no counted row gives a loss of 0 (the sum of no rows) and zero
// gradients, never 0 / 0.
at::Tensor row_denominator(Reduction reduction, const std::optional<at::Tensor>& labels,
                           int64_t ignore_index, const at::Tensor& rows, int64_t cols) {
  if (reduction == Reduction::kNone || reduction == Reduction::kSum) return at::Tensor();
  const int64_t per_row = reduction == Reduction::kMean ? cols : 1;
  if (!labels.has_value()) {
    return at::scalar_tensor(static_cast<double>(std::max<int64_t>(rows.size(0), 1) * per_row),
                             rows.options());
  }
  at::Tensor count = labels->ne(ignore_index).sum().clamp_min(1);
  return per_row == 1 ? count : count * per_row;
}

// The same on the CPU as plain loops over the B row losses and labels (no dispatches): returns
// the reduced loss and 1 / denominator.
std::pair<at::Tensor, double> cpu_reduce(Reduction reduction, const std::optional<at::Tensor>& labels,
                                         int64_t ignore_index, const at::Tensor& rows, int64_t cols) {
  const int64_t batch = rows.size(0);
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "kd_kl_div_loss", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < batch; ++i) total += r[i];
  });
  double denominator = 1;
  if (reduction != Reduction::kSum) {
    int64_t counted = batch;
    if (labels.has_value()) {
      const at::Tensor y = labels->contiguous();
      const int64_t* l = y.const_data_ptr<int64_t>();
      counted = 0;
      for (int64_t i = 0; i < batch; ++i) counted += l[i] != ignore_index;
    }
    denominator = static_cast<double>(std::max<int64_t>(counted, 1)) * (reduction == Reduction::kMean ? cols : 1);
  }
  return {at::scalar_tensor(total / denominator, rows.options()), 1.0 / denominator};
}

// A plain dense CPU tensor whose data can be read here (not fake, functional or batched).
bool is_plain_cpu(const at::Tensor& tensor) {
  static const c10::DispatchKeySet wrappers({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                             c10::DispatchKey::FuncTorchBatched,
                                             c10::DispatchKey::FuncTorchGradWrapper});
  return tensor.device().is_cpu() && tensor.layout() == at::kStrided && tensor.has_storage() &&
         !tensor.key_set().has_any(wrappers);
}

// fastabsld::kd_kl_div_forward's signature, and its typed handle.
using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, double, int64_t, bool, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double);

c10::TypedOperatorHandle<ForwardSignature> forward_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("fastabsld::kd_kl_div_forward", "")
      .typed<ForwardSignature>();
}

struct KdLoss {
  at::Tensor loss, grad_s, grad_t;
  at::Tensor denominator;  // a 0-d tensor (off the CPU), or undefined: then `scale` applies
  double scale = 1.0;
};

// The op's arguments other than the logits, the reduction and the gradient flags.
struct KdOptions {
  const std::optional<at::Tensor>& labels;
  const std::optional<at::Tensor>& tau_t;
  const std::optional<at::Tensor>& tau_s;
  double tau_t_scalar, tau_s_scalar;
  int64_t ignore_index;
  const std::optional<at::Tensor>& weight;
  const std::optional<at::Tensor>& sample_weight;
  double sample_weight_scalar;
};

KdLoss kd_loss(const at::Tensor& s, const at::Tensor& t, const KdOptions& o, Reduction reduction,
               bool student_grad, bool teacher_grad) {
  static const auto op = forward_op();
  // The gradients are computed here, so the forward op runs below autograd: without the guard, the
  // call would pass through the op's Python autograd kernel (registered for torch.compile), one
  // Python round trip per loss.
  at::AutoDispatchBelowADInplaceOrView guard;
  auto [rows, grad_s, grad_t] =
      op.call(s, t, o.labels, o.tau_t, o.tau_s, o.tau_t_scalar, o.tau_s_scalar, o.ignore_index,
              student_grad, teacher_grad, o.weight, o.sample_weight, o.sample_weight_scalar);
  const auto& labels = o.labels;
  const int64_t ignore_index = o.ignore_index;
  KdLoss out;
  out.grad_s = grad_s;
  out.grad_t = grad_t;
  if (reduction == Reduction::kNone) {
    out.loss = rows;
  } else if (is_plain_cpu(rows) && (!labels.has_value() || is_plain_cpu(*labels))) {
    std::tie(out.loss, out.scale) = cpu_reduce(reduction, labels, ignore_index, rows, s.size(1));
  } else {
    out.denominator = row_denominator(reduction, labels, ignore_index, rows, s.size(1));
    out.loss = rows.sum();
    if (out.denominator.defined()) out.loss = out.loss.div(out.denominator);
  }
  return out;
}

struct KdLossFunction : public torch::autograd::Function<KdLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t,
                            const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& tau_t,
                            const std::optional<at::Tensor>& tau_s, double tau_t_scalar,
                            double tau_s_scalar, int64_t ignore_index, c10::string_view reduction,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& sample_weight,
                            double sample_weight_scalar) {
    const Reduction kind = parse_reduction(reduction);
    const bool student_grad = s.requires_grad(), teacher_grad = t.requires_grad();
    const KdOptions options{labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index,
                            weight, sample_weight, sample_weight_scalar};
    KdLoss out = kd_loss(s, t, options, kind, student_grad, teacher_grad);
    ctx->save_for_backward({out.grad_s, out.grad_t, out.denominator});
    // The inputs, for a differentiated backward only (kept out of the saved variables, which
    // the first-order backward unpacks).
    ctx->saved_data["inputs"] = c10::ivalue::Tuple::create(
        {s, t, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index, weight, sample_weight,
         sample_weight_scalar});
    ctx->saved_data["flags"] = static_cast<int64_t>(kind) * 4 + student_grad * 2 + teacher_grad;
    ctx->saved_data["scale"] = out.scale;
    return out.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const auto kind = static_cast<Reduction>(flags / 4);
    const bool student_grad = (flags & 2) != 0, teacher_grad = (flags & 1) != 0;
    const at::Tensor& grad = grad_outputs[0];
    const double factor = ctx->saved_data["scale"].toDouble();
    auto scale = [&](const at::Tensor& g) {
      if (kind == Reduction::kNone) return g * grad.unsqueeze(1).to(g.scalar_type());
      const at::Tensor& denominator = saved[2];
      if (denominator.defined()) return g * (grad / denominator);
      return factor == 1.0 ? g * grad : g * (grad * factor);
    };
    variable_list out(12);
    if (at::GradMode::is_enabled()) {
      const at::Tensor& denominator = saved[2];
      const int64_t batch = saved[student_grad ? 0 : 1].size(0);
      at::Tensor grad_rows = grad;
      if (kind != Reduction::kNone) {
        grad_rows = denominator.defined() ? grad / denominator : (factor == 1.0 ? grad : grad * factor);
        grad_rows = grad_rows.expand({batch});
      }
      auto [grad_s, grad_t] = differentiable_backward(ctx->saved_data["inputs"].toTupleRef().elements(),
                                                      grad_rows, student_grad, teacher_grad);
      out[0] = grad_s;
      out[1] = grad_t;
      return out;
    }
    if (student_grad) out[0] = scale(saved[0]);
    if (teacher_grad) out[1] = scale(saved[1]);
    return out;
  }

  // The gradients as functions of the logits that autograd can differentiate again: the row losses
  // of kd_kl_div_forward, called with autograd, differentiated with create_graph.
  static std::pair<at::Tensor, at::Tensor> differentiable_backward(const std::vector<c10::IValue>& in,
                                                                   const at::Tensor& grad_rows,
                                                                   bool student_grad, bool teacher_grad) {
    static const auto op = forward_op();
    const at::Tensor s = in[0].toTensor(), t = in[1].toTensor();
    const at::Tensor rows = std::get<0>(op.call(
        s, t, in[2].toOptional<at::Tensor>(), in[3].toOptional<at::Tensor>(), in[4].toOptional<at::Tensor>(),
        in[5].toDouble(), in[6].toDouble(), in[7].toInt(), student_grad, teacher_grad,
        in[8].toOptional<at::Tensor>(), in[9].toOptional<at::Tensor>(), in[10].toDouble()));
    variable_list wrt;
    if (student_grad) wrt.push_back(s);
    if (teacher_grad) wrt.push_back(t);
    variable_list grads = torch::autograd::grad({rows}, wrt, {grad_rows.to(rows.scalar_type())},
                                                /*retain_graph=*/true, /*create_graph=*/true,
                                                /*allow_unused=*/true);
    at::Tensor grad_s = student_grad ? grads[0] : at::Tensor();
    at::Tensor grad_t = teacher_grad ? grads[student_grad ? 1 : 0] : at::Tensor();
    return {grad_s, grad_t};
  }
};

at::Tensor kd_kl_div_loss_no_grad(const at::Tensor& s, const at::Tensor& t,
                                  const std::optional<at::Tensor>& labels,
                                  const std::optional<at::Tensor>& tau_t,
                                  const std::optional<at::Tensor>& tau_s, double tau_t_scalar,
                                  double tau_s_scalar, int64_t ignore_index,
                                  c10::string_view reduction,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& sample_weight,
                                  double sample_weight_scalar) {
  const KdOptions options{labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index,
                          weight, sample_weight, sample_weight_scalar};
  return kd_loss(s, t, options, parse_reduction(reduction), false, false).loss;
}

at::Tensor kd_kl_div_loss_autograd(const at::Tensor& s, const at::Tensor& t,
                                   const std::optional<at::Tensor>& labels,
                                   const std::optional<at::Tensor>& tau_t,
                                   const std::optional<at::Tensor>& tau_s, double tau_t_scalar,
                                   double tau_s_scalar, int64_t ignore_index,
                                   c10::string_view reduction,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& sample_weight,
                                   double sample_weight_scalar) {
  if (!at::GradMode::is_enabled() || !(s.requires_grad() || t.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return kd_kl_div_loss_no_grad(s, t, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar,
                                  ignore_index, reduction, weight, sample_weight,
                                  sample_weight_scalar);
  }
  return KdLossFunction::apply(s, t, labels, tau_t, tau_s, tau_t_scalar, tau_s_scalar, ignore_index,
                               reduction, weight, sample_weight, sample_weight_scalar);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastabsld, Autograd, m) {
  m.impl("kd_kl_div_loss", &kd_kl_div_loss_autograd);
}

TORCH_LIBRARY_IMPL(fastabsld, CompositeExplicitAutograd, m) {
  m.impl("kd_kl_div_loss", &kd_kl_div_loss_no_grad);
}

}  // namespace fastabsld
