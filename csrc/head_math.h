// Shared by the kernels in lse_target.cpp and logit_grad.cpp: vector loads/stores of the logits dtype in
// the math dtype, the head transform z = softcap(x) / T = cap * tanh(x / cap) / T (docs/method.md §3), checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

namespace wrpo {

using at::vec::Vectorized;

// Math dtype: fp64 stays fp64, everything else runs in fp32 (as math_dtype() in Python).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One step = two math-dtype vectors of contiguous values (16 fp32 lanes on AVX2), whatever the
// storage dtype: loads widen bf16/fp16 to fp32, stores round back.
template <typename T>
struct Io {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kStep = 2 * V::size();

  static void load(const T* p, V& a, V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a = V::loadu(p);
      b = V::loadu(p + V::size());
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      at::vec::load_fp32_from_bf16(p, a, b);
    } else {
      at::vec::load_fp32_from_fp16(p, a, b);
    }
  }

  static void store(T* p, const V& a, const V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a.store(p);
      b.store(p + V::size());
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      at::vec::convert_float_bfloat16(a, b).store(p);
    } else {
      at::vec::convert_float_half(a, b).store(p);
    }
  }

  // A partial step: ``count`` < kStep elements, the other lanes read as ``fill``.
  static void load_part(const T* p, int64_t count, A fill, V& a, V& b) {
    T tmp[kStep];
    std::fill(tmp, tmp + kStep, static_cast<T>(fill));
    std::memcpy(tmp, p, count * sizeof(T));
    load(tmp, a, b);
  }

  static void store_part(T* p, int64_t count, const V& a, const V& b) {
    T tmp[kStep];
    store(tmp, a, b);
    std::memcpy(p, tmp, count * sizeof(T));
  }
};

// z = softcap(x) / T and its derivative; CAP chooses the soft-capped form at compile time.
template <typename A, bool CAP>
struct Head {
  using V = Vectorized<A>;
  A cap, inv_cap, inv_temp;

  Head(std::optional<double> softcap, double temperature)
      : cap(static_cast<A>(softcap.value_or(1.0))),
        inv_cap(static_cast<A>(1.0 / softcap.value_or(1.0))),
        inv_temp(static_cast<A>(1.0 / temperature)) {}

  // z for a vector of raw logits; ``t`` receives tanh(x / cap) (CAP only).
  V z(const V& x, V& t) const {
    if constexpr (CAP) {
      t = (x * V(inv_cap)).tanh();
      return t * V(cap * inv_temp);
    } else {
      return x * V(inv_temp);
    }
  }

  A z(A x, A& t) const {
    if constexpr (CAP) {
      t = std::tanh(x * inv_cap);
      return t * (cap * inv_temp);
    } else {
      return x * inv_temp;
    }
  }

  // T * dz/dx from t = tanh(x / cap): 1 - t^2 (1 without softcap).
  static V capgrad(const V& t) { return V(A(1)) - t * t; }
  static A capgrad(A t) { return CAP ? A(1) - t * t : A(1); }
};

// exp of a vector. fp32: ATen's inlined polynomial (documented <= 20 ulp, measured <= 4e-7 relative on
// [-80, 0]), 2x faster than the call to Sleef's 1-ulp exp, which limited the row pass. fp64: Sleef.
template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// Argument checks shared by the operators; messages name the operator and the offending argument.
inline void check_logits_t(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": logits_t must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": logits_t must be 2-D [V, n] (vocab-major), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op,
              ": the tokens of a vocab row of logits_t must be contiguous (stride(1) == 1)");
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": logits_t must be fp32, fp64, bf16 or fp16, got ", st);
}

inline void check_tokens(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.is_contiguous(), op, ": ", name,
              " must be a contiguous CPU tensor of shape [", n, "], got ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_head(std::optional<double> softcap, double temperature, const char* op) {
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, op, ": softcap must be > 0 or None, got ", *softcap);
}

inline at::ScalarType math_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace wrpo
