// lse_target: one read of a chunk's logits -> lse and target logit per token (docs/method.md §4).
//
// The chunk is stored vocab-major, logits_t [V, n] (token t's logits are column t): that layout makes
// the chunk's three GEMMs ~15% faster on CPUs than [n, V] (MKL, measured), and a sweep over vocab
// rows reads memory sequentially with the tokens in the vector lanes. For token t, z = softcap(x)/T:
//   lse_t = log sum_v exp z_vt,   target_t = z[label_t, t],
// accumulated in fp32 (fp64 for fp64 input). Each thread takes a slice of the vocabulary and reads it
// once: for 16 tokens at a time (two vectors) and 8 vocab rows, it keeps in registers the max and the
// sum of exp(z - c) for a per-token shift c that may lag behind the running max (softmax is
// shift-invariant); where a block's max outruns c by more than the headroom (always in the first
// finite block), c moves up and the block, still in L1, is summed again. The slices' (c, sum) pairs
// are merged at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "head_math.h"

namespace wrpo {
namespace {

constexpr int64_t kBlockRows = 8;       // vocab rows read together (4 and 32 measured slower, 16 alike)
constexpr int64_t kMinSliceRows = 256;  // no thread gets a smaller slice of the vocabulary

template <typename T, bool CAP>
void lse_target_cols(const at::Tensor& xt, const int64_t* labels, acc_t<T>* lse, acc_t<T>* target,
                     const Head<acc_t<T>, CAP>& head) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = Io<T>;
  constexpr int64_t W = V::size(), S = IO::kStep;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  // A block whose max exceeds the shift by more than this is summed again with its own max as the
  // shift: exp(60) * 2^20 terms stays far below FLT_MAX, so a lagging shift never overflows.
  constexpr A kHeadroom = 60;
  const int64_t rows = xt.size(0), n = xt.size(1), ld = xt.stride(0);
  const int64_t n_pad = (n + S - 1) / S * S, full = n / S * S;
  const T* base = xt.const_data_ptr<T>();
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinSliceRows));
  std::vector<A> slice_c(slices * n_pad), slice_s(slices * n_pad);

  // the two vectors of tokens [k, k + S) of vocab row v (lanes past n read as -inf)
  auto load_step = [&](int64_t v, int64_t k, V& a, V& b) {
    if (k < full) {
      IO::load(base + v * ld + k, a, b);
    } else {
      IO::load_part(base + v * ld + k, n - k, kNegInf, a, b);
    }
  };

  at::parallel_for(0, slices, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // per token: sum s of exp(z - c) for a shift c <= the running max (c = -inf: nothing seen yet)
      A* c = slice_c.data() + p * n_pad;
      A* s = slice_s.data() + p * n_pad;
      std::fill(c, c + n_pad, kNegInf);
      std::fill(s, s + n_pad, A(0));
      const int64_t v_end = rows * (p + 1) / slices;
      for (int64_t v0 = rows * p / slices; v0 < v_end; v0 += kBlockRows) {
        const int64_t v1 = std::min(v0 + kBlockRows, v_end);
        for (int64_t k = 0; k < n; k += S) {
          // one read of the block's rows for tokens [k, k + S): max and sum of exp(z - c), in registers
          V c0 = V::loadu(c + k), c1 = V::loadu(c + k + W);
          auto safe = [&](const V& cv) { return V::blendv(V(A(0)), cv, cv > V(kNegInf)); };  // -inf -> 0
          V m0, m1, s0, s1;
          auto block_sums = [&](const V& sh0, const V& sh1) {  // -> m0, m1, s0, s1 (locals: registers)
            V a, b, t, ma(kNegInf), mb(kNegInf), sa(A(0)), sb(A(0));
            for (int64_t v = v0; v < v1; ++v) {
              load_step(v, k, a, b);
              const V za = head.z(a, t), zb = head.z(b, t);
              ma = at::vec::maximum(ma, za);
              mb = at::vec::maximum(mb, zb);
              sa += vexp(za - sh0);
              sb += vexp(zb - sh1);
            }
            m0 = ma, m1 = mb, s0 = sa, s1 = sb;
          };
          block_sums(safe(c0), safe(c1));
          // where the block's max outruns the shift by > kHeadroom (always in a first finite block),
          // move the shift to the max and sum the block again (its rows are still in L1/L2)
          const V over0 = (m0 - c0) > V(kHeadroom), over1 = (m1 - c1) > V(kHeadroom);
          const int all = (1 << W) - 1;
          if (over0.zero_mask() != all || over1.zero_mask() != all) {
            V s_old0 = V::loadu(s + k), s_old1 = V::loadu(s + k + W);
            const V n0 = at::vec::maximum(c0, m0), n1 = at::vec::maximum(c1, m1);
            V::blendv(V(A(0)), s_old0 * vexp(c0 - n0), n0 > V(kNegInf)).store(s + k);
            V::blendv(V(A(0)), s_old1 * vexp(c1 - n1), n1 > V(kNegInf)).store(s + k + W);
            c0 = n0;
            c1 = n1;
            c0.store(c + k);
            c1.store(c + k + W);
            block_sums(safe(c0), safe(c1));
          }
          const V t0 = V::loadu(s + k) + s0, t1 = V::loadu(s + k + W) + s1;
          V::blendv(t0, m0, m0 != m0).store(s + k);  // a NaN logit makes the sum NaN
          V::blendv(t1, m1, m1 != m1).store(s + k + W);
        }
      }
    }
  });

  // merge the slices; pick the target logit
  at::parallel_for(0, n, 4096, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      A m = kNegInf, s = 0;  // lse = log sum_p s_p exp(c_p), with the largest shift m factored out
      for (int64_t p = 0; p < slices; ++p) m = std::max(m, slice_c[p * n_pad + t]);
      for (int64_t p = 0; p < slices; ++p) {
        if (slice_s[p * n_pad + t] != A(0)) {  // skips empty slices (c_p = -inf), keeps NaN
          s += slice_s[p * n_pad + t] * std::exp(slice_c[p * n_pad + t] - m);
        }
      }
      lse[t] = m + std::log(s);
      const int64_t label = labels[t];
      TORCH_CHECK(label >= 0 && label < rows, "lse_target: label ", label, " of token ", t,
                  " is outside [0, ", rows, ")");
      A tanh_unused;
      target[t] = head.z(static_cast<A>(base[label * ld + t]), tanh_unused);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lse_target(const at::Tensor& logits_t, const at::Tensor& labels,
                                              std::optional<double> softcap, double temperature) {
  constexpr const char* op = "wrpo_kernels::lse_target";
  check_logits_t(logits_t, op);
  const int64_t n = logits_t.size(1);
  check_tokens(labels, n, at::kLong, op, "labels");
  TORCH_CHECK(n == 0 || logits_t.size(0) > 0, op, ": logits_t has no vocabulary rows");
  check_head(softcap, temperature, op);
  auto opts = logits_t.options().dtype(math_type(logits_t.scalar_type()));
  at::Tensor lse = at::empty({n}, opts), target = at::empty({n}, opts);
  if (n == 0) return {lse, target};
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits_t.scalar_type(), "lse_target", [&] {
    using A = acc_t<scalar_t>;
    A* l = lse.mutable_data_ptr<A>();
    A* tg = target.mutable_data_ptr<A>();
    if (softcap.has_value()) {
      lse_target_cols<scalar_t, true>(logits_t, lab, l, tg, Head<A, true>(softcap, temperature));
    } else {
      lse_target_cols<scalar_t, false>(logits_t, lab, l, tg, Head<A, false>(softcap, temperature));
    }
  });
  return {lse, target};
}

}  // namespace

TORCH_LIBRARY_IMPL(wrpo_kernels, CPU, m) { m.impl("lse_target", &lse_target); }

}  // namespace wrpo
