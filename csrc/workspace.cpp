// workspace: an uninitialised [rows, cols] buffer for one chunk of logits, backed by transparent huge
// pages where the kernel allows it (madvise(MADV_HUGEPAGE), Linux).
//
// A chunk buffer is hundreds of MiB and is allocated once per call; with 4 KiB pages its first
// touch (inside the logits GEMM) costs one page fault per 4 KiB, a measurable share of a CPU step.
// 2 MiB pages cut that ~6x. Memory is returned when the tensor dies, exactly as with torch.empty.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace wrpo {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

at::Tensor workspace(int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "wrpo_kernels::workspace: negative shape [", rows, ", ", cols, "]");
  const size_t bytes = size_t(rows) * size_t(cols) * c10::elementSize(dtype);
  auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) {
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, size) != 0) throw std::bad_alloc();
    madvise(p, size, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
    return at::from_blob(p, {rows, cols}, [](void* q) { std::free(q); }, opts);
  }
#endif
  return at::empty({rows, cols}, opts);
}

}  // namespace

TORCH_LIBRARY_IMPL(wrpo_kernels, CompositeExplicitAutograd, m) { m.impl("workspace", &workspace); }

}  // namespace wrpo
