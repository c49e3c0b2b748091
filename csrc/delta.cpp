// The gated delta rule (Gated DeltaNet) on one piece of the sequence: the ops, their meta kernels and the
// C++ autograd function. docs/design.md, "The gated delta rule", derives the chunked form and its backward.
//
//   lasp::gated_delta_attention  the user-facing op (one device): (o, final_state); autograd through
//                                GatedDeltaFunction, q / k l2-normalised first when asked (autograd ops)
//   lasp::gated_delta_fwd        the forward from a given incoming state: (o, final_state, minv), minv the
//                                chunks' m^-1 for 16-bit inputs with D, E in {64, 128} (else no elements)
//   lasp::gated_delta_bwd        its backward (given minv: not formed again): (dq, dk, dv, dg, dbeta,
//                                grad_initial_state); or only the
//                                gradient of the incoming state (state_grad_only), the one number the
//                                exchange across ranks needs before the gradient of the outgoing state is known
//   lasp::gated_delta_map        the piece's affine map of states, S_out = T S_in + L: (T, L)
//   lasp::gated_delta_exchange   the exchange of those maps across a group's ranks (exchange.h: S_in forward,
//                                the later ranks' state gradient backward)
//
// Per chunk of C = 64 tokens, entered with state S0, in the accumulation type (float32; float64 for float64):
//   Gam[i, j] = exp(g[j+1] + ... + g[i]) (j <= i), pre[i] = exp(g[0] + ... + g[i]), suf[j] = Gam[C-1, j]
//   M = I + A, A[i, j] = beta[i] Gam[i, j] (k[i] . k[j]) (j < i);  M [Wv | Wk] = [diag(beta) V | diag(beta pre) K]
//   U = Wv - Wk S0;  O = scale (diag(pre) Q S0 + (Q K^T * Gam) U);  S_end = pre[C-1] S0 + (diag(suf) K)^T U
// Everything but the chain of states is batched over all chunks; the chain is one small product per chunk.
// Every weight is the exp of a sum over its own range, so g = -inf (a reset) gives exact zeros, and the
// gradient of g is a sum of (weight x gradient of the weight) over the weights whose range holds the token.
// These ATen compositions serve every device; the chain and the chunks' solves take a device's kernels where
// it registered them (delta.h).
#include "delta.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>  // infer_dense_strides
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention.h"  // alloc_out, out_layout_like
#include "exchange.h"
#include "lasp.h"
#include "ring.h"

namespace lasp {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunk = 64;
constexpr const char* kOp = "gated_delta_attention";

// The kernels a device registered, one table per hook. The tables are keyed by the hook's function type, so
// every hook must have its own signature (checked below).
template <class Fn>
Fn& device_hook(c10::DeviceType type) {
  static Fn fns[static_cast<int>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)] = {};
  return fns[static_cast<int>(type)];
}
template <class T, class... Ts>
constexpr bool distinct_types() {
  if constexpr (sizeof...(Ts) == 0) {
    return true;
  } else {
    return (!std::is_same_v<T, Ts> && ...) && distinct_types<Ts...>();
  }
}
static_assert(distinct_types<ChainFn, SolveFn, PrepFn, OutFn, BwdFn, ProFn, DrFn, MainFn, MainBwdFn, L2NormFn,
                             L2NormBwdFn, MinvFn>(),
              "each device hook needs its own function type: device_hook keys its table by it");

at::ScalarType delta_acc(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
// float64 where any of q, k, v is float64 (q, k come in float32 after the l2 normalisation of 16-bit inputs)
at::ScalarType delta_acc(const Tensor& q, const Tensor& k, const Tensor& v) {
  const bool f64 = q.scalar_type() == at::kDouble || k.scalar_type() == at::kDouble || v.scalar_type() == at::kDouble;
  return f64 ? at::kDouble : at::kFloat;
}

// Shapes, dtypes and devices (symbolic sizes allowed: the meta kernels share it); g's values: with_gate_check.
void check_delta_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                        const std::optional<Tensor>& initial_state) {
  const char* names[] = {"q", "k", "v"};
  const Tensor* qkv[] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK_VALUE(qkv[i]->dim() == 4, kOp, ": ", names[i],
                      " must be a 4-D tensor (batch, heads, tokens, head dim), got ", qkv[i]->dim(), "-D");
  TORCH_CHECK_VALUE(g.dim() == 3, kOp, ": g must be a 3-D tensor (one value per batch, head and token), got ",
                    g.dim(), "-D");
  TORCH_CHECK_VALUE(beta.dim() == 3, kOp,
                    ": beta must be a 3-D tensor (one value per batch, head and token), got ", beta.dim(), "-D");
  const auto B = q.sym_size(0), N = q.sym_size(2), D = q.sym_size(3);
  const auto Hq = q.sym_size(1), Hk = k.sym_size(1), Hv = v.sym_size(1);
  const auto H = Hq.max(Hv);
  const c10::SymInt heads[] = {Hq, Hk, Hv};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK_VALUE(heads[i] >= 1 && H % heads[i] == 0, kOp, ": the ", names[i], " heads (", heads[i],
                      ") must divide the output heads max(Hq, Hv) = ", H);
  TORCH_CHECK_VALUE(k.sym_size(0) == B && k.sym_size(2) == N && k.sym_size(3) == D, kOp,
                    ": k must have shape (B, Hk, N, D) = (", B, ", ", Hk, ", ", N, ", ", D, "), got ", k.sym_sizes());
  TORCH_CHECK_VALUE(v.sym_size(0) == B && v.sym_size(2) == N, kOp, ": v must have shape (B, Hv, N, E) with (B, N) = (",
                    B, ", ", N, "), got ", v.sym_sizes());
  TORCH_CHECK_VALUE(g.sym_size(0) == B && g.sym_size(1) == H && g.sym_size(2) == N, kOp,
                    ": g must have shape (B, H, N) = (", B, ", ", H, ", ", N, "), got ", g.sym_sizes());
  TORCH_CHECK_VALUE(beta.sym_size(0) == B && beta.sym_size(1) == H && beta.sym_size(2) == N, kOp,
                    ": beta must have shape (B, H, N) = (", B, ", ", H, ", ", N, "), got ", beta.sym_sizes());
  const char* all_names[] = {"q", "k", "v", "g", "beta"};
  const Tensor* all[] = {&q, &k, &v, &g, &beta};
  for (int i = 0; i < 5; ++i) {
    TORCH_CHECK_TYPE(at::isFloatingType(all[i]->scalar_type()), kOp, ": ", all_names[i],
                     " must be a floating-point tensor, got ", all[i]->scalar_type());
    TORCH_CHECK_VALUE(all[i]->device() == q.device(), kOp, ": ", all_names[i], " must be on q's device ",
                      q.device(), ", got ", all[i]->device());
  }
  if (initial_state.has_value()) {
    const auto& s = *initial_state;
    TORCH_CHECK_VALUE(s.dim() == 4 && s.sym_size(0) == B && s.sym_size(1) == H && s.sym_size(2) == D &&
                          s.sym_size(3) == v.sym_size(3),
                      kOp, ": initial_state must have shape (B, H, D, E) = (", B, ", ", H, ", ", D, ", ",
                      v.sym_size(3), "), got ", s.sym_sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), kOp, ": initial_state must be a floating-point tensor, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == q.device(), kOp, ": initial_state must be on q's device ", q.device(), ", got ",
                      s.device());
  }
}

// deferred_bad_value's value of g against the op's domain.
void check_gate_values(double bad) {
  TORCH_CHECK_VALUE(bad <= 0, kOp, ": g must be <= 0 (log decay; -inf resets) and not NaN, got ",
                    std::isnan(bad) ? "NaN" : "a value > 0");
}

// g's values (the ops that read them): a look at g queued before the op's kernels and read after them
// (attention.h, deferred_bad_value), so that no host sync precedes them.
template <class Body>
auto with_gate_check(const Tensor& g, Body&& body) {
  const DeferredBad bad = get_value_checks() ? deferred_bad_value(g) : DeferredBad();
  auto out = body();
  if (bad) check_gate_values(bad());
  return out;
}

// Whether gated_delta_fwd returns m^-1 (its third output) for these inputs: 16-bit q, k, v of one dtype with D and E
// in {64, 128}, the inputs the 16-bit backward kernels take, whatever the device (the meta kernel, which sees meta
// tensors, gives the same shape).
bool keeps_minv(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto t = q.scalar_type();
  if ((t != at::kBFloat16 && t != at::kHalf) || k.scalar_type() != t || v.scalar_type() != t || q.dim() != 4 ||
      v.dim() != 4)
    return false;
  const auto D = q.sym_size(3), E = v.sym_size(3);
  return (D == 64 || D == 128) && (E == 64 || E == 128);
}

// gated_delta_fwd's third output where the forward keeps no m^-1: no elements.
Tensor no_minv(const Tensor& q) { return at::empty({0}, q.options()); }

// gated_delta_bwd's minv: None, the no-element tensor, or what gated_delta_fwd returned for these inputs.
void check_minv(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& minv) {
  if (!minv.has_value() || (minv->dim() == 1 && minv->sym_size(0) == 0)) return;
  const auto B = q.sym_size(0), H = q.sym_size(1).max(v.sym_size(1)), N = q.sym_size(2);
  const bool keep = keeps_minv(q, k, v);
  TORCH_CHECK_VALUE(keep, kOp,
                    ": minv must be None or gated_delta_fwd's third output for the same inputs, which "
                    "has no elements here; got shape ",
                    minv->sym_sizes());
  TORCH_CHECK_VALUE(minv->dim() == 4 && minv->sym_size(0) == B && minv->sym_size(1) == H && minv->sym_size(2) == N &&
                        minv->sym_size(3) == kChunk,
                    kOp, ": minv must have shape (B, H, N, ", kChunk, ") = (", B, ", ", H, ", ", N, ", ", kChunk,
                    ") (gated_delta_fwd's third output), got ", minv->sym_sizes());
  TORCH_CHECK_TYPE(minv->scalar_type() == q.scalar_type(), kOp, ": minv must have q's dtype ", q.scalar_type(),
                   ", got ", minv->scalar_type());
  TORCH_CHECK_VALUE(minv->device() == q.device(), kOp, ": minv must be on q's device ", q.device(), ", got ",
                    minv->device());
  TORCH_CHECK_VALUE(minv->is_contiguous(), kOp, ": minv must be contiguous (gated_delta_fwd's third output)");
}

// x (B, Hx, N, X) -> (B, H, N, X) in acc: the output heads' view of a shared head.
Tensor to_out_heads(const Tensor& x, int64_t H, at::ScalarType acc) {
  Tensor y = x.to(acc);
  const int64_t hx = y.size(1);
  return hx == H ? y : y.repeat_interleave(H / hx, 1);
}

// The gradient of input x from dx (per output head: (B, H, N, X) for x (B, Hx, N, X), summed over the output heads
// that read each of x's heads; or x's shape) in x's dtype and memory order: at::empty_like's (x's strides where x is
// dense, else dense ones in x's order), as the meta kernel says. dx itself where it already is that (the CUDA
// kernels write it so).
Tensor grad_like(const Tensor& dx, const Tensor& x) {
  const Tensor y = dx.size(1) == x.size(1)
                       ? dx
                       : dx.view({dx.size(0), x.size(1), dx.size(1) / x.size(1), dx.size(2), dx.size(3)}).sum(2);
  const std::vector<int64_t> st =
      x.is_non_overlapping_and_dense() ? x.strides().vec() : at::infer_dense_strides(x.sizes(), x.strides());
  if (y.scalar_type() == x.scalar_type() && y.strides() == at::IntArrayRef(st)) return y;
  return at::empty_strided(x.sizes(), st, x.options()).copy_(y);
}

// (..., C) -> (..., C, C): x[j+1] + ... + x[i] for j <= i (0 on the diagonal), -inf above it.
Tensor segsum(const Tensor& x) {
  const int64_t C = x.size(-1);
  auto sizes = x.sizes().vec();
  sizes.push_back(C);
  const auto bopts = x.options().dtype(at::kBool);
  const Tensor strict = at::ones({C, C}, bopts).tril(-1);
  Tensor out = x.unsqueeze(-1).expand(sizes).masked_fill(strict.logical_not(), 0.0).cumsum(-2);
  return out.masked_fill(at::ones({C, C}, bopts).tril().logical_not(), -std::numeric_limits<double>::infinity());
}

}  // namespace

DeltaKernels delta_kernels_mode() {
  const char* v = std::getenv("LASP_DELTA_KERNELS");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "cuda") == 0) return DeltaKernels::Cuda;
  if (std::strcmp(v, "fused") == 0) return DeltaKernels::Fused;
  if (std::strcmp(v, "host") == 0) return DeltaKernels::Host;
  TORCH_CHECK_VALUE(std::strcmp(v, "aten") == 0,
                    "LASP_DELTA_KERNELS must be 'aten', 'cuda', 'fused' or 'host', got '", v, "'");
  return DeltaKernels::Aten;
}

namespace {

// M^-1 R (M^-T R), M unit lower triangular: the device's kernel where it takes them, else ATen's solve.
Tensor solve_unit(const Tensor& M, const Tensor& R, bool transpose) {
  if (SolveFn fn = device_hook<SolveFn>(M.device().type())) {
    Tensor x = fn(M, R, transpose);
    if (x.defined()) return x;
  }
  return transpose ? at::linalg_solve_triangular(M.transpose(-1, -2), R, /*upper=*/true, /*left=*/true,
                                                 /*unitriangular=*/true)
                   : at::linalg_solve_triangular(M, R, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
}

// The chunked quantities of one piece that do not depend on the incoming state, (B, H, nc, C, .) in acc.
struct Chunks {
  int64_t B = 0, H = 0, N = 0, nc = 0, D = 0, E = 0;
  at::ScalarType acc = at::kFloat;
  bool low = false;      // v is 16-bit (and nothing float64): the chain may take tf32 products
  Tensor q, k, v, beta;  // output heads, padded to whole chunks (q, k, v = 0, beta = 0, g = 0: no effect)
  Tensor gam, pre, suf;  // (.., C, C) lower with the diagonal; (.., C); (.., C)
  Tensor kk, m;          // K K^T; M = I + A (unit lower)
  Tensor minv;           // M^-1 where a device's kernel formed it, else undefined
  Tensor w, wv, wk;      // (.., C, E + D) = [Wv | Wk]; its two parts
  Tensor plast;          // (B, H, nc, 1, 1): pre[C-1]
  Tensor ks;             // (B, H, nc, D, C): (diag(suf) K)^T
};

// need_minv: the caller (the backward) takes m^-1 where a device's kernel forms it.
Chunks prepare(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
               bool need_q, bool need_minv = false) {
  Chunks c;
  c.acc = delta_acc(q, k, v);
  c.low = c.acc == at::kFloat && at::isReducedFloatingType(v.scalar_type());
  c.B = q.size(0);
  c.H = std::max(q.size(1), v.size(1));
  c.N = q.size(2);
  c.D = q.size(3);
  c.E = v.size(3);
  const int64_t C = kChunk;
  c.nc = (c.N + C - 1) / C;
  const int64_t pad = c.nc * C - c.N;
  auto chunked = [&](const Tensor& x) {  // (B, H, N, X) -> (B, H, nc, C, X), zero-padded
    Tensor y = pad ? at::constant_pad_nd(x, {0, 0, 0, pad}) : x;
    return y.reshape({c.B, c.H, c.nc, C, x.size(3)});
  };
  auto chunked3 = [&](const Tensor& x) {  // (B, H, N) -> (B, H, nc, C)
    Tensor y = x.to(c.acc);
    y = pad ? at::constant_pad_nd(y, {0, pad}) : y;
    return y.reshape({c.B, c.H, c.nc, C});
  };
  if (need_q) c.q = chunked(to_out_heads(q, c.H, c.acc));
  c.k = chunked(to_out_heads(k, c.H, c.acc));
  c.v = chunked(to_out_heads(v, c.H, c.acc));
  const Tensor gc = chunked3(g);
  c.beta = chunked3(beta);
  c.pre = gc.cumsum(-1).exp();
  PrepOut fused;
  if (PrepFn fn = device_hook<PrepFn>(q.device().type())) fused = fn(c.k, c.v, c.beta, gc, c.pre, c.low, need_minv);
  Tensor w;
  if (fused.w.defined()) {
    c.gam = fused.gam;
    c.kk = fused.kk;
    c.m = fused.m;
    c.minv = fused.minv;
    w = fused.w;
  } else {
    c.gam = segsum(gc).exp();
    c.kk = at::matmul(c.k, c.k.transpose(-1, -2));
    const auto bopts = q.options().dtype(at::kBool);
    const Tensor strict = at::ones({C, C}, bopts).tril(-1);
    Tensor A = (c.beta.unsqueeze(-1) * c.gam * c.kk).masked_fill(strict.logical_not(), 0.0);
    c.m = A + at::eye(C, q.options().dtype(c.acc));
    const Tensor rhs = at::cat({c.beta.unsqueeze(-1) * c.v, (c.beta * c.pre).unsqueeze(-1) * c.k}, -1);
    w = solve_unit(c.m, rhs, /*transpose=*/false);
  }
  c.suf = c.gam.select(-2, C - 1);
  c.plast = c.pre.narrow(-1, C - 1, 1).unsqueeze(-1);
  c.w = w;
  c.wv = w.narrow(-1, 0, c.E);
  c.wk = w.narrow(-1, c.E, c.D);
  c.ks = (c.suf.unsqueeze(-1) * c.k).transpose(-1, -2);
  return c;
}

// Each chunk's m^-1 by ATen operations, in dtype t, (B, H, N, C): row n holds row n mod C of its chunk's (the third
// output of gated_delta_fwd where no device kernel forms it).
Tensor minv_aten(const Chunks& c, const Tensor& g, at::ScalarType t) {
  const int64_t C = kChunk, pad = c.nc * C - c.N;
  Tensor gc = g.to(c.acc);
  gc = (pad ? at::constant_pad_nd(gc, {0, pad}) : gc).reshape({c.B, c.H, c.nc, C});
  const Tensor strict = at::ones({C, C}, c.k.options().dtype(at::kBool)).tril(-1);
  const Tensor A = (c.beta.unsqueeze(-1) * segsum(gc).exp() * at::matmul(c.k, c.k.transpose(-1, -2)))
                       .masked_fill(strict.logical_not(), 0.0);
  const Tensor eye = at::eye(C, c.k.options());
  const Tensor minv = solve_unit(A + eye, eye.expand_as(A).contiguous(), /*transpose=*/false);
  return minv.to(t).reshape({c.B, c.H, c.nc * C, C}).narrow(2, 0, c.N).contiguous();
}

Tensor state_or_zeros(const std::optional<Tensor>& s, const Chunks& c, const Tensor& like) {
  // a copy: with no chunk (an empty piece) the final state is this tensor, which must not alias the input
  return s.has_value() ? s->to(c.acc, /*non_blocking=*/false, /*copy=*/true) : at::zeros({c.B, c.H, c.D, c.E}, like.options().dtype(c.acc));
}

// The chain on S0's device: its registered kernel where it takes the inputs, else the ATen composition.
std::tuple<Tensor, Tensor, Tensor> chain(const ChainInputs& in, const Tensor& S0) {
  if (ChainFn fn = device_hook<ChainFn>(S0.device().type())) {
    auto out = fn(in, S0);
    if (std::get<0>(out).defined()) return out;
  }
  return delta_chain_aten(in, S0);
}

// The chain of states: the state entering each chunk (B, H, nc, D, E), U (B, H, nc, C, E), the final state.
std::tuple<Tensor, Tensor, Tensor> state_chain(const Chunks& c, const Tensor& S0) {
  ChainInputs in;
  in.A = c.wv;
  in.Bm = c.wk;
  in.bsign = -1.0;
  in.Cm = c.ks;
  in.p = c.plast;
  in.tensor_cores = c.low;
  return chain(in, S0);
}

// (B, H, nc, C, X) -> (B, H, N, X)
Tensor unchunk(const Tensor& x, int64_t N) {
  return x.reshape({x.size(0), x.size(1), x.size(2) * x.size(3), x.size(4)}).narrow(2, 0, N);
}

std::tuple<Tensor, Tensor, Tensor> fwd_body(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                            const Tensor& beta, double scale,
                                            const std::optional<Tensor>& initial_state);
std::tuple<Tensor, Tensor> map_body(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                    const Tensor& beta);

std::tuple<Tensor, Tensor, Tensor> fwd_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                            const Tensor& beta, double scale,
                                            const std::optional<Tensor>& initial_state) {
  check_delta_inputs(q, k, v, g, beta, initial_state);
  return with_gate_check(g, [&] { return fwd_body(q, k, v, g, beta, scale, initial_state); });
}

std::tuple<Tensor, Tensor, Tensor> fwd_body(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                            const Tensor& beta, double scale,
                                            const std::optional<Tensor>& initial_state) {
  const bool keep = keeps_minv(q, k, v);
  if (MainFn main = device_hook<MainFn>(q.device().type()); main && q.size(2) > 0) {
    auto [o, fin, minv] = main(q, k, v, g, beta, scale, initial_state);
    if (o.defined() && minv.defined() == keep) return {o, fin, keep ? minv : no_minv(q)};
  }
  Tensor minv = no_minv(q);
  if (keep) {
    MinvFn fn = q.size(2) > 0 ? device_hook<MinvFn>(q.device().type()) : nullptr;
    minv = fn ? fn(k, v, g, beta) : Tensor();
  }
  const Chunks c = prepare(q, k, v, g, beta, /*need_q=*/true);
  if (keep && !minv.defined()) minv = minv_aten(c, g, q.scalar_type());
  auto [states, u, fin] = state_chain(c, state_or_zeros(initial_state, c, q));
  // o (B, H, N, E) in q's dtype, laid out as q (v where v has more heads) is; made once o is formed
  auto o_out = [&] { return alloc_out(out_layout_like(q, v), c.H, c.E, q.options()); };
  if (c.nc == 0) return {o_out(), fin, minv};
  Tensor o;
  if (OutFn fn = device_hook<OutFn>(q.device().type())) o = fn(c.q, c.k, c.gam, c.pre, states, u, scale, c.low);
  if (!o.defined()) {
    const Tensor qk = at::matmul(c.q, c.k.transpose(-1, -2)) * c.gam;
    o = (c.pre.unsqueeze(-1) * at::matmul(c.q, states) + at::matmul(qk, u)) * scale;
  }
  return {o_out().copy_(unchunk(o, c.N)), fin, minv};
}

using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

BwdOut bwd_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, double scale,
                const std::optional<Tensor>& initial_state, const std::optional<Tensor>& dout,
                const std::optional<Tensor>& grad_final_state, bool state_grad_only,
                const std::optional<Tensor>& minv) {
  check_delta_inputs(q, k, v, g, beta, initial_state);
  check_minv(q, k, v, minv);
  {
    const int64_t B = q.size(0), H = std::max(q.size(1), v.size(1)), N = q.size(2), D = q.size(3), E = v.size(3);
    TORCH_CHECK_VALUE(!dout.has_value() || (dout->dim() == 4 && dout->size(0) == B && dout->size(1) == H &&
                                            dout->size(2) == N && dout->size(3) == E),
                      kOp, ": dout must have shape (B, H, N, E) = (", B, ", ", H, ", ", N, ", ", E, "), got ",
                      dout.has_value() ? dout->sizes() : at::IntArrayRef{});
    TORCH_CHECK_VALUE(!grad_final_state.has_value() || grad_final_state->sizes() == at::IntArrayRef({B, H, D, E}), kOp,
                      ": grad_final_state must have shape (B, H, D, E) = (", B, ", ", H, ", ", D, ", ", E, "), got ",
                      grad_final_state.has_value() ? grad_final_state->sizes() : at::IntArrayRef{});
  }
  // The op's outputs from the gradients of q, k, v in (B, H, N, .) per output head, of g and beta in (B, H, N), and
  // of the state entering the piece (dS, in the acc type): each input's gradient in its dtype and memory order.
  auto finish = [&](const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dg, const Tensor& dbeta,
                    const Tensor& dS) -> BwdOut {
    const Tensor dinit = initial_state.has_value() ? dS.to(initial_state->scalar_type()) : dS;
    if (state_grad_only) {
      const auto none = q.options().dtype(dS.scalar_type());
      return {at::empty({0}, none), at::empty({0}, none), at::empty({0}, none),
              at::empty({0}, none), at::empty({0}, none), dinit};
    }
    return {grad_like(dq, q), grad_like(dk, k), grad_like(dv, v), grad_like(dg, g), grad_like(dbeta, beta), dinit};
  };
  if (MainBwdFn fn = device_hook<MainBwdFn>(q.device().type()); fn && q.size(2) > 0) {
    const Tensor mi = minv.has_value() && minv->dim() == 4 ? *minv : Tensor();
    auto [dq, dk, dv, dg, dbeta, dS] =
        fn(q, k, v, g, beta, scale, initial_state, dout, grad_final_state, state_grad_only, mi);
    if (dS.defined()) return finish(dq, dk, dv, dg, dbeta, dS);
  }
  const Chunks c = prepare(q, k, v, g, beta, /*need_q=*/true, /*need_minv=*/!state_grad_only);
  const int64_t C = kChunk;
  const auto aopts = q.options().dtype(c.acc);
  auto [states, u, fin] = state_chain(c, state_or_zeros(initial_state, c, q));
  // dO chunked (zeros where the loss does not use o)
  Tensor dO;
  if (dout.has_value()) {
    const int64_t pad = c.nc * C - c.N;
    Tensor d = dout->to(c.acc);
    dO = (pad ? at::constant_pad_nd(d, {0, 0, 0, pad}) : d).reshape({c.B, c.H, c.nc, C, c.E});
  } else {
    dO = at::zeros({c.B, c.H, c.nc, C, c.E}, aopts);
  }
  const Tensor dS_end = grad_final_state.has_value() ? grad_final_state->to(c.acc) : at::zeros_like(fin);
  auto qk_raw = [&c]() { return at::matmul(c.q, c.k.transpose(-1, -2)); };
  // The parts of dU and dS that the chain does not carry, for all chunks at once.
  ProOut pro;
  if (ProFn fn = device_hook<ProFn>(q.device().type())) pro = fn(c.q, c.k, c.gam, c.pre, dO, scale, c.low);
  if (!pro.pdo.defined()) {
    const Tensor P = qk_raw() * c.gam;
    pro.pdo = at::matmul(P.transpose(-1, -2), dO) * scale;                                // (.., C, E)
    pro.qdo = at::matmul(c.q.transpose(-1, -2), c.pre.unsqueeze(-1) * dO) * scale;      // (.., D, E)
  }
  const Tensor pdo = pro.pdo, qdo = pro.qdo;
  const Tensor sk = c.ks.transpose(-1, -2);                                                    // (.., C, D)
  ChainInputs in;  // the chain backwards: dU = pdo + diag(suf) K dS, dS <- qdo + pre[C-1] dS - Wk^T dU
  in.A = pdo;
  in.Bm = sk;
  in.Cm = c.wk.transpose(-1, -2);
  in.csign = -1.0;
  in.p = c.plast;
  in.R = qdo;
  in.reverse = true;
  in.tensor_cores = c.low;
  // dSe: the gradient of the state leaving each chunk
  auto [dSe, dU, dS] = chain(in, dS_end);  // dS: the gradient of the state entering the piece
  if (state_grad_only) return finish(Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), dS);
  // Through the triangular solve: M [Wv | Wk] = R, dW = [dU | -dU S0^T], dR = M^-T dW, dA = -dR W^T.
  Tensor dR;
  if (c.minv.defined())
    if (DrFn fn = device_hook<DrFn>(q.device().type())) dR = fn(c.minv, dU, states, c.low);
  if (!dR.defined()) {
    const Tensor dW = at::cat({dU, -at::matmul(dU, states.transpose(-1, -2))}, -1);
    dR = solve_unit(c.m, dW, /*transpose=*/true);
  }
  Tensor dq, dk, dv, dbeta, dg;
  BwdChunkOut fused;
  if (BwdFn fn = device_hook<BwdFn>(q.device().type()))
    fused = fn(BwdChunkIn{c.q, c.k, c.v, c.beta, c.pre, c.gam, c.kk, c.w, states, dSe, u, dO, dR, scale, c.low});
  if (fused.dq.defined()) {
    dq = fused.dq;
    dk = fused.dk;
    dv = fused.dv;
    dbeta = fused.dbeta;
    dg = fused.dg;
  } else {
    const auto bopts = q.options().dtype(at::kBool);
    const Tensor strict = at::ones({C, C}, bopts).tril(-1);
    const Tensor dA = (-at::matmul(dR, c.w.transpose(-1, -2))).masked_fill(strict.logical_not(), 0.0);
    const Tensor dRv = dR.narrow(-1, 0, c.E), dRk = dR.narrow(-1, c.E, c.D);
    const Tensor bcol = c.beta.unsqueeze(-1);
    const Tensor dRk_k = (dRk * c.k).sum(-1);  // (.., C)
    // o: dP = scale dO U^T (masked by Gam)
    const Tensor dP = at::matmul(dO, u.transpose(-1, -2)) * scale;
    const Tensor dPg = dP * c.gam;
    const Tensor dkk = dA * bcol * c.gam;
    const Tensor udS = at::matmul(u, dSe.transpose(-1, -2));  // (.., C, D): U dS_end^T
    dq = c.pre.unsqueeze(-1) * at::matmul(dO, states.transpose(-1, -2)) * scale + at::matmul(dPg, c.k);
    dk = at::matmul(dkk + dkk.transpose(-1, -2), c.k) + at::matmul(dPg.transpose(-1, -2), c.q) +
         c.suf.unsqueeze(-1) * udS + (c.beta * c.pre).unsqueeze(-1) * dRk;
    dv = bcol * dRv;
    dbeta = (dRv * c.v).sum(-1) + c.pre * dRk_k + (dA * c.gam * c.kk).sum(-1);
    // Gates: weight x gradient of the weight, summed over each weight's range of tokens.
    const Tensor XG = c.gam * (dP * qk_raw() + dA * bcol * c.kk);                        // Gam[i, j]: j+1 .. i
    Tensor dpre = (dO * at::matmul(c.q, states)).sum(-1) * scale + c.beta * dRk_k;    // pre[i]: 0 .. i
    dpre.narrow(-1, C - 1, 1).add_((dSe * states).sum({-2, -1}).unsqueeze(-1));
    const Tensor Xp = c.pre * dpre;
    const Tensor Xs = c.suf * (c.k * udS).sum(-1);                                    // suf[j]: j+1 .. C-1
    // dg[t] = sum_{i >= t} (Xp[i] + sum_{j < t} XG[i, j]) + sum_{j < t} Xs[j], each a sum of the terms
    // themselves (a row-sum-minus-column-sum shortcut loses digits to cancellation)
    const Tensor Z = XG.flip(-2).cumsum(-2).flip(-2);  // Z[t, j] = sum_{i >= t} XG[i, j]
    dg = Xp.flip(-1).cumsum(-1).flip(-1) + Z.masked_fill(strict.logical_not(), 0.0).sum(-1) +
         at::constant_pad_nd(Xs.narrow(-1, 0, C - 1), {1, 0}).cumsum(-1);
  }
  auto flat3 = [&](const Tensor& x) { return x.reshape({c.B, c.H, c.nc * C}).narrow(2, 0, c.N); };
  return finish(unchunk(dq, c.N), unchunk(dk, c.N), unchunk(dv, c.N), flat3(dg), flat3(dbeta), dS);
}

std::tuple<Tensor, Tensor> map_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                    const Tensor& beta) {
  check_delta_inputs(q, k, v, g, beta, std::nullopt);
  return with_gate_check(g, [&] { return map_body(q, k, v, g, beta); });
}

std::tuple<Tensor, Tensor> map_body(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                    const Tensor& beta) {
  const Chunks c = prepare(q, k, v, g, beta, /*need_q=*/false);
  const auto aopts = q.options().dtype(c.acc);
  // [T | L] as one chain: its columns are independent, T's from I with no values, L's from 0 with Wv
  ChainInputs in;
  in.A = at::cat({at::zeros({c.B, c.H, c.nc, kChunk, c.D}, aopts), c.wv}, -1);
  in.Bm = c.wk;
  in.bsign = -1.0;
  in.Cm = c.ks;
  in.p = c.plast;
  in.tensor_cores = c.low;
  const Tensor S0 = at::cat({at::eye(c.D, aopts).expand({c.B, c.H, c.D, c.D}), at::zeros({c.B, c.H, c.D, c.E}, aopts)}, -1);
  const Tensor TL = std::get<2>(chain(in, S0));
  return {TL.narrow(-1, 0, c.D).contiguous(), TL.narrow(-1, c.D, c.E).contiguous()};
}

// The exchange across the ranks of a group of the pieces' maps S -> T S + L (exchange.h, make_map_exchange).
// Forward: x = L, returns S_in (the first rank: initial_state, or zeros). Backward: x = the gradient of S_in
// from this rank's piece alone, returns the gradient of the state this rank sends on, from the ranks after it
// (zeros on the last rank).
Tensor exchange_impl(const Tensor& T, const Tensor& x, const std::optional<Tensor>& initial_state,
                     const std::string& group_name, const std::string& strategy_name, bool backward) {
  const Strategy strategy = parse_strategy(strategy_name);
  TORCH_CHECK_VALUE(T.dim() == 4 && x.dim() == 4 && T.size(0) == x.size(0) && T.size(1) == x.size(1) &&
                        T.size(2) == x.size(2) && T.size(3) == x.size(2),
                    "gated_delta_exchange: T must be (B, H, D, D) and x (B, H, D, E), got ", T.sizes(), " and ",
                    x.sizes());
  TORCH_CHECK_TYPE(T.scalar_type() == x.scalar_type() &&
                       (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                   "gated_delta_exchange: T and x must be float32 or float64 alike, got ", T.scalar_type(), " and ",
                   x.scalar_type());
  const Ring ring(group_name);
  const Tensor tr = backward ? T.transpose(-1, -2).contiguous() : T.contiguous();
  auto ex = make_map_exchange(ring, strategy, tr, x, scan_node_size(strategy_name));
  const Tensor xc = x.contiguous();
  if (!backward) {
    std::optional<Tensor> init;
    if (initial_state.has_value()) init = initial_state->to(x.scalar_type()).contiguous();
    const ForwardStates f = ex->forward(xc, init);
    return f.s_in.defined() ? f.s_in.clone() : at::zeros_like(xc);
  }
  const BackwardStates b = ex->backward(xc, Tensor(), [] {});
  return b.g.defined() ? b.g.clone() : at::zeros_like(xc);
}

Tensor exchange_meta(const Tensor& T, const Tensor& x, const std::optional<Tensor>& initial_state,
                     const std::string& group_name, const std::string& strategy_name, bool backward) {
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

// ---- Meta kernels ----
Tensor state_meta(const Tensor& q, const Tensor& k, const Tensor& v, const c10::SymInt& cols) {
  return at::empty_symint({q.sym_size(0), q.sym_size(1).max(v.sym_size(1)), q.sym_size(3), cols},
                          q.options().dtype(delta_acc(q, k, v)));
}

std::tuple<Tensor, Tensor, Tensor> fwd_meta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                            const Tensor& beta, double scale,
                                            const std::optional<Tensor>& initial_state) {
  check_delta_inputs(q, k, v, g, beta, initial_state);
  const auto H = q.sym_size(1).max(v.sym_size(1));
  return {alloc_out(out_layout_like(q, v), H, v.sym_size(3), q.options()), state_meta(q, k, v, v.sym_size(3)),
          keeps_minv(q, k, v) ? at::empty_symint({q.sym_size(0), H, q.sym_size(2), c10::SymInt(kChunk)}, q.options())
                              : no_minv(q)};
}

BwdOut bwd_meta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, double scale,
                const std::optional<Tensor>& initial_state, const std::optional<Tensor>& dout,
                const std::optional<Tensor>& grad_final_state, bool state_grad_only,
                const std::optional<Tensor>& minv) {
  check_delta_inputs(q, k, v, g, beta, initial_state);
  check_minv(q, k, v, minv);
  Tensor ds = state_meta(q, k, v, v.sym_size(3));
  if (initial_state.has_value()) ds = ds.to(initial_state->scalar_type());
  if (state_grad_only) {
    const auto none = q.options().dtype(delta_acc(q, k, v));
    return {at::empty({0}, none), at::empty({0}, none), at::empty({0}, none), at::empty({0}, none),
            at::empty({0}, none), ds};
  }
  // each input's gradient as grad_like lays it out
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v), at::empty_like(g), at::empty_like(beta), ds};
}

std::tuple<Tensor, Tensor> map_meta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                    const Tensor& beta) {
  check_delta_inputs(q, k, v, g, beta, std::nullopt);
  return {state_meta(q, k, v, q.sym_size(3)), state_meta(q, k, v, v.sym_size(3))};
}

// ---- The user-facing op ----
std::tuple<Tensor, Tensor, Tensor> call_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                            const Tensor& beta, double scale,
                                            const std::optional<Tensor>& initial_state) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lasp::gated_delta_fwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, double, const std::optional<Tensor>&)>();
  return op.call(q, k, v, g, beta, scale, initial_state);
}

// Whether a device's kernel may read x's data: not a tensor being traced (fake or functional tensors of
// torch.compile, which carry the Python or Functionalize dispatch keys, and meta tensors), where only ATen
// operations may run.
bool has_data(const Tensor& x) {
  return !x.is_meta() &&
         !x.key_set().has_any(c10::DispatchKeySet(
             {c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize}));
}

// x / sqrt(sum of squares over D + 1e-6) (fla's use_qk_l2norm_in_kernel), computed in the acc type and rounded
// once to x's dtype: 16-bit q and k stay 16-bit, as fla's kernel gives them, so that the 16-bit kernels take
// them. By the device's kernel where it has one (CUDA: 16-bit rows, one pass; where want_r also the rows' r =
// 1 / sqrt(...) in fp32), else in two passes (the rows' norms, one read of x; then the product into x's dtype, one
// read, one write; r in the acc type).
std::tuple<Tensor, Tensor> l2norm_values(const Tensor& x, bool want_r = false) {
  const auto acc = delta_acc(x.scalar_type());
  if (L2NormFn fn = has_data(x) ? device_hook<L2NormFn>(x.device().type()) : nullptr) {
    auto [y, r] = fn(x, want_r);
    if (y.defined()) return {y, r};
  }
  const Tensor r =
      at::linalg_vector_norm(x, 2, at::IntArrayRef{-1}, /*keepdim=*/true, acc).square_().add_(1e-6).rsqrt_();
  Tensor out = at::empty_like(x);
  at::mul_out(out, x, r);
  return {out, want_r ? r : Tensor()};
}

// The same as differentiable ATen operations (the derivative of the sum of squares is defined at zero rows).
Tensor l2norm_aten(const Tensor& x) {
  const Tensor xf = x.to(delta_acc(x.scalar_type()));
  return (xf * (xf * xf).sum(-1, true).add(1e-6).rsqrt()).to(x.scalar_type());
}

// Where autograd records it on a device with a backward kernel: the forward by l2norm_values, which also gives
// the rows' r; autograd keeps y (the op keeps it anyway) and r (4 bytes a row), not x. The backward
// dx = r (dy - y sum(dy y)) by the device's kernel (one pass), or where it does not take the rows by the same
// formula in ATen operations. y is x's normalisation rounded to x's dtype, so the gradient differs from the
// derivative of the unrounded form by about that rounding (as fla's, which also rounds).
// A second derivative exists only through the ATen form (l2norm_aten).
class L2NormFunction : public torch::autograd::Function<L2NormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, r] = l2norm_values(x, /*want_r=*/true);
    ctx->save_for_backward({y, r});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor y = saved[0], r = saved[1];
    const Tensor dy = grads[0].to(y.scalar_type());
    L2NormBwdFn fn = has_data(y) && has_data(dy) ? device_hook<L2NormBwdFn>(y.device().type()) : nullptr;
    Tensor dx = fn ? fn(y, r, dy) : Tensor();
    if (!dx.defined()) {
      const auto acc = delta_acc(y.scalar_type());
      const Tensor yf = y.to(acc), dyf = dy.to(acc);
      dx = (r.to(acc) * (dyf - yf * (dyf * yf).sum(-1, true))).to(y.scalar_type());
    }
    return {dx};
  }
};

// The l2 normalisation of q or k. Where autograd records it: L2NormFunction on devices with a backward kernel,
// else, and while torch.compile traces the call, l2norm_aten.
Tensor l2norm(const Tensor& x) {
  if (!(at::GradMode::is_enabled() && x.requires_grad())) return std::get<0>(l2norm_values(x));
  if (has_data(x) && device_hook<L2NormBwdFn>(x.device().type())) return L2NormFunction::apply(x);
  return l2norm_aten(x);
}

BwdOut call_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta, double scale,
                const std::optional<Tensor>& initial_state, const std::optional<Tensor>& dout,
                const std::optional<Tensor>& grad_final_state, bool state_grad_only, const Tensor& minv) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lasp::gated_delta_bwd", "")
                       .typed<BwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                     const std::optional<Tensor>&, const std::optional<Tensor>&,
                                     const std::optional<Tensor>&, bool, const std::optional<Tensor>&)>();
  std::optional<Tensor> mi;
  if (minv.defined()) mi = minv;
  return op.call(q, k, v, g, beta, scale, initial_state, dout, grad_final_state, state_grad_only, mi);
}

std::tuple<Tensor, Tensor> call_map(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                    const Tensor& beta) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lasp::gated_delta_map", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&)>();
  return op.call(q, k, v, g, beta);
}

Tensor call_exchange(const Tensor& T, const Tensor& x, const std::optional<Tensor>& initial_state,
                     const std::string& group_name, const std::string& strategy, bool backward) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lasp::gated_delta_exchange", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const std::string&,
                                     const std::string&, bool)>();
  return op.call(T, x, initial_state, group_name, strategy, backward);
}

// One rank's piece forward: alone, from the initial state; under a group of two or more ranks, its map
// (T, L), the exchange that brings S_in (the first rank's: the initial state), then the piece from S_in.
// Returns (o, final state, S_in, T, m^-1); S_in and T undefined alone; m^-1 gated_delta_fwd's third output.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> piece_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                                 const Tensor& g, const Tensor& beta, double scale,
                                                                 const std::optional<Tensor>& initial_state,
                                                                 const std::optional<std::string>& group_name,
                                                                 const std::string& strategy) {
  if (!group_name.has_value() || Ring(group_name).size() <= 1) {
    auto [o, fin, minv] = call_fwd(q, k, v, g, beta, scale, initial_state);
    return {o, fin, Tensor(), Tensor(), minv};
  }
  auto [T, L] = call_map(q, k, v, g, beta);
  Tensor s_in = call_exchange(T, L, initial_state, *group_name, strategy, /*backward=*/false);
  auto [o, fin, minv] = call_fwd(q, k, v, g, beta, scale, s_in);
  return {o, fin, s_in, T, minv};
}

std::tuple<Tensor, Tensor> delta_noautograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                            const Tensor& beta, double scale,
                                            const std::optional<Tensor>& initial_state, bool use_qk_l2norm,
                                            const std::optional<std::string>& group_name,
                                            const std::string& strategy) {
  if (!use_qk_l2norm) {
    auto out = piece_forward(q, k, v, g, beta, scale, initial_state, group_name, strategy);
    return {std::get<0>(out), std::get<1>(out)};
  }
  auto out = piece_forward(l2norm(q), l2norm(k), v, g, beta, scale, initial_state, group_name, strategy);
  return {std::get<0>(out).to(q.scalar_type()), std::get<1>(out)};
}

class GatedDeltaFunction : public torch::autograd::Function<GatedDeltaFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& g, const Tensor& beta, double scale,
                               const std::optional<Tensor>& initial_state,
                               const std::optional<std::string>& group_name, const std::string& strategy) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    auto [o, fin, s_in, T, minv] = piece_forward(q, k, v, g, beta, scale, initial_state, group_name, strategy);
    // alone the backward starts from the initial state; under a group from S_in, with T for the exchange; m^-1
    // where the forward keeps it (the backward then does not form it again)
    ctx->save_for_backward({q, k, v, g, beta,
                            s_in.defined() ? s_in : (initial_state.has_value() ? *initial_state : Tensor()), T,
                            minv.dim() == 4 ? minv : Tensor()});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_initial_state"] = initial_state.has_value();
    if (s_in.defined()) {
      ctx->saved_data["group_name"] = *group_name;
      ctx->saved_data["strategy"] = strategy;
    }
    return {o, fin};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    std::optional<Tensor> start, dout, dfin;
    if (s[5].defined()) start = s[5];
    if (grads[0].defined()) dout = grads[0];
    if (grads[1].defined()) dfin = grads[1];
    const bool grouped = s[6].defined();
    bool first = true;
    if (grouped) {
      // The gradient of S_in from this piece alone goes back along the chain of maps (T^T), which brings the
      // gradient of the state this piece sends on from the ranks after it: that state is the piece's final
      // state, so one backward with both gives every gradient.
      const std::string group_name = ctx->saved_data["group_name"].toStringRef();
      const std::string strategy = ctx->saved_data["strategy"].toStringRef();
      const Tensor g_in = std::get<5>(call_bwd(s[0], s[1], s[2], s[3], s[4], scale, start, dout, dfin, true, s[7]));
      const Tensor g_out = call_exchange(s[6], g_in, std::nullopt, group_name, strategy, /*backward=*/true);
      dfin = dfin.has_value() ? *dfin + g_out : g_out;
      first = Ring(group_name).is_first();
    }
    auto [dq, dk, dv, dg, dbeta, dinit] = call_bwd(s[0], s[1], s[2], s[3], s[4], scale, start, dout, dfin, false, s[7]);
    // only the first rank reads the initial state: the others' gradient for it is zero
    Tensor dinit_out;
    if (ctx->saved_data["has_initial_state"].toBool()) dinit_out = first ? dinit : at::zeros_like(dinit);
    return {dq, dk, dv, dg, dbeta, Tensor(), dinit_out, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> delta_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                          const Tensor& beta, double scale,
                                          const std::optional<Tensor>& initial_state, bool use_qk_l2norm,
                                          const std::optional<std::string>& group_name, const std::string& strategy) {
  if (!use_qk_l2norm) {
    auto out = GatedDeltaFunction::apply(q, k, v, g, beta, scale, initial_state, group_name, strategy);
    return {out[0], out[1]};
  }
  auto out = GatedDeltaFunction::apply(l2norm(q), l2norm(k), v, g, beta, scale, initial_state, group_name, strategy);
  return {out[0].to(q.scalar_type()), out[1]};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> delta_chain_aten(const ChainInputs& in, const Tensor& S0) {
  const int64_t nc = in.Bm.size(2), C = in.Bm.size(3);
  const auto o = S0.options();
  Tensor store = at::empty({S0.size(0), S0.size(1), nc, S0.size(2), S0.size(3)}, o);
  Tensor X = at::empty({S0.size(0), S0.size(1), nc, C, S0.size(3)}, o);
  Tensor S = S0;
  for (int64_t jj = 0; jj < nc; ++jj) {
    const int64_t j = in.reverse ? nc - 1 - jj : jj;
    store.select(2, j).copy_(S);
    Tensor x = at::matmul(in.Bm.select(2, j), S);
    if (in.bsign != 1.0) x = x * in.bsign;
    if (in.A.defined()) x = x + in.A.select(2, j);
    X.select(2, j).copy_(x);
    Tensor cx = at::matmul(in.Cm.select(2, j), x);
    if (in.csign != 1.0) cx = cx * in.csign;
    S = in.p.select(2, j) * S + cx;
    if (in.R.defined()) S = S + in.R.select(2, j);
  }
  return {store, X, nc ? S : S.clone()};
}

bool register_delta_chain(c10::DeviceType type, ChainFn fn) {
  device_hook<ChainFn>(type) = fn;
  return true;
}

bool register_delta_solve(c10::DeviceType type, SolveFn fn) {
  device_hook<SolveFn>(type) = fn;
  return true;
}

bool register_delta_prep(c10::DeviceType type, PrepFn fn) {
  device_hook<PrepFn>(type) = fn;
  return true;
}

bool register_delta_out(c10::DeviceType type, OutFn fn) {
  device_hook<OutFn>(type) = fn;
  return true;
}

bool register_delta_bwd(c10::DeviceType type, BwdFn fn) {
  device_hook<BwdFn>(type) = fn;
  return true;
}

bool register_delta_pro(c10::DeviceType type, ProFn fn) {
  device_hook<ProFn>(type) = fn;
  return true;
}

bool register_delta_main(c10::DeviceType type, MainFn fn) {
  device_hook<MainFn>(type) = fn;
  return true;
}

bool register_delta_l2norm_bwd(c10::DeviceType type, L2NormBwdFn fn) {
  device_hook<L2NormBwdFn>(type) = fn;
  return true;
}

bool register_delta_minv(c10::DeviceType type, MinvFn fn) {
  device_hook<MinvFn>(type) = fn;
  return true;
}

bool register_delta_main_bwd(c10::DeviceType type, MainBwdFn fn) {
  device_hook<MainBwdFn>(type) = fn;
  return true;
}

bool register_delta_l2norm(c10::DeviceType type, L2NormFn fn) {
  device_hook<L2NormFn>(type) = fn;
  return true;
}

bool register_delta_dr(c10::DeviceType type, DrFn fn) {
  device_hook<DrFn>(type) = fn;
  return true;
}

std::tuple<at::Tensor, at::Tensor> gated_delta_attention(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& g,
                                                         const at::Tensor& beta, const DeltaOptions& options) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lasp::gated_delta_attention", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, double, const std::optional<Tensor>&, bool,
                                                         const std::optional<std::string>&, const std::string&)>();
  const double scale = options.scale.value_or(q.dim() == 4 ? 1.0 / std::sqrt(static_cast<double>(q.size(3))) : 1.0);
  return op.call(q, k, v, g, beta, scale, options.initial_state, options.use_qk_l2norm, options.group_name,
                 options.strategy);
}

}  // namespace lasp

TORCH_LIBRARY_FRAGMENT(lasp, m) {
  // q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hv, N, E); g (log decay <= 0, -inf resets) and beta (B, H, N),
  // H = max(Hq, Hv); initial_state (B, H, D, E). Returns (o (B, H, N, E) in q's dtype, final_state in the
  // accumulation type). group_name: a registered c10d group over which the sequence is split (this rank's
  // piece; strategy "ring", "allgather", "scan" or "scan:<m>"; only the first rank reads initial_state, the
  // others get a zero gradient for it); every rank runs the backward. Packed documents with per-document
  // states are composed in python (lasp.gated_delta_attention) from the ops below.
  m.def(
      "gated_delta_attention(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor? initial_state=None, bool use_qk_l2norm=False, str? group_name=None, str strategy=\"ring\") -> "
      "(Tensor, Tensor)");
  // (o, final_state, minv): minv is each chunk's m^-1 in q's dtype, (B, H, N, 64), for the inputs the 16-bit
  // backward kernels take (16-bit q, k, v of one dtype, D and E in {64, 128}; on every device), else a tensor with
  // no elements; the backward's kernels read it instead of forming it again.
  m.def(
      "gated_delta_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor? initial_state=None) -> (Tensor, Tensor, Tensor)");
  // (dq, dk, dv, dg, dbeta, grad_initial_state) in the inputs' dtypes (grad_initial_state: initial_state's,
  // the accumulation type without one); dout / grad_final_state None: zero. state_grad_only: only
  // grad_initial_state (the others have 0 elements). minv: None, or gated_delta_fwd's third output for the same
  // q, k, v, g, beta (its values are trusted: anything else gives wrong gradients).
  m.def(
      "gated_delta_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, Tensor? initial_state, "
      "Tensor? dout, Tensor? grad_final_state, bool state_grad_only=False, Tensor? minv=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The piece's map of states S_out = T S_in + L: (T (B, H, D, D), L (B, H, D, E)), accumulation type.
  m.def("gated_delta_map(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta) -> (Tensor, Tensor)");
  // The exchange of the pieces' maps over group_name (strategy "ring", "allgather", "scan", "scan:<m>"): with
  // backward false, x = L and the result is S_in; with backward true, x = the gradient of S_in from this piece
  // alone and the result the gradient of this piece's outgoing state from the ranks after it (zeros on the
  // last). Every rank of the group calls it alike (a collective); no autograd.
  m.def("gated_delta_exchange(Tensor T, Tensor x, Tensor? initial_state, str group_name, str strategy, "
        "bool backward) -> Tensor");
}

TORCH_LIBRARY_IMPL(lasp, CompositeExplicitAutograd, m) {
  m.impl("gated_delta_attention", &lasp::delta_noautograd);
  m.impl("gated_delta_fwd", &lasp::fwd_impl);
  m.impl("gated_delta_bwd", &lasp::bwd_impl);
  m.impl("gated_delta_map", &lasp::map_impl);
  m.impl("gated_delta_exchange", &lasp::exchange_impl);
}

TORCH_LIBRARY_IMPL(lasp, Meta, m) {
  m.impl("gated_delta_fwd", &lasp::fwd_meta);
  m.impl("gated_delta_bwd", &lasp::bwd_meta);
  m.impl("gated_delta_map", &lasp::map_meta);
  m.impl("gated_delta_exchange", &lasp::exchange_meta);
}

TORCH_LIBRARY_IMPL(lasp, Autograd, m) { m.impl("gated_delta_attention", &lasp::delta_autograd); }
