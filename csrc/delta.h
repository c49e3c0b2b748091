// Internal: the chain of states of the gated delta rule's chunked form (csrc/delta.cpp), the one sequential
// part of its forward, backward and piece map, and the hook through which a device supplies a kernel for it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <tuple>

namespace lasp {

// LASP_DELTA_KERNELS, read at every call: how the op's device hooks below take their calls. aten: none (the
// ATen compositions); cuda (the default): the chain of states and the solves as CUDA kernels; fused: also the
// per-chunk CUDA kernels (WY quantities, output, backward's chain inputs, transposed solve, gradients) and the
// chain's wide form; host: on CPU tensors the CUDA kernels' block programs run on the host (each block's threads
// one after another: a check of them without a GPU, not a fast path), on CUDA tensors as fused. Another value
// is an error that names the setting.
enum class DeltaKernels { Aten, Cuda, Fused, Host };
DeltaKernels delta_kernels_mode();

// Over the chunks j of each (b, h) (in order, or last to first with reverse), from the state S = S0:
//   Sstore[j] = S;   X[j] = A[j] + bsign * Bm[j] S;   S = p[j] S + csign * Cm[j] X[j] + R[j]
// Shapes (acc type, float32 or float64): A (B, H, nc, C, W) or undefined (zero), Bm (B, H, nc, C, D),
// Cm (B, H, nc, D, C), p (B, H, nc, 1, 1), R (B, H, nc, D, W) or undefined (zero), S0 (B, H, D, W).
// The columns of S are independent (W = E for the states, D + E for the piece's map [T | L]).
// Returns (Sstore (B, H, nc, D, W), X (B, H, nc, C, W), the last S (B, H, D, W)).
// tensor_cores: the inputs of the op were 16-bit, so a kernel may form the products at tf32 precision.
struct ChainInputs {
  at::Tensor A, Bm, Cm, p, R;
  double bsign = 1.0, csign = 1.0;
  bool reverse = false;
  bool tensor_cores = false;
};
using ChainFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const ChainInputs& in, const at::Tensor& S0);

// The ATen composition (any device).
std::tuple<at::Tensor, at::Tensor, at::Tensor> delta_chain_aten(const ChainInputs& in, const at::Tensor& S0);

// Registers a kernel for the chain on devices of `type` (the last registration wins); returns true (to
// initialise a static). It must give delta_chain_aten's result for every input it accepts, and may return
// undefined tensors for the inputs it does not take (the composition then runs).
bool register_delta_chain(c10::DeviceType type, ChainFn fn);

// The chunks' unit-triangular solves: X = M^-1 R, or M^-T R (transpose), M (B, H, nc, C, C) unit lower
// triangular (only its strictly lower part is read), R (B, H, nc, C, W), acc type. A device's kernel for
// them, registered as the chain's (undefined result: not taken, the ATen solve runs).
using SolveFn = at::Tensor (*)(const at::Tensor& M, const at::Tensor& R, bool transpose);
bool register_delta_solve(c10::DeviceType type, SolveFn fn);

// The chunks' WY quantities in one step, from the chunked k (B, H, nc, C, D), v (.., C, E), beta (.., C), log
// gates g (.., C) and pre = exp(cumsum g) (.., C), acc type: gam (.., C, C) = exp(segment sums of g), lower with
// the diagonal; kk = K K^T; m = I + A, A the strictly lower part of diag(beta) (gam * kk); w = m^-1
// [diag(beta) V | diag(beta pre) K] (.., C, E + D); and m^-1 (.., C, C) where want_minv and the kernel forms it
// (else undefined). tensor_cores: the op's inputs were 16-bit (the products may be formed at tf32 precision). A
// device's kernel for them, registered as the chain's (undefined w: not taken, the ATen composition runs).
struct PrepOut {
  at::Tensor gam, kk, m, w, minv;
};
using PrepFn = PrepOut (*)(const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& g,
                           const at::Tensor& pre, bool tensor_cores, bool want_minv);
bool register_delta_prep(c10::DeviceType type, PrepFn fn);

// The forward's output per chunk: o = scale (diag(pre) Q S + (Q K^T * gam) U), from the chunked q, k (B, H, nc,
// C, D), gam (.., C, C), pre (.., C), the states entering the chunks S (.., D, E) and the chain's U (.., C, E),
// acc type; o (.., C, E). tensor_cores: the op's inputs were 16-bit, so the products may be formed at tf32
// precision. A device's kernel for it (undefined: not taken, the ATen composition runs).
using OutFn = at::Tensor (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                             const at::Tensor& S, const at::Tensor& U, double scale, bool tensor_cores);
bool register_delta_out(c10::DeviceType type, OutFn fn);

// The backward's gradients per chunk, after the chain of state gradients and the transposed solve (the
// formulas: kernels/delta_bwd.h), from the chunked q, k (B, H, nc, C, D), v (.., C, E), beta, pre (.., C), gam,
// kk (.., C, C), w = [Wv | Wk] (.., C, E + D), the states entering the chunks S and the gradients of those
// leaving them dSe (.., D, E), U and dO (.., C, E) and dR = [dRv | dRk] (.., C, E + D), acc type: dq, dk
// (.., C, D), dv (.., C, E), dbeta, dg (.., C). A device's kernel for them (undefined dq: not taken).
struct BwdChunkIn {
  at::Tensor q, k, v, beta, pre, gam, kk, w, S, dSe, u, dO, dR;
  double scale = 1.0;
  bool tensor_cores = false;  // the op's inputs were 16-bit: the products may be formed at tf32 precision
};
struct BwdChunkOut {
  at::Tensor dq, dk, dv, dbeta, dg;
};
using BwdFn = BwdChunkOut (*)(const BwdChunkIn& in);
bool register_delta_bwd(c10::DeviceType type, BwdFn fn);

// The backward's chain inputs that do not depend on the state gradients: pdo = scale (Q K^T * gam)^T dO
// (.., C, E) and qdo = scale Q^T diag(pre) dO (.., D, E), from the chunked q, k (B, H, nc, C, D), gam (.., C, C),
// pre (.., C) and dO (.., C, E), acc type (tensor_cores: as for the output). A device's kernel for them
// (undefined: not taken).
struct ProOut {
  at::Tensor pdo, qdo;
};
using ProFn = ProOut (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& gam, const at::Tensor& pre,
                         const at::Tensor& dO, double scale, bool tensor_cores);
bool register_delta_pro(c10::DeviceType type, ProFn fn);

// The backward's transposed solve where m^-1 is at hand: dR = m^-T [dU | -dU S^T] (.., C, E + D) from m^-1
// (.., C, C), dU (.., C, E) and the states entering the chunks S (.., D, E), acc type (tensor_cores: as for the
// output). A device's kernel for it (undefined: not taken; the composition and the solve run).
using DrFn = at::Tensor (*)(const at::Tensor& minv, const at::Tensor& dU, const at::Tensor& S, bool tensor_cores);
bool register_delta_dr(c10::DeviceType type, DrFn fn);

// The forward of one piece where a device has kernels for all of it (sm_90a: the WY form in 16 bits, then the
// gated wgmma main kernel with U = W_v - W_k S_b for the values, kernels/wgmma_fwd.cu): from q, k, v, g, beta
// as the op got them (bhnd views, checked), scale and the incoming state (B, H, D, E) or none (zero), N > 0:
// (o (B, H, N, E) in q's dtype, the final state (B, H, D, E) in the acc type, and m^-1 (below) for 16-bit q, k, v
// with D, E in {64, 128}, else undefined). Undefined o: not taken (the chunked form's ATen compositions and kernels
// run).
using MainFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const at::Tensor& g,
                                                                  const at::Tensor& beta, double scale,
                                                                  const std::optional<at::Tensor>& initial_state);
bool register_delta_main(c10::DeviceType type, MainFn fn);

// m^-1, the inverse of each chunk's m = I + A in q's dtype, (B, H, N, 64) (row n holds row n mod 64 of its chunk's):
// gated_delta_fwd's third output for 16-bit q, k, v with D, E in {64, 128}, which the backward's kernels read
// (MainBwdFn). A device's kernel for it from k, v, g, beta (bhnd views, checked) where MainFn did not run; undefined
// where not taken (ATen operations form it).
using MinvFn = at::Tensor (*)(const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta);
bool register_delta_minv(c10::DeviceType type, MinvFn fn);

// The backward of one piece where a device has kernels for all of it (sm_80+: the WY form, the forward's and the
// reverse chain of states and the per-chunk gradients, all in 16 bits; kernels/delta_chain16.h, delta_grad16.h),
// from what bwd_impl gets (q, k, v, g, beta as bhnd views, checked; dout (B, H, N, E) and the final state's
// cotangent (B, H, D, E), checked, or none: zero), N > 0: (dq, dk (B, H, N, D), dv (B, H, N, E), dg, dbeta
// (B, H, N), per output head, and the gradient of the incoming state dS0 (B, H, D, E), in the acc type or, for dq,
// dk, dv, in the input's dtype); with
// state_grad_only dS0 alone (the others undefined). minv: the forward's m^-1 (MinvFn), checked, or undefined
// (formed again). Undefined dS0: not taken (the chunked form runs).
using MainBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
    double scale, const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& dout,
    const std::optional<at::Tensor>& grad_final_state, bool state_grad_only, const at::Tensor& minv);
bool register_delta_main_bwd(c10::DeviceType type, MainBwdFn fn);

// The l2 normalisation of q or k (use_qk_l2norm; without autograd recording, and as the forward of its autograd
// function): y = r x, r = 1 / sqrt(sum of squares over the last dim + 1e-6), computed in the acc type and rounded
// once to x's dtype, from a tensor x of any shape; where want_r also r (fp32, x's shape with the last dim 1, for
// the backward below). A device's kernel for it (undefined y: not taken; two ATen passes run).
using L2NormFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& x, bool want_r);
bool register_delta_l2norm(c10::DeviceType type, L2NormFn fn);
// Its gradient for the autograd of the l2 normalisation, from the forward's y and r (not x, which autograd then
// need not keep): dx = r (dy - y sum(dy y)) per row over the last dim, in the acc type and rounded once to y's
// dtype. A device's kernel for it (undefined: not taken; the same formula by ATen operations runs).
using L2NormBwdFn = at::Tensor (*)(const at::Tensor& y, const at::Tensor& r, const at::Tensor& dy);
bool register_delta_l2norm_bwd(c10::DeviceType type, L2NormBwdFn fn);
}  // namespace lasp
