// Internal: the backend-independent drivers of the lasp_attention op (validation, output allocation,
// the LASP ring). Backends (CPU, CUDA) supply the four building blocks of lasp_params.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <functional>
#include <string>
#include <tuple>
#include <utility>

#include "lasp_params.h"

namespace lasp {

using at::Tensor;

class Ring;

// The lasp dtype of a tensor's dtype (float32, float16, bfloat16, float64; another raises a TypeError).
ScalarType to_lasp(at::ScalarType t);
// The (b, h, n, last) view of a 4-D tensor as the kernels read it: its data pointer and element strides.
TensorView4 view4(const Tensor& t);

// One hop of the ring through peer memory (Transport::Peer). dir 0: forward (rank r-1 -> r -> r+1), 1:
// backward. A rank with an upstream neighbour receives: out = gamma^n * (the state that rank sent) + add
// and in_copy = that state, gamma^n = exp(-decay[h] * n), or with per-token gates the (b, h) factors in
// `gamma`; the first rank of the direction sends `add` itself. A rank with a downstream neighbour sends
// the result on.
struct PeerHop {
  PeerHop(const Ring& ring, int dir, Tensor decay, int64_t n, const char* what)
      : ring(&ring), dir(dir), decay(std::move(decay)), n(n), what(what) {}
  const Ring* ring;
  int dir;
  Tensor decay;              // float32 (H,) rates, or undefined (no decay)
  Tensor gamma;              // float32 contiguous (B, H) factors (gates), or undefined (decay and n)
  // 0: the whole hop in one kernel (receive, update, send on). A hop in two calls, for an update the kernel
  // does not make (the delta rule's T S + L): 1 receives only (out = the received state; `add` zeros), 2
  // sends `add` only, as the same call of the channel as the phase-1 hop before it. Every rank of the group
  // makes both calls (a rank without an upstream or downstream neighbour makes a call that does nothing).
  int phase = 0;
  int64_t n;                 // tokens of this rank's piece
  const char* what;
  Tensor add, in_copy, out;  // float32 (B, H, D, E) states (in_copy, out: receiving ranks only)
};

// The building blocks of one backend. They receive filled params and run (or enqueue) the work.
struct Kernels {
  std::function<void(AttnParams&)> fwd, fwd_local, bwd, bwd_local, bwd_prepare;
  // Allocates the scratch memory a fwd_local + fwd (backward: bwd_local + bwd) pair shares and points
  // p.workspace at it; the returned tensor owns it. Empty for backends that need none.
  std::function<Tensor(AttnParams&, bool backward)> workspace;
  // The peer-memory hop; empty for backends without one (the ring then uses the process group).
  std::function<void(const PeerHop&)> peer_hop;
  // Whether the peer hop can run for this group, device and state size (the first call per triple is a
  // collective that maps the neighbours' memory; every rank gets the same answer). required: raise
  // instead of answering false.
  std::function<bool(const Ring&, const at::Device&, int64_t state_numel, bool required)> peer_ready;
  // How the forward (backward = false) or the backward of p cuts each sequence into segments (false:
  // unknown); empty for backends that keep no segment states (lasp_cuda.h, fwd_split / bwd_split).
  std::function<bool(const AttnParams&, bool backward, int64_t* nseg, int64_t* seglen)> split;
  // Whether the building blocks take per-token gates (AttnParams::g, dg_part) and general head maps
  // (Hq != H or Hv != Hkv). A call that needs one on a backend without it raises NotImplementedError (on
  // every rank, before any collective).
  bool gates = false;
  bool head_maps = false;
};

// How a backend cuts each sequence into segments, asked on `device` (Kernels::split's contract; the
// function makes `device` current itself). Registered per device type by the backends that keep segment
// states (csrc/cuda/attention_cuda.cpp, at static initialisation), so that the autograd function can pass
// the forward op the split it will use without code of that backend.
using SplitFn = bool (*)(const at::Device& device, const AttnParams& p, bool backward, int64_t* nseg,
                         int64_t* seglen);
// Registers fn for device type `type` (the last registration wins); returns true (to initialise a static).
bool register_split(c10::DeviceType type, SplitFn fn);

// A value check that does not wait for the whole stream: deferred_bad_value(x) queues a look at x's values where
// x lives and returns a function that waits for that look only, not for the work queued after it, and returns
// NaN where x holds a NaN, a positive value where it holds one (> 0), else a value <= 0. So an op can queue its
// kernels between the two and raise on bad values before it returns, with no host sync ahead of its kernels.
// Backends register it per device type (csrc/cuda/attention_cuda.cpp: one kernel and an event; inside a CUDA
// graph capture, where no host may wait, the function returns 0: values are not checked there). Other devices
// (the CPU) read x's largest value at once.
using DeferredBad = std::function<double()>;
using DeferredBadFn = DeferredBad (*)(const Tensor& x);
bool register_deferred_bad_value(c10::DeviceType type, DeferredBadFn fn);
DeferredBad deferred_bad_value(const Tensor& x);
// The log-gate check of the ops (g <= 0, no NaN; -inf is a reset) from such a value (or g's largest value):
// raises a ValueError that names g and what it held. op names the op in the message.
void check_gate_value(const char* op, double bad);

// The split (nseg, seglen) the forward op would use for q, k, v on one rank (no group), or false where the
// backend of q's device has no split function or cannot say (N = 0, an unsupported problem). It reads the
// sizes, strides, dtypes and the alignment of the data pointers (the tensor-core kernels need aligned
// rows), and assumes o in the layout alloc_out gives at a fresh allocation's alignment, which is what the
// forward op allocates; decay, scale and the initial state do not change the split, whether per-token
// gates are given (gated) does (it changes which kernel families run). q, k, v must be concrete tensors
// with memory (not symbolic, fake or functional ones of a trace). Raises check_inputs' errors for inputs
// the op would refuse.
bool forward_split(const Tensor& q, const Tensor& k, const Tensor& v, bool gated, int64_t* nseg, int64_t* seglen);

// Output heads H = max(q heads, v heads) (lasp_params.h, head maps).
c10::SymInt out_heads(const Tensor& q, const Tensor& v);
// The input whose memory order the output takes (alloc_out): q, or v where v has more heads (GVA).
const Tensor& out_layout_like(const Tensor& q, const Tensor& v);

// Checks shapes, dtypes and devices of the op's inputs (symbolic sizes allowed, so the meta kernels
// share it). check_values also checks decay >= 0, which reads its values (once per tensor and version off
// the CPU); g's values are read by attention_fwd (deferred_bad_value). g: per-token log gates, (B, H, N), any floating dtype, or bool document starts (ops.cpp).
void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& decay,
                  const std::optional<Tensor>& initial_state, bool check_values,
                  const std::optional<Tensor>& g = std::nullopt);

// (B, H, N, last) output with the memory order of `like` ((B, *, N, *) or (B, N, *, *)), like's options or opts.
Tensor alloc_out(const Tensor& like, const c10::SymInt& H, const c10::SymInt& last);
Tensor alloc_out(const Tensor& like, const c10::SymInt& H, const c10::SymInt& last, const at::TensorOptions& opts);

at::ScalarType acc_type(at::ScalarType t);

// Whether the forward's third output (state_in) has 0 elements: no group and no initial_state (below).
inline bool fwd_saves_no_state(const std::optional<Tensor>& initial_state,
                               const std::optional<std::string>& group_name) {
  return !initial_state.has_value() && !group_name.has_value();
}

// Checks the forward op's seg_nseg and seg_seglen: both >= 0 (what they must equal is attention_fwd's).
void check_seg_split_args(int64_t seg_nseg, int64_t seg_seglen);

// Checks the segment-state arguments of the backward op (symbolic sizes allowed, so the meta kernel shares
// it): seg_states none, 0 elements, or an acc-type (B, H, nseg, D, E) tensor on q's device; seg_seglen >= 0,
// and >= 1 with segment states.
void check_seg_states(const Tensor& q, const Tensor& v, const std::optional<Tensor>& seg_states,
                      int64_t seg_seglen);

// Strategies across ranks: "ring" (LASP: state passed rank to rank) or "allgather" (LASP-2: one
// all-gather of the local states, prefix/suffix combination on each rank).
//
// Forward: (o, final_state, state_in, seg_states). state_in is the state this piece started from (cached
// for backward, so backward needs no second forward ring); without a group and without initial_state it
// is a 0-element tensor ("no incoming state", which the backward reads as zero), so that no zero-filled
// (B, H, D, E) state is made, launched and kept for each call.
// seg_nseg > 1 asks the forward to keep its segment input states for the backward: (seg_nseg, seg_seglen)
// must be its split (Kernels::split, else a ValueError), and seg_states is then the acc-type
// (B, H, seg_nseg, D, E) front of the forward's workspace (a view: no copy, no extra kernel). On one rank
// only: with a group of more than one rank the backward computes them again, and seg_nseg > 1 raises.
// seg_nseg 0 or 1: seg_states is a 0-element acc-type tensor.
// g: per-token log gates (B, H, N) (lasp_params.h); the state crossing a piece is then scaled by
// exp(sum of the piece's log gates) per (b, h) instead of gamma^n per head.
std::tuple<Tensor, Tensor, Tensor, Tensor> attention_fwd(const Kernels& kernels, const Tensor& q,
                                                         const Tensor& k, const Tensor& v,
                                                         const std::optional<Tensor>& decay, double scale,
                                                         const std::optional<Tensor>& initial_state,
                                                         const std::optional<std::string>& group_name,
                                                         const std::string& strategy, int64_t seg_nseg,
                                                         int64_t seg_seglen, const std::optional<Tensor>& g);

// Backward: (dq, dk, dv, grad_initial_state, dg). grad_initial_state is zero on group ranks > 0. dg: with
// g, the gradient of g, acc type, contiguous (B, H, N) (exact across ranks: the backend's main pass with
// G_r and S_in has every pair that spans a token); without g, a 0-element acc-type tensor. state_in:
// the forward's third output (0 elements: a zero incoming state). seg_states / seg_seglen: the forward's
// fourth output of the same call and the seg_seglen it was given (none, or 0 elements: none kept); used
// where the backward's own split is (seg_states.size(2), seg_seglen), else the backward computes the
// segment states again. With a group of more than one rank, segment states raise (none can have been kept).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(const Kernels& kernels, const Tensor& q,
                                                         const Tensor& k, const Tensor& v, const Tensor& dout,
                                                         const std::optional<Tensor>& grad_final_state,
                                                         const std::optional<Tensor>& decay, double scale,
                                                         const Tensor& state_in,
                                                         const std::optional<std::string>& group_name,
                                                         const std::string& strategy,
                                                         const std::optional<Tensor>& seg_states,
                                                         int64_t seg_seglen, const std::optional<Tensor>& g);

}  // namespace lasp
