// CUDA entry point of the gated delta rule's chain of states (delta_chain.h). Enqueues on `stream`; returns
// the first CUDA error met. Shared memory: (D + C) * 32 * sizeof(T) bytes per block (up to 80 KiB at
// D = 256, C = 64 in float64).
#pragma once
#include <cuda_runtime_api.h>

#include "delta_chain.h"

namespace lasp {
namespace cuda {

cudaError_t delta_chain(const ChainArgs<float>& args, cudaStream_t stream);
cudaError_t delta_chain(const ChainArgs<double>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
