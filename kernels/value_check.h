// The log-gate value check of the ops as one kernel (csrc/cuda/attention_cuda.cpp, deferred_bad_value):
// torch-free, enqueue only.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lasp {
namespace cuda {

enum class ValueDtype : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

// Flags bad log gates among the n values at x (stored densely, in any order): bit 0 of *flag where one is
// > 0, bit 1 where one is NaN. *flag is host-mapped pinned memory the caller has zeroed; writers use plain
// stores of their own bit, so where both kinds occur either bit (or both) may remain: a nonzero flag is the
// verdict, the bit only names an example. Enqueued on `stream`; returns the launch's error.
cudaError_t flag_bad_gates(const void* x, int64_t n, ValueDtype dtype, unsigned* flag, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
