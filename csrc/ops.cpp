// Schemas of the wrpo_kernels operators (torch.ops.wrpo_kernels.*); the CPU kernels register
// themselves in lse_target.cpp, logit_grad.cpp and workspace.cpp.
#include <torch/library.h>

TORCH_LIBRARY(wrpo_kernels, m) {
  // logits_t [V, n] vocab-major (fp32/fp64/bf16/fp16, stride(1) == 1), labels [n] int64 in [0, V)
  // -> lse [n], target logit z[label] [n] in the math dtype (fp64 for fp64, else fp32)
  m.def("lse_target(Tensor logits_t, Tensor labels, float? softcap, float temperature) -> (Tensor, Tensor)");
  // in place: logits_t <- scale / T * (onehot(label) - exp(z - lse)) * dsoftcap; scale, lse [n] math dtype
  m.def(
      "logit_grad_(Tensor(a!) logits_t, Tensor labels, Tensor scale, Tensor lse, float? softcap, "
      "float temperature) -> ()");
  // an uninitialised [rows, cols] CPU buffer on transparent huge pages where possible
  m.def("workspace(int rows, int cols, ScalarType dtype) -> Tensor");
}
