// CUDA kernels for the gated delta rule's chain of states and its chunks' unit-triangular solves
// (kernels/delta_kernels.cu; the chain on tensor cores, kernels/delta_chain_tc.cu, where the op's inputs were
// 16-bit), registered as the CUDA device's (csrc/delta.h).
// LASP_DELTA_KERNELS selects them per call: "cuda" (the default) runs them, "aten" the ATen compositions, and
// "fused" the chunks' fused WY kernel (kernels/delta_prep.h), the forward's output kernel (kernels/delta_out.h)
// and the backward's chain inputs, its transposed solve with m^-1 and its gradient kernel (kernels/delta_bwd.h)
// too, in place of the compositions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "delta.h"
#include "delta_chain_api.h"

namespace lasp {
namespace {

enum class Mode { Aten, Cuda, Fused };

Mode mode() {
  const char* v = std::getenv("LASP_DELTA_KERNELS");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "cuda") == 0) return Mode::Cuda;
  if (std::strcmp(v, "fused") == 0) return Mode::Fused;
  TORCH_CHECK_VALUE(std::strcmp(v, "aten") == 0, "LASP_DELTA_KERNELS must be 'aten', 'cuda' or 'fused', got '", v,
                    "'");
  return Mode::Aten;
}

bool use_kernel() { return mode() != Mode::Aten; }

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const ChainInputs& in, const at::Tensor& S0) {
  const int64_t B = S0.size(0), H = S0.size(1), D = S0.size(2), W = S0.size(3);
  const int64_t nc = in.Bm.size(2), C = in.Bm.size(3);
  const auto o = S0.options();
  auto c = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  const at::Tensor A = c(in.A), Bm = c(in.Bm), Cm = c(in.Cm), R = c(in.R), S = c(S0);
  const at::Tensor p = in.p.reshape({B, H, nc}).contiguous();
  at::Tensor store = at::empty({B, H, nc, D, W}, o), X = at::empty({B, H, nc, C, W}, o), fin = at::empty({B, H, D, W}, o);
  cuda::ChainArgs<T> a;
  a.BH = B * H;
  a.nc = nc;
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.W = static_cast<int>(W);
  a.A = A.defined() ? A.data_ptr<T>() : nullptr;
  a.Bm = Bm.data_ptr<T>();
  a.Cm = Cm.data_ptr<T>();
  a.p = p.data_ptr<T>();
  a.R = R.defined() ? R.data_ptr<T>() : nullptr;
  a.S0 = S.data_ptr<T>();
  a.Sstore = store.data_ptr<T>();
  a.X = X.data_ptr<T>();
  a.Sfin = fin.data_ptr<T>();
  a.bsign = static_cast<T>(in.bsign);
  a.csign = static_cast<T>(in.csign);
  a.reverse = in.reverse;
  if (a.BH > 0) C10_CUDA_CHECK(cuda::delta_chain(a, at::cuda::getCurrentCUDAStream()));
  return {store, X, fin};
}

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
  at::Tensor store = at::empty({B, H, nc, D, W}, o), X = at::empty({B, H, nc, C, W}, o), fin = at::empty({B, H, D, W}, o);
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
  if (S0.scalar_type() == at::kDouble) return run<double>(in, S0);
  if (S0.scalar_type() == at::kFloat) return run<float>(in, S0);
  return {};
}

template <typename T>
at::Tensor solve(const at::Tensor& M, const at::Tensor& R, bool transpose) {
  const at::Tensor Mc = M.contiguous(), Rc = R.contiguous();
  at::Tensor X = at::empty_like(Rc);
  cuda::SolveArgs<T> a;
  a.chunks = Rc.numel() / (Rc.size(-1) * Rc.size(-2));
  a.C = static_cast<int>(Rc.size(-2));
  a.W = static_cast<int>(Rc.size(-1));
  a.M = Mc.data_ptr<T>();
  a.R = Rc.data_ptr<T>();
  a.X = X.data_ptr<T>();
  a.transpose = transpose;
  if (a.chunks > 0) C10_CUDA_CHECK(cuda::delta_solve(a, at::cuda::getCurrentCUDAStream()));
  return X;
}

at::Tensor solve_cuda(const at::Tensor& M, const at::Tensor& R, bool transpose) {
  if (!use_kernel() || R.numel() == 0 || M.scalar_type() != R.scalar_type()) return {};
  const c10::cuda::CUDAGuard guard(R.device());
  if (R.scalar_type() == at::kDouble) return solve<double>(M, R, transpose);
  if (R.scalar_type() == at::kFloat) return solve<float>(M, R, transpose);
  return {};
}

template <typename T>
PrepOut prep(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& g,
             const at::Tensor& pre) {
  const at::Tensor K = k.contiguous(), V = v.contiguous(), Bt = beta.contiguous(), G = g.contiguous(),
                   P = pre.contiguous();
  const int64_t C = K.size(3), D = K.size(4), E = V.size(4);
  const auto o = K.options();
  PrepOut out;
  out.gam = at::empty({K.size(0), K.size(1), K.size(2), C, C}, o);
  out.kk = at::empty_like(out.gam);
  out.m = at::empty_like(out.gam);
  out.w = at::empty({K.size(0), K.size(1), K.size(2), C, E + D}, o);
  out.minv = at::empty_like(out.gam);
  cuda::PrepArgs<T> a;
  a.chunks = K.size(0) * K.size(1) * K.size(2);
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.E = static_cast<int>(E);
  a.k = K.data_ptr<T>();
  a.v = V.data_ptr<T>();
  a.beta = Bt.data_ptr<T>();
  a.g = G.data_ptr<T>();
  a.pre = P.data_ptr<T>();
  a.gam = out.gam.data_ptr<T>();
  a.kk = out.kk.data_ptr<T>();
  a.m = out.m.data_ptr<T>();
  a.w = out.w.data_ptr<T>();
  a.minv = out.minv.data_ptr<T>();
  if (a.chunks > 0) C10_CUDA_CHECK(cuda::delta_prep(a, at::cuda::getCurrentCUDAStream()));
  return out;
}

// The fused WY kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing (the composition).
PrepOut prep_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& g,
                  const at::Tensor& pre) {
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
  return t == at::kDouble ? prep<double>(k, v, beta, g, pre) : prep<float>(k, v, beta, g, pre);
}

template <typename T>
at::Tensor out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
               const at::Tensor& S, const at::Tensor& U, double scale) {
  const at::Tensor Q = q.contiguous(), K = k.contiguous(), G = gam.contiguous(), P = pre.contiguous(),
                   Sc = S.contiguous(), Uc = U.contiguous();
  at::Tensor o = at::empty_like(Uc);
  cuda::OutArgs<T> a;
  a.chunks = Q.size(0) * Q.size(1) * Q.size(2);
  a.C = static_cast<int>(Q.size(3));
  a.D = static_cast<int>(Q.size(4));
  a.E = static_cast<int>(Uc.size(4));
  a.scale = static_cast<T>(scale);
  a.q = Q.data_ptr<T>();
  a.k = K.data_ptr<T>();
  a.gam = G.data_ptr<T>();
  a.pre = P.data_ptr<T>();
  a.S = Sc.data_ptr<T>();
  a.U = Uc.data_ptr<T>();
  a.o = o.data_ptr<T>();
  if (a.chunks > 0) C10_CUDA_CHECK(cuda::delta_out(a, at::cuda::getCurrentCUDAStream()));
  return o;
}

// The forward's output kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing.
at::Tensor out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                    const at::Tensor& S, const at::Tensor& U, double scale) {
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
  return t == at::kDouble ? out<double>(q, k, gam, pre, S, U, scale) : out<float>(q, k, gam, pre, S, U, scale);
}

template <typename T>
BwdChunkOut bwd(const BwdChunkIn& in) {
  auto c = [](const at::Tensor& t) { return t.contiguous(); };
  const at::Tensor q = c(in.q), k = c(in.k), v = c(in.v), beta = c(in.beta), pre = c(in.pre), gam = c(in.gam),
                   kk = c(in.kk), w = c(in.w), S = c(in.S), dSe = c(in.dSe), u = c(in.u), dO = c(in.dO), dR = c(in.dR);
  BwdChunkOut out;
  out.dq = at::empty_like(q);
  out.dk = at::empty_like(q);
  out.dv = at::empty_like(u);
  out.dbeta = at::empty_like(beta);
  out.dg = at::empty_like(beta);
  cuda::BwdArgs<T> a;
  a.chunks = q.size(0) * q.size(1) * q.size(2);
  a.C = static_cast<int>(q.size(3));
  a.D = static_cast<int>(q.size(4));
  a.E = static_cast<int>(u.size(4));
  a.scale = static_cast<T>(in.scale);
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.beta = beta.data_ptr<T>();
  a.pre = pre.data_ptr<T>();
  a.gam = gam.data_ptr<T>();
  a.kk = kk.data_ptr<T>();
  a.w = w.data_ptr<T>();
  a.S = S.data_ptr<T>();
  a.dSe = dSe.data_ptr<T>();
  a.u = u.data_ptr<T>();
  a.dO = dO.data_ptr<T>();
  a.dR = dR.data_ptr<T>();
  a.dq = out.dq.data_ptr<T>();
  a.dk = out.dk.data_ptr<T>();
  a.dv = out.dv.data_ptr<T>();
  a.dbeta = out.dbeta.data_ptr<T>();
  a.dg = out.dg.data_ptr<T>();
  if (a.chunks > 0) C10_CUDA_CHECK(cuda::delta_bwd(a, at::cuda::getCurrentCUDAStream()));
  return out;
}

// The backward's gradient kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing.
BwdChunkOut bwd_cuda(const BwdChunkIn& in) {
  if (mode() != Mode::Fused || in.q.dim() != 5 || in.u.dim() != 5) return {};
  const auto t = in.q.scalar_type();
  for (const at::Tensor* x : {&in.k, &in.v, &in.beta, &in.pre, &in.gam, &in.kk, &in.w, &in.S, &in.dSe, &in.u,
                              &in.dO, &in.dR})
    if (!x->defined() || x->scalar_type() != t) return {};
  if ((t != at::kFloat && t != at::kDouble) || in.q.size(3) > INT32_MAX || in.q.size(4) > INT32_MAX ||
      in.u.size(4) > INT32_MAX ||
      !cuda::delta_bwd_takes(static_cast<int>(in.q.size(3)), static_cast<int>(in.q.size(4)),
                             static_cast<int>(in.u.size(4)), t == at::kDouble ? sizeof(double) : sizeof(float)))
    return {};
  const c10::cuda::CUDAGuard guard(in.q.device());
  return t == at::kDouble ? bwd<double>(in) : bwd<float>(in);
}

template <typename T>
at::Tensor dr(const at::Tensor& minv, const at::Tensor& dU, const at::Tensor& S) {
  const at::Tensor Mi = minv.contiguous(), U = dU.contiguous(), Sc = S.contiguous();
  const int64_t C = U.size(3), E = U.size(4), D = Sc.size(3);
  at::Tensor dR = at::empty({U.size(0), U.size(1), U.size(2), C, E + D}, U.options());
  cuda::DrArgs<T> a;
  a.chunks = U.size(0) * U.size(1) * U.size(2);
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.E = static_cast<int>(E);
  a.minv = Mi.data_ptr<T>();
  a.dU = U.data_ptr<T>();
  a.S = Sc.data_ptr<T>();
  a.dR = dR.data_ptr<T>();
  if (a.chunks > 0) C10_CUDA_CHECK(cuda::delta_dr(a, at::cuda::getCurrentCUDAStream()));
  return dR;
}

// The backward's transposed solve with m^-1 where LASP_DELTA_KERNELS=fused and the kernel takes the sizes.
at::Tensor dr_cuda(const at::Tensor& minv, const at::Tensor& dU, const at::Tensor& S) {
  if (mode() != Mode::Fused || minv.dim() != 5 || dU.dim() != 5 || S.dim() != 5) return {};
  const auto t = dU.scalar_type();
  if ((t != at::kFloat && t != at::kDouble) || minv.scalar_type() != t || S.scalar_type() != t) return {};
  if (dU.size(3) > INT32_MAX || S.size(3) > INT32_MAX || dU.size(4) > INT32_MAX ||
      !cuda::delta_dr_takes(static_cast<int>(dU.size(3)), static_cast<int>(S.size(3)), static_cast<int>(dU.size(4)),
                            t == at::kDouble ? sizeof(double) : sizeof(float)))
    return {};
  const c10::cuda::CUDAGuard guard(dU.device());
  return t == at::kDouble ? dr<double>(minv, dU, S) : dr<float>(minv, dU, S);
}

template <typename T>
ProOut pro(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
           const at::Tensor& dO, double scale) {
  const at::Tensor Q = q.contiguous(), K = k.contiguous(), G = gam.contiguous(), P = pre.contiguous(),
                   O = dO.contiguous();
  const int64_t C = Q.size(3), D = Q.size(4), E = O.size(4);
  ProOut out;
  out.pdo = at::empty_like(O);
  out.qdo = at::empty({Q.size(0), Q.size(1), Q.size(2), D, E}, O.options());
  cuda::ProArgs<T> a;
  a.chunks = Q.size(0) * Q.size(1) * Q.size(2);
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.E = static_cast<int>(E);
  a.scale = static_cast<T>(scale);
  a.q = Q.data_ptr<T>();
  a.k = K.data_ptr<T>();
  a.gam = G.data_ptr<T>();
  a.pre = P.data_ptr<T>();
  a.dO = O.data_ptr<T>();
  a.pdo = out.pdo.data_ptr<T>();
  a.qdo = out.qdo.data_ptr<T>();
  if (a.chunks > 0) C10_CUDA_CHECK(cuda::delta_pro(a, at::cuda::getCurrentCUDAStream()));
  return out;
}

// The backward's chain inputs kernel where LASP_DELTA_KERNELS=fused and it takes the sizes; else nothing.
ProOut pro_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                const at::Tensor& dO, double scale) {
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
  return t == at::kDouble ? pro<double>(q, k, gam, pre, dO, scale) : pro<float>(q, k, gam, pre, dO, scale);
}

const bool registered = register_delta_chain(c10::DeviceType::CUDA, &chain_cuda);
const bool solve_registered = register_delta_solve(c10::DeviceType::CUDA, &solve_cuda);
const bool prep_registered = register_delta_prep(c10::DeviceType::CUDA, &prep_cuda);
const bool out_registered = register_delta_out(c10::DeviceType::CUDA, &out_cuda);
const bool bwd_registered = register_delta_bwd(c10::DeviceType::CUDA, &bwd_cuda);
const bool dr_registered = register_delta_dr(c10::DeviceType::CUDA, &dr_cuda);
const bool pro_registered = register_delta_pro(c10::DeviceType::CUDA, &pro_cuda);

}  // namespace
}  // namespace lasp
