// Host entry points of the lasp CUDA kernels (see lasp_cuda.h): the drivers of the three phases, each
// launching the family its role got in the plan (plan.h), dtype dispatch and workspace sizes. Torch-free.
#include "lasp_cuda.h"

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "fast_path.h"
#include "generic_kernels.cuh"
#include "mma.cuh"
#include "plan.h"

namespace lasp {
namespace cuda {

namespace {
using namespace detail;

constexpr int kThreads = 256;

// A plan the kernels can run: valid, and the caller's workspace holds `need` bytes.
bool runnable(const Plan& pl, const AttnParams& p, size_t need) {
  return pl.ok && (need == 0 || (p.workspace != nullptr && p.workspace_bytes >= need));
}

template <typename K>
cudaError_t prepare(K kernel, size_t smem) {
  if (smem > 48 * 1024) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  return cudaSuccess;
}

#define LASP_TRY(expr)                  \
  do {                                  \
    cudaError_t err__ = (expr);         \
    if (err__ != cudaSuccess) return err__; \
  } while (0)
#define LASP_LAUNCHED() LASP_TRY(cudaGetLastError())

template <typename A>
Ctx<A> make_ctx(const AttnParams& p, int nseg, int seglen) {
  Ctx<A> c;
  c.B = (int)p.B;
  c.H = (int)p.H;
  c.Hkv = (int)p.Hkv;
  c.group = (int)(p.H / p.Hkv);
  c.Hq = (int)p.Hq;
  c.Hv = (int)p.Hv;
  c.gq = (int)(p.H / p.Hq);
  c.gk = c.group;
  c.gv = (int)(p.H / p.Hv);
  c.g = static_cast<const A*>(p.g);
  c.N = (int)p.N;
  c.D = (int)p.D;
  c.E = (int)p.E;
  c.scale = (A)p.scale;
  c.decay = static_cast<const A*>(p.decay);
  c.nseg = nseg;
  c.seglen = seglen;
  return c;
}

// Phase 1: the local state of each of the c.nseg segments into ws ((B, H, nseg, D, E)); forward: L from
// k, v (reverse = false); backward: M from q, dout (reverse = true). With one segment, ws may be the
// (B, H, D, E) output itself. skip = 1: all but the last segment visited (forward: the last, backward:
// the first), whose state only the call's returned state needs, and the main kernel writes that one.
template <typename T, typename A>
cudaError_t local_states(const AttnParams& p, const Plan& pl, Family family, const Ctx<A>& c, bool reverse, A* ws,
                         int skip, cudaStream_t st) {
  float* out = reinterpret_cast<float*>(ws);
  if (family == Family::Wgmma) return fast::wgmma_state_local(p, reverse, c.nseg, c.seglen, skip, out, st);
  if (family == Family::Mma) return fast::mma_state_local(p, reverse, c.nseg, c.seglen, skip, out, st);
  dim3 g((unsigned)(p.B * p.H), c.nseg - skip, (unsigned)((p.E + pl.t_loc - 1) / pl.t_loc));
  const int seg0 = reverse ? skip : 0;
  if (!reverse) {
    auto kl = state_local_kernel<T, A, false>;
    LASP_TRY(prepare(kl, pl.sm_loc));
    kl<<<g, kThreads, pl.sm_loc, st>>>(c, make_tv<const T>(p.k), make_tv<const T>(p.v), c.D, c.E, pl.C_loc, pl.t_loc, ws,
                                       seg0);
  } else {
    auto kl = state_local_kernel<T, A, true>;
    LASP_TRY(prepare(kl, pl.sm_loc));
    kl<<<g, kThreads, pl.sm_loc, st>>>(c, make_tv<const T>(p.q), make_tv<const T>(p.dout), c.D, c.E, pl.C_loc,
                                       pl.t_loc, ws, seg0);
  }
  LASP_LAUNCHED();
  return cudaSuccess;
}

// Phase 2 over the segments' local states in ws. in_place: ws ends up holding each segment's incoming
// state (forward) or outgoing-state gradient (backward); otherwise ws is only read (the combined
// state alone is wanted: L with state_in = null, M with grad_state_out = null). skip = 1: the last
// segment visited has no local state in ws (out must be null; the main kernel writes the call's state).
// seglog: the segments' log-gate sums (with gates; segment_gate_logs), else null.
template <typename A>
cudaError_t combine_states(const AttnParams& p, const Ctx<A>& c, bool reverse, A* ws, const A* in, A* out,
                           bool in_place, int skip, const A* seglog, cudaStream_t st) {
  dim3 gs((unsigned)(p.B * p.H), (unsigned)((p.D * p.E + 255) / 256));
  if (!reverse) {
    scan_kernel<A, false><<<gs, 256, 0, st>>>(c, ws, in, out, in_place, skip, seglog);
  } else {
    scan_kernel<A, true><<<gs, 256, 0, st>>>(c, ws, in, out, in_place, skip, seglog);
  }
  LASP_LAUNCHED();
  return cudaSuccess;
}

// With gates and several segments: each segment's log-gate sum into the plan's gate region at off (bytes
// into the workspace); returns it (null: none needed).
template <typename A>
A* segment_gate_logs(const AttnParams& p, const Ctx<A>& c, size_t off, cudaStream_t st) {
  if (!p.g || c.nseg <= 1) return nullptr;
  A* out = reinterpret_cast<A*>(static_cast<char*>(p.workspace) + off);
  const int64_t total = (int64_t)c.B * c.H * c.nseg;  // one block per segment
  segment_gate_logs_kernel<A><<<(unsigned)total, 256, 0, st>>>(c, out);
  return out;
}

// Phase 1 + 2 of the forward state recurrence (segment input states into ws), shared by fwd and bwd.
// The last segment's local state is not computed: the forward's main kernel writes state_out itself.
template <typename T, typename A>
cudaError_t segment_states_fwd(const AttnParams& p, const Plan& pl, const Ctx<A>& c, A* ws, const A* seglog,
                               cudaStream_t st) {
  LASP_TRY((local_states<T, A>(p, pl, pl.local_fwd, c, false, ws, 1, st)));
  return combine_states<A>(p, c, false, ws, static_cast<const A*>(p.state_in), nullptr, true, 1, seglog, st);
}

// N = 0: nothing to attend to; the state passes through (state_out = S_in, grad_state_in = G, or zeros).
cudaError_t pass_state(const AttnParams& p, const void* src, void* dst, cudaStream_t st) {
  if (dst == nullptr) return cudaSuccess;
  const size_t bytes = (size_t)p.B * p.H * p.D * p.E * acc_size(p.dtype);
  return src ? cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st) : cudaMemsetAsync(dst, 0, bytes, st);
}

// pl: the call's plan (for a head-dim block, the block's: plan mode 1). o_acc: for the blocks, o one term of
// a sum over blocks, left as o_acc says (fast_args.h, AccOut); else nullptr.
template <typename T, typename A>
cudaError_t run_fwd(const AttnParams& p, const Plan& pl, cudaStream_t st, const fast::AccOut* o_acc = nullptr) {
  if (p.N == 0) return pass_state(p, p.state_in, p.state_out, st);
  if (!runnable(pl, p, pl.fwd_bytes()) || (o_acc && pl.main == Family::Generic)) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  A* ws = static_cast<A*>(p.workspace);
  if (pl.nseg > 1) {  // the segments' input states into ws (state_out comes from the last segment's blocks)
    const A* seglog = segment_gate_logs<A>(p, c, pl.ws_states, st);
    LASP_LAUNCHED();
    if (p.local_ready) {  // phase 1 ran in fwd_local with this workspace
      LASP_TRY(combine_states<A>(p, c, false, ws, static_cast<const A*>(p.state_in), nullptr, true, 1, seglog, st));
    } else {
      LASP_TRY((segment_states_fwd<T, A>(p, pl, c, ws, seglog, st)));
    }
  }
  const float* seg = reinterpret_cast<const float*>(ws);
  if (pl.main == Family::Wgmma) return fast::wgmma_fwd_main(p, pl.nseg, pl.seglen, seg, st, o_acc);
  if (pl.main == Family::Mma) return fast::mma_fwd_main(p, pl.nseg, pl.seglen, seg, st, o_acc);
  auto km = fwd_main_kernel<T, A>;
  LASP_TRY(prepare(km, pl.sm_main));
  dim3 g((unsigned)(p.B * p.H), pl.nseg, (unsigned)((p.E + pl.t_main - 1) / pl.t_main));
  km<<<g, kThreads, pl.sm_main, st>>>(c, make_tv<const T>(p.q), make_tv<const T>(p.k), make_tv<const T>(p.v),
                                      make_tv<T>(p.o), static_cast<const A*>(p.state_in), ws,
                                      static_cast<A*>(p.state_out), pl.C_main, pl.t_main);
  LASP_LAUNCHED();
  return cudaSuccess;
}

// pl: the call's plan (for a head-dim block, the block's: plan mode 1). acc: for the blocks, dq, dk, dv terms
// of sums over blocks, left as acc[0..2] say, per query head; else nullptr.
template <typename T, typename A>
cudaError_t run_bwd(const AttnParams& p, const Plan& pl, cudaStream_t st, const fast::AccOut* acc = nullptr) {
  if (p.N == 0) return pass_state(p, p.grad_state_out, p.grad_state_in, st);
  if (!runnable(pl, p, pl.bwd_bytes()) || (acc && pl.main == Family::Generic)) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  char* wsb = static_cast<char*>(p.workspace);
  // The forward's segment states when the caller kept them (same split), else this call's workspace.
  A* wsS = pl.ws_states ? (p.seg_states ? static_cast<A*>(const_cast<void*>(p.seg_states)) : reinterpret_cast<A*>(wsb))
                        : nullptr;
  A* wsG = pl.ws_states ? reinterpret_cast<A*>(wsb + pl.ws_states) : nullptr;
  A* wsKV = pl.ws_heads ? reinterpret_cast<A*>(wsb + 2 * pl.ws_states) : nullptr;
  const A* state_in = static_cast<const A*>(p.state_in);
  const A* gso = static_cast<const A*>(p.grad_state_out);
  A* gsi = static_cast<A*>(p.grad_state_in);
  // dg with a G: G's part is carried apart from the tokens' (generic_kernels.cuh, bwd_dqdk_kernel), so the
  // segments' state gradients leave it out.
  A* dg = static_cast<A*>(p.dg_part);
  const bool split = dg != nullptr && gso != nullptr && pl.main == Family::Generic;
  A* seglog = nullptr;
  if (pl.nseg > 1) {  // grad_state_in comes from the first segment's blocks
    seglog = segment_gate_logs<A>(p, c, pl.bwd_gates_offset(), st);
    LASP_LAUNCHED();
    if (!p.local_ready) {  // else bwd_local ran phase 1 (and the forward states) with this workspace
      if (!p.seg_states) LASP_TRY((segment_states_fwd<T, A>(p, pl, c, wsS, seglog, st)));
      LASP_TRY((local_states<T, A>(p, pl, pl.local, c, true, wsG, 1, st)));
    }
    LASP_TRY(combine_states<A>(p, c, true, wsG, split ? nullptr : gso, nullptr, true, 1, seglog, st));
  }
  if (acc) {
    const float *segS = reinterpret_cast<const float*>(wsS), *segG = reinterpret_cast<const float*>(wsG);
    return pl.main == Family::Wgmma ? fast::wgmma_bwd_main(p, pl.nseg, pl.seglen, segS, segG, {}, st, acc)
                                    : fast::mma_bwd_main(p, pl.nseg, pl.seglen, segS, segG, {}, st, acc);
  }
  const int nb = 132 * 16;
  if (pl.main != Family::Generic) {
    // where heads are shared: per output head (ws_heads: [dq | dk | dv] in T), summed below, or (heads_f32)
    // fp32 sums over the shared heads, zeroed here, that the kernel adds into and that are rounded below
    fast::HeadWs hw;
    if (pl.heads_f32) {
      hw.f32 = true;
      char* w = reinterpret_cast<char*>(wsKV);
      void** regions[3] = {&hw.dq, &hw.dk, &hw.dv};
      for (int i = 0; i < 3; ++i) {
        const size_t bytes = heads_f32_bytes(p, i);
        if (bytes) *regions[i] = w, w += bytes;
      }
      LASP_TRY(cudaMemsetAsync(wsKV, 0, pl.ws_heads, st));
    } else {
      const size_t bhn = (size_t)p.B * p.H * p.N;
      T* const wsT = reinterpret_cast<T*>(wsKV);
      if (p.Hq != p.H) hw.dq = wsT;
      if (p.Hkv != p.H) hw.dk = wsT + bhn * p.D;
      if (p.Hv != p.H) hw.dv = wsT + 2 * bhn * p.D;
    }
    const float *segS = reinterpret_cast<const float*>(wsS), *segG = reinterpret_cast<const float*>(wsG);
    // gates (wgmma, no G): the chunk states and the chunks' <S, R> (zeroed: the kernel adds to them)
    void* chunk_S = pl.ws_chunk_states ? wsb + pl.bwd_chunks_offset() : nullptr;
    float* chunk_T = pl.ws_chunk_states ? reinterpret_cast<float*>(wsb + pl.bwd_chunks_offset() + pl.ws_chunk_states)
                                        : nullptr;
    if (chunk_T) LASP_TRY(cudaMemsetAsync(chunk_T, 0, pl.ws_chunk_sums, st));
    LASP_TRY(pl.main == Family::Wgmma
                 ? fast::wgmma_bwd_main(p, pl.nseg, pl.seglen, segS, segG, hw, st, nullptr, chunk_S, chunk_T)
                 : fast::mma_bwd_main(p, pl.nseg, pl.seglen, segS, segG, hw, st));
    if (dg && chunk_T) {  // gates (wgmma, no G): sums within each chunk, plus <S, R> at its end
      const int64_t rows = p.B * p.H, warps = rows * ((p.N + 63) / 64);
      dg_chunk_finish_kernel<A><<<(unsigned)((warps + 7) / 8), 256, 0, st>>>(rows, (int)p.N, dg, chunk_T);
      LASP_LAUNCHED();
    } else if (dg) {  // the suffix sums of the tokens' terms
      dg_finish_kernel<A><<<(unsigned)(p.B * p.H), kFinishThreads, 0, st>>>(c, dg, nullptr, nullptr, nullptr);
      LASP_LAUNCHED();
    }
    const void* wss[3] = {hw.dq, hw.dk, hw.dv};
    const TensorView4* outs[3] = {&p.dq, &p.dk, &p.dv};
    const int houts[3] = {c.Hq, c.Hkv, c.Hv}, xs[3] = {c.D, c.D, c.E};
    for (int i = 0; i < 3; ++i) {
      if (!wss[i]) continue;
      if (hw.f32) {  // the sums, one head each: rounded into the gradient
        Ctx<A> c1 = c;
        c1.H = houts[i];
        reduce_heads_generic_kernel<T, A, float>
            <<<nb, 256, 0, st>>>(c1, static_cast<const float*>(wss[i]), make_tv<T>(*outs[i]), houts[i], xs[i]);
      } else {
        reduce_heads_generic_kernel<T, A, T>
            <<<nb, 256, 0, st>>>(c, static_cast<const T*>(wss[i]), make_tv<T>(*outs[i]), houts[i], xs[i]);
      }
      LASP_LAUNCHED();
    }
    return cudaSuccess;
  }
  const Tv<const T> q = make_tv<const T>(p.q), k = make_tv<const T>(p.k), v = make_tv<const T>(p.v),
                    dout = make_tv<const T>(p.dout);
  const int gdq = (int)((p.D + pl.t_main - 1) / pl.t_main), gdv = (int)((p.E + pl.t_dv - 1) / pl.t_dv);
  dim3 g1((unsigned)(p.B * p.H), pl.nseg, gdq), g2((unsigned)(p.B * p.H), pl.nseg, gdv);
  A* gp = split ? reinterpret_cast<A*>(wsb + pl.bwd_gates_offset() + pl.ws_gates) : nullptr;
  if (dg) LASP_TRY(cudaMemsetAsync(dg, 0, (size_t)p.B * p.H * p.N * sizeof(A), st));
  if (gp) LASP_TRY(cudaMemsetAsync(gp, 0, (size_t)p.B * p.H * p.N * sizeof(A), st));
  if (!pl.ws_heads) {  // each q, k and v head has one output head: the kernels write dq, dk, dv
    auto k1 = bwd_dqdk_kernel<T, A, T>;
    LASP_TRY(prepare(k1, pl.sm_main));
    k1<<<g1, kThreads, pl.sm_main, st>>>(c, q, k, v, dout, make_tv<T>(p.dq), make_tv<T>(p.dk), state_in, gso, wsS, wsG,
                                         gsi, dg, gp, seglog, split, pl.C_main, pl.t_main);
    LASP_LAUNCHED();
    auto k2 = bwd_dv_kernel<T, A, T>;
    LASP_TRY(prepare(k2, pl.sm_dv));
    k2<<<g2, kThreads, pl.sm_dv, st>>>(c, q, k, dout, make_tv<T>(p.dv), gso, wsG, seglog, split, pl.C_dv, pl.t_dv);
    LASP_LAUNCHED();
  } else {  // per output head into the workspace, then summed into each q, k, v head
    A* dqh = wsKV;
    A* dkh = dqh + (size_t)p.B * p.H * p.N * p.D;
    A* dvh = dkh + (size_t)p.B * p.H * p.N * p.D;
    auto k1 = bwd_dqdk_kernel<T, A, A>;
    LASP_TRY(prepare(k1, pl.sm_main));
    k1<<<g1, kThreads, pl.sm_main, st>>>(c, q, k, v, dout, make_tv_contig<A>(dqh, p.H, p.N, p.D),
                                         make_tv_contig<A>(dkh, p.H, p.N, p.D), state_in, gso, wsS, wsG, gsi, dg, gp,
                                         seglog, split, pl.C_main, pl.t_main);
    LASP_LAUNCHED();
    auto k2 = bwd_dv_kernel<T, A, A>;
    LASP_TRY(prepare(k2, pl.sm_dv));
    k2<<<g2, kThreads, pl.sm_dv, st>>>(c, q, k, dout, make_tv_contig<A>(dvh, p.H, p.N, p.E), gso, wsG, seglog, split,
                                       pl.C_dv, pl.t_dv);
    LASP_LAUNCHED();
    reduce_heads_generic_kernel<T, A, A><<<nb, 256, 0, st>>>(c, dqh, make_tv<T>(p.dq), c.Hq, c.D);
    LASP_LAUNCHED();
    reduce_heads_generic_kernel<T, A, A><<<nb, 256, 0, st>>>(c, dkh, make_tv<T>(p.dk), c.Hkv, c.D);
    LASP_LAUNCHED();
    reduce_heads_generic_kernel<T, A, A><<<nb, 256, 0, st>>>(c, dvh, make_tv<T>(p.dv), c.Hv, c.E);
    LASP_LAUNCHED();
  }
  if (dg) {
    dg_finish_kernel<A><<<(unsigned)(p.B * p.H), kFinishThreads, 0, st>>>(c, dg, gp, state_in, gso);
    LASP_LAUNCHED();
  }
  return cudaSuccess;
}

// fwd_local (reverse = false): state_out = L (the state with no incoming state); bwd_local (reverse =
// true): grad_state_in = M (the gradient with no outgoing-state gradient). With several segments, phase 1
// stays in the workspace (bwd: after the forward states) for the fwd / bwd call with local_ready that follows.
template <typename T, typename A>
cudaError_t run_local(const AttnParams& p, const Plan& pl, bool reverse, cudaStream_t st) {
  void* out_ptr = reverse ? p.grad_state_in : p.state_out;
  if (p.N == 0) return pass_state(p, nullptr, out_ptr, st);
  if (!runnable(pl, p, reverse ? pl.bwd_bytes() : pl.fwd_bytes())) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  A* out = static_cast<A*>(out_ptr);
  if (pl.nseg == 1) return out ? local_states<T, A>(p, pl, pl.local, c, reverse, out, 0, st) : cudaSuccess;
  A* ws = reinterpret_cast<A*>(static_cast<char*>(p.workspace) + (reverse ? pl.ws_states : 0));
  LASP_TRY((local_states<T, A>(p, pl, pl.local, c, reverse, ws, 0, st)));  // the ring needs every segment's
  if (!out) return cudaSuccess;
  const A* seglog = segment_gate_logs<A>(p, c, reverse ? pl.bwd_gates_offset() : pl.ws_states, st);
  LASP_LAUNCHED();
  return combine_states<A>(p, c, reverse, ws, nullptr, out, false, 0, seglog, st);
}

// bwd_prepare: the forward segment states (they need only S_in) into the workspace.
template <typename T, typename A>
cudaError_t run_bwd_prepare(const AttnParams& p, const Plan& pl, cudaStream_t st) {
  if (p.N == 0) return cudaSuccess;
  if (!pl.ok) return cudaErrorInvalidValue;
  if (pl.nseg == 1 || p.seg_states) return cudaSuccess;  // nothing to do, or the forward's states are kept
  if (!runnable(pl, p, pl.bwd_bytes())) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  const A* seglog = segment_gate_logs<A>(p, c, pl.bwd_gates_offset(), st);
  LASP_LAUNCHED();
  return segment_states_fwd<T, A>(p, pl, c, static_cast<A*>(p.workspace), seglog, st);
}

// ---- Head dims above 128 on the tensor cores: blocks of D and of E ---------------------------------
//
// The function is additive over blocks of D (q and k cut alike: q[t].k[s] is a sum over d) and separable
// over blocks of E (v's columns are independent), and each block of the D x E state is its own recurrence.
// So a problem with D or E in (128, 256] runs as up to 2 x 2 problems of at most 128 x 128 on the
// tensor-core kernels, on column slices of q, k, v (no copies) and on each state's (d, e) block:
//   o[:, e-block]      = sum over D blocks
//   dq, dk[:, d-block] = sum over E blocks,  dv[:, e-block] = sum over D blocks   (per query head)
// Same FLOPs as one kernel over the whole dims. Each block runs on its own tensor-core family (plan mode 1);
// the main kernels' accumulate mode leaves each term as the block's AccOut says (fast_args.h: the first
// stores fp32, the last adds and writes the 16-bit output; GQA dk / dv stay fp32 until reduce_heads). They do
// not reuse a previous call's phase 1 (local_ready) or the forward's segment states: each block recomputes
// them.
namespace {

struct DimBlocks {
  int n = 1;
  int start[2] = {0, 0};
  int size[2] = {0, 0};
};

DimBlocks dim_blocks(int64_t X) {
  DimBlocks b;
  if (X <= 128) {
    b.size[0] = (int)X;
  } else {
    b.n = 2;
    b.size[0] = 128;
    b.start[1] = 128;
    b.size[1] = (int)X - 128;
  }
  return b;
}

// dtype and head dims the blocks take (any pointers or strides): bf16 / fp16, D and E multiples of 8 up to
// 256, one of them above 128.
bool blocks_shape(const AttnParams& p) {
  // no gates; q heads not shared and v heads = k heads (MHA, GQA, MQA: the blocks' AccOuts and reduce_heads)
  if (p.g || p.Hq != p.H || p.Hv != p.Hkv) return false;
  if (p.dtype != ScalarType::BFloat16 && p.dtype != ScalarType::Float16) return false;
  if (p.D % 8 != 0 || p.E % 8 != 0 || p.D > 256 || p.E > 256) return false;
  return p.D > 128 || p.E > 128;
}

// Block (d0, Ds) x (e0, Es) of p: column slices of the 16-bit views (last dim contiguous), no states, no
// workspace, nothing reused from an earlier call.
AttnParams sub_params(const AttnParams& p, int d0, int Ds, int e0, int Es) {
  AttnParams s = p;
  s.D = Ds;
  s.E = Es;
  auto shift = [](TensorView4& t, int x0) {
    if (t.ptr) t.ptr = static_cast<char*>(t.ptr) + (size_t)x0 * 2 * t.stride[3];
  };
  shift(s.q, d0);
  shift(s.k, d0);
  shift(s.dq, d0);
  shift(s.dk, d0);
  shift(s.v, e0);
  shift(s.o, e0);
  shift(s.dout, e0);
  shift(s.dv, e0);
  s.state_in = s.grad_state_out = nullptr;
  s.state_out = s.grad_state_in = nullptr;
  s.seg_states = nullptr;
  s.local_ready = false;
  s.workspace = nullptr;
  s.workspace_bytes = 0;
  return s;
}

// One block: its params and where its columns start in p (d0 in q / k, e0 in v / o).
struct Block {
  AttnParams s;
  int d0, e0;
};

// Every block, in the order the drivers run them.
template <typename F>
void for_blocks(const AttnParams& p, F f) {
  const DimBlocks bd = dim_blocks(p.D), be = dim_blocks(p.E);
  for (int i = 0; i < bd.n; ++i)
    for (int j = 0; j < be.n; ++j)
      f(Block{sub_params(p, bd.start[i], bd.size[i], be.start[j], be.size[j]), bd.start[i], be.start[j]});
}

// Runs f on every block until one returns an error (returned).
template <typename F>
cudaError_t run_blocks(const AttnParams& p, F f) {
  cudaError_t err = cudaSuccess;
  for_blocks(p, [&](Block b) {
    if (err == cudaSuccess) err = f(b);
  });
  return err;
}

// Workspace bytes of one (unblocked) problem: the largest plan over the modes it may run in.
size_t plan_bytes(const AttnParams& p, bool backward) {
  size_t bytes = 0;
  for (int mode : {0, 1}) {
    if (mode >= 1 && !fast::shape_supported(p)) continue;
    const Plan pl = backward ? plan_bwd(p, mode) : plan_fwd(p, mode);
    if (pl.ok) bytes = std::max(bytes, backward ? pl.bwd_bytes() : pl.fwd_bytes());
  }
  return bytes;
}

struct BlockLayout {  // byte offsets into the workspace of a blocked call
  size_t sub = 0;          // each block's own workspace (they run one after another)
  size_t state[3] = {};    // (B, H, Ds, Es) fp32 state blocks: forward S_in, S_out; backward S_in, G, dS_in
  // fp32 sums (B, H, N, X) per query head: forward o (two blocks of D); backward dq, dk (two blocks of E),
  // dv (two blocks of D); dk and dv with GQA also (summed over each kv head's query heads at the end)
  size_t acc[3] = {};
  size_t acc_bytes[3] = {};  // their sizes (0: not used)
  size_t total = 0;
};

BlockLayout block_layout(const AttnParams& p, bool backward) {
  BlockLayout L;
  size_t sub = 0;
  for_blocks(p, [&](const Block& b) { sub = std::max(sub, plan_bytes(b.s, backward)); });
  size_t off = align256(sub);
  const size_t blk = align256((size_t)p.B * p.H * std::min<int64_t>(p.D, 128) * std::min<int64_t>(p.E, 128) * 4);
  for (int i = 0; i < (backward ? 3 : 2); ++i) {
    L.state[i] = off;
    off += blk;
  }
  const size_t tok = (size_t)p.B * p.H * p.N * 4;
  const bool gqa = p.H != p.Hkv, cut_d = p.D > 128, cut_e = p.E > 128;
  if (backward) {
    L.acc_bytes[0] = cut_e ? tok * p.D : 0;
    L.acc_bytes[1] = cut_e || gqa ? tok * p.D : 0;
    L.acc_bytes[2] = cut_d || gqa ? tok * p.E : 0;
  } else if (cut_d) {
    L.acc_bytes[0] = tok * p.E;
  }
  for (int i = 0; i < 3; ++i) {
    L.acc[i] = off;
    off += align256(L.acc_bytes[i]);
  }
  L.total = off;
  return L;
}

// Whether this call runs as blocks: the shape, the views the tensor-core kernels read and write (the
// outputs too: the blocks write them by rows of pairs), and every block on a tensor-core family. With
// plans: each block's plan into plans[0 .. n) (for_blocks order).
bool use_blocks(const AttnParams& p, bool backward, Plan* plans = nullptr, int* n = nullptr) {
  if (!blocks_shape(p) || p.N == 0) return false;
  const bool views = fast::view_ok(p.q, p, p.H) && fast::view_ok(p.k, p, p.Hkv) && fast::view_ok(p.v, p, p.Hkv) &&
                     (backward ? fast::view_ok(p.dout, p, p.H) && fast::view_ok(p.dq, p, p.H) &&
                                     fast::view_ok(p.dk, p, p.Hkv) && fast::view_ok(p.dv, p, p.Hkv)
                               : fast::view_ok(p.o, p, p.H));
  if (!views) return false;
  bool ok = true;
  int i = 0;
  for_blocks(p, [&](const Block& b) {
    const Plan pl = backward ? plan_bwd(b.s, 1) : plan_fwd(b.s, 1);
    ok = ok && pl.ok && pl.main != Family::Generic;
    if (plans != nullptr) plans[i] = pl;
    ++i;
  });
  if (n != nullptr) *n = i;
  return ok;
}

// Copy a state's (d0, e0, Ds, Es) block between the (BH, D, E) state and a contiguous (BH, Ds, Es) one.
__global__ void state_block_kernel(const float* src, float* dst, int64_t BH, int D, int E, int d0, int e0, int Ds,
                                   int Es, bool to_block) {
  const int64_t total = BH * Ds * Es;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int e = (int)(i % Es);
    const int64_t r = i / Es;
    const int d = (int)(r % Ds);
    const int64_t bh = r / Ds;
    const int64_t full = (bh * D + d0 + d) * E + e0 + e;
    if (to_block) {
      dst[i] = src[full];
    } else {
      dst[full] = src[i];
    }
  }
}

cudaError_t state_block(const AttnParams& p, const Block& b, const void* src, void* dst, bool to_block,
                        cudaStream_t st) {
  const int64_t BH = p.B * p.H, total = BH * b.s.D * b.s.E;
  const unsigned nb = (unsigned)std::min<int64_t>((total + 255) / 256, 132 * 8);
  state_block_kernel<<<nb, 256, 0, st>>>(static_cast<const float*>(src), static_cast<float*>(dst), BH, (int)p.D,
                                         (int)p.E, b.d0, b.e0, (int)b.s.D, (int)b.s.E, to_block);
  return cudaGetLastError();
}

// A block's workspace (the front of the call's: blocks run one after another) and, where the call has one,
// its block of the incoming state, copied to the first state slot.
cudaError_t block_start(const AttnParams& p, Block& b, char* ws, const BlockLayout& L, cudaStream_t st) {
  b.s.workspace = ws;
  b.s.workspace_bytes = L.state[0];
  if (!p.state_in) return cudaSuccess;
  b.s.state_in = ws + L.state[0];
  return state_block(p, b, p.state_in, ws + L.state[0], true, st);
}

// An output of the blocks (fast_args.h, AccOut): its fp32 (B, H, N, X) sum at ws + off from column x0
// (null where the mode writes `out` only), the block's 16-bit view of it, the mode.
fast::AccOut acc_out(char* ws, size_t off, const AttnParams& p, int64_t X, int x0, const TensorView4& out, int mode) {
  fast::AccOut a;
  a.acc = mode == fast::kAccDirect ? nullptr : reinterpret_cast<float*>(ws + off) + x0;
  a.asb = p.H * p.N * X;
  a.ash = p.N * X;
  a.asn = X;
  a.out = out.ptr;
  a.osb = out.stride[0];
  a.osh = out.stride[1];
  a.osn = out.stride[2];
  a.mode = mode;
  return a;
}

// The mode of a block's term of a sum over n blocks (k: the block's index in it), where the sum is written
// by the kernels (first: Store, last: Finish, only one: Direct) or, with reduce (a sum over the query heads
// of each kv head follows), left in fp32 (first: Store, later: Add).
int acc_mode(int k, int n, bool reduce) {
  if (reduce) return k == 0 ? fast::kAccStore : fast::kAccAdd;
  if (n == 1) return fast::kAccDirect;
  return k == 0 ? fast::kAccStore : (k == n - 1 ? fast::kAccFinish : fast::kAccAdd);
}

// dk or dv of every query head, fp32 (B, H, N, X) -> the 16-bit (B, Hkv, N, X) view: the sum of each kv
// head's group. Four columns per thread (X is a multiple of 8 here), 32-bit indexing where it fits.
template <typename T, typename I>
__global__ void reduce_heads_kernel(const float* acc, Tv<T> out, int H, int Hkv, int N, int X, I total) {
  const int group = H / Hkv, quads = X / 4;
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < total; i += (I)gridDim.x * blockDim.x) {
    const int q = (int)(i % quads);
    const I row = i / quads;  // (b, kv head, n)
    const int n = (int)(row % N);
    const I bk = row / N;
    const int kh = (int)(bk % Hkv);
    const I b = bk / Hkv;
    const float* src = acc + ((size_t)(b * H + (I)kh * group) * N + n) * X + 4 * q;
    float4 s = *reinterpret_cast<const float4*>(src);
    for (int g = 1; g < group; ++g) {
      const float4 t = *reinterpret_cast<const float4*>(src + (size_t)g * N * X);
      s.x += t.x;
      s.y += t.y;
      s.z += t.z;
      s.w += t.w;
    }
    T* dst = out.row(b, kh, n) + 4 * q;  // 16-bit, x contiguous: 8-byte aligned (view_ok)
    uint2 v;
    v.x = mma::pack2<T>(s.x, s.y);
    v.y = mma::pack2<T>(s.z, s.w);
    *reinterpret_cast<uint2*>(dst) = v;
  }
}

template <typename T>
cudaError_t reduce_heads(const AttnParams& p, const float* acc, const TensorView4& out, int64_t X, cudaStream_t st) {
  if constexpr (sizeof(T) != 2) {
    return cudaErrorInvalidValue;  // the blocks run bf16 / fp16 only
  } else {
  const int64_t total = p.B * p.Hkv * p.N * (X / 4);
  const unsigned nb = (unsigned)std::min<int64_t>((total + 255) / 256, 132 * 16);
  if (total < INT32_MAX) {
    reduce_heads_kernel<T, int32_t><<<nb, 256, 0, st>>>(acc, make_tv<T>(out), (int)p.H, (int)p.Hkv, (int)p.N, (int)X,
                                                        (int32_t)total);
  } else {
    reduce_heads_kernel<T, int64_t><<<nb, 256, 0, st>>>(acc, make_tv<T>(out), (int)p.H, (int)p.Hkv, (int)p.N, (int)X,
                                                        total);
  }
  return cudaGetLastError();
  }
}

template <typename T, typename A>
cudaError_t run_fwd_blocks(const AttnParams& p, const CallPlan& call, cudaStream_t st) {
  const BlockLayout L = block_layout(p, false);
  if (!p.workspace || p.workspace_bytes < L.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(p.workspace);
  const DimBlocks bd = dim_blocks(p.D);
  int i = 0;
  return run_blocks(p, [&](Block b) {
    const Plan& pl = call.block[i++];
    LASP_TRY(block_start(p, b, ws, L, st));
    if (p.state_out) b.s.state_out = ws + L.state[1];
    // o: a sum over the blocks of D where there are two, else written by the block directly
    const fast::AccOut o = acc_out(ws, L.acc[0], p, p.E, b.e0, b.s.o, acc_mode(b.d0 > 0, bd.n, false));
    LASP_TRY((run_fwd<T, A>(b.s, pl, st, bd.n > 1 ? &o : nullptr)));
    return p.state_out ? state_block(p, b, ws + L.state[1], p.state_out, false, st) : cudaSuccess;
  });
}

template <typename T, typename A>
cudaError_t run_bwd_blocks(const AttnParams& p, const CallPlan& call, cudaStream_t st) {
  const BlockLayout L = block_layout(p, true);
  if (!p.workspace || p.workspace_bytes < L.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(p.workspace);
  const DimBlocks bd = dim_blocks(p.D), be = dim_blocks(p.E);
  const bool gqa = p.H != p.Hkv;
  int bi = 0;
  LASP_TRY(run_blocks(p, [&](Block b) {
    const Plan& pl = call.block[bi++];
    LASP_TRY(block_start(p, b, ws, L, st));
    if (p.grad_state_out) {
      LASP_TRY(state_block(p, b, p.grad_state_out, ws + L.state[1], true, st));
      b.s.grad_state_out = ws + L.state[1];
    }
    if (p.grad_state_in) b.s.grad_state_in = ws + L.state[2];
    const int i = b.d0 > 0, j = b.e0 > 0;  // dq, dk: sums over the blocks of E; dv: over those of D
    const fast::AccOut acc[3] = {acc_out(ws, L.acc[0], p, p.D, b.d0, b.s.dq, acc_mode(j, be.n, false)),
                                 acc_out(ws, L.acc[1], p, p.D, b.d0, b.s.dk, acc_mode(j, be.n, gqa)),
                                 acc_out(ws, L.acc[2], p, p.E, b.e0, b.s.dv, acc_mode(i, bd.n, gqa))};
    LASP_TRY((run_bwd<T, A>(b.s, pl, st, acc)));
    return p.grad_state_in ? state_block(p, b, ws + L.state[2], p.grad_state_in, false, st) : cudaSuccess;
  }));
  if (!gqa) return cudaSuccess;
  LASP_TRY(reduce_heads<T>(p, reinterpret_cast<const float*>(ws + L.acc[1]), p.dk, p.D, st));
  return reduce_heads<T>(p, reinterpret_cast<const float*>(ws + L.acc[2]), p.dv, p.E, st);
}

// fwd_local / bwd_local by blocks: each block's local state into its block of the output.
template <typename T, typename A>
cudaError_t run_local_blocks(const AttnParams& p, const CallPlan& call, bool reverse, cudaStream_t st) {
  void* out = reverse ? p.grad_state_in : p.state_out;
  if (!out) return cudaSuccess;
  const BlockLayout L = block_layout(p, reverse);
  if (!p.workspace || p.workspace_bytes < L.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(p.workspace);
  int i = 0;
  return run_blocks(p, [&](Block b) {
    const Plan& pl = call.block[i++];
    b.s.workspace = ws;  // phase 1 reads no incoming state
    b.s.workspace_bytes = L.state[0];
    (reverse ? b.s.grad_state_in : b.s.state_out) = ws + L.state[0];
    LASP_TRY((run_local<T, A>(b.s, pl, reverse, st)));
    return state_block(p, b, ws + L.state[0], out, false, st);
  });
}

}  // namespace

// Head maps left unset (0) read as MHA / GQA / MQA: Hq = H, Hv = Hkv.
AttnParams with_heads(const AttnParams& params) {
  AttnParams p = params;
  if (p.Hq == 0) p.Hq = p.H;
  if (p.Hv == 0) p.Hv = p.Hkv;
  return p;
}

template <template <typename, typename> class F>
cudaError_t dispatch(const AttnParams& params, const CallPlan& call, cudaStream_t st) {
  const AttnParams p = with_heads(params);
  if (!supports(p) || !call.ok) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case ScalarType::Float32: return F<float, float>::run(p, call, st);
    case ScalarType::Float16: return F<__half, float>::run(p, call, st);
    case ScalarType::BFloat16: return F<__nv_bfloat16, float>::run(p, call, st);
    case ScalarType::Float64: return F<double, double>::run(p, call, st);
  }
  return cudaErrorInvalidValue;
}

// Each entry point: by head-dim blocks where the call's plan says so, else one problem.
template <typename T, typename A> struct FwdOp {
  static cudaError_t run(const AttnParams& p, const CallPlan& c, cudaStream_t s) {
    return c.blocks ? run_fwd_blocks<T, A>(p, c, s) : run_fwd<T, A>(p, c.whole, s);
  }
};
template <typename T, typename A> struct BwdOp {
  static cudaError_t run(const AttnParams& p, const CallPlan& c, cudaStream_t s) {
    return c.blocks ? run_bwd_blocks<T, A>(p, c, s) : run_bwd<T, A>(p, c.whole, s);
  }
};
template <typename T, typename A> struct FwdLocalOp {
  static cudaError_t run(const AttnParams& p, const CallPlan& c, cudaStream_t s) {
    return c.blocks ? run_local_blocks<T, A>(p, c, false, s) : run_local<T, A>(p, c.whole, false, s);
  }
};
template <typename T, typename A> struct BwdPrepareOp {  // blocks recompute everything in the bwd itself
  static cudaError_t run(const AttnParams& p, const CallPlan& c, cudaStream_t s) {
    return c.blocks ? cudaSuccess : run_bwd_prepare<T, A>(p, c.whole, s);
  }
};
template <typename T, typename A> struct BwdLocalOp {
  static cudaError_t run(const AttnParams& p, const CallPlan& c, cudaStream_t s) {
    return c.blocks ? run_local_blocks<T, A>(p, c, true, s) : run_local<T, A>(p, c.whole, true, s);
  }
};

}  // namespace

bool supports(const AttnParams& params) {
  const AttnParams p = with_heads(params);
  switch (p.dtype) {
    case ScalarType::Float32:
    case ScalarType::Float16:
    case ScalarType::BFloat16:
    case ScalarType::Float64: break;
    default: return false;
  }
  // N = 0 is handled (the state passes through); B, H, Hkv must be positive.
  if (p.B < 1 || p.H < 1 || p.Hkv < 1 || p.Hq < 1 || p.Hv < 1 || p.N < 0) return false;
  if (p.H % p.Hkv != 0 || p.H % p.Hq != 0 || p.H % p.Hv != 0 || p.H != std::max(p.Hq, p.Hv)) return false;
  if (p.D < 1 || p.D > 256 || p.E < 1 || p.E > 256) return false;
  if (p.N > INT32_MAX / 2 || p.B * p.H > INT32_MAX) return false;
  return true;
}

// The workspace size must not depend on pointers or strides (a caller may ask before it has them):
// the larger of the generic and the tensor-core plans.
size_t fwd_workspace_bytes(const AttnParams& params) {
  const AttnParams p = with_heads(params);
  if (!supports(p)) return 0;
  const size_t one = plan_bytes(p, false);
  return blocks_shape(p) && p.N > 0 ? std::max(one, block_layout(p, false).total) : one;
}

size_t bwd_workspace_bytes(const AttnParams& params) {
  const AttnParams p = with_heads(params);
  if (!supports(p)) return 0;
  const size_t one = plan_bytes(p, true);
  return blocks_shape(p) && p.N > 0 ? std::max(one, block_layout(p, true).total) : one;
}

CallPlan plan_call(const AttnParams& params, bool backward) {
  const AttnParams p = with_heads(params);
  CallPlan c;
  c.backward = backward;
  if (!supports(p)) return c;
  if (use_blocks(p, backward, c.block, &c.nblocks)) {
    c.blocks = c.ok = true;
    c.workspace_bytes = block_layout(p, backward).total;
    return c;
  }
  c.nblocks = 0;
  c.whole = backward ? plan_bwd(p) : plan_fwd(p);
  c.ok = c.whole.ok || p.N == 0;  // no tokens: the state passes through, whatever the plan
  c.workspace_bytes = c.whole.ok ? (backward ? c.whole.bwd_bytes() : c.whole.fwd_bytes()) : 0;
  return c;
}

namespace {
// The main-pass family of a call: its plan's, or by blocks the blocks' ("wgmma+mma" where they differ,
// e.g. D = 136 as 128 + 8: wgmma takes 64 and 128 only).
const char* main_kernel_name(const AttnParams& p, bool backward) {
  if (!supports(with_heads(p)) || p.N == 0) return "generic";
  const CallPlan c = plan_call(p, backward);
  if (c.blocks) {
    bool wg = false, mma = false;
    for (int i = 0; i < c.nblocks; ++i) {
      wg = wg || c.block[i].main == Family::Wgmma;
      mma = mma || c.block[i].main == Family::Mma;
    }
    return wg && mma ? "wgmma+mma" : family_name(wg ? Family::Wgmma : Family::Mma);
  }
  return family_name(c.whole.ok ? c.whole.main : Family::Generic);
}

// The plan an entry point called without one runs: the one made with its workspace, else its own.
template <template <typename, typename> class F>
cudaError_t dispatch_own(const AttnParams& p, bool backward, cudaStream_t st) {
  if (p.call_plan != nullptr) return dispatch<F>(p, *static_cast<const CallPlan*>(p.call_plan), st);
  return dispatch<F>(p, plan_call(p, backward), st);
}
}  // namespace

const char* fwd_main_kernel_name(const AttnParams& p) { return main_kernel_name(p, false); }
const char* bwd_main_kernel_name(const AttnParams& p) { return main_kernel_name(p, true); }

namespace {
bool split_of(const AttnParams& p, bool backward, int64_t* nseg, int64_t* seglen) {
  if (!supports(with_heads(p)) || p.N == 0) return false;
  const CallPlan c = plan_call(p, backward);
  if (c.blocks) {  // the blocks keep no segment states between the passes
    *nseg = 1;
    *seglen = p.N;
    return true;
  }
  if (!c.whole.ok) return false;
  *nseg = c.whole.nseg;
  *seglen = c.whole.seglen;
  return true;
}
}  // namespace

bool fwd_split(const AttnParams& p, int64_t* nseg, int64_t* seglen) { return split_of(p, false, nseg, seglen); }
bool bwd_split(const AttnParams& p, int64_t* nseg, int64_t* seglen) { return split_of(p, true, nseg, seglen); }

cudaError_t fwd(const AttnParams& p, cudaStream_t stream) { return dispatch_own<FwdOp>(p, false, stream); }
cudaError_t fwd_local(const AttnParams& p, cudaStream_t stream) { return dispatch_own<FwdLocalOp>(p, false, stream); }
cudaError_t bwd(const AttnParams& p, cudaStream_t stream) { return dispatch_own<BwdOp>(p, true, stream); }
cudaError_t bwd_local(const AttnParams& p, cudaStream_t stream) { return dispatch_own<BwdLocalOp>(p, true, stream); }
cudaError_t bwd_prepare(const AttnParams& p, cudaStream_t stream) {
  return dispatch_own<BwdPrepareOp>(p, true, stream);
}
cudaError_t fwd(const AttnParams& p, const CallPlan& c, cudaStream_t stream) { return dispatch<FwdOp>(p, c, stream); }
cudaError_t fwd_local(const AttnParams& p, const CallPlan& c, cudaStream_t stream) {
  return dispatch<FwdLocalOp>(p, c, stream);
}
cudaError_t bwd(const AttnParams& p, const CallPlan& c, cudaStream_t stream) { return dispatch<BwdOp>(p, c, stream); }
cudaError_t bwd_local(const AttnParams& p, const CallPlan& c, cudaStream_t stream) {
  return dispatch<BwdLocalOp>(p, c, stream);
}
cudaError_t bwd_prepare(const AttnParams& p, const CallPlan& c, cudaStream_t stream) {
  return dispatch<BwdPrepareOp>(p, c, stream);
}

}  // namespace cuda
}  // namespace lasp
