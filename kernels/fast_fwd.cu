// Tensor-core forward (bf16/fp16): see fast_path.h.
#include "common.cuh"
#include "fast_path.h"

namespace lasp {
namespace cuda {
namespace fast {

bool fwd_supported(const AttnParams& p) { return false; }
int fwd_tiles(const AttnParams& p) { return 1; }
cudaError_t fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t stream) {
  return cudaErrorNotSupported;
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
