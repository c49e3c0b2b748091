// CUDA kernels for the gated delta rule (kernels/delta_kernels.cu: the chain of states, the chunks'
// unit-triangular solves and the per-chunk kernels; kernels/delta_chain_tc.cu: the chain on tensor cores, where
// the op's inputs were 16-bit), registered as the CUDA device's hooks (csrc/delta.h). LASP_DELTA_KERNELS selects
// them per call (csrc/delta.h): "cuda" (the default) the chain and the solves, "fused" (or "host") also the WY
// kernel (delta_prep.h), the forward's output (delta_out.h), the backward's chain inputs, transposed solve and
// gradients (delta_bwd.h) and the chain's wide form; "aten" none.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "attention.h"
#include "delta.h"
#include "delta_chain16.h"
#include "delta_chain_api.h"
#include "delta_grad16.h"
#include "delta_launch.h"
#include "fast_path.h"

namespace lasp {
namespace {

enum class Mode { Aten, Cuda, Fused };

Mode mode() {
  switch (delta_kernels_mode()) {
    case DeltaKernels::Aten:
      return Mode::Aten;
    case DeltaKernels::Cuda:
      return Mode::Cuda;
    default:
      return Mode::Fused;  // fused, and host (on CUDA tensors the same)
  }
}

bool use_kernel() { return mode() != Mode::Aten; }

// The kernels on the current stream, for delta_launch's run_*_program.
struct CudaLaunch {
  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }
  template <typename T>
  void operator()(const cuda::ChainArgs<T>& a) const {
    C10_CUDA_CHECK(cuda::delta_chain(a, stream()));
  }
  template <typename T>
  void operator()(const cuda::SolveArgs<T>& a) const {
    C10_CUDA_CHECK(cuda::delta_solve(a, stream()));
  }
  template <typename T>
  void operator()(const cuda::PrepArgs<T>& a) const {
    C10_CUDA_CHECK(cuda::delta_prep(a, stream()));
  }
  template <typename T>
  void operator()(const cuda::OutArgs<T>& a) const {
    C10_CUDA_CHECK(cuda::delta_out(a, stream()));
  }
  template <typename T>
  void operator()(const cuda::BwdArgs<T>& a) const {
    C10_CUDA_CHECK(cuda::delta_bwd(a, stream()));
  }
  template <typename T>
  void operator()(const cuda::DrArgs<T>& a) const {
    C10_CUDA_CHECK(cuda::delta_dr(a, stream()));
  }
  template <typename T>
  void operator()(const cuda::ProArgs<T>& a) const {
    C10_CUDA_CHECK(cuda::delta_pro(a, stream()));
  }
};

// t (B, H, nc, R, K) as a ChainMat: (B, H, nc) must flatten to one stride (else t is copied contiguous), and
// with unit_run one of the matrix strides must be 1 (else the same).
cuda::ChainMat as_mat(at::Tensor& t, bool unit_run) {
  auto flat = [](const at::Tensor& x, int64_t& sch) {
    int64_t expect = -1;
    sch = 0;
    for (int d = 2; d >= 0; --d) {
      if (x.size(d) == 1) continue;
      if (expect >= 0 && x.stride(d) != expect) return false;
      if (expect < 0) sch = x.stride(d);
      expect = x.stride(d) * x.size(d);
    }
    return true;
  };
  int64_t sch = 0;
  const bool unit = t.stride(3) == 1 || t.stride(4) == 1;
  if (!flat(t, sch) || (unit_run && !unit)) {
    t = t.contiguous();
    flat(t, sch);
  }
  cuda::ChainMat m;
  m.p = t.data_ptr<float>();
  m.sch = sch;
  m.sr = t.stride(3);
  m.sc = t.stride(4);
  return m;
}

// The tensor-core chain (16-bit inputs, float chains): undefined tensors where it does not take the call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_tc(const ChainInputs& in, const at::Tensor& S0) {
  const int64_t B = S0.size(0), H = S0.size(1), D = S0.size(2), W = S0.size(3);
  const int64_t nc = in.Bm.size(2), C = in.Bm.size(3);
  cuda::ChainTcArgs a;
  a.BH = B * H;
  a.nc = nc;
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.W = static_cast<int>(W);
  a.Bm.sr = a.Cm.sc = 1;  // a layout for the size check; the real one below
  a.Bm.p = a.Cm.p = S0.data_ptr<float>();
  if (a.BH == 0 || !cuda::delta_chain_tc_takes(a)) return {};
  a.wide = mode() == Mode::Fused;  // the wide form where it takes the sizes (opt-in until measured)
  if (a.wide && !cuda::delta_chain_tc_takes(a)) a.wide = false;
  at::Tensor A = in.A, Bm = in.Bm, Cm = in.Cm, R = in.R;
  if (A.defined()) a.A = as_mat(A, false);
  a.Bm = as_mat(Bm, true);
  a.Cm = as_mat(Cm, true);
  if (R.defined()) a.R = as_mat(R, false);
  if (!cuda::delta_chain_tc_takes(a)) return {};
  const auto o = S0.options();
  const at::Tensor p = in.p.reshape({B, H, nc}).contiguous(), S = S0.contiguous();
  at::Tensor store = at::empty({B, H, nc, D, W}, o), X = at::empty({B, H, nc, C, W}, o),
             fin = at::empty({B, H, D, W}, o);
  a.p = p.data_ptr<float>();
  a.S0 = S.data_ptr<float>();
  a.Sstore = store.data_ptr<float>();
  a.X = X.data_ptr<float>();
  a.Sfin = fin.data_ptr<float>();
  a.bsign = static_cast<float>(in.bsign);
  a.csign = static_cast<float>(in.csign);
  a.reverse = in.reverse;
  const cudaError_t e = cuda::delta_chain_tc(a, at::cuda::getCurrentCUDAStream());
  if (e == cudaErrorInvalidDeviceFunction) return {};  // below sm_80: the SIMT kernel
  C10_CUDA_CHECK(e);
  return {store, X, fin};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_cuda(const ChainInputs& in, const at::Tensor& S0) {
  if (!use_kernel()) return {};
  const c10::cuda::CUDAGuard guard(S0.device());
  if (in.tensor_cores && S0.scalar_type() == at::kFloat) {
    auto out = run_tc(in, S0);
    if (std::get<0>(out).defined()) return out;
  }
  if (S0.scalar_type() == at::kDouble) return delta_launch::run_chain_program<double>(in, S0, CudaLaunch());
  if (S0.scalar_type() == at::kFloat) return delta_launch::run_chain_program<float>(in, S0, CudaLaunch());
  return {};
}

at::Tensor solve_cuda(const at::Tensor& M, const at::Tensor& R, bool transpose) {
  if (!use_kernel() || R.numel() == 0 || M.scalar_type() != R.scalar_type()) return {};
  const c10::cuda::CUDAGuard guard(R.device());
  if (R.scalar_type() == at::kDouble) return delta_launch::run_solve_program<double>(M, R, transpose, CudaLaunch());
  if (R.scalar_type() == at::kFloat) return delta_launch::run_solve_program<float>(M, R, transpose, CudaLaunch());
  return {};
}

// The fused WY kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing (the composition).
PrepOut prep_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& g,
                  const at::Tensor& pre, bool tensor_cores, bool want_minv) {
  if (mode() != Mode::Fused || k.dim() != 5 || v.dim() != 5) return {};
  const auto t = k.scalar_type();
  if ((t != at::kFloat && t != at::kDouble) || v.scalar_type() != t || beta.scalar_type() != t ||
      g.scalar_type() != t || pre.scalar_type() != t)
    return {};
  if (k.size(3) > INT32_MAX || k.size(4) > INT32_MAX || v.size(4) > INT32_MAX ||
      !cuda::delta_prep_takes(static_cast<int>(k.size(3)), static_cast<int>(k.size(4)), static_cast<int>(v.size(4)),
                              t == at::kDouble ? sizeof(double) : sizeof(float)))
    return {};
  const c10::cuda::CUDAGuard guard(k.device());
  return t == at::kDouble
             ? delta_launch::run_prep_program<double>(k, v, beta, g, pre, tensor_cores, want_minv, CudaLaunch())
             : delta_launch::run_prep_program<float>(k, v, beta, g, pre, tensor_cores, want_minv, CudaLaunch());
}

// The forward's output kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing.
at::Tensor out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                    const at::Tensor& S, const at::Tensor& U, double scale, bool tensor_cores) {
  if (mode() != Mode::Fused || q.dim() != 5 || U.dim() != 5) return {};
  const auto t = q.scalar_type();
  for (const at::Tensor* x : {&k, &gam, &pre, &S, &U})
    if (x->scalar_type() != t) return {};
  if ((t != at::kFloat && t != at::kDouble) || q.size(3) > INT32_MAX || q.size(4) > INT32_MAX ||
      U.size(4) > INT32_MAX ||
      !cuda::delta_out_takes(static_cast<int>(q.size(3)), static_cast<int>(q.size(4)), static_cast<int>(U.size(4)),
                             t == at::kDouble ? sizeof(double) : sizeof(float)))
    return {};
  const c10::cuda::CUDAGuard guard(q.device());
  return t == at::kDouble
             ? delta_launch::run_out_program<double>(q, k, gam, pre, S, U, scale, tensor_cores, CudaLaunch())
             : delta_launch::run_out_program<float>(q, k, gam, pre, S, U, scale, tensor_cores, CudaLaunch());
}

// The backward's gradient kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing.
BwdChunkOut bwd_cuda(const BwdChunkIn& in) {
  if (mode() != Mode::Fused || in.q.dim() != 5 || in.u.dim() != 5) return {};
  const auto t = in.q.scalar_type();
  for (const at::Tensor* x :
       {&in.k, &in.v, &in.beta, &in.pre, &in.gam, &in.kk, &in.w, &in.S, &in.dSe, &in.u, &in.dO, &in.dR})
    if (!x->defined() || x->scalar_type() != t) return {};
  if ((t != at::kFloat && t != at::kDouble) || in.q.size(3) > INT32_MAX || in.q.size(4) > INT32_MAX ||
      in.u.size(4) > INT32_MAX ||
      !cuda::delta_bwd_takes(static_cast<int>(in.q.size(3)), static_cast<int>(in.q.size(4)),
                             static_cast<int>(in.u.size(4)), t == at::kDouble ? sizeof(double) : sizeof(float)))
    return {};
  const c10::cuda::CUDAGuard guard(in.q.device());
  return t == at::kDouble ? delta_launch::run_bwd_program<double>(in, CudaLaunch())
                          : delta_launch::run_bwd_program<float>(in, CudaLaunch());
}

// The backward's transposed solve with m^-1 where LASP_DELTA_KERNELS=fused and the kernel takes the sizes.
at::Tensor dr_cuda(const at::Tensor& minv, const at::Tensor& dU, const at::Tensor& S, bool tensor_cores) {
  if (mode() != Mode::Fused || minv.dim() != 5 || dU.dim() != 5 || S.dim() != 5) return {};
  const auto t = dU.scalar_type();
  if ((t != at::kFloat && t != at::kDouble) || minv.scalar_type() != t || S.scalar_type() != t) return {};
  if (dU.size(3) > INT32_MAX || S.size(3) > INT32_MAX || dU.size(4) > INT32_MAX ||
      !cuda::delta_dr_takes(static_cast<int>(dU.size(3)), static_cast<int>(S.size(3)), static_cast<int>(dU.size(4)),
                            t == at::kDouble ? sizeof(double) : sizeof(float)))
    return {};
  const c10::cuda::CUDAGuard guard(dU.device());
  return t == at::kDouble ? delta_launch::run_dr_program<double>(minv, dU, S, tensor_cores, CudaLaunch())
                          : delta_launch::run_dr_program<float>(minv, dU, S, tensor_cores, CudaLaunch());
}

// The backward's chain inputs kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing.
ProOut pro_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                const at::Tensor& dO, double scale, bool tensor_cores) {
  if (mode() != Mode::Fused || q.dim() != 5 || dO.dim() != 5) return {};
  const auto t = q.scalar_type();
  for (const at::Tensor* x : {&k, &gam, &pre, &dO})
    if (x->scalar_type() != t) return {};
  if ((t != at::kFloat && t != at::kDouble) || q.size(3) > INT32_MAX || q.size(4) > INT32_MAX ||
      dO.size(4) > INT32_MAX ||
      !cuda::delta_pro_takes(static_cast<int>(q.size(3)), static_cast<int>(q.size(4)), static_cast<int>(dO.size(4)),
                             t == at::kDouble ? sizeof(double) : sizeof(float)))
    return {};
  const c10::cuda::CUDAGuard guard(q.device());
  return t == at::kDouble ? delta_launch::run_pro_program<double>(q, k, gam, pre, dO, scale, tensor_cores, CudaLaunch())
                          : delta_launch::run_pro_program<float>(q, k, gam, pre, dO, scale, tensor_cores, CudaLaunch());
}

// x (B, H, N, X) itself where its rows are contiguous and start on 16-byte boundaries, else a contiguous copy (whose
// rows do): the 16-bit kernels' loads.
at::Tensor rows16(const at::Tensor& x) {
  const bool ok = x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(0) % 8 == 0 &&
                  x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// The WY kernel's arguments for k, v (rows on 16-byte boundaries), g, beta (fp32 contiguous (B, H, N)) and outputs
// W_v, W_k.
cuda::Wy16Args wy16_args(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& gf, const at::Tensor& bf,
                         const at::Tensor& wv, const at::Tensor& wk) {
  cuda::Wy16Args w;
  w.B = gf.size(0), w.H = gf.size(1), w.N = gf.size(2);
  w.D = static_cast<int>(kc.size(3)), w.E = static_cast<int>(vc.size(3));
  w.kgroup = static_cast<int>(w.H / kc.size(1)), w.vgroup = static_cast<int>(w.H / vc.size(1));
  w.bf16 = kc.scalar_type() == at::kBFloat16;
  w.k = kc.data_ptr(), w.v = vc.data_ptr();
  for (int i = 0; i < 3; ++i) w.ks[i] = kc.stride(i), w.vs[i] = vc.stride(i);
  w.beta = bf.data_ptr<float>(), w.g = gf.data_ptr<float>();
  w.wv = wv.data_ptr(), w.wk = wk.data_ptr();
  return w;
}

// MinvFn: m^-1 by the WY kernel (its W discarded), where the forward's main pass did not run (sm_80 / sm_89, or
// inputs it does not take); sm_80 or later.
at::Tensor minv_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta) {
  const int64_t B = g.size(0), H = g.size(1), N = g.size(2);
  if (!use_kernel()) return {};
  const c10::cuda::CUDAGuard guard(k.device());
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return {};
  const at::Tensor kc = rows16(k), vc = rows16(v);
  const auto o16 = k.options();
  const at::Tensor gf = g.to(at::kFloat).contiguous(), bf = beta.to(at::kFloat).contiguous();
  at::Tensor wv = at::empty({B, H, N, v.size(3)}, o16), wk = at::empty({B, H, N, k.size(3)}, o16),
             minv = at::empty({B, H, N, 64}, o16);
  cuda::Wy16Args w = wy16_args(kc, vc, gf, bf, wv, wk);
  w.minv = minv.data_ptr();
  if (!cuda::delta_wy16_takes(w)) return {};
  C10_CUDA_CHECK(cuda::delta_wy16(w, at::cuda::getCurrentCUDAStream()));
  return minv;
}

// The forward on sm_90a where q, k, v are 16-bit (one dtype) and the kernels take the shapes (D and E in
// {64, 128}): the WY kernel writes W_v, W_k in that dtype and m^-1 for the backward (delta_wy16), the wgmma main
// pass the rest (kernels/wgmma_fwd.cu); else nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> main_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& g, const at::Tensor& beta, double scale,
                                                         const std::optional<at::Tensor>& initial_state) {
  const auto t = q.scalar_type();
  if (!use_kernel() || (t != at::kBFloat16 && t != at::kHalf) || k.scalar_type() != t || v.scalar_type() != t)
    return {};
  const int64_t B = q.size(0), H = std::max(q.size(1), v.size(1)), N = q.size(2), D = q.size(3), E = v.size(3);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = rows16(q), kc = rows16(k), vc = rows16(v);
  const auto o16 = q.options().dtype(t);
  // o laid out as the op's output is (alloc_out: the memory order of q, or of v where v has more heads)
  at::Tensor o = alloc_out(out_layout_like(q, v), H, E, o16);
  at::Tensor wv = at::empty({B, H, N, E}, o16), wk = at::empty({B, H, N, D}, o16);
  const at::Tensor gf = g.to(at::kFloat).contiguous();
  AttnParams p;
  p.dtype = to_lasp(t);
  p.B = B, p.H = H, p.Hq = q.size(1), p.Hkv = k.size(1), p.Hv = H, p.N = N, p.D = D, p.E = E;
  p.scale = scale;
  p.q = view4(qc), p.k = view4(kc), p.v = view4(wv), p.o = view4(o);
  p.g = gf.data_ptr();
  if (!cuda::fast::delta_fwd_wgmma_takes(p)) return {};
  const at::Tensor bf = beta.to(at::kFloat).contiguous();
  at::Tensor minv = at::empty({B, H, N, 64}, o16);
  cuda::Wy16Args w = wy16_args(kc, vc, gf, bf, wv, wk);
  w.minv = minv.data_ptr();
  if (!cuda::delta_wy16_takes(w)) return {};
  const at::Tensor s0 = initial_state.has_value() ? initial_state->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor fin = at::empty({B, H, D, E}, q.options().dtype(at::kFloat));
  p.state_out = fin.data_ptr();
  p.state_in = s0.defined() ? s0.data_ptr() : nullptr;  // none: the kernel starts from zero
  const cudaStream_t st = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::delta_wy16(w, st));
  C10_CUDA_CHECK(cuda::fast::delta_fwd_wgmma(p, view4(wk), st));
  return {o, fin, minv};
}

// The backward on sm_80+ where q, k, v are 16-bit (one dtype) and the kernels take the shapes (D and E in {64, 128},
// rows on 16-byte boundaries): the WY kernel (W_v, W_k), the forward chain (U, Sb), the reverse chain (dU, dSe, dS0)
// and the per-chunk gradients, everything between them in that dtype; given the forward's m^-1 (minv), the WY
// kernel and the gradients kernel read it instead of forming it; else nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> main_bwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
    double scale, const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& dout,
    const std::optional<at::Tensor>& grad_final_state, bool state_grad_only, const at::Tensor& minv) {
  const auto t = q.scalar_type();
  if (!use_kernel() || (t != at::kBFloat16 && t != at::kHalf) || k.scalar_type() != t || v.scalar_type() != t)
    return {};
  const c10::cuda::CUDAGuard guard(q.device());
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return {};
  const int64_t B = q.size(0), H = std::max(q.size(1), v.size(1)), N = q.size(2), D = q.size(3), E = v.size(3);
  const int64_t nc = (N + 63) / 64;
  const at::Tensor qc = rows16(q), kc = rows16(k), vc = rows16(v);
  const at::Tensor dO = dout.has_value() ? rows16(dout->to(t)) : at::zeros({B, H, N, E}, q.options());
  const auto o16 = q.options().dtype(t), o32 = q.options().dtype(at::kFloat);
  const bool bf16 = t == at::kBFloat16;
  const int Di = static_cast<int>(D), Ei = static_cast<int>(E);
  at::Tensor wv = at::empty({B, H, N, E}, o16), wk = at::empty({B, H, N, D}, o16);
  at::Tensor u = at::empty({B, H, N, E}, o16), sb = at::empty({B, H, nc, D, E}, o16),
             fin = at::empty({B, H, D, E}, o32);
  at::Tensor du = at::empty({B, H, N, E}, o16), dse = at::empty({B, H, nc, D, E}, o16),
             ds0 = at::empty({B, H, D, E}, o32);
  const at::Tensor gf = g.to(at::kFloat).contiguous(), bf = beta.to(at::kFloat).contiguous();
  const at::Tensor s0 = initial_state.has_value() ? initial_state->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor dend = grad_final_state.has_value() ? grad_final_state->to(at::kFloat).contiguous() : at::Tensor();
  const int qgroup = static_cast<int>(H / q.size(1)), kgroup = static_cast<int>(H / k.size(1)),
            vgroup = static_cast<int>(H / v.size(1));
  // the forward's m^-1 (its shape, dtype, device and contiguity checked by the op: check_minv) where 16-byte aligned
  const void* mi = minv.defined() && reinterpret_cast<uintptr_t>(minv.data_ptr()) % 16 == 0 ? minv.data_ptr() : nullptr;
  cuda::Wy16Args w = wy16_args(kc, vc, gf, bf, wv, wk);
  w.minv_in = mi;
  cuda::States16Args s;
  s.B = B, s.H = H, s.N = N, s.D = Di, s.E = Ei, s.kgroup = kgroup, s.bf16 = bf16;
  s.k = kc.data_ptr(), s.wv = wv.data_ptr(), s.wk = wk.data_ptr(), s.g = gf.data_ptr<float>();
  for (int i = 0; i < 3; ++i) s.ks[i] = kc.stride(i);
  s.S0 = s0.defined() ? s0.data_ptr<float>() : nullptr;
  s.u = u.data_ptr(), s.sb = sb.data_ptr(), s.fin = fin.data_ptr<float>();
  cuda::Rev16Args r;
  r.B = B, r.H = H, r.N = N, r.D = Di, r.E = Ei, r.qgroup = qgroup, r.kgroup = kgroup, r.bf16 = bf16;
  r.q = qc.data_ptr(), r.k = kc.data_ptr(), r.wk = wk.data_ptr(), r.dout = dO.data_ptr(), r.g = gf.data_ptr<float>();
  for (int i = 0; i < 3; ++i) r.qs[i] = qc.stride(i), r.ks[i] = kc.stride(i), r.ds[i] = dO.stride(i);
  r.dS_end = dend.defined() ? dend.data_ptr<float>() : nullptr;
  r.scale = static_cast<float>(scale);
  r.du = du.data_ptr(), r.dse = dse.data_ptr(), r.dS0 = ds0.data_ptr<float>();
  at::Tensor dq, dk, dv, dbeta, dg;
  cuda::Grad16Args a;
  if (!state_grad_only) {
    // in the input's dtype and memory order where no sum over the output heads follows (the op's grad_like then
    // returns it as it is), else fp32 (B, H, N, .)
    const bool q16 = q.size(1) == H, k16 = k.size(1) == H, v16 = v.size(1) == H;
    dq = q16 ? at::empty_like(qc) : at::empty({B, H, N, D}, o32);
    dk = k16 ? at::empty_like(kc) : at::empty({B, H, N, D}, o32);
    dv = v16 ? at::empty_like(vc) : at::empty({B, H, N, E}, o32);
    a.out16 = (q16 ? 1 : 0) | (k16 ? 2 : 0) | (v16 ? 4 : 0);
    for (int i = 0; i < 3; ++i) a.dqs[i] = dq.stride(i), a.dks[i] = dk.stride(i), a.dvs[i] = dv.stride(i);
    dbeta = at::empty({B, H, N}, o32), dg = at::empty({B, H, N}, o32);
    a.B = B, a.H = H, a.N = N, a.D = Di, a.E = Ei, a.qgroup = qgroup, a.kgroup = kgroup, a.vgroup = vgroup;
    a.bf16 = bf16;
    a.q = qc.data_ptr(), a.k = kc.data_ptr(), a.v = vc.data_ptr(), a.dout = dO.data_ptr();
    for (int i = 0; i < 3; ++i)
      a.qs[i] = qc.stride(i), a.ks[i] = kc.stride(i), a.vs[i] = vc.stride(i), a.ds[i] = dO.stride(i);
    a.u = u.data_ptr(), a.du = du.data_ptr(), a.sb = sb.data_ptr(), a.dse = dse.data_ptr();
    a.g = gf.data_ptr<float>(), a.beta = bf.data_ptr<float>(), a.scale = static_cast<float>(scale);
    a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
    a.dbeta = dbeta.data_ptr<float>(), a.dg = dg.data_ptr<float>();
    a.minv = mi;
  }
  if (!cuda::delta_wy16_takes(w) || !cuda::delta_states16_takes(s) || !cuda::delta_rev16_takes(r) ||
      (!state_grad_only && !cuda::delta_grad16_takes(a)))
    return {};
  const cudaStream_t st = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::delta_wy16(w, st));
  C10_CUDA_CHECK(cuda::delta_states16(s, st));
  C10_CUDA_CHECK(cuda::delta_rev16(r, st));
  if (!state_grad_only) C10_CUDA_CHECK(cuda::delta_grad16(a, st));
  return {dq, dk, dv, dg, dbeta, ds0};
}

// The rows of x (16-bit, last dim a power of two up to 256, contiguous) as a (B, H, N, D) view: a 4-D x by its
// strides, any other by its rows in memory order where they tile the storage; rows on 16-byte boundaries. Else
// false.
bool l2norm_rows(const at::Tensor& x, int64_t* dims, int64_t* st) {
  const auto t = x.scalar_type();
  const int64_t D = x.dim() > 0 ? x.size(-1) : 0;
  if (!use_kernel() || (t != at::kBFloat16 && t != at::kHalf) || D < 8 || D > 256 || (D & (D - 1)) != 0 ||
      x.stride(-1) != 1)
    return false;
  if (x.dim() == 4) {
    for (int i = 0; i < 3; ++i) dims[i] = x.size(i), st[i] = x.stride(i);
  } else {
    if (!x.is_non_overlapping_and_dense()) return false;
    dims[0] = 1, dims[1] = 1, dims[2] = x.numel() / D, st[0] = st[1] = 0, st[2] = D;
  }
  return dims[1] >= 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && st[0] % 8 == 0 && st[1] % 8 == 0 &&
         st[2] % 8 == 0;
}

// Whether x and y (the same shape) give the kernel the same rows: any strides where 4-D (each by its own), else
// the same strides (rows in memory order).
bool same_rows(const at::Tensor& x, const at::Tensor& y) {
  return x.sizes() == y.sizes() && (x.dim() == 4 || x.strides() == y.strides());
}

// The layout of r (fp32, one per row of x: x's shape with the last dim 1) for the kernel's view of x's rows:
// contiguous where x is 4-D, else in the memory order of x's rows; rs: its strides of the view's (b, h, n).
struct RowNorms {
  std::vector<int64_t> sizes, strides;
  int64_t rs[3];
  explicit RowNorms(const at::Tensor& x) : sizes(x.sizes().begin(), x.sizes().end()), strides(x.dim(), 1) {
    sizes.back() = 1;
    if (x.dim() == 4) {
      for (int i = 2; i >= 0; --i) strides[i] = strides[i + 1] * sizes[i + 1];
      for (int i = 0; i < 3; ++i) rs[i] = strides[i];
    } else {  // x dense with its last dim contiguous: its row strides are multiples of D
      for (int64_t i = 0; i + 1 < x.dim(); ++i) strides[i] = x.stride(i) / x.size(-1);
      rs[0] = rs[1] = 0, rs[2] = 1;
    }
  }
};

// L2NormFn: y = the l2 normalisation of x's rows (delta_l2norm16), y laid out as x where x is dense, and where
// want_r the rows' r = 1 / sqrt(sum of squares + 1e-6) (laid out as RowNorms says). Nothing where the kernel does
// not take the rows of x or y.
std::tuple<at::Tensor, at::Tensor> l2norm_cuda(const at::Tensor& x, bool want_r) {
  cuda::L2NormRows a;
  int64_t dims[3], ydims[3];
  if (!l2norm_rows(x, dims, a.xs)) return {};
  at::Tensor y = at::empty_like(x);
  if (!l2norm_rows(y, ydims, a.ys) || !same_rows(x, y)) return {};
  at::Tensor r;
  if (want_r) {
    const RowNorms L(y);
    r = at::empty_strided(L.sizes, L.strides, x.options().dtype(at::kFloat));
    for (int i = 0; i < 3; ++i) a.rs[i] = L.rs[i];
    a.r = r.data_ptr<float>();
  }
  a.B = dims[0], a.H = dims[1], a.N = dims[2], a.D = static_cast<int>(x.size(-1));
  a.bf16 = x.scalar_type() == at::kBFloat16;
  a.x = x.data_ptr(), a.y = y.data_ptr();
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(cuda::delta_l2norm16(a, at::cuda::getCurrentCUDAStream()));
  return {y, r};
}

// L2NormBwdFn: dx = r (dy - y sum(dy y)) per row (delta_l2norm16_bwd) from l2norm_cuda's y and r, dx laid out as y.
// Nothing where the kernel does not take the rows (or r is not laid out as l2norm_cuda lays it out for y).
at::Tensor l2norm_bwd_cuda(const at::Tensor& y, const at::Tensor& r, const at::Tensor& dy) {
  cuda::L2NormRows a;
  int64_t dims[3], ddims[3], xdims[3];
  if (!dy.defined() || !r.defined() || r.scalar_type() != at::kFloat || dy.scalar_type() != y.scalar_type() ||
      !l2norm_rows(y, dims, a.xs) || !l2norm_rows(dy, ddims, a.dys) || !same_rows(y, dy))
    return {};
  const RowNorms L(y);
  if (r.sizes() != at::IntArrayRef(L.sizes) || r.strides() != at::IntArrayRef(L.strides)) return {};
  at::Tensor dx = at::empty_like(y);
  if (!l2norm_rows(dx, xdims, a.ys) || !same_rows(y, dx)) return {};
  for (int i = 0; i < 3; ++i) a.rs[i] = L.rs[i];
  a.B = dims[0], a.H = dims[1], a.N = dims[2], a.D = static_cast<int>(y.size(-1));
  a.bf16 = y.scalar_type() == at::kBFloat16;
  a.x = y.data_ptr(), a.dy = dy.data_ptr(), a.y = dx.data_ptr(), a.r = const_cast<float*>(r.data_ptr<float>());
  const c10::cuda::CUDAGuard guard(y.device());
  C10_CUDA_CHECK(cuda::delta_l2norm16_bwd(a, at::cuda::getCurrentCUDAStream()));
  return dx;
}

const bool registered = register_delta_chain(c10::DeviceType::CUDA, &chain_cuda);
const bool solve_registered = register_delta_solve(c10::DeviceType::CUDA, &solve_cuda);
const bool prep_registered = register_delta_prep(c10::DeviceType::CUDA, &prep_cuda);
const bool out_registered = register_delta_out(c10::DeviceType::CUDA, &out_cuda);
const bool bwd_registered = register_delta_bwd(c10::DeviceType::CUDA, &bwd_cuda);
const bool dr_registered = register_delta_dr(c10::DeviceType::CUDA, &dr_cuda);
const bool pro_registered = register_delta_pro(c10::DeviceType::CUDA, &pro_cuda);
const bool main_registered = register_delta_main(c10::DeviceType::CUDA, &main_cuda);
const bool main_bwd_registered = register_delta_main_bwd(c10::DeviceType::CUDA, &main_bwd_cuda);
const bool minv_registered = register_delta_minv(c10::DeviceType::CUDA, &minv_cuda);
const bool l2norm_registered = register_delta_l2norm(c10::DeviceType::CUDA, &l2norm_cuda);
const bool l2norm_bwd_registered = register_delta_l2norm_bwd(c10::DeviceType::CUDA, &l2norm_bwd_cuda);

}  // namespace
}  // namespace lasp
