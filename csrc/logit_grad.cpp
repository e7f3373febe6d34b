// logit_grad_: a chunk's vocab-major logits turned in place into dL/dlogits (docs/method.md §3, §4).
//
// logits_t [V, n] (token t = column t; see lse_target.cpp for the layout). With z = softcap(x) / T,
// tanh_ = tanh(x / cap), p = exp(z - lse_t):
//   x_vt <- scale_t / T * (onehot(label_t)_v - p_vt) * (1 - tanh_^2)    (no (1 - tanh_^2) without softcap)
// i.e. dL/dx for dL/d(log p_t[label_t]) = scale_t, written in the logits dtype. Tokens with scale 0
// get zeros, tokens whose lse is NaN get NaN. Sweeps vocab rows in parallel (sequential memory), the
// per-token coefficients in the vector lanes; the n label entries are fixed up afterwards.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "head_math.h"

namespace wrpo {
namespace {

template <typename T, bool CAP>
void logit_grad_cols(const at::Tensor& xt, const int64_t* labels, const acc_t<T>* scale, const acc_t<T>* lse,
                     const Head<acc_t<T>, CAP>& head) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = Io<T>;
  constexpr int64_t W = V::size(), S = IO::kStep;
  const int64_t rows = xt.size(0), n = xt.size(1), ld = xt.stride(0);
  const int64_t n_pad = (n + S - 1) / S * S, full = n / S * S;
  T* base = xt.mutable_data_ptr<T>();

  // per token: -scale / T (NaN where lse is NaN), lse, and the raw logit at the label (read before the sweep)
  std::vector<A> negcoef(n_pad, A(0)), lse_pad(n_pad, A(0)), x_label(n);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t label = labels[t];
    TORCH_CHECK(label >= 0 && label < rows, "logit_grad_: label ", label, " of token ", t, " is outside [0, ",
                rows, ")");
    negcoef[t] = std::isnan(lse[t]) ? lse[t] : -scale[t] * head.inv_temp;
    lse_pad[t] = lse[t];
    x_label[t] = static_cast<A>(base[label * ld + t]);
  }

  auto grad = [&](const V& x, int64_t k) {
    V tanh_;
    V g = vexp(head.z(x, tanh_) - V::loadu(&lse_pad[k])) * V::loadu(&negcoef[k]);
    if constexpr (CAP) g = g * Head<A, CAP>::capgrad(tanh_);
    return g;
  };
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n_pad), [&](int64_t v0, int64_t v1) {
    V a, b;
    for (int64_t v = v0; v < v1; ++v) {
      T* row = base + v * ld;
      for (int64_t k = 0; k < full; k += S) {
        IO::load(row + k, a, b);
        IO::store(row + k, grad(a, k), grad(b, k + W));
      }
      if (full < n) {
        IO::load_part(row + full, n - full, A(0), a, b);
        IO::store_part(row + full, n - full, grad(a, full), grad(b, full + W));
      }
    }
  });

  for (int64_t t = 0; t < n; ++t) {
    A tanh_;
    const A z = head.z(x_label[t], tanh_);
    const A p = std::exp(z - lse[t]);
    base[labels[t] * ld + t] = static_cast<T>(-negcoef[t] * (A(1) - p) * Head<A, CAP>::capgrad(tanh_));
  }
}

void logit_grad_(const at::Tensor& logits_t, const at::Tensor& labels, const at::Tensor& scale,
                 const at::Tensor& lse, std::optional<double> softcap, double temperature) {
  constexpr const char* op = "wrpo_kernels::logit_grad_";
  check_logits_t(logits_t, op);
  const int64_t n = logits_t.size(1);
  const auto md = math_type(logits_t.scalar_type());
  check_tokens(labels, n, at::kLong, op, "labels");
  check_tokens(scale, n, md, op, "scale");
  check_tokens(lse, n, md, op, "lse");
  check_head(softcap, temperature, op);
  if (n == 0 || logits_t.size(0) == 0) return;
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_t.scalar_type(), "logit_grad_", [&] {
    using A = acc_t<scalar_t>;
    const A* sc = scale.const_data_ptr<A>();
    const A* ls = lse.const_data_ptr<A>();
    if (softcap.has_value()) {
      logit_grad_cols<scalar_t, true>(logits_t, lab, sc, ls, Head<A, true>(softcap, temperature));
    } else {
      logit_grad_cols<scalar_t, false>(logits_t, lab, sc, ls, Head<A, false>(softcap, temperature));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(wrpo_kernels, CPU, m) { m.impl("logit_grad_", &logit_grad_); }

}  // namespace wrpo
