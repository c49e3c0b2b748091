// The log-gate value check of the ops as one kernel (csrc/cuda/attention_cuda.cpp, deferred_bad_value):
// torch-free, enqueue only.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lasp {
namespace cuda {

enum class ValueDtype : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

// Flags bad log gates among the n values at x (stored densely, in any order): ORs bit 0 into *flag (device
// memory the caller has zeroed) where one is > 0 (+inf included), bit 1 where one is NaN. Enqueued on
// `stream`; returns the launch's error.
cudaError_t flag_bad_gates(const void* x, int64_t n, ValueDtype dtype, unsigned* flag, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
