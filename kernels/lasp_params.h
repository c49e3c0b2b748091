// Plain parameter struct shared by the op bindings (csrc/) and the kernels (csrc/cpu, kernels/).
// Free of torch headers, so the kernels compile without torch and GoogleTest can drive them directly.
//
// Every tensor is seen through its logical (b, h, n, last) shape with element strides, so both the
// (B, H, N, D) and the (B, N, H, D) memory layouts reach the kernels without copies.
#pragma once
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define LASP_HOST_DEVICE __host__ __device__
#else
#define LASP_HOST_DEVICE
#endif

namespace lasp {

// A decay rate as every kernel reads it: +inf (gamma = 0: no memory) becomes the large finite 1e30, which
// has the same powers (gamma^0 = 1, gamma^n = 0 for n >= 1), so that exp(-rate * 0) is never exp(NaN); a
// NaN rate stays NaN (it poisons its own head only, as a PyTorch op would). The kernels apply it, so the op
// passes the caller's rates without a clamping kernel per call.
template <typename A>
LASP_HOST_DEVICE inline A finite_rate(A rate) {
  return rate > A(1e30) ? A(1e30) : rate;
}

enum class ScalarType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Accumulation type of a ScalarType: double for Float64, float for everything else.
// States (S_in, S_out, G, dS_in) and decay rates are stored in this type.
inline bool acc_is_double(ScalarType t) { return t == ScalarType::Float64; }
// Bytes of one accumulation-type element.
inline size_t acc_size(ScalarType t) { return acc_is_double(t) ? 8 : 4; }

// A strided (b, h, n, last) view; strides are in elements.
struct TensorView4 {
  void* ptr = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

// Notation as in docs/design.md: per batch b and output head h, positions t = 0 .. N-1 of this piece,
// gamma_h = exp(-decay[h]). Head maps: output head h reads q head h / (H / Hq), k head h / (H / Hkv) and
// v head h / (H / Hv), where H = max(Hq, Hv) and each of Hq, Hkv, Hv divides H (MHA, GQA, MQA: Hq = H,
// Hv = Hkv; GVA: Hq = Hkv < Hv = H). States, decay, g and o are per output head.
struct AttnParams {
  ScalarType dtype = ScalarType::Float32;  // of q, k, v, o, dout, dq, dk, dv
  int64_t B = 0, H = 0, Hkv = 0, N = 0, D = 0, E = 0;
  int64_t Hq = 0, Hv = 0;  // q and v heads (base_params sets both; backends without head maps need Hq == H, Hv == Hkv)
  double scale = 1.0;
  const void* decay = nullptr;  // [H] rates lambda >= 0 (acc type); nullptr means gamma = 1
  // Per-token log gates g <= 0 (-inf: a reset), contiguous (B, H, N) in the acc type, or nullptr (none).
  // The log gate of token t, head h is g[b, h, t] - lambda_h: every gamma^n below then reads
  // exp(sum of the log gates of those n tokens). Backends without gates refuse params with g set.
  const void* g = nullptr;
  // bwd with g: writes the gradient of g (acc type, contiguous (B, H, N)). In exact arithmetic
  // dg[t] = sum_{t' >= t} (q[t'].dq_h[t'] - k[t'].dk_h[t']) + <G, state_out>, with dq_h, dk_h the parts of
  // dq and dk from output head h (state terms included): the sum of the decay-weighted pairs that span
  // token t. Backends sum the spanning pairs without cancelling terms (csrc/cpu, bwd_dkdv_impl).
  void* dg_part = nullptr;
  // Set where every log gate is 0 or -inf (document starts of a packed row, no per-token gates) and no dg
  // is wanted (dg_part null): the sm_90a main kernels then take the powers of gamma cut at the starts
  // instead of gate weights (wgmma.cuh, ResetTile). Every other kernel reads g as gates, which is the same.
  bool g_resets = false;

  TensorView4 q, k, v;  // q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hv, N, E)
  TensorView4 o;        // (B, H, N, E)
  TensorView4 dout;     // (B, H, N, E)
  TensorView4 dq;       // (B, Hq, N, D): summed over the output heads that read each q head
  TensorView4 dk, dv;   // (B, Hkv, N, D), (B, Hv, N, E): summed over the output heads that read each head

  // States: contiguous (B, H, D, E) in the acc type.
  const void* state_in = nullptr;        // S_in, state before position 0; nullptr means zero
  void* state_out = nullptr;             // forward writes gamma^N S_in + L (nullptr: not wanted)
  const void* grad_state_out = nullptr;  // G, gradient w.r.t. state_out; nullptr means zero
  void* grad_state_in = nullptr;         // backward writes gamma^N G + M (nullptr: not wanted)

  // Scratch memory for kernels that need it (see the *_workspace_bytes functions).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // The launch plan of the calls that share this workspace (a cuda::CallPlan, lasp_cuda.h), made once by
  // whoever allocated it; nullptr: each entry point called without a plan makes its own.
  const void* call_plan = nullptr;

  // bwd (and bwd_prepare): the segment input states a fwd of the same problem left in its workspace
  // ((B, H, nseg, D, E) in the acc type), or nullptr (the bwd computes them again from k, v, S_in). Only
  // valid where the fwd and the bwd split the sequence alike (fwd_split and bwd_split agree).
  const void* seg_states = nullptr;
  // bwd: the segments of the states a fwd of the same problem kept (0: none kept). The backward's plan
  // leans toward that split (segments_for, kept), so that it can take them (seg_states) instead of
  // computing them again.
  int64_t kept_nseg = 0;

  // Set on every backward call of one problem (bwd_prepare, bwd_local, bwd) when none of them has a
  // grad_state_out: the plan may then choose kernels that take only that case (kernels/plan.h).
  bool no_state_grad = false;

  // Set when the caller asks for bitwise reproducible results (torch.use_deterministic_algorithms): the sm_90a
  // backward then sums the gradients of shared q / k / v heads in a fixed order (per-output-head workspace and
  // a second pass) instead of by fp32 atomic adds in L2 (kernels/plan.h, Plan::heads_f32).
  bool deterministic = false;

  // Set on a fwd that follows a fwd_local (on a bwd that follows a bwd_local and a bwd_prepare) of the
  // same problem with the same workspace: the work those did is reused (only state_in / grad_state_out
  // / the state outputs may differ).
  bool local_ready = false;
};

// The building blocks every backend implements (docs/design.md, "Across ranks"):
//
//  fwd:       o[t] = scale * (gamma^(t+1) q[t] S_in + sum_{s<=t} gamma^(t-s) (q[t].k[s]) v[s])
//             state_out = gamma^N S_in + L,  L = sum_s gamma^(N-1-s) k[s]^T v[s]
//  fwd_local: state_out = L                 (o untouched; no incoming state needed)
//  bwd:       dq[t] = scale * (gamma^(t+1) do[t] S_in^T + sum_{s<=t} gamma^(t-s) (do[t].v[s]) k[s])
//             dk[s] = sum_h [ scale * sum_{t>=s} gamma^(t-s) (do[t].v[s]) q[t] + gamma^(N-1-s) v[s] G^T ]
//             dv[s] = sum_h [ scale * sum_{t>=s} gamma^(t-s) (q[t].k[s]) do[t] + gamma^(N-1-s) k[s] G ]
//             grad_state_in = gamma^N G + M,  M = scale * sum_t gamma^(t+1) q[t]^T do[t]
//  bwd_local: grad_state_in = M             (dq, dk, dv untouched; no outgoing-state gradient needed)
//  bwd_prepare: no output; whatever else of bwd needs neither G nor M (the CUDA kernels: the forward
//             segment states from k, v and S_in), into the workspace, for a bwd with local_ready
//
// (sum_h runs over the query heads that read the kv head.) The ring runs fwd_local, passes states,
// then fwd with the incoming state (local_ready): the local pass is all that stands between a rank and
// its outgoing state, and the main pass is the single-device one.
}  // namespace lasp
