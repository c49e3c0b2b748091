// Internal: the gated delta rule's kernel argument structs built from tensors (contiguous inputs, outputs
// allocated), shared by the CUDA hooks (csrc/cuda/delta_cuda.cpp: launch = the kernel on the current stream) and
// the host hooks (csrc/cpu/delta_host.cpp: launch = the block programs on the host). Each run_*_program takes
// the tensors the hook takes, fills the kernel's Args and calls launch(args) where there is work.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "delta.h"
#include "delta_bwd.h"
#include "delta_chain.h"
#include "delta_out.h"
#include "delta_prep.h"
#include "delta_solve.h"

namespace lasp {
namespace delta_launch {

// Whether t is float32 or float64 and every tensor of `others` is defined and of t's dtype.
inline bool acc_types(const at::Tensor& t, std::initializer_list<const at::Tensor*> others) {
  if (!t.defined() || (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)) return false;
  for (const at::Tensor* x : others)
    if (!x->defined() || x->scalar_type() != t.scalar_type()) return false;
  return true;
}

template <typename T, typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_chain_program(const ChainInputs& in, const at::Tensor& S0,
                                                                 Launch&& launch) {
  const int64_t B = S0.size(0), H = S0.size(1), D = S0.size(2), W = S0.size(3);
  const int64_t nc = in.Bm.size(2), C = in.Bm.size(3);
  const auto o = S0.options();
  auto c = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  const at::Tensor A = c(in.A), Bm = c(in.Bm), Cm = c(in.Cm), R = c(in.R), S = c(S0);
  const at::Tensor p = in.p.reshape({B, H, nc}).contiguous();
  at::Tensor store = at::empty({B, H, nc, D, W}, o), X = at::empty({B, H, nc, C, W}, o),
             fin = at::empty({B, H, D, W}, o);
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
  if (a.BH > 0) launch(a);
  return {store, X, fin};
}

template <typename T, typename Launch>
at::Tensor run_solve_program(const at::Tensor& M, const at::Tensor& R, bool transpose, Launch&& launch) {
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
  if (a.chunks > 0) launch(a);
  return X;
}

template <typename T, typename Launch>
PrepOut run_prep_program(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& g,
                         const at::Tensor& pre, bool tensor_cores, bool want_minv, Launch&& launch) {
  const at::Tensor K = k.contiguous(), V = v.contiguous(), Bt = beta.contiguous(), G = g.contiguous(),
                   P = pre.contiguous();
  const int64_t C = K.size(3), D = K.size(4), E = V.size(4);
  const auto o = K.options();
  PrepOut out;
  out.gam = at::empty({K.size(0), K.size(1), K.size(2), C, C}, o);
  out.kk = at::empty_like(out.gam);
  out.m = at::empty_like(out.gam);
  out.w = at::empty({K.size(0), K.size(1), K.size(2), C, E + D}, o);
  if (want_minv) out.minv = at::empty_like(out.gam);
  cuda::PrepArgs<T> a;
  a.chunks = K.size(0) * K.size(1) * K.size(2);
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.E = static_cast<int>(E);
  a.tensor_cores = tensor_cores && std::is_same<T, float>::value;
  a.k = K.data_ptr<T>();
  a.v = V.data_ptr<T>();
  a.beta = Bt.data_ptr<T>();
  a.g = G.data_ptr<T>();
  a.pre = P.data_ptr<T>();
  a.gam = out.gam.data_ptr<T>();
  a.kk = out.kk.data_ptr<T>();
  a.m = out.m.data_ptr<T>();
  a.w = out.w.data_ptr<T>();
  a.minv = want_minv ? out.minv.data_ptr<T>() : nullptr;
  if (a.chunks > 0) launch(a);
  return out;
}

template <typename T, typename Launch>
at::Tensor run_out_program(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                           const at::Tensor& S, const at::Tensor& U, double scale, bool tensor_cores, Launch&& launch) {
  const at::Tensor Q = q.contiguous(), K = k.contiguous(), G = gam.contiguous(), P = pre.contiguous(),
                   Sc = S.contiguous(), Uc = U.contiguous();
  at::Tensor o = at::empty_like(Uc);
  cuda::OutArgs<T> a;
  a.chunks = Q.size(0) * Q.size(1) * Q.size(2);
  a.C = static_cast<int>(Q.size(3));
  a.D = static_cast<int>(Q.size(4));
  a.E = static_cast<int>(Uc.size(4));
  a.scale = static_cast<T>(scale);
  a.tensor_cores = tensor_cores && std::is_same<T, float>::value;
  a.q = Q.data_ptr<T>();
  a.k = K.data_ptr<T>();
  a.gam = G.data_ptr<T>();
  a.pre = P.data_ptr<T>();
  a.S = Sc.data_ptr<T>();
  a.U = Uc.data_ptr<T>();
  a.o = o.data_ptr<T>();
  if (a.chunks > 0) launch(a);
  return o;
}

template <typename T, typename Launch>
BwdChunkOut run_bwd_program(const BwdChunkIn& in, Launch&& launch) {
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
  a.tensor_cores = in.tensor_cores && std::is_same<T, float>::value;
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
  if (a.chunks > 0) launch(a);
  return out;
}

template <typename T, typename Launch>
at::Tensor run_dr_program(const at::Tensor& minv, const at::Tensor& dU, const at::Tensor& S, bool tensor_cores,
                          Launch&& launch) {
  const at::Tensor Mi = minv.contiguous(), U = dU.contiguous(), Sc = S.contiguous();
  const int64_t C = U.size(3), E = U.size(4), D = Sc.size(3);
  at::Tensor dR = at::empty({U.size(0), U.size(1), U.size(2), C, E + D}, U.options());
  cuda::DrArgs<T> a;
  a.chunks = U.size(0) * U.size(1) * U.size(2);
  a.C = static_cast<int>(C);
  a.D = static_cast<int>(D);
  a.E = static_cast<int>(E);
  a.tensor_cores = tensor_cores && std::is_same<T, float>::value;
  a.minv = Mi.data_ptr<T>();
  a.dU = U.data_ptr<T>();
  a.S = Sc.data_ptr<T>();
  a.dR = dR.data_ptr<T>();
  if (a.chunks > 0) launch(a);
  return dR;
}

template <typename T, typename Launch>
ProOut run_pro_program(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                       const at::Tensor& dO, double scale, bool tensor_cores, Launch&& launch) {
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
  a.tensor_cores = tensor_cores && std::is_same<T, float>::value;
  a.q = Q.data_ptr<T>();
  a.k = K.data_ptr<T>();
  a.gam = G.data_ptr<T>();
  a.pre = P.data_ptr<T>();
  a.dO = O.data_ptr<T>();
  a.pdo = out.pdo.data_ptr<T>();
  a.qdo = out.qdo.data_ptr<T>();
  if (a.chunks > 0) launch(a);
  return out;
}

}  // namespace delta_launch
}  // namespace lasp
