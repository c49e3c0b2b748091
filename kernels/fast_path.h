// Tensor-core (mma.sync) path for bf16/fp16 with D, E in {64, 128}: declarations used by lasp_cuda.cu.
#pragma once
#include <cuda_runtime_api.h>

#include "lasp_params.h"

namespace lasp {
namespace cuda {
namespace fast {

// Whether the tensor-core forward main kernel handles this problem.
bool fwd_supported(const AttnParams& p);
// Blocks per (b, h, segment) of the forward main kernel (column tiles of E).
int fwd_tiles(const AttnParams& p);
// Phase 3 of the forward: o (and state_out when nseg == 1) of every segment. seg_states: the
// (B, H, nseg, D, E) fp32 segment input states (used when nseg > 1).
cudaError_t fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t stream);

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
