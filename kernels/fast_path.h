// The tensor-core kernels for bf16/fp16 (mma.sync and wgmma families): declarations
// used by the plan (plan.cu) and the drivers (lasp_cuda.cu).
#pragma once
#include <cuda_runtime_api.h>

#include "fast_args.h"
#include "lasp_params.h"

namespace lasp {
namespace cuda {
namespace fast {

// Dtype and head dims the tensor-core kernels handle: bf16/fp16, D and E multiples of 8 up to 128 (the
// mma.sync family pads them to {64, 128} at run time); the *_supported functions below also check strides
// and alignment (last dim contiguous, rows 16-byte aligned).
bool shape_supported(const AttnParams& p);
// The wgmma family's subset of shape_supported: D and E in {64, 128} exactly (its TMA boxes are the head
// dims); other dims take the mma.sync family on sm_90 too.
bool wgmma_shape(const AttnParams& p);
// Whether the tensor-core kernels read or write view t (sizes B, heads, N) directly: its last dim
// contiguous, rows 16-byte aligned, no zero stride along a dim of more than one element.
bool view_ok(const TensorView4& t, const AttnParams& p, int64_t heads);

// The two tensor-core families. Each entry runs its own family only; the plan (plan.h) chooses between
// them and the generic kernels for each role of a call.

// --- mma.sync (fast_fwd.cu, fast_bwd.cu): sm_80 and later ---
// Shared memory (bytes) and resident blocks per SM of the forward main kernel for this problem's dtype and D
// (at least 1): the segment split plans whole waves of them.
size_t mma_fwd_smem_bytes(const AttnParams& p);
int mma_fwd_blocks_per_sm(const AttnParams& p);
// Whether the tensor-core forward main kernels handle this problem (shape, strides, alignment).
bool fwd_supported(const AttnParams& p);
// Blocks per (b, h, segment) of the tensor-core forward main kernels (column tiles of E).
int fwd_tiles(const AttnParams& p);
// Phase 3 of the forward: o (and state_out from the last segment's blocks) of every segment. seg_states:
// the (B, H, nseg, D, E) fp32 segment input states (used when nseg > 1).
// o_acc: nullptr writes p.o; else o is one term of a sum over the head-dim blocks of lasp_cuda.cu, left
// as o_acc says (fast_args.h, AccOut).
cudaError_t mma_fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t stream,
                         const AccOut* o_acc = nullptr);

// Phase 1 with tensor cores: local state of every segment into out (B, H, nseg, D, E) fp32.
// reverse = false: L from (k, v); reverse = true: M from (q, dout). skip = 1 leaves out the segment whose
// state the in-place scan does not read (forward: the last, backward: the first; generic_kernels.cuh).
bool local_supported(const AttnParams& p, bool reverse);
cudaError_t mma_state_local(const AttnParams& p, bool reverse, int nseg, int seglen, int skip, float* out,
                            cudaStream_t stream);

// Per-output-head outputs of the backward in the input dtype (16-bit), contiguous (B, H, N, D|E), that the
// caller sums into each q, k, v head (in fp32, rounded once): dq where q heads are shared (GVA), dk where k
// heads are (GQA, MQA, GVA), dv where v heads are; null: written directly to p.dq / p.dk / p.dv.
// f32 (wgmma backward only, Plan::heads_f32): each non-null buffer is instead fp32 over the shared heads
// themselves, (B, Hq, N, D), (B, Hkv, N, D), (B, Hv, N, E) contiguous and zeroed, and the kernel adds each
// output head's part into it (TMA reduce-add in L2); the caller rounds it into the gradient.
struct HeadWs {
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  bool f32 = false;
};

// Fused tensor-core backward (dq, dk, dv, and grad_state_in from the first segment's blocks).
bool bwd_supported(const AttnParams& p);
size_t mma_bwd_smem_bytes(const AttnParams& p);
// Resident blocks per SM for this problem's dtype, D, E and GQA (registers and shared memory; at least 1).
int mma_bwd_blocks_per_sm(const AttnParams& p);
// seg_S / seg_G: segment input states / end-of-segment gradients (nseg > 1). ws: the per-output-head
// outputs (HeadWs).
// acc (head-dim blocks): nullptr as above; else dq, dk and dv are terms of sums over the blocks, left as
// acc[0..2] say (fast_args.h, AccOut: one head per output head; ws unused).
cudaError_t mma_bwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_S, const float* seg_G,
                         const HeadWs& ws, cudaStream_t stream, const AccOut* acc = nullptr);

// --- wgmma + TMA (wgmma_fwd.cu, wgmma_bwd.cu, wgmma_state.cu): sm_90a; same contracts as above ---
size_t wgmma_fwd_smem_bytes(const AttnParams& p);
int wgmma_fwd_blocks_per_sm(const AttnParams& p);
cudaError_t wgmma_fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t stream,
                           const AccOut* o_acc = nullptr);
cudaError_t wgmma_state_local(const AttnParams& p, bool reverse, int nseg, int seglen, int skip, float* out,
                              cudaStream_t stream);
// The gated delta rule's main forward pass (kernels/DESIGN.md, "The sm_90a forward"): p as for a gated
// forward of one segment (p.g the log gates, contiguous (B, H, N) fp32, no decay; q, k through their head
// maps) with p.v = W_v (B, H, N, E) and wk = W_k (B, H, N, D), both in q's dtype; writes o (p.o) and, from
// p.state_in (or zero), p.state_out. takes: an sm_90a device, 16-bit, D and E in {64, 128}, views the TMA
// maps take.
bool delta_fwd_wgmma_takes(const AttnParams& p);
cudaError_t delta_fwd_wgmma(const AttnParams& p, const TensorView4& wk, cudaStream_t stream);
size_t wgmma_bwd_smem_bytes(const AttnParams& p);
int wgmma_bwd_blocks_per_sm(const AttnParams& p);
// With gates (p.g; no grad_state_out): p.dg_part gets q[t].dq_h[t] - k[t].dk_h[t] per token, each without
// its pair (t, t); with chunk_S / chunk_T (fast_args.h, BwdArgs; chunk_T zeroed) also <S, R> at each chunk's
// end (dg_chunk_finish_kernel forms dg from both; without them dg_finish_kernel from the tokens' terms).
cudaError_t wgmma_bwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_S, const float* seg_G,
                           const HeadWs& ws, cudaStream_t stream, const AccOut* acc = nullptr,
                           void* chunk_S = nullptr, float* chunk_T = nullptr);

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
