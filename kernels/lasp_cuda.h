// CUDA entry points of the lasp kernels. Torch-free: the bindings in csrc/cuda fill an AttnParams
// and call these on the current stream; tests/cpp drives them directly.
//
// Every function only enqueues work on `stream` (no host synchronisation) and returns the first
// CUDA error met (cudaSuccess otherwise). Semantics of each are in lasp_params.h.
// Workspace: the caller allocates at least *_workspace_bytes(p) bytes (content undefined) and sets
// p.workspace / p.workspace_bytes. fwd_local / bwd_local and the fwd / bwd with local_ready that
// follows them must get the same workspace (fwd_local: fwd_workspace_bytes; bwd_local and bwd_prepare:
// bwd_workspace_bytes).
#pragma once
#include <cuda_runtime_api.h>

#include "lasp_params.h"
#include "plan.h"

namespace lasp {
namespace cuda {

// Whether the kernels support this problem (dtype, head dims); false means the caller must refuse it.
bool supports(const AttnParams& p);

size_t fwd_workspace_bytes(const AttnParams& p);
size_t bwd_workspace_bytes(const AttnParams& p);

// Which kernel runs the tensor-core forward main pass: FwdKernel::Wgmma (Hopper warpgroup MMAs, the
// default; used where the build has sm_90a code and the device is compute capability 9.0, else the
// mma.sync kernel runs) or FwdKernel::Mma (mma.sync everywhere). The first value comes from the
// environment variable LASP_FWD_KERNEL ("wgmma" or "auto": the default; "mma"). Change it only between
// problems: a fwd_local and the fwd with local_ready that follows it must run under the same setting
// (their segment plans must agree).
enum class FwdKernel : int { Mma = 0, Wgmma = 1 };
void set_fwd_kernel(FwdKernel which);
FwdKernel fwd_kernel();
// Whether the wgmma kernels can run on the current device (sm_90a code built in, compute capability 9.0).
bool wgmma_available();
// The kernel family the forward main pass of p would use: "wgmma", "mma" or "generic" (for tests and benchmarks);
// head dims above 128 run as blocks of at most 128 (lasp_cuda.cu), "wgmma+mma" where the blocks differ.
const char* fwd_main_kernel_name(const AttnParams& p);

// The same choice for the tensor-core backward main pass: BwdKernel::Wgmma (warpgroup MMAs, the default,
// where they can run) or BwdKernel::Mma (mma.sync everywhere). First value from LASP_BWD_KERNEL ("wgmma"
// or "auto": the default; "mma"); the same rule about changing it between problems (bwd_local,
// bwd_prepare and the bwd that follows them share one plan).
enum class BwdKernel : int { Mma = 0, Wgmma = 1 };
void set_bwd_kernel(BwdKernel which);
BwdKernel bwd_kernel();
// The kernel family the backward main pass of p would use: "wgmma", "mma", "wgmma+mma" or "generic".
const char* bwd_main_kernel_name(const AttnParams& p);

// How the forward (backward) of p cuts each sequence: nseg segments of seglen tokens (the last may be
// shorter); false where p is not supported. With nseg > 1, the workspace of a fwd holds each segment's
// input state afterwards ((B, H, nseg, D, E), acc type, from offset 0): a bwd of the same problem whose
// split is the same may take it as p.seg_states instead of computing it again.
bool fwd_split(const AttnParams& p, int64_t* nseg, int64_t* seglen);
bool bwd_split(const AttnParams& p, int64_t* nseg, int64_t* seglen);

// The launch plan of one call, made once (plan_call) and given to every entry point of the call: a fwd_local
// and the fwd with local_ready that follows it, or a bwd_local, bwd_prepare and bwd, share one (and one
// workspace of at least workspace_bytes). Head dims above 128 run as blocks (lasp_cuda.cu), each with its
// own Plan; otherwise `whole` is the call's. It reads what kernels/plan.h reads (sizes, dtype, strides,
// pointer alignment, gates, no_state_grad, the kernel settings, the device), never the states' pointers or
// the workspace, so it may be made before the states and the workspace exist.
struct CallPlan {
  bool ok = false;          // false: the call cannot run (an unsupported problem); the entry points refuse it
  bool backward = false;
  bool blocks = false;      // by head-dim blocks
  int nblocks = 0;
  Plan block[4];            // blocks: each block's plan, in the drivers' order
  Plan whole;               // otherwise the call's plan
  size_t workspace_bytes = 0;
};
CallPlan plan_call(const AttnParams& p, bool backward);

// The entry points. Without a plan argument: p.call_plan where set, else plan_call(p, ...) of their own.
cudaError_t fwd(const AttnParams& p, cudaStream_t stream);
cudaError_t fwd_local(const AttnParams& p, cudaStream_t stream);
cudaError_t bwd(const AttnParams& p, cudaStream_t stream);
cudaError_t bwd_local(const AttnParams& p, cudaStream_t stream);
cudaError_t bwd_prepare(const AttnParams& p, cudaStream_t stream);
cudaError_t fwd(const AttnParams& p, const CallPlan& plan, cudaStream_t stream);
cudaError_t fwd_local(const AttnParams& p, const CallPlan& plan, cudaStream_t stream);
cudaError_t bwd(const AttnParams& p, const CallPlan& plan, cudaStream_t stream);
cudaError_t bwd_local(const AttnParams& p, const CallPlan& plan, cudaStream_t stream);
cudaError_t bwd_prepare(const AttnParams& p, const CallPlan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace lasp
