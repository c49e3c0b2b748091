// CUDA entry points of the gated delta rule's kernels: the chain of states (delta_chain.h; shared memory
// (D + C) * 32 * sizeof(T) bytes per block, up to 80 KiB at D = 256, C = 64 in float64) and the chunks'
// unit-triangular solves (delta_solve.h; (C + 128) * C * sizeof(T) bytes, 96 KiB at C = 64 in float64). Each
// enqueues on `stream` and returns the first CUDA error met.
#pragma once
#include <cuda_runtime_api.h>

#include "delta_chain.h"
#include "delta_solve.h"

namespace lasp {
namespace cuda {

cudaError_t delta_chain(const ChainArgs<float>& args, cudaStream_t stream);
cudaError_t delta_chain(const ChainArgs<double>& args, cudaStream_t stream);
cudaError_t delta_solve(const SolveArgs<float>& args, cudaStream_t stream);
cudaError_t delta_solve(const SolveArgs<double>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
