// Public C++ API of lasp (for LibTorch programs). Link against liblasp; the op is the same
// dispatcher op that Python's lasp.lasp_attention calls (torch.ops.lasp.lasp_attention).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace lasp {

struct AttentionOptions {
  std::optional<at::Tensor> decay;          // (H,) rates lambda >= 0, gamma = exp(-lambda); none: no decay
  std::optional<double> scale;              // default 1/sqrt(D)
  std::optional<at::Tensor> initial_state;  // (B, H, D, E) float32 (float64 for float64 inputs)
  std::optional<std::string> group_name;    // a registered c10d process group (sequence parallel)
  // across ranks: "ring" (LASP), "allgather" (LASP-2), "scan", or "scan:<m>" (ranks filling nodes of m
  // consecutive ranks: the scan runs within nodes first; exchange.h)
  std::string strategy = "ring";
  // (B, H, N) per-token log gates <= 0 (-inf: a reset), any floating dtype; differentiable. The log gate of
  // token t, head h is g[b, h, t] - decay[h]. CPU and CUDA tensors.
  std::optional<at::Tensor> g;
};

// Linear attention o[t] = scale * sum_{s<=t} gamma^(t-s) (q[t].k[s]) v[s] (+ the initial state's term), with
// gamma^(t-s) = exp(sum_{s<i<=t} g[i] - (t-s) decay[h]) when g is given
// on q (B, H, N, D), k (B, Hkv, N, D), v (B, Hkv, N, E). Returns (o, final_state). Differentiable.
std::tuple<at::Tensor, at::Tensor> lasp_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const AttentionOptions& options = {});

struct DeltaOptions {
  std::optional<double> scale;              // default 1/sqrt(D)
  std::optional<at::Tensor> initial_state;  // (B, H, D, E), any floating dtype; differentiable
  bool use_qk_l2norm = false;               // divide q and k by sqrt(sum of squares + 1e-6) over D first
  std::optional<std::string> group_name;    // a registered c10d process group (sequence parallel)
  std::string strategy = "ring";            // "ring", "allgather", "scan" or "scan:<m>" (as AttentionOptions)
};

// The gated delta rule (Gated DeltaNet; fla's chunk_gated_delta_rule), on one device:
//   S[t] = exp(g[t]) (I - beta[t] k[t]^T k[t]) S[t-1] + beta[t] k[t]^T v[t],   o[t] = scale q[t] S[t]
// q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hv, N, E); g (log decay <= 0, -inf resets) and beta (B, H, N) with
// H = max(Hq, Hv), each head count dividing H (output head h reads q head h / (H / Hq), and so on). Returns
// (o (B, H, N, E) in q's dtype, final_state (B, H, D, E) float32, float64 for float64 inputs).
// Differentiable in q, k, v, g, beta and the initial state. With a group_name, this rank's piece of the
// sequence: each piece maps its incoming state S -> T S + L (T: D x D per head) and the exchange passes the
// states along (every rank must call alike and run the backward; only the first rank reads initial_state).
std::tuple<at::Tensor, at::Tensor> gated_delta_attention(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& g,
                                                         const at::Tensor& beta, const DeltaOptions& options = {});

// Distributed checks: before each ring, the ranks compare their calls (shapes, dtype, strategy) with one
// small all-gather and raise the same error on every rank when they disagree. enabled: true, false, or
// unset = auto (on for Gloo and other non-NCCL groups, off for NCCL, where it costs a host sync).
// timeout_s bounds each wait on another rank (unset: the process group's timeout).
// Start-up defaults: env LASP_CHECK_GROUP (0/1) and LASP_CHECK_TIMEOUT_S.
void set_group_checks(std::optional<bool> enabled, std::optional<double> timeout_s);

// Value checks of both ops: g must hold log gates <= 0 (-inf a reset; a positive or NaN g raises) and decay
// rates >= 0. On the CPU the values are read at once; on a GPU one small kernel flags bad gates ahead of the
// op's kernels and the op waits for it once they are queued (so a host that runs ahead of the GPU waits at
// each gated call until the GPU reaches it), and decay is read once per tensor and in-place version.
// enabled = false reads no values (bad values then give undefined results). Start-up default: on, or env
// LASP_CHECK_VALUES (0/1).
void set_value_checks(bool enabled);
// The setting for the calling thread: its own (thread_value_checks) where it has one, else the above.
bool get_value_checks();
// The calling thread's own setting: 1 on, 0 off, -1 none (follow set_value_checks); returns the one it
// replaces. For a caller that has read the values itself (gated_delta_attention under a group reads g once
// before its C++ ops, which then need not read it again).
int64_t thread_value_checks(int64_t mode);

// How the ring's states travel between ranks with CUDA tensors: "auto" (the default: "peer" where every
// rank of an NCCL group can use it, else "nccl"), "nccl" (the process group's send/recv) or "peer" (one
// kernel per hop writes the state into the next rank's memory; every rank of the group on one node with
// peer access; float32 states, ring strategy). Start-up default: env LASP_RING_TRANSPORT. Every rank of
// a group must use the same setting.
void set_ring_transport(const std::string& transport);
std::string get_ring_transport();

// TransNormerLLM / Lightning Attention decay rates for num_heads heads (float32, CPU).
at::Tensor alibi_slopes(int64_t num_heads);

}  // namespace lasp
