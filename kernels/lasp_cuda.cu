// Host entry points of the lasp CUDA kernels (see lasp_cuda.h): the drivers of the three phases, each
// launching the family its role got in the plan (plan.h), dtype dispatch and workspace sizes. Torch-free.
#include "lasp_cuda.h"

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "fast_path.h"
#include "generic_kernels.cuh"
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
template <typename A>
cudaError_t combine_states(const AttnParams& p, const Ctx<A>& c, bool reverse, A* ws, const A* in, A* out,
                           bool in_place, int skip, cudaStream_t st) {
  dim3 gs((unsigned)(p.B * p.H), (unsigned)((p.D * p.E + 255) / 256));
  if (!reverse) {
    scan_kernel<A, false><<<gs, 256, 0, st>>>(c, ws, in, out, in_place, skip);
  } else {
    scan_kernel<A, true><<<gs, 256, 0, st>>>(c, ws, in, out, in_place, skip);
  }
  LASP_LAUNCHED();
  return cudaSuccess;
}

// Phase 1 + 2 of the forward state recurrence (segment input states into ws), shared by fwd and bwd.
// The last segment's local state is not computed: the forward's main kernel writes state_out itself.
template <typename T, typename A>
cudaError_t segment_states_fwd(const AttnParams& p, const Plan& pl, const Ctx<A>& c, A* ws, cudaStream_t st) {
  LASP_TRY((local_states<T, A>(p, pl, pl.local_fwd, c, false, ws, 1, st)));
  return combine_states<A>(p, c, false, ws, static_cast<const A*>(p.state_in), nullptr, true, 1, st);
}

// N = 0: nothing to attend to; the state passes through (state_out = S_in, grad_state_in = G, or zeros).
cudaError_t pass_state(const AttnParams& p, const void* src, void* dst, cudaStream_t st) {
  if (dst == nullptr) return cudaSuccess;
  const size_t bytes = (size_t)p.B * p.H * p.D * p.E * acc_size(p.dtype);
  return src ? cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st) : cudaMemsetAsync(dst, 0, bytes, st);
}

template <typename T, typename A>
cudaError_t run_fwd(const AttnParams& p, cudaStream_t st) {
  if (p.N == 0) return pass_state(p, p.state_in, p.state_out, st);
  const Plan pl = plan_fwd(p);
  if (!runnable(pl, p, pl.fwd_bytes())) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  A* ws = static_cast<A*>(p.workspace);
  if (pl.nseg > 1) {  // the segments' input states into ws (state_out comes from the last segment's blocks)
    if (p.local_ready) {  // phase 1 ran in fwd_local with this workspace
      LASP_TRY(combine_states<A>(p, c, false, ws, static_cast<const A*>(p.state_in), nullptr, true, 1, st));
    } else {
      LASP_TRY((segment_states_fwd<T, A>(p, pl, c, ws, st)));
    }
  }
  const float* seg = reinterpret_cast<const float*>(ws);
  if (pl.main == Family::Wgmma) return fast::wgmma_fwd_main(p, pl.nseg, pl.seglen, seg, st);
  if (pl.main == Family::Mma) return fast::mma_fwd_main(p, pl.nseg, pl.seglen, seg, st);
  auto km = fwd_main_kernel<T, A>;
  LASP_TRY(prepare(km, pl.sm_main));
  dim3 g((unsigned)(p.B * p.H), pl.nseg, (unsigned)((p.E + pl.t_main - 1) / pl.t_main));
  km<<<g, kThreads, pl.sm_main, st>>>(c, make_tv<const T>(p.q), make_tv<const T>(p.k), make_tv<const T>(p.v),
                                      make_tv<T>(p.o), static_cast<const A*>(p.state_in), ws,
                                      static_cast<A*>(p.state_out), pl.C_main, pl.t_main);
  LASP_LAUNCHED();
  return cudaSuccess;
}

template <typename T, typename A>
cudaError_t run_bwd(const AttnParams& p, cudaStream_t st) {
  if (p.N == 0) return pass_state(p, p.grad_state_out, p.grad_state_in, st);
  const Plan pl = plan_bwd(p);
  if (!runnable(pl, p, pl.bwd_bytes())) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  char* wsb = static_cast<char*>(p.workspace);
  // The forward's segment states when the caller kept them (same split), else this call's workspace.
  A* wsS = pl.ws_states ? (p.seg_states ? static_cast<A*>(const_cast<void*>(p.seg_states)) : reinterpret_cast<A*>(wsb))
                        : nullptr;
  A* wsG = pl.ws_states ? reinterpret_cast<A*>(wsb + pl.ws_states) : nullptr;
  A* wsKV = pl.ws_gqa ? reinterpret_cast<A*>(wsb + 2 * pl.ws_states) : nullptr;
  const A* state_in = static_cast<const A*>(p.state_in);
  const A* gso = static_cast<const A*>(p.grad_state_out);
  A* gsi = static_cast<A*>(p.grad_state_in);
  if (pl.nseg > 1) {  // grad_state_in comes from the first segment's blocks
    if (!p.local_ready) {  // else bwd_local ran phase 1 (and the forward states) with this workspace
      if (!p.seg_states) LASP_TRY((segment_states_fwd<T, A>(p, pl, c, wsS, st)));
      LASP_TRY((local_states<T, A>(p, pl, pl.local, c, true, wsG, 1, st)));
    }
    LASP_TRY(combine_states<A>(p, c, true, wsG, gso, nullptr, true, 1, st));
  }
  const bool gqa = p.H != p.Hkv;
  if (pl.main != Family::Generic) {
    float* dkh = gqa ? reinterpret_cast<float*>(wsKV) : nullptr;
    float* dvh = gqa ? dkh + (size_t)p.B * p.H * p.N * p.D : nullptr;
    const float *segS = reinterpret_cast<const float*>(wsS), *segG = reinterpret_cast<const float*>(wsG);
    LASP_TRY(pl.main == Family::Wgmma ? fast::wgmma_bwd_main(p, pl.nseg, pl.seglen, segS, segG, dkh, dvh, st)
                                      : fast::mma_bwd_main(p, pl.nseg, pl.seglen, segS, segG, dkh, dvh, st));
    if (gqa) {
      const int nb = 132 * 16;
      gqa_reduce_kernel<T, A><<<nb, 256, 0, st>>>(c, reinterpret_cast<A*>(dkh), make_tv<T>(p.dk), c.D);
      LASP_LAUNCHED();
      gqa_reduce_kernel<T, A><<<nb, 256, 0, st>>>(c, reinterpret_cast<A*>(dvh), make_tv<T>(p.dv), c.E);
      LASP_LAUNCHED();
    }
    return cudaSuccess;
  }
  const Tv<const T> q = make_tv<const T>(p.q), k = make_tv<const T>(p.k), v = make_tv<const T>(p.v),
                    dout = make_tv<const T>(p.dout);
  const Tv<T> dq = make_tv<T>(p.dq);
  const int gdq = (int)((p.D + pl.t_main - 1) / pl.t_main), gdv = (int)((p.E + pl.t_dv - 1) / pl.t_dv);
  dim3 g1((unsigned)(p.B * p.H), pl.nseg, gdq), g2((unsigned)(p.B * p.H), pl.nseg, gdv);
  if (!gqa) {
    auto k1 = bwd_dqdk_kernel<T, A, T>;
    LASP_TRY(prepare(k1, pl.sm_main));
    k1<<<g1, kThreads, pl.sm_main, st>>>(c, q, k, v, dout, dq, make_tv<T>(p.dk), 0, state_in, gso, wsS, wsG, gsi,
                                         pl.C_main, pl.t_main);
    LASP_LAUNCHED();
    auto k2 = bwd_dv_kernel<T, A, T>;
    LASP_TRY(prepare(k2, pl.sm_dv));
    k2<<<g2, kThreads, pl.sm_dv, st>>>(c, q, k, dout, make_tv<T>(p.dv), 0, gso, wsG, pl.C_dv, pl.t_dv);
    LASP_LAUNCHED();
  } else {
    A* dkh = wsKV;
    A* dvh = wsKV + (size_t)p.B * p.H * p.N * p.D;
    auto k1 = bwd_dqdk_kernel<T, A, A>;
    LASP_TRY(prepare(k1, pl.sm_main));
    k1<<<g1, kThreads, pl.sm_main, st>>>(c, q, k, v, dout, dq, make_tv_contig<A>(dkh, p.H, p.N, p.D), 1, state_in, gso,
                                         wsS, wsG, gsi, pl.C_main, pl.t_main);
    LASP_LAUNCHED();
    auto k2 = bwd_dv_kernel<T, A, A>;
    LASP_TRY(prepare(k2, pl.sm_dv));
    k2<<<g2, kThreads, pl.sm_dv, st>>>(c, q, k, dout, make_tv_contig<A>(dvh, p.H, p.N, p.E), 1, gso, wsG, pl.C_dv,
                                       pl.t_dv);
    LASP_LAUNCHED();
    const int nb = 132 * 16;
    gqa_reduce_kernel<T, A><<<nb, 256, 0, st>>>(c, dkh, make_tv<T>(p.dk), c.D);
    LASP_LAUNCHED();
    gqa_reduce_kernel<T, A><<<nb, 256, 0, st>>>(c, dvh, make_tv<T>(p.dv), c.E);
    LASP_LAUNCHED();
  }
  return cudaSuccess;
}

// fwd_local (reverse = false): state_out = L (the state with no incoming state); bwd_local (reverse =
// true): grad_state_in = M (the gradient with no outgoing-state gradient). With several segments, phase 1
// stays in the workspace (bwd: after the forward states) for the fwd / bwd call with local_ready that follows.
template <typename T, typename A>
cudaError_t run_local(const AttnParams& p, bool reverse, cudaStream_t st) {
  void* out_ptr = reverse ? p.grad_state_in : p.state_out;
  if (p.N == 0) return pass_state(p, nullptr, out_ptr, st);
  const Plan pl = reverse ? plan_bwd(p) : plan_fwd(p);
  if (!runnable(pl, p, reverse ? pl.bwd_bytes() : pl.fwd_bytes())) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  A* out = static_cast<A*>(out_ptr);
  if (pl.nseg == 1) return out ? local_states<T, A>(p, pl, pl.local, c, reverse, out, 0, st) : cudaSuccess;
  A* ws = reinterpret_cast<A*>(static_cast<char*>(p.workspace) + (reverse ? pl.ws_states : 0));
  LASP_TRY((local_states<T, A>(p, pl, pl.local, c, reverse, ws, 0, st)));  // the ring needs every segment's
  return out ? combine_states<A>(p, c, reverse, ws, nullptr, out, false, 0, st) : cudaSuccess;
}

// bwd_prepare: the forward segment states (they need only S_in) into the workspace.
template <typename T, typename A>
cudaError_t run_bwd_prepare(const AttnParams& p, cudaStream_t st) {
  if (p.N == 0) return cudaSuccess;
  const Plan pl = plan_bwd(p);
  if (!pl.ok) return cudaErrorInvalidValue;
  if (pl.nseg == 1 || p.seg_states) return cudaSuccess;  // nothing to do, or the forward's states are kept
  if (!runnable(pl, p, pl.bwd_bytes())) return cudaErrorInvalidValue;
  const Ctx<A> c = make_ctx<A>(p, pl.nseg, pl.seglen);
  return segment_states_fwd<T, A>(p, pl, c, static_cast<A*>(p.workspace), st);
}

template <template <typename, typename> class F>
cudaError_t dispatch(const AttnParams& p, cudaStream_t st) {
  if (!supports(p)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case ScalarType::Float32: return F<float, float>::run(p, st);
    case ScalarType::Float16: return F<__half, float>::run(p, st);
    case ScalarType::BFloat16: return F<__nv_bfloat16, float>::run(p, st);
    case ScalarType::Float64: return F<double, double>::run(p, st);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename A> struct FwdOp { static cudaError_t run(const AttnParams& p, cudaStream_t s) { return run_fwd<T, A>(p, s); } };
template <typename T, typename A> struct BwdOp { static cudaError_t run(const AttnParams& p, cudaStream_t s) { return run_bwd<T, A>(p, s); } };
template <typename T, typename A> struct FwdLocalOp { static cudaError_t run(const AttnParams& p, cudaStream_t s) { return run_local<T, A>(p, false, s); } };
template <typename T, typename A> struct BwdPrepareOp { static cudaError_t run(const AttnParams& p, cudaStream_t s) { return run_bwd_prepare<T, A>(p, s); } };
template <typename T, typename A> struct BwdLocalOp { static cudaError_t run(const AttnParams& p, cudaStream_t s) { return run_local<T, A>(p, true, s); } };

}  // namespace

bool supports(const AttnParams& p) {
  switch (p.dtype) {
    case ScalarType::Float32:
    case ScalarType::Float16:
    case ScalarType::BFloat16:
    case ScalarType::Float64: break;
    default: return false;
  }
  // N = 0 is handled (the state passes through); B, H, Hkv must be positive.
  if (p.B < 1 || p.H < 1 || p.Hkv < 1 || p.N < 0 || p.H % p.Hkv != 0) return false;
  if (p.D < 1 || p.D > 256 || p.E < 1 || p.E > 256) return false;
  if (p.N > INT32_MAX / 2 || p.B * p.H > INT32_MAX) return false;
  return true;
}

// The workspace size must not depend on pointers or strides (a caller may ask before it has them):
// the larger of the generic and the tensor-core plans.
size_t fwd_workspace_bytes(const AttnParams& p) {
  if (!supports(p)) return 0;
  size_t bytes = 0;
  for (int mode : {0, 1}) {
    if (mode == 1 && !fast::shape_supported(p)) continue;
    const Plan pl = plan_fwd(p, mode);
    if (pl.ok) bytes = std::max(bytes, pl.fwd_bytes());
  }
  return bytes;
}

size_t bwd_workspace_bytes(const AttnParams& p) {
  if (!supports(p)) return 0;
  size_t bytes = 0;
  for (int mode : {0, 1}) {
    if (mode == 1 && !fast::shape_supported(p)) continue;
    const Plan pl = plan_bwd(p, mode);
    if (pl.ok) bytes = std::max(bytes, pl.bwd_bytes());
  }
  return bytes;
}

const char* fwd_main_kernel_name(const AttnParams& p) {
  if (!supports(p) || p.N == 0) return "generic";
  const Plan pl = plan_fwd(p);
  return family_name(pl.ok ? pl.main : Family::Generic);
}

const char* bwd_main_kernel_name(const AttnParams& p) {
  if (!supports(p) || p.N == 0) return "generic";
  const Plan pl = plan_bwd(p);
  return family_name(pl.ok ? pl.main : Family::Generic);
}

namespace {
bool split_of(const AttnParams& p, bool backward, int64_t* nseg, int64_t* seglen) {
  if (!supports(p) || p.N == 0) return false;
  const Plan pl = backward ? plan_bwd(p) : plan_fwd(p);
  if (!pl.ok) return false;
  *nseg = pl.nseg;
  *seglen = pl.seglen;
  return true;
}
}  // namespace

bool fwd_split(const AttnParams& p, int64_t* nseg, int64_t* seglen) { return split_of(p, false, nseg, seglen); }
bool bwd_split(const AttnParams& p, int64_t* nseg, int64_t* seglen) { return split_of(p, true, nseg, seglen); }

cudaError_t fwd(const AttnParams& p, cudaStream_t stream) { return dispatch<FwdOp>(p, stream); }
cudaError_t fwd_local(const AttnParams& p, cudaStream_t stream) { return dispatch<FwdLocalOp>(p, stream); }
cudaError_t bwd(const AttnParams& p, cudaStream_t stream) { return dispatch<BwdOp>(p, stream); }
cudaError_t bwd_local(const AttnParams& p, cudaStream_t stream) { return dispatch<BwdLocalOp>(p, stream); }
cudaError_t bwd_prepare(const AttnParams& p, cudaStream_t stream) { return dispatch<BwdPrepareOp>(p, stream); }

}  // namespace cuda
}  // namespace lasp
