// Kernel arguments of the tensor-core paths (mma.sync: fast_fwd.cu / fast_bwd.cu; wgmma: wgmma_fwd.cu /
// wgmma_bwd.cu), filled once from AttnParams, and the environment switch that picks between the two.
#pragma once
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "lasp_params.h"

namespace lasp {
namespace cuda {
namespace fast {

// The chunk states that the gated wgmma backward keeps for one segment of `seglen` tokens: one after each
// even 64-token chunk before the segment's last (BwdArgs::chunk_S).
#ifdef __CUDACC__
__host__ __device__
#endif
inline int chunk_state_slots(int64_t seglen) {
  return (int)(((seglen + 63) / 64) / 2);
}

// One output that the head-dim blocks of lasp_cuda.cu sum over blocks (o over the blocks of D; dq, dk over
// those of E; dv over those of D), as an accumulating main kernel (ACC) leaves it. acc: the fp32 running
// sum, (b, h, n, x) with one head per query head and x contiguous; out: the 16-bit output view (x
// contiguous). Each element is written by one thread of one launch, so the modes need no atomics:
//   Store:  acc = value   (the first block of several)
//   Add:    acc += value  (a middle block, or any later block where a reduction over kv heads follows)
//   Finish: out = acc + value, rounded once  (the last block)
//   Direct: out = value   (the only block)
enum AccMode : int { kAccStore = 0, kAccAdd = 1, kAccFinish = 2, kAccDirect = 3 };
struct AccOut {
  float* acc;
  int64_t asb, ash, asn;
  void* out;
  int64_t osb, osh, osn;
  int mode;
};
struct AccOuts {  // dq, dk, dv of an accumulating backward
  AccOut x[3];
};

// What every tensor-core kernel gets: sizes, the segment split, scale, decay rates, the incoming state.
// q and v heads of p (0 in params that predate head maps: those of MHA / GQA / MQA).
inline int64_t q_heads(const AttnParams& p) { return p.Hq > 0 ? p.Hq : p.H; }
inline int64_t v_heads(const AttnParams& p) { return p.Hv > 0 ? p.Hv : p.Hkv; }

// Head maps (lasp_params.h): output head h reads q head h / qgroup, k head h / group, v head h / vgroup.
struct ArgsBase {
  int B, H, group, N, D, E, nseg, seglen;
  int qgroup, vgroup;
  float scale;
  const float* decay;
  const float* state_in;  // nseg == 1 (segments read their own input states)
  const float* g;         // per-token log gates, contiguous (B, H, N), or null (the kernels that take them: plan.cu)
};

inline void fill_base(ArgsBase& a, const AttnParams& p, int nseg, int seglen) {
  a.B = (int)p.B;
  a.H = (int)p.H;
  a.group = (int)(p.H / p.Hkv);
  a.qgroup = (int)(p.H / q_heads(p));
  a.vgroup = (int)(p.H / v_heads(p));
  a.N = (int)p.N;
  a.D = (int)p.D;
  a.E = (int)p.E;
  a.nseg = nseg;
  a.seglen = seglen;
  a.scale = (float)p.scale;
  a.decay = static_cast<const float*>(p.decay);
  a.state_in = static_cast<const float*>(p.state_in);
  a.g = static_cast<const float*>(p.g);
}

struct FwdArgs : ArgsBase {
  const float* seg_states;  // nseg > 1: (B, H, nseg, D, E) segment input states
  float* state_out;         // written by the last segment's blocks
  float* local_out;         // state kernels: (B, H, nseg, D, E)
  int loc_first, loc_count;  // state kernels: the segments [loc_first, loc_first + loc_count) only
};

inline FwdArgs make_fwd_args(const AttnParams& p, int nseg, int seglen, const float* seg_states = nullptr) {
  FwdArgs a;
  fill_base(a, p, nseg, seglen);
  a.seg_states = seg_states;
  a.state_out = static_cast<float*>(p.state_out);
  a.local_out = nullptr;
  a.loc_first = 0;
  a.loc_count = nseg;
  return a;
}

// The state kernels' arguments (phase 1): local states into out, skip = 1 leaving out the segment the
// in-place scan does not read (forward: the last, backward: the first).
inline FwdArgs make_local_args(const AttnParams& p, bool reverse, int nseg, int seglen, int skip, float* out) {
  FwdArgs a = make_fwd_args(p, nseg, seglen);
  a.local_out = out;
  a.loc_first = reverse ? skip : 0;
  a.loc_count = nseg - skip;
  return a;
}

struct BwdArgs : ArgsBase {
  const float* grad_state_out;  // nseg == 1
  const float* seg_S;           // nseg > 1: (B, H, nseg, D, E)
  const float* seg_G;
  float* grad_state_in;         // written by the first segment's blocks
  // dk / dv go per output head (head h, not its k / v head) to the workspace views the launch gets (GQA,
  // MQA, GVA: summed by the caller); dq always goes to output head h (its view is the workspace where q
  // heads are shared)
  int dk_per_head, dv_per_head;
  // bits 1 (dq), 2 (dk), 4 (dv): that gradient is added (TMA reduce-add, fp32) into the zeroed fp32 view of
  // its own q / k / v heads that the launch maps (HeadWs::f32), not written per output head
  int red;
  // with gates (wgmma backward, no grad_state_out): dg (B, H, N) gets q[t].dq_h[t] - k[t].dk_h[t] per token,
  // each without its pair (t, t); chunk_S (16-bit, the state after each even 64-token chunk of a segment
  // before its last, in the fragment order of the kernel's registers: (B, H, nseg, chunk_state_slots(seglen))
  // states) and chunk_T ((B, H, ceil(N / 64)) fp32, zeroed: <S, R> at each chunk's end, the sum of those
  // per-token terms over every later token), or null
  float* dg;
  void* chunk_S;
  float* chunk_T;
};

inline BwdArgs make_bwd_args(const AttnParams& p, int nseg, int seglen, const float* seg_S, const float* seg_G,
                             bool dk_per_head, bool dv_per_head) {
  BwdArgs a;
  fill_base(a, p, nseg, seglen);
  a.grad_state_out = static_cast<const float*>(p.grad_state_out);
  a.seg_S = seg_S;
  a.seg_G = seg_G;
  a.grad_state_in = static_cast<float*>(p.grad_state_in);
  a.dk_per_head = dk_per_head ? 1 : 0;
  a.dv_per_head = dv_per_head ? 1 : 0;
  a.red = 0;
  a.dg = nullptr;
  a.chunk_S = nullptr;
  a.chunk_T = nullptr;
  return a;
}

// The kernel family an environment variable asks for: "mma" -> 0, "wgmma" -> 1, unset, empty or "auto" ->
// `dflt`; anything else is reported on stderr and gives `dflt`.
inline int kernel_choice_from_env(const char* var, int dflt) {
  const char* env = std::getenv(var);
  if (!env || !*env || std::strcmp(env, "auto") == 0) return dflt;
  if (std::strcmp(env, "mma") == 0) return 0;
  if (std::strcmp(env, "wgmma") == 0) return 1;
  std::fprintf(stderr, "lasp: %s must be \"auto\", \"wgmma\" or \"mma\" (got \"%s\"); using \"auto\"\n", var, env);
  return dflt;
}

// One kernel-family setting (0 mma.sync, 1 wgmma): read from `var` at first use, changed by set().
class KernelSwitch {
 public:
  constexpr KernelSwitch(const char* var, int dflt) : var_(var), dflt_(dflt) {}
  int get() {
    int v = v_.load(std::memory_order_relaxed);
    if (v < 0) {
      v = kernel_choice_from_env(var_, dflt_);
      v_.store(v, std::memory_order_relaxed);
    }
    return v;
  }
  void set(int v) { v_.store(v, std::memory_order_relaxed); }

 private:
  const char* var_;
  int dflt_;
  std::atomic<int> v_{-1};
};

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
