// Tensor-core (mma.sync) path for bf16/fp16 with D, E in {64, 128}: declarations used by lasp_cuda.cu.
#pragma once
#include <cuda_runtime_api.h>

#include "lasp_params.h"

namespace lasp {
namespace cuda {
namespace fast {

// Dtype and head dims the tensor-core kernels handle (bf16/fp16, D and E in {64, 128}); the *_supported
// functions below also check strides and alignment (last dim contiguous, rows 16-byte aligned).
bool shape_supported(const AttnParams& p);
// Whether the tensor-core kernels read or write view t (sizes B, heads, N) directly: its last dim
// contiguous, rows 16-byte aligned, no zero stride along a dim of more than one element.
bool view_ok(const TensorView4& t, const AttnParams& p, int64_t heads);
// Shared memory (bytes) of the tensor-core forward main / backward kernels for this problem's D, E.
size_t fwd_smem_bytes(const AttnParams& p);
size_t bwd_smem_bytes(const AttnParams& p);
// Whether the tensor-core forward main kernel handles this problem.
bool fwd_supported(const AttnParams& p);
// Blocks per (b, h, segment) of the forward main kernel (column tiles of E).
int fwd_tiles(const AttnParams& p);
// Blocks of the forward main kernel for this problem's dtype and D that one SM of the current device
// holds at once (at least 1): the segment split plans whole waves of them (D = 64: 3, D = 128: 2 on sm_90).
int fwd_blocks_per_sm(const AttnParams& p);
// Phase 3 of the forward: o (and state_out when nseg == 1) of every segment. seg_states: the
// (B, H, nseg, D, E) fp32 segment input states (used when nseg > 1).
cudaError_t fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t stream);

// Phase 1 with tensor cores: local state of every segment into out (B, H, nseg, D, E) fp32.
// reverse = false: L from (k, v); reverse = true: M from (q, dout). skip = 1 leaves out the segment whose
// state the in-place scan does not read (forward: the last, backward: the first; generic_kernels.cuh).
bool local_supported(const AttnParams& p, bool reverse);
cudaError_t state_local(const AttnParams& p, bool reverse, int nseg, int seglen, int skip, float* out,
                        cudaStream_t stream);
// The sm_90a phase-1 kernel (wgmma_state.cu), chosen by state_local where the main kernel of the same
// direction runs with wgmma (L: fwd_uses_wgmma(), M: bwd_uses_wgmma()).
cudaError_t wgmma_state_local(const AttnParams& p, bool reverse, int nseg, int seglen, int skip, float* out,
                              cudaStream_t stream);

// The sm_90a forward main kernel (wgmma_fwd.cu): same contract as fwd_main, chosen by fwd_main,
// fwd_blocks_per_sm and fwd_smem_bytes when fwd_uses_wgmma().
bool fwd_uses_wgmma();
size_t wgmma_fwd_smem_bytes(const AttnParams& p);
int wgmma_fwd_blocks_per_sm(const AttnParams& p);
cudaError_t wgmma_fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t stream);

// Fused tensor-core backward (dq, dk, dv, and grad_state_in with one segment).
bool bwd_supported(const AttnParams& p);
// Blocks of the backward kernel for this problem's dtype, D, E and GQA that one SM of the current device
// holds at once (registers and shared memory; at least 1): the segment split plans whole waves of them.
int bwd_blocks_per_sm(const AttnParams& p);
// seg_S / seg_G: segment input states / end-of-segment gradients (nseg > 1). dk_ws / dv_ws: with GQA,
// per-query-head fp32 (B, H, N, D|E) outputs to be reduced by the caller; nullptr writes p.dk / p.dv.
cudaError_t bwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_S, const float* seg_G,
                     float* dk_ws, float* dv_ws, cudaStream_t stream);

// The sm_90a backward main kernel (wgmma_bwd.cu): same contract as bwd_main, chosen by bwd_main,
// bwd_blocks_per_sm and bwd_smem_bytes when bwd_uses_wgmma().
bool bwd_uses_wgmma();
size_t wgmma_bwd_smem_bytes(const AttnParams& p);
int wgmma_bwd_blocks_per_sm(const AttnParams& p);
cudaError_t wgmma_bwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_S, const float* seg_G,
                           float* dk_ws, float* dv_ws, cudaStream_t stream);

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
